"""A serial port's modem-status line used as a scanner "imaging" trigger.

Many scanners expose a gating/"X-ray on"/"sequence running" contact that is
wired to an RS-232 status input (CTS, DSR, CD or RI) of a host serial port and
read with pyserial (``port.cts`` ...). Which line carries it and its polarity
depend on the installation, so both are configuration.

Debounce is deliberately asymmetric (fail-safe): the *imaging* level is adopted
as soon as it has been stable for ``assert_debounce_s`` (default 0 s, i.e.
immediately), while a return to *idle* needs ``release_debounce_s`` of stable
idle level. A contact glitch can therefore only cause a spurious hold, never a
spurious release.
"""
from __future__ import annotations

from typing import Mapping, Optional

from .phases import ScannerPhase

MODEM_LINES = ('CTS', 'DSR', 'CD', 'RI')


class ModemTriggerInterpreter:
    """Turn periodic modem-line readings into a debounced :class:`ScannerPhase`.

    Times are host monotonic seconds passed in by the caller.
    """

    def __init__(self, line: str = 'CTS', active_high: bool = True,
                 assert_debounce_s: float = 0.0, release_debounce_s: float = 0.05):
        key = str(line).strip().upper()
        if key not in MODEM_LINES:
            raise ValueError(f'modem trigger line {line!r} is not one of {", ".join(MODEM_LINES)}')
        for name, value in (('assert_debounce_s', assert_debounce_s),
                            ('release_debounce_s', release_debounce_s)):
            if not (value >= 0.0) or value != value or value == float('inf'):
                raise ValueError(f'{name} must be a finite value >= 0 s, got {value!r}')
        self.line = key
        self.active_high = bool(active_high)
        self.assert_debounce_s = float(assert_debounce_s)
        self.release_debounce_s = float(release_debounce_s)
        self._stable_imaging: Optional[bool] = None   # None until the first valid reading
        self._candidate: Optional[bool] = None
        self._candidate_since = 0.0
        self._read_error = False

    def level_means_imaging(self, level: bool) -> bool:
        """Apply the configured polarity to a raw line level."""
        return bool(level) == self.active_high

    def read_line(self, modem_bits) -> bool:
        """Extract the configured line from a mapping ({'CTS': True, ...}, any key case)
        or from an object with pyserial-style attributes (``.cts``, ``.dsr``, ``.cd``, ``.ri``)."""
        if isinstance(modem_bits, Mapping):
            for key, value in modem_bits.items():
                if str(key).upper() == self.line:
                    return bool(value)
            raise KeyError(f'modem reading has no {self.line} line: keys {sorted(modem_bits)}')
        attr = self.line.lower()
        if not hasattr(modem_bits, attr):
            raise KeyError(f'modem reading object has no attribute {attr!r}')
        return bool(getattr(modem_bits, attr))

    def update(self, modem_bits, now: float) -> ScannerPhase:
        """Feed one reading taken at ``now``; return the debounced phase."""
        imaging = self.level_means_imaging(self.read_line(modem_bits))
        self._read_error = False
        if self._stable_imaging is None:
            # First reading: accept imaging at once; idle only after the release
            # debounce (we have no history proving the line is really idle).
            if imaging:
                self._stable_imaging = True
                self._candidate = None
                return self.phase
            self._stable_imaging = True
        if imaging == self._stable_imaging:
            self._candidate = None
        else:
            if self._candidate is not imaging:
                self._candidate = imaging
                self._candidate_since = now
            needed = self.assert_debounce_s if imaging else self.release_debounce_s
            # 1 ns slack so that readings on an exact debounce boundary are not
            # lost to floating-point rounding of the timestamps.
            if now - self._candidate_since >= needed - 1e-9:
                self._stable_imaging = imaging
                self._candidate = None
        return self.phase

    def report_read_error(self) -> ScannerPhase:
        """The port could not be read: the phase becomes UNKNOWN until a good reading."""
        self._read_error = True
        return self.phase

    @property
    def phase(self) -> ScannerPhase:
        """Current debounced phase (UNKNOWN before the first reading or after a read error).

        A line trigger cannot tell preparation from acquisition, so imaging is
        reported as ACQUIRING.
        """
        if self._read_error or self._stable_imaging is None:
            return ScannerPhase.UNKNOWN
        return ScannerPhase.ACQUIRING if self._stable_imaging else ScannerPhase.IDLE
