"""Fault codes, fault records and events of the safety supervisor."""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple


class SafetyState(str, enum.Enum):
    """Supervisor states; see docs/safety.md for the diagram."""

    INIT = 'INIT'            # not every required input seen yet: no motion
    READY = 'READY'          # motion permitted
    SCAN_HOLD = 'SCAN_HOLD'  # scanner imaging / unknown / stale: no motion, no acknowledge needed
    HOLD = 'HOLD'            # all clear, waiting for the operator's explicit resume
    FAULT = 'FAULT'          # latched fault: acknowledge (or reset) once the cause has cleared
    ESTOP = 'ESTOP'          # e-stop active or not yet reset after release


class FaultCode(str, enum.Enum):
    """Fault codes raised by the supervisor itself.

    ``report_fault`` also accepts free-form codes (e.g. a controller's
    ``WATCHDOG``), so codes are compared as upper-case strings.
    """

    HEARTBEAT_LOST = 'HEARTBEAT_LOST'          # a required node stopped sending heartbeats
    SCANNER_SILENT = 'SCANNER_SILENT'          # no scanner-state message within scanner_timeout
    HARDWARE_FAULT = 'HARDWARE_FAULT'          # latched fault reported by the motor controller
    TRACKING_ERROR = 'TRACKING_ERROR'          # measured position left the commanded one
    JOINT_LIMIT = 'JOINT_LIMIT'                # a joint beyond its limit (+ tolerance)
    WORKSPACE_LIMIT = 'WORKSPACE_LIMIT'        # needle tip outside the allowed box (base_link)
    INSERTION_LIMIT = 'INSERTION_LIMIT'        # needle deeper than the allowed insertion depth
    INVALID_JOINT_STATE = 'INVALID_JOINT_STATE'  # NaN/inf joint positions


def normalise_code(code) -> str:
    """FaultCode or string -> the canonical upper-case code string."""
    if isinstance(code, FaultCode):
        return code.value
    text = str(code).strip().upper()
    if not text:
        raise ValueError('fault code must be a non-empty string')
    return text


@dataclasses.dataclass(frozen=True)
class FaultInfo:
    """One latched fault as shown to operators.

    ``since`` is the supervisor's monotonic time (s) when it was raised;
    ``condition_active`` tells whether the cause is still present (an
    acknowledge only clears faults whose cause has gone).
    """

    code: str
    detail: str
    since: float
    source: str = ''
    condition_active: bool = False

    @property
    def key(self) -> Tuple[str, str]:
        return (self.code, self.source)

    def describe(self) -> str:
        return f'Fault {self.code}: {self.detail}'


class EventKind(str, enum.Enum):
    TRANSITION = 'TRANSITION'        # state changed (from_state != to_state)
    FAULT_RAISED = 'FAULT_RAISED'
    FAULT_CLEARED = 'FAULT_CLEARED'  # removed by acknowledge/reset
    COMMAND = 'COMMAND'              # operator command accepted or refused


@dataclasses.dataclass(frozen=True)
class SafetyEvent:
    """Something the node should publish (as a ProcedureEvent) and log."""

    stamp: float
    kind: EventKind
    from_state: SafetyState
    to_state: SafetyState
    cause: str
    code: Optional[str] = None

    def describe(self) -> str:
        if self.kind is EventKind.TRANSITION:
            return f'{self.from_state.value} -> {self.to_state.value}: {self.cause}'
        return f'{self.kind.value}: {self.cause}'


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """Answer to an operator command (resume / acknowledge / reset)."""

    accepted: bool
    message: str
    events: Tuple[SafetyEvent, ...] = ()


@dataclasses.dataclass(frozen=True)
class SafetyStatus:
    """The supervisor's published status (plain data for a ROS message)."""

    stamp: float
    state: SafetyState
    motion_permitted: bool
    latched: bool                     # a fault or e-stop needs acknowledge/reset
    awaiting_resume: bool             # an explicit resume() is required before motion
    reason: str                       # one operator-readable line
    faults: Tuple[FaultInfo, ...]
    scanner_phase: str
    scanner_protocol: str
    estop_active: bool
