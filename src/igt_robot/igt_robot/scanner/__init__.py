"""Scanner-state sources, pure logic (no rclpy, no I/O).

Every source ends in the same :class:`ScannerPhase`; the safety supervisor only
ever sees phases. Fail-safe rule shared by all of them: anything that is not a
positively known ``IDLE`` counts as imaging (motion inhibited).

* :mod:`.phases`     -- the phase enum and the "is imaging" rule.
* :mod:`.igtl_text`  -- OpenIGTLink STATUS / STRING texts -> phase.
* :mod:`.modem`      -- a serial modem-status line (CTS/DSR/CD/RI) as trigger.
* :mod:`.simulated`  -- a scripted scan schedule with CT dose figures.
* :mod:`.staleness`  -- no fresh update within a timeout -> UNKNOWN.
"""
from .phases import ScannerPhase, is_imaging, parse_phase
from .igtl_text import IgtlScannerText, phase_from_igtl_status, phase_from_igtl_text
from .modem import MODEM_LINES, ModemTriggerInterpreter
from .simulated import ScanEvent, SimulatedScannerSchedule, SimulatedScannerState
from .staleness import StalenessGuard

__all__ = [
    'ScannerPhase', 'is_imaging', 'parse_phase',
    'IgtlScannerText', 'phase_from_igtl_status', 'phase_from_igtl_text',
    'MODEM_LINES', 'ModemTriggerInterpreter',
    'ScanEvent', 'SimulatedScannerSchedule', 'SimulatedScannerState',
    'StalenessGuard',
]
