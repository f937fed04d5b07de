"""planner_node: needle paths on the planning scan's label map, as ROS services (thin rclpy adapter).

Services (both in one MutuallyExclusive callback group: one planning at a time,
while the registration subscription and diagnostics keep being served):

* ``/planner/plan`` (igt_robot_msgs/PlanPath) -- ranked straight paths from the
  skin to ``target`` (frame ``scanner``, LPS, m; any other frame is refused).
  The label map is read from ``labelmap_path`` (NIfTI); an empty path means the
  label map of the previous request (else the ``labelmap_path`` parameter).
  Loaded maps are cached with their distance fields (``NeedlePlanner``) per
  resolved path + modification time + size. ``candidate_entries`` (scanner LPS,
  m) replace the sampled skin entries. ``max_plans`` 0 means 5.
* ``/planner/validate`` (igt_robot_msgs/ValidatePlan) -- the same checks and
  sentences for one operator-given entry + target, on the last label map.

Reachability: once an accepted ``RegistrationResult`` has arrived on
``/registration/result`` (LATCHED; ``transform`` maps scanner -> base_link),
the robot's inverse kinematics with its URDF joint limits
(``RobotReachability``); before that, the guide cone of ``reach.*``
(``ConeReachability``) -- every response message says which. Without a
registration there is no joint solution and ``insertion_depth`` is NaN
(unknown): the robot's insertion travel runs from its remote centre of motion,
which only the registration places.

A failed request (bad input, no feasible path) is ``success=false`` with the
planning core's explanation; a plan is never silently empty.

Outputs:

* ``/planner/current_plan`` (NeedlePlan, LATCHED) -- the best plan of the last
  successful request (a failed request leaves it as it was).
* ``/planner/markers`` (visualization_msgs/MarkerArray, LATCHED) -- DELETEALL,
  then namespaces ``target``, ``entry`` (spheres), ``path`` (LINE_STRIP
  coloured by clearance: red inside a margin, orange at it, green from
  ``clearance.saturation_m`` beyond), ``structure/<name>`` (POINTS: decimated
  surface voxels of each critical structure) and ``tumour``. Frame
  ``base_link`` once registered (parameter ``markers.frame: auto``), else
  ``scanner``.
* ``/procedure/events`` -- ``plan_proposed`` (INFO) / ``plan_failed`` (WARN).
* ``/diagnostics`` -- reachability model, cached label maps, request counts.

Parameters: the planning core's (``needle.*``, ``clearance.*``, ... -- see
docs/planning.md) and the node's own (``labels.*`` roles of the label values,
``labelmap_*``, ``markers.*``); all read once at start. See config/planner.yaml.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import pathlib
import threading
import time
import traceback
import uuid
from typing import Optional, Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import Point, Vector3
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from igt_planner import reasons as R
from igt_planner.candidates import EntryRegion
from igt_planner.config import PlannerConfig, config_from_params
from igt_planner.errors import NoFeasiblePath, PlanningError
from igt_planner.label_roles import ROLES, LabelRoles, labelmap_from_volume, surface_points  # noqa: F401
from igt_planner.path_display import clearance_colour, path_slack, rejection_summary
from igt_planner.planner import NeedlePath, NeedlePlanner
from igt_planner.reachability import ConeReachability, RobotReachability
from igt_robot import frames
from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.io import read_nifti
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import common, msg_convert, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.robot_model import load_robot_model
from igt_robot_msgs.msg import NeedlePlan, ProcedureEvent, RegistrationResult
from igt_robot_msgs.srv import PlanPath, ValidatePlan

NODE_NAME = 'planner_node'
DEFAULT_MAX_PLANS = 5                 # PlanPath: max_plans 0 = 5
PLAN_TOPIC = topics.PLANNER_CURRENT_PLAN
MARKERS_TOPIC = topics.PLANNER_MARKERS
REGISTRATION_TOPIC = topics.REGISTRATION_RESULT
# A rotation quaternion further than this from unit length is a corrupt message, not float noise.
QUATERNION_NORM_TOL = 1e-3

# ------------------------------------------------------------------ parameters
# The planning core's parameters: dotted name -> (description, low, high). Defaults come from
# PlannerConfig() so the two cannot drift; every field must be described here (checked below).
_CORE_DOCS = {
    'require_critical': ('refuse label maps holding no critical structure (a label with a margin, or bone)',
                         None, None),
    'needle.max_depth_m': ('longest skin-entry-to-tip distance the needle allows, m', 0.001, 1.0),
    'needle.min_depth_m': ('shortest accepted entry-to-target distance, m', 0.0, 0.5),
    'sampling.step_fraction': ('fine sample step along a path as a fraction of the smallest voxel side '
                               '(<= 0.5)', 0.01, 0.5),
    'sampling.coarse_step_m': ('first-pass step of the exact branch-and-bound clearance sampling, m',
                               0.0001, 0.5),
    'sampling.chunk_samples': ('bound on sample points interpolated in one call (memory), count',
                               1000, 1_000_000_000),
    'clearance.cap_m': ('clearances are exact below this and reported as "at least" above, m', 0.001, 1.0),
    'clearance.saturation_m': ('clearance beyond a margin stops earning score past this, m (also the '
                               'all-green distance of the path marker)', 0.0001, 1.0),
    'clearance.air_skip_m': ('length after the entry where touching air is expected, m', 0.0, 0.1),
    'skin.max_angle_rad': ('largest angle between the needle and the inward skin normal, rad', 0.001,
                           math.pi / 2),
    'skin.normal_sigma_m': ('Gaussian sigma smoothing the body mask before its gradient (skin normal), m',
                            0.0001, 0.05),
    'skin.normal_truncate': ('Gaussian kernel half-width, sigmas', 1.0, 10.0),
    'entry.tolerance_m': ('explicit entries may lie this far from the allowed skin region, m', 0.0, 0.1),
    'entry.max_candidates': ('candidate entries kept after the depth check (uniform random subset), count',
                             1, 10_000_000),
    'entry.seed': ('seed of that subset (reproducible plans)', 0, 2**31 - 1),
    'ranking.weight_clearance': ('score weight of the clearance beyond the margin', 0.0, 1000.0),
    'ranking.weight_depth': ('score weight of the insertion depth (shorter is better)', 0.0, 1000.0),
    'ranking.weight_skin_angle': ('score weight of the skin angle (perpendicular is better)', 0.0, 1000.0),
    'ranking.weight_joint_margin': ('score weight of the joint-limit margin (mid-range is better)', 0.0, 1000.0),
    'ranking.max_ranked': ('feasible paths kept in the ranking (upper bound of max_plans), count', 1, 10000),
    'reach.cone_axis': ('before registration: needle direction at the centre of the guide cone, scanner LPS '
                        'vector', None, None),
    'reach.cone_half_angle_rad': ('before registration: half-angle of the guide cone, rad', 0.001, math.pi),
    'reach.cone_max_depth_m': ('before registration: longest reachable entry-to-target distance, m', 0.001, 2.0),
    'ablation.power_w': ('ablation table axis: generator power, W', None, None),
    'ablation.time_s': ('ablation table axis: ablation time, s', None, None),
    'ablation.long_diameter_m': ('ablation zone long diameter, m; row-major, one row per power', None, None),
    'ablation.short_diameter_m': ('ablation zone short diameter, m; same layout', None, None),
    'ablation.tip_protrusion_m': ('how far the zone reaches beyond the needle tip, m', 0.0, 0.1),
    'ablation.tumour_margin_m': ('ablative margin around the tumour, m', 0.0, 0.1),
    'ablation.offset_min_m': ('tip search along the needle, lower end (relative to the zone-centred tip), m',
                              -0.5, 0.5),
    'ablation.offset_max_m': ('tip search along the needle, upper end, m', -0.5, 0.5),
    'ablation.offset_step_m': ('tip search step, m', 0.00001, 0.1),
    'ablation.supersample': ('sub-voxel points per axis for coverage estimates, count', 1, 4),
}


def _core_defaults() -> dict:
    """PlannerConfig() as {dotted name: ROS-parameter value} (tuples become lists)."""
    out = {}
    defaults = PlannerConfig()
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                v = getattr(value, g.name)
                out[f'{f.name}.{g.name}'] = [float(x) for x in v] if isinstance(v, tuple) else v
        else:
            out[f.name] = value
    return out


_DEFAULTS = _core_defaults()
if set(_DEFAULTS) != set(_CORE_DOCS):   # a new core field needs a description here (and in the YAML)
    raise ImportError(f'planner_node parameter table out of date: missing {sorted(set(_DEFAULTS) - set(_CORE_DOCS))}, '
                      f'unknown {sorted(set(_CORE_DOCS) - set(_DEFAULTS))}')
CORE_PARAMS = [Param(name, _DEFAULTS[name], doc, low, high, read_only=True)
               for name, (doc, low, high) in _CORE_DOCS.items()]

NODE_PARAMS = [
    Param('labelmap_path', '', 'label map (NIfTI) used when a request leaves labelmap_path empty and none has '
          'been loaded yet (empty = none)', read_only=True),
    Param('labelmap_root', '', 'when set, label map paths must resolve to a location under this folder and '
          'relative paths are taken relative to it (empty = any path, relative to the working folder)',
          read_only=True),
    Param('labelmap_cache_size', 2, 'label maps kept loaded with their distance fields, count', 1, 16,
          read_only=True),
    Param('labels.values', [0, 1, 2, 3, 4], 'label values described by labels.names/roles/margins_m '
          '(same order)', read_only=True),
    Param('labels.names', ['air', 'tumour', 'vessel', 'bone', 'body'], 'name of each label value, used in '
          'every explanation', read_only=True),
    Param('labels.roles', ['air', 'tumour', 'critical', 'bone', 'entry'], 'role of each label value: air '
          '(outside the patient), tissue, entry (its skin is the allowed entry region), tumour, critical '
          '(keep the margin), bone (never crossed, keep the margin)', read_only=True),
    Param('labels.margins_m', [0.0, 0.0, 0.005, 0.003, 0.0], 'safety margin of each label value, m (used for '
          'critical and bone labels)', read_only=True),
    Param('labels.refuse_unknown', True, 'refuse a label map holding a value not in labels.values (an '
          'unknown label may be a critical structure)', read_only=True),
    Param('markers.frame', 'auto', 'frame of /planner/markers: auto = base_link once a registration is '
          'accepted, else scanner; scanner = always scanner', read_only=True, choices=('auto', 'scanner')),
    Param('markers.max_structure_points', 3000, 'surface points drawn per structure (decimated), count',
          10, 1_000_000, read_only=True),
    Param('markers.path_segments', 80, 'segments of the clearance-coloured path line, count', 1, 10000,
          read_only=True),
    Param('diagnostics_period_s', 1.0, '/diagnostics publication period, s', 0.1, 60.0, read_only=True),
]
PARAMS = CORE_PARAMS + NODE_PARAMS


class RequestRefused(Exception):
    """A request the node refuses before planning (frame, missing file, ...); the message says why."""


# ------------------------------------------------------------------ messages

def _point(p) -> Point:
    return Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))


def _array(point) -> np.ndarray:
    return np.array([point.x, point.y, point.z], dtype=float)


def _colour(rgb, alpha: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=float(rgb[0]), g=float(rgb[1]), b=float(rgb[2]), a=float(alpha))


STRUCTURE_COLOURS = {'bone': (0.95, 0.92, 0.80), 'critical': (0.25, 0.45, 1.0), 'tumour': (0.75, 0.30, 0.90)}
TARGET_COLOUR, ENTRY_COLOUR = (1.0, 1.0, 0.0), (0.0, 0.9, 0.9)
TARGET_DIAMETER_M, ENTRY_DIAMETER_M = 0.005, 0.004
PATH_WIDTH_M, POINT_SIZE_M = 0.0015, 0.001


def build_markers(planner: NeedlePlanner, path: NeedlePath, structures: Sequence, frame_id: str,
                  T_frame_scanner: np.ndarray, stamp, segments: int = 80) -> MarkerArray:
    """The rviz picture of ``path`` (see the module docstring for the namespaces).

    ``structures``: (namespace, role, points (N, 3) scanner LPS). Points are
    mapped into ``frame_id`` by ``T_frame_scanner`` (identity for ``scanner``).
    """
    T = np.asarray(T_frame_scanner, float)
    out = MarkerArray()
    clear = Marker(action=Marker.DELETEALL)
    clear.header.frame_id, clear.header.stamp = frame_id, stamp
    out.markers.append(clear)

    def marker(ns, kind, scale, rgb, alpha=1.0):
        m = Marker(ns=ns, id=0, type=kind, action=Marker.ADD, frame_locked=False)
        m.header.frame_id, m.header.stamp = frame_id, stamp
        m.pose.orientation.w = 1.0
        m.scale = Vector3(x=float(scale), y=float(scale), z=float(scale))
        m.color = _colour(rgb, alpha)
        out.markers.append(m)
        return m

    for ns, point, diameter, rgb in (('target', path.target, TARGET_DIAMETER_M, TARGET_COLOUR),
                                     ('entry', path.entry, ENTRY_DIAMETER_M, ENTRY_COLOUR)):
        m = marker(ns, Marker.SPHERE, diameter, rgb)
        m.pose.position = _point(frames.apply(T, point))
    points, slack = path_slack(planner, path.entry, path.target, segments)
    line = marker('path', Marker.LINE_STRIP, PATH_WIDTH_M, (1.0, 1.0, 1.0))
    line.points = [_point(p) for p in frames.apply(T, points)]
    saturation = planner.config.clearance.saturation_m
    line.colors = [_colour(clearance_colour(s, saturation)) for s in slack]
    for ns, role, pts in structures:
        if len(pts) == 0:
            continue
        m = marker(ns, Marker.POINTS, POINT_SIZE_M, STRUCTURE_COLOURS.get(role, (0.6, 0.6, 0.6)), 0.6)
        m.points = [_point(p) for p in frames.apply(T, np.asarray(pts, float))]
    return out


# ------------------------------------------------------------------ state

@dataclasses.dataclass
class LoadedMap:
    """A label map loaded from a file, with its planner (distance fields cached) and marker points."""

    key: tuple                       # (resolved path, mtime_ns, size)
    path: pathlib.Path
    planner: NeedlePlanner
    structures: list                 # [(namespace, role, points (N, 3) scanner LPS)]
    load_seconds: float


@dataclasses.dataclass(frozen=True)
class ActiveRegistration:
    """The accepted registration the robot reachability uses."""

    T_base_scanner: np.ndarray
    reachability: RobotReachability
    method: str
    fre: float                       # m, as reported by the registration

    def describe(self) -> str:
        fre = f', FRE {R.format_mm(self.fre)}' if self.fre > 0 else ''
        return f'robot inverse kinematics with URDF joint limits, through the accepted {self.method} registration{fre}'


class PlannerNode(Node):
    """Plans and validates needle paths; see the module docstring."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS)
        self.config = config_from_params({p.name: self.p[p.name] for p in CORE_PARAMS})
        self.roles = LabelRoles.from_params(self.p['labels.values'], self.p['labels.names'],
                                            self.p['labels.roles'], self.p['labels.margins_m'])
        self.model = load_robot_model()
        self.kinematics = NeedleGuideKinematics(self.model)
        self.insertion_index = self.model.joint_index('needle_insertion')
        q = self.config.reach
        self.cone = ConeReachability(q.cone_axis, q.cone_half_angle_rad, q.cone_max_depth_m)
        self._lock = threading.Lock()               # registration state (written by its subscription)
        self.registration: Optional[ActiveRegistration] = None
        self.registration_error = ''
        self._maps: 'collections.OrderedDict[tuple, LoadedMap]' = collections.OrderedDict()
        self.current_map: Optional[LoadedMap] = None
        self._session = time.strftime('%Y%m%d-%H%M%S') + '-' + uuid.uuid4().hex[:4]
        self._requests = 0
        self.counts = collections.Counter()          # plans_ok, plans_failed, validations
        self.last_plan: Optional[NeedlePlan] = None
        self.last_outcome = 'no request yet'

        self.plan_pub = self.create_publisher(NeedlePlan, PLAN_TOPIC, qos.LATCHED)
        self.markers_pub = self.create_publisher(MarkerArray, MARKERS_TOPIC, qos.LATCHED)
        self.events = common.create_event_publisher(self)
        self.diagnostics = common.create_diagnostics_publisher(self)
        self.create_subscription(RegistrationResult, REGISTRATION_TOPIC, self._on_registration, qos.LATCHED)
        # Planning holds the planner caches: one request at a time, in its own group so the
        # registration subscription and diagnostics (default group) are served meanwhile.
        self.planning_group = MutuallyExclusiveCallbackGroup()
        self.create_service(PlanPath, topics.PLANNER_PLAN, self._on_plan, callback_group=self.planning_group)
        self.create_service(ValidatePlan, topics.PLANNER_VALIDATE, self._on_validate,
                            callback_group=self.planning_group)
        self.create_timer(self.p['diagnostics_period_s'], self._publish_diagnostics)
        self.get_logger().info(f'labels: {self.roles.describe()}; reachability: guide cone until a registration '
                               f'is accepted on {REGISTRATION_TOPIC}')

    # ------------------------------------------------------------ registration
    def _on_registration(self, msg: RegistrationResult) -> None:
        if not msg.accepted:
            return   # a rejected result carries no usable transform (and is not published by the contract)
        try:
            problem = ''
            if (msg.transform.header.frame_id, msg.transform.child_frame_id) != (frames.BASE_FRAME,
                                                                                 frames.SCANNER_FRAME):
                problem = (f"transform maps '{msg.transform.child_frame_id}' into "
                           f"'{msg.transform.header.frame_id}', expected scanner into base_link")
            r = msg.transform.transform.rotation
            norm = math.sqrt(r.x ** 2 + r.y ** 2 + r.z ** 2 + r.w ** 2)
            if not problem and not abs(norm - 1.0) <= QUATERNION_NORM_TOL:
                problem = f'rotation quaternion has norm {norm:.6g}, not 1'
            if problem:
                raise PlanningError(problem)
            T = msg_convert.transform_matrix(msg.transform.transform)
            reach = RobotReachability(self.kinematics, T, self.model)   # checks finite + rigid
        except PlanningError as exc:
            with self._lock:
                # Planning with the previous registration would use a mounting the stack no longer
                # believes in: fall back to the cone (and say why) until a usable one arrives.
                self.registration = None
                self.registration_error = f'registration received but unusable: {exc}'
            self.get_logger().error(self.registration_error)
            return
        active = ActiveRegistration(T, reach, msg.method or 'unknown', float(msg.fre))
        with self._lock:
            self.registration, self.registration_error = active, ''
        self.get_logger().info(f'registration accepted ({active.method}): planning with the robot kinematics')

    def _reachability(self):
        """(reachability, active registration or None, sentence saying which model is used)."""
        with self._lock:
            reg, error = self.registration, self.registration_error
        if reg is not None:
            return reg.reachability, reg, reg.describe()
        q = self.config.reach
        why = error or f'no registration accepted yet on {REGISTRATION_TOPIC}'
        return self.cone, None, (f'guide cone of {R.format_angle(q.cone_half_angle_rad)} around '
                                 f'({", ".join(f"{v:g}" for v in q.cone_axis)}) LPS, up to '
                                 f'{R.format_mm(q.cone_max_depth_m)} -- {why}; no joint solution or insertion '
                                 'travel until the robot is registered')

    # ------------------------------------------------------------ label maps
    def _resolve(self, requested: str) -> pathlib.Path:
        text = (requested or '').strip()
        if not text:
            if self.current_map is not None:
                return self.current_map.path
            text = self.p['labelmap_path'].strip()
            if not text:
                raise RequestRefused('no label map: the request gives no labelmap_path, none has been loaded yet '
                                     'and the labelmap_path parameter is empty')
        if '\x00' in text:
            raise RequestRefused('labelmap_path contains a NUL character')
        root_text = self.p['labelmap_root']
        root = pathlib.Path(os.path.expanduser(root_text)).resolve() if root_text else None
        path = pathlib.Path(os.path.expanduser(text))
        if not path.is_absolute():
            path = (root if root is not None else pathlib.Path.cwd()) / path
        path = path.resolve()     # '..' and symlinks resolved before the root check
        if root is not None and not path.is_relative_to(root):
            raise RequestRefused(f'label map {text!r} resolves to {path}, outside labelmap_root {root}')
        if not path.is_file():
            raise RequestRefused(f'label map file {path} does not exist' if not path.exists()
                                 else f'label map {path} is not a file (give a NIfTI file .nii / .nii.gz)')
        return path

    def _load(self, requested: str) -> tuple:
        """(LoadedMap, loaded now?) for a request's labelmap_path; cached per path + mtime + size."""
        path = self._resolve(requested)
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key in self._maps:
            self._maps.move_to_end(key)
            self.current_map = self._maps[key]
            return self.current_map, False
        t0 = time.monotonic()
        try:
            volume = read_nifti(path, modality='LABEL')
        except ImageError as exc:
            raise RequestRefused(str(exc)) from exc
        labelmap = labelmap_from_volume(volume, self.roles, self.p['labels.refuse_unknown'], source=str(path))
        entry = (EntryRegion.from_labels(self.roles.entry, name='skin of ' + ', '.join(
            repr(self.roles.names[v]) for v in sorted(self.roles.entry))) if self.roles.entry else None)
        planner = NeedlePlanner(labelmap, self.config, self.cone, entry)
        planner.precompute()   # skin, normals and distance fields now, once per map
        max_points = self.p['markers.max_structure_points']
        structures = []
        for label in labelmap.critical_labels:
            role = 'bone' if label in labelmap.bone_labels else 'critical'
            structures.append((f'structure/{labelmap.name(label)}', role,
                               surface_points(labelmap, [label], max_points)))
        present_tumour = [v for v in sorted(labelmap.tumour_labels) if labelmap.present(v)]
        if present_tumour:
            structures.append(('tumour', 'tumour', surface_points(labelmap, present_tumour, max_points)))
        loaded = LoadedMap(key, path, planner, structures, time.monotonic() - t0)
        self._maps[key] = loaded
        while len(self._maps) > self.p['labelmap_cache_size']:
            self._maps.popitem(last=False)
        self.current_map = loaded
        self.get_logger().info(f'label map {path} loaded in {loaded.load_seconds:.2f} s '
                               f'({"x".join(map(str, labelmap.shape))} voxels, structures '
                               f'{", ".join(planner.field_names)})')
        return loaded, True

    # ------------------------------------------------------------ requests
    @staticmethod
    def _scanner_point(stamped, what: str) -> np.ndarray:
        frame = stamped.header.frame_id
        if frame != frames.SCANNER_FRAME:
            raise RequestRefused(f"{what} is in frame '{frame}'; it must be in '{frames.SCANNER_FRAME}' "
                                 '(DICOM LPS, m)')
        return _array(stamped.point)

    def _plan_id(self, rank: int) -> str:
        return f'plan-{self._session}-{self._requests:03d}.{rank}'

    def plan_message(self, path: NeedlePath, planner: NeedlePlanner, plan_id: str, robot: bool) -> NeedlePlan:
        """A NeedlePlan filled from the core's NeedlePath (scanner LPS, SI units)."""
        msg = NeedlePlan(plan_id=plan_id)
        msg.header.frame_id = frames.SCANNER_FRAME
        msg.header.stamp = common.stamp_now(self)
        msg.entry, msg.target = _point(path.entry), _point(path.target)
        msg.direction = Vector3(x=float(path.direction[0]), y=float(path.direction[1]), z=float(path.direction[2]))
        msg.depth = float(path.depth)
        fields = planner.fields
        msg.structure_names = [f.name for f in fields]
        # NaN: not evaluated (a plan stops sampling a path once it crosses a structure).
        msg.min_clearance = [float(path.clearance.get(f.name, math.nan)) for f in fields]
        msg.required_margin = [float(f.margin_m) for f in fields]
        msg.skin_angle = float(path.skin_angle)
        msg.joint_limit_margin = float(path.joint_limit_margin)
        msg.score = float(path.score)
        msg.reachable, msg.feasible = bool(path.reachable), bool(path.feasible)
        msg.reasons = list(path.reasons)
        if robot and path.joints is not None:
            msg.joint_solution = JointState(name=list(self.model.joint_names),
                                            position=[float(v) for v in path.joints])
            msg.joint_solution.header.stamp = msg.header.stamp
            msg.insertion_depth = float(path.joints[self.insertion_index])
        else:
            msg.insertion_depth = math.nan    # unknown without the robot's RCM (see the module docstring)
        return msg

    def _on_plan(self, req: PlanPath.Request, resp: PlanPath.Response) -> PlanPath.Response:
        self._requests += 1
        t0 = time.monotonic()
        note = ''
        try:
            target = self._scanner_point(req.target, 'target')
            loaded, fresh = self._load(req.labelmap_path)
            reach, reg, note = self._reachability()
            planner = loaded.planner
            planner.reachability = reach
            entries = None
            if len(req.candidate_entries):
                entries = np.array([_array(p) for p in req.candidate_entries], dtype=float)
            result = planner.plan(target, entry_points=entries)
        except NoFeasiblePath as exc:
            examples = {}
            if exc.best_rejected is not None:
                for kind in dict.fromkeys(exc.best_rejected.reason_kinds):
                    examples.setdefault(kind, exc.best_rejected)
            resp.rejection_summary = rejection_summary(exc.counts, exc.n_candidates, examples)
            return self._plan_failed(resp, f'{exc} [reachability: {note}]', type(exc).__name__, exc.counts)
        except (PlanningError, RequestRefused) as exc:
            return self._plan_failed(resp, str(exc) + (f' [reachability: {note}]' if note else ''),
                                     type(exc).__name__)
        except Exception as exc:   # a bug must not kill the service: report it and keep serving
            self.get_logger().error(f'planning failed unexpectedly: {exc!r}\n{traceback.format_exc()}')
            return self._plan_failed(resp, f'planner internal error: {exc!r}', type(exc).__name__)

        n = req.max_plans or DEFAULT_MAX_PLANS
        paths = result.ranked[:n]
        plans = [self.plan_message(p, planner, self._plan_id(k + 1), reg is not None) for k, p in enumerate(paths)]
        resp.success, resp.plans = True, plans
        resp.rejection_summary = rejection_summary(result.rejected_counts, result.n_candidates,
                                                   result.rejected_examples)
        source = f'{len(entries)} given entries' if entries is not None else 'sampled skin entries'
        if n > len(paths) and result.n_feasible > len(paths):
            source += f'; the ranking keeps {len(paths)} (ranking.max_ranked)'
        best = plans[0]
        resp.message = (f'{len(plans)} plan(s); best {best.plan_id}: {paths[0].explain()}; '
                        f'{result.n_feasible} feasible of {result.n_candidates} candidates ({source}); '
                        f'reachability: {note}; label map {loaded.path.name} '
                        f'({"loaded in " + format(loaded.load_seconds, ".1f") + " s" if fresh else "cached"})')
        frame, T = self._marker_frame(reg)
        self.plan_pub.publish(best)
        self.markers_pub.publish(build_markers(planner, paths[0], loaded.structures, frame, T, best.header.stamp,
                                               self.p['markers.path_segments']))
        self.last_plan, self.last_outcome = best, f'{best.plan_id} proposed'
        self.counts['plans_ok'] += 1
        closest = min(paths[0].clearance, key=paths[0].clearance.get) if paths[0].clearance else ''
        self.events.publish(common.make_event(
            self, 'plan_proposed', f'plan {best.plan_id} proposed: {paths[0].explain()}', ProcedureEvent.INFO,
            {'plan_id': best.plan_id, 'depth_m': f'{best.depth:.5f}',
             'insertion_depth_m': f'{best.insertion_depth:.5f}',
             'closest_structure': closest, 'min_clearance_m': f'{paths[0].min_clearance:.5f}',
             'score': f'{best.score:.4f}', 'reachability': 'robot' if reg is not None else 'cone',
             'n_candidates': result.n_candidates, 'n_feasible': result.n_feasible, 'labelmap': str(loaded.path),
             'markers_frame': frame, 'duration_s': f'{time.monotonic() - t0:.3f}'}, phase='PLANNING'))
        return resp

    def _plan_failed(self, resp, message: str, error: str, counts: Optional[dict] = None):
        resp.success, resp.message, resp.plans = False, message, []
        self.counts['plans_failed'] += 1
        self.last_outcome = f'plan failed ({error})'
        values = {'error': error}
        values.update({f'rejected_{k}': v for k, v in (counts or {}).items()})
        self.events.publish(common.make_event(self, 'plan_failed', f'no plan: {message}', ProcedureEvent.WARN,
                                              values, phase='PLANNING'))
        self.get_logger().warning(f'no plan: {message}')
        return resp

    def _marker_frame(self, reg: Optional[ActiveRegistration]) -> tuple:
        if reg is not None and self.p['markers.frame'] == 'auto':
            return frames.BASE_FRAME, reg.T_base_scanner
        return frames.SCANNER_FRAME, np.eye(4)

    def _on_validate(self, req: ValidatePlan.Request, resp: ValidatePlan.Response) -> ValidatePlan.Response:
        self.counts['validations'] += 1
        note = ''
        try:
            entry = self._scanner_point(req.entry, 'entry')
            target = self._scanner_point(req.target, 'target')
            if self.current_map is None and not self.p['labelmap_path'].strip():
                raise RequestRefused('no label map loaded yet: plan once (/planner/plan with the planning scan\'s '
                                     'label map) before validating a path')
            loaded, _ = self._load('')
            reach, reg, note = self._reachability()
            loaded.planner.reachability = reach
            path = loaded.planner.validate(entry, target)
        except (PlanningError, RequestRefused) as exc:
            resp.valid = False
            resp.message = str(exc) + (f' [reachability: {note}]' if note else '')
            return resp
        except Exception as exc:   # see _on_plan
            self.get_logger().error(f'validation failed unexpectedly: {exc!r}\n{traceback.format_exc()}')
            resp.valid, resp.message = False, f'planner internal error: {exc!r}'
            return resp
        resp.plan = self.plan_message(path, loaded.planner, f'check-{self._session}-{self.counts["validations"]:03d}',
                                      reg is not None)
        resp.valid = bool(path.feasible)
        resp.message = (f'{"valid" if path.feasible else "invalid"} -- {path.explain()}; clearance '
                        f'{path.clearance_text() or "not evaluated"}; reachability: {note}; '
                        f'label map {loaded.path.name}')
        return resp

    # ------------------------------------------------------------ status
    def _publish_diagnostics(self) -> None:
        with self._lock:
            reg, error = self.registration, self.registration_error
        level = DiagnosticStatus.WARN if error else DiagnosticStatus.OK
        values = {'reachability': 'robot' if reg is not None else 'cone',
                  'registration_method': reg.method if reg is not None else '',
                  'registration_error': error,
                  'labelmap': str(self.current_map.path) if self.current_map is not None else '',
                  'cached_labelmaps': len(self._maps),
                  'plans_ok': self.counts['plans_ok'], 'plans_failed': self.counts['plans_failed'],
                  'validations': self.counts['validations'],
                  'last_plan_id': self.last_plan.plan_id if self.last_plan is not None else ''}
        status = common.diagnostic_status(self, 'planner', level, error or self.last_outcome, values)
        self.diagnostics.publish(common.diagnostic_array(self, [status]))

    def describe_state(self) -> str:
        with self._lock:
            reg = self.registration
        label = self.current_map.path.name if self.current_map is not None else 'none'
        return (f'reachability {"robot (registered)" if reg is not None else "guide cone (not registered)"}, '
                f'label map {label} ({len(self._maps)} cached), {self.counts["plans_ok"]} plans, '
                f'{self.counts["plans_failed"]} failed, {self.counts["validations"]} validations; '
                f'last: {self.last_outcome}')


def main(args=None) -> int:
    return common.run_node(PlannerNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
