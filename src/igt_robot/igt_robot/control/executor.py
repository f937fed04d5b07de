"""Motion executor: plays trajectories on a HardwareInterface one cycle at a time.

:meth:`MotionExecutor.step` is the whole control cycle and is pure with respect
to threads and clocks: it is given ``now`` (monotonic s), reads the hardware
once, decides, writes at most one setpoint and returns a :class:`StepReport`.
A :class:`~igt_robot.control.loop.FixedRateLoop` (or a test) owns the timing.

Per cycle:

1. ``hardware.read()``; tracking check of the measured positions against the
   setpoint written in the previous cycle (also while holding still).
2. If a goal waits and motion is permitted, plan it from the measured position
   (rest-to-rest waypoints, synchronised joints) and start.
3. While moving: if the permission callable says no, or the goal is being
   canceled/preempted, switch to a controlled stop planned from the last
   commanded (position, velocity) -- the state the drives are actually tracking
   -- and play it to rest. Then hold and finish the goal as ABORTED_INTERLOCK
   (with the supervisor's reason) or CANCELED / PREEMPTED.
4. On a tracking fault or a hardware error: ``hardware.stop()`` (the drive
   brakes on its own, because our setpoints are evidently not being followed)
   and abort the goal; the report carries the fault for the safety supervisor.

Holding means *not writing*: the drives hold their last setpoint by themselves,
so a stopped executor sends nothing that could move the robot.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from ..hardware.interface import HardwareError, HardwareInterface
from ..trajectory import (JointLimits, Trajectory, TrajectoryError, TrajectorySample,
                          plan_controlled_stop, plan_waypoints)
from .goal_manager import Goal, GoalDecision, GoalManager, GoalState, ResultCode
from .tracking import TrackingFault, TrackingMonitor


class ExecutorMode(str, enum.Enum):
    IDLE = 'IDLE'            # no goal; holding (no writes)
    MOVING = 'MOVING'        # playing a goal's trajectory
    SETTLING = 'SETTLING'    # trajectory done, waiting for the measured position to reach the goal
    STOPPING = 'STOPPING'    # playing a controlled stop


@dataclasses.dataclass(frozen=True)
class MotionRequest:
    """What a goal asks for: waypoints (k, n) in joint order (m / rad)."""

    waypoints: np.ndarray
    profile: str = 'trapezoidal'
    speed_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Outcome of one control cycle (plain data for the node to publish)."""

    now: float
    mode: ExecutorMode
    goal_id: Optional[str]
    progress: float                              # 0..1 of the active goal's trajectory time
    measured: Optional[np.ndarray]
    commanded: Optional[np.ndarray]              # setpoint written this cycle (None = no write)
    tracking_error: Optional[np.ndarray]
    finished: Tuple[Goal, ...] = ()              # goals that reached a terminal state this cycle
    tracking_fault: Optional[TrackingFault] = None
    hardware_error: Optional[str] = None
    message: str = ''


PermissionFn = Callable[[], object]


def _permission(fn: PermissionFn) -> Tuple[bool, str]:
    """Accept a bool or an object with ``motion_permitted`` and ``reason`` (a
    SafetyStatus, or the SafetySupervisor itself, which is cheaper per cycle).
    The reason is only read when motion is not permitted."""
    value = fn()
    if hasattr(value, 'motion_permitted'):
        if value.motion_permitted:
            return True, ''
        return False, str(getattr(value, 'reason', '') or 'motion not permitted')
    return bool(value), '' if value else 'motion not permitted'


class MotionExecutor:
    """Executes one goal at a time on ``hardware`` under a permission interlock."""

    def __init__(self, hardware: HardwareInterface, permission: PermissionFn, limits: JointLimits,
                 tracking: TrackingMonitor, goal_policy: str = 'reject',
                 goal_tolerance: Optional[Sequence[float]] = None, settle_timeout: float = 1.0,
                 stop_synchronized: bool = False, default_profile: str = 'trapezoidal'):
        if tracking.tolerance.size != limits.n_joints:
            raise ValueError('tracking monitor and joint limits disagree on the number of joints')
        self.hw = hardware
        self._permission_fn = permission
        self.limits = limits
        self.tracking = tracking
        self.goals = GoalManager(goal_policy)
        self.goal_tolerance = (tracking.tolerance.copy() if goal_tolerance is None
                               else np.broadcast_to(np.asarray(goal_tolerance, float), (limits.n_joints,)).copy())
        if not (np.isfinite(self.goal_tolerance).all() and (self.goal_tolerance > 0).all()):
            raise ValueError('goal_tolerance must be finite and > 0 per joint')
        if not (settle_timeout > 0.0):
            raise ValueError(f'settle_timeout must be > 0 s, got {settle_timeout!r}')
        self.settle_timeout = float(settle_timeout)
        self.stop_synchronized = bool(stop_synchronized)
        self.default_profile = default_profile
        self.mode = ExecutorMode.IDLE
        self._traj: Optional[Trajectory] = None
        self._t0 = 0.0
        self._settle_since = 0.0
        self._last_cmd: Optional[TrajectorySample] = None   # last setpoint written
        self._last_cmd_time = 0.0
        self._hold: Optional[np.ndarray] = None             # position the drives hold
        self._stop_code: Optional[ResultCode] = None
        self._stop_message = ''

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
        """One control cycle at monotonic time ``now`` (s)."""
        finished = []
        try:
            state = self.hw.read()
        except HardwareError as exc:
            return self._hardware_failure(now, f'read failed: {exc}', None, finished)
        measured = np.asarray(state.positions, dtype=float)

        # 1. Tracking against the setpoint the drives were following.
        reference = self._last_cmd.positions if self._last_cmd is not None else self._hold
        err = None
        if reference is not None:
            fault = self.tracking.update(reference, measured)
            err = self.tracking.last_error
            if fault is not None:
                return self._tracking_failure(now, fault, measured, err, finished)
        elif not state.moving:
            # Re-anchor the hold check once the drive is at rest (after start-up
            # or after a hardware-level stop whose end point we do not know).
            self._hold = measured.copy()

        permitted, reason = _permission(self._permission_fn)
        goal = self.goals.active

        # 2. Start a waiting goal.
        if self.mode is ExecutorMode.IDLE and goal is not None and goal.state is GoalState.ACCEPTED:
            if not permitted:
                finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK,
                                                  f'not started: {reason}', now))
            else:
                self._start(goal, measured, now, finished)
            goal = self.goals.active

        # 3. Play the active motion.
        commanded = None
        if self.mode is ExecutorMode.MOVING:
            if goal.state is GoalState.CANCELING:
                code = goal.cancel_code or ResultCode.CANCELED
                self._begin_stop(now, code, 'preempted by a newer goal' if code is ResultCode.PREEMPTED
                                 else 'canceled on request')
            elif not permitted:
                self._begin_stop(now, ResultCode.ABORTED_INTERLOCK, f'stopped by interlock: {reason}')
            else:
                commanded, ended, failure = self._play(now, measured, err, finished)
                if failure is not None:
                    return failure
                if ended:
                    self.mode = ExecutorMode.SETTLING
                    self._settle_since = now
        if self.mode is ExecutorMode.STOPPING:
            commanded, ended, failure = self._play(now, measured, err, finished)
            if failure is not None:
                return failure
            if ended:
                self._end_stop(now, finished)
        elif self.mode is ExecutorMode.SETTLING:
            goal = self.goals.active
            target = self._traj.end_positions
            if goal.state is GoalState.CANCELING:
                # Already at the end of the trajectory: nothing left to stop.
                code = goal.cancel_code or ResultCode.CANCELED
                self._finish(now, GoalState.CANCELED, code, 'canceled at the end of the motion', finished)
            elif (np.abs(measured - target) <= self.goal_tolerance).all():
                self._finish(now, GoalState.SUCCEEDED, ResultCode.SUCCEEDED, 'goal reached', finished)
            elif now - self._settle_since > self.settle_timeout:
                worst = int(np.argmax(np.abs(measured - target) / self.goal_tolerance))
                self._finish(now, GoalState.ABORTED, ResultCode.ABORTED_GOAL_TOLERANCE,
                             f'{self.limits.joint_names[worst]} did not settle within '
                             f'{self.goal_tolerance[worst]:g} of the goal in {self.settle_timeout:g} s '
                             f'(error {measured[worst] - target[worst]:+.5f})', finished)
        return self._report(now, measured, commanded, err, finished)

    # ------------------------------------------------------------ internals
    def _start(self, goal: Goal, measured: np.ndarray, now: float, finished: list) -> None:
        req: MotionRequest = goal.request
        start = measured
        if self.limits.lower is not None:
            # A drive that settled a few encoder counts past a limit (inside the goal tolerance) starts
            # from the limit: otherwise every later goal would be refused and the robot stuck there.
            clipped = np.clip(measured, self.limits.lower, self.limits.upper)
            start = np.where(np.abs(clipped - measured) <= self.goal_tolerance, clipped, measured)
        try:
            traj = plan_waypoints(start, req.waypoints, self.limits, req.profile, req.speed_scale)
        except TrajectoryError as exc:
            self.goals.start(goal.goal_id, now)
            finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED, ResultCode.ABORTED_INVALID,
                                              f'planning failed: {exc}', now))
            return
        self.goals.start(goal.goal_id, now)
        self._traj = traj
        self._t0 = now
        self.mode = ExecutorMode.MOVING
        self.tracking.reset()

    def _begin_stop(self, now: float, code: ResultCode, message: str) -> None:
        cmd = self._last_cmd
        t0 = self._last_cmd_time
        if cmd is None:   # nothing commanded yet: we are at rest where we started
            cmd, t0 = self._traj.sample(0.0), now
        # Brake from the state the drives are tracking, continuing in time from
        # the last setpoint so this cycle's setpoint already decelerates.
        self._traj = plan_controlled_stop(cmd.positions, cmd.velocities, self.limits, self.stop_synchronized)
        self._t0 = t0
        self.mode = ExecutorMode.STOPPING
        self._stop_code = code
        self._stop_message = message

    def _end_stop(self, now: float, finished: list) -> None:
        code = self._stop_code
        state = GoalState.CANCELED if code in (ResultCode.CANCELED, ResultCode.PREEMPTED) else GoalState.ABORTED
        self._finish(now, state, code, self._stop_message + '; holding', finished)

    def _finish(self, now: float, state: GoalState, code: ResultCode, message: str, finished: list) -> None:
        goal = self.goals.active
        if goal is not None:
            finished.append(self.goals.finish(goal.goal_id, state, code, message, now))
        self.mode = ExecutorMode.IDLE
        if self._last_cmd is not None:
            self._hold = self._last_cmd.positions.copy()
        self._last_cmd = None
        self._traj = None
        self._stop_code = None

    def _play(self, now: float, measured, err, finished):
        """Write the current trajectory's setpoint for ``now``.

        Returns (commanded positions, trajectory time over?, failure report or None).
        """
        sample = self._traj.sample(now - self._t0)
        failure = self._write(sample, now, measured, err, finished)
        if failure is not None:
            return None, False, failure
        return sample.positions, now - self._t0 >= self._traj.duration, None

    def _write(self, sample: TrajectorySample, now: float, measured, err, finished) -> Optional[StepReport]:
        """Write one setpoint; on refusal return the failure report, else None."""
        try:
            self.hw.write(sample.positions, sample.velocities)
        except HardwareError as exc:
            # Refused (e.g. the hardware motion inhibit engaged) or failed: let
            # the drive brake by itself and give up the goal.
            return self._hardware_failure(now, f'setpoint refused: {exc}', measured, finished, err)
        self._last_cmd = sample
        self._last_cmd_time = now
        return None

    def _safe_hw_stop(self) -> str:
        try:
            self.hw.stop()
            return ''
        except HardwareError as exc:
            return f'; hardware stop failed: {exc}'

    def _hardware_failure(self, now, message, measured, finished, err=None) -> StepReport:
        message += self._safe_hw_stop()
        goal = self.goals.active
        hardware_error = message
        if goal is not None and goal.state in (GoalState.EXECUTING, GoalState.CANCELING):
            code, state = ResultCode.ABORTED_HARDWARE, GoalState.ABORTED
            if self.mode is ExecutorMode.STOPPING and self._stop_code is not None:
                # Already stopping for an interlock/cancel: a refused setpoint is
                # then expected (hardware inhibit); the stop cause stays the result.
                code = self._stop_code
                if code in (ResultCode.CANCELED, ResultCode.PREEMPTED):
                    state = GoalState.CANCELED
                message = f'{self._stop_message}; drive braked on its own ({message})'
                hardware_error = None if code is not ResultCode.ABORTED_HARDWARE else message
            finished.append(self.goals.finish(goal.goal_id, state, code, message, now))
        self._reset_motion()
        return self._report(now, measured, None, err, finished, hardware_error=hardware_error, message=message)

    def _tracking_failure(self, now, fault, measured, err, finished):
        message = f'tracking error: {fault.describe()}' + self._safe_hw_stop()
        goal = self.goals.active
        if goal is not None and goal.state in (GoalState.EXECUTING, GoalState.CANCELING):
            finished.append(self.goals.finish(goal.goal_id, GoalState.ABORTED,
                                              ResultCode.ABORTED_TRACKING_ERROR, message, now))
        self._reset_motion()
        report = self._report(now, measured, None, err, finished, message=message)
        report = dataclasses.replace(report, tracking_fault=fault)
        # Re-arm on the position where the drive braked to: holding is checked afresh.
        self.tracking.reset()
        return report

    def _reset_motion(self) -> None:
        # After a hardware-level stop we do not know where the drive will come
        # to rest: hold wherever the next reading says.
        self.mode = ExecutorMode.IDLE
        self._traj = None
        self._last_cmd = None
        self._hold = None
        self._stop_code = None

    def _report(self, now, measured, commanded, err, finished, hardware_error=None, message=''):
        goal = self.goals.active
        progress = 0.0
        if self._traj is not None and self.mode in (ExecutorMode.MOVING, ExecutorMode.SETTLING):
            progress = 1.0 if self._traj.duration <= 0 else min(1.0, max(0.0, (now - self._t0) / self._traj.duration))
        return StepReport(now=now, mode=self.mode, goal_id=goal.goal_id if goal else None,
                          progress=progress, measured=measured, commanded=commanded,
                          tracking_error=err, finished=tuple(finished),
                          hardware_error=hardware_error, message=message)
