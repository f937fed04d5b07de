"""The motor controller's own logic: trajectory buffer, servo reference, stop ramp, interlocks.

A pure model of the firmware (no I/O, no threads, no rclpy, no wall clock). Time advances
only through :meth:`ControllerCore.step` (one servo tick) or :meth:`ControllerCore.advance`;
the caller injects the clock. The firmware emulator runs it at >= 1 kHz in its own process,
the MuJoCo backend runs it at the physics rate in simulated time; both therefore model the
*same* controller.

Units are whatever the caller gives the axis limits in (the emulator works in encoder
counts, the MuJoCo backend in m / rad); time is always in seconds.

What the core decides (the host only asks):

* **Reference generation** per servo tick, in one of four modes:
  ``hold`` (stand still), ``track`` (legacy SET_TARGET: velocity/acceleration-limited
  tracking of a target, optional feed-forward), ``stream`` (cubic-Hermite interpolation of
  buffered PVT points) and ``ramp`` (controlled stop).
* **Controlled stop**: from the current reference velocity, every axis decelerates so that
  all axes come to rest at the same instant, the slowest-stopping axis at exactly its own
  deceleration limit and the others below theirs. Stopping synchronised keeps the tool on
  the tangent of its path instead of bending it (each axis braking on its own would).
  The buffer is flushed and the stream reports *why* (``StreamStatus.stop_cause``).
* **Stop causes**: STOP (host), INHIBIT (host MOTION_INHIBIT), TRIGGER (an imaging edge on
  the scanner-trigger input), WATCHDOG (host silent), UNDERRUN (buffer ran empty before a
  ``final`` point), ESTOP, FAULT, LIMIT (limit switch / soft limit).
* **Inhibit**: the host's MOTION_INHIBIT and the trigger input. A rising trigger edge latches
  the inhibit; while the trigger input says imaging, the host cannot release it
  (:class:`Refusal` ``TRIGGER_ACTIVE``). After the trigger has fallen the inhibit stays until
  the host releases it explicitly: motion never resumes by itself. The trigger is the OR of two
  inputs: the cable from the scanner and the trigger port's level, which a silent relay turns into
  imaging and a latched TRIGGER_PORT fault (``trigger_port_timeout``, the watchdog period); RESET_FAULTS
  clears it and disarms a silent port.
* **Watchdog**: enabled and no host frame for ``watchdog_timeout`` -> WATCHDOG fault,
  controlled ramp, then the axes are de-energised.

Mechanics (how the axes follow the reference) and the following-error check stay with the
caller: the emulator's axes follow exactly unless stalled, MuJoCo simulates a servo.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Callable, Deque, List, Optional, Sequence

import numpy as np

from igt_robot.hardware.interface import PvtPoint, StreamStatus

HOLD = 'hold'
TRACK = 'track'
STREAM = 'stream'
RAMP = 'ramp'

#: Faults that cut motion at once (position or power no longer trustworthy). Every other
#: fault ramps down under control first. Both then de-energise the axes.
IMMEDIATE_FAULTS = frozenset({'OVERCURRENT', 'ENCODER', 'LIMIT_SWITCH', 'SUPPLY', 'INTERNAL'})

#: Gain (1/s) of the linear finish of ``track`` onto its target (~33 ms time constant).
FINISH_GAIN = 30.0
#: ``track`` setpoints further apart than this (s) are not a stream of setpoints: no
#: feed-forward is estimated from them, and explicit feed-forward expires after this long.
FEEDFORWARD_MAX_PERIOD = 0.1
#: A ``track`` setpoint's feed-forward bridges at least this long (s): a host late by up to
#: this much does not make the axis brake; a silent host drags it at most v_max * this.
FEEDFORWARD_BRIDGE = 0.05
#: Relative slack on the velocity limit when checking PVT segments (interpolation round-off).
VELOCITY_SLACK = 1e-6
#: A stream point more than this far (s) after the previous one is refused: a time-stamp error,
#: not a trajectory.
MAX_POINT_SPACING = 1.0
#: Default bound on the buffered look-ahead (s). It bounds how long the axes keep moving after the
#: host dies (then the buffer underruns and the controller ramps down), and it is what the
#: watchdog tolerates on top of its own period while a stream runs (see ControllerCore).
DEFAULT_MAX_LOOKAHEAD = 1.0
#: A stream starts executing once this much trajectory (s) is buffered, or its final point is in:
#: a first batch that needs several frames is not already running dry between them.
DEFAULT_START_LOOKAHEAD = 0.1

DEFAULT_BUFFER_CAPACITY = 128
DEFAULT_SERVO_PERIOD = 0.001
#: The scanner trigger's inputs: the cable from the scanner and the trigger port's level (serial protocol §9).
TRIGGER_SOURCES = ('WIRED', 'PORT')
#: Trigger-port silence read as imaging when the core has no host watchdog to take the period from, s.
DEFAULT_TRIGGER_PORT_TIMEOUT = 0.3


class Refusal(Exception):
    """The controller refused a command. ``reason`` is a protocol NAK reason name
    (``NOT_ENABLED``, ``INHIBITED``, ``TRIGGER_ACTIVE``, ``ESTOPPED``, ``FAULTED``, ``RANGE``,
    ``BAD_VALUE``, ``STREAM_ACTIVE``, ``STREAM_CLOSED``, ``BUFFER_FULL``, ``TIME_ORDER``,
    ``START_MISMATCH``, ``MOVING``); ``axis`` the axis concerned (or None); ``fault`` the
    blocking fault name for FAULTED."""

    def __init__(self, reason: str, message: str, axis: Optional[int] = None, fault: str = ''):
        super().__init__(f'{reason}: {message}')
        self.reason = reason
        self.axis = axis
        self.fault = fault


@dataclasses.dataclass(frozen=True)
class AxisLimits:
    """One axis as the controller knows it (caller's units: counts or m / rad)."""

    lower: float
    upper: float
    max_velocity: float
    max_acceleration: float        # also the deceleration limit of the stop ramp
    resolution: float              # one encoder count (snap distance is half of it)
    name: str = ''

    def __post_init__(self):
        values = (self.lower, self.upper, self.max_velocity, self.max_acceleration, self.resolution)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f'axis {self.name!r}: limits must be finite, got {values}')
        if not self.lower < self.upper:
            raise ValueError(f'axis {self.name!r}: lower limit {self.lower} is not below upper {self.upper}')
        if min(self.max_velocity, self.max_acceleration, self.resolution) <= 0:
            raise ValueError(f'axis {self.name!r}: velocity, acceleration and resolution must be positive')


@dataclasses.dataclass
class _Stream:
    stream_id: int
    start_positions: np.ndarray
    points: Deque[PvtPoint] = dataclasses.field(default_factory=deque)
    segment_start: Optional[PvtPoint] = None      # the knot the current segment starts from
    start_tick: Optional[int] = None              # servo tick at stream time 0 (first point)
    executed_time: float = 0.0
    buffered_until: float = 0.0
    final_received: bool = False
    state: str = 'open'                           # open | running | ramping | done | stopped
    stop_cause: str = ''


class ControllerCore:
    """The motor-controller firmware's decisions, clock-injected.

    :param axes: one :class:`AxisLimits` per axis.
    :param servo_period: servo tick, s (<= 1 ms: the controller servos at >= 1 kHz).
    :param buffer_capacity: PVT points the trajectory buffer holds.
    :param watchdog_timeout: host silence (s) that trips the watchdog while enabled; None = off.
        While a stream runs the limit is ``watchdog_timeout + max_lookahead``: a host stall shorter
        than the buffer changes nothing, and a dead host's motion still ends at the buffer's end
        (UNDERRUN ramp), then the watchdog latches.
    :param max_lookahead: points more than this (s) ahead of the executed stream time are refused.
    :param start_lookahead: a stream starts executing once this much (s) is buffered or its
        final point has arrived.
    :param start_tolerance: per-axis (or scalar) distance the host's stream start may differ
        from the controller's reference; default 50 encoder counts.
    :param positions: initial (power-on) positions; default the lower limit clipped to 0.
    :param measure: optional callable returning the mechanics' measured positions; the core
        re-synchronises its reference to them when it energises or halts (like a drive that
        holds where the axis actually is). Default: the reference itself.
    """

    def __init__(self, axes: Sequence[AxisLimits], servo_period: float = DEFAULT_SERVO_PERIOD,
                 buffer_capacity: int = DEFAULT_BUFFER_CAPACITY, watchdog_timeout: Optional[float] = 0.1,
                 start_tolerance=None, positions: Optional[Sequence[float]] = None,
                 measure: Optional[Callable[[], np.ndarray]] = None,
                 max_lookahead: float = DEFAULT_MAX_LOOKAHEAD,
                 start_lookahead: float = DEFAULT_START_LOOKAHEAD):
        if not axes:
            raise ValueError('the controller needs at least one axis')
        if not (math.isfinite(servo_period) and 0 < servo_period <= 0.001):
            raise ValueError(f'servo_period must be in (0, 0.001] s (>= 1 kHz), got {servo_period!r}')
        if int(buffer_capacity) != buffer_capacity or buffer_capacity < 2:
            raise ValueError(f'buffer_capacity must be an integer >= 2, got {buffer_capacity!r}')
        if watchdog_timeout is not None and not (math.isfinite(watchdog_timeout) and watchdog_timeout > 0):
            raise ValueError(f'watchdog_timeout must be positive seconds or None, got {watchdog_timeout!r}')
        self.axes = tuple(axes)
        n = len(self.axes)
        self.lower = np.array([a.lower for a in self.axes])
        self.upper = np.array([a.upper for a in self.axes])
        self.v_max = np.array([a.max_velocity for a in self.axes])
        self.a_max = np.array([a.max_acceleration for a in self.axes])
        self.snap = 0.5 * np.array([a.resolution for a in self.axes])
        tol = 50.0 * np.array([a.resolution for a in self.axes]) if start_tolerance is None else start_tolerance
        self.start_tolerance = np.broadcast_to(np.asarray(tol, dtype=float), (n,)).copy()
        self.servo_period = float(servo_period)
        self.buffer_capacity = int(buffer_capacity)
        if not (math.isfinite(max_lookahead) and max_lookahead > 0):
            raise ValueError(f'max_lookahead must be positive seconds, got {max_lookahead!r}')
        self.watchdog_timeout = watchdog_timeout
        self.max_lookahead = float(max_lookahead)
        if not 0 < start_lookahead <= max_lookahead:
            raise ValueError(f'start_lookahead must be in (0, max_lookahead], got {start_lookahead!r}')
        self.start_lookahead = float(start_lookahead)
        self._measure = measure
        if positions is None:
            start = np.clip(np.zeros(n), self.lower, self.upper)
        else:
            start = np.asarray(positions, dtype=float)
            if start.shape != (n,) or not np.all((start >= self.lower) & (start <= self.upper)):
                raise ValueError(f'initial positions {start.tolist()} not {n} values within the limits')
        # The servo tick runs on plain float lists: for a handful of axes, numpy's per-call
        # overhead would cost more than the arithmetic (the emulator ticks at 1 kHz in Python).
        self._n = n
        self._lo, self._hi = self.lower.tolist(), self.upper.tolist()
        self._amax, self._snapl, self._vmaxl = self.a_max.tolist(), self.snap.tolist(), self.v_max.tolist()
        # Reference (what the servo tracks) -------------------------------------------------
        self._pos = start.tolist()
        self._vel = [0.0] * n
        self.mode = HOLD
        # track mode
        self._tgt = start.tolist()
        self._vlim = self.v_max.tolist()
        self._ff = [0.0] * n
        self._ff_expiry = 0.0
        self._last_write_time: Optional[float] = None
        self._last_write_target = start.copy()
        # stream segment being interpolated: (start knot, end knot, t0, h, per-axis cubic coefficients)
        self._segment = None
        # ramp
        self._ramp_decel = [0.0] * n
        self._ramp_ticks_left = 0
        self._ramp_power_off = False
        # Machine state -------------------------------------------------------------------------
        self.ticks = 0
        self.enabled = False
        self.estop = False
        self.estop_input = False
        self.faults: List[str] = []              # latched, in order of occurrence
        self.fault_axes: set = set()
        self.host_inhibit = False
        self.trigger_latch = False               # set by a rising edge, released by the host
        self.trigger_edges = 0
        # The trigger has two inputs, OR-ed (``trigger``): the wired one and the trigger port's level
        # (serial protocol §9).
        self.trigger_inputs = {source: False for source in TRIGGER_SOURCES}
        self.trigger_port_timeout = float(watchdog_timeout if watchdog_timeout is not None
                                          else DEFAULT_TRIGGER_PORT_TIMEOUT)
        self.trigger_port_armed = False          # a relay has spoken on the port since power-on / reset
        self.trigger_port_silent = False         # ... and then fell silent: its level reads as imaging
        self.trigger_port_last = 0.0
        self.trigger_port_timeouts = 0
        self.last_host_time = 0.0
        self.watchdog_trips = 0
        self.underruns = 0
        self.ramp_started_tick: Optional[int] = None   # tick at which the latest ramp began
        self.last_stop_cause = ''
        self._stream: Optional[_Stream] = None
        self._next_stream_id = 1

    # ================================================================ time

    @property
    def ref_pos(self) -> np.ndarray:
        """The servo reference position per axis (what the axes are commanded to)."""
        return np.array(self._pos)

    @property
    def ref_vel(self) -> np.ndarray:
        """The servo reference velocity per axis."""
        return np.array(self._vel)

    def reference(self):
        """(positions, velocities) of the servo reference as tuples of floats: the cheap form
        for a caller that runs every servo tick."""
        return tuple(self._pos), tuple(self._vel)

    @property
    def time(self) -> float:
        """Controller time since power-on, s (ticks x servo period: no drift)."""
        return self.ticks * self.servo_period

    def advance(self, duration: float) -> int:
        """Run as many whole servo ticks as fit in ``duration`` s; returns how many ran."""
        ticks = int(math.floor(duration / self.servo_period + 1e-9))
        for _ in range(ticks):
            self.step()
        return ticks

    def step(self) -> None:
        """One servo tick: watchdog, then the reference advances by one servo period."""
        self.ticks += 1
        now = self.time
        if (self.enabled and self.watchdog_timeout is not None and 'WATCHDOG' not in self.faults
                and now - self.last_host_time > self.watchdog_limit):
            self.watchdog_trips += 1
            self.latch_fault('WATCHDOG')
        if (self.trigger_port_armed and not self.trigger_port_silent
                and now - self.trigger_port_last > self.trigger_port_timeout):
            # The relay stopped talking: we cannot know the scanner is idle, so it is imaging; and the relay's
            # loss is latched as a fault, which the operator sees and acknowledges (RESET_FAULTS), not something
            # that clears itself when a relay speaks again.
            self.trigger_port_silent = True
            self.trigger_port_timeouts += 1
            self.set_trigger(True, source='PORT')
            self.latch_fault('TRIGGER_PORT')
        if not self.enabled:
            return
        if self.mode == STREAM:
            self._step_stream()
        elif self.mode == RAMP:
            self._step_ramp()
        elif self.mode == TRACK:
            self._step_track()

    @property
    def watchdog_limit(self) -> float:
        """Host silence tolerated now, s (longer while a stream runs from its buffer)."""
        running = self._stream is not None and self._stream.state == 'running'
        return self.watchdog_timeout + (self.max_lookahead if running else 0.0)

    # ================================================================ host link

    def host_seen(self) -> None:
        """A valid frame from the host arrived (feeds the watchdog)."""
        self.last_host_time = self.time

    def trigger_port_seen(self) -> None:
        """A valid frame arrived on the trigger port after its handshake: the port is armed (from now on its
        silence for ``trigger_port_timeout`` reads as imaging) and its timer restarts. A relay that speaks
        again after falling silent does not lower the level by speaking: only its TRIGGER_LEVEL 0 does."""
        self.trigger_port_armed = True
        self.trigger_port_silent = False
        self.trigger_port_last = self.time

    # ================================================================ state queries

    @property
    def trigger(self) -> bool:
        """The scanner trigger's level (True = imaging): the OR of its inputs."""
        return any(self.trigger_inputs.values())

    @property
    def inhibited(self) -> bool:
        return self.host_inhibit or self.trigger_latch or self.trigger

    @property
    def inhibit_cause(self) -> str:
        """'' | 'HOST' | 'TRIGGER' | 'HOST+TRIGGER'."""
        causes = []
        if self.host_inhibit:
            causes.append('HOST')
        if self.trigger or self.trigger_latch:
            causes.append('TRIGGER')
        return '+'.join(causes)

    @property
    def moving(self) -> bool:
        """In motion or about to be (a target not yet reached, a running stream, a ramp)."""
        if not self.enabled:
            return False
        if self.mode in (STREAM, RAMP) or any(self._vel):
            return True
        return self.mode == TRACK and self._pos != self._tgt

    @property
    def ramping(self) -> bool:
        return self.mode == RAMP

    @property
    def stopping_to_off(self) -> bool:
        return self.mode == RAMP and self._ramp_power_off

    def stream_status(self) -> StreamStatus:
        s = self._stream
        if s is None:
            return StreamStatus(free_slots=self.buffer_capacity, underruns=self.underruns)
        return StreamStatus(
            stream_id=s.stream_id, active=s.state in ('running', 'ramping'), done=s.state == 'done',
            executed_time=s.executed_time, buffered_until=s.buffered_until,
            free_slots=self.buffer_capacity - len(s.points), underruns=self.underruns,
            stop_cause=s.stop_cause)

    @property
    def stream_state(self) -> str:
        """'' (no stream yet) | 'open' | 'running' | 'ramping' | 'done' | 'stopped'."""
        return '' if self._stream is None else self._stream.state

    @property
    def target(self) -> np.ndarray:
        """The legacy SET_TARGET setpoint being tracked (or held)."""
        return np.array(self._tgt)

    @property
    def stream_open(self) -> bool:
        """A stream accepts points (begun, not yet ended)."""
        return self._stream is not None and self._stream.state in ('open', 'running')

    # ================================================================ checks

    def _blocking(self, allow_inhibit: bool = False) -> Optional[Refusal]:
        if self.estop or self.estop_input:
            return Refusal('ESTOPPED', 'e-stop is latched; release it, then reset faults')
        if self.faults:
            return Refusal('FAULTED', f'fault {self.faults[0]} is latched; reset faults first',
                           fault=self.faults[0])
        if not self.enabled or self.stopping_to_off:
            return Refusal('NOT_ENABLED', 'the axes are not enabled')
        if not allow_inhibit and self.inhibited:
            return Refusal('INHIBITED', f'motion inhibit is active (cause {self.inhibit_cause})')
        return None

    def _check_vector(self, values, what: str) -> np.ndarray:
        arr = np.asarray(values, dtype=float)
        if arr.shape != self.lower.shape:
            raise Refusal('BAD_VALUE', f'{what} needs {len(self.axes)} values, got shape {arr.shape}')
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise Refusal('BAD_VALUE', f'{what} not finite', axis=int(bad[0]))
        return arr

    def _check_range(self, positions: np.ndarray, what: str) -> None:
        out = np.flatnonzero((positions < self.lower) | (positions > self.upper))
        if out.size:
            i = int(out[0])
            raise Refusal('RANGE', f'{what} {positions[i]:.9g} for axis {self.axes[i].name or i} is outside '
                                   f'[{self.lower[i]:.9g}, {self.upper[i]:.9g}]', axis=i)

    # ================================================================ host commands

    def enable(self) -> None:
        """Energise, holding where the axes are. Refused while e-stopped or faulted."""
        if self.estop or self.estop_input:
            raise Refusal('ESTOPPED', 'e-stop is latched; release it, then reset faults')
        if self.faults:
            raise Refusal('FAULTED', f'fault {self.faults[0]} is latched; reset faults first', fault=self.faults[0])
        if self.stopping_to_off:
            self._ramp_power_off = False          # keep decelerating, but stay energised afterwards
        elif not self.enabled:
            self._hold_at(self._measured())
        self.enabled = True
        self.last_host_time = self.time

    def disable(self) -> None:
        """Controlled stop, then de-energise."""
        if self.enabled:
            self._begin_ramp('STOP', power_off=True)

    def stop(self) -> None:
        """Controlled stop (ramp, flush the buffer, hold). Cause STOP."""
        if self.enabled:
            self._begin_ramp('STOP')

    def emergency_stop(self) -> None:
        """Cut motion this instant, de-energise, latch until :meth:`reset_faults`."""
        self.estop = True
        self._halt('ESTOP')

    def set_inhibit(self, inhibit: bool) -> None:
        """Host MOTION_INHIBIT. Setting it ramps any motion down (cause INHIBIT). Releasing it is
        refused (``TRIGGER_ACTIVE``) while the trigger input says imaging; it also releases the
        latch of a trigger edge that has since fallen."""
        if inhibit:
            self.host_inhibit = True
            if self.enabled and self.moving:
                self._begin_ramp('INHIBIT')
            self._end_open_stream('INHIBIT')
            return
        if self.trigger:
            raise Refusal('TRIGGER_ACTIVE', 'the scanner-trigger input says imaging: the inhibit stays '
                                            'until the trigger input falls')
        self.host_inhibit = False
        self.trigger_latch = False

    def reset_faults(self) -> None:
        """Clear latched faults and e-stop (the axes stay de-energised until enable)."""
        if self.estop_input:
            raise Refusal('ESTOPPED', 'the e-stop input is still active')
        self.faults.clear()
        self.fault_axes.clear()
        self.estop = False
        if self.trigger_port_silent:
            # Acknowledging the TRIGGER_PORT fault is also the operator's way out when the relay is gone for
            # good: the port is disarmed and its level dropped (the host's own interlock still stops motion for
            # imaging). A relay that comes back arms it again.
            self.trigger_port_armed = self.trigger_port_silent = False
            self.set_trigger(False, source='PORT')

    def set_target(self, positions, velocity_limits=None, feedforward=None) -> None:
        """Legacy single setpoint (SET_TARGET / write()): track ``positions`` within the limits.

        ``velocity_limits``: per-axis caps (0 or None = the axis maximum). ``feedforward``: the
        setpoint's velocity (for setpoint streams); without it a velocity is estimated from
        successive setpoints arriving within FEEDFORWARD_MAX_PERIOD. Feed-forward expires
        (1.5 setpoint periods, at least FEEDFORWARD_BRIDGE), so a silent host drags an axis only
        a bounded distance past its last setpoint.
        """
        target = self._check_vector(positions, 'target')
        refusal = self._blocking()
        if refusal:
            raise refusal
        if self.stream_open or self.mode == RAMP and self._stream is not None and self._stream.state == 'ramping':
            raise Refusal('STREAM_ACTIVE', 'a trajectory stream is active; stop it first')
        self._check_range(target, 'target')
        vlim = self.v_max.copy()
        if velocity_limits is not None:
            lim = self._check_vector(velocity_limits, 'velocity limit')
            if np.any(lim < 0):
                raise Refusal('BAD_VALUE', 'velocity limits must be >= 0', axis=int(np.flatnonzero(lim < 0)[0]))
            vlim = np.where(lim > 0, np.minimum(lim, self.v_max), self.v_max)
        now = self.time
        interval = None if self._last_write_time is None else now - self._last_write_time
        streaming = interval is not None and 0 < interval <= FEEDFORWARD_MAX_PERIOD
        if feedforward is not None:
            ff = self._check_vector(feedforward, 'feed-forward velocity')
        elif streaming:
            ff = (target - self._last_write_target) / interval
        elif interval == 0.0:
            ff = np.array(self._ff)            # a second setpoint within one tick: keep the estimate
        else:
            ff = np.zeros_like(target)
        self._ff = np.clip(ff, -vlim, vlim).tolist()
        if interval != 0.0 or feedforward is not None:
            self._ff_expiry = now + (max(1.5 * interval, FEEDFORWARD_BRIDGE) if streaming
                                     else FEEDFORWARD_MAX_PERIOD)
        self._last_write_time = now
        self._last_write_target = target.copy()
        self._tgt = target.tolist()
        self._vlim = vlim.tolist()
        self.mode = TRACK                      # supersedes a host STOP ramp, as SET_TARGET always did

    def begin_stream(self, start_positions) -> int:
        """Open a stream from the current standstill; returns its id.

        Refused while disabled, inhibited, e-stopped, faulted, moving, with another stream
        running, or when ``start_positions`` differs from the controller's reference by more
        than ``start_tolerance`` (the host planned from somewhere else). The stream's time 0
        is the arrival of its first point; its implicit first knot is the controller's own
        reference at rest (no jump even within the tolerance).
        """
        start = self._check_vector(start_positions, 'start positions')
        refusal = self._blocking()
        if refusal:
            raise refusal
        s = self._stream
        if s is not None and s.state in ('running', 'ramping'):
            raise Refusal('STREAM_ACTIVE', f'stream {s.stream_id} is still executing')
        if self.moving:
            raise Refusal('MOVING', 'the axes are moving; stop them before starting a stream')
        off = np.abs(start - self.ref_pos) > self.start_tolerance
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise Refusal('START_MISMATCH', f'stream starts at {start[i]:.9g} on axis {self.axes[i].name or i}, '
                                            f'the axis is at {self.ref_pos[i]:.9g}', axis=i)
        stream_id = self._next_stream_id
        self._next_stream_id = self._next_stream_id % 0xFFFF + 1       # u16 on the wire, never 0
        self._stream = _Stream(stream_id, self.ref_pos.copy())
        self._stream.segment_start = PvtPoint(0.0, self.ref_pos.copy(), np.zeros(len(self.axes)))
        return stream_id

    def push_points(self, stream_id: int, points: Sequence[PvtPoint], final: bool = False) -> StreamStatus:
        """Append points (all or none). Refused for another or ended stream, a full buffer, times
        not strictly increasing (or not beyond what was executed), positions outside the limits
        anywhere along the interpolated segment, velocities above the limits, a ``final`` point
        with non-zero velocity, or while inhibited / not enabled. The stream's clock starts
        (time 0) with the push that brings the buffer to ``start_lookahead`` or holds the final
        point."""
        s = self._stream
        if s is None or s.stream_id != stream_id:
            raise Refusal('STREAM_CLOSED', f'stream {stream_id} is not the current stream '
                                           f'({s.stream_id if s else "none"})')
        if s.state not in ('open', 'running'):
            why = f'stopped ({s.stop_cause})' if s.stop_cause else s.state
            raise Refusal('STREAM_CLOSED', f'stream {stream_id} has ended: {why}')
        if s.final_received:
            raise Refusal('STREAM_CLOSED', f'stream {stream_id} already received its final point')
        refusal = self._blocking()
        if refusal:
            raise refusal
        if not points:
            if final:
                raise Refusal('BAD_VALUE', 'a final batch needs at least one point')
            return self.stream_status()
        if len(s.points) + len(points) > self.buffer_capacity:
            raise Refusal('BUFFER_FULL', f'{len(points)} points do not fit ({self.buffer_capacity - len(s.points)} '
                                         f'free slots)')
        prev = s.points[-1] if s.points else s.segment_start
        prev_pos, prev_vel = np.asarray(prev.positions, dtype=float).tolist(), \
            np.asarray(prev.velocities, dtype=float).tolist()
        checked = []
        for k, p in enumerate(points):
            pos = self._check_vector(p.positions, f'point {k} position')
            vel = self._check_vector(p.velocities, f'point {k} velocity')
            pos_l, vel_l = pos.tolist(), vel.tolist()
            t = float(p.time)
            if not math.isfinite(t) or t <= prev.time or t <= s.executed_time:
                after = max(prev.time, s.executed_time)
                raise Refusal('TIME_ORDER', f'point {k} time {t!r} s is not after {after:.6f} s')
            if t - s.executed_time > self.max_lookahead:
                raise Refusal('BUFFER_FULL', f'point {k} at {t:.3f} s is more than {self.max_lookahead} s ahead '
                                             f'of the executed {s.executed_time:.3f} s')
            if t - prev.time > MAX_POINT_SPACING:
                raise Refusal('TIME_ORDER', f'point {k} is {t - prev.time:.3f} s after the previous one '
                                            f'(at most {MAX_POINT_SPACING} s)')
            self._check_segment(prev.time, prev_pos, prev_vel, t, pos_l, vel_l, k)
            point = PvtPoint(t, pos, vel)
            checked.append(point)
            prev, prev_pos, prev_vel = point, pos_l, vel_l
        if final and np.any(checked[-1].velocities):
            raise Refusal('BAD_VALUE', 'the final point must have zero velocity')
        s.points.extend(checked)
        s.buffered_until = checked[-1].time
        s.final_received = bool(final)
        if s.state == 'open' and (s.final_received or s.buffered_until >= self.start_lookahead - 1e-9):
            s.state = 'running'
            s.start_tick = self.ticks
            self.mode = STREAM
        return self.stream_status()

    def _check_segment(self, t0: float, p0: List[float], v0: List[float], t1: float, p1: List[float],
                       v1: List[float], k: int) -> None:
        """Position and velocity limits at the new knot and along the whole Hermite segment
        from the previous one (the cubic's extrema can lie between the knots). Plain floats:
        this runs for every point the controller receives."""
        h = t1 - t0
        for i in range(self._n):
            lo, hi, vmax = self._lo[i], self._hi[i], self._vmaxl[i] * (1 + VELOCITY_SLACK)
            name = self.axes[i].name or i
            if not lo <= p1[i] <= hi:
                raise Refusal('RANGE', f'point {k} position {p1[i]:.9g} for axis {name} is outside '
                                       f'[{lo:.9g}, {hi:.9g}]', axis=i)
            if abs(v1[i]) > vmax:
                raise Refusal('RANGE', f'point {k} velocity {v1[i]:.9g} above the limit {self._vmaxl[i]:.9g} '
                                       f'on axis {name}', axis=i)
            # p(u) = c0 + c1 u + c2 u^2 + c3 u^3 on u in [0, 1]; dp/dt = (c1 + 2 c2 u + 3 c3 u^2) / h
            c0, m0, m1 = p0[i], v0[i] * h, v1[i] * h
            c2 = -3 * c0 - 2 * m0 + 3 * p1[i] - m1
            c3 = 2 * c0 + m0 - 2 * p1[i] + m1
            if c3 != 0.0:
                u = -c2 / (3 * c3)                       # velocity extremum (acceleration zero)
                if 0.0 < u < 1.0:
                    v = (m0 + 2 * c2 * u + 3 * c3 * u * u) / h
                    if abs(v) > vmax:
                        raise Refusal('RANGE', f'segment to point {k} reaches {abs(v):.9g}/s on axis {name} '
                                               f'(limit {self._vmaxl[i]:.9g}/s)', axis=i)
            for u in _quadratic_roots(3 * c3, 2 * c2, m0):   # position extrema
                if 0.0 < u < 1.0:
                    x = c0 + u * (m0 + u * (c2 + u * c3))
                    if not lo <= x <= hi:
                        raise Refusal('RANGE', f'segment to point {k} passes {x:.9g} on axis {name}, outside '
                                               f'[{lo:.9g}, {hi:.9g}]', axis=i)

    # ================================================================ inputs

    def set_trigger(self, level: bool, source: str = 'WIRED') -> None:
        """One input of the scanner trigger (``source``: 'WIRED', the cable from the scanner, or 'PORT', the
        trigger port's level). The trigger is the OR of both. A rising edge (imaging) ramps any motion down
        (cause TRIGGER), flushes the buffer and latches the inhibit until the host releases it after the
        edge."""
        if source not in self.trigger_inputs:
            raise ValueError(f'trigger source must be one of {", ".join(TRIGGER_SOURCES)}, got {source!r}')
        was = self.trigger
        self.trigger_inputs[source] = bool(level)
        if self.trigger and not was:
            self.trigger_edges += 1
            self.trigger_latch = True
            if self.enabled and self.moving:
                self._begin_ramp('TRIGGER')
            self._end_open_stream('TRIGGER')

    def set_estop_input(self, pressed: bool) -> None:
        self.estop_input = bool(pressed)
        if pressed:
            self.emergency_stop()

    def latch_fault(self, name: str, axis: Optional[int] = None) -> None:
        """Latch a fault; immediate faults halt and de-energise, others ramp down then de-energise."""
        if name not in self.faults:
            self.faults.append(name)
        if axis is not None:
            self.fault_axes.add(int(axis))
        cause = 'WATCHDOG' if name == 'WATCHDOG' else 'LIMIT' if name == 'LIMIT_SWITCH' else 'FAULT'
        if not self.enabled:
            self._end_stream(cause)
            return
        if name in IMMEDIATE_FAULTS:
            self._halt(cause)
        elif not self.stopping_to_off:
            self._begin_ramp(cause, power_off=True)

    # ================================================================ reference generation

    def _measured(self) -> np.ndarray:
        if self._measure is None:
            return self.ref_pos.copy()
        return np.clip(np.asarray(self._measure(), dtype=float), self.lower, self.upper)

    def _hold_at(self, positions: np.ndarray) -> None:
        self._pos = [float(p) for p in positions]
        self._vel = [0.0] * self._n
        self._tgt = list(self._pos)
        self._ff = [0.0] * self._n
        self._ff_expiry = 0.0
        self._last_write_time = None
        self.mode = HOLD

    def _halt(self, cause: str) -> None:
        """Immediate stop at the measured position, de-energised."""
        self._end_stream(cause)
        self._hold_at(self._measured())
        self.enabled = False
        self._ramp_power_off = False

    def _end_open_stream(self, cause: str) -> None:
        """A stream that was begun but has no points yet ends with ``cause`` (no motion to stop)."""
        if self._stream is not None and self._stream.state == 'open':
            self._end_stream(cause)

    def _end_stream(self, cause: str) -> None:
        s = self._stream
        if s is not None and s.state in ('open', 'running', 'ramping'):
            s.points.clear()
            if s.state != 'ramping' or not s.stop_cause:
                s.stop_cause = cause
            s.state = 'stopped'
            self.last_stop_cause = s.stop_cause

    def _begin_ramp(self, cause: str, power_off: bool = False) -> None:
        """Controlled stop from the current velocity, all axes reaching rest together."""
        s = self._stream
        if s is not None and s.state in ('open', 'running'):
            s.points.clear()                     # flush: nothing buffered runs after a stop
            s.stop_cause = cause
            s.state = 'ramping' if s.state == 'running' else 'stopped'
        self.last_stop_cause = cause
        self._ramp_power_off = self._ramp_power_off or power_off if self.mode == RAMP else power_off
        if self.mode == RAMP:
            return                               # already decelerating as fast as allowed
        self.ramp_started_tick = self.ticks
        v = self._vel
        stop_time = max(abs(vi) / ai for vi, ai in zip(v, self._amax))
        self.mode = RAMP
        if stop_time <= 0.0:
            self._ramp_ticks_left = 0
            self._ramp_decel = [0.0] * self._n
            self._finish_ramp()
            return
        # Whole ticks; the deceleration is then slightly below the limit of the slowest axis.
        ticks = max(1, math.ceil(stop_time / self.servo_period - 1e-9))
        self._ramp_ticks_left = ticks
        self._ramp_decel = [vi / (ticks * self.servo_period) for vi in v]

    def _step_ramp(self) -> None:
        dt = self.servo_period
        v = self._vel
        self._ramp_ticks_left -= 1
        if self._ramp_ticks_left <= 0:
            v_new = [0.0] * self._n
        else:
            v_new = [vi - di * dt for vi, di in zip(v, self._ramp_decel)]
        self._pos = [min(max(p + 0.5 * (a + b) * dt, lo), hi)
                     for p, a, b, lo, hi in zip(self._pos, v, v_new, self._lo, self._hi)]
        self._vel = v_new
        if self._ramp_ticks_left <= 0:
            self._finish_ramp()

    def _finish_ramp(self) -> None:
        s = self._stream
        if s is not None and s.state == 'ramping':
            s.state = 'stopped'
        if self._ramp_power_off:
            # De-energised, a (non-backdrivable) axis stays where it physically is.
            self._hold_at(self._measured())
            self.enabled = False
            self._ramp_power_off = False
        else:
            self._hold_at(self._pos)

    def _step_stream(self) -> None:
        s = self._stream
        t = (self.ticks - s.start_tick) * self.servo_period
        while s.points and s.points[0].time <= t:
            s.segment_start = s.points.popleft()
        if not s.points:
            end = s.segment_start
            s.executed_time = end.time
            self._pos = [float(p) for p in end.positions]
            self._vel = [float(v) for v in end.velocities]
            self._segment = None
            if s.final_received:
                s.state = 'done'
                self._hold_at(self._pos)
                return
            # Ran dry before the final point: the host fell behind. Stop from here.
            self.underruns += 1
            self._begin_ramp('UNDERRUN')
            return
        s.executed_time = t
        a, b = s.segment_start, s.points[0]
        seg = self._segment
        if seg is None or seg[0] is not a or seg[1] is not b:
            h = b.time - a.time
            c1, c2, c3 = _coefficients(a, b, h)
            seg = self._segment = (a, b, a.time, h, list(zip(np.asarray(a.positions, dtype=float).tolist(),
                                                             c1.tolist(), c2.tolist(), c3.tolist())))
        _, _, t0, h, coeffs = seg
        u = (t - t0) / h
        # Knots are within the limits; the Hermite extrema were checked on push: clip only round-off.
        self._pos = [min(max(c0 + u * (c1 + u * (c2 + u * c3)), lo), hi)
                     for (c0, c1, c2, c3), lo, hi in zip(coeffs, self._lo, self._hi)]
        self._vel = [(c1 + u * (2 * c2 + 3 * u * c3)) / h for _, c1, c2, c3 in coeffs]

    def _step_track(self) -> None:
        """Velocity- and acceleration-limited tracking of the SET_TARGET setpoint.

        Per axis (e = target - reference)::

            v_des = clip(v_ff + sign(e) * min(sqrt(a |e|), K |e|), -v_lim, v_lim)
            v    += clip(v_des - v, -a dt, a dt)

        sqrt(a|e|) is the braking curve for half the axis deceleration, so a discrete tick can
        always stay on it (no overshoot); K|e| gives a smooth exponential finish; the reference
        snaps onto a static target within half an encoder count at a speed it can shed in a tick.
        """
        dt = self.servo_period
        now = self.time
        bridging = now < self._ff_expiry and self._last_write_time is not None
        elapsed = now - self._last_write_time if bridging else 0.0
        pos, vel, done = [], [], True
        for i in range(self._n):
            lo, hi, a = self._lo[i], self._hi[i], self._amax[i]
            p, v, goal = self._pos[i], self._vel[i], self._tgt[i]
            if bridging:
                ff = self._ff[i]
                target = min(max(goal + ff * elapsed, lo), hi)
            else:
                ff, target = 0.0, goal
            err = target - p
            distance = abs(err)
            magnitude = min(math.sqrt(a * distance), FINISH_GAIN * distance)
            vlim = self._vlim[i]
            v_des = min(max(ff + math.copysign(magnitude, err), -vlim), vlim)
            a_dt = a * dt
            v_new = v + min(max(v_des - v, -a_dt), a_dt)
            ref = min(max(p + 0.5 * (v + v_new) * dt, lo), hi)
            if ff == 0.0 and abs(target - ref) <= self._snapl[i] and abs(v_new) <= a_dt:
                ref, v_new = target, 0.0
            pos.append(ref)
            vel.append(v_new)
            done = done and v_new == 0.0 and ref == goal
        self._pos, self._vel = pos, vel
        if done:
            self.mode = HOLD


# ==================================================================== interpolation

def hermite(a: PvtPoint, b: PvtPoint, t: float):
    """Cubic-Hermite position and velocity at time ``t`` on the segment a -> b."""
    h = b.time - a.time
    s = (t - a.time) / h
    s2, s3 = s * s, s * s * s
    p0, p1 = np.asarray(a.positions, dtype=float), np.asarray(b.positions, dtype=float)
    m0, m1 = np.asarray(a.velocities, dtype=float) * h, np.asarray(b.velocities, dtype=float) * h
    pos = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * m1
    vel = ((6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * m1) / h
    return pos, vel


def _coefficients(a: PvtPoint, b: PvtPoint, h: float):
    """Per-axis cubic p(s) = c0 + c1 s + c2 s^2 + c3 s^3 on s in [0, 1]."""
    p0, p1 = np.asarray(a.positions, dtype=float), np.asarray(b.positions, dtype=float)
    m0, m1 = np.asarray(a.velocities, dtype=float) * h, np.asarray(b.velocities, dtype=float) * h
    c2 = -3 * p0 - 2 * m0 + 3 * p1 - m1
    c3 = 2 * p0 + m0 - 2 * p1 + m1
    return m0, c2, c3


def _quadratic_roots(qa: float, qb: float, qc: float) -> List[float]:
    """Real roots of qa x^2 + qb x + qc (a linear equation when qa is 0)."""
    if qa == 0.0:
        return [-qc / qb] if qb != 0.0 else []
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return []
    root = math.sqrt(disc)
    return [(-qb - root) / (2 * qa), (-qb + root) / (2 * qa)]
