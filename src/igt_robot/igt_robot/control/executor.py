"""Streaming motion executor: plans a goal's trajectory and keeps the controller's PVT buffer ahead.

The motor controller interpolates and servos at its own rate, and stops *itself*
(ramp at its own deceleration limits) on STOP, inhibit, its scanner-trigger
input, watchdog expiry or buffer underrun. The host therefore only has to keep
the controller's buffer filled ahead of time: :meth:`StreamingExecutor.step`
runs at 50-100 Hz, is given ``now`` (monotonic s) and does, per call:

1. ``hardware.read()`` (positions + the stream status of the same reading);
   tracking check of the measured positions against the trajectory *at the
   controller's executed stream time*, so a late host cycle never looks like a
   drive falling behind.
2. Start a waiting goal when motion is permitted and the controller has no
   active stream: plan it from the measured position (synchronised
   trapezoidal/S-curve, see :mod:`igt_robot.trajectory`), ``begin_stream`` and
   fill ``lookahead`` seconds of points.
3. While moving: on cancel/preemption or permission loss call
   ``hardware.stop()`` (the controller ramps down, flushes its buffer) and wait
   for the ramp to end; if the controller stopped the stream by itself, the goal
   ends quoting its ``stop_cause``. Otherwise top the buffer up to
   ``executed_time + lookahead`` (the final point is marked ``final``).
4. When the controller reports the stream done: settle within the goal
   tolerance within ``settle_timeout``, else ABORTED_GOAL_TOLERANCE.

A host stall shorter than the buffered look-ahead changes nothing: the
controller keeps executing what it has. A longer one runs the buffer dry, which
the controller turns into a controlled stop (``UNDERRUN``); the goal ends
ABORTED_HARDWARE quoting it. The look-ahead bounds how long the robot goes on
after the host dies (before the controller's watchdog), never how long a cancel
or an interlock stop takes: those flush the buffer.

Holding means not streaming: the controller holds the final point (or where its
stop ramp ended) by itself.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..hardware.interface import HardwareError, HardwareInterface, HardwareState, PvtPoint, StreamStatus
from ..trajectory import JointLimits, Trajectory, TrajectoryError, plan_waypoints
from .goal_manager import Goal, GoalDecision, GoalManager, GoalState, ResultCode
from .tracking import TrackingFault, TrackingMonitor


class ExecutorMode(str, enum.Enum):
    IDLE = 'IDLE'            # no goal streaming; the controller holds
    MOVING = 'MOVING'        # streaming a goal's trajectory
    SETTLING = 'SETTLING'    # stream done, waiting for the measured position to reach the goal
    STOPPING = 'STOPPING'    # the controller is ramping down (stop requested, or it stopped by itself)


# Controller stop causes that are the safety interlock doing its job (no hardware fault).
INTERLOCK_STOP_CAUSES = frozenset({'INHIBIT', 'TRIGGER', 'ESTOP'})


@dataclasses.dataclass(frozen=True)
class MotionRequest:
    """What a goal asks for: waypoints (k, n) in joint order (m / rad)."""

    waypoints: np.ndarray
    profile: str = 'trapezoidal'
    speed_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Outcome of one executor cycle (plain data for the node to publish)."""

    now: float
    mode: ExecutorMode
    goal_id: Optional[str]
    progress: float                              # 0..1 of the active goal's trajectory (controller time)
    measured: Optional[np.ndarray]
    commanded: Optional[np.ndarray]              # trajectory position at the controller's executed time
    tracking_error: Optional[np.ndarray]
    finished: Tuple[Goal, ...] = ()              # goals that reached a terminal state this cycle
    tracking_fault: Optional[TrackingFault] = None
    hardware_error: Optional[str] = None
    message: str = ''
    stream: Optional[StreamStatus] = None        # the controller's buffer as read this cycle
    time_remaining: float = 0.0                  # trajectory time left, s (controller time)
    points_pushed: int = 0                       # PVT points sent this cycle


@dataclasses.dataclass
class StreamStats:
    """Host-side streaming figures since construction (for diagnostics and bench/streaming.py)."""

    moves: int = 0                               # streams begun
    points: int = 0                              # PVT points pushed
    lookahead_min: float = math.inf              # smallest look-ahead seen while points were still to send, s
    underruns_at_start: Optional[int] = None     # controller underrun counter when first seen
    underruns: int = 0                           # controller underruns since the executor first read it
    controller_stops: int = 0                    # streams the controller ended by itself


PermissionFn = Callable[[], object]


def _permission(fn: PermissionFn) -> Tuple[bool, str]:
    """Accept a bool or an object with ``motion_permitted`` and ``reason`` (a
    SafetyStatus, or the SafetySupervisor itself). The reason is only read when
    motion is not permitted."""
    value = fn()
    if hasattr(value, 'motion_permitted'):
        if value.motion_permitted:
            return True, ''
        return False, str(getattr(value, 'reason', '') or 'motion not permitted')
    return bool(value), '' if value else 'motion not permitted'


class TrajectoryStreamer:
    """Cuts a trajectory into PVT points every ``spacing`` s (stream time), the last one at its end, at rest.

    Points are produced in order, on demand, so only what the buffer can take is
    sampled. The final segment is between one and two spacings long: a grid point
    just before the end of a deceleration has a position only a few encoder counts
    from the goal but a clearly non-zero velocity, and once both are quantised for
    the wire the interpolated segment could dip past the goal -- past the joint
    limit when the goal is on it (a retracted needle).
    """

    def __init__(self, trajectory: Trajectory, spacing: float):
        if not (math.isfinite(spacing) and spacing > 0.0):
            raise ValueError(f'point spacing must be > 0 s, got {spacing!r}')
        self.trajectory = trajectory
        self.duration = float(trajectory.duration)
        self.spacing = float(spacing)
        n_grid = max(0, int(math.floor(self.duration / self.spacing - 1.0 + 1e-9)))
        self._times = np.append(np.arange(1, n_grid + 1) * self.spacing, self.duration)
        self._next = 0

    @property
    def trajectory_times(self) -> np.ndarray:
        """Stream times of every point, s."""
        return self._times

    @property
    def finished(self) -> bool:
        """The final point has been handed out."""
        return self._next >= self._times.size

    @property
    def sent_until(self) -> float:
        """Stream time of the last point handed out (0 before the first)."""
        return float(self._times[self._next - 1]) if self._next else 0.0

    def take(self, until: float, max_points: int) -> Tuple[List[PvtPoint], bool]:
        """The next points with time <= ``until`` plus one beyond it (so the buffer
        reaches at least ``until``), at most ``max_points``. Returns (points, final?)."""
        if max_points <= 0 or self.finished:
            return [], False
        stop = int(np.searchsorted(self._times, until, side='right')) + 1
        stop = min(stop, self._next + max_points, self._times.size)
        times = self._times[self._next:stop]
        self._next = stop
        q, qd, _ = self.trajectory.sample_many(times)
        points = [PvtPoint(float(t), q[i].copy(), qd[i].copy()) for i, t in enumerate(times)]
        if self.finished and points:
            last = points[-1]
            points[-1] = PvtPoint(last.time, last.positions, np.zeros_like(last.velocities))
        return points, self.finished


class StreamingExecutor:
    """Executes one goal at a time on ``hardware`` by trajectory streaming, under a permission interlock.

    ``lookahead`` (s): how far ahead of the controller's executed time the buffer
    is kept filled. ``point_spacing`` (s): stream time between PVT points.
    ``stop_timeout`` (s): how long a stop ramp may take before the controller is
    considered unresponsive.
    """

    def __init__(self, hardware: HardwareInterface, permission: PermissionFn, limits: JointLimits,
                 tracking: TrackingMonitor, goal_policy: str = 'reject',
                 goal_tolerance: Optional[Sequence[float]] = None, settle_timeout: float = 1.0,
                 default_profile: str = 'trapezoidal', lookahead: float = 0.5, point_spacing: float = 0.02,
                 stop_timeout: float = 5.0):
        if tracking.tolerance.size != limits.n_joints:
            raise ValueError('tracking monitor and joint limits disagree on the number of joints')
        if not (math.isfinite(point_spacing) and point_spacing > 0.0):
            raise ValueError(f'point_spacing must be > 0 s, got {point_spacing!r}')
        if not (math.isfinite(lookahead) and lookahead >= 2.0 * point_spacing):
            raise ValueError(f'lookahead must be >= 2 point spacings ({2.0 * point_spacing:g} s), got {lookahead!r}')
        if not (settle_timeout > 0.0):
            raise ValueError(f'settle_timeout must be > 0 s, got {settle_timeout!r}')
        if not (stop_timeout > 0.0):
            raise ValueError(f'stop_timeout must be > 0 s, got {stop_timeout!r}')
        self.hw = hardware
        self._permission_fn = permission
        self.limits = limits
        self.tracking = tracking
        self.goals = GoalManager(goal_policy)
        self.goal_tolerance = (tracking.tolerance.copy() if goal_tolerance is None
                               else np.broadcast_to(np.asarray(goal_tolerance, float), (limits.n_joints,)).copy())
        if not (np.isfinite(self.goal_tolerance).all() and (self.goal_tolerance > 0).all()):
            raise ValueError('goal_tolerance must be finite and > 0 per joint')
        self.settle_timeout = float(settle_timeout)
        self.default_profile = default_profile
        self.lookahead = float(lookahead)
        self.point_spacing = float(point_spacing)
        self.stop_timeout = float(stop_timeout)
        self.mode = ExecutorMode.IDLE
        self.stats = StreamStats()
        self._traj: Optional[Trajectory] = None
        self._streamer: Optional[TrajectoryStreamer] = None
        self._stream_id = 0
        self._settle_since = 0.0
        self._hold: Optional[np.ndarray] = None          # where the controller holds (None: re-anchor at rest)
        self._stop_since = 0.0
        self._stop_code: Optional[ResultCode] = None
        self._stop_message = ''
        self._pending_hardware_error: Optional[str] = None   # a stop that ended as a hardware fault, to report

    # ------------------------------------------------------------- commands
    def submit(self, goal_id: str, waypoints, now: float, speed_scale: float = 1.0,
               profile: Optional[str] = None) -> GoalDecision:
        """Offer a goal: one waypoint (n,) or several (k, n) in joint order.

        Validated now (shape, finite, within position limits, permission); the
        trajectory itself is planned when the goal starts, from where the robot
        then is.
        """
        n = self.limits.n_joints
        try:
            wps = np.array(waypoints, dtype=float)
        except (TypeError, ValueError):
            return GoalDecision(False, ResultCode.REJECTED_INVALID, 'waypoints are not numeric')
        if wps.ndim == 1:
            wps = wps[None, :]
        if wps.ndim != 2 or wps.shape[1] != n or wps.shape[0] == 0:
            return GoalDecision(False, ResultCode.REJECTED_INVALID,
                                f'waypoints must have shape (k, {n}), got {np.shape(waypoints)}')
        try:
            for i, wp in enumerate(wps):
                if not np.isfinite(wp).all():
                    raise TrajectoryError(f'waypoint {i} has non-finite values')
                self.limits.check_within(f'waypoint {i}', wp)
        except TrajectoryError as exc:
            return GoalDecision(False, ResultCode.REJECTED_INVALID, str(exc))
        profile = profile or self.default_profile
        if not (0.0 < speed_scale <= 1.0):
            return GoalDecision(False, ResultCode.REJECTED_INVALID, f'speed_scale {speed_scale} not in (0, 1]')
        if profile == 'scurve' and self.limits.jerk is None:
            return GoalDecision(False, ResultCode.REJECTED_INVALID, 'scurve profile needs jerk limits')
        permitted, reason = _permission(self._permission_fn)
        if not permitted:
            return GoalDecision(False, ResultCode.REJECTED_NOT_PERMITTED, reason)
        return self.goals.submit(goal_id, MotionRequest(wps, profile, float(speed_scale)), now)

    def cancel(self, goal_id: str, now: float) -> bool:
        """Request cancellation; an executing goal stops under control first."""
        return self.goals.request_cancel(goal_id, now)

    # ---------------------------------------------------------------- cycle
    def step(self, now: float) -> StepReport:
        """One streaming cycle at monotonic time ``now`` (s)."""
        finished: list = []
        try:
            state = self.hw.read()
            stream = state.stream if state.stream is not None else self._stream_status()
        except HardwareError as exc:
            return self._hardware_failure(now, f'read failed: {exc}', None, None, finished)
        measured = np.asarray(state.positions, dtype=float)
        self._count_underruns(stream)

        # 1. Tracking against the trajectory at the controller's own stream time.
        err = None
        reference = self._reference(stream)
        if reference is not None:
            fault = self.tracking.update(reference, measured)
            err = self.tracking.last_error
            if fault is not None:
                return self._tracking_failure(now, fault, measured, err, stream, finished)
        elif self.mode is ExecutorMode.IDLE and not state.moving and not (stream is not None and stream.active):
            # Re-anchor the hold check once the axes are at rest (start-up, after a stop ramp).
            self._hold = measured.copy()

        permitted, reason = _permission(self._permission_fn)
        goal = self.goals.active
        pushed = 0

        # 2. Start a waiting goal (once the controller has finished any earlier stream or ramp).
        if self.mode is ExecutorMode.IDLE and goal is not None and goal.state is GoalState.ACCEPTED:
            if not permitted:
                finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK,
                                                  f'not started: {reason}', now))
            elif stream is None or not stream.active:
                failure = self._start(goal, state, now, finished)
                if failure is not None:
                    return self._hardware_failure(now, failure, measured, stream, finished, err)
                if self.mode is ExecutorMode.MOVING:
                    pushed, failure = self._top_up(stream, fresh=True)
                    if failure is not None:
                        return self._push_failure(now, failure, measured, err, finished)
            elif now - goal.accepted_at > self.stop_timeout:
                finished.append(self.goals.finish(
                    goal.goal_id, GoalState.ABORTED, ResultCode.ABORTED_HARDWARE,
                    f'not started: the controller still runs stream {stream.stream_id} after '
                    f'{self.stop_timeout:g} s', now))
            goal = self.goals.active

        # 3. Keep streaming, or stop.
        elif self.mode in (ExecutorMode.MOVING, ExecutorMode.SETTLING):
            if self._stream_id and not (stream is not None and stream.stream_id == self._stream_id):
                return self._hardware_failure(now, f'the controller lost stream {self._stream_id} '
                                              f'(now reports stream {stream.stream_id if stream else None})',
                                              measured, stream, finished, err)
            if self.mode is ExecutorMode.MOVING and stream.stop_cause:
                self._controller_stopped(now, stream.stop_cause, '' if permitted else reason)
            elif goal.state is GoalState.CANCELING:
                code = goal.cancel_code or ResultCode.CANCELED
                if self.mode is ExecutorMode.SETTLING:
                    # Already at the end of the trajectory: nothing left to stop.
                    self._finish(now, GoalState.CANCELED, code, 'canceled at the end of the motion', finished,
                                 hold=self._traj.end_positions)
                else:
                    self._request_stop(now, code, 'preempted by a newer goal' if code is ResultCode.PREEMPTED
                                       else 'canceled on request')
            elif self.mode is ExecutorMode.MOVING and not permitted:
                self._request_stop(now, ResultCode.ABORTED_INTERLOCK, f'stopped by interlock: {reason}')
            elif self.mode is ExecutorMode.MOVING:
                if stream.done:
                    self.mode = ExecutorMode.SETTLING
                    self._settle_since = now
                else:
                    pushed, failure = self._top_up(stream)
                    if failure is not None:
                        return self._push_failure(now, failure, measured, err, finished)
            if self.mode is ExecutorMode.SETTLING:
                # Permission may drop now without a stop: the trajectory has ended, nothing moves.
                self._settle(now, measured, finished)

        if self.mode is ExecutorMode.STOPPING:
            if not permitted and self._stop_code is ResultCode.ABORTED_INTERLOCK and reason not in self._stop_message:
                # The controller's inhibit usually comes one hop before the supervisor's verdict.
                self._stop_message += f' ({reason})'
            failure = self._wait_stopped(now, state, stream, finished)
            if failure is not None:
                return self._hardware_failure(now, failure, measured, stream, finished, err)
        return self._report(now, measured, reference, err, finished, stream=stream, pushed=pushed)

    # ------------------------------------------------------------ internals
    def _stream_status(self) -> Optional[StreamStatus]:
        try:
            return self.hw.stream_status()
        except NotImplementedError:
            return None

    def _count_underruns(self, stream: Optional[StreamStatus]) -> None:
        if stream is None:
            return
        if self.stats.underruns_at_start is None:
            self.stats.underruns_at_start = stream.underruns
        self.stats.underruns = stream.underruns - self.stats.underruns_at_start

    def _reference(self, stream: Optional[StreamStatus]) -> Optional[np.ndarray]:
        """Where the axes should be now: the trajectory at the controller's executed stream time.

        None while the controller runs its own stop ramp (it checks its following
        error itself; the host does not know the ramp's exact shape) and before the
        hold position is known."""
        if self.mode in (ExecutorMode.MOVING, ExecutorMode.SETTLING):
            ours = stream is not None and stream.stream_id == self._stream_id
            if ours and stream.stop_cause:
                return None     # the controller has left the trajectory for its own stop ramp
            return self._traj.sample(stream.executed_time if ours else 0.0).positions
        if self.mode is ExecutorMode.IDLE:
            return self._hold
        return None

    def _start(self, goal: Goal, state: HardwareState, now: float, finished: list) -> Optional[str]:
        """Plan the goal and open its stream. Returns a hardware failure message, or None."""
        req: MotionRequest = goal.request
        measured = np.asarray(state.positions, dtype=float)
        start = measured
        if self.limits.lower is not None:
            # A drive that settled a few encoder counts past a limit (inside the goal tolerance) starts
            # from the limit: otherwise every later goal would be refused and the robot stuck there.
            clipped = np.clip(measured, self.limits.lower, self.limits.upper)
            start = np.where(np.abs(clipped - measured) <= self.goal_tolerance, clipped, measured)
        self.goals.start(goal.goal_id, now)
        try:
            traj = plan_waypoints(start, req.waypoints, self.limits, req.profile, req.speed_scale)
        except TrajectoryError as exc:
            finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED, ResultCode.ABORTED_INVALID,
                                              f'planning failed: {exc}', now))
            return None
        self._traj = traj
        self.tracking.reset()
        if traj.duration <= 0.0:
            # Already there: nothing to stream.
            self._stream_id = 0
            self.mode = ExecutorMode.SETTLING
            self._settle_since = now
            return None
        try:
            self._stream_id = int(self.hw.begin_stream(traj.start_positions))
        except (HardwareError, NotImplementedError) as exc:
            if state.motion_inhibited:
                # The controller's own interlock (host inhibit or its scanner-trigger input) refused it.
                cause = f' ({state.inhibit_cause})' if state.inhibit_cause else ''
                self._finish(now, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK,
                             f"not started: the controller's motion inhibit is engaged{cause}: {exc}", finished,
                             hold=None)
                return None
            return f'stream refused: {exc}'
        self._streamer = TrajectoryStreamer(traj, self.point_spacing)
        self.stats.moves += 1
        self.mode = ExecutorMode.MOVING
        return None

    def _top_up(self, stream: Optional[StreamStatus], fresh: bool = False) -> Tuple[int, Optional[Exception]]:
        """Push points until the buffer reaches ``executed_time + lookahead`` (or the end).

        Returns (points pushed, the exception if the controller refused them)."""
        streamer = self._streamer
        if streamer is None or streamer.finished:
            return 0, None
        executed = 0.0 if fresh or stream is None else stream.executed_time
        if not fresh and stream is not None:
            self.stats.lookahead_min = min(self.stats.lookahead_min, max(0.0, streamer.sent_until - executed))
        if fresh:   # a stream just opened: its free slots are not in this cycle's reading
            stream = self._stream_status_safe()
        room = stream.free_slots if stream is not None else len(streamer.trajectory_times)
        points, final = streamer.take(executed + self.lookahead, room)
        if not points:
            return 0, None
        try:
            self.hw.push_points(self._stream_id, points, final=final)
        except (HardwareError, NotImplementedError) as exc:
            return 0, exc
        self.stats.points += len(points)
        return len(points), None

    def _push_failure(self, now, exc, measured, err, finished) -> StepReport:
        """Points refused: if the controller has stopped the stream itself, that is why; else a hardware fault."""
        stream = self._stream_status_safe()
        if stream is not None and stream.stream_id == self._stream_id and stream.stop_cause:
            self._controller_stopped(now, stream.stop_cause)
            return self._report(now, measured, None, err, finished, stream=stream)
        return self._hardware_failure(now, f'points refused: {exc}', measured, stream, finished, err)

    def _stream_status_safe(self) -> Optional[StreamStatus]:
        try:
            return self._stream_status()
        except HardwareError:
            return None

    def _request_stop(self, now: float, code: ResultCode, message: str) -> None:
        """Ask the controller for its controlled stop (ramp at its deceleration limits, buffer flushed)."""
        self._enter_stopping(now, code, message)
        try:
            self.hw.stop()
        except HardwareError as exc:
            # The controller did not take the STOP: the hardware node's inhibit and the
            # controller's watchdog/underrun are the remaining lines; report it.
            self._stop_message += f'; STOP refused: {exc}'

    def _controller_stopped(self, now: float, cause: str, reason: str = '') -> None:
        """The controller ended our stream by itself (its stop ramp is running or done).
        ``reason``: why motion is not permitted, if it is not (the likely cause of an INHIBIT)."""
        if self.mode is ExecutorMode.STOPPING:
            return
        self.stats.controller_stops += 1
        if cause in INTERLOCK_STOP_CAUSES:
            code = ResultCode.ABORTED_INTERLOCK
        else:   # UNDERRUN, WATCHDOG, FAULT, LIMIT, or a STOP this executor did not send
            code = ResultCode.ABORTED_HARDWARE
        self._enter_stopping(now, code, f'the controller stopped the stream itself: {cause}'
                             + (f' ({reason})' if reason else ''))
        goal = self.goals.active
        if goal is not None and goal.state is GoalState.CANCELING:
            self._stop_message += ' (while canceling)'

    def _enter_stopping(self, now: float, code: ResultCode, message: str) -> None:
        self.mode = ExecutorMode.STOPPING
        self._stop_since = now
        self._stop_code = code
        self._stop_message = message
        self._streamer = None

    def _wait_stopped(self, now, state, stream, finished) -> Optional[str]:
        """Finish the goal once the controller's ramp has ended. Returns a failure message on timeout."""
        ours = stream is not None and stream.stream_id == self._stream_id
        # The controller says when its ramp has ended (the stream is no longer active); the
        # host's own velocity estimate is only used for a backend that reports no stream.
        at_rest = not stream.active if ours else not state.moving
        if at_rest:
            if ours and stream.stop_cause and stream.stop_cause not in self._stop_message:
                self._stop_message += f' (controller stop cause: {stream.stop_cause})'
            faults = [f for f in state.faults if f not in self._stop_message]
            if faults:
                self._stop_message += f" (controller faults: {', '.join(faults)})"
            code = self._stop_code
            goal = self.goals.active
            if code in (ResultCode.CANCELED, ResultCode.PREEMPTED) and goal is not None \
                    and goal.state is GoalState.CANCELING:
                goal_state = GoalState.CANCELED
            else:
                goal_state = GoalState.ABORTED
            hardware_error = self._stop_message if code is ResultCode.ABORTED_HARDWARE else None
            self._finish(now, goal_state, code, self._stop_message + '; holding', finished, hold=None)
            self._pending_hardware_error = hardware_error
            return None
        if now - self._stop_since > self.stop_timeout:
            return (f'{self._stop_message}; the controller did not come to rest within '
                    f'{self.stop_timeout:g} s of the stop')
        return None

    def _settle(self, now: float, measured: np.ndarray, finished: list) -> None:
        target = self._traj.end_positions
        if (np.abs(measured - target) <= self.goal_tolerance).all():
            self._finish(now, GoalState.SUCCEEDED, ResultCode.SUCCEEDED, 'goal reached', finished, hold=target)
        elif now - self._settle_since > self.settle_timeout:
            worst = int(np.argmax(np.abs(measured - target) / self.goal_tolerance))
            self._finish(now, GoalState.ABORTED, ResultCode.ABORTED_GOAL_TOLERANCE,
                         f'{self.limits.joint_names[worst]} did not settle within '
                         f'{self.goal_tolerance[worst]:g} of the goal in {self.settle_timeout:g} s '
                         f'(error {measured[worst] - target[worst]:+.5f})', finished, hold=target)

    def _finish(self, now: float, state: GoalState, code: ResultCode, message: str, finished: list,
                hold: Optional[np.ndarray]) -> None:
        goal = self.goals.active
        if goal is not None:
            finished.append(self.goals.finish(goal.goal_id, state, code, message, now))
        self.mode = ExecutorMode.IDLE
        self._hold = None if hold is None else np.array(hold, dtype=float)
        self.tracking.reset()
        self._traj = None
        self._streamer = None
        self._stop_code = None

    def _safe_hw_stop(self) -> str:
        try:
            self.hw.stop()
            return ''
        except HardwareError as exc:
            return f'; hardware stop failed: {exc}'

    def _hardware_failure(self, now, message, measured, stream, finished, err=None) -> StepReport:
        message += self._safe_hw_stop()
        goal = self.goals.active
        hardware_error = message
        if goal is not None and goal.state in (GoalState.EXECUTING, GoalState.CANCELING):
            code, state = ResultCode.ABORTED_HARDWARE, GoalState.ABORTED
            if self.mode is ExecutorMode.STOPPING and self._stop_code is not None \
                    and self._stop_code is not ResultCode.ABORTED_HARDWARE:
                # Already stopping for an interlock/cancel: that stays the result.
                code = self._stop_code
                if code in (ResultCode.CANCELED, ResultCode.PREEMPTED) and goal.state is GoalState.CANCELING:
                    state = GoalState.CANCELED
                message = f'{self._stop_message}; {message}'
            finished.append(self.goals.finish(goal.goal_id, state, code, message, now))
        self._reset_motion()
        return self._report(now, measured, None, err, finished, hardware_error=hardware_error, message=message,
                            stream=stream)

    def _tracking_failure(self, now, fault, measured, err, stream, finished):
        message = f'tracking error: {fault.describe()}' + self._safe_hw_stop()
        goal = self.goals.active
        if goal is not None and goal.state in (GoalState.EXECUTING, GoalState.CANCELING):
            finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED,
                                              ResultCode.ABORTED_TRACKING_ERROR, message, now))
        self._reset_motion()
        report = self._report(now, measured, None, err, finished, message=message, stream=stream)
        return dataclasses.replace(report, tracking_fault=fault)

    def _reset_motion(self) -> None:
        # After a hardware-level stop we do not know where the axes will come to
        # rest: hold wherever the next reading at rest says.
        self.mode = ExecutorMode.IDLE
        self._traj = None
        self._streamer = None
        self._hold = None
        self._stop_code = None
        self.tracking.reset()

    def _report(self, now, measured, reference, err, finished, hardware_error=None, message='',
                stream=None, pushed=0):
        goal = self.goals.active
        progress, remaining = 0.0, 0.0
        if self._traj is not None and self.mode in (ExecutorMode.MOVING, ExecutorMode.SETTLING):
            t = stream.executed_time if stream is not None and stream.stream_id == self._stream_id else 0.0
            if self.mode is ExecutorMode.SETTLING or self._traj.duration <= 0:
                progress = 1.0
            else:
                progress = min(1.0, max(0.0, t / self._traj.duration))
            remaining = max(0.0, self._traj.duration - t) if self.mode is ExecutorMode.MOVING else 0.0
        if hardware_error is None and self._pending_hardware_error is not None:
            hardware_error = self._pending_hardware_error
        self._pending_hardware_error = None
        return StepReport(now=now, mode=self.mode, goal_id=goal.goal_id if goal else None,
                          progress=progress, measured=measured, commanded=reference,
                          tracking_error=err, finished=tuple(finished),
                          hardware_error=hardware_error, message=message, stream=stream,
                          time_remaining=remaining, points_pushed=pushed)
