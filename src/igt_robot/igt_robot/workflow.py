"""The operator workflow of a needle placement, as an explicit state machine.

Four phases (the ProcedureEvent ``phase`` values) with steps inside them::

  PLANNING   START -> LOAD_PLANNING_SCAN -> REGISTER -> PLAN -> CONFIRM_PLAN
  TARGETING  ALIGN -> ALIGNING (motion) -> CONFIRM_ALIGNMENT
  CONTROL    INSERT -> INSERTING (motion)
  MONITORING CONTROL_SCAN -> CHECK_TIP -> CONFIRM_NEXT --confirm_next--> CONTROL/INSERT (loop)
                                                      --done--> CONFIRMATION_SCAN -> REPORT -> DONE
  any step   --abort--> ABORTED (terminal)

Patient motion: when a control or confirmation scan shows the target moved
beyond the node's tolerance against the planning scan (or the check could not
tell), the node reports ``target_moved``. The step is kept, but nothing that
advances on the plan (motion, ``confirm_next``, ``done``, ``report``) is
accepted until the operator either accepts the displacement (``accept_motion``,
a confirmation with the operator's id) or aborts: the robot never moves on a
stale plan without a person having decided so.

Commands and the step(s) that accept them are in :data:`COMMANDS`. Operator
confirmations (``confirm_plan``, ``confirm_alignment``, ``confirm_next``,
``done``, ``abort`` and the generic ``confirm``) need an operator id. Commands
that move the robot (``align``, ``insert_step``) additionally need the safety
supervisor in READY: otherwise they are refused with the reason, e.g.
``motion refused: scanner ACQUIRING``. The workflow never moves anything
itself; the node executes accepted motion commands and reports back with
``motion_done`` / ``motion_failed``.

Pure logic: no clock reads unless ``now`` is omitted (then the injected
``clock``), no threads, no ROS. Every command, accepted or refused, produces one
:class:`WorkflowEvent` for the procedure record.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple


class Phase(str, enum.Enum):
    PLANNING = 'PLANNING'
    TARGETING = 'TARGETING'
    MONITORING = 'MONITORING'
    CONTROL = 'CONTROL'


class Step(str, enum.Enum):
    START = 'START'
    LOAD_PLANNING_SCAN = 'LOAD_PLANNING_SCAN'
    REGISTER = 'REGISTER'
    PLAN = 'PLAN'
    CONFIRM_PLAN = 'CONFIRM_PLAN'
    ALIGN = 'ALIGN'
    ALIGNING = 'ALIGNING'
    CONFIRM_ALIGNMENT = 'CONFIRM_ALIGNMENT'
    INSERT = 'INSERT'
    INSERTING = 'INSERTING'
    CONTROL_SCAN = 'CONTROL_SCAN'
    CHECK_TIP = 'CHECK_TIP'
    CONFIRM_NEXT = 'CONFIRM_NEXT'
    CONFIRMATION_SCAN = 'CONFIRMATION_SCAN'
    REPORT = 'REPORT'
    DONE = 'DONE'
    ABORTED = 'ABORTED'


S = Step
TERMINAL_STEPS = frozenset({S.DONE, S.ABORTED})
MOTION_STEPS = frozenset({S.ALIGNING, S.INSERTING})

# command -> steps in which it is accepted
COMMANDS: Dict[str, frozenset] = {
    'start': frozenset({S.START}),
    'load_planning_scan': frozenset({S.LOAD_PLANNING_SCAN, S.REGISTER}),
    'register': frozenset({S.REGISTER, S.PLAN, S.CONFIRM_PLAN}),
    'plan': frozenset({S.PLAN, S.CONFIRM_PLAN}),
    'confirm_plan': frozenset({S.CONFIRM_PLAN}),
    'align': frozenset({S.ALIGN, S.CONFIRM_ALIGNMENT}),
    'confirm_alignment': frozenset({S.CONFIRM_ALIGNMENT}),
    'insert_step': frozenset({S.INSERT}),
    'motion_done': frozenset({S.ALIGNING, S.INSERTING}),
    'motion_failed': frozenset({S.ALIGNING, S.INSERTING}),
    'control_scan_done': frozenset({S.CONTROL_SCAN}),
    'tip_checked': frozenset({S.CHECK_TIP}),
    'confirm_next': frozenset({S.CONFIRM_NEXT}),
    'done': frozenset({S.CONFIRM_NEXT}),
    'confirmation_scan_done': frozenset({S.CONFIRMATION_SCAN}),
    'report': frozenset({S.REPORT}),
    'replan': frozenset({S.ALIGN, S.CONFIRM_ALIGNMENT, S.INSERT}),  # INSERT only before the first step
    'abort': frozenset(set(Step) - TERMINAL_STEPS),
    'confirm': frozenset({S.CONFIRM_PLAN, S.CONFIRM_ALIGNMENT, S.CONFIRM_NEXT}),
    # the node's report after a later scan; the step is kept, advancing waits for the operator
    'target_moved': frozenset({S.CHECK_TIP, S.CONFIRMATION_SCAN}),
    'accept_motion': frozenset(set(Step) - TERMINAL_STEPS),
}
MOTION_COMMANDS = frozenset({'align', 'insert_step'})
CONFIRMATIONS = frozenset({'confirm_plan', 'confirm_alignment', 'confirm_next', 'done', 'abort', 'confirm',
                           'accept_motion'})
# What a reported target motion holds until the operator decides (accept_motion or abort).
HELD_BY_TARGET_MOTION = MOTION_COMMANDS | {'confirm_next', 'done', 'report'}
_GENERIC_CONFIRM = {S.CONFIRM_PLAN: 'confirm_plan', S.CONFIRM_ALIGNMENT: 'confirm_alignment',
                    S.CONFIRM_NEXT: 'confirm_next'}

PHASE_OF_STEP: Dict[Step, Phase] = {
    S.START: Phase.PLANNING, S.LOAD_PLANNING_SCAN: Phase.PLANNING, S.REGISTER: Phase.PLANNING,
    S.PLAN: Phase.PLANNING, S.CONFIRM_PLAN: Phase.PLANNING,
    S.ALIGN: Phase.TARGETING, S.ALIGNING: Phase.TARGETING, S.CONFIRM_ALIGNMENT: Phase.TARGETING,
    S.INSERT: Phase.CONTROL, S.INSERTING: Phase.CONTROL,
    S.CONTROL_SCAN: Phase.MONITORING, S.CHECK_TIP: Phase.MONITORING, S.CONFIRM_NEXT: Phase.MONITORING,
    S.CONFIRMATION_SCAN: Phase.MONITORING, S.REPORT: Phase.MONITORING, S.DONE: Phase.MONITORING,
}

SEVERITY_INFO, SEVERITY_WARN, SEVERITY_ERROR = 0, 1, 2  # ProcedureEvent.msg constants


class CommandResult(NamedTuple):
    """Answer to one command (fields of OperatorCommand.srv's response)."""

    accepted: bool
    phase: str
    step: str
    message: str


@dataclasses.dataclass(frozen=True)
class WorkflowEvent:
    """One workflow event. ``stamp`` in seconds of the injected clock."""

    stamp: float
    kind: str                 # 'transition' (step changed), 'command' (accepted, same step) or 'refused'
    command: str
    argument: str
    operator_id: str
    accepted: bool
    from_phase: str
    from_step: str
    phase: str
    step: str
    message: str
    severity: int
    confirmation: bool

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def procedure_event_fields(self) -> Dict[str, Any]:
        """Fields of ProcedureEvent.msg (no header): values as key/value strings."""
        values = [('command', self.command), ('argument', self.argument), ('operator_id', self.operator_id),
                  ('from_phase', self.from_phase), ('from_step', self.from_step), ('step', self.step),
                  ('accepted', str(self.accepted).lower())]
        kind = 'workflow_confirmation' if (self.confirmation and self.accepted) else f'workflow_{self.kind}'
        return {'phase': self.phase, 'severity': self.severity, 'source': 'workflow', 'kind': kind,
                'description': self.message, 'values': [{'key': k, 'value': v} for k, v in values]}


@dataclasses.dataclass(frozen=True)
class SafetySnapshot:
    """What the workflow needs from the safety supervisor to gate motion."""

    state: str
    motion_permitted: bool
    scanner_phase: str = ''
    reason: str = ''

    @classmethod
    def of(cls, safety) -> Optional['SafetySnapshot']:
        """Accept None, a state name, a mapping or an object with ``state`` (e.g. SafetyStatus)."""
        if safety is None:
            return None
        if isinstance(safety, SafetySnapshot):
            return safety
        if isinstance(safety, str):
            state = safety.strip().upper()
            return cls(state=state, motion_permitted=state == 'READY')
        get = safety.get if isinstance(safety, Mapping) else (lambda k, d=None: getattr(safety, k, d))
        state = get('state')
        if state is None:
            raise TypeError(f'safety input needs a state, got {safety!r}')
        state = getattr(state, 'value', state)
        state = str(state).strip().upper()
        permitted = get('motion_permitted')
        permitted = (state == 'READY') if permitted is None else bool(permitted) and state == 'READY'
        phase = get('scanner_phase', '') or ''
        return cls(state=state, motion_permitted=permitted, scanner_phase=str(getattr(phase, 'value', phase)).upper(),
                   reason=str(get('reason', '') or ''))

    def refusal(self) -> str:
        if self.state == 'SCAN_HOLD':
            return f'motion refused: scanner {self.scanner_phase or "imaging"}'
        detail = f' ({self.reason})' if self.reason else ''
        return f'motion refused: safety {self.state}{detail}'


@dataclasses.dataclass
class ProcedureContext:
    """Facts gathered along the workflow (shown to the operator and in the report)."""

    planning_scan: str = ''
    registration: str = ''
    plan_id: str = ''
    plan_confirmed_by: str = ''
    alignment_confirmed_by: str = ''
    insertion_steps: int = 0
    inserted_depth_m: float = 0.0
    control_scans: int = 0
    last_tip_error_m: Optional[float] = None
    confirmation_scan: str = ''
    report_path: str = ''
    abort_reason: str = ''
    motion_hold: str = ''               # why advancing waits for the operator (target moved); '' = no hold
    motion_accepted_by: str = ''        # the operator who last accepted a reported target motion


class WorkflowError(ValueError):
    """Programming error in the use of the workflow (not an operator refusal)."""


def _parse_length(text: str, what: str) -> Tuple[Optional[float], str]:
    """Optional positive finite length in metres from a command argument."""
    if not text.strip():
        return None, ''
    try:
        value = float(text)
    except ValueError:
        return None, f'{what} must be a number in metres, got {text!r}'
    if not math.isfinite(value) or value < 0.0:
        return None, f'{what} must be finite and >= 0 m, got {text!r}'
    return value, ''


class Workflow:
    """Operator workflow state machine (see module docstring).

    ``max_step_m`` bounds one ``insert_step`` argument (metres); ``clock`` is used
    only when ``command`` gets no ``now``.
    """

    def __init__(self, *, max_step_m: float = 0.05, clock: Callable[[], float] = time.monotonic):
        if not (math.isfinite(max_step_m) and max_step_m > 0):
            raise WorkflowError(f'max_step_m must be finite and > 0, got {max_step_m!r}')
        self.max_step_m = float(max_step_m)
        self._clock = clock
        self.step: Step = S.START
        self.context = ProcedureContext()
        self._events: List[WorkflowEvent] = []
        self._before_abort: Optional[Step] = None
        self._pending_depth = 0.0  # depth (m) of the insertion step under way, 0 when not given

    @property
    def phase(self) -> Phase:
        if self.step is S.ABORTED:
            return PHASE_OF_STEP[self._before_abort or S.START]
        return PHASE_OF_STEP[self.step]

    def allowed_commands(self) -> List[str]:
        """Commands accepted in the current step (motion ones may still be refused by safety)."""
        held = self.context.motion_hold
        return sorted(c for c, steps in COMMANDS.items() if self.step in steps
                      and not (held and c in HELD_BY_TARGET_MOTION) and (c != 'accept_motion' or held))

    def drain_events(self) -> List[WorkflowEvent]:
        """Events since the last drain, oldest first (for the record / ProcedureEvent)."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ commands
    def command(self, name: str, arg: str = '', safety=None, *, now: Optional[float] = None,
                operator_id: str = '') -> CommandResult:
        """Apply one command. ``safety``: SafetyStatus/mapping/state name (needed for motion).

        Returns (accepted, phase, step, message); on refusal the state is unchanged and
        ``message`` says why.
        """
        stamp = float(self._clock() if now is None else now)
        name = (name or '').strip().lower()
        arg = '' if arg is None else str(arg).strip()
        operator_id = (operator_id or '').strip()
        from_phase, from_step = self.phase, self.step
        effective = name
        if name == 'confirm' and self.step in _GENERIC_CONFIRM:
            effective = _GENERIC_CONFIRM[self.step]

        reason = self._check(name, effective, arg, safety, operator_id)
        if reason:
            return self._emit(stamp, 'refused', name, arg, operator_id, False, from_phase, from_step, reason,
                              SEVERITY_WARN)
        message, severity = getattr(self, f'_do_{effective}')(arg, operator_id)
        kind = 'transition' if self.step is not from_step else 'command'
        return self._emit(stamp, kind, name, arg, operator_id, True, from_phase, from_step, message, severity)

    def _check(self, name: str, effective: str, arg: str, safety, operator_id: str) -> str:
        """Why the command is refused now ('' when it may run)."""
        if name not in COMMANDS:
            return f'unknown command {name!r}; known: {", ".join(sorted(COMMANDS))}'
        if self.step in TERMINAL_STEPS:
            return f'the procedure is {self.step.value}; no further commands'
        if self.step not in COMMANDS[name]:
            return self._out_of_order(name)
        if name in CONFIRMATIONS and not operator_id:
            return f'{name}: a confirmation needs an operator id'
        if effective == 'align' or effective == 'insert_step':
            snapshot = SafetySnapshot.of(safety)
            if snapshot is None:
                return 'motion refused: safety state unknown'
            if not snapshot.motion_permitted:
                return snapshot.refusal()
        if effective == 'insert_step':
            depth, problem = _parse_length(arg, 'insert_step depth')
            if problem:
                return problem
            if depth is not None and not 0.0 < depth <= self.max_step_m:
                return f'insert_step depth {depth:g} m is outside (0, {self.max_step_m:g}] m'
        if effective in HELD_BY_TARGET_MOTION and self.context.motion_hold:
            return (f'{name} refused: {self.context.motion_hold}; the plan may be stale: accept_motion '
                    '(operator) to go on with it, or abort')
        if effective == 'accept_motion' and not self.context.motion_hold:
            return 'accept_motion refused: no target motion has been reported'
        if effective == 'target_moved' and not arg:
            return 'target_moved needs an argument (what moved, by how much)'
        if effective == 'replan' and self.context.insertion_steps > 0:
            # Re-aligning with the needle in the patient would lever it through tissue.
            return (f'replan refused: the needle has been advanced {self.context.insertion_steps} step(s); '
                    'withdraw it and abort, or continue')
        if effective in ('load_planning_scan', 'plan') and not arg:
            return f'{effective} needs an argument (the {"image" if effective != "plan" else "plan"} id)'
        if effective == 'tip_checked' and arg:
            _, problem = _parse_length(arg, 'tip error')
            if problem:
                return problem
        if effective == 'confirm_plan' and arg and arg != self.context.plan_id:
            return f'confirm_plan {arg!r} does not match the current plan {self.context.plan_id!r}'
        return ''

    def _out_of_order(self, name: str) -> str:
        """Specific reasons for the refusals an operator will actually meet."""
        step = self.step
        here = f'{self.phase.value}/{step.value}'
        if name in MOTION_COMMANDS and step in MOTION_STEPS:
            return f'{name} refused: motion already in progress ({step.value})'
        if name == 'align' and step in (S.START, S.LOAD_PLANNING_SCAN, S.REGISTER, S.PLAN, S.CONFIRM_PLAN):
            return 'align refused: the plan is not confirmed (confirm_plan first)'
        if name == 'insert_step' and step in (S.ALIGN, S.CONFIRM_ALIGNMENT):
            return 'insert_step refused: the alignment is not confirmed (confirm_alignment first)'
        if name == 'insert_step' and step in (S.START, S.LOAD_PLANNING_SCAN, S.REGISTER, S.PLAN, S.CONFIRM_PLAN):
            return 'insert_step refused: the plan is not confirmed and the guide is not aligned'
        if name == 'insert_step' and step in (S.CONTROL_SCAN, S.CHECK_TIP):
            return 'insert_step refused: the tip has not been checked on a control scan since the last step'
        if name == 'insert_step' and step is S.CONFIRM_NEXT:
            return 'insert_step refused: confirm_next first'
        if name in ('confirm_next', 'done') and step in (S.CONTROL_SCAN, S.CHECK_TIP):
            return f'{name} refused: the tip has not been checked on the control scan yet'
        if name == 'confirm_plan' and step is S.PLAN:
            return 'confirm_plan refused: no plan proposed yet'
        if name == 'plan' and step in (S.START, S.LOAD_PLANNING_SCAN, S.REGISTER):
            return 'plan refused: the robot is not registered to the planning scan yet'
        if name == 'replan' and step in (S.CONTROL_SCAN, S.CHECK_TIP, S.CONFIRM_NEXT, S.INSERTING):
            return 'replan refused: the needle is inserted; withdraw it and abort, or continue'
        if name == 'confirm' and step not in _GENERIC_CONFIRM:
            return f'nothing to confirm in {here}'
        allowed = ', '.join(self.allowed_commands()) or 'none'
        return f'{name!r} is not allowed in {here}; allowed now: {allowed}'

    def _emit(self, stamp, kind, name, arg, operator_id, accepted, from_phase, from_step, message,
              severity) -> CommandResult:
        event = WorkflowEvent(stamp=stamp, kind=kind, command=name, argument=arg, operator_id=operator_id,
                              accepted=accepted, from_phase=from_phase.value, from_step=from_step.value,
                              phase=self.phase.value, step=self.step.value, message=message, severity=severity,
                              confirmation=name in CONFIRMATIONS)
        self._events.append(event)
        return CommandResult(accepted, self.phase.value, self.step.value, message)

    # ------------------------------------------------------------------ actions
    # Each returns (message, severity) after changing the step.
    def _do_start(self, arg, op):
        self.step = S.LOAD_PLANNING_SCAN
        return 'procedure started: load the planning scan', SEVERITY_INFO

    def _do_load_planning_scan(self, arg, op):
        self.context.planning_scan = arg
        self.context.registration = ''
        self.step = S.REGISTER
        return f'planning scan {arg} loaded: register the robot', SEVERITY_INFO

    def _do_register(self, arg, op):
        self.context.registration = arg or 'registered'
        # A new registration changes the joint solution of any plan: plan again.
        self.context.plan_id = ''
        self.context.plan_confirmed_by = ''
        self.step = S.PLAN
        return f'registration {self.context.registration} accepted: plan the path', SEVERITY_INFO

    def _do_plan(self, arg, op):
        self.context.plan_id = arg
        self.context.plan_confirmed_by = ''
        self.step = S.CONFIRM_PLAN
        return f'plan {arg} proposed: operator to confirm', SEVERITY_INFO

    def _do_confirm_plan(self, arg, op):
        self.context.plan_confirmed_by = op
        self.step = S.ALIGN
        return f'plan {self.context.plan_id} confirmed by {op}: align the guide', SEVERITY_INFO

    def _do_align(self, arg, op):
        self.context.alignment_confirmed_by = ''
        self.step = S.ALIGNING
        return 'aligning the guide to the plan', SEVERITY_INFO

    def _do_confirm_alignment(self, arg, op):
        self.context.alignment_confirmed_by = op
        self.step = S.INSERT
        return f'alignment confirmed by {op}: insert the first step', SEVERITY_INFO

    def _do_insert_step(self, arg, op):
        depth, _ = _parse_length(arg, 'depth')
        self._pending_depth = depth or 0.0
        self.step = S.INSERTING
        return (f'inserting {depth * 1000:.1f} mm' if depth else 'inserting next step'), SEVERITY_INFO

    def _do_motion_done(self, arg, op):
        if self.step is S.ALIGNING:
            self.step = S.CONFIRM_ALIGNMENT
            return 'guide aligned: operator to confirm the alignment', SEVERITY_INFO
        self.context.insertion_steps += 1
        self.context.inserted_depth_m += self._pending_depth
        self.step = S.CONTROL_SCAN
        return f'insertion step {self.context.insertion_steps} done: acquire a control scan', SEVERITY_INFO

    def _do_motion_failed(self, arg, op):
        why = arg or 'no reason given'
        if self.step is S.ALIGNING:
            self.step = S.ALIGN
            return f'alignment interrupted ({why}): align again', SEVERITY_WARN
        # The needle may be partly advanced: image it before anything else.
        self.context.insertion_steps += 1
        self.step = S.CONTROL_SCAN
        return f'insertion interrupted ({why}): acquire a control scan to locate the tip', SEVERITY_WARN

    def _do_control_scan_done(self, arg, op):
        self.context.control_scans += 1
        self.step = S.CHECK_TIP
        return f'control scan {arg or self.context.control_scans} acquired: check the tip', SEVERITY_INFO

    def _do_tip_checked(self, arg, op):
        error, _ = _parse_length(arg, 'tip error')
        self.context.last_tip_error_m = error
        self.step = S.CONFIRM_NEXT
        text = f'tip {error * 1000:.1f} mm from target' if error is not None else 'tip checked'
        return f'{text}: confirm the next step or done', SEVERITY_INFO

    def _do_confirm_next(self, arg, op):
        self.step = S.INSERT
        return f'next step confirmed by {op}', SEVERITY_INFO

    def _do_done(self, arg, op):
        self.step = S.CONFIRMATION_SCAN
        return f'target reached (confirmed by {op}): acquire the confirmation scan', SEVERITY_INFO

    def _do_confirmation_scan_done(self, arg, op):
        self.context.confirmation_scan = arg or 'acquired'
        self.step = S.REPORT
        return 'confirmation scan acquired: write the report', SEVERITY_INFO

    def _do_report(self, arg, op):
        self.context.report_path = arg
        self.step = S.DONE
        return f'report written{(" to " + arg) if arg else ""}: procedure complete', SEVERITY_INFO

    def _do_replan(self, arg, op):
        self.context.plan_id = ''
        self.context.plan_confirmed_by = ''
        self.context.alignment_confirmed_by = ''
        self.step = S.PLAN
        return f're-planning{(" (" + arg + ")") if arg else ""}: the previous plan is void', SEVERITY_WARN

    def _do_target_moved(self, arg, op):
        self.context.motion_hold = arg
        return f'{arg}: the plan may be stale; accept_motion (operator) or abort', SEVERITY_ERROR

    def _do_accept_motion(self, arg, op):
        held, self.context.motion_hold = self.context.motion_hold, ''
        self.context.motion_accepted_by = op
        why = f' ({arg})' if arg else ''
        return f'{op} accepts the reported motion{why} and goes on with the current plan: {held}', SEVERITY_WARN

    def _do_abort(self, arg, op):
        self._before_abort = self.step
        self.context.abort_reason = arg
        self.step = S.ABORTED
        return f'procedure aborted by {op}{(": " + arg) if arg else ""}', SEVERITY_ERROR
