"""Staleness rule: a scanner phase is only believed while it is fresh."""
from __future__ import annotations

import math
from typing import Optional

from .phases import ScannerPhase, parse_phase


class StalenessGuard:
    """Holds the last reported phase and degrades it to UNKNOWN when old.

    ``timeout`` (s): if no update arrived within it, :meth:`phase` returns
    ``UNKNOWN`` (imaging, motion inhibited). Before the first update the phase
    is ``UNKNOWN`` too. ``now`` is host monotonic seconds supplied by the caller.
    """

    def __init__(self, timeout: float):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0.0):
            raise ValueError(f'staleness timeout must be a finite value > 0 s, got {timeout!r}')
        self.timeout = float(timeout)
        self._phase: Optional[ScannerPhase] = None
        self._last_update: Optional[float] = None

    def update(self, phase, now: float) -> None:
        """Record a fresh phase reading taken at ``now``."""
        self._phase = parse_phase(phase)
        self._last_update = float(now)

    def age(self, now: float) -> float:
        """Seconds since the last update (inf if none yet)."""
        return math.inf if self._last_update is None else float(now) - self._last_update

    def is_stale(self, now: float) -> bool:
        """True when no update arrived within ``timeout`` (or never)."""
        return self.age(now) > self.timeout

    def phase(self, now: float) -> ScannerPhase:
        """The last phase if fresh, otherwise UNKNOWN."""
        if self._phase is None or self.is_stale(now):
            return ScannerPhase.UNKNOWN
        return self._phase

    @property
    def last_phase(self) -> Optional[ScannerPhase]:
        """The last reported phase regardless of age (for display)."""
        return self._phase
