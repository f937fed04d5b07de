"""Kinematics of the RCM needle guide (pure numpy, no ROS).

Forward kinematics and the Jacobian are computed generically from the URDF
chain (joint origins and axes in :class:`igt_robot.robot_model.RobotModel`), so
they follow the URDF. Inverse kinematics is analytic and relies on the RCM
structure fixed in docs/contracts.md; the constructor checks that the URDF
really has that structure, so the two can never silently disagree:

* RCM = (stage_x, stage_y, 0) in base_link,
* needle direction d = Rx(pitch) Ry(yaw) (0, 0, -1)
  = (-sin yaw, cos yaw sin pitch, -cos yaw cos pitch),
* needle tip = RCM + insertion * d, and the needle_tip frame's z axis is d.

All positions are metres in ``base_link``; angles are radians; joint vectors are
in the contract order ``stage_x, stage_y, guide_pitch, guide_yaw, needle_insertion``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

from igt_robot.frames import invert as invert_rigid
from igt_robot.robot_model import LimitViolation, RobotModel, load_robot_model

# Numerical slack for "on the limit" after floating-point round trips (m or rad);
# physically nil (a nanometre / nanoradian), so it does not loosen any real limit.
LIMIT_TOLERANCE = 1e-9
# Shortest entry->target segment treated as a line (m).
MIN_LINE_LENGTH = 1e-9
# |d_z| below this means the line is parallel to the RCM plane z = 0 (unit vector component).
MIN_PLANE_CROSSING = 1e-9


@dataclasses.dataclass(frozen=True)
class IKSolution:
    """Joint values that put the needle tip on ``target`` along the entry->target line.

    ``joints`` (contract order; m / rad) are the exact analytic values even when
    unreachable, so callers can see by how much; when reachable they are clipped
    into the limits (differences below :data:`LIMIT_TOLERANCE`).
    ``violations`` lists each broken limit as (joint, amount in m or rad, reason).
    ``rcm`` and ``direction`` are in base_link (m, unit vector).
    """

    joints: np.ndarray
    reachable: bool
    violations: Tuple[LimitViolation, ...]
    rcm: np.ndarray
    direction: np.ndarray

    @property
    def message(self) -> str:
        """One-line human summary, e.g. 'unreachable: guide_pitch beyond upper limit by 4.0°'."""
        if self.reachable:
            return 'reachable'
        return 'unreachable: ' + '; '.join(v.reason for v in self.violations)


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: 3x3 rotation by ``angle`` (rad) about the unit vector ``axis``."""
    x, y, z = axis
    c, s = math.cos(angle), math.sin(angle)
    v = 1.0 - c
    return np.array([
        [c + x * x * v, x * y * v - z * s, x * z * v + y * s],
        [y * x * v + z * s, c + y * y * v, y * z * v - x * s],
        [z * x * v - y * s, z * y * v + x * s, c + z * z * v],
    ])


def _point(value, name: str) -> np.ndarray:
    p = np.asarray(value, dtype=float)
    if p.shape != (3,):
        raise ValueError(f'{name} must be a 3-vector (x, y, z in metres, base_link), got shape {p.shape}')
    if not np.all(np.isfinite(p)):
        raise ValueError(f'{name} is not finite: {p.tolist()}')
    return p


def analytic_direction(pitch: float, yaw: float) -> np.ndarray:
    """Needle direction d = Rx(pitch) Ry(yaw) (0, 0, -1) in base_link (unit vector)."""
    return np.array([-math.sin(yaw), math.cos(yaw) * math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])


class NeedleGuideKinematics:
    """Forward/inverse kinematics and Jacobian of the 5-DOF needle guide.

    ``model`` defaults to :func:`igt_robot.robot_model.load_robot_model` (the
    repository/installed URDF). Raises ValueError if the URDF chain is not the
    RCM needle guide the analytic inverse assumes.
    """

    def __init__(self, model: Optional[RobotModel] = None):
        self.model = model if model is not None else load_robot_model()
        self._movable_index = {}
        for k, joint in enumerate(self.model.chain):
            if joint.type != 'fixed':
                self._movable_index[k] = self.model.joint_names.index(joint.name)
        self._check_rcm_structure()

    # ------------------------------------------------------------------ forward

    def _check(self, q) -> np.ndarray:
        return self.model.check_joint_vector(q, 'joint positions')

    def _chain_frames(self, q: np.ndarray):
        """Yield (chain joint, T_base_jointframe, T_base_child) along the chain."""
        t = np.eye(4)
        for k, joint in enumerate(self.model.chain):
            t_joint = t @ joint.origin
            motion = np.eye(4)
            if joint.type == 'prismatic':
                motion[:3, 3] = joint.axis * q[self._movable_index[k]]
            elif joint.type == 'revolute':
                motion[:3, :3] = _rotation_about(joint.axis, q[self._movable_index[k]])
            t = t_joint @ motion
            yield joint, t_joint, t

    def forward(self, q) -> np.ndarray:
        """``T_base_needletip`` (4x4, m) for joint positions ``q``.

        The tip frame's origin is the needle tip; its z axis is the needle direction d.
        Joint values outside the limits are evaluated as given (no clipping).
        """
        q = self._check(q)
        t = np.eye(4)
        for _, _, t in self._chain_frames(q):
            pass
        return t

    def joint_transforms(self, q) -> list:
        """``[(chain joint, T_parent_child)]`` base_link -> needle_tip, as robot_state_publisher computes them."""
        q = self._check(q)
        out, t_parent = [], np.eye(4)
        for joint, _, t_child in self._chain_frames(q):
            out.append((joint, invert_rigid(t_parent) @ t_child))
            t_parent = t_child
        return out

    def tip_position(self, q) -> np.ndarray:
        """Needle tip position in base_link (m)."""
        return self.forward(q)[:3, 3]

    def needle_direction(self, q) -> np.ndarray:
        """Unit needle direction d in base_link (pointing from the RCM towards the tip)."""
        return self.forward(q)[:3, 2]

    def rcm(self, q) -> np.ndarray:
        """Remote centre of motion in base_link (m): the tip pulled back along d to insertion 0."""
        q = self._check(q)
        t = self.forward(q)
        return t[:3, 3] - q[self.model.joint_index('needle_insertion')] * t[:3, 2]

    # ------------------------------------------------------------------ inverse

    def inverse(self, entry_base, target_base) -> IKSolution:
        """Joints placing the needle tip on ``target_base`` along the line entry -> target.

        ``entry_base`` and ``target_base`` are points in base_link (m). The needle
        direction is d = (target - entry)/|target - entry|; the RCM is where that
        line crosses the plane z = 0 (stage_x, stage_y); pitch and yaw follow from d;
        insertion is the signed distance from the RCM to the target along d
        (negative when the target lies on the wrong side of the RCM plane).

        Never raises for unreachable targets: ``reachable`` is False and
        ``violations`` says which joint is beyond which limit and by how much.
        Raises ValueError for non-finite/ill-shaped points, entry == target, or a
        line parallel to the RCM plane (it never crosses the plane).
        """
        entry = _point(entry_base, 'entry point')
        target = _point(target_base, 'target point')
        line = target - entry
        length = float(np.linalg.norm(line))
        if length < MIN_LINE_LENGTH:
            raise ValueError(f'entry and target coincide ({entry.tolist()} m): the needle line is undefined')
        d = line / length
        if abs(d[2]) < MIN_PLANE_CROSSING:
            raise ValueError('the entry->target line is parallel to the RCM plane z = 0 of base_link; '
                             'it never passes through the remote centre of motion')
        # Line/plane intersection: entry_z + s * d_z = 0.
        rcm = entry - (entry[2] / d[2]) * d
        rcm[2] = 0.0
        # d = (-sin yaw, cos yaw sin pitch, -cos yaw cos pitch) with cos yaw >= 0.
        yaw = math.asin(float(np.clip(-d[0], -1.0, 1.0)))
        pitch = math.atan2(d[1], -d[2])
        insertion = float(np.dot(target - rcm, d))
        joints = np.array([rcm[0], rcm[1], pitch, yaw, insertion])
        violations = tuple(self.model.limit_violations(joints, tolerance=LIMIT_TOLERANCE))
        reachable = not violations
        if reachable:
            joints = np.clip(joints, self.model.lower, self.model.upper)
        return IKSolution(joints=joints, reachable=reachable, violations=violations, rcm=rcm, direction=d)

    # ------------------------------------------------------------------ differential

    def jacobian(self, q) -> np.ndarray:
        """Geometric Jacobian (6x5) of the needle tip in base_link.

        Rows 0-2: linear tip velocity (m/s); rows 3-5: angular velocity (rad/s),
        both expressed in base_link, per unit joint velocity (m/s or rad/s).
        """
        q = self._check(q)
        frames = list(self._chain_frames(q))
        p_tip = frames[-1][2][:3, 3]
        jac = np.zeros((6, self.model.n_joints))
        for k, (joint, t_joint, _) in enumerate(frames):
            if joint.type == 'fixed':
                continue
            col = self._movable_index[k]
            axis = t_joint[:3, :3] @ joint.axis
            if joint.type == 'prismatic':
                jac[:3, col] = axis
            else:
                jac[:3, col] = np.cross(axis, p_tip - t_joint[:3, 3])
                jac[3:, col] = axis
        return jac

    def joint_limit_margin(self, q) -> float:
        """Smallest normalised distance to a joint limit (0.5 centred, 0 on a limit, < 0 outside)."""
        return self.model.joint_limit_margin(self._check(q))

    # ------------------------------------------------------------------ structure check

    def _check_rcm_structure(self) -> None:
        """Verify the URDF chain matches the analytic RCM model the inverse relies on."""
        m = self.model
        rng = np.random.default_rng(0)
        probes = [m.lower, m.upper, 0.5 * (m.lower + m.upper)]
        probes += [rng.uniform(m.lower, m.upper) for _ in range(16)]
        for q in probes:
            t = self.forward(q)
            d = analytic_direction(q[2], q[3])
            expected_tip = np.array([q[0], q[1], 0.0]) + q[4] * d
            if (np.linalg.norm(t[:3, 3] - expected_tip) > 1e-9
                    or np.linalg.norm(t[:3, 2] - d) > 1e-9):
                raise ValueError(
                    f'URDF {m.urdf_path or "(string)"} is not the RCM needle guide of docs/contracts.md: '
                    f'at q={np.round(q, 6).tolist()} the chain puts the tip at {t[:3, 3].tolist()} '
                    f'with z axis {t[:3, 2].tolist()}, the RCM model gives {expected_tip.tolist()} / {d.tolist()}')
