"""A scripted scanner for simulation, demos and tests.

A schedule is a list of :class:`ScanEvent` (start time, duration, protocol,
CT flag and dose figures). :meth:`SimulatedScannerSchedule.state_at` answers
"what is the scanner doing at time t" deterministically, so a simulation node
only needs a clock. Dose figures use the units scanners report them in (DICOM
RDSR conventions): CTDIvol in mGy, DLP in mGy·cm, tube voltage in kV, tube
current-time product in mAs. They are zero for MRI events.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Iterable, List, Optional, Sequence

from igt_robot.record.dose import DoseFactors

from .phases import ScannerPhase


@dataclasses.dataclass(frozen=True)
class ScanEvent:
    """One acquisition. Times in seconds on the schedule's clock.

    ``prepare_s`` seconds before ``start`` the scanner is PREPARING (pre-scan
    adjustments, tube warm-up); from ``start`` for ``duration`` it is ACQUIRING.
    """

    start: float
    duration: float
    protocol: str = ''
    is_ct: bool = False
    ctdi_vol_mgy: float = 0.0
    dlp_mgy_cm: float = 0.0
    kv: float = 0.0
    mas: float = 0.0
    prepare_s: float = 0.0

    def __post_init__(self):
        for name in ('start', 'duration', 'ctdi_vol_mgy', 'dlp_mgy_cm', 'kv', 'mas', 'prepare_s'):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f'ScanEvent.{name} must be a finite number, got {value!r}')
        if self.duration <= 0.0:
            raise ValueError(f'ScanEvent.duration must be > 0 s, got {self.duration}')
        if self.prepare_s < 0.0:
            raise ValueError(f'ScanEvent.prepare_s must be >= 0, got {self.prepare_s}')
        self.dose   # noqa: B018 -- validates the dose figures
        if not self.is_ct and self.dose.reported:
            raise ValueError(f'ScanEvent {self.protocol!r}: dose figures given for a non-CT (MRI) event')

    @property
    def dose(self) -> DoseFactors:
        """The event's dose figures, checked by the one dose validator (DoseValueError is a ValueError)."""
        return DoseFactors(self.ctdi_vol_mgy, self.dlp_mgy_cm, self.kv, self.mas)

    @property
    def busy_from(self) -> float:
        """First instant the scanner is not idle because of this event."""
        return self.start - self.prepare_s

    @property
    def end(self) -> float:
        """First instant after the acquisition."""
        return self.start + self.duration

    @classmethod
    def from_dict(cls, d: dict) -> 'ScanEvent':
        """Build from a config mapping (YAML); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f'unknown ScanEvent keys {sorted(unknown)}; allowed {sorted(names)}')
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SimulatedScannerState:
    """The scanner state at one instant."""

    phase: ScannerPhase
    protocol: str = ''
    event_index: int = -1           # index into the schedule, -1 when idle
    is_ct: bool = False
    ctdi_vol_mgy: float = 0.0
    dlp_mgy_cm: float = 0.0
    kv: float = 0.0
    mas: float = 0.0
    time_to_next_s: float = math.inf  # until the next event becomes busy (prepare or start)


class SimulatedScannerSchedule:
    """Deterministic phase-at-time lookup over non-overlapping scan events."""

    def __init__(self, events: Iterable[ScanEvent]):
        evs: List[ScanEvent] = sorted(
            (e if isinstance(e, ScanEvent) else ScanEvent.from_dict(dict(e)) for e in events),
            key=lambda e: e.busy_from)
        for a, b in zip(evs, evs[1:]):
            if b.busy_from < a.end:
                raise ValueError(
                    f'scan events overlap: {a.protocol!r} busy until {a.end:.3f} s but '
                    f'{b.protocol!r} busy from {b.busy_from:.3f} s')
        self.events: Sequence[ScanEvent] = tuple(evs)
        self._busy_from = [e.busy_from for e in evs]

    def state_at(self, t: float) -> SimulatedScannerState:
        """Phase (and the active event's protocol/dose) at time ``t`` in seconds."""
        i = bisect.bisect_right(self._busy_from, t) - 1
        nxt = i + 1
        time_to_next = self._busy_from[nxt] - t if nxt < len(self.events) else math.inf
        if i >= 0:
            ev = self.events[i]
            if t < ev.end:
                phase = ScannerPhase.PREPARING if t < ev.start else ScannerPhase.ACQUIRING
                return SimulatedScannerState(
                    phase=phase, protocol=ev.protocol, event_index=i, is_ct=ev.is_ct,
                    ctdi_vol_mgy=ev.ctdi_vol_mgy, dlp_mgy_cm=ev.dlp_mgy_cm, kv=ev.kv, mas=ev.mas,
                    time_to_next_s=time_to_next)
        return SimulatedScannerState(phase=ScannerPhase.IDLE, time_to_next_s=time_to_next)

    def cumulative_dlp_mgy_cm(self, t: float) -> float:
        """Dose-length product delivered up to ``t`` (a CT event counts once completed
        or pro rata while acquiring), in mGy·cm."""
        total = 0.0
        for ev in self.events:
            if not ev.is_ct or t <= ev.start:
                continue
            fraction = min(1.0, (t - ev.start) / ev.duration)
            total += ev.dlp_mgy_cm * fraction
        return total

    def next_event_after(self, t: float) -> Optional[ScanEvent]:
        """The first event that becomes busy strictly after ``t``, or None."""
        i = bisect.bisect_right(self._busy_from, t)
        return self.events[i] if i < len(self.events) else None
