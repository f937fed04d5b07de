"""OpenIGTLink bridge node: 3D Slicer <-> the ROS graph (docs/igtl_protocol.md, "ROS mapping").

A thin adapter over :class:`igt_robot.igtl.BridgeCore` (wire format, RAS mm <-> scanner LPS m,
validation and refusals). This node maps:

Slicer -> ROS
  * POINT/TRANSFORM ``TARGET`` / ``ENTRY`` -> geometry_msgs/PointStamped (frame ``scanner``, LPS m) on
    /procedure/target and /procedure/entry (LATCHED); once both are known they are checked with
    /planner/validate (asynchronously) and the verdict is sent back as STATUS ``PLAN``.
  * IMAGE (any name) -> :class:`~igt_robot.imaging.Volume` -> NIfTI in ``image_dir``, ProcedureEvent
    ``image_received`` (values: path, device). The image named ``calibration_device`` is also sent to
    /registration/register (RegisterImage) and the outcome returned as STATUS ``REGISTRATION``.
  * STRING ``CMD_<id>`` commands -> /procedure/command (OperatorCommand), EMERGENCY -> /safety/estop.
    The ACK is sent at once; the STATUS named after the command follows when the service answers
    (OK, or NOT_READY/REFUSED with the service's reason; TIME_OUT when it does not answer), to the
    client that sent the command.
  * Operator-only commands (RESUME -> /safety/resume, ACKNOWLEDGE -> /safety/acknowledge,
    RELEASE_ESTOP -> /safety/estop false, CONFIRM_PLAN -> /procedure/command confirm_plan): Slicer is the
    operator's console, so the bridge reads the operator session secret (``operator_session_file``,
    issued by the safety supervisor at start-up) at each such command and sends it as
    ``operator_token``; when the file cannot be read the command is refused with that reason
    (STATUS ACCESS_DENIED) and nothing is called. EMERGENCY never needs it.
  * GET_STATUS -> STATUS with the current /safety/status (code, state, text).

ROS -> Slicer
  * /robot/state needle_tip (base_link) mapped into the scanner frame with the inverse of the accepted
    /registration/result (scanner -> base_link) -> TRANSFORM ``CURRENT_POSITION`` (RAS mm) at
    ``pose_rate``; nothing is sent without an accepted registration or with a stale robot state.
  * /planner/current_plan -> POINT ``PLAN`` (ENTRY, TARGET); /safety/status changes -> STATUS ``SAFETY``.

Several clients may be connected at once (3D Slicer and a scanner bridge); their limits (timeouts,
rate limit, allow-list, shared secret) are the core's (igt_robot.igtl.server). Refused messages are
recorded as ONE ``igtl_refused`` event per client per ``refusal_report_interval_s``.

The bridge's callbacks run on its TCP server thread: they only publish, start asynchronous service
calls or queue work (image writing runs on a worker thread); they never wait for ROS.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import threading
import time
from typing import Dict, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import PointStamped
from pyigtl import messages as pyigtl_messages
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node

from igt_robot import frames, paths
from igt_robot.igtl import BRP_COMMANDS, BridgeConfig, BridgeCore, StatusCode
from igt_robot.igtl.bridge import MIB
from igt_robot.nodes import common, msg_convert, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.safety.operator_session import OperatorSessionError, default_session_path, read_session
from igt_robot_msgs.msg import NeedlePlan, ProcedureEvent, RegistrationResult, RobotState, SafetyStatus
from igt_robot_msgs.srv import (AcknowledgeFaults, OperatorCommand, RegisterImage, ResumeMotion, SetEstop,
                                ValidatePlan)

NODE_NAME = 'igtl_bridge'
TARGET_TOPIC = topics.PROCEDURE_TARGET
ENTRY_TOPIC = topics.PROCEDURE_ENTRY

# BRP command -> workflow command of /procedure/command (igt_robot.workflow; 'stop' is the procedure
# node's own command: cancel any motion). EMERGENCY goes to /safety/estop instead.
COMMAND_MAP: Dict[str, str] = {
    'START_UP': 'start',
    'PLANNING': 'load_planning_scan',   # argument: image id; default the last image received
    'CALIBRATION': 'register',          # argument: registration id; default the accepted one's image
    'TARGETING': 'plan',                # argument: plan id; default /planner/current_plan's plan_id
    'MOVE_TO_TARGET': 'align',
    'STOP': 'stop',
}
EMERGENCY = 'EMERGENCY'
# Operator-only transitions Slicer may request as the operator's console; each carries the operator
# session secret (issue 11: only the operator resumes, acknowledges, releases an e-stop, confirms a plan).
OPERATOR_COMMANDS = ('RESUME', 'ACKNOWLEDGE', 'RELEASE_ESTOP', 'CONFIRM_PLAN')

# /safety/status state -> STATUS code sent to Slicer as device SAFETY.
SAFETY_CODES = {'READY': StatusCode.OK, 'INIT': StatusCode.NOT_READY, 'SCAN_HOLD': StatusCode.NOT_READY,
                'HOLD': StatusCode.NOT_READY, 'FAULT': StatusCode.HARDWARE_FAILURE, 'ESTOP': StatusCode.PANIC_MODE}

_SAFE_NAME_RE = re.compile(r'[^A-Za-z0-9_.-]+')

PARAMS = [
    Param('host', '127.0.0.1', 'address the OpenIGTLink server binds; loopback unless a remote Slicer must '
                               'connect (then allowed_clients and shared_secret_file are required)', read_only=True),
    Param('port', 18944, 'TCP port of the OpenIGTLink server (18944 = OpenIGTLink default; 0 = a free port, '
                         'logged)', 0, 65535, read_only=True),
    Param('pose_rate', 10.0, 'rate of TRANSFORM CURRENT_POSITION to Slicer, Hz', 0.5, 100.0, read_only=True),
    Param('pose_max_age_s', 1.0, 'a /robot/state older than this is not sent as the needle pose, s', 0.05, 10.0,
          read_only=True),
    Param('image_dir', '', 'folder for images received from Slicer (NIfTI); empty = <repo>/build/igtl_images',
          read_only=True),
    Param('image_modality', 'CT', 'modality of received images (CT: HU, MR: arbitrary units)',
          choices=('CT', 'MR')),
    Param('max_image_mib', 64, 'largest IMAGE body accepted, MiB', 1, 2048, read_only=True),
    Param('calibration_device', 'CALIBRATION', 'IMAGE device name of the Z-frame calibration image, sent to '
                                               '/registration/register'),
    Param('registration_method', 'zframe', 'method requested from /registration/register',
          choices=('zframe', 'fiducials')),
    Param('operator_id', 'slicer', 'operator_id sent with the commands coming from Slicer'),
    Param('service_timeout_s', 30.0, 'a service call not answered within this time is reported to Slicer as '
                                     'STATUS TIME_OUT, s', 0.5, 600.0),
    Param('validate_plan', True, 'check TARGET + ENTRY with /planner/validate and reply STATUS PLAN'),
    Param('diagnostics_period_s', 1.0, 'period of /diagnostics, s', 0.1, 60.0),
    Param('max_clients', 64, 'OpenIGTLink clients served at once (Slicer, scanner bridge, ...)', 1, 256,
          read_only=True),
    Param('message_timeout_s', 5.0, 'a message not complete this long after its first byte closes that '
                                    'connection (slow or stalled client), s', 0.5, 120.0, read_only=True),
    Param('idle_timeout_s', 60.0, 'a silent client may be closed for a new one when all slots are used, s',
          1.0, 86400.0, read_only=True),
    Param('rate_limit_hz', 500.0, 'messages per second accepted per client (burst: 2 s worth); EMERGENCY and '
                                  'STOP are never limited', 1.0, 100000.0, read_only=True),
    Param('refusal_report_interval_s', 5.0, 'refused messages of a client are recorded as one event per '
                                            'interval, s', 0.5, 3600.0, read_only=True),
    Param('allowed_clients', [''], 'client addresses or networks allowed to connect (e.g. 10.1.2.0/24); '
                                   'empty = any; required for a non-loopback host', read_only=True),
    Param('shared_secret_file', '', 'file (mode 0600) holding the shared secret a client must send first as '
                                    'STRING AUTH; empty = none; required for a non-loopback host',
          read_only=True),
    Param('operator_session_file', '', 'operator session secret issued by the safety supervisor, sent with '
                                       'operator-only commands; empty = the default per-user path',
          read_only=True),
]


class AsyncCommandBridge(BridgeCore):
    """BridgeCore whose CMD_ commands are answered asynchronously.

    The ACK goes out at once; ``dispatch(name, arg)`` must start the work without
    waiting and later call :meth:`send_status` named after the command. Anything
    the core would refuse (malformed device, unknown command) is refused by the core.
    """

    def __init__(self, config: BridgeConfig, dispatch, **callbacks):
        super().__init__(config, **callbacks)
        self._dispatch = dispatch

    def handle_message(self, message, client=None):
        device = getattr(message, 'device_name', '') or ''
        if getattr(message, 'message_type', '') != 'STRING' or not device.upper().startswith('CMD_'):
            return super().handle_message(message, client)
        try:
            name, arg, query_id = self.parse_command(device, message.string)
        except Exception:
            return super().handle_message(message, client)  # the core builds the refusal STATUS
        text = message.string or ''
        ack = pyigtl_messages.StringMessage(text if text.strip() else name, device_name=f'ACK_{query_id}',
                                            timestamp=time.time())
        with self._lock:
            self.counters['received'] += 1
            self.counters['accepted'] += 1
        try:
            self._dispatch(name, arg, client)
        except Exception as exc:  # a bug must still be answered, and the link kept
            return [ack, self.status_message(name, StatusCode.UNKNOWN_ERROR, 'ERROR',
                                             f'internal error: {type(exc).__name__}: {exc}')]
        return [ack]


class _Pending:
    __slots__ = ('deadline', 'device', 'what', 'client', 'future', 'to')

    def __init__(self, deadline, device, what, client, future, to):
        self.deadline, self.device, self.what, self.client, self.future = deadline, device, what, client, future
        self.to = to


class IgtlBridgeNode(Node):
    """See the module docstring."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS)
        self.image_dir = os.path.abspath(self.p['image_dir'] or os.path.join(paths.repo_root(), 'build',
                                                                             'igtl_images'))
        self._lock = threading.Lock()
        self.T_scanner_base: Optional[np.ndarray] = None
        self.registration_source = ''
        self._tip: Optional[tuple] = None            # (T_base_tip, receive monotonic time)
        self.plan: Optional[NeedlePlan] = None
        self.target_lps_m: Optional[np.ndarray] = None
        self.entry_lps_m: Optional[np.ndarray] = None
        self.last_image_path = ''
        self._safety_key = None
        self._safety_status: Optional[tuple] = None  # (code, state, reason) last sent
        self._pending: Dict[int, _Pending] = {}
        self._next_token = 0
        self.poses_sent = 0
        self.pose_ticks = 0                          # pose timer runs (with or without a client)

        group = ReentrantCallbackGroup()
        latched_in = MutuallyExclusiveCallbackGroup()
        self.events = common.create_event_publisher(self)
        self.diagnostics = common.create_diagnostics_publisher(self)
        self.target_pub = self.create_publisher(PointStamped, TARGET_TOPIC, qos.LATCHED)
        self.entry_pub = self.create_publisher(PointStamped, ENTRY_TOPIC, qos.LATCHED)
        self.command_client = self.create_client(OperatorCommand, topics.PROCEDURE_COMMAND, callback_group=group)
        self.estop_client = self.create_client(SetEstop, topics.SAFETY_ESTOP, callback_group=group)
        self.resume_client = self.create_client(ResumeMotion, topics.SAFETY_RESUME, callback_group=group)
        self.acknowledge_client = self.create_client(AcknowledgeFaults, topics.SAFETY_ACKNOWLEDGE,
                                                     callback_group=group)
        self.register_client = self.create_client(RegisterImage, topics.REGISTRATION_REGISTER, callback_group=group)
        self.validate_client = self.create_client(ValidatePlan, topics.PLANNER_VALIDATE, callback_group=group)
        self.create_subscription(RobotState, topics.ROBOT_STATE, self._on_robot_state, qos.STATE_STREAM,
                                 callback_group=group)
        self.create_subscription(RegistrationResult, topics.REGISTRATION_RESULT, self._on_registration, qos.LATCHED,
                                 callback_group=latched_in)
        self.create_subscription(NeedlePlan, topics.PLANNER_CURRENT_PLAN, self._on_plan, qos.LATCHED,
                                 callback_group=latched_in)
        self.create_subscription(SafetyStatus, topics.SAFETY_STATUS, self._on_safety, qos.SAFETY_LATCHED,
                                 callback_group=latched_in)

        self.operator_session_path = self.p['operator_session_file'] or str(default_session_path())
        self._image_worker = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                   thread_name_prefix='igtl-image-writer')
        config = BridgeConfig(host=self.p['host'], port=self.p['port'],
                              max_image_bytes=int(self.p['max_image_mib']) * MIB,
                              max_clients=int(self.p['max_clients']),
                              message_timeout_s=float(self.p['message_timeout_s']),
                              idle_timeout_s=float(self.p['idle_timeout_s']),
                              rate_limit_hz=float(self.p['rate_limit_hz']),
                              rate_burst=max(1, int(2.0 * self.p['rate_limit_hz'])),
                              refusal_report_interval_s=float(self.p['refusal_report_interval_s']),
                              allowed_clients=tuple(a for a in self.p['allowed_clients'] if a.strip()),
                              shared_secret=self._shared_secret(),
                              commands=BRP_COMMANDS + OPERATOR_COMMANDS)
        self.bridge = AsyncCommandBridge(
            config, self._dispatch_command, on_target=self._on_target, on_entry=self._on_entry,
            on_calibration=self._on_calibration_transform, on_image=self._on_image,
            on_status=self._on_slicer_status, on_event=self._on_bridge_event, status_provider=self._link_status)
        self.port = self.bridge.start()
        self.get_logger().info(f'OpenIGTLink server listening on {self.p["host"]}:{self.port}')
        self.create_timer(1.0 / self.p['pose_rate'], self._send_pose, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(0.1, self._expire_pending, callback_group=group)
        self.create_timer(self.p['diagnostics_period_s'], self._publish_diagnostics, callback_group=group)

    def _shared_secret(self) -> str:
        path = self.p['shared_secret_file']
        if not path:
            return ''
        try:
            return read_session(path)  # same rules as the operator secret: a private file, not a parameter
        except OperatorSessionError as exc:
            raise ValueError(f'shared_secret_file: {exc}') from None

    def _link_status(self):
        """GET_STATUS answer: the safety state as last sent to Slicer as STATUS SAFETY."""
        status = self._safety_status
        if status is None:
            return StatusCode.NOT_READY, 'NO_SAFETY_STATUS', f'no {topics.SAFETY_STATUS} received yet'
        code, state, text = status
        return code, state, text

    # ================================================================ Slicer -> ROS
    def _point_msg(self, p_lps_m: np.ndarray) -> PointStamped:
        msg = PointStamped()
        msg.header.stamp = common.stamp_now(self)
        msg.header.frame_id = frames.SCANNER_FRAME
        msg.point.x, msg.point.y, msg.point.z = (float(v) for v in p_lps_m)
        return msg

    def _on_target(self, p_lps_m: np.ndarray):
        self.target_pub.publish(self._point_msg(p_lps_m))
        with self._lock:
            self.target_lps_m = np.array(p_lps_m, dtype=float)
        self._validate_if_complete()
        return True, f'target published on {TARGET_TOPIC}'

    def _on_entry(self, p_lps_m: np.ndarray):
        self.entry_pub.publish(self._point_msg(p_lps_m))
        with self._lock:
            self.entry_lps_m = np.array(p_lps_m, dtype=float)
        self._validate_if_complete()
        return True, f'entry published on {ENTRY_TOPIC}'

    def _validate_if_complete(self) -> None:
        with self._lock:
            entry, target = self.entry_lps_m, self.target_lps_m
        if not self.p['validate_plan'] or entry is None or target is None:
            return
        if not self.validate_client.service_is_ready():
            self.get_logger().info('/planner/validate not available: TARGET/ENTRY not validated')
            return
        request = ValidatePlan.Request(entry=self._point_msg(entry), target=self._point_msg(target))

        def done(response):
            if response.valid:
                self.bridge.send_status('PLAN', StatusCode.OK, '', response.message or 'path is valid')
            else:
                self.bridge.send_status('PLAN', StatusCode.NOT_READY, 'INVALID_PLAN', response.message)
        self._call(self.validate_client, request, 'PLAN', 'plan validation', done)

    def _on_calibration_transform(self, T_scanner_zframe: np.ndarray):
        # The registration is the registration node's job (one owner of /registration/result).
        return False, (f'calibration transforms are not accepted: send the Z-frame image as IMAGE '
                       f'"{self.p["calibration_device"]}" and the registration node registers it')

    def _on_image(self, image):
        from igt_robot.imaging import ImageError, Volume
        voxels = np.asarray(image.voxels)
        if voxels.ndim == 4:
            if voxels.shape[3] != 1:
                return False, f'image has {voxels.shape[3]} components; only scalar images are accepted'
            voxels = voxels[..., 0]
        try:
            volume = Volume(np.array(voxels), image.ijk_to_lps_m, self.p['image_modality'],
                            {'device_name': image.name, 'source': 'OpenIGTLink'})
        except ImageError as exc:
            return False, f'image {image.name!r} refused: {exc}'
        stamp = time.strftime('%Y%m%d-%H%M%S') + f'-{int((time.time() % 1) * 1e6):06d}'
        name = _SAFE_NAME_RE.sub('_', image.name) or 'image'
        path = os.path.join(self.image_dir, f'{name}_{stamp}.nii.gz')
        self._image_worker.submit(self._store_image, volume, image.name, path)
        return True, f'image received {list(voxels.shape)}; saving to {path}'

    def _store_image(self, volume, device: str, path: str) -> None:
        """Worker thread: write the NIfTI, announce it, register it if it is the calibration image."""
        from igt_robot.imaging import write_nifti
        try:
            os.makedirs(self.image_dir, exist_ok=True)
            write_nifti(volume, path)
        except Exception as exc:
            self.get_logger().error(f'image {device!r} not saved: {exc}')
            self.bridge.send_status(device, StatusCode.RESOURCE_ERROR, 'NOT_SAVED', f'image not saved: {exc}')
            self._event('image_refused', f'image {device} could not be saved: {exc}', ProcedureEvent.ERROR,
                        device=device, reason=str(exc))
            return
        calibration = device.strip().upper() == self.p['calibration_device'].strip().upper()
        if not calibration:
            with self._lock:
                self.last_image_path = path
        self._event('image_received', f'image {device} received from Slicer: {path}', path=path, device=device,
                    shape=list(volume.data.shape), spacing_m=[round(float(s), 9) for s in volume.spacing])
        if calibration:
            self._register(path)

    def _register(self, path: str) -> None:
        if not self.register_client.service_is_ready():
            self.bridge.send_status('REGISTRATION', StatusCode.NOT_READY, 'UNAVAILABLE',
                                    '/registration/register is not available: is the registration node running?')
            return
        request = RegisterImage.Request(image_path=path, method=self.p['registration_method'])
        with self._lock:
            target = self.target_lps_m
        if target is not None:
            request.has_target = True
            request.target_scanner.x, request.target_scanner.y, request.target_scanner.z = (float(v) for v in target)

        def done(response):
            r = response.result
            if response.success:
                text = f'registration accepted: FRE {r.fre * 1e3:.2f} mm'
                if r.predicted_tre > 0.0:
                    text += f', predicted TRE {r.predicted_tre * 1e3:.2f} mm'
                self.bridge.send_status('REGISTRATION', StatusCode.OK, '', text)
            else:
                self.bridge.send_status('REGISTRATION', StatusCode.NOT_READY, 'REJECTED',
                                        response.message or r.rejection_reason or 'registration rejected')
        self._call(self.register_client, request, 'REGISTRATION', 'registration', done)

    def _on_slicer_status(self, device, code, error_name, text) -> None:
        self._event('igtl_status', f'STATUS {device} from Slicer: {code} {error_name} {text}'.strip(),
                    device=device, code=code, error_name=error_name, text=text)

    def _on_bridge_event(self, kind: str, details: dict) -> None:
        if kind == 'image':
            return  # announced as image_received once the file exists
        severity = ProcedureEvent.WARN if kind == 'refused' else ProcedureEvent.INFO
        if kind == 'connection':
            text = (f"OpenIGTLink client {details.get('peer')} "
                    f"{'connected' if details.get('connected') else 'disconnected'}: {details.get('reason')}")
        elif kind == 'refused':  # one digest per client per interval, never one event per message
            example = (details.get('examples') or [{}])[0]
            text = (f"{details.get('count')} OpenIGTLink message(s) from {details.get('peer')} refused in "
                    f"{details.get('interval_s')} s {details.get('codes')}; first: {example.get('type')} "
                    f"{example.get('device')!r}: {example.get('reason')}")
        else:
            text = f'{kind} from Slicer'
        self._event(f'igtl_{kind}', text, severity, **details)
        if kind == 'connection' and details.get('connected'):
            self._resend_state(details.get('client'))

    # ---------------------------------------------------------------- commands
    def operator_token(self):
        """(token, '') from the operator session file, or ('', why it cannot be used)."""
        try:
            return read_session(self.operator_session_path), ''
        except OperatorSessionError as exc:
            return '', str(exc)

    def _dispatch_command(self, name: str, arg: str, client=None) -> None:
        """Server thread: start the service call for a command; STATUS <name> follows from ROS to ``client``."""
        if name == EMERGENCY:  # pressing never needs the operator's secret
            request = SetEstop.Request(active=True, source=f'{NODE_NAME}: Slicer EMERGENCY')

            def estop_done(response):
                if response.success:
                    self.bridge.send_status(name, StatusCode.OK, '', response.message or 'e-stop engaged', to=client)
                else:
                    self.bridge.send_status(name, StatusCode.NOT_READY, 'REFUSED', response.message, to=client)
                self._event('igtl_command', f'EMERGENCY -> {topics.SAFETY_ESTOP}: success={response.success} '
                            f'{response.message}', ProcedureEvent.WARN, command=name, success=response.success)
            self._call(self.estop_client, request, name, 'e-stop (use the hardware e-stop!)', estop_done, client)
            return
        token, why = self.operator_token()
        if name in OPERATOR_COMMANDS:
            if not token:
                reason = f'{name} needs the operator session and it cannot be used: {why}'
                self.bridge.send_status(name, StatusCode.ACCESS_DENIED, 'NO_OPERATOR_SESSION', reason, to=client)
                self._event('igtl_command', f'{name} refused: {reason}', ProcedureEvent.WARN, command=name,
                            accepted=False, reason=reason)
                return
            self._dispatch_operator_command(name, arg, token, client)
            return
        command = COMMAND_MAP.get(name)
        if command is None:
            self.bridge.send_status(name, StatusCode.ILLEGAL_INSTRUCTION, 'UNMAPPED',
                                    f'{name} has no workflow command', to=client)
            return
        self._workflow_command(name, command, arg or self._default_argument(name), token, client)

    def _workflow_command(self, name: str, command: str, argument: str, token: str, client) -> None:
        request = OperatorCommand.Request(command=command, argument=argument, operator_id=self.p['operator_id'],
                                          operator_token=token)

        def done(response):
            where = f' [{response.phase}/{response.step}]' if response.phase or response.step else ''
            if response.accepted:
                self.bridge.send_status(name, StatusCode.OK, '', (response.message or 'accepted') + where, to=client)
            else:
                self.bridge.send_status(name, StatusCode.NOT_READY, 'REFUSED', response.message or 'refused',
                                        to=client)
            self._event('igtl_command', f'{name} -> {command}({argument}): '
                        f"{'accepted' if response.accepted else 'refused'}: {response.message}",
                        ProcedureEvent.INFO if response.accepted else ProcedureEvent.WARN, command=name,
                        workflow_command=command, argument=argument, accepted=response.accepted)
        self._call(self.command_client, request, name, f'{name} ({command})', done, client)

    def _dispatch_operator_command(self, name: str, arg: str, token: str, client) -> None:
        operator_id = self.p['operator_id']
        if name == 'CONFIRM_PLAN':
            self._workflow_command(name, 'confirm_plan', arg or self._default_argument('TARGETING'), token, client)
            return
        if name == 'RESUME':
            client_, request = self.resume_client, ResumeMotion.Request(operator_id=operator_id, operator_token=token)
        elif name == 'ACKNOWLEDGE':
            codes = [c.strip() for c in arg.split(',') if c.strip()]
            client_ = self.acknowledge_client
            request = AcknowledgeFaults.Request(operator_id=operator_id, operator_token=token, codes=codes)
        else:  # RELEASE_ESTOP
            client_ = self.estop_client
            request = SetEstop.Request(active=False, source=f'{NODE_NAME}: Slicer ({operator_id})',
                                       operator_token=token)

        def done(response):
            if response.success:
                self.bridge.send_status(name, StatusCode.OK, '', response.message or 'done', to=client)
            else:
                self.bridge.send_status(name, StatusCode.NOT_READY, 'REFUSED', response.message or 'refused',
                                        to=client)
            self._event('igtl_command', f'{name} -> {client_.srv_name}: '
                        f"{'accepted' if response.success else 'refused'}: {response.message}",
                        ProcedureEvent.INFO if response.success else ProcedureEvent.WARN, command=name,
                        accepted=response.success)
        self._call(client_, request, name, name, done, client)

    def _default_argument(self, name: str) -> str:
        with self._lock:
            if name == 'PLANNING':
                return self.last_image_path
            if name == 'CALIBRATION':
                return self.registration_source
            if name == 'TARGETING':
                return self.plan.plan_id if self.plan is not None else ''
        return ''

    def _call(self, client, request, device: str, what: str, on_response, to=None) -> None:
        """Start ``client.call_async``; ``on_response(response)`` runs in the executor; STATUS on failure
        (to the OpenIGTLink client ``to``; None: every client)."""
        if not client.service_is_ready():
            self.bridge.send_status(device, StatusCode.NOT_READY, 'UNAVAILABLE',
                                    f'{what}: service {client.srv_name} is not available', to=to)
            return
        future = client.call_async(request)
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._pending[token] = _Pending(time.monotonic() + self.p['service_timeout_s'], device, what, client,
                                            future, to)

        def finished(f):
            with self._lock:
                if self._pending.pop(token, None) is None:
                    return  # already reported as timed out
            try:
                response = f.result()
            except Exception as exc:
                self.bridge.send_status(device, StatusCode.UNKNOWN_ERROR, 'ERROR', f'{what}: {exc}', to=to)
                return
            if response is None:
                self.bridge.send_status(device, StatusCode.UNKNOWN_ERROR, 'ERROR', f'{what}: no response', to=to)
                return
            on_response(response)
        future.add_done_callback(finished)

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(t, p) for t, p in self._pending.items() if now > p.deadline]
            for token, _ in expired:
                del self._pending[token]
        for _, pending in expired:
            pending.client.remove_pending_request(pending.future)
            self.bridge.send_status(pending.device, StatusCode.TIME_OUT, 'TIME_OUT',
                                    f'{pending.what}: {pending.client.srv_name} did not answer within '
                                    f'{self.p["service_timeout_s"]:g} s', to=pending.to)

    # ================================================================ ROS -> Slicer
    def _on_robot_state(self, msg: RobotState) -> None:
        T_base_tip = msg_convert.pose_matrix(msg.needle_tip)
        if np.all(np.isfinite(T_base_tip)):
            self._tip = (T_base_tip, time.monotonic())

    def _on_registration(self, msg: RegistrationResult) -> None:
        if not msg.accepted:
            return  # never show a pose through a rejected registration
        T_base_scanner = msg_convert.transform_matrix(msg.transform.transform)
        with self._lock:
            self.T_scanner_base = frames.invert(T_base_scanner)
            self.registration_source = msg.image_source

    def needle_pose_scanner(self) -> Optional[np.ndarray]:
        """T_scanner_tip (scanner LPS, m) from the latest fresh robot state, or None."""
        with self._lock:
            T_scanner_base = self.T_scanner_base
        tip = self._tip
        if T_scanner_base is None or tip is None or time.monotonic() - tip[1] > self.p['pose_max_age_s']:
            return None
        return T_scanner_base @ tip[0]

    def _send_pose(self) -> None:
        self.pose_ticks += 1
        if not self.bridge.connected:
            return
        T = self.needle_pose_scanner()
        if T is not None and self.bridge.send_current_position(T):
            self.poses_sent += 1

    def _on_plan(self, msg: NeedlePlan) -> None:
        with self._lock:
            self.plan = msg
        self._send_plan(msg)

    def _send_plan(self, msg: Optional[NeedlePlan], to=None) -> None:
        if msg is None:
            return
        entry, target = msg_convert.point_list(msg.entry), msg_convert.point_list(msg.target)
        if not all(math.isfinite(v) for v in entry + target):
            self.get_logger().warning(f'plan {msg.plan_id!r} has non-finite points; not sent to Slicer')
            return
        self.bridge.send_plan(entry, target, to=to)

    def _on_safety(self, msg: SafetyStatus) -> None:
        key = (msg.state, msg.motion_permitted, msg.reason)
        if key == self._safety_key:
            return
        self._safety_key = key
        code = SAFETY_CODES.get(msg.state, StatusCode.UNKNOWN_ERROR)
        if msg.state == 'READY' and not msg.motion_permitted:
            code = StatusCode.NOT_READY
        text = f"{msg.state}: motion {'permitted' if msg.motion_permitted else 'not permitted'}" + \
            (f' ({msg.reason})' if msg.reason else '')
        self._safety_status = (code, msg.state, text)
        self.bridge.send_status('SAFETY', code, msg.state, text)

    def _resend_state(self, client=None) -> None:
        """A (re)connected client gets the current plan and safety state at once (nobody else again)."""
        with self._lock:
            plan = self.plan
        self._send_plan(plan, to=client)
        if self._safety_status is not None:
            code, state, text = self._safety_status
            self.bridge.send_status('SAFETY', code, state, text, to=client)

    # ================================================================ reporting
    def _event(self, kind: str, description: str, severity: int = ProcedureEvent.INFO, **values) -> None:
        text_values = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in values.items()}
        self.events.publish(common.make_event(self, kind, description, severity, text_values))

    def _publish_diagnostics(self) -> None:
        stats = self.bridge.stats()
        level = DiagnosticStatus.OK if stats['connected'] else DiagnosticStatus.WARN
        message = 'Slicer connected' if stats['connected'] else 'waiting for Slicer'
        values = {'port': self.port, 'clients': len(self.bridge.clients()), 'received': stats['received'],
                  'refused': stats['refused'], 'sent': stats['sent'],
                  'registration': self.T_scanner_base is not None, 'poses_sent': self.poses_sent}
        self.diagnostics.publish(common.diagnostic_array(
            self, [common.diagnostic_status(self, 'OpenIGTLink link', level, message, values)]))

    def describe_state(self) -> str:
        stats = self.bridge.stats()
        return (f"port {self.port}, Slicer {'connected' if stats['connected'] else 'not connected'}, "
                f"registration {'accepted' if self.T_scanner_base is not None else 'none'}, "
                f"{stats['received']} received / {stats['refused']} refused / {stats['sent']} sent")

    def on_bringup_shutdown(self) -> None:
        self.bridge.stop()
        self._image_worker.shutdown(wait=True, cancel_futures=True)

    def destroy_node(self):
        self.on_bringup_shutdown()
        return super().destroy_node()


def main(args=None) -> int:
    return common.run_node(IgtlBridgeNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
