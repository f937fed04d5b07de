"""Axis configuration (SI <-> encoder counts) and the controller's axis dynamics.

:class:`AxisConfig` holds one axis in SI units (m or rad, per second) plus its
encoder resolution, and converts between SI and the integer counts used on the
wire. :class:`AxisDynamics` is the motion profile the motor controller runs per
axis (the emulator uses it; it is pure arithmetic in counts, no I/O).

Defaults follow docs/contracts.md; :func:`default_axis_configs` takes joint
order, types, position and velocity limits from the URDF via
:func:`igt_robot.robot_model.load_robot_model` when that works, and falls back
to the contract values otherwise (so the emulator still runs stand-alone).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

from igt_robot.hardware import protocol

PRISMATIC = 'prismatic'
REVOLUTE = 'revolute'

#: Encoder resolution defaults: 1 µm per count on linear axes, 10 µrad per count
#: on rotary axes (10 µrad at 150 mm insertion is 1.5 µm at the needle tip).
DEFAULT_COUNTS_PER_METRE = 1_000_000.0
DEFAULT_COUNTS_PER_RADIAN = 100_000.0

# name -> (kind, lower, upper, v_max, a_max); SI. Positions/velocities per
# docs/contracts.md (URDF is authoritative when loadable); accelerations are not
# in the URDF (config/robot.yaml), so they come from here.
CONTRACT_AXES = (
    ('stage_x', PRISMATIC, -0.04, 0.04, 0.010, 0.02),
    ('stage_y', PRISMATIC, -0.04, 0.04, 0.010, 0.02),
    ('guide_pitch', REVOLUTE, -0.5236, 0.5236, 0.20, 0.5),
    ('guide_yaw', REVOLUTE, -0.5236, 0.5236, 0.20, 0.5),
    ('needle_insertion', PRISMATIC, 0.0, 0.150, 0.005, 0.01),
)
JOINT_NAMES = tuple(a[0] for a in CONTRACT_AXES)
_CONTRACT_ACCEL = {a[0]: a[5] for a in CONTRACT_AXES}


@dataclasses.dataclass(frozen=True)
class AxisConfig:
    """One axis in SI units: m (prismatic) or rad (revolute), per s, per s^2.

    ``counts_per_unit`` is encoder counts per m or per rad.
    """

    name: str
    kind: str
    lower: float
    upper: float
    max_velocity: float
    max_acceleration: float
    counts_per_unit: float

    def __post_init__(self):
        if self.kind not in (PRISMATIC, REVOLUTE):
            raise ValueError(f'axis {self.name!r}: kind must be {PRISMATIC!r} or {REVOLUTE!r}, got {self.kind!r}')
        for field in ('lower', 'upper', 'max_velocity', 'max_acceleration', 'counts_per_unit'):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f'axis {self.name!r}: {field} is not finite')
        if not self.lower < self.upper:
            raise ValueError(f'axis {self.name!r}: lower limit {self.lower} is not below upper limit {self.upper}')
        if self.max_velocity <= 0 or self.max_acceleration <= 0 or self.counts_per_unit <= 0:
            raise ValueError(f'axis {self.name!r}: velocity, acceleration and counts_per_unit must be positive')
        # Positions travel as int32 counts: the whole range must fit with margin.
        if max(abs(self.lower), abs(self.upper)) * self.counts_per_unit > 2 ** 30:
            raise ValueError(f'axis {self.name!r}: range x counts_per_unit does not fit an int32 encoder count')

    @property
    def unit(self) -> str:
        return 'm' if self.kind == PRISMATIC else 'rad'

    # -- SI <-> counts ------------------------------------------------------------
    def to_counts(self, value: float) -> int:
        """Position (m or rad) -> nearest encoder count."""
        return int(round(value * self.counts_per_unit))

    def from_counts(self, counts: float) -> float:
        """Encoder counts -> position (m or rad); also counts/s -> unit/s."""
        return counts / self.counts_per_unit

    def velocity_to_counts(self, value: float) -> int:
        """Velocity (m/s or rad/s) -> counts/s (rounded)."""
        return int(round(value * self.counts_per_unit))

    @property
    def min_counts(self) -> int:
        """Lowest target in counts (rounded inwards so it lies within the SI limit)."""
        return math.ceil(self.lower * self.counts_per_unit - 1e-9)

    @property
    def max_counts(self) -> int:
        """Highest target in counts (rounded inwards)."""
        return math.floor(self.upper * self.counts_per_unit + 1e-9)

    def format(self, value: float) -> str:
        """Human text of a quantity on this axis (mm or degrees, via robot_model's formatter)."""
        try:
            from igt_robot.robot_model import format_joint_quantity
        except ImportError:                      # stand-alone emulator without the robot model
            return f'{value:.6g} {self.unit}'
        return format_joint_quantity(self.kind, value)

    # -- wire form --------------------------------------------------------------------
    def to_axis_info(self) -> protocol.AxisInfo:
        """This axis as the controller reports it in AXIS_CONFIG."""
        return protocol.AxisInfo(
            kind=protocol.AXIS_KIND_PRISMATIC if self.kind == PRISMATIC else protocol.AXIS_KIND_REVOLUTE,
            counts_per_unit=float(self.counts_per_unit),
            min_counts=self.min_counts,
            max_counts=self.max_counts,
            max_velocity=max(1, int(math.floor(self.max_velocity * self.counts_per_unit))),
            max_acceleration=max(1, int(math.floor(self.max_acceleration * self.counts_per_unit))),
        )

    @classmethod
    def from_axis_info(cls, name: str, info: protocol.AxisInfo) -> 'AxisConfig':
        """The SI view of an axis reported by the controller."""
        if info.kind not in (protocol.AXIS_KIND_PRISMATIC, protocol.AXIS_KIND_REVOLUTE):
            raise ValueError(f'axis {name!r}: controller reports unknown axis kind {info.kind}')
        if not info.counts_per_unit > 0:
            raise ValueError(f'axis {name!r}: controller reports counts_per_unit {info.counts_per_unit}')
        cpu = info.counts_per_unit
        return cls(name=name,
                   kind=PRISMATIC if info.kind == protocol.AXIS_KIND_PRISMATIC else REVOLUTE,
                   lower=info.min_counts / cpu, upper=info.max_counts / cpu,
                   max_velocity=info.max_velocity / cpu, max_acceleration=info.max_acceleration / cpu,
                   counts_per_unit=cpu)


def default_counts_per_unit(kind: str) -> float:
    return DEFAULT_COUNTS_PER_METRE if kind == PRISMATIC else DEFAULT_COUNTS_PER_RADIAN


def contract_axis_configs(counts_per_unit: Optional[Sequence[float]] = None) -> List[AxisConfig]:
    """The five axes with the limits written in docs/contracts.md."""
    cpus = list(counts_per_unit) if counts_per_unit is not None else [None] * len(CONTRACT_AXES)
    if len(cpus) != len(CONTRACT_AXES):
        raise ValueError(f'counts_per_unit needs {len(CONTRACT_AXES)} values, got {len(cpus)}')
    return [AxisConfig(name, kind, lo, up, v, a, c if c is not None else default_counts_per_unit(kind))
            for (name, kind, lo, up, v, a), c in zip(CONTRACT_AXES, cpus)]


def default_axis_configs(counts_per_unit: Optional[Sequence[float]] = None,
                         use_robot_model: bool = True) -> Tuple[List[AxisConfig], str]:
    """Axis configuration for the controller and where it came from.

    Returns ``(axes, source)``; source is the URDF path or ``'contracts'`` (with
    the reason the URDF was not used). Position/velocity limits come from the
    URDF when :func:`igt_robot.robot_model.load_robot_model` works.
    """
    cpus = list(counts_per_unit) if counts_per_unit is not None else [None] * len(JOINT_NAMES)
    if len(cpus) != len(JOINT_NAMES):
        raise ValueError(f'counts_per_unit needs {len(JOINT_NAMES)} values ({", ".join(JOINT_NAMES)}), '
                         f'got {len(cpus)}')
    if use_robot_model:
        try:
            from igt_robot.robot_model import load_robot_model   # written by another module owner
            model = load_robot_model()
            names, kinds = tuple(model.joint_names), tuple(model.joint_types)
            if names != JOINT_NAMES:
                raise ValueError(f'robot model joints {names} differ from {JOINT_NAMES}')
            axes = [AxisConfig(n, k, float(lo), float(up), float(v), _CONTRACT_ACCEL[n],
                               c if c is not None else default_counts_per_unit(k))
                    for n, k, lo, up, v, c in zip(names, kinds, model.lower, model.upper, model.velocity, cpus)]
            return axes, str(getattr(model, 'urdf_path', None) or 'robot_model')
        except Exception as exc:   # noqa: BLE001 - any failure means "use the contract values"
            return contract_axis_configs(cpus), f'contracts (robot model unavailable: {type(exc).__name__}: {exc})'
    return contract_axis_configs(cpus), 'contracts'


class AxisDynamics:
    """Velocity- and acceleration-limited motion of one axis, in counts.

    The controller runs a motion profile (``profile_position``/``profile_velocity``)
    toward the target; the mechanics follow the profile exactly unless the axis
    is ``stalled`` (then the actual position stays put and the following error
    grows, which the controller detects).

    Tracking law per tick (``e`` = target - profile position)::

        v_des = clamp(v_ff + sign(e) * min(sqrt(a * |e|), kp * |e|), -v_lim, v_lim)
        v    += clamp(v_des - v, -a dt, a dt)

    ``sqrt(a|e|)`` is the braking curve for deceleration a/2: half the axis
    limit, so a discrete tick can always stay on it without overshoot. The
    ``kp|e|`` term takes over near the target for a smooth exponential finish,
    and the axis snaps onto the target once it is within half a count at a
    speed it can drop within one tick.
    """

    TRACK = 'track'
    STOP = 'stop'

    def __init__(self, max_velocity: float, max_acceleration: float, position: float = 0.0, kp: float = 30.0):
        if max_velocity <= 0 or max_acceleration <= 0:
            raise ValueError('max_velocity and max_acceleration must be positive (counts/s, counts/s^2)')
        self.max_velocity = float(max_velocity)
        self.max_acceleration = float(max_acceleration)
        self.kp = float(kp)
        self.position = float(position)          # actual (mechanical) position, counts
        self.velocity = 0.0                      # actual velocity, counts/s
        self.profile_position = float(position)  # commanded profile, counts
        self.profile_velocity = 0.0
        self.target = float(position)
        self.velocity_limit = self.max_velocity
        self.feedforward = 0.0
        self.mode = self.TRACK
        self.stalled = False

    # -- commands -------------------------------------------------------------------
    def set_target(self, target: float, velocity_limit: float = 0.0, feedforward: float = 0.0) -> None:
        """Move toward ``target`` (counts) at most at ``velocity_limit`` (counts/s, 0 = axis max)."""
        limit = self.max_velocity if velocity_limit <= 0 else min(float(velocity_limit), self.max_velocity)
        self.target = float(target)
        self.velocity_limit = limit
        self.feedforward = max(-limit, min(limit, float(feedforward)))
        self.mode = self.TRACK

    def hold(self) -> None:
        """Hold the actual position (re-synchronises the profile with the mechanics)."""
        self.profile_position = self.position
        self.profile_velocity = 0.0
        self.velocity = 0.0
        self.target = self.position
        self.feedforward = 0.0
        self.mode = self.TRACK

    def begin_stop(self) -> None:
        """Controlled stop: decelerate at the axis limit, then hold where it came to rest."""
        self.mode = self.STOP
        self.feedforward = 0.0

    def halt(self) -> None:
        """Immediate stop (e-stop / hard fault): zero velocity this instant."""
        self.hold()

    # -- state ----------------------------------------------------------------------------
    @property
    def following_error(self) -> float:
        """Profile minus actual position, counts."""
        return self.profile_position - self.position

    @property
    def moving(self) -> bool:
        """In motion, or about to be: a target not yet reached counts as moving,
        so a status read right after SET_TARGET never reports a false standstill."""
        return (self.profile_velocity != 0.0 or self.velocity != 0.0 or self.mode == self.STOP
                or self.target != self.profile_position)

    def step(self, dt: float) -> None:
        """Advance the profile and the mechanics by ``dt`` seconds."""
        a_dt = self.max_acceleration * dt
        v = self.profile_velocity
        if self.mode == self.STOP:
            v_des = 0.0
        else:
            err = self.target - self.profile_position
            mag = min(math.sqrt(self.max_acceleration * abs(err)), self.kp * abs(err))
            v_des = self.feedforward + math.copysign(mag, err)
            v_des = max(-self.velocity_limit, min(self.velocity_limit, v_des))
        v_new = v + max(-a_dt, min(a_dt, v_des - v))
        self.profile_position += 0.5 * (v + v_new) * dt
        self.profile_velocity = v_new
        if self.mode == self.STOP:
            if v_new == 0.0:
                self.target = self.profile_position
                self.mode = self.TRACK
        elif (self.feedforward == 0.0 and abs(self.target - self.profile_position) <= 0.5
              and abs(v_new) <= a_dt):
            # In position: snap onto the target (a change within one tick's acceleration).
            self.profile_position = self.target
            self.profile_velocity = 0.0
        if self.stalled:
            self.velocity = 0.0
        else:
            self.position = self.profile_position
            self.velocity = self.profile_velocity
