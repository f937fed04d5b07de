"""OpenIGTLink STATUS / STRING texts from the scanner -> :class:`ScannerPhase`.

Scanner bridges announce sequence start/stop as short texts, typically
``START_SEQUENCE``, ``STOP_SEQUENCE`` and ``PREPARE``, optionally followed by
the protocol name (``START_SEQUENCE:control scan`` or ``START_SEQUENCE control
scan``). Matching is case-insensitive and tolerant of surrounding whitespace.
Anything not recognised maps to ``UNKNOWN``, which counts as imaging: a message
we cannot read must never permit motion.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from .phases import ScannerPhase

# Command word -> phase. The plain phase names are accepted too so that our own
# simulator and test tools can speak the same channel.
_COMMANDS = {
    'START_SEQUENCE': ScannerPhase.ACQUIRING,
    'STOP_SEQUENCE': ScannerPhase.IDLE,
    'PREPARE': ScannerPhase.PREPARING,
    'IDLE': ScannerPhase.IDLE,
    'PREPARING': ScannerPhase.PREPARING,
    'ACQUIRING': ScannerPhase.ACQUIRING,
}

# Command word, then an optional separator (':', '=', whitespace) and protocol.
_TEXT_RE = re.compile(r'^\s*([A-Za-z_]+)\s*(?:[:=]\s*|\s+)?(.*?)\s*$', re.DOTALL)

# OpenIGTLink STATUS code 1 is "OK"; every other code reports a problem.
IGTL_STATUS_OK = 1


@dataclasses.dataclass(frozen=True)
class IgtlScannerText:
    """The decoded meaning of one scanner text message."""

    phase: ScannerPhase
    command: str          # recognised command word (upper case), '' when unrecognised
    protocol: str         # protocol name carried after the command, '' if none
    raw: str              # the text as received, for logging


def phase_from_igtl_text(text: Optional[str]) -> IgtlScannerText:
    """Interpret one STRING message body (or a STATUS status/error text).

    ``None``, empty or unrecognised text gives ``UNKNOWN`` (fail-safe).
    """
    raw = '' if text is None else str(text)
    match = _TEXT_RE.match(raw)
    if match:
        word = match.group(1).upper()
        phase = _COMMANDS.get(word)
        if phase is not None:
            return IgtlScannerText(phase=phase, command=word, protocol=match.group(2), raw=raw)
    return IgtlScannerText(phase=ScannerPhase.UNKNOWN, command='', protocol='', raw=raw)


def phase_from_igtl_status(code: int, error_name: str = '', status_string: str = '') -> IgtlScannerText:
    """Interpret an OpenIGTLink STATUS message.

    Bridges put the command either in the status string or in the 20-character
    error name; the status string is tried first. A non-OK status code means the
    scanner side reports a problem, so the phase is ``UNKNOWN`` whatever the text
    says.
    """
    raw = f'{error_name}|{status_string}'
    if int(code) != IGTL_STATUS_OK:
        return IgtlScannerText(phase=ScannerPhase.UNKNOWN, command='', protocol='', raw=raw)
    for text in (status_string, error_name):
        decoded = phase_from_igtl_text(text)
        if decoded.command:
            return dataclasses.replace(decoded, raw=raw)
    return IgtlScannerText(phase=ScannerPhase.UNKNOWN, command='', protocol='', raw=raw)
