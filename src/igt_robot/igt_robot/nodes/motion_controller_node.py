"""Motion controller node: MoveGuide / InsertNeedle action servers over trajectory streaming.

Like ros2_control's controller manager, the controller runs in the process that
owns the hardware: it finds the hardware node's :class:`SharedHardware` by name.
The motor controller interpolates and servos at its own rate and stops itself;
this node only keeps its PVT buffer ahead: a :class:`FixedRateLoop` at
``stream_rate`` (50 Hz by default, steady clock) runs one
:meth:`StreamingExecutor.step` per cycle, which tops the buffer up to
``lookahead`` seconds ahead of the controller's executed time. A host stall
shorter than the look-ahead changes nothing; a longer one is a controlled stop
by the controller (UNDERRUN). The node itself only translates: action goals ->
joint waypoints (through the kinematics and the accepted registration), executor
results -> action results, tracking and hardware faults -> /safety/faults,
stream status -> action feedback and /diagnostics.

Motion permission (one method, :meth:`_create_permission_inputs`): the
supervisor's latched gate, the scanner not imaging (the samples the hardware node
receives, relayed in-process: :mod:`igt_robot.safety.scanner_relay`), and the drive's
own inhibit released. When it drops, the executor sends STOP (the controller ramps each axis
down at its own deceleration limit) and the goal ends with INTERLOCK. One goal
at a time: a second goal is rejected while one is active (``goal_policy:
reject``) or preempts it (``preempt``), explicitly.

The ``motion_controller`` console script hosts this node together with the
hardware node in one process (the serial port has one owner).
"""
from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import Bool

from igt_robot import frames
from igt_robot.control.executor import ExecutorMode, StreamingExecutor
from igt_robot.control.goal_manager import GoalState, ResultCode
from igt_robot.control.loop import FixedRateLoop
from igt_robot.control.tracking import TrackingMonitor
from igt_robot.hardware import shared as shared_hardware
from igt_robot.hardware.interface import HardwareError
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import common, qos, spinning, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.robot_model import load_robot_model
from igt_robot.safety import scanner_relay
from igt_robot.safety.interlock import Interlock, InterlockConfig
from igt_robot.safety.scanner_relay import ScannerSample
from igt_robot.trajectory import JointLimits
from igt_robot_msgs.action import InsertNeedle, MoveGuide
from igt_robot_msgs.msg import ProcedureEvent, RegistrationResult, SafetyStatus

NODE_NAME = 'motion_controller'

# Read at start-up only, hence read-only: a parameter never reports a value that is not in force.
PARAMS = [
    Param('hardware_node', 'hardware_node', 'name of the hardware node whose SharedHardware this controller drives',
          read_only=True),
    Param('stream_rate', 50.0, 'rate of the host streaming cycle that keeps the controller\'s buffer filled, Hz '
          '(the controller servos at its own rate)', 20.0, 100.0, read_only=True),
    Param('lookahead', 0.5, 'trajectory time kept buffered in the controller ahead of its executed time, s: a host '
          'stall shorter than this changes nothing; it bounds how long the axes go on after the host dies (a '
          'cancel or an interlock flushes the buffer at once); the controller refuses points more than 1 s ahead',
          0.1, 0.9, read_only=True),
    Param('point_spacing', 0.02, 'trajectory time between streamed PVT points, s (the controller interpolates '
          'between them with cubic Hermite segments)', 0.005, 0.05, read_only=True),
    Param('stop_timeout', 5.0, 'time the controller\'s stop ramp may take before it counts as unresponsive, s',
          0.5, 30.0, read_only=True),
    Param('acceleration_limits', [0.02, 0.02, 0.5, 0.5, 0.01],
          'per-joint acceleration limits (m/s^2 prismatic, rad/s^2 revolute), joint order of the URDF',
          read_only=True),
    Param('limit_headroom', 0.8, 'trajectories use this fraction of the drive velocity/acceleration limits, so the '
          'drive keeps some authority to correct its following error', 0.1, 1.0, read_only=True),
    Param('jerk_limits', [0.0], 'per-joint jerk limits for the S-curve profile; [0.0] = none (trapezoidal only)',
          read_only=True),
    Param('profile', 'trapezoidal', 'velocity profile of every move', choices=('trapezoidal', 'scurve'),
          read_only=True),
    Param('tracking_tolerance', [0.0015, 0.0015, 0.02, 0.02, 0.001],
          'per-joint tracking error (measured vs. the trajectory at the controller\'s executed time) that, held '
          'for tracking_cycles stream cycles, aborts the motion (m / rad)', read_only=True),
    Param('tracking_hard_limit', [0.004, 0.004, 0.06, 0.06, 0.003],
          'per-joint tracking error that aborts the motion at once (m / rad)', read_only=True),
    Param('tracking_cycles', 5, 'consecutive stream cycles over tracking_tolerance before a tracking fault',
          1, 1000, read_only=True),
    Param('goal_tolerance', [0.0002, 0.0002, 0.002, 0.002, 0.0002],
          'per-joint distance to the goal that counts as arrived (m / rad)', read_only=True),
    Param('settle_timeout', 2.0, 'time allowed after the trajectory ends to settle within goal_tolerance, s',
          0.05, 30.0, read_only=True),
    Param('goal_policy', 'reject', 'a second goal while one is active: reject it, or preempt the active one',
          choices=('reject', 'preempt'), read_only=True),
    Param('max_guide_move_insertion', 0.001,
          'the guide may only move while the needle is inserted less than this, m', 0.0, 0.01, read_only=True),
    Param('feedback_rate', 20.0, 'action feedback rate, Hz', 1.0, 100.0, read_only=True),
    Param('heartbeat_period', 0.1, 'period of /heartbeat, s', 0.01, 1.0, read_only=True),
]


class Permission:
    """The executor's view of motion permission (read every control cycle, fed by callbacks).

    The decision is the interlock core's (igt_robot.safety.interlock, the same rule and configuration
    as the hardware node's, docs/safety.md), with the drive's own motion-inhibit as one more input:
    a goal must neither start nor go on against it.
    """

    def __init__(self, config=None):
        self.interlock = Interlock(config or InterlockConfig())
        self.lock = threading.Lock()
        self.supervisor_reason = ''
        self.hardware = None                  # SharedHardware once attached (its cached state is read)

    def _drive_inhibited(self) -> bool:
        state = self.hardware.last_state if self.hardware is not None else None
        return bool(state is not None and state.motion_inhibited)

    def update(self, feed):
        """``feed(interlock)`` under the lock (callbacks); returns its findings."""
        with self.lock:
            return feed(self.interlock)

    def decision(self):
        with self.lock:
            self.interlock.on_drive(inhibited=self._drive_inhibited())
            return self.interlock.decide(time.monotonic())

    @property
    def motion_permitted(self) -> bool:
        return not self.decision().inhibit

    @property
    def reason(self) -> str:
        inhibit, reason = self.decision()
        if not inhibit:
            return ''
        if reason == 'safety supervisor withholds motion permission' and self.supervisor_reason:
            return self.supervisor_reason
        return reason


_RESULT_CODES = {
    ResultCode.SUCCEEDED: 0, ResultCode.REJECTED_INVALID: -1, ResultCode.ABORTED_INVALID: -1,
    ResultCode.REJECTED_NOT_PERMITTED: -3, ResultCode.ABORTED_INTERLOCK: -3, ResultCode.CANCELED: -4,
    ResultCode.PREEMPTED: -4, ResultCode.ABORTED_TRACKING_ERROR: -5, ResultCode.ABORTED_HARDWARE: -6,
    ResultCode.ABORTED_GOAL_TOLERANCE: -5, ResultCode.REJECTED_BUSY: -7,
}


class GoalRefused(Exception):
    """A goal that cannot run; carries the action error code and the reason."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class MotionControllerNode(common.LeanQosEvents, Node):
    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS)
        self.model = load_robot_model()
        self.kinematics = NeedleGuideKinematics(self.model)
        self.joint_names = tuple(self.model.joint_names)
        n = len(self.joint_names)
        for key in ('acceleration_limits', 'tracking_tolerance', 'tracking_hard_limit', 'goal_tolerance'):
            if len(self.p[key]) != n:
                raise ValueError(f"parameter '{key}' needs {n} values (joint order {self.joint_names})")
        jerk = self.p['jerk_limits']
        headroom = self.p['limit_headroom']
        self.limits = JointLimits(
            velocity=self.model.velocity * headroom,
            acceleration=np.asarray(self.p['acceleration_limits'], dtype=float) * headroom,
            jerk=np.asarray(jerk, dtype=float) if len(jerk) == n and all(j > 0 for j in jerk) else None,
            lower=self.model.lower, upper=self.model.upper, joint_names=self.joint_names)
        if self.p['lookahead'] < 2.0 / self.p['stream_rate']:
            raise ValueError(f"lookahead {self.p['lookahead']:g} s must cover at least two stream cycles "
                             f"(2 / stream_rate = {2.0 / self.p['stream_rate']:g} s)")
        self.permission = Permission(common.interlock_config(self.p['hardware_node']))
        self._scanner_names = common.PublisherNames(self, topics.SCANNER_STATE)
        self._permission_names = common.PublisherNames(self, topics.SAFETY_MOTION_PERMITTED)
        self.motion_lock = threading.Lock()
        self.motion = StreamingExecutor(
            hardware=_NoHardware(), permission=lambda: self.permission, limits=self.limits,
            tracking=TrackingMonitor(self.p['tracking_tolerance'], self.p['tracking_hard_limit'],
                                     self.p['tracking_cycles'], self.joint_names),
            goal_policy=self.p['goal_policy'], goal_tolerance=self.p['goal_tolerance'],
            settle_timeout=self.p['settle_timeout'], default_profile=self.p['profile'],
            lookahead=self.p['lookahead'], point_spacing=self.p['point_spacing'],
            stop_timeout=self.p['stop_timeout'])
        self.hardware: Optional[shared_hardware.SharedHardware] = None
        self.loop: Optional[FixedRateLoop] = None
        self.T_base_scanner: Optional[np.ndarray] = None
        self.last_report = None
        self._goal_counter = itertools.count(1)
        self._finished = {}                  # goal id -> finished Goal (set by the loop thread)
        self._finished_event = threading.Condition()
        self._last_beat_cycles = -1
        self._attach_lock = threading.Lock()
        self._last_hardware_error = None

        group = ReentrantCallbackGroup()
        self._create_permission_inputs()
        self.create_subscription(RegistrationResult, topics.REGISTRATION_RESULT, self._on_registration, qos.LATCHED,
                                 callback_group=group)
        self.events = common.create_event_publisher(self)
        self.diagnostics = common.create_diagnostics_publisher(self)
        self.faults = common.FaultReporter(self)
        self.heartbeat = common.HeartbeatPublisher(self, self.p['heartbeat_period'], alive=self._loop_alive)
        self.create_timer(0.5, self._attach_hardware, callback_group=group)  # cheap: looks up a dict
        self.create_timer(1.0, self._publish_diagnostics, callback_group=group)
        self._move_server = ActionServer(
            self, MoveGuide, topics.MOVE_GUIDE, execute_callback=self._execute_move,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT, callback_group=group)
        self._insert_server = ActionServer(
            self, InsertNeedle, topics.INSERT_NEEDLE, execute_callback=self._execute_insert,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT, callback_group=group)

    # ------------------------------------------------------------ inputs
    def _create_permission_inputs(self):
        """Subscribe to what decides motion permission (the only place that does)."""
        # One mutually exclusive group: processed one at a time, in arrival order,
        # so a stale True can never overwrite a newer False.
        permission_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Bool, topics.SAFETY_MOTION_PERMITTED, self._on_permitted, qos.SAFETY_LATCHED,
                                 callback_group=permission_group)
        self.create_subscription(SafetyStatus, topics.SAFETY_STATUS, self._on_status, qos.SAFETY_LATCHED,
                                 callback_group=permission_group)
        # The scanner state comes from the hardware node this controller drives (same process, its interlock
        # thread, after it has commanded the drive): a second subscription here woke the shared executor at the
        # moment that thread needed the interpreter lock (igt_robot.safety.scanner_relay).
        self._scanner_relay = scanner_relay.relay_for(self.p['hardware_node'])
        self._scanner_relay.subscribe(self._on_scanner)
        common.create_steady_timer(self, 0.5, self._check_graph, callback_group=permission_group)

    def _on_permitted(self, msg: Bool, info):
        publisher, name = self._permission_names.lookup(info)
        self.permission.update(lambda lock: lock.on_permission(publisher, name, bool(msg.data), time.monotonic()))

    def _on_status(self, msg: SafetyStatus):
        self.permission.supervisor_reason = msg.reason or msg.state

    def _on_scanner(self, sample: ScannerSample):
        self.permission.update(lambda lock: lock.on_scanner(sample.publisher, sample.node, sample.phase,
                                                            sample.heartbeat, sample.received, sample.stamp_age))

    def _check_graph(self):
        """Foreign publishers that left stop blocking (the hardware node reports them to the supervisor)."""
        scanner, permission = self._scanner_names.publishers(), self._permission_names.publishers()
        self.permission.update(lambda lock: lock.on_graph(scanner, permission))

    def _on_registration(self, msg: RegistrationResult):
        if not msg.accepted:
            return  # never drive from a rejected registration
        t = msg.transform.transform
        rotation = frames.rotation_from_quaternion_xyzw([t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w])
        self.T_base_scanner = frames.make_transform(rotation, [t.translation.x, t.translation.y, t.translation.z])

    # ------------------------------------------------------------ streaming loop
    def _attach_hardware(self):
        with self._attach_lock:  # the timer and a goal thread may both try
            self._attach_hardware_locked()

    def _attach_hardware_locked(self):
        if self.loop is not None and self.hardware is not None and self.hardware.retired:
            # The hardware node was cleaned up: stop driving the old handle and look again.
            self.loop.stop()
            self.loop = None
            self.hardware = None
            self.permission.hardware = None
            with self.motion_lock:
                self.motion.hw = _NoHardware()
        if self.loop is not None and self.loop.running:
            return
        if self.loop is not None and self.loop.error is not None:
            return  # the loop died: heartbeat has stopped; the supervisor latches the fault
        hardware = shared_hardware.lookup(self.p['hardware_node'])
        if hardware is None or hardware.retired:
            return
        self.hardware = hardware
        self.permission.hardware = hardware
        with self.motion_lock:
            self.motion.hw = hardware
        # The controller servos; this loop only keeps its buffer ahead, so an ordinary thread on the
        # steady clock is enough (no busy spin, no real-time priority), provided a waiting thread gets the
        # interpreter lock soon (spinning.shorten_gil_switch_interval has the measurements).
        spinning.shorten_gil_switch_interval()
        self.loop = FixedRateLoop(self._cycle, rate_hz=self.p['stream_rate'], name='motion_stream_loop')
        self.loop.start()
        self.get_logger().info(f"trajectory streaming at {self.p['stream_rate']:g} Hz, look-ahead "
                               f"{self.p['lookahead']:g} s, on '{self.p['hardware_node']}'")

    def _cycle(self, now: float):
        with self.motion_lock:
            report = self.motion.step(now)
        self.last_report = report
        if report.tracking_fault is not None:
            self.faults.report('TRACKING_ERROR', report.tracking_fault.describe())
        if report.hardware_error and report.hardware_error != self._last_hardware_error and not self._inhibited():
            self.faults.report('HARDWARE_FAULT', report.hardware_error)   # once per distinct failure
        self._last_hardware_error = report.hardware_error
        for goal in report.finished:
            if goal.state is not GoalState.SUCCEEDED:
                stream = report.stream
                self.get_logger().warning(
                    f'{goal.goal_id} {goal.state.value}: {goal.message}' + (
                        f' [stream {stream.stream_id}: executed {stream.executed_time:.3f} s, buffered to '
                        f'{stream.buffered_until:.3f} s, underruns {stream.underruns}; host look-ahead min '
                        f'{self.motion.stats.lookahead_min:.3f} s]' if stream is not None else ''))
        if report.finished:
            with self._finished_event:
                for goal in report.finished:
                    self._finished[goal.goal_id] = goal
                self._finished_event.notify_all()
        return True

    def _inhibited(self) -> bool:
        """Is the hardware motion-inhibit asserted now? (Then the supervisor already knows why the
        motion stopped, and a hardware error is not reported again as a fault.) A fresh read."""
        if self.hardware is None:
            return False
        try:
            return bool(self.hardware.read().motion_inhibited)
        except Exception:  # noqa: BLE001 -- a failing read is itself a hardware fault, not an inhibit
            return False

    def _loop_alive(self) -> bool:
        """Heartbeat only while the streaming loop is really cycling."""
        if self.loop is None:
            return self.hardware is None  # not attached yet: alive, nothing to control
        cycles = self.loop.cycles
        alive = self.loop.running and cycles != self._last_beat_cycles
        self._last_beat_cycles = cycles
        return alive

    # ------------------------------------------------------------ goals
    def _on_goal(self, goal_request):
        with self.motion_lock:
            busy = self.motion.goals.active is not None
        if busy and self.p['goal_policy'] == 'reject':
            self._event(ProcedureEvent.WARN, 'goal_rejected', 'motion goal rejected: another motion goal is active')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _measured(self) -> np.ndarray:
        """A fresh reading (goal start is rare; the cache may predate a just-released drive inhibit)."""
        self._attach_hardware()  # a goal may arrive before the periodic look-up found the hardware
        if self.hardware is None:
            raise GoalRefused(-6, f"no hardware: '{self.p['hardware_node']}' is not configured in this process")
        try:
            return np.asarray(self.hardware.read().positions, dtype=float)
        except Exception as exc:  # noqa: BLE001 -- any failing read refuses the goal with its reason
            raise GoalRefused(-6, f'hardware read failed: {exc}') from exc

    def _point_in_base(self, point_stamped, what: str) -> np.ndarray:
        p = np.array([point_stamped.point.x, point_stamped.point.y, point_stamped.point.z], dtype=float)
        if not np.isfinite(p).all():
            raise GoalRefused(-1, f'{what} has non-finite coordinates {p.tolist()}')
        frame = point_stamped.header.frame_id or frames.BASE_FRAME
        if frame == frames.BASE_FRAME:
            return p
        if frame == frames.SCANNER_FRAME:
            if self.T_base_scanner is None:
                raise GoalRefused(-1, f'{what} is in the scanner frame but no registration has been accepted')
            return frames.apply(self.T_base_scanner, p)
        raise GoalRefused(-1, f"{what} frame '{frame}' unknown; use '{frames.BASE_FRAME}' or '{frames.SCANNER_FRAME}'")

    def _move_waypoint(self, goal) -> np.ndarray:
        entry = self._point_in_base(goal.entry, 'entry')
        target = self._point_in_base(goal.target, 'target')
        try:
            solution = self.kinematics.inverse(entry, target)
        except ValueError as exc:
            raise GoalRefused(-1, f'invalid needle line: {exc}') from exc
        if not solution.reachable:
            raise GoalRefused(-2, 'unreachable: ' + '; '.join(v.reason for v in solution.violations))
        measured = self._measured()
        insertion = measured[-1]
        if insertion > self.p['max_guide_move_insertion']:
            raise GoalRefused(-1, f'needle inserted {insertion * 1e3:.1f} mm: retract it before moving the guide')
        waypoint = np.array(solution.joints, dtype=float)
        waypoint[-1] = insertion  # align only; the needle stays where it is
        return waypoint

    def _insert_waypoint(self, goal) -> np.ndarray:
        depth = float(goal.target_depth)
        if not math.isfinite(depth):
            raise GoalRefused(-1, f'target_depth {goal.target_depth!r} is not finite')
        lower, upper = self.model.lower[-1], self.model.upper[-1]
        if not lower <= depth <= upper:
            raise GoalRefused(-2, f'target depth {depth * 1e3:.1f} mm outside the insertion range '
                                  f'[{lower * 1e3:.0f}, {upper * 1e3:.0f}] mm')
        waypoint = self._measured().copy()
        waypoint[-1] = depth
        return waypoint

    def _speed_scale(self, value: float, limit: float) -> float:
        if not math.isfinite(value) or value < 0.0:
            raise GoalRefused(-1, f'speed {value!r} must be finite and >= 0')
        return 1.0 if value == 0.0 else min(1.0, value / limit)

    def _execute_move(self, goal_handle):
        def plan():
            scale = goal_handle.request.velocity_scale
            if not math.isfinite(scale) or scale < 0.0 or scale > 1.0:
                raise GoalRefused(-1, f'velocity_scale {scale!r} must be in [0, 1]')
            return self._move_waypoint(goal_handle.request), (scale or 1.0)
        return self._run_goal(goal_handle, MoveGuide, 'move_guide', plan)

    def _execute_insert(self, goal_handle):
        def plan():
            return (self._insert_waypoint(goal_handle.request),
                    self._speed_scale(goal_handle.request.max_velocity, self.model.velocity[-1]))
        return self._run_goal(goal_handle, InsertNeedle, 'insert_needle', plan)

    def _run_goal(self, goal_handle, action, kind: str, plan):
        goal_id = f'{kind}-{next(self._goal_counter)}'
        result = action.Result()
        try:
            waypoint, scale = plan()
        except GoalRefused as refused:
            return self._refuse(goal_handle, result, refused.code, str(refused), kind)
        with self.motion_lock:
            decision = self.motion.submit(goal_id, waypoint, time.monotonic(), speed_scale=scale)
        if not decision.accepted:
            return self._refuse(goal_handle, result, _RESULT_CODES[decision.code], decision.message, kind)
        self._event(ProcedureEvent.INFO, f'{kind}_started', f'{kind} started ({goal_id})',
                    target=np.round(waypoint, 6).tolist())
        finished = self._wait_finished(goal_handle, goal_id, action, waypoint)
        result.error_code = _RESULT_CODES.get(finished.result_code, -6)
        result.message = finished.message
        measured = self._measured()
        self._fill_result(result, action, measured, waypoint)
        if finished.state is GoalState.SUCCEEDED:
            goal_handle.succeed()
        elif finished.state is GoalState.CANCELED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        severity = ProcedureEvent.INFO if finished.state is GoalState.SUCCEEDED else ProcedureEvent.WARN
        self._event(severity, f'{kind}_{finished.state.value.lower()}', f'{kind} {finished.state.value}: '
                    f'{result.message}', error_code=int(result.error_code))
        return result

    def _refuse(self, goal_handle, result, code: int, message: str, kind: str):
        result.error_code = code
        result.message = message
        goal_handle.abort()
        self._event(ProcedureEvent.WARN, f'{kind}_refused', f'{kind} refused: {message}', error_code=code)
        return result

    def _wait_finished(self, goal_handle, goal_id, action, waypoint):
        period = 1.0 / self.p['feedback_rate']
        cancel_sent = False
        while True:
            with self._finished_event:
                self._finished_event.wait_for(lambda: goal_id in self._finished, timeout=period)
                finished = self._finished.pop(goal_id, None)
            if finished is not None:
                return finished
            if goal_handle.is_cancel_requested and not cancel_sent:
                with self.motion_lock:
                    self.motion.cancel(goal_id, time.monotonic())
                cancel_sent = True
            if self.loop is not None and not self.loop.running:
                # The loop died: the goal can never finish. Stop the controller now rather than
                # letting it run its buffer dry (it would stop on the underrun by itself).
                with self.motion_lock:
                    goal = self.motion.goals.get(goal_id)
                    if goal is not None and not goal.done:
                        try:
                            self.motion.hw.stop()
                        except HardwareError as exc:
                            self.get_logger().error(f'stop after the streaming loop died failed: {exc}')
                        goal = self.motion.goals.finish(goal_id, GoalState.ABORTED, ResultCode.ABORTED_HARDWARE,
                                                        f'streaming loop stopped: {self.loop.error}',
                                                        time.monotonic())
                return goal
            self._publish_feedback(goal_handle, action, waypoint)

    def _publish_feedback(self, goal_handle, action, waypoint):
        report = self.last_report
        if report is None or report.measured is None:
            return
        feedback = action.Feedback()
        feedback.progress = float(report.progress)     # of the trajectory, on the controller's stream time
        if action is MoveGuide:
            feedback.positions = report.measured.tolist()
            feedback.time_remaining = float(report.time_remaining)
            feedback.state = {ExecutorMode.STOPPING: 'stopping', ExecutorMode.IDLE: 'holding'}.get(report.mode,
                                                                                                   'moving')
        else:
            feedback.depth = float(report.measured[-1])
            commanded = report.commanded if report.commanded is not None else waypoint
            feedback.tip_error = float(commanded[-1] - report.measured[-1])
        goal_handle.publish_feedback(feedback)

    def _fill_result(self, result, action, measured, waypoint):
        if action is MoveGuide:
            result.final_positions = measured.tolist()
            result.final_error = float(np.max(np.abs(measured[:-1] - waypoint[:-1])))
        else:
            result.depth = float(measured[-1])
            result.tip_error = float(waypoint[-1] - measured[-1])

    # ------------------------------------------------------------ reporting
    def _event(self, severity, kind, description, **values):
        self.events.publish(common.make_event(self, kind, description, severity=severity, values=values,
                                              phase='CONTROL'))

    def _publish_diagnostics(self):
        # The name ends in 'control loop' (keys rate_hz, cycles, overruns, period_error_*) for the
        # existing readers (bench/interlock.py); the figures are those of the streaming cycle.
        name = 'trajectory stream control loop'
        if self.loop is None:
            status = common.diagnostic_status(self, name, DiagnosticStatus.WARN, 'waiting for the hardware node', {})
        else:
            running = self.loop.running
            status = common.diagnostic_status(
                self, name, DiagnosticStatus.OK if running else DiagnosticStatus.ERROR,
                'running' if running else f'stopped: {self.loop.error}', self.stream_figures())
        self.diagnostics.publish(common.diagnostic_array(self, [status]))

    def stream_figures(self) -> dict:
        """Host streaming cycle and controller buffer figures (diagnostics, bench/streaming.py)."""
        figures = {}
        if self.loop is not None:
            stats = self.loop.stats()
            figures.update({'rate_hz': stats.rate_hz, 'cycles': stats.cycles, 'overruns': stats.overruns,
                            'period_error_p99_s': stats.period_error_p99,
                            'period_error_max_s': stats.period_error_max,
                            'max_step_duration_s': stats.max_step_duration})
        with self.motion_lock:
            s = self.motion.stats
            figures.update({'moves': s.moves, 'points': s.points, 'underruns': s.underruns,
                            'controller_stops': s.controller_stops,
                            'lookahead_min_s': s.lookahead_min if s.moves else 0.0})
        report = self.last_report
        figures['lookahead_s'] = report.stream.lookahead if report is not None and report.stream else 0.0
        return figures

    def loop_stats(self):
        return self.loop.stats() if self.loop is not None else None

    def describe_state(self) -> str:
        mode = self.last_report.mode.value if self.last_report is not None else 'no hardware'
        stats = self.loop_stats()
        loop = (f'{stats.cycles} stream cycles, period error p99 {stats.period_error_p99 * 1e3:.3f} ms'
                if stats else 'streaming not started')
        return f'{mode}; {loop}; permitted={self.permission.motion_permitted}'

    def on_bringup_shutdown(self):
        if self.loop is not None:
            self.loop.stop()

    def destroy_node(self):
        self._scanner_relay.unsubscribe(self._on_scanner)
        self.on_bringup_shutdown()
        return super().destroy_node()


class _NoHardware:
    """Placeholder until the hardware node is found: every access fails with a clear reason."""

    def read(self, *args, **kwargs):
        raise HardwareError('no hardware attached to the motion controller yet')

    stop = begin_stream = push_points = stream_status = read


def main(args=None) -> int:
    """Host the hardware node and the motion controller in one process (one owner of the serial port)."""
    from igt_robot.nodes.hardware_node import HardwareNode, autostart_when_spinning

    def build():
        hardware = HardwareNode()
        autostart_when_spinning(hardware)
        return [hardware, MotionControllerNode()]
    # Threads: each blocked action goal holds one, the streaming loop has its own; keep callbacks flowing.
    return common.run_node(build, threads=6)


if __name__ == '__main__':
    sys.exit(main())
