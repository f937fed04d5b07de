"""planner_node on a real DDS graph, on the simulated scanner's planning label map.

The label map comes from ``SimulatedScanner.acquire('planning', with_labels=True)``
of ``make_scenario(SEED)``; the registration published to the node is the
scenario's true mounting (``T_base_scanner = inv(T_scanner_base)``), so the
plans can be checked against the robot's own kinematics and, independently of
the planner's distance fields, against the label voxels themselves.

Planning uses ``entry.max_candidates: 1500`` (instead of 20000) to keep each
plan short: the robot reachability solves one IK per candidate.
"""
import math
import pathlib
import re
from types import SimpleNamespace

import numpy as np
import pytest
import rclpy
import yaml
from geometry_msgs.msg import Point, PointStamped
from scipy.spatial import cKDTree
from visualization_msgs.msg import Marker, MarkerArray

from igt_planner import planner_node as pn
from igt_planner.planner_node import LabelRoles, PlannerNode, build_markers, clearance_colour
from igt_robot import frames, testing
from igt_robot.imaging.io import read_nifti, write_nifti
from igt_robot.imaging.volume import Volume
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import qos
from igt_robot.robot_model import load_robot_model
from igt_robot.simulation.scanner import SimulatedScanner
from igt_robot.simulation.scenario import make_scenario
from igt_robot_msgs.msg import NeedlePlan, ProcedureEvent, RegistrationResult
from igt_robot_msgs.srv import PlanPath, ValidatePlan

REPO = pathlib.Path(__file__).resolve().parents[3]
PARAMS_FILE = REPO / 'config' / 'planner.yaml'
NODE_ARGS = ['--ros-args', '--params-file', str(PARAMS_FILE), '-p', 'entry.max_candidates:=1500']
SEED = 7
VESSEL, BONE, BODY, AIR = 2, 3, 4, 0
MARGINS = {'vessel': 0.005, 'bone': 0.003}          # config/planner.yaml labels.margins_m
CALL_TIMEOUT = 60.0


# ------------------------------------------------------------------ inputs

@pytest.fixture(scope='module')
def scan(tmp_path_factory):
    """The planning scan's label map (NIfTI) of the simulated patient, with the ground truth."""
    model = load_robot_model()
    kinematics = NeedleGuideKinematics(model)
    scenario = make_scenario(SEED, T_base_zframe=model.T_base_zframe)
    scanner = SimulatedScanner(scenario, tmp_path_factory.mktemp('scans'), model.T_base_zframe, kinematics)
    acquisition = scanner.acquire('planning', with_labels=True)
    volume = read_nifti(acquisition.labelmap_path)
    return SimpleNamespace(scenario=scenario, path=str(acquisition.labelmap_path), volume=volume, model=model,
                           kinematics=kinematics, T_base_scanner=frames.invert(scenario.T_scanner_base),
                           out=tmp_path_factory.mktemp('labelmaps'))


def label_at(volume, point) -> int:
    """Label of the voxel holding ``point`` (scanner LPS, m); -1 outside."""
    ijk = np.rint(np.linalg.solve(volume.affine, np.append(point, 1.0))[:3]).astype(int)
    k, j, i = ijk[2], ijk[1], ijk[0]
    if not (0 <= k < volume.data.shape[0] and 0 <= j < volume.data.shape[1] and 0 <= i < volume.data.shape[2]):
        return -1
    return int(volume.data[k, j, i])


def voxel_centres(volume, label) -> np.ndarray:
    kji = np.argwhere(volume.data == label)
    return frames.apply(volume.affine, kji[:, ::-1].astype(float))


def skin_entry_through(volume, target, via) -> np.ndarray:
    """The point just under the skin on the line from ``target`` through ``via`` (scanner LPS, m)."""
    u = (via - target) / np.linalg.norm(via - target)
    for s in np.arange(0.0, 0.2, 0.0002):
        if label_at(volume, target + s * u) in (AIR, -1):
            return target + (s - 0.0005) * u
    raise AssertionError('the line never leaves the body')


def stamped(p, frame='scanner') -> PointStamped:
    msg = PointStamped()
    msg.header.frame_id = frame
    msg.point = Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))
    return msg


def xyz(point) -> np.ndarray:
    return np.array([point.x, point.y, point.z])


def registration_msg(T_base_scanner) -> RegistrationResult:
    msg = RegistrationResult(method='zframe', accepted=True, fre=0.0003, fiducial_count=42, slices_used=20)
    msg.header.frame_id = msg.transform.header.frame_id = 'base_link'
    msg.transform.child_frame_id = 'scanner'
    t = msg.transform.transform
    t.translation.x, t.translation.y, t.translation.z = (float(v) for v in T_base_scanner[:3, 3])
    t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = (float(v) for v in
                                                              frames.quaternion_xyzw(T_base_scanner[:3, :3]))
    return msg


# ------------------------------------------------------------------ graph helpers

class Probe:
    """Clients and a latched registration publisher, created before the node joins the executor."""

    def __init__(self, graph, name='planner_probe'):
        self.node = rclpy.create_node(name, context=graph.context)
        self.plan_client = self.node.create_client(PlanPath, '/planner/plan')
        self.validate_client = self.node.create_client(ValidatePlan, '/planner/validate')
        self.registration = self.node.create_publisher(RegistrationResult, '/registration/result', qos.LATCHED)
        self.events = []
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self.events.append, qos.EVENTS)
        graph.add(self.node)

    def call(self, client, request, timeout=CALL_TIMEOUT):
        testing.wait_for(client.service_is_ready, 30.0, f'{client.srv_name} to be served')
        future = client.call_async(request)
        testing.wait_for(future.done, timeout, f'{client.srv_name} response')
        return future.result()

    def plan(self, target, path, frame='scanner', max_plans=0, entries=()):
        return self.call(self.plan_client, PlanPath.Request(
            target=stamped(target, frame), labelmap_path=str(path), max_plans=max_plans,
            candidate_entries=[Point(x=float(e[0]), y=float(e[1]), z=float(e[2])) for e in entries]))

    def validate(self, entry, target, frame='scanner'):
        return self.call(self.validate_client, ValidatePlan.Request(entry=stamped(entry, frame),
                                                                    target=stamped(target)))


class LateListener:
    """Subscribes to the latched outputs only after they were published (a late joiner)."""

    def __init__(self, graph, name='late_listener'):
        self.node = rclpy.create_node(name, context=graph.context)
        self.plans, self.markers, self.events = [], [], []
        self.node.create_subscription(NeedlePlan, '/planner/current_plan', self.plans.append, qos.LATCHED)
        self.node.create_subscription(MarkerArray, '/planner/markers', self.markers.append, qos.LATCHED)
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self.events.append, qos.EVENTS)
        graph.add(self.node)


@pytest.fixture(scope='class')
def registered(scan):
    """A planner node that has received the true registration and planned once to the scenario's target.

    Class-scoped: torn down when TestRegistered ends, so its node and latched registration
    are gone before the other tests start their own nodes on the same graph.
    """
    with testing.SpinningGraph() as graph:
        probe = Probe(graph)
        node = graph.add(PlannerNode(context=graph.context, cli_args=NODE_ARGS))
        probe.registration.publish(registration_msg(scan.T_base_scanner))
        testing.wait_for(lambda: node.registration is not None, 20.0, 'the registration to reach the planner')
        response = probe.plan(scan.scenario.target, scan.path, max_plans=3)
        yield SimpleNamespace(graph=graph, node=node, probe=probe, response=response)


# ------------------------------------------------------------------ registered planning

class TestRegistered:
    """One registered node, planned once; the tests read its answers."""

    def test_plan_with_registration_is_feasible_reachable_and_consistent_with_the_robot(self, scan, registered):
        resp = registered.response
        assert resp.success, resp.message
        assert 'robot inverse kinematics' in resp.message and 'zframe registration' in resp.message
        assert 1 <= len(resp.plans) <= 3
        scores = [p.score for p in resp.plans]
        assert scores == sorted(scores, reverse=True), 'plans are not best first'
        assert len({p.plan_id for p in resp.plans}) == len(resp.plans) and all(p.plan_id for p in resp.plans)
        # Every rejection kind is counted with an example sentence; the counts add up with the feasible ones.
        assert resp.rejection_summary and all(re.match(r'\d+ of \d+ candidates: .+; e\.g\. .+', line)
                                              for line in resp.rejection_summary), resp.rejection_summary
        counted = re.search(r'(\d+) feasible of (\d+) candidates', resp.message)
        rejected = sum(int(line.split()[0]) for line in resp.rejection_summary)
        assert rejected + int(counted[1]) == int(counted[2])

        T = scan.T_base_scanner
        target = scan.scenario.target
        for plan in resp.plans:
            assert plan.header.frame_id == 'scanner'
            assert plan.feasible and plan.reachable and list(plan.reasons) == []
            entry = xyz(plan.entry)
            np.testing.assert_allclose(xyz(plan.target), target, atol=1e-12)
            assert plan.depth == pytest.approx(np.linalg.norm(target - entry), abs=1e-9)
            np.testing.assert_allclose(xyz(plan.direction), (target - entry) / plan.depth, atol=1e-9)
            # The entry is a skin voxel: body, with air next to it.
            assert label_at(scan.volume, entry) == BODY
            neighbours = [entry + s * scan.volume.affine[:3, a] for a in range(3) for s in (-1, 1)]   # one voxel
            assert AIR in [label_at(scan.volume, n) for n in neighbours]
            # Clearances: every structure checked, each at least its margin.
            assert dict(zip(plan.structure_names, plan.required_margin)) == pytest.approx(MARGINS)
            for c, m in zip(plan.min_clearance, plan.required_margin):
                assert c >= m
            # The robot: URDF joint names, inside the limits, insertion = the IK's RCM -> target travel.
            js = plan.joint_solution
            assert list(js.name) == list(scan.model.joint_names)
            q = np.array(js.position)
            assert scan.model.within_limits(q, tolerance=1e-9)
            ik = scan.kinematics.inverse(frames.apply(T, entry), frames.apply(T, target))
            assert ik.reachable
            np.testing.assert_allclose(q, ik.joints, atol=1e-9)
            assert plan.insertion_depth == pytest.approx(ik.joints[4], abs=1e-9)
            assert plan.insertion_depth == pytest.approx(q[4])
            np.testing.assert_allclose(scan.kinematics.tip_position(q), frames.apply(T, target), atol=1e-6)
            assert plan.joint_limit_margin == pytest.approx(scan.model.joint_limit_margin(q), abs=1e-9)
            assert 0.0 <= plan.skin_angle <= math.radians(60.0) and 0.0 <= plan.score <= 1.0

    def test_plan_clearance_holds_against_the_label_voxels(self, scan, registered):
        """Independent of the planner's distance fields: distance from the path to the voxel centres."""
        half_voxel = 0.5 * float(np.linalg.norm(scan.volume.affine[:3, :3], axis=0).min())
        trees = {'vessel': cKDTree(voxel_centres(scan.volume, VESSEL)),
                 'bone': cKDTree(voxel_centres(scan.volume, BONE))}
        for plan in registered.response.plans:
            entry, target = xyz(plan.entry), xyz(plan.target)
            samples = entry + np.linspace(0.0, 1.0, int(plan.depth / 0.0002) + 1)[:, None] * (target - entry)
            reported = dict(zip(plan.structure_names, plan.min_clearance))
            for name, tree in trees.items():
                exact = float(tree.query(samples)[0].min())
                assert exact >= MARGINS[name] - half_voxel, f'{plan.plan_id}: {exact * 1e3:.2f} mm from {name}'
                if reported[name] < 0.03:          # below the cap the reported value is exact to sub-voxel
                    assert reported[name] == pytest.approx(exact, abs=half_voxel)

    def test_best_plan_and_markers_are_latched(self, scan, registered):
        late = LateListener(registered.graph)
        best = registered.response.plans[0]
        testing.wait_for(lambda: late.plans and late.markers, 20.0, 'latched plan and markers')
        assert late.plans[-1].plan_id == best.plan_id
        assert late.plans[-1].insertion_depth == pytest.approx(best.insertion_depth)

        markers = late.markers[-1].markers
        assert markers[0].action == Marker.DELETEALL
        by_ns = {m.ns: m for m in markers[1:]}
        assert set(by_ns) == {'target', 'entry', 'path', 'structure/vessel', 'structure/bone', 'tumour'}
        assert all(m.header.frame_id == 'base_link' for m in markers)        # registered: robot frame
        T = scan.T_base_scanner
        np.testing.assert_allclose(xyz(by_ns['target'].pose.position), frames.apply(T, xyz(best.target)), atol=1e-9)
        np.testing.assert_allclose(xyz(by_ns['entry'].pose.position), frames.apply(T, xyz(best.entry)), atol=1e-9)
        line = by_ns['path']
        assert line.type == Marker.LINE_STRIP and len(line.colors) == len(line.points) > 2
        np.testing.assert_allclose(xyz(line.points[0]), frames.apply(T, xyz(best.entry)), atol=1e-9)
        np.testing.assert_allclose(xyz(line.points[-1]), frames.apply(T, xyz(best.target)), atol=1e-9)
        slack = min(c - m for c, m in zip(best.min_clearance, best.required_margin))
        if slack > 0.001:   # clear of every margin by more than a voxel: no vertex may be drawn red
            assert all(c.g >= 0.5 for c in line.colors)
        for ns, label in (('structure/vessel', VESSEL), ('structure/bone', BONE)):
            points = by_ns[ns]
            assert points.type == Marker.POINTS and 0 < len(points.points) <= 3000
            scanner_points = frames.apply(frames.invert(T), np.array([xyz(p) for p in points.points]))
            assert all(label_at(scan.volume, p) == label for p in scanner_points)

        testing.wait_for(lambda: any(e.kind == 'plan_proposed' and ('plan_id', best.plan_id) in
                                     [(kv.key, kv.value) for kv in e.values] for e in late.events),
                         20.0, 'the plan_proposed event')

    def test_validate_explains_paths_past_and_through_the_vessel(self, scan, registered):
        probe, vessel = registered.probe, scan.scenario.vessels[0]
        target = scan.scenario.target
        axis = np.array(vessel.p0, float)       # the vessel runs along LPS z at this x, y
        # Straight through the vessel's axis.
        through = skin_entry_through(scan.volume, target, np.array([axis[0], axis[1], target[2]]))
        resp = probe.validate(through, target)
        assert not resp.valid and not resp.plan.feasible
        assert any(re.match(r"crosses 'vessel' at [\d.]+ mm along the path", r) for r in resp.plan.reasons), \
            resp.plan.reasons
        assert "crosses 'vessel'" in resp.message
        # Past the vessel, 2 mm outside its wall: inside the 5 mm margin.
        past = skin_entry_through(scan.volume, target, np.array([axis[0] - vessel.radius - 0.002, axis[1], target[2]]))
        resp = probe.validate(past, target)
        assert not resp.valid
        assert any(re.match(r"passes [\d.]+ mm from 'vessel' — margin 5 mm, [\d.]+ mm along the path", r)
                   for r in resp.plan.reasons), resp.plan.reasons
        clearance = dict(zip(resp.plan.structure_names, resp.plan.min_clearance))['vessel']
        assert 0.0005 < clearance < 0.005
        # The proposed plan itself validates, with the same clearances.
        best = registered.response.plans[0]
        resp = probe.validate(xyz(best.entry), xyz(best.target))
        assert resp.valid and resp.plan.feasible and resp.message.startswith('valid -- feasible')
        assert list(resp.plan.min_clearance) == pytest.approx(list(best.min_clearance), abs=1e-9)
        assert resp.plan.insertion_depth == pytest.approx(best.insertion_depth)
        # An operator's point in another frame is refused, not reinterpreted.
        resp = probe.validate(xyz(best.entry), xyz(best.target), frame='base_link')
        assert not resp.valid and "must be in 'scanner'" in resp.message

    def test_path_marker_is_red_where_the_path_crosses_the_vessel(self, scan, registered):
        planner = registered.node.current_map.planner
        target = scan.scenario.target
        axis = np.array(scan.scenario.vessels[0].p0, float)
        entry = skin_entry_through(scan.volume, target, np.array([axis[0], axis[1], target[2]]))
        path = planner.validate(entry, target)
        array = build_markers(planner, path, [], 'scanner', np.eye(4), registered.node.get_clock().now().to_msg(), 100)
        line = next(m for m in array.markers if m.ns == 'path')
        colours = [(c.r, c.g, c.b) for c in line.colors]
        points = np.array([xyz(p) for p in line.points])
        nearest = int(np.argmin(np.abs(points[:, 1] - axis[1])))     # the vertex at the vessel's depth
        assert colours[nearest] == (1.0, 0.0, 0.0)
        assert colours[0] != (1.0, 0.0, 0.0)                          # the skin is far from the vessel


# ------------------------------------------------------------------ before registration, bad inputs

def write_labels(scan, name, data) -> str:
    path = scan.out / name
    write_nifti(Volume(data, scan.volume.affine.copy(), 'LABEL', {}), path)
    return str(path)


def test_cone_plan_before_registration_and_every_bad_input_is_refused_with_its_reason(scan, graph):
    probe = Probe(graph)
    node = graph.add(PlannerNode(context=graph.context, cli_args=NODE_ARGS))
    target = scan.scenario.target

    # Nothing loaded yet: validation refuses rather than guessing a label map.
    resp = probe.validate(target + np.array([0.0, -0.05, 0.0]), target)
    assert not resp.valid and 'no label map loaded yet' in resp.message
    # The frame is checked before anything is read.
    resp = probe.plan(target, scan.path, frame='base_link')
    assert not resp.success and "target is in frame 'base_link'; it must be in 'scanner'" in resp.message
    resp = probe.plan(target, scan.path + '.missing')
    assert not resp.success and 'does not exist' in resp.message and not resp.plans

    # Before registration: the guide cone, said so, no joint solution, insertion travel unknown.
    resp = probe.plan(target, scan.path, max_plans=2)
    assert resp.success, resp.message
    assert 'guide cone' in resp.message and 'no registration accepted yet' in resp.message
    assert 1 <= len(resp.plans) <= 2
    for plan in resp.plans:
        assert plan.feasible and plan.reachable
        assert list(plan.joint_solution.name) == [] and math.isnan(plan.insertion_depth)
    assert node.registration is None

    # Bad targets, each with the core's own explanation.
    bone = scan.scenario.bones[0]
    in_bone = (np.array(bone.p0) + np.array(bone.p1)) / 2.0
    air_kji = np.argwhere(scan.volume.data == AIR)[0]
    in_air = frames.apply(scan.volume.affine, air_kji[::-1].astype(float))
    cases = [
        (target + np.array([0.0, 0.0, 0.5]), 'is outside the image'),
        (in_bone, "target lies inside bone 'bone'"),
        (in_air, 'target lies in air'),
        (np.array([np.nan, target[1], target[2]]), 'target contains NaN'),
    ]
    assert label_at(scan.volume, in_bone) == BONE
    for point, expected in cases:
        resp = probe.plan(point, '')           # empty path: the label map loaded above
        assert not resp.success and expected in resp.message, (expected, resp.message)
        assert not resp.plans

    # Bad label maps.
    empty = write_labels(scan, 'empty.nii.gz', np.zeros_like(scan.volume.data))
    resp = probe.plan(target, empty)
    assert not resp.success and 'contains only air labels' in resp.message
    nan_map = scan.volume.data.astype(np.float32)
    nan_map[5, 5, 5] = np.nan
    resp = probe.plan(target, write_labels(scan, 'nan.nii.gz', nan_map))
    assert not resp.success and 'contains NaN or infinite values in 1 voxels' in resp.message
    unknown = scan.volume.data.copy()
    unknown[0, 0, 0] = 9
    resp = probe.plan(target, write_labels(scan, 'unknown.nii.gz', unknown))
    assert not resp.success and 'label values [9] not described' in resp.message

    # No feasible path: the only candidate crosses the vessel; the reasons, not an empty plan list.
    axis = np.array(scan.scenario.vessels[0].p0, float)
    through = skin_entry_through(scan.volume, target, np.array([axis[0], axis[1], target[2]]))
    resp = probe.plan(target, scan.path, entries=[through])
    assert not resp.success and not resp.plans
    assert resp.message.startswith('no feasible path among 1 candidate entries') and "crosses 'vessel'" in resp.message
    assert resp.rejection_summary[0].startswith('1 of 1 candidates: crosses a critical structure; e.g. crosses '
                                                "'vessel'")
    testing.wait_for(lambda: sum(e.kind == 'plan_failed' for e in probe.events) >= 10, 20.0,
                     'a plan_failed event per refused request')
    assert node.counts['plans_failed'] >= 10 and node.counts['plans_ok'] == 1


# ------------------------------------------------------------------ another process

def test_planner_node_serves_another_process(scan, graph, processes):
    probe = Probe(graph, 'remote_probe')
    late = LateListener(graph, 'remote_listener')
    proc = processes('igt_planner.planner_node', *NODE_ARGS, name='planner_node')
    probe.registration.publish(registration_msg(scan.T_base_scanner))
    resp = probe.plan(scan.scenario.target, scan.path, max_plans=1)
    assert proc.alive(), proc.output()
    assert resp.success, resp.message
    # The node may have planned before or after the latched registration reached it; either way it says which.
    assert ('robot inverse kinematics' in resp.message) == bool(resp.plans[0].joint_solution.name)
    testing.wait_for(lambda: any(p.plan_id == resp.plans[0].plan_id for p in late.plans), 20.0,
                     'the plan on /planner/current_plan from the other process')


# ------------------------------------------------------------------ parameters and pure helpers

def test_shipped_yaml_node_section_equals_the_node_defaults():
    doc = yaml.safe_load(PARAMS_FILE.read_text())
    flat = {}

    def walk(prefix, value):
        for k, v in value.items():
            name = f'{prefix}.{k}' if prefix else k
            walk(name, v) if isinstance(v, dict) else flat.__setitem__(name, v)

    walk('', doc['/planner_node']['ros__parameters'])
    assert flat == {p.name: p.default for p in pn.NODE_PARAMS}
    # The core section names every core parameter the node declares (values: test_planner.py).
    flat.clear()
    walk('', doc['planner_node']['ros__parameters'])
    assert set(flat) == {p.name for p in pn.CORE_PARAMS}


def test_label_roles_are_checked():
    roles = LabelRoles.from_params([0, 1, 2, 3, 4], ['air', 'tumour', 'vessel', 'bone', 'body'],
                                   ['air', 'tumour', 'critical', 'bone', 'entry'], [0, 0, 0.005, 0.003, 0])
    assert roles.margins_m == {2: 0.005, 3: 0.003} and roles.bone == {3} and roles.entry == {4}
    assert roles.air == {0} and roles.tumour == {1}
    with pytest.raises(ValueError, match='equal lengths'):
        LabelRoles.from_params([0, 1], ['air'], ['air', 'tissue'], [0, 0])
    with pytest.raises(ValueError, match="roles \\['organ'\\] unknown"):
        LabelRoles.from_params([0, 1], ['air', 'liver'], ['air', 'organ'], [0, 0])
    with pytest.raises(ValueError, match='no air label'):
        LabelRoles.from_params([1], ['liver'], ['critical'], [0.002])
    with pytest.raises(ValueError, match='must be finite and >= 0'):
        LabelRoles.from_params([0, 1], ['air', 'liver'], ['air', 'critical'], [0, -0.001])


def test_clearance_colour_is_red_inside_the_margin_and_greener_with_clearance():
    assert clearance_colour(-0.0001, 0.015) == (1.0, 0.0, 0.0)
    assert clearance_colour(float('nan'), 0.015) == (1.0, 0.0, 0.0)
    assert clearance_colour(0.0, 0.015) == (1.0, 0.5, 0.0)
    assert clearance_colour(0.015, 0.015) == clearance_colour(0.5, 0.015) == (0.0, 1.0, 0.0)
    greens = [clearance_colour(s, 0.015)[1] for s in np.linspace(0.0, 0.02, 21)]
    reds = [clearance_colour(s, 0.015)[0] for s in np.linspace(0.0, 0.02, 21)]
    assert greens == sorted(greens) and reds == sorted(reds, reverse=True)
