"""registration_node: scanner <-> robot registration from a DICOM series or a NIfTI file.

Service ``/registration/register`` (igt_robot_msgs/RegisterImage):

* ``image_path`` -- a DICOM series folder or a NIfTI file (``.nii`` / ``.nii.gz``). A
  relative path is taken relative to ``image_root`` (when set; else the node's working
  folder); ``..`` and symlinks are resolved before anything is read, and with
  ``image_root`` set the resolved path must lie under it.
* ``method`` -- ``zframe`` (7-rod Z-frame) or ``fiducials`` (spherical markers); empty
  means the ``default_method`` parameter.
* ``has_target`` / ``target_scanner`` -- a target (scanner LPS, m) for the predicted
  TRE; the registration is rejected when that exceeds ``max_predicted_tre_m``.

The work is :func:`igt_robot.imaging.register_image` with ``T_base_zframe`` taken
from the robot model (URDF). The reply carries ``success``, an operator-readable
``message`` and the ``RegistrationResult``: ``transform`` maps scanner LPS (m)
into ``base_link`` (header.frame_id = base_link, child_frame_id = scanner).

Outputs:

* ``/registration/result`` (RegistrationResult, LATCHED) -- ACCEPTED results only.
  A rejected attempt publishes nothing there: the previously accepted
  registration (if any) stays the active one, and the event below says the new
  attempt failed.
* ``/procedure/events`` -- ``registration_accepted`` (INFO) or
  ``registration_rejected`` (WARN) for every attempt, values ``fre_m``,
  ``tre_m``, ``reason``, ``method``, ``image_source``.
* ``/tf_static`` (tf2_msgs/TFMessage, transient local) -- base_link -> scanner of the
  accepted registration, only when ``tf2_msgs`` is importable (it is optional).
* ``/diagnostics`` -- whether a registration is active and how the last attempt went.

Threading: the service runs in its own MutuallyExclusive callback group, so one
registration runs at a time (a second request waits) while the default group
(diagnostics) keeps being served by the multi-threaded executor.
"""
from __future__ import annotations

import math
import os
import pathlib
import threading
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import Point
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node

from igt_robot import frames, units
from igt_robot.acquisition import memory as image_memory
from igt_robot.imaging import (DEFAULT_FIDUCIALS_ZFRAME, ImageError, RegistrationOutcome, ZFrameGates, register_image,
                               validate_intensities)
from igt_robot.imaging.fiducials import DEFAULT_MARKER_RADIUS_M
from igt_robot.imaging.image_input import (CT_GUESS_BELOW_HU, CT_GUESS_PERCENTILE, MAX_FOLDER_FILES,  # noqa: F401
                                           MAX_MARKER_DISTANCE_M, NIFTI_SUFFIXES, guess_modality, load_volume,
                                           parse_marker_positions, resolve_image_path)
from igt_robot.imaging.registration import DEFAULT_MAX_PREDICTED_TRE_M
from igt_robot.robot_model import load_robot_model
from igt_robot_msgs.msg import ProcedureEvent, RegistrationResult
from igt_robot_msgs.srv import RegisterImage

from . import common, qos, topics
from .params import Param, declare

try:  # tf2_msgs is optional: without it the transform is only on /registration/result
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the install
    TFMessage = None

METHODS = ('zframe', 'fiducials')
REGISTER_SERVICE = topics.REGISTRATION_REGISTER
RESULT_TOPIC = topics.REGISTRATION_RESULT
TF_STATIC_TOPIC = topics.TF_STATIC
_GATES = ZFrameGates()
PARAMS = [
    Param('default_method', 'zframe', 'registration method used when a request leaves method empty',
          choices=METHODS, read_only=True),
    Param('max_predicted_tre_m', float(DEFAULT_MAX_PREDICTED_TRE_M),
          'reject when the predicted TRE at the requested target exceeds this, m', 1e-5, 0.05, read_only=True),
    Param('min_slices', 3, 'refuse volumes with fewer slices than this, count', 1, 10000, read_only=True),
    Param('nifti_modality', 'auto', 'modality assumed for NIfTI files (they carry none): CT (HU), MR, or auto '
          '(CT when the 1st intensity percentile is below -200, i.e. air in HU)', choices=('auto', 'CT', 'MR'),
          read_only=True),
    Param('image_root', '', 'when set, image paths must resolve to a location under this folder; relative '
          'paths are taken relative to it (empty = any path, relative to the working folder)', read_only=True),
    Param('publish_tf_static', True, 'also publish the accepted transform on /tf_static (needs tf2_msgs)',
          read_only=True),
    Param('diagnostics_period_s', 1.0, '/diagnostics publication period, s', 0.1, 60.0, read_only=True),
    Param('zframe.min_usable_slices', _GATES.min_usable_slices,
          'Z-frame gate: slices showing >= 4 rods incl. a diagonal, count', 1, 1000, read_only=True),
    Param('zframe.min_points_per_rod', _GATES.min_points_per_rod,
          'Z-frame gate: measured cross-sections per rod, count', 2, 1000, read_only=True),
    Param('zframe.min_found_fraction', float(_GATES.min_found_fraction),
          'Z-frame gate: fraction of the slices where a rod should be visible in which it is found', 0.0, 1.0,
          read_only=True),
    Param('zframe.max_rod_rms_m', float(_GATES.max_rod_rms_m), 'Z-frame gate: RMS residual per rod, m',
          1e-5, 0.01, read_only=True),
    Param('zframe.max_slice_rms_m', float(_GATES.max_slice_rms_m),
          'Z-frame gate: RMS residual per slice (slice-to-slice consistency, motion), m', 1e-5, 0.01,
          read_only=True),
    Param('zframe.max_fre_m', float(_GATES.max_fre_m), 'Z-frame gate: fiducial registration error (RMS), m',
          1e-5, 0.01, read_only=True),
    Param('zframe.outlier_m', float(_GATES.outlier_m), 'Z-frame: a rod point farther than this from its fitted '
          'rod is an outlier, m', 1e-4, 0.01, read_only=True),
    Param('zframe.max_outlier_fraction', float(_GATES.max_outlier_fraction),
          'Z-frame: up to this fraction of outlier points is dropped before gating', 0.0, 0.5, read_only=True),
    Param('fiducials.model', 'default', 'marker set for the fiducials method: default (the robot\'s built-in '
          'block, igt_robot.imaging.DEFAULT_FIDUCIALS_ZFRAME) or custom (fiducials.custom_positions_m)',
          choices=('default', 'custom'), read_only=True),
    Param('fiducials.custom_positions_m', [float(v) for v in np.asarray(DEFAULT_FIDUCIALS_ZFRAME).ravel()],
          'custom marker centres in the zframe frame, flat [x1, y1, z1, x2, ...], m (>= 3 markers, not '
          'collinear); used only when fiducials.model = custom', read_only=True),
    Param('fiducials.marker_radius_m', float(DEFAULT_MARKER_RADIUS_M), 'radius of the spherical markers, m',
          5e-4, 0.02, read_only=True),
]


# Image input (resolving, reading, checking the request's image) is core logic: igt_robot.imaging.image_input.


def _finite_or_nan(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float('nan')


# ------------------------------------------------------------------------------------ node

class RegistrationNode(Node):
    """Serves /registration/register and publishes accepted registrations (module docstring)."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__('registration_node', context=context, cli_args=cli_args, **kwargs)
        try:
            self._setup()
        except Exception:
            self.destroy_node()   # a bad parameter must not leave a half-built node in the graph
            raise

    def _setup(self) -> None:
        self.p = declare(self, PARAMS)
        # The Z-frame's mounting on the robot: the URDF is the single source of truth.
        self.T_base_zframe = np.array(load_robot_model().T_base_zframe, dtype=float)
        self.gates = ZFrameGates(
            min_usable_slices=self.p['zframe.min_usable_slices'],
            min_points_per_rod=self.p['zframe.min_points_per_rod'],
            min_found_fraction=self.p['zframe.min_found_fraction'],
            max_rod_rms_m=self.p['zframe.max_rod_rms_m'], max_slice_rms_m=self.p['zframe.max_slice_rms_m'],
            max_fre_m=self.p['zframe.max_fre_m'], outlier_m=self.p['zframe.outlier_m'],
            max_outlier_fraction=self.p['zframe.max_outlier_fraction'])
        if self.p['fiducials.model'] == 'custom':
            self.marker_model_m = parse_marker_positions(self.p['fiducials.custom_positions_m'])
        else:
            self.marker_model_m = np.array(DEFAULT_FIDUCIALS_ZFRAME, dtype=float)
        root = self.p['image_root']
        if root and not pathlib.Path(os.path.expanduser(root)).is_dir():
            self.get_logger().warning(f'image_root {root} is not (yet) a folder: every request will be refused '
                                      f'until it exists')

        self._lock = threading.Lock()        # serialises register() when called directly from Python too
        self.attempts = 0
        self.accepted_count = 0
        self.active: Optional[RegistrationResult] = None   # the accepted registration in force
        self.last_attempt: Optional[RegistrationResult] = None
        self.last_message = 'no registration attempted yet'

        self.result_pub = self.create_publisher(RegistrationResult, RESULT_TOPIC, qos.LATCHED)
        self.event_pub = common.create_event_publisher(self)
        self.diag_pub = common.create_diagnostics_publisher(self)
        self.tf_pub = None
        if self.p['publish_tf_static'] and TFMessage is not None:
            # tf2 convention for /tf_static: RELIABLE, TRANSIENT_LOCAL, depth 1 (= LATCHED)
            self.tf_pub = self.create_publisher(TFMessage, TF_STATIC_TOPIC, qos.LATCHED)
        elif self.p['publish_tf_static']:
            self.get_logger().info('tf2_msgs is not installed: the registration is published on '
                                   f'{RESULT_TOPIC} only (no /tf_static)')
        # Own group: the registration takes ~0.3-1 s of CPU; the default group stays free.
        self.service_group = MutuallyExclusiveCallbackGroup()
        self.service = self.create_service(RegisterImage, REGISTER_SERVICE, self._on_register,
                                           callback_group=self.service_group)
        self.create_timer(self.p['diagnostics_period_s'], self._publish_diagnostics)
        self.get_logger().info(f'registration service {REGISTER_SERVICE} ready (default method '
                               f'{self.p["default_method"]}, image_root {root or "unrestricted"})')

    # -------------------------------------------------------------------------- service
    def _on_register(self, request: RegisterImage.Request, response: RegisterImage.Response):
        target = None
        if request.has_target:
            t = request.target_scanner
            target = (t.x, t.y, t.z)
        reply = self.register(request.image_path, request.method, target)
        response.success, response.message, response.result = reply.success, reply.message, reply.result
        return response

    def register(self, image_path: str, method: str = '', target_scanner=None) -> RegisterImage.Response:
        """Register one image; publish and record exactly as a service call does.

        ``target_scanner``: optional (x, y, z) in scanner LPS, m. Never raises for bad
        input: the reply has ``success`` False and a message naming the problem.
        """
        with self._lock:
            return self._register_locked(image_path, method, target_scanner)

    def _register_locked(self, image_path, method, target_scanner) -> RegisterImage.Response:
        self.attempts += 1
        method_name = (method or '').strip().lower() or self.p['default_method']
        result = RegistrationResult(method=method_name, accepted=False, image_source=str(image_path or ''))
        result.header.stamp = common.stamp_now(self)
        result.header.frame_id = frames.BASE_FRAME
        result.transform.header.stamp = result.header.stamp
        result.transform.header.frame_id = frames.BASE_FRAME
        result.transform.child_frame_id = frames.SCANNER_FRAME
        result.transform.transform.rotation.w = 1.0     # identity: a rejected result carries no transform
        result.fre = result.predicted_tre = float('nan')
        outcome = None
        try:
            target = self._target(target_scanner)
            if target is not None:
                result.target_scanner = Point(x=float(target[0]), y=float(target[1]), z=float(target[2]))
            if method_name not in METHODS:
                raise ValueError(f'unknown registration method {method!r}; use one of: {", ".join(METHODS)}')
            path = resolve_image_path(image_path, self.p['image_root'])
            result.image_source = str(path)
            # The image travels once: a series the procedure node already holds (same process) is not re-read.
            volume = image_memory.get(path) or load_volume(path, self.p['nifti_modality'])
            validate_intensities(volume, min_slices=self.p['min_slices'])
            outcome = register_image(volume, method_name, self.T_base_zframe, target,
                                     zframe_gates=self.gates, fiducials_model_m=self.marker_model_m,
                                     marker_radius_m=self.p['fiducials.marker_radius_m'],
                                     max_predicted_tre_m=self.p['max_predicted_tre_m'])
        except (ImageError, OSError) as exc:   # OSError: the file vanished or the disk failed mid-read
            reason = str(exc)
            message = f'image refused: {reason}'
        except ValueError as exc:              # the request itself (method, target)
            reason = str(exc)
            message = f'request refused: {reason}'
        except Exception as exc:   # a bug must not take the node down; the operator sees why it failed
            self.get_logger().error(f'registration of {image_path!r} failed unexpectedly: {exc!r}')
            reason = f'internal error: {type(exc).__name__}: {exc}'
            message = f'registration failed: {reason}'
        else:
            self._fill_from_outcome(result, outcome, target is not None)
            reason = outcome.reason
            message = self._summary(result) if outcome.accepted else f'registration rejected: {reason}'
        if not result.accepted:
            result.rejection_reason = reason
        self._publish(result, message)
        return RegisterImage.Response(success=bool(result.accepted), message=message, result=result)

    @staticmethod
    def _target(target_scanner) -> Optional[np.ndarray]:
        if target_scanner is None:
            return None
        target = np.asarray(target_scanner, dtype=float).reshape(-1)
        if target.size != 3 or not np.all(np.isfinite(target)):
            raise ValueError(f'target_scanner must be 3 finite coordinates (m), got {target.tolist()}')
        return target

    @staticmethod
    def _fill_from_outcome(result: RegistrationResult, outcome: RegistrationOutcome, has_target: bool) -> None:
        result.accepted = bool(outcome.accepted)
        result.fre = _finite_or_nan(outcome.fre_m)
        # msg contract: 0 when no target was given
        result.predicted_tre = _finite_or_nan(outcome.tre_predicted_m) if has_target else 0.0
        result.fiducial_count = int(outcome.fiducial_count)
        details = outcome.details
        if outcome.method == 'zframe':
            result.slices_used = int(getattr(details, 'slices_used', 0))
            rod_rms = getattr(details, 'rod_rms_m', {}) or {}
            result.residuals = [_finite_or_nan(rod_rms.get(r, float('nan'))) for r in range(1, 8)] if rod_rms else []
        else:
            residuals = getattr(details, 'residuals_m', None)
            result.residuals = [] if residuals is None else [_finite_or_nan(v) for v in residuals]
        if outcome.accepted:
            T = outcome.T_base_scanner
            t = result.transform.transform
            t.translation.x, t.translation.y, t.translation.z = (float(v) for v in T[:3, 3])
            q = frames.quaternion_xyzw(T[:3, :3])
            t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = (float(v) for v in q)

    @staticmethod
    def _summary(result: RegistrationResult) -> str:
        text = f'registration accepted ({result.method}): FRE {units.m_to_mm(result.fre):.3f} mm'
        if result.predicted_tre > 0.0:
            text += f', predicted TRE at the target {units.m_to_mm(result.predicted_tre):.3f} mm'
        if result.method == 'zframe':
            text += f', {result.fiducial_count} rod points in {result.slices_used} slices'
        else:
            text += f', {result.fiducial_count} markers'
        return text

    # --------------------------------------------------------------------------- output
    def _publish(self, result: RegistrationResult, message: str) -> None:
        self.last_attempt = result
        self.last_message = message
        values = {'fre_m': result.fre, 'tre_m': result.predicted_tre, 'reason': result.rejection_reason,
                  'method': result.method, 'image_source': result.image_source,
                  'fiducial_count': result.fiducial_count}
        if result.accepted:
            self.accepted_count += 1
            self.active = result
            self.result_pub.publish(result)
            if self.tf_pub is not None:
                self.tf_pub.publish(TFMessage(transforms=[result.transform]))
            self.get_logger().info(f'{message} ({result.image_source})')
            event = common.make_event(self, 'registration_accepted', message, ProcedureEvent.INFO, values)
        else:
            kept = ('; the previous registration stays active' if self.active is not None
                    else '; no registration is active')
            self.get_logger().warning(f'{message} ({result.image_source or "no image"}){kept}')
            event = common.make_event(self, 'registration_rejected', message + kept, ProcedureEvent.WARN, values)
        self.event_pub.publish(event)

    def _publish_diagnostics(self) -> None:
        active, last = self.active, self.last_attempt
        if active is None:
            level, text = DiagnosticStatus.WARN, 'no accepted registration'
        elif last is not None and not last.accepted:
            level, text = DiagnosticStatus.WARN, 'last attempt rejected; previous registration active'
        else:
            level, text = DiagnosticStatus.OK, f'registration active ({active.method})'
        values = {'attempts': self.attempts, 'accepted': self.accepted_count, 'last_message': self.last_message,
                  'tf_static': self.tf_pub is not None}
        if active is not None:
            values.update(active_method=active.method, active_fre_m=active.fre, active_source=active.image_source)
        status = common.diagnostic_status(self, 'registration', level, text, values)
        self.diag_pub.publish(common.diagnostic_array(self, [status]))

    def describe_state(self) -> str:
        active = self.active
        head = ('no accepted registration' if active is None else
                f'active {active.method} registration from {active.image_source} '
                f'(FRE {units.m_to_mm(active.fre):.3f} mm)')
        return f'{head}; {self.attempts} attempt(s), {self.accepted_count} accepted; last: {self.last_message}'


def main(args=None) -> int:
    return common.run_node(RegistrationNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
