"""Robot description parsed from ``urdf/igt_robot.urdf`` (the single source of truth).

:func:`load_robot_model` reads the URDF with :mod:`xml.etree` (no ROS needed) and
returns a :class:`RobotModel`: joint names/types/limits in the contract joint
order, the fixed ``base_link -> zframe`` transform and the kinematic chain
``base_link -> needle_tip`` (joint origins and axes) that
:mod:`igt_robot.kinematics` uses for forward kinematics.

Units are SI (m, rad, N, N·m, m/s, rad/s); transforms are 4x4 ``T_parent_child``.
Human-readable limit messages (degrees for revolute joints, millimetres for
prismatic ones) are formatted here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from igt_robot import units

#: The joint order used everywhere (JointState, trajectories, hardware).
JOINT_NAMES = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
BASE_LINK = 'base_link'
TIP_LINK = 'needle_tip'
ZFRAME_LINK = 'zframe'
URDF_FILENAME = 'igt_robot.urdf'
PACKAGE_NAME = 'igt_robot'

_MOVABLE_TYPES = ('prismatic', 'revolute')
_SUPPORTED_TYPES = _MOVABLE_TYPES + ('fixed',)


class URDFError(ValueError):
    """The URDF is malformed or does not describe the igt_robot needle guide."""


class LimitViolation(NamedTuple):
    """One joint outside its limits.

    ``amount`` is how far beyond the limit, in SI units (m or rad, > 0);
    ``reason`` is the human text, e.g. ``'guide_pitch beyond upper limit by 4.0°'``.
    """

    joint: str
    amount: float
    reason: str


@dataclasses.dataclass(frozen=True)
class ChainJoint:
    """One URDF joint of the base_link -> needle_tip chain.

    ``origin`` is ``T_parent_jointframe`` (4x4, m); ``axis`` a unit vector in the
    joint frame. The child pose is ``origin @ motion(q)`` where motion is a
    translation ``axis * q`` (prismatic, m) or rotation by ``q`` about ``axis``
    (revolute, rad); fixed joints have no motion.
    """

    name: str
    type: str
    parent: str
    child: str
    origin: np.ndarray
    axis: np.ndarray


@dataclasses.dataclass(frozen=True)
class RobotModel:
    """Joint limits and geometry of the needle-guide robot (SI units).

    Arrays are in :data:`JOINT_NAMES` order and read-only. ``T_base_zframe`` maps
    Z-frame coordinates into base_link. ``chain`` lists every URDF joint from
    base_link to needle_tip (movable and fixed) in order.
    """

    joint_names: Tuple[str, ...]
    joint_types: Tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray
    T_base_zframe: np.ndarray
    chain: Tuple[ChainJoint, ...]
    urdf_path: Optional[str] = None

    @property
    def n_joints(self) -> int:
        return len(self.joint_names)

    @property
    def is_prismatic(self) -> np.ndarray:
        """Boolean mask, True for prismatic joints (positions in m)."""
        return np.array([t == 'prismatic' for t in self.joint_types])

    def joint_index(self, name: str) -> int:
        try:
            return self.joint_names.index(name)
        except ValueError:
            raise KeyError(f'unknown joint {name!r}; joints are {", ".join(self.joint_names)}') from None

    def check_joint_vector(self, q, what: str = 'joint vector') -> np.ndarray:
        """Return ``q`` as a float array of shape (n_joints,); ValueError if wrong shape or not finite."""
        arr = np.asarray(q, dtype=float)
        if arr.shape != (self.n_joints,):
            raise ValueError(f'{what} must have {self.n_joints} entries '
                             f'({", ".join(self.joint_names)}), got shape {arr.shape}')
        if not np.all(np.isfinite(arr)):
            bad = [n for n, v in zip(self.joint_names, arr) if not np.isfinite(v)]
            raise ValueError(f'{what} is not finite for {", ".join(bad)}')
        return arr

    def clip_to_limits(self, q) -> np.ndarray:
        """``q`` clipped into [lower, upper] per joint (m or rad)."""
        return np.clip(self.check_joint_vector(q), self.lower, self.upper)

    def within_limits(self, q, tolerance: float = 0.0) -> bool:
        """True when every joint is inside its limits (tolerance in m or rad)."""
        arr = self.check_joint_vector(q)
        return bool(np.all(arr >= self.lower - tolerance) and np.all(arr <= self.upper + tolerance))

    def limit_violations(self, q, tolerance: float = 0.0) -> list:
        """One :class:`LimitViolation` per joint beyond its limits (more than ``tolerance``).

        Example reason: ``'guide_pitch beyond upper limit by 4.0°'``.
        """
        arr = self.check_joint_vector(q)
        out = []
        for i, name in enumerate(self.joint_names):
            for side, excess in (('lower', self.lower[i] - arr[i]), ('upper', arr[i] - self.upper[i])):
                if excess > tolerance:
                    out.append(LimitViolation(
                        name, float(excess),
                        f'{name} beyond {side} limit by {self.format_amount(name, excess)}'))
        return out

    def format_amount(self, joint: str, value: float) -> str:
        """Human text for a joint quantity: degrees for revolute joints, mm for prismatic."""
        joint_type = self.joint_types[self.joint_index(joint)]
        return format_joint_quantity(joint_type, value)

    def joint_limit_margin(self, q) -> float:
        """Smallest distance to a limit over all joints, normalised by each joint's range.

        0.5 at the centre of every range, 0 on a limit, negative outside.
        """
        arr = self.check_joint_vector(q)
        span = self.upper - self.lower
        margins = np.minimum(arr - self.lower, self.upper - arr) / span
        return float(np.min(margins))


def format_joint_quantity(joint_type: str, value: float) -> str:
    """``'4.0°'`` for revolute (value in rad), ``'2.5 mm'`` for prismatic (value in m)."""
    if joint_type == 'revolute':
        shown, unit = math.degrees(value), '°'
    elif joint_type == 'prismatic':
        shown, unit = units.m_to_mm(float(value)), ' mm'
    else:
        raise ValueError(f'no display unit for joint type {joint_type!r}')
    # One decimal reads well for real violations; tiny amounts keep 3 significant digits.
    text = f'{shown:.1f}' if abs(shown) >= 0.1 or shown == 0 else f'{shown:.3g}'
    return f'{text}{unit}'


# --------------------------------------------------------------------------- locating the URDF

def default_urdf_path() -> Path:
    """Path of ``igt_robot.urdf``: the repository copy, else the installed ament share copy.

    Walks up from this module looking for ``urdf/igt_robot.urdf`` (source tree)
    or ``share/igt_robot/urdf/igt_robot.urdf`` (colcon install prefix), then
    tries ``sys.prefix/share/igt_robot/urdf``. FileNotFoundError lists where it looked.
    """
    candidates = []
    for ancestor in Path(__file__).resolve().parents:
        candidates.append(ancestor / 'urdf' / URDF_FILENAME)
        candidates.append(ancestor / 'share' / PACKAGE_NAME / 'urdf' / URDF_FILENAME)
    candidates.append(Path(sys.prefix) / 'share' / PACKAGE_NAME / 'urdf' / URDF_FILENAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f'{URDF_FILENAME} not found; looked in: ' + ', '.join(str(c) for c in candidates))


def load_robot_model(path=None) -> RobotModel:
    """Parse the URDF at ``path`` (default: :func:`default_urdf_path`) into a :class:`RobotModel`."""
    urdf_path = Path(path) if path is not None else default_urdf_path()
    if not urdf_path.is_file():
        raise FileNotFoundError(f'URDF file {urdf_path} does not exist')
    return parse_robot_model(urdf_path.read_text(encoding='utf-8'), source=str(urdf_path))


# --------------------------------------------------------------------------- parsing

def rpy_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """URDF rpy (fixed axes X, then Y, then Z) -> 3x3 rotation Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(yaw), math.sin(yaw)
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


def _floats(text: Optional[str], count: int, what: str, default: Sequence[float]) -> np.ndarray:
    if text is None:
        return np.array(default, dtype=float)
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise URDFError(f'{what}: {text!r} is not a list of numbers') from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise URDFError(f'{what}: expected {count} finite numbers, got {text!r}')
    return np.array(values)


def _origin(joint_el: ET.Element, what: str) -> np.ndarray:
    origin_el = joint_el.find('origin')
    xyz_text = origin_el.get('xyz') if origin_el is not None else None
    rpy_text = origin_el.get('rpy') if origin_el is not None else None
    t = np.eye(4)
    t[:3, :3] = rpy_to_matrix(*_floats(rpy_text, 3, f'{what} origin rpy', (0, 0, 0)))
    t[:3, 3] = _floats(xyz_text, 3, f'{what} origin xyz', (0, 0, 0))
    return t


def _limit_attr(limit_el: Optional[ET.Element], attr: str, joint: str) -> float:
    if limit_el is None or limit_el.get(attr) is None:
        raise URDFError(f'joint {joint!r} has no <limit {attr}=...>; every movable joint needs '
                        f'lower, upper, effort and velocity')
    try:
        value = float(limit_el.get(attr))
    except ValueError:
        raise URDFError(f'joint {joint!r} limit {attr}={limit_el.get(attr)!r} is not a number') from None
    if not math.isfinite(value):
        raise URDFError(f'joint {joint!r} limit {attr} is not finite')
    return value


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=float)
    a.flags.writeable = False
    return a


def parse_robot_model(urdf_text: str, source: str = '<string>') -> RobotModel:
    """Parse URDF text into a :class:`RobotModel`; :class:`URDFError` names what is wrong."""
    try:
        root = ET.fromstring(urdf_text)
    except ET.ParseError as exc:
        raise URDFError(f'{source}: not well-formed XML ({exc})') from None
    if root.tag != 'robot':
        raise URDFError(f'{source}: root element is <{root.tag}>, expected <robot>')

    links = {el.get('name') for el in root.findall('link')}
    joints = {}     # child link -> ChainJoint (a URDF tree has one parent joint per link)
    limits = {}     # joint name -> (lower, upper, effort, velocity)
    for el in root.findall('joint'):   # direct children only (<gazebo> may nest SDF joints)
        name, jtype = el.get('name'), el.get('type')
        what = f'{source}: joint {name!r}'
        if jtype not in _SUPPORTED_TYPES:
            raise URDFError(f'{what} has type {jtype!r}; supported: {", ".join(_SUPPORTED_TYPES)}')
        parent_el, child_el = el.find('parent'), el.find('child')
        if parent_el is None or child_el is None:
            raise URDFError(f'{what} lacks <parent> or <child>')
        parent, child = parent_el.get('link'), child_el.get('link')
        for link in (parent, child):
            if link not in links:
                raise URDFError(f'{what} refers to undefined link {link!r}')
        if child in joints:
            raise URDFError(f'{what}: link {child!r} already has parent joint {joints[child].name!r}')
        axis_el = el.find('axis')
        axis = _floats(axis_el.get('xyz') if axis_el is not None else None, 3, f'{what} axis', (1, 0, 0))
        if jtype in _MOVABLE_TYPES:
            norm = np.linalg.norm(axis)
            if norm < 1e-12:
                raise URDFError(f'{what} has a zero-length axis')
            axis = axis / norm
            limit_el = el.find('limit')
            lo, up, eff, vel = (_limit_attr(limit_el, a, name) for a in ('lower', 'upper', 'effort', 'velocity'))
            if not lo < up:
                raise URDFError(f'{what}: lower limit {lo} is not below upper limit {up}')
            if eff <= 0 or vel <= 0:
                raise URDFError(f'{what}: effort ({eff}) and velocity ({vel}) limits must be positive')
            limits[name] = (lo, up, eff, vel)
        origin = _origin(el, what)
        origin.flags.writeable = False
        axis.flags.writeable = False
        joints[child] = ChainJoint(name, jtype, parent, child, origin, axis)

    chain = _chain(joints, BASE_LINK, TIP_LINK, source)
    movable = [j for j in chain if j.type in _MOVABLE_TYPES]
    names = tuple(j.name for j in movable)
    if names != JOINT_NAMES:
        raise URDFError(f'{source}: movable joints base_link -> needle_tip are {names}, '
                        f'the contract joint order is {JOINT_NAMES}')

    zframe_joint = joints.get(ZFRAME_LINK)
    if zframe_joint is None or zframe_joint.parent != BASE_LINK or zframe_joint.type != 'fixed':
        raise URDFError(f'{source}: {ZFRAME_LINK!r} must be attached to {BASE_LINK!r} by a fixed joint')

    table = np.array([limits[n] for n in names])
    return RobotModel(
        joint_names=names,
        joint_types=tuple(j.type for j in movable),
        lower=_readonly(table[:, 0]),
        upper=_readonly(table[:, 1]),
        effort=_readonly(table[:, 2]),
        velocity=_readonly(table[:, 3]),
        T_base_zframe=_readonly(zframe_joint.origin),
        chain=tuple(chain),
        urdf_path=None if source == '<string>' else os.fspath(source),
    )


def _chain(joints: dict, base: str, tip: str, source: str) -> list:
    """Joints from ``base`` to ``tip`` by walking parent links up from the tip."""
    chain, link = [], tip
    while link != base:
        joint = joints.get(link)
        if joint is None:
            raise URDFError(f'{source}: no joint chain from {base!r} to {tip!r} (stuck at link {link!r})')
        chain.append(joint)
        link = joint.parent
        if len(chain) > len(joints):
            raise URDFError(f'{source}: the joint graph has a cycle through {link!r}')
    return chain[::-1]
