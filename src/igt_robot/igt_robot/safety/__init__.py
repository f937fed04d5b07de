"""Safety layer (pure logic): the supervisor state machine deciding whether the
robot may move and telling the operator why not. See docs/safety.md."""
from .faults import (CommandResult, EventKind, FaultCode, FaultInfo, SafetyEvent, SafetyState,
                     SafetyStatus)
from .supervisor import SafetyConfig, SafetyConfigError, SafetySupervisor

__all__ = ['CommandResult', 'EventKind', 'FaultCode', 'FaultInfo', 'SafetyEvent', 'SafetyState',
           'SafetyStatus', 'SafetyConfig', 'SafetyConfigError', 'SafetySupervisor']
