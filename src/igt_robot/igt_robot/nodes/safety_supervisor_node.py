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
The core runs on ``time.monotonic()``.
"""
from __future__ import annotations

import math
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Header

from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.robot_model import load_robot_model
from igt_robot.safety import CommandResult, EventKind, SafetyConfig, SafetyState, SafetySupervisor
from igt_robot_msgs import msg as igt_msg
from igt_robot_msgs.srv import AcknowledgeFaults, ResumeMotion, SetEstop

from . import common, qos, topics
from .params import Param, declare

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
    Param('max_insertion_depth', -1.0, 'procedure insertion-depth limit (m), settable at run time; '
          '< 0 = only the URDF limit', -1.0, 1.0),
    Param('tick_rate_hz', 50.0, 'timeout check rate (Hz); a timeout is seen at most one tick late', 20.0, 1000.0),
    Param('publish_rate_hz', 10.0, 'periodic /safety/status and /safety/motion_permitted rate (Hz)', 1.0, 100.0),
    Param('heartbeat_period_s', 0.1, 'own /heartbeat period (s)', 0.01, 1.0),
]

_EVENT_KINDS = {EventKind.TRANSITION: 'safety_transition', EventKind.FAULT_RAISED: 'safety_fault',
                EventKind.FAULT_CLEARED: 'safety_fault_cleared', EventKind.COMMAND: 'safety_command'}
_STOPPED_HARD = (SafetyState.FAULT, SafetyState.ESTOP)
_PARAM_NAMES = frozenset(p.name for p in PARAMS)


class SafetySupervisorNode(Node):
    """Thin rclpy adapter of :class:`igt_robot.safety.SafetySupervisor`; see the module docstring."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__('safety_supervisor', context=context, cli_args=cli_args, **kwargs)
        try:
            self._setup()
        except Exception:
            self.destroy_node()   # a bad configuration leaves no half-built node behind
            raise

    def _setup(self) -> None:
        self.p = p = declare(self, PARAMS)
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
        self.create_timer(1.0 / p['tick_rate_hz'], lambda: self._apply(self._sup.tick), callback_group=group)
        self.create_timer(1.0 / p['publish_rate_hz'], self._publish_periodic, callback_group=group)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.heartbeat = common.HeartbeatPublisher(self, p['heartbeat_period_s'])
        self._publish_periodic()
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
    def _on_scanner(self, msg) -> None:
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
    def _on_estop(self, req, resp):
        def step(now):
            self._sw_estop = bool(req.active)
            return self._sup.set_estop(self._hw_estop or self._sw_estop, now)
        self._apply(step, values={'estop_source': req.source, 'estop_active': req.active})
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

        def step(now):
            if not codes:                # everything: released e-stop and cleared faults
                return self._sup.reset(now)
            results = [self._sup.acknowledge(now, code) for code in codes]
            return CommandResult(all(r.accepted for r in results), '; '.join(r.message for r in results),
                                 tuple(e for r in results for e in r.events))
        result = self._apply(step, values={'operator_id': req.operator_id})
        resp.success, resp.message, resp.status = result.accepted, result.message, self._current_status_msg()
        return resp

    def _on_resume(self, req, resp):
        result = self._apply(self._sup.resume, values={'operator_id': req.operator_id})
        resp.success, resp.message, resp.status = result.accepted, result.message, self._current_status_msg()
        return resp

    def _on_set_parameters(self, params):
        fixed = [p.name for p in params if p.name in _PARAM_NAMES and p.name != 'max_insertion_depth']
        if fixed:
            return SetParametersResult(successful=False, reason=f'{", ".join(fixed)} cannot change at run time '
                                                                 '(only max_insertion_depth can)')
        for param in params:
            if param.name == 'max_insertion_depth':
                depth = param.value if param.value >= 0.0 else None
                try:
                    self._apply(lambda now: self._sup.set_max_insertion_depth(depth, now))
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

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
