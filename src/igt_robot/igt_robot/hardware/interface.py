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


class HardwareTimeout(HardwareError):
    """The controller did not answer in time."""


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
