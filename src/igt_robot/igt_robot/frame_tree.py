"""The transform tree the stack publishes on /tf and /tf_static (no rclpy): robot, Z-frame, scanner, plan.

What rviz (or any tf2 listener on the graph) needs to show the robot, the needle and the plan in the
scanner frame::

    base_link ─ stage_x_link ─ stage_y_link ─ pitch_link ─ yaw_link ─ needle_link ─ needle_tip
        ├── zframe                      (fixed, from the URDF)
        └── scanner                     (the accepted registration: T_base_scanner)
              ├── plan_entry            (the current plan: origin at the skin entry, z along the path)
              └── plan_target           (origin at the target, z along the path)

The robot's links are the URDF kinematics of the joint positions (what robot_state_publisher
computes from /joint_states); movable joints are *dynamic* (/tf), fixed ones *static* (/tf_static).
Every transform is ``T_parent_child`` (4x4, m), parent as header.frame_id, child as child_frame_id.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional

import numpy as np

from igt_robot import frames
from igt_robot.kinematics import NeedleGuideKinematics

PLAN_ENTRY_FRAME = 'plan_entry'
PLAN_TARGET_FRAME = 'plan_target'


@dataclasses.dataclass(frozen=True)
class FrameTransform:
    """``T_parent_child`` (4x4, m): maps coordinates in ``child`` into ``parent``."""

    parent: str
    child: str
    matrix: np.ndarray


def robot_link_transforms(kinematics: NeedleGuideKinematics, q) -> List[FrameTransform]:
    """The movable joints' transforms for joint positions ``q`` (contract joint order): /tf."""
    return [FrameTransform(joint.parent, joint.child, t) for joint, t in kinematics.joint_transforms(q)
            if joint.type != 'fixed']


def robot_fixed_transforms(kinematics: NeedleGuideKinematics) -> List[FrameTransform]:
    """The URDF's fixed joints (needle_link -> needle_tip, base_link -> zframe): /tf_static."""
    zero = np.zeros(kinematics.model.n_joints)
    fixed = [FrameTransform(joint.parent, joint.child, t) for joint, t in kinematics.joint_transforms(zero)
             if joint.type == 'fixed']
    fixed.append(FrameTransform(frames.BASE_FRAME, frames.ZFRAME_FRAME, np.array(kinematics.model.T_base_zframe)))
    return fixed


def scanner_transform(T_base_scanner) -> FrameTransform:
    """base_link -> scanner from an accepted registration."""
    return FrameTransform(frames.BASE_FRAME, frames.SCANNER_FRAME, np.asarray(T_base_scanner, dtype=float))


def _path_axes(direction) -> np.ndarray:
    """A rotation whose z axis is ``direction`` (unit), x and y completing a right-handed frame."""
    z = np.asarray(direction, dtype=float)
    norm = np.linalg.norm(z)
    if not norm > 1e-9:
        raise ValueError('the plan direction is zero')
    z = z / norm
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.column_stack([x, np.cross(z, x), z])


def plan_transforms(entry, target, direction) -> List[FrameTransform]:
    """scanner -> plan_entry and scanner -> plan_target (scanner LPS, m; z along the path)."""
    rotation = _path_axes(direction)
    return [FrameTransform(frames.SCANNER_FRAME, PLAN_ENTRY_FRAME, frames.make_transform(rotation, entry)),
            FrameTransform(frames.SCANNER_FRAME, PLAN_TARGET_FRAME, frames.make_transform(rotation, target))]


class FrameTree:
    """Transforms by child frame, and lookups through their common ancestor (as a tf2 buffer does)."""

    def __init__(self, transforms: Iterable[FrameTransform] = ()):
        self._by_child: Dict[str, FrameTransform] = {}
        self.update(transforms)

    def update(self, transforms: Iterable[FrameTransform]) -> None:
        for transform in transforms:
            self._by_child[transform.child] = transform

    def _to_root(self, frame: str):
        """``(root, T_root_frame)``; a frame nobody is the child of is a root."""
        t = np.eye(4)
        seen = set()
        while frame in self._by_child:
            if frame in seen:
                raise ValueError(f'the frame tree has a cycle through {frame!r}')
            seen.add(frame)
            edge = self._by_child[frame]
            t = edge.matrix @ t
            frame = edge.parent
        return frame, t

    def lookup(self, target: str, source: str) -> Optional[np.ndarray]:
        """``T_target_source`` (maps ``source`` coordinates into ``target``); None if not connected."""
        root_t, t_root_target = self._to_root(target)
        root_s, t_root_source = self._to_root(source)
        if root_t != root_s:
            return None
        return frames.invert(t_root_target) @ t_root_source
