"""The scanner phase seen by the safety layer."""
from __future__ import annotations

import enum


class ScannerPhase(str, enum.Enum):
    """What the scanner is doing, as far as the robot is concerned.

    ``PREPARING`` (pre-scan: tuning, shimming, tube warm-up), ``ACQUIRING`` and
    ``UNKNOWN`` all inhibit motion: robot motion during acquisition causes image
    artefacts (MRI) or moves hardware through the beam (CT), and an unknown
    state must be treated as the dangerous one.
    """

    IDLE = 'IDLE'
    PREPARING = 'PREPARING'
    ACQUIRING = 'ACQUIRING'
    UNKNOWN = 'UNKNOWN'


def is_imaging(phase: ScannerPhase) -> bool:
    """True for every phase except IDLE (fail-safe)."""
    return ScannerPhase(phase) is not ScannerPhase.IDLE


def parse_phase(value) -> ScannerPhase:
    """Accept a ScannerPhase or its name (case-insensitive); raise ValueError otherwise.

    Used at API boundaries (ROS message strings) so that a typo is a clear error
    instead of a silently permissive state.
    """
    if isinstance(value, ScannerPhase):
        return value
    if isinstance(value, str):
        key = value.strip().upper()
        try:
            return ScannerPhase(key)
        except ValueError:
            pass
    raise ValueError(
        f'unknown scanner phase {value!r}; expected one of '
        f'{", ".join(p.value for p in ScannerPhase)}')
