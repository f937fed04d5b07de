"""Time-parameterised joint trajectories within velocity/acceleration/jerk limits.

Units are SI per joint: positions in m (prismatic) or rad (revolute), per
second for velocity, per second² for acceleration, per second³ for jerk. Joint
order is the robot's (see docs/contracts.md); nothing here is frame dependent.

Point-to-point moves are **synchronised**: every joint starts and finishes at
the same time and the joint-space path is the straight line from start to goal.
All joints share one normalised profile ``s(t)`` running from 0 to 1,
``q(t) = q_start + (q_goal - q_start) * s(t)``. Joint ``i`` stays within its
limits when ``|D_i| * s'(t) <= v_max_i`` (likewise for s'' and s'''), so the
profile limits are ``min_i v_max_i / |D_i|`` etc.: the joint that needs the
longest time sets the pace and all others are slowed proportionally. Because
the box of joint limits is convex, a straight path between two points inside it
never leaves it.

Profiles:
* ``trapezoidal`` -- bang-coast-bang acceleration (velocity trapezoid or
  triangle), time-optimal for velocity+acceleration limits.
* ``scurve`` -- jerk-limited 7-phase profile (acceleration is a trapezoid), for
  drives or needle guides that should not see acceleration steps.

Multi-waypoint moves are consecutive rest-to-rest segments: the robot comes to
rest at each waypoint, which is what a needle-guidance workflow wants (each
waypoint is a checked pose) and keeps every segment on its straight line.

Stopping is not planned here: the motor controller ramps every axis down at
its own deceleration limit when it is told to stop (or stops itself), see
``igt_robot.hardware.controller_core``.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

PROFILES = ('trapezoidal', 'scurve')


class TrajectoryError(ValueError):
    """Invalid trajectory request; the message names the joint/argument and the problem."""


def _vector(name: str, values, n: Optional[int] = None, positive: bool = False,
            joint_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Convert to a finite float vector of length n, raising TrajectoryError otherwise."""
    try:
        arr = np.array(values, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TrajectoryError(f'{name} is not a numeric vector: {values!r}') from exc
    if n is not None and arr.size != n:
        raise TrajectoryError(f'{name} has {arr.size} values, expected {n} (one per joint)')
    bad = ~np.isfinite(arr)
    if positive:
        bad |= ~(arr > 0.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        label = joint_names[i] if joint_names is not None and i < len(joint_names) else f'joint {i}'
        what = 'finite and > 0' if positive else 'finite'
        raise TrajectoryError(f'{name}[{label}] = {arr[i]!r} must be {what}')
    return arr


@dataclasses.dataclass(frozen=True)
class JointLimits:
    """Per-joint kinematic limits (SI). ``lower``/``upper`` are optional position bounds."""

    velocity: np.ndarray
    acceleration: np.ndarray
    jerk: Optional[np.ndarray] = None
    lower: Optional[np.ndarray] = None
    upper: Optional[np.ndarray] = None
    joint_names: Tuple[str, ...] = ()

    def __post_init__(self):
        vel = _vector('velocity limit', self.velocity, positive=True)
        n = vel.size
        names = tuple(self.joint_names) or tuple(f'joint{i}' for i in range(n))
        if len(names) != n:
            raise TrajectoryError(f'{len(names)} joint names for {n} joints')
        object.__setattr__(self, 'joint_names', names)
        object.__setattr__(self, 'velocity', vel)
        object.__setattr__(self, 'acceleration',
                           _vector('acceleration limit', self.acceleration, n, True, names))
        if self.jerk is not None:
            object.__setattr__(self, 'jerk', _vector('jerk limit', self.jerk, n, True, names))
        if (self.lower is None) != (self.upper is None):
            raise TrajectoryError('position limits need both lower and upper (or neither)')
        if self.lower is not None:
            lo = _vector('lower position limit', self.lower, n, joint_names=names)
            hi = _vector('upper position limit', self.upper, n, joint_names=names)
            if (lo >= hi).any():
                i = int(np.flatnonzero(lo >= hi)[0])
                raise TrajectoryError(f'position limits of {names[i]}: lower {lo[i]} >= upper {hi[i]}')
            object.__setattr__(self, 'lower', lo)
            object.__setattr__(self, 'upper', hi)

    @property
    def n_joints(self) -> int:
        return int(self.velocity.size)

    @classmethod
    def from_robot_model(cls, model, acceleration, jerk=None) -> 'JointLimits':
        """Build from a parsed URDF model (``joint_names, lower, upper, velocity``
        attributes, as ``igt_robot.robot_model.RobotModel``) plus the acceleration
        (and optional jerk) limits from config/robot.yaml, which the URDF lacks."""
        return cls(velocity=model.velocity, acceleration=acceleration, jerk=jerk,
                   lower=model.lower, upper=model.upper, joint_names=tuple(model.joint_names))

    def check_within(self, name: str, positions: np.ndarray, tolerance: float = 0.0) -> None:
        """Raise TrajectoryError if ``positions`` leave [lower - tol, upper + tol]."""
        if self.lower is None:
            return
        below = positions < self.lower - tolerance
        above = positions > self.upper + tolerance
        if below.any() or above.any():
            i = int(np.flatnonzero(below | above)[0])
            raise TrajectoryError(
                f'{name}: {self.joint_names[i]} = {positions[i]:.6g} is outside its limits '
                f'[{self.lower[i]:.6g}, {self.upper[i]:.6g}]')


@dataclasses.dataclass(frozen=True)
class TrajectorySample:
    """State at one instant: positions, velocities, accelerations (SI, joint order)."""

    t: float
    positions: np.ndarray
    velocities: np.ndarray
    accelerations: np.ndarray


class _PiecewiseJerk:
    """A scalar motion made of constant-jerk pieces, evaluated exactly.

    Built from (duration, start acceleration, jerk) pieces; position and
    velocity are integrated forward so they are continuous by construction
    (acceleration may step, which is how a trapezoidal profile is expressed).
    """

    def __init__(self, pieces: Sequence[Tuple[float, float, float]], p0: float = 0.0, v0: float = 0.0):
        self.t0: List[float] = []
        self.state: List[Tuple[float, float, float, float]] = []  # p, v, a, j at piece start
        t, p, v = 0.0, float(p0), float(v0)
        for dur, a, j in pieces:
            if dur <= 0.0:
                continue
            self.t0.append(t)
            self.state.append((p, v, a, j))
            p += v * dur + a * dur * dur / 2.0 + j * dur ** 3 / 6.0
            v += a * dur + j * dur * dur / 2.0
            t += dur
        self.duration = t
        self.p_end, self.v_end = p, v

    def evaluate(self, t: float) -> Tuple[float, float, float]:
        if not self.state:
            return self.p_end, self.v_end, 0.0
        if t <= 0.0:
            p, v, a, _ = self.state[0]
            return p, v, a
        k = bisect.bisect_right(self.t0, t) - 1
        p, v, a, j = self.state[k]
        tau = min(t, self.duration) - self.t0[k]
        return (p + v * tau + a * tau * tau / 2.0 + j * tau ** 3 / 6.0,
                v + a * tau + j * tau * tau / 2.0,
                a + j * tau)

    def evaluate_many(self, times: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        times = np.asarray(times, dtype=float)
        if not self.t0:
            return (np.full(times.shape, self.p_end), np.full(times.shape, self.v_end),
                    np.zeros(times.shape))
        st = np.array(self.state)
        k = np.clip(np.searchsorted(np.array(self.t0), times, side='right') - 1, 0, len(self.t0) - 1)
        tau = np.clip(times, 0.0, self.duration) - np.array(self.t0)[k]
        p, v, a, j = st[k, 0], st[k, 1], st[k, 2], st[k, 3]
        return (p + v * tau + a * tau ** 2 / 2.0 + j * tau ** 3 / 6.0,
                v + a * tau + j * tau ** 2 / 2.0,
                a + j * tau)


def _trapezoid_pieces(length: float, v: float, a: float):
    """Rest-to-rest pieces covering ``length`` > 0 within |v'|<=v, |v''|<=a."""
    if v * v / a >= length:        # never reaches v: triangular velocity
        ta = math.sqrt(length / a)
        return [(ta, a, 0.0), (ta, -a, 0.0)]
    ta = v / a
    tc = (length - v * v / a) / v
    return [(ta, a, 0.0), (tc, 0.0, 0.0), (ta, -a, 0.0)]


def _scurve_pieces(length: float, v: float, a: float, j: float):
    """Rest-to-rest jerk-limited (7-phase) pieces covering ``length`` > 0."""

    def accel_phase(v_peak):
        # Time with jerk applied (tj) and total acceleration time (ta) to reach v_peak.
        if v_peak * j >= a * a:
            tj = a / j
            return tj, tj + v_peak / a
        tj = math.sqrt(v_peak / j)
        return tj, 2.0 * tj

    tj, ta = accel_phase(v)
    tv = length / v - ta            # symmetric accel phase covers v*ta/2
    if tv < 0.0:
        # v is not reached: find the peak velocity that exactly covers length.
        vp = (-a * a / j + math.sqrt((a * a / j) ** 2 + 4.0 * length * a)) / 2.0
        if vp * j < a * a:          # a is not reached either
            vp = (length * math.sqrt(j) / 2.0) ** (2.0 / 3.0)
        v = vp
        tj, ta = accel_phase(v)
        tv = 0.0
    a_peak = j * tj
    tca = ta - 2.0 * tj             # constant-acceleration time (>= 0 up to rounding)
    return [(tj, 0.0, j), (tca, a_peak, 0.0), (tj, a_peak, -j),
            (tv, 0.0, 0.0),
            (tj, 0.0, -j), (tca, -a_peak, 0.0), (tj, -a_peak, j)]


class Trajectory:
    """Common interface: ``duration``, ``sample(t)``, ``sample_many(times)``, endpoints.

    Before t=0 the trajectory reports its start at rest; after ``duration`` it
    holds its end position at rest.
    """

    duration: float
    start_positions: np.ndarray
    end_positions: np.ndarray

    @property
    def n_joints(self) -> int:
        return int(self.start_positions.size)

    def sample(self, t: float) -> TrajectorySample:
        raise NotImplementedError

    def sample_many(self, times) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised sampling: arrays (len(times), n_joints) of q, qd, qdd."""
        raise NotImplementedError


class PointToPointTrajectory(Trajectory):
    """Synchronised straight-line joint move from rest to rest."""

    def __init__(self, start, goal, profile: _PiecewiseJerk, kind: str):
        self.start_positions = np.array(start, dtype=float)
        self.end_positions = np.array(goal, dtype=float)
        self.delta = self.end_positions - self.start_positions
        self._profile = profile
        self.kind = kind
        self.duration = profile.duration

    def sample(self, t: float) -> TrajectorySample:
        t = float(t)
        if t >= self.duration:
            # Exact endpoint (no accumulated rounding), then hold.
            z = np.zeros_like(self.delta)
            return TrajectorySample(t, self.end_positions.copy(), z, z.copy())
        if t <= 0.0:
            z = np.zeros_like(self.delta)
            return TrajectorySample(t, self.start_positions.copy(), z, z.copy())
        s, sd, sdd = self._profile.evaluate(t)
        return TrajectorySample(t, self.start_positions + self.delta * s, self.delta * sd, self.delta * sdd)

    def sample_many(self, times):
        times = np.asarray(times, dtype=float).reshape(-1)
        s, sd, sdd = self._profile.evaluate_many(times)
        after = times >= self.duration
        before = times <= 0.0
        s = np.where(after, 1.0, np.where(before, 0.0, s))
        sd = np.where(after | before, 0.0, sd)
        sdd = np.where(after | before, 0.0, sdd)
        q = self.start_positions + np.outer(s, self.delta)
        q[after] = self.end_positions
        return q, np.outer(sd, self.delta), np.outer(sdd, self.delta)


class MultiSegmentTrajectory(Trajectory):
    """Consecutive trajectories played back to back (each starts where the last ended)."""

    def __init__(self, segments: Sequence[Trajectory]):
        if not segments:
            raise TrajectoryError('a multi-segment trajectory needs at least one segment')
        self.segments = list(segments)
        self.offsets = []
        t = 0.0
        for seg in self.segments:
            self.offsets.append(t)
            t += seg.duration
        self.duration = t
        self.start_positions = self.segments[0].start_positions.copy()
        self.end_positions = self.segments[-1].end_positions.copy()

    def _index(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.offsets, t) - 1)

    def segment_index(self, t: float) -> int:
        """Index of the segment active at time t (the last one after the end)."""
        return self._index(float(t))

    def sample(self, t: float) -> TrajectorySample:
        t = float(t)
        k = self._index(t)
        s = self.segments[k].sample(t - self.offsets[k])
        return TrajectorySample(t, s.positions, s.velocities, s.accelerations)

    def sample_many(self, times):
        times = np.asarray(times, dtype=float).reshape(-1)
        n = self.n_joints
        q = np.empty((times.size, n))
        qd = np.empty((times.size, n))
        qdd = np.empty((times.size, n))
        k = np.clip(np.searchsorted(np.array(self.offsets), times, side='right') - 1, 0, len(self.segments) - 1)
        for i, seg in enumerate(self.segments):
            mask = k == i
            if mask.any():
                q[mask], qd[mask], qdd[mask] = seg.sample_many(times[mask] - self.offsets[i])
        return q, qd, qdd


def _profile_limits(delta: np.ndarray, limits: JointLimits, speed_scale: float):
    """Limits of the normalised profile s(t) so that every joint respects its own."""
    moving = np.abs(delta) > 0.0
    ad = np.abs(delta[moving])
    v = float(np.min(limits.velocity[moving] * speed_scale / ad))
    a = float(np.min(limits.acceleration[moving] / ad))
    j = float(np.min(limits.jerk[moving] / ad)) if limits.jerk is not None else None
    return v, a, j


def plan_point_to_point(start, goal, limits: JointLimits, profile: str = 'trapezoidal',
                        speed_scale: float = 1.0, goal_name: str = 'goal') -> PointToPointTrajectory:
    """Synchronised rest-to-rest move from ``start`` to ``goal``.

    ``start`` may lie slightly outside the position limits (encoder noise at a
    limit); the move then goes monotonically back inside. ``goal`` must lie
    inside them. ``speed_scale`` in (0, 1] scales the velocity limits only.
    Raises TrajectoryError for NaN/inf, wrong sizes, goals outside limits, a bad
    profile name or a missing jerk limit for ``scurve``.
    """
    n = limits.n_joints
    names = limits.joint_names
    if profile not in PROFILES:
        raise TrajectoryError(f'unknown profile {profile!r}; expected one of {", ".join(PROFILES)}')
    if profile == 'scurve' and limits.jerk is None:
        raise TrajectoryError('profile "scurve" needs jerk limits (JointLimits.jerk)')
    if not (isinstance(speed_scale, (int, float)) and 0.0 < speed_scale <= 1.0):
        raise TrajectoryError(f'speed_scale must be in (0, 1], got {speed_scale!r}')
    q0 = _vector('start', start, n, joint_names=names)
    q1 = _vector(goal_name, goal, n, joint_names=names)
    limits.check_within(goal_name, q1)
    delta = q1 - q0
    if not (np.abs(delta) > 0.0).any():
        return PointToPointTrajectory(q0, q1, _PiecewiseJerk([], p0=1.0), profile)
    v, a, j = _profile_limits(delta, limits, speed_scale)
    pieces = _trapezoid_pieces(1.0, v, a) if profile == 'trapezoidal' else _scurve_pieces(1.0, v, a, j)
    return PointToPointTrajectory(q0, q1, _PiecewiseJerk(pieces), profile)


def plan_waypoints(start, waypoints, limits: JointLimits, profile: str = 'trapezoidal',
                   speed_scale: float = 1.0) -> MultiSegmentTrajectory:
    """Rest-to-rest segments through each waypoint in turn (see module docstring).

    Repeated identical waypoints are skipped. Every waypoint must be within limits.
    """
    wps = list(waypoints) if not isinstance(waypoints, np.ndarray) else list(np.atleast_2d(waypoints))
    if not wps:
        raise TrajectoryError('no waypoints given')
    segments: List[Trajectory] = []
    current = _vector('start', start, limits.n_joints, joint_names=limits.joint_names)
    for i, wp in enumerate(wps):
        seg = plan_point_to_point(current, wp, limits, profile, speed_scale, goal_name=f'waypoint {i}')
        if seg.duration > 0.0 or not segments:
            segments.append(seg)
        current = seg.end_positions
    if len(segments) > 1 and segments[0].duration == 0.0:
        segments.pop(0)
    return MultiSegmentTrajectory(segments)
