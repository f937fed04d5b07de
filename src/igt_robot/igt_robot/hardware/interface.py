"""The one hardware interface every backend implements.

The motion controller and the hardware node only ever talk to a
:class:`HardwareInterface`. Backends: ``serial`` (real motor controller via
pyserial, also used against the firmware emulator on a pseudo-terminal) and
``mujoco`` (physics simulation). Units are SI: joint positions in m (prismatic)
or rad (revolute), velocities per second.

Safety contract for every backend:
* A fresh backend is disabled; nothing moves before :meth:`enable`.
* :meth:`write` is refused (raises :class:`HardwareFault` subclass or returns
  False) when disabled, inhibited, estopped or faulted.
* :meth:`set_motion_inhibit` (True) makes the axes decelerate to a stop and hold
  at the hardware level, independent of the host; it stays until cleared.
* :meth:`emergency_stop` cuts motion immediately and latches until
  :meth:`reset_faults`.
* Faults latch: they stay in ``state().faults`` until :meth:`reset_faults`.

Trajectory streaming (protocol 2, see docs/serial_protocol.md): the host sends
time-stamped PVT points (position, velocity, time) ahead of time; the
controller interpolates and servos at its own rate and stops *itself* (ramp at
its own deceleration limits, buffer flushed, cause reported in
``StreamStatus.stop_cause``) on MOTION_INHIBIT, an imaging edge on its scanner
trigger input, watchdog expiry, buffer underrun, STOP or a fault. While the
trigger input says imaging, :meth:`set_motion_inhibit` (False) is refused: that
inhibit does not depend on the host. A host stall shorter than the buffered
look-ahead changes nothing.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Optional, Sequence

import numpy as np


class HardwareError(RuntimeError):
    """Any failure of a hardware backend; the message says what and why."""


class HardwareFault(HardwareError):
    """A latched fault reported by (or detected in) the hardware."""

    def __init__(self, code: str, message: str):
        super().__init__(f'{code}: {message}')
        self.code = code


class CommandRefused(HardwareFault):
    """The controller refused a command; ``code`` says why: a NAK reason name such as
    ``'NOT_ENABLED'``, ``'INHIBITED'``, ``'TRIGGER_ACTIVE'`` (the scanner-trigger input says
    imaging), ``'ESTOPPED'``, ``'RANGE'``, ``'STREAM_ACTIVE'``, ``'STREAM_CLOSED'``,
    ``'BUFFER_FULL'``, ``'TIME_ORDER'``, ``'START_MISMATCH'``, ``'MOVING'``, ``'REPLAY'``, or for a
    latched fault the fault's name (``'WATCHDOG'``, ...)."""


class HardwareTimeout(HardwareError):
    """The controller did not answer in time."""


@dataclasses.dataclass(frozen=True)
class PvtPoint:
    """One trajectory point for the controller's buffer.

    ``time`` is on the stream's own clock, s: 0 is the moment the controller
    starts executing the stream (when 100 ms of points are buffered, or the
    final point is in), strictly increasing from point to point (so the
    first point has time > 0; the stream's implicit first knot is the
    controller's own rest position at time 0 with zero velocity). The controller reaches ``positions``
    (m / rad, joint order) with ``velocities`` (m/s, rad/s) at ``time`` and
    interpolates between points (cubic Hermite) at its servo rate. The
    reference model of that controller is
    :class:`igt_robot.hardware.controller_core.ControllerCore`.
    """

    time: float
    positions: np.ndarray
    velocities: np.ndarray


# Why a controller stopped a stream by itself (StreamStatus.stop_cause).
STOP_CAUSES = ('', 'STOP', 'INHIBIT', 'TRIGGER', 'WATCHDOG', 'UNDERRUN', 'ESTOP', 'FAULT', 'LIMIT')


@dataclasses.dataclass(frozen=True)
class StreamStatus:
    """The controller's trajectory buffer, as last read."""

    stream_id: int = 0                 # id of the current/last stream (0 = none yet)
    active: bool = False               # points are being executed (or the stop ramp is running)
    done: bool = False                 # the final point was reached; the axes hold there
    executed_time: float = 0.0         # stream time the controller has reached, s
    buffered_until: float = 0.0        # stream time of the last buffered point, s
    free_slots: int = 0                # points the buffer can still take
    underruns: int = 0                 # buffer underruns since connect (each one a controlled stop)
    stop_cause: str = ''               # one of STOP_CAUSES: why the controller ended the stream itself

    @property
    def lookahead(self) -> float:
        """Buffered trajectory ahead of the controller, s."""
        return max(0.0, self.buffered_until - self.executed_time) if self.active else 0.0


@dataclasses.dataclass
class HardwareState:
    """A snapshot of the hardware, in SI units."""

    stamp: float                      # host monotonic time of the reading, s
    positions: np.ndarray             # joint positions (m or rad), encoder-quantised
    velocities: np.ndarray            # joint velocities (m/s or rad/s)
    enabled: bool = False
    motion_inhibited: bool = False
    estopped: bool = False
    moving: bool = False
    faults: tuple = ()                # latched fault codes, e.g. ('WATCHDOG',)
    scanner_trigger: bool = False     # the controller's scanner-trigger input
    firmware_version: str = ''
    counters: dict = dataclasses.field(default_factory=dict)  # diagnostics counters
    inhibit_cause: str = ''           # why the controller's inhibit is set: HOST, TRIGGER or both ('HOST+TRIGGER')
    stream: Optional[StreamStatus] = None   # trajectory buffer (None: backend without streaming)


class HardwareInterface(abc.ABC):
    """Enable / disable / read / write / stop / emergency stop / status & faults."""

    joint_names: Sequence[str] = ()

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the link (port, simulation); check firmware version. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop motion if possible and release the link. Idempotent."""

    @abc.abstractmethod
    def enable(self) -> None:
        """Energise the axes (holding current position)."""

    @abc.abstractmethod
    def disable(self) -> None:
        """De-energise the axes after stopping them."""

    @abc.abstractmethod
    def read(self) -> HardwareState:
        """Fetch the latest state (positions, velocities, flags, faults)."""

    @abc.abstractmethod
    def write(self, positions: Sequence[float], velocities: Optional[Sequence[float]] = None) -> None:
        """Command position setpoints (and optional feed-forward velocities).

        Raises HardwareError when the setpoint is refused (out of range, not
        enabled, inhibited, estopped, faulted).
        """

    @abc.abstractmethod
    def stop(self) -> None:
        """Controlled stop: decelerate within the axis limits, then hold."""

    @abc.abstractmethod
    def emergency_stop(self) -> None:
        """Immediate stop; latches until reset_faults()."""

    @abc.abstractmethod
    def set_motion_inhibit(self, inhibit: bool) -> None:
        """Hardware motion-inhibit (defence in depth beside the host's own stop)."""

    @abc.abstractmethod
    def reset_faults(self) -> None:
        """Clear latched faults and e-stop (an explicit operator step upstream)."""

    def heartbeat(self) -> None:
        """Tell the controller the host is alive (no-op where not needed)."""

    # -- trajectory streaming (protocol 2) ----------------------------------------------------------

    def begin_stream(self, start_positions: Sequence[float]) -> int:
        """Open a new stream starting at ``start_positions`` (must match the axes within tolerance).

        Returns the stream id. Refused (HardwareError) while disabled, inhibited,
        estopped, faulted or while another stream is active.
        """
        raise NotImplementedError(f'{type(self).__name__} does not stream trajectories')

    def push_points(self, stream_id: int, points: Sequence[PvtPoint], final: bool = False) -> StreamStatus:
        """Append points to the stream's buffer; ``final`` marks the last point of the stream
        (it must have zero velocity; the buffer running empty after it is the end, not an underrun).
        Refused (HardwareError) for a stream the controller has already stopped, a full buffer,
        non-increasing times or points outside the limits."""
        raise NotImplementedError(f'{type(self).__name__} does not stream trajectories')

    def stream_status(self) -> StreamStatus:
        """The trajectory buffer's state (also in ``read().stream``)."""
        raise NotImplementedError(f'{type(self).__name__} does not stream trajectories')
