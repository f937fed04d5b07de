"""safety_supervisor: the ROS adapter of ``igt_robot.safety.SafetySupervisor`` (docs/safety.md).

Inputs: /scanner/state, /heartbeat (required nodes), /safety/faults, /joint_states
(URDF joint limits, optional needle-tip workspace box), /robot/state (hardware
e-stop and latched controller faults), and the services /safety/estop,
/safety/acknowledge, /safety/resume.
Outputs: /safety/motion_permitted (std_msgs/Bool) and /safety/status, both
SAFETY_LATCHED (transient local: a late joiner gets the current value), on every
change and at ``publish_rate_hz``; every supervisor event as a ProcedureEvent
(transitions: kind ``safety_transition``, description = the reason text);
/diagnostics; /heartbeat.

Every input runs the core under one lock and publishes the new permission from
that same callback, so a scanner event reaches /safety/motion_permitted without
waiting for the periodic tick. The tick (``tick_rate_hz``) only drives timeouts.
The core runs on ``time.monotonic()``; every timer runs on a steady clock (a ROS-time
step, e.g. a /clock going backwards under use_sim_time, does not pause it).

Operator authority (docs/safety.md): at start-up the node issues the operator
session secret (``operator_session_file``, mode 0600). Resume, acknowledge and
e-stop release need it in ``operator_token``; pressing the e-stop never does.
Refusals say why and are recorded as events. An acknowledge first asks the
hardware node to reset the drive's latched faults (``drive_reset_service``, with the
operator's secret), so a WATCHDOG or e-stop latched in the drive can be cleared
once its cause has gone. A /scanner/state publisher other than ``scanner_source``
is ignored and latched as a fault naming its node. Every parameter is read-only
except ``max_insertion_depth``, applied live through the core's validation
within the configured limit.
"""
from __future__ import annotations

import math
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Header

from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.robot_model import load_robot_model
from igt_robot.safety import CommandResult, EventKind, SafetyConfig, SafetyState, SafetySupervisor
from igt_robot.safety import operator_session
from igt_robot.safety.interlock import FOREIGN_SCANNER, node_key
from igt_robot_msgs import msg as igt_msg
from igt_robot_msgs.srv import AcknowledgeFaults, ResumeMotion, SetEstop

from . import common, qos, topics
from .params import Param, apply_live, declare

PARAMS = [
    Param('required_heartbeats', ['scanner_interface', 'hardware_node', 'motion_controller'],
          'nodes whose /heartbeat (frame_id = node name) is required; silence latches HEARTBEAT_LOST'),
    Param('motion_heartbeats', [''], 'nodes whose /heartbeat is required only for motion (READY needs them, '
          'their silence holds motion until the operator resumes; e.g. recorder_node, procedure_node)'),
    Param('heartbeat_timeout_s', 1.0, 'heartbeat timeout of every required node (s)', 0.05, 10.0),
    Param('heartbeat_timeouts_s', Parameter.Type.DOUBLE_ARRAY,
          'per-node heartbeat timeouts (s) in required_heartbeats order; unset = heartbeat_timeout_s'),
    Param('scanner_required', True, 'INIT waits for /scanner/state and its silence latches SCANNER_SILENT'),
    Param('scanner_timeout_s', 0.5, 'no new /scanner/state for this long latches SCANNER_SILENT (s)',
          0.05, 10.0),
    Param('scanner_max_age_s', 0.0, 'a scanner state whose stamp is older counts as UNKNOWN (s); '
          '0 = scanner_timeout_s', 0.0, 10.0),
    Param('auto_resume_after_scan', False, 'a hold caused only by a scan ends by itself at IDLE'),
    Param('require_robot_state', True, 'INIT waits for the first /robot/state (hardware e-stop input)'),
    Param('require_joint_state', True, 'INIT waits for the first /joint_states'),
    Param('joint_limit_tolerance', 0.001, 'allowed excursion beyond a URDF joint limit (m or rad)', 0.0, 0.05),
    Param('workspace_lower', Parameter.Type.DOUBLE_ARRAY, 'needle-tip box lower corner x,y,z in base_link (m); '
          'unset = no box'),
    Param('workspace_upper', Parameter.Type.DOUBLE_ARRAY, 'needle-tip box upper corner x,y,z in base_link (m)'),
    Param('max_insertion_depth', -1.0, 'procedure insertion-depth limit (m); at run time only within the '
          'configured value; < 0 = only the URDF limit', -1.0, 1.0, live=True),
    Param('tick_rate_hz', 50.0, 'timeout check rate (Hz); a timeout is seen at most one tick late', 20.0, 1000.0),
    Param('publish_rate_hz', 10.0, 'periodic /safety/status and /safety/motion_permitted rate (Hz)', 1.0, 100.0),
    Param('heartbeat_period_s', 0.1, 'own /heartbeat period (s)', 0.01, 1.0),
    Param('operator_session_file', '', 'file the operator session secret is issued to at start-up (mode 0600); '
          'empty = the per-user default of igt_robot.safety.operator_session'),
    Param('scanner_source', '/scanner_interface', 'the only node whose /scanner/state counts; another '
          'publisher there is a latched fault naming it'),
    Param('drive_reset_service', '/hardware_node/reset_faults', 'service resetting the drive faults for an '
          'operator acknowledge (empty = none)'),
    Param('drive_reset_timeout_s', 2.0, 'how long an acknowledge waits for the drive reset and its effect (s)',
          0.1, 10.0),
]

_EVENT_KINDS = {EventKind.TRANSITION: 'safety_transition', EventKind.FAULT_RAISED: 'safety_fault',
                EventKind.FAULT_CLEARED: 'safety_fault_cleared', EventKind.COMMAND: 'safety_command'}
_STOPPED_HARD = (SafetyState.FAULT, SafetyState.ESTOP)


class SafetySupervisorNode(common.LeanQosEvents, Node):
    """Thin rclpy adapter of :class:`igt_robot.safety.SafetySupervisor`; see the module docstring."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__('safety_supervisor', context=context, cli_args=cli_args, **kwargs)
        try:
            self._setup()
        except Exception:
            self.destroy_node()   # a bad configuration leaves no half-built node behind
            raise

    def _setup(self) -> None:
        self.p = p = declare(self, PARAMS, read_only=True)
        model = load_robot_model()
        self._joint_names = model.joint_names
        required = [str(n) for n in p['required_heartbeats'] if str(n)]
        timeouts = list(p['heartbeat_timeouts_s'] or []) or [p['heartbeat_timeout_s']] * len(required)
        if len(timeouts) != len(required):
            raise ValueError(f"parameter 'heartbeat_timeouts_s' needs {len(required)} values "
                             f"(one per required_heartbeats entry), got {len(timeouts)}")
        motion_only = [str(n) for n in p['motion_heartbeats'] if str(n) and str(n) not in required]
        required += motion_only
        timeouts += [p['heartbeat_timeout_s']] * len(motion_only)
        workspace = (p['workspace_lower'] or None, p['workspace_upper'] or None)
        config = SafetyConfig(
            heartbeat_timeouts=dict(zip(required, timeouts)), motion_heartbeats=tuple(motion_only),
            scanner_required=p['scanner_required'],
            scanner_timeout=p['scanner_timeout_s'], scanner_max_age=p['scanner_max_age_s'] or None,
            auto_resume_after_scan=p['auto_resume_after_scan'], require_estop_input=p['require_robot_state'],
            require_joint_state=p['require_joint_state'], joint_names=model.joint_names,
            joint_lower=model.lower, joint_upper=model.upper, joint_limit_tolerance=p['joint_limit_tolerance'],
            joint_units=tuple('m' if prismatic else 'rad' for prismatic in model.is_prismatic),
            workspace_lower=workspace[0], workspace_upper=workspace[1],
            max_insertion_depth=p['max_insertion_depth'] if p['max_insertion_depth'] >= 0.0 else None)
        tip_fn = NeedleGuideKinematics(model).tip_position if workspace[0] is not None else None
        self._lock = threading.Lock()
        self._sup = SafetySupervisor(config, needle_tip_fn=tip_fn, now=time.monotonic())
        self._required = frozenset(required)
        self._hw_estop = False
        self._sw_estop = False
        self._last_key = None
        self._last_state = None

        self._configured_depth = p['max_insertion_depth']   # the envelope a run-time change stays within
        self._session_path = p['operator_session_file'] or None
        self._token = operator_session.issue_session(self._session_path)
        self._scanner_source = node_key(p['scanner_source'])
        self._scanner_names = common.PublisherNames(self, topics.SCANNER_STATE)
        self._foreign_scanners = set()
        self._status_pub = self.create_publisher(igt_msg.SafetyStatus, topics.SAFETY_STATUS, qos.SAFETY_LATCHED)
        self._permitted_pub = self.create_publisher(Bool, topics.SAFETY_MOTION_PERMITTED, qos.SAFETY_LATCHED)
        self._event_pub = common.create_event_publisher(self)
        self._diag_pub = common.create_diagnostics_publisher(self)

        group = ReentrantCallbackGroup()   # callbacks may overlap; the lock serialises the core
        sub = self.create_subscription
        sub(igt_msg.ScannerState, topics.SCANNER_STATE, self._on_scanner, qos.SCANNER_STATE, callback_group=group)
        sub(Header, common.HEARTBEAT_TOPIC, self._on_heartbeat, qos.COMMANDS, callback_group=group)
        sub(igt_msg.SafetyFault, common.FAULTS_TOPIC, self._on_fault, qos.COMMANDS, callback_group=group)
        sub(JointState, topics.JOINT_STATES, self._on_joint_states, 10, callback_group=group)
        sub(igt_msg.RobotState, topics.ROBOT_STATE, self._on_robot_state, qos.STATE_STREAM, callback_group=group)
        self.create_service(SetEstop, topics.SAFETY_ESTOP, self._on_estop, callback_group=group)
        self.create_service(AcknowledgeFaults, topics.SAFETY_ACKNOWLEDGE, self._on_acknowledge, callback_group=group)
        self.create_service(ResumeMotion, topics.SAFETY_RESUME, self._on_resume, callback_group=group)
        self._reset_client = (self.create_client(AcknowledgeFaults, p['drive_reset_service'], callback_group=group)
                              if p['drive_reset_service'] else None)
        steady = common.create_steady_timer
        steady(self, 1.0 / p['tick_rate_hz'], lambda: self._apply(self._sup.tick), callback_group=group)
        steady(self, 1.0 / p['publish_rate_hz'], self._publish_periodic, callback_group=group)
        steady(self, 1.0, self._publish_diagnostics, callback_group=group)
        apply_live(self, PARAMS, self._apply_parameter)
        self.heartbeat = common.HeartbeatPublisher(self, p['heartbeat_period_s'])
        self._publish_periodic()
        where = self._session_path or operator_session.default_session_path()
        self.get_logger().info(f'operator session issued to {where}')
        self.get_logger().info(f'required heartbeats: {config.heartbeat_timeouts}; scanner timeout '
                               f'{config.scanner_timeout:.2f} s; workspace box '
                               f'{"on" if tip_fn else "off"}')

    # ------------------------------------------------------------------ core
    def _apply(self, step, values=None):
        """Run ``step(now)`` on the core under the lock; publish its events and, if changed, the status."""
        with self._lock:
            now = time.monotonic()
            result = step(now)
            events = result.events if isinstance(result, CommandResult) else result
            self._publish(events, now, values=values)
            return result

    def _publish(self, events, now: float, force: bool = False, values=None) -> None:
        status = self._sup.status(now)
        key = (status.state, status.motion_permitted, status.latched, status.awaiting_resume, status.reason,
               status.scanner_phase, tuple((f.code, f.source, f.condition_active) for f in status.faults))
        if force or key != self._last_key:
            self._last_key = key
            self._permitted_pub.publish(Bool(data=status.motion_permitted))  # first: latency matters
            self._status_pub.publish(self._status_msg(status))
        for event in events:
            self._publish_event(event, values)
        if status.state is not self._last_state:
            self._last_state = status.state
            self._publish_diagnostics(status)

    def _publish_event(self, event, values=None) -> None:
        if event.kind is EventKind.TRANSITION:
            text = f'{event.from_state.value} -> {event.to_state.value}: {event.cause}'
            if event.to_state in _STOPPED_HARD:
                severity = igt_msg.ProcedureEvent.ERROR
                self.get_logger().warning(text)
            else:
                severity = igt_msg.ProcedureEvent.INFO
                self.get_logger().info(text)
        elif event.kind is EventKind.FAULT_RAISED:
            severity = igt_msg.ProcedureEvent.ERROR
        elif event.kind is EventKind.COMMAND and event.cause.startswith('refused'):
            severity = igt_msg.ProcedureEvent.WARN
        else:
            severity = igt_msg.ProcedureEvent.INFO
        details = {'from_state': event.from_state.value, 'to_state': event.to_state.value}
        if event.code:
            details['code'] = event.code
        details.update(values or {})
        self._event_pub.publish(common.make_event(self, _EVENT_KINDS[event.kind], event.cause, severity, details))

    def _status_msg(self, status) -> igt_msg.SafetyStatus:
        faults = [igt_msg.SafetyFault(code=f.code, detail=f.detail, since=common.stamp_from_monotonic(self, f.since),
                                      latched=True, cause_active=f.condition_active) for f in status.faults]
        msg = igt_msg.SafetyStatus(motion_permitted=status.motion_permitted, state=status.state.value,
                                   faults=faults, latched=status.latched, awaiting_resume=status.awaiting_resume,
                                   reason=status.reason, scanner_phase=status.scanner_phase)
        msg.header.stamp = common.stamp_now(self)
        return msg

    def _publish_periodic(self) -> None:
        with self._lock:
            self._publish((), time.monotonic(), force=True)

    def _publish_diagnostics(self, status=None) -> None:
        if status is None:
            with self._lock:
                status = self._sup.status(time.monotonic())
        level = (DiagnosticStatus.OK if status.motion_permitted else
                 DiagnosticStatus.ERROR if status.state in _STOPPED_HARD else DiagnosticStatus.WARN)
        values = {'state': status.state.value, 'motion_permitted': status.motion_permitted,
                  'scanner_phase': status.scanner_phase, 'faults': ', '.join(f.code for f in status.faults)}
        self._diag_pub.publish(common.diagnostic_array(
            self, [common.diagnostic_status(self, 'safety', level, status.reason, values)]))

    # ---------------------------------------------------------------- inputs
    def _on_scanner(self, msg, info) -> None:
        publisher, name = self._scanner_names.lookup(info)
        if name != self._scanner_source:
            # Only the configured source counts. Another publisher is a latched fault naming it (once); one
            # the graph does not name yet is ignored (a fresh state from the real source follows).
            if name and publisher not in self._foreign_scanners:
                self._foreign_scanners.add(publisher)
                detail = f"second publisher on /scanner/state: node '{name}' (only {self._scanner_source} counts)"
                self.get_logger().error(detail)
                self._apply(lambda now: self._sup.report_fault(FOREIGN_SCANNER, detail, now, source=name))
            return
        stamp = common.monotonic_from_stamp(self, msg.header.stamp)
        phase = common.phase_from_msg(msg.phase)
        self._apply(lambda now: self._sup.update_scanner(phase, stamp, msg.heartbeat, now,
                                                         protocol=msg.protocol_name))

    def _on_heartbeat(self, msg) -> None:
        if msg.frame_id in self._required:
            self._apply(lambda now: self._sup.heartbeat(msg.frame_id, now))

    def _on_fault(self, msg) -> None:
        code = msg.code.strip() or 'UNSPECIFIED'   # a reporter bug must still stop the robot

        def step(now):
            events = self._sup.report_fault(code, msg.detail, now, active=msg.cause_active)
            if not msg.cause_active:   # a one-off event, or the cause of an earlier report has cleared
                events += self._sup.clear_fault_condition(code, now)
            return events
        self._apply(step)

    def _on_joint_states(self, msg) -> None:
        by_name = dict(zip(msg.name, msg.position))
        q = [by_name.get(name, math.nan) for name in self._joint_names]   # missing -> INVALID_JOINT_STATE
        self._apply(lambda now: self._sup.check_limits(q, now))

    def _on_robot_state(self, msg) -> None:
        def step(now):
            self._hw_estop = bool(msg.estopped)
            return (self._sup.set_estop(self._hw_estop or self._sw_estop, now)
                    + self._sup.sync_hardware_faults(msg.faults, now))
        self._apply(step)

    # -------------------------------------------------------------- services
    def _operator_refusal(self, command: str, token: str, values=None):
        """None when ``token`` is the operator's secret; otherwise the refusal, recorded as an event."""
        ok, why = operator_session.check_token(self._token, token)
        if ok:
            return None
        self.get_logger().warning(f'{command} refused: {why}')
        return self._apply(lambda now: self._sup.refuse(now, command, why), values=values)

    def _on_estop(self, req, resp):
        values = {'estop_source': req.source, 'estop_active': req.active}
        if not req.active:               # pressing is always honoured; only the operator releases
            refusal = self._operator_refusal('e-stop release', req.operator_token, values)
            if refusal is not None:
                resp.success, resp.message = False, refusal.message
                return resp

        def step(now):
            self._sw_estop = bool(req.active)
            return self._sup.set_estop(self._hw_estop or self._sw_estop, now)
        self._apply(step, values=values)
        resp.success = True
        if req.active:
            resp.message = 'e-stop engaged'
        elif self._hw_estop:
            resp.message = 'software e-stop released; hardware e-stop still pressed'
        else:
            resp.message = 'e-stop released; acknowledge (reset) and resume to move again'
        return resp

    def _on_acknowledge(self, req, resp):
        codes = [c for c in req.codes if c.strip()]
        values = {'operator_id': req.operator_id}
        refusal = self._operator_refusal('acknowledge', req.operator_token, values)
        if refusal is None:
            self._reset_drive(req)

            def step(now):
                if not codes:                # everything: released e-stop and cleared faults
                    return self._sup.reset(now)
                results = [self._sup.acknowledge(now, code) for code in codes]
                return CommandResult(all(r.accepted for r in results), '; '.join(r.message for r in results),
                                     tuple(e for r in results for e in r.events))
            result = self._apply(step, values=values)
        else:
            result = refusal
        resp.success, resp.message, resp.status = result.accepted, result.message, self._current_status_msg()
        return resp

    def _reset_drive(self, req) -> None:
        """Before an acknowledge: faults latched in the drive (cause active) are reset there by the hardware
        node (RESET_FAULTS; the drive refuses while a cause persists). Waits for their clearance to arrive
        (/safety/faults, /robot/state) so the acknowledge sees it; whatever remains is refused by the core."""
        with self._lock:
            active = {f.code for f in self._sup.status(time.monotonic()).faults if f.condition_active}
        if self._reset_client is None or self._sw_estop or not (active or self._hw_estop):
            return
        if not self._reset_client.service_is_ready():
            self.get_logger().warning(f'{self._reset_client.srv_name} not available: drive faults not reset')
            return
        timeout = self.p['drive_reset_timeout_s']
        deadline = time.monotonic() + timeout
        done = threading.Event()
        future = self._reset_client.call_async(AcknowledgeFaults.Request(
            operator_id=req.operator_id, operator_token=req.operator_token))
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout):
            self._reset_client.remove_pending_request(future)
            self.get_logger().warning(f'drive fault reset did not answer within {timeout:g} s')
            return
        reply = future.result()
        self.get_logger().info(f'drive fault reset: {reply.message}')
        if not reply.success:
            return

        def cleared():
            with self._lock:
                status = self._sup.status(time.monotonic())
            still = {f.code for f in status.faults if f.condition_active} & active
            return not still and not self._hw_estop
        while not cleared() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _on_resume(self, req, resp):
        values = {'operator_id': req.operator_id}
        result = (self._operator_refusal('resume', req.operator_token, values)
                  or self._apply(self._sup.resume, values=values))
        resp.success, resp.message, resp.status = result.accepted, result.message, self._current_status_msg()
        return resp

    def _apply_parameter(self, name, value) -> None:
        """Live parameters. The parameter service carries no operator secret, so a run-time insertion-depth
        limit stays within the configured one (tighten it, or restore it); loosening or removing the
        configured limit needs the configuration (a restart)."""
        if name == 'max_insertion_depth':
            configured = self._configured_depth
            if configured >= 0.0 and not 0.0 <= value <= configured:
                raise ValueError(f'max_insertion_depth can only be set within the configured limit '
                                 f'{configured:g} m at run time (asked {value:g} m); loosen or remove it in the '
                                 'configuration')
            depth = value if value >= 0.0 else None
            self._apply(lambda now: self._sup.set_max_insertion_depth(depth, now))   # ValueError = refused
            self.p[name] = value

    # ---------------------------------------------------------------- output
    def _current_status_msg(self) -> igt_msg.SafetyStatus:
        with self._lock:
            return self._status_msg(self._sup.status(time.monotonic()))

    @property
    def supervisor(self) -> SafetySupervisor:
        """The core (read it under no assumption of stability: inputs arrive on other threads)."""
        return self._sup

    def describe_state(self) -> str:
        with self._lock:
            status = self._sup.status(time.monotonic())
        return f'{status.state.value} (motion {"permitted" if status.motion_permitted else "halted"}): {status.reason}'


def main(args=None) -> int:
    return common.run_node(SafetySupervisorNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
