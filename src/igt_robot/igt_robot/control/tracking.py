"""Tracking-error monitor: does the robot follow its setpoints?

Compares measured joint positions with where the trajectory says they should be
at the controller's executed stream time (the streaming executor takes both from
one hardware reading, so host jitter does not enter), every executor cycle. Per joint:

* ``tolerance``: exceeded for ``consecutive_cycles`` cycles in a row -> fault
  (a single noisy sample or a short transient does not trip it);
* ``hard_limit``: exceeded once -> fault immediately (a collision or a stuck
  axis must not wait N cycles).

The tolerance must cover the drive's normal lag: roughly ``v_max * lag`` plus
encoder quantisation. Units per joint: m or rad. A fault latches until reset().
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrackingFault:
    """Why the monitor tripped (error = measured - commanded, m or rad)."""

    joint: str
    index: int
    error: float
    threshold: float
    kind: str          # 'hard_limit' or 'tolerance'
    cycles: int        # consecutive cycles over tolerance when it tripped

    def describe(self) -> str:
        if self.kind == 'hard_limit':
            return (f'{self.joint} tracking error {self.error:+.5f} exceeds hard limit '
                    f'{self.threshold:.5f}')
        return (f'{self.joint} tracking error {self.error:+.5f} over tolerance {self.threshold:.5f} '
                f'for {self.cycles} consecutive cycles')


class TrackingMonitor:
    """Per-joint tracking-error check with debounce and hard limit (see module docstring)."""

    def __init__(self, tolerance: Sequence[float], hard_limit: Sequence[float],
                 consecutive_cycles: int = 5, joint_names: Tuple[str, ...] = ()):
        tol = np.asarray(tolerance, dtype=float).reshape(-1)
        hard = np.broadcast_to(np.asarray(hard_limit, dtype=float), tol.shape).copy()
        if not (np.isfinite(tol).all() and (tol > 0).all()):
            raise ValueError(f'tracking tolerance must be finite and > 0 per joint, got {tol}')
        if not (np.isfinite(hard).all() and (hard >= tol).all()):
            raise ValueError('tracking hard_limit must be finite and >= tolerance per joint')
        if int(consecutive_cycles) < 1:
            raise ValueError(f'consecutive_cycles must be >= 1, got {consecutive_cycles!r}')
        names = tuple(joint_names) or tuple(f'joint{i}' for i in range(tol.size))
        if len(names) != tol.size:
            raise ValueError(f'{len(names)} joint names for {tol.size} tolerances')
        self.tolerance = tol
        self.hard_limit = hard
        self.consecutive_cycles = int(consecutive_cycles)
        self.joint_names = names
        self.reset()

    def reset(self) -> None:
        """Clear counters and the latched fault (start of a new motion)."""
        self._counts = np.zeros(self.tolerance.size, dtype=int)
        self.fault: Optional[TrackingFault] = None
        self.last_error = np.zeros(self.tolerance.size)

    def update(self, commanded, measured) -> Optional[TrackingFault]:
        """Check one cycle; return the (latched) fault or None."""
        if self.fault is not None:
            return self.fault
        err = np.asarray(measured, dtype=float).reshape(-1) - np.asarray(commanded, dtype=float).reshape(-1)
        if err.size != self.tolerance.size:
            raise ValueError(f'tracking update with {err.size} joints, expected {self.tolerance.size}')
        self.last_error = err
        mag = np.abs(err)
        # NaN must trip, so test "within" and negate.
        hard = ~(mag <= self.hard_limit)
        if hard.any():
            i = int(np.flatnonzero(hard)[0])
            self.fault = TrackingFault(self.joint_names[i], i, float(err[i]), float(self.hard_limit[i]),
                                       'hard_limit', int(self._counts[i]) + 1)
            return self.fault
        over = mag > self.tolerance
        self._counts = np.where(over, self._counts + 1, 0)
        tripped = self._counts >= self.consecutive_cycles
        if tripped.any():
            i = int(np.flatnonzero(tripped)[0])
            self.fault = TrackingFault(self.joint_names[i], i, float(err[i]), float(self.tolerance[i]),
                                       'tolerance', int(self._counts[i]))
        return self.fault
