"""Reachability: can the robot (or a simple guide cone) place the needle on a path?

Protocol
--------
``check(entry_scanner, target_scanner) -> ReachResult`` for one path and
``check_many(entries (N, 3), target) -> BatchReach`` for many; points are in
the scanner frame (LPS, m). ``joint_limit_margin`` is dimensionless, with the
convention of ``igt_robot.robot_model``: the smallest remaining distance to a
limit divided by that joint's range (0.5 = every joint mid-range, 0 = at a
limit, < 0 = beyond it), so margins of prismatic and revolute joints compare.

Implementations
---------------
* :class:`ConeReachability` -- direction within a cone around an axis, depth
  within a maximum; vectorised. Used in tests and when no robot is given.
* :class:`RobotReachability` -- wraps ``igt_robot.kinematics.NeedleGuideKinematics``
  and the registration ``T_base_scanner`` (imported lazily, so the planner has
  no hard dependency on the kinematics module).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import InvalidAffine, NonFiniteInput
from .reasons import format_angle, format_mm

# Joint roles from docs/contracts.md; used to word reasons when the robot model
# does not say which joints are revolute.
_REVOLUTE_DEFAULT = frozenset({'guide_pitch', 'guide_yaw'})


@dataclasses.dataclass
class ReachResult:
    """Reachability of one path (see module docstring for the margin's meaning)."""

    reachable: bool
    reasons: list
    joints: Optional[np.ndarray]
    joint_limit_margin: float
    insertion_depth: float       # m, the robot's insertion (or the path depth for the cone)


@dataclasses.dataclass
class BatchReach:
    """Reachability of N paths as arrays; reasons are built only when asked for."""

    reachable: np.ndarray            # (N,) bool
    joint_limit_margin: np.ndarray   # (N,) float
    insertion_depth: np.ndarray      # (N,) m
    joints: Optional[np.ndarray]     # (N, J) or None
    reason_builder: Callable[[int], list]

    def reasons_for(self, i: int) -> list:
        """Clinician-readable reasons why path ``i`` is unreachable (empty if reachable)."""
        return [] if self.reachable[i] else list(self.reason_builder(int(i)))

    def result(self, i: int) -> ReachResult:
        """The single-path view of row ``i``."""
        return ReachResult(bool(self.reachable[i]), self.reasons_for(i),
                           None if self.joints is None else np.array(self.joints[i]),
                           float(self.joint_limit_margin[i]), float(self.insertion_depth[i]))

    def subset(self, rows: np.ndarray) -> 'BatchReach':
        rows = np.asarray(rows)
        return BatchReach(self.reachable[rows], self.joint_limit_margin[rows], self.insertion_depth[rows],
                          None if self.joints is None else self.joints[rows],
                          lambda i: self.reason_builder(int(rows[i])))


@runtime_checkable
class Reachability(Protocol):
    """What the planner needs from a robot model."""

    def check(self, entry_scanner, target_scanner) -> ReachResult: ...

    def check_many(self, entries_scanner, target_scanner) -> BatchReach: ...


class ConeReachability:
    """Needle direction within ``max_angle_rad`` of ``axis`` and depth <= ``max_depth_m``.

    Args:
        axis: needle direction (entry -> target) at the cone centre, scanner LPS.
        max_angle_rad: half-angle of the cone.
        max_depth_m: longest reachable entry-to-target distance.
    """

    def __init__(self, axis=(0.0, 1.0, 0.0), max_angle_rad: float = math.radians(45.0),
                 max_depth_m: float = 0.15):
        a = np.asarray(axis, float)
        if a.shape != (3,) or not np.all(np.isfinite(a)) or np.linalg.norm(a) < 1e-12:
            raise NonFiniteInput(f'cone axis must be a finite non-zero 3-vector, got {axis!r}')
        if not (0 < max_angle_rad <= math.pi) or not (max_depth_m > 0):
            raise ValueError('cone needs 0 < max_angle_rad <= pi and max_depth_m > 0')
        self.axis = a / np.linalg.norm(a)
        self.max_angle = float(max_angle_rad)
        self.max_depth = float(max_depth_m)

    def check_many(self, entries_scanner, target_scanner) -> BatchReach:
        e = np.atleast_2d(np.asarray(entries_scanner, float))
        t = np.asarray(target_scanner, float)
        v = t - e
        depth = np.linalg.norm(v, axis=1)
        with np.errstate(invalid='ignore', divide='ignore'):
            cosang = (v @ self.axis) / depth
        angle = np.arccos(np.clip(np.nan_to_num(cosang, nan=-1.0), -1.0, 1.0))
        # Same convention as a joint: distance to the limit over the full range (angle range [-max, max]).
        margin = np.minimum((self.max_angle - angle) / (2 * self.max_angle), (self.max_depth - depth) / self.max_depth)
        ok = (angle <= self.max_angle) & (depth <= self.max_depth)

        def reasons(i):
            out = []
            if angle[i] > self.max_angle:
                out.append(f'angulation {format_angle(angle[i])} from the guide axis, beyond the '
                           f'{format_angle(self.max_angle)} limit by {format_angle(angle[i] - self.max_angle)}')
            if depth[i] > self.max_depth:
                out.append(f'insertion {format_mm(depth[i])} beyond the guide reach of '
                           f'{format_mm(self.max_depth)} by {format_mm(depth[i] - self.max_depth)}')
            return out

        return BatchReach(ok, margin, depth, None, reasons)

    def check(self, entry_scanner, target_scanner) -> ReachResult:
        return self.check_many(np.asarray(entry_scanner, float)[None, :], target_scanner).result(0)


def _joint_role(name: str) -> str:
    n = name.lower()
    if 'pitch' in n or 'yaw' in n or 'roll' in n:
        return 'angulation'
    if 'insert' in n:
        return 'insertion'
    if 'stage' in n:
        return 'stage'
    return 'joint'


class RobotReachability:
    """Reachability from the robot's inverse kinematics.

    Args:
        kinematics: an ``igt_robot.kinematics.NeedleGuideKinematics`` (anything
            with ``inverse(entry_base, target_base)`` returning an object with
            ``.joints``, ``.reachable`` and ``.violations`` = list of
            ``(joint_name, amount, reason)``; amount in rad for revolute joints,
            m for prismatic ones).
        T_base_scanner: 4x4 registration mapping scanner LPS (m) into base_link.
        model: the robot model (joint_names, lower, upper); default:
            ``kinematics.model`` / ``kinematics.robot_model`` or
            ``igt_robot.robot_model.load_robot_model()``.
    """

    def __init__(self, kinematics, T_base_scanner, model=None):
        T = np.asarray(T_base_scanner, float)
        if T.shape != (4, 4):
            raise InvalidAffine(f'T_base_scanner must be 4x4, got {T.shape}')
        if not np.all(np.isfinite(T)):
            raise NonFiniteInput('T_base_scanner contains NaN or infinite values')
        r = T[:3, :3]
        if not np.allclose(r.T @ r, np.eye(3), atol=1e-6) or not np.allclose(T[3], [0, 0, 0, 1]):
            raise InvalidAffine('T_base_scanner must be a rigid transform (orthonormal rotation, last row 0 0 0 1)')
        self.kinematics = kinematics
        self.T_base_scanner = T
        if model is None:
            model = getattr(kinematics, 'model', None) or getattr(kinematics, 'robot_model', None)
        if model is None:
            from igt_robot.robot_model import load_robot_model  # lazy: optional dependency
            model = load_robot_model()
        self.joint_names = list(model.joint_names)
        self.lower = np.asarray(model.lower, float)
        self.upper = np.asarray(model.upper, float)
        types = getattr(model, 'joint_types', None)
        if types is not None:
            self.revolute = {n for n, t in zip(self.joint_names, types) if str(t) in ('revolute', 'continuous')}
        else:
            self.revolute = set(_REVOLUTE_DEFAULT)

    def _to_base(self, p):
        return np.asarray(p, float) @ self.T_base_scanner[:3, :3].T + self.T_base_scanner[:3, 3]

    def margin(self, joints: Optional[np.ndarray]) -> float:
        """Smallest distance to a joint limit over that joint's range (see module docstring)."""
        if joints is None:
            return -1.0
        q = np.asarray(joints, float)
        return float(np.min(np.minimum(q - self.lower, self.upper - q) / (self.upper - self.lower)))

    def explain(self, violations: Sequence, reachable: bool) -> list:
        """Clinician-readable wording of IK violations."""
        out = []
        for v in violations or ():
            joint, amount, why = (list(v) + ['', 0.0, ''])[:3]
            joint = str(joint)
            if not joint:
                out.append(str(why))
                continue
            role = _joint_role(joint)
            if why and str(why).startswith(joint):
                # The kinematics already words it ("guide_pitch beyond upper limit by 4.0°").
                out.append(f'{role} joint {why}')
                continue
            size = format_angle(abs(float(amount))) if joint in self.revolute else format_mm(abs(float(amount)))
            text = f'{role} joint {joint} beyond limit by {size}'
            if why:
                text += f' ({why})'
            out.append(text)
        if not reachable and not out:
            out.append('the robot has no inverse-kinematics solution for this path')
        return out

    def _solve(self, entry, target):
        try:
            sol = self.kinematics.inverse(self._to_base(entry), self._to_base(target))
        except ValueError as exc:
            # The IK refuses geometrically impossible lines (e.g. parallel to the RCM plane).
            return False, None, [('', 0.0, f'no inverse-kinematics solution: {exc}')]
        joints = getattr(sol, 'joints', None)
        joints = None if joints is None else np.asarray(joints, float)
        violations = list(getattr(sol, 'violations', ()) or ())
        reachable = bool(getattr(sol, 'reachable', False)) and not violations
        return reachable, joints, violations

    def _insertion(self, joints):
        if joints is None:
            return float('nan')
        for i, n in enumerate(self.joint_names):
            if _joint_role(n) == 'insertion':
                return float(joints[i])
        return float('nan')

    def check(self, entry_scanner, target_scanner) -> ReachResult:
        reachable, joints, violations = self._solve(entry_scanner, target_scanner)
        return ReachResult(reachable, [] if reachable else self.explain(violations, reachable), joints,
                           self.margin(joints), self._insertion(joints))

    def check_many(self, entries_scanner, target_scanner) -> BatchReach:
        """One IK solve per entry (the IK is closed-form and cheap); reasons worded lazily."""
        e = np.atleast_2d(np.asarray(entries_scanner, float))
        n = e.shape[0]
        ok = np.zeros(n, bool)
        margin = np.full(n, -1.0)
        depth = np.full(n, np.nan)
        joints = np.full((n, len(self.joint_names)), np.nan)
        raw = [None] * n
        for i in range(n):
            r, q, viol = self._solve(e[i], target_scanner)
            ok[i] = r
            if q is not None:
                joints[i] = q
                margin[i] = self.margin(q)
                depth[i] = self._insertion(q)
            raw[i] = (viol, r)
        return BatchReach(ok, margin, depth, joints, lambda i: self.explain(*raw[i]))
