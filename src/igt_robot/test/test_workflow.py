"""Operator workflow state machine: happy path, every refusal, events for the record."""
import pytest

from igt_robot.safety.faults import SafetyState
from igt_robot.workflow import COMMANDS, SafetySnapshot, Step, Workflow, WorkflowError

READY = {'state': 'READY', 'motion_permitted': True, 'scanner_phase': 'IDLE', 'reason': 'ready'}
ACQUIRING = {'state': 'SCAN_HOLD', 'motion_permitted': False, 'scanner_phase': 'ACQUIRING',
             'reason': 'scanner acquiring'}
OP = 'dr_smith'


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        self.t += 1.0
        return self.t


def run(wf, *commands):
    """Apply (name, arg, safety) commands; every one must be accepted."""
    results = []
    for name, arg, safety in commands:
        r = wf.command(name, arg, safety, operator_id=OP)
        assert r.accepted, f'{name}: {r.message}'
        results.append(r)
    return results


def to_insert(wf):
    run(wf, ('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'zframe-1', None),
        ('plan', 'p1', None), ('confirm_plan', '', None), ('align', '', READY), ('motion_done', '', None),
        ('confirm_alignment', '', None))
    assert wf.step is Step.INSERT


def test_happy_path_through_all_phases_with_events():
    wf = Workflow(clock=Clock())
    seen = []
    steps = [('start', '', None, 'PLANNING', 'LOAD_PLANNING_SCAN'),
             ('load_planning_scan', 'CT-1', None, 'PLANNING', 'REGISTER'),
             ('register', 'zframe-1', None, 'PLANNING', 'PLAN'),
             ('plan', 'p1', None, 'PLANNING', 'CONFIRM_PLAN'),
             ('confirm_plan', 'p1', None, 'TARGETING', 'ALIGN'),
             ('align', '', READY, 'TARGETING', 'ALIGNING'),
             ('motion_done', '', None, 'TARGETING', 'CONFIRM_ALIGNMENT'),
             ('confirm_alignment', '', None, 'CONTROL', 'INSERT'),
             ('insert_step', '0.02', READY, 'CONTROL', 'INSERTING'),
             ('motion_done', '', None, 'MONITORING', 'CONTROL_SCAN'),
             ('control_scan_done', 'CT-2', None, 'MONITORING', 'CHECK_TIP'),
             ('tip_checked', '0.012', None, 'MONITORING', 'CONFIRM_NEXT'),
             ('confirm_next', '', None, 'CONTROL', 'INSERT'),
             ('insert_step', '0.01', READY, 'CONTROL', 'INSERTING'),
             ('motion_done', '', None, 'MONITORING', 'CONTROL_SCAN'),
             ('control_scan_done', 'CT-3', None, 'MONITORING', 'CHECK_TIP'),
             ('tip_checked', '0.0015', None, 'MONITORING', 'CONFIRM_NEXT'),
             ('done', '', None, 'MONITORING', 'CONFIRMATION_SCAN'),
             ('confirmation_scan_done', 'CT-4', None, 'MONITORING', 'REPORT'),
             ('report', '/data/p/report.html', None, 'MONITORING', 'DONE')]
    for name, arg, safety, phase, step in steps:
        r = wf.command(name, arg, safety, operator_id=OP)
        assert (r.accepted, r.phase, r.step) == (True, phase, step), (name, r.message)
        seen.append(r)
    ctx = wf.context
    assert ctx.insertion_steps == 2 and ctx.control_scans == 2
    assert ctx.inserted_depth_m == pytest.approx(0.03)
    assert ctx.last_tip_error_m == pytest.approx(0.0015)
    assert ctx.plan_confirmed_by == OP and ctx.alignment_confirmed_by == OP
    assert ctx.report_path == '/data/p/report.html'

    events = wf.drain_events()
    assert len(events) == len(steps)
    assert all(e.kind == 'transition' and e.accepted for e in events)
    assert [e.stamp for e in events] == [101.0 + i for i in range(len(steps))]  # injected clock
    assert events[4].confirmation and events[4].from_phase == 'PLANNING' and events[4].phase == 'TARGETING'
    fields = events[4].procedure_event_fields()
    assert fields['kind'] == 'workflow_confirmation' and fields['phase'] == 'TARGETING'
    assert {'key': 'operator_id', 'value': OP} in fields['values']
    assert wf.drain_events() == []
    # Terminal: nothing more is accepted.
    r = wf.command('start', '', None, operator_id=OP)
    assert not r.accepted and 'DONE' in r.message


def test_motion_refused_while_scanner_acquiring():
    wf = Workflow()
    run(wf, ('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'z', None),
        ('plan', 'p1', None), ('confirm_plan', '', None))
    r = wf.command('align', '', ACQUIRING, now=5.0)
    assert r == (False, 'TARGETING', 'ALIGN', 'motion refused: scanner ACQUIRING')
    event = wf.drain_events()[-1]
    assert event.kind == 'refused' and event.severity == 1 and event.stamp == 5.0
    assert wf.command('align', '', READY).accepted


@pytest.mark.parametrize('safety,expected', [
    (None, 'motion refused: safety state unknown'),
    ('HOLD', 'motion refused: safety HOLD'),
    ({'state': 'FAULT', 'motion_permitted': False, 'reason': 'Fault TRACKING_ERROR'},
     'motion refused: safety FAULT (Fault TRACKING_ERROR)'),
    ({'state': 'ESTOP', 'motion_permitted': False}, 'motion refused: safety ESTOP'),
    ({'state': 'SCAN_HOLD', 'motion_permitted': False, 'scanner_phase': 'PREPARING'},
     'motion refused: scanner PREPARING'),
    # READY but the supervisor says no: the single gate wins.
    ({'state': 'READY', 'motion_permitted': False}, 'motion refused: safety READY'),
])
def test_insert_refused_unless_safety_ready(safety, expected):
    wf = Workflow()
    to_insert(wf)
    r = wf.command('insert_step', '0.01', safety, operator_id=OP)
    assert not r.accepted and r.message == expected and r.step == 'INSERT'


def test_safety_status_objects_are_understood():
    from igt_robot.safety.faults import SafetyStatus
    status = SafetyStatus(stamp=0.0, state=SafetyState.SCAN_HOLD, motion_permitted=False, latched=False,
                          awaiting_resume=False, reason='scanner ACQUIRING', faults=(), scanner_phase='ACQUIRING',
                          scanner_protocol='control scan', estop_active=False)
    snap = SafetySnapshot.of(status)
    assert (snap.state, snap.motion_permitted, snap.scanner_phase) == ('SCAN_HOLD', False, 'ACQUIRING')
    assert SafetySnapshot.of(SafetyState.READY.value).motion_permitted
    with pytest.raises(TypeError, match='needs a state'):
        SafetySnapshot.of({'motion_permitted': True})


@pytest.mark.parametrize('setup,command,arg,fragment', [
    # missing confirmations
    ('confirm_plan_pending', 'align', '', 'the plan is not confirmed'),
    ('align_pending', 'insert_step', '', 'the alignment is not confirmed'),
    ('plan_pending', 'confirm_plan', '', 'no plan proposed yet'),
    ('check_pending', 'insert_step', '', 'tip has not been checked'),
    ('check_pending', 'confirm_next', '', 'tip has not been checked'),
    ('check_pending', 'done', '', 'tip has not been checked'),
    ('next_pending', 'insert_step', '', 'confirm_next first'),
    # wrong phase
    ('start', 'plan', 'p1', 'not registered'),
    ('start', 'insert_step', '', 'plan is not confirmed and the guide is not aligned'),
    ('start', 'report', '', "'report' is not allowed in PLANNING/START"),
    ('start', 'motion_done', '', "'motion_done' is not allowed"),
    ('start', 'confirm', '', 'nothing to confirm'),
    ('aligning', 'align', '', 'motion already in progress'),
    ('check_pending', 'replan', '', 'needle is inserted'),
    ('next_pending', 'replan', '', 'needle is inserted'),
    # bad arguments
    ('start', 'fly', '', "unknown command 'fly'"),
    ('insert', 'insert_step', 'deep', 'must be a number in metres'),
    ('insert', 'insert_step', '0.5', 'outside (0, 0.05] m'),
    ('insert', 'insert_step', 'nan', 'finite'),
    ('loading', 'load_planning_scan', '', 'needs an argument'),
    ('plan_pending', 'plan', '', 'needs an argument'),
    ('confirm_plan_pending', 'confirm_plan', 'p2', "does not match the current plan 'p1'"),
])
def test_refusals_name_the_reason_and_change_nothing(setup, command, arg, fragment):
    wf = Workflow()
    if setup != 'start':
        run(wf, ('start', '', None))
    if setup in ('plan_pending', 'confirm_plan_pending', 'align_pending', 'aligning', 'insert', 'check_pending',
                 'next_pending'):
        run(wf, ('load_planning_scan', 'CT-1', None), ('register', 'z', None))
    if setup in ('confirm_plan_pending', 'align_pending', 'aligning', 'insert', 'check_pending', 'next_pending'):
        run(wf, ('plan', 'p1', None))
    if setup in ('align_pending', 'aligning', 'insert', 'check_pending', 'next_pending'):
        run(wf, ('confirm_plan', '', None))
    if setup == 'aligning':
        run(wf, ('align', '', READY))
    if setup in ('insert', 'check_pending', 'next_pending'):
        run(wf, ('align', '', READY), ('motion_done', '', None), ('confirm_alignment', '', None))
    if setup in ('check_pending', 'next_pending'):
        run(wf, ('insert_step', '0.01', READY), ('motion_done', '', None))
    if setup == 'next_pending':
        run(wf, ('control_scan_done', 'CT-2', None), ('tip_checked', '0.004', None))
    wf.drain_events()
    phase, step = wf.phase, wf.step
    r = wf.command(command, arg, READY, operator_id=OP)
    assert not r.accepted
    assert fragment in r.message, r.message
    assert (wf.phase, wf.step) == (phase, step)
    (event,) = wf.drain_events()
    assert event.kind == 'refused' and not event.accepted and event.message == r.message


def test_confirmations_need_an_operator():
    wf = Workflow()
    run(wf, ('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'z', None),
        ('plan', 'p1', None))
    r = wf.command('confirm_plan', '', None, operator_id='')
    assert not r.accepted and 'needs an operator id' in r.message
    r = wf.command('abort', 'patient moved', None)
    assert not r.accepted and 'needs an operator id' in r.message
    # The generic "confirm" resolves to the pending confirmation.
    r = wf.command('confirm', '', None, operator_id=OP)
    assert r.accepted and r.step == 'ALIGN'
    assert wf.context.plan_confirmed_by == OP


def test_abort_is_terminal_and_keeps_the_phase():
    wf = Workflow()
    to_insert(wf)
    wf.command('insert_step', '', READY, operator_id=OP)
    r = wf.command('abort', 'patient moved', None, operator_id=OP)
    assert r == (True, 'CONTROL', 'ABORTED', f'procedure aborted by {OP}: patient moved')
    assert wf.drain_events()[-1].severity == 2
    r = wf.command('motion_done', '', None)
    assert not r.accepted and 'ABORTED' in r.message
    assert wf.allowed_commands() == []


def test_motion_failed_paths():
    wf = Workflow()
    run(wf, ('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'z', None),
        ('plan', 'p1', None), ('confirm_plan', '', None), ('align', '', READY))
    r = wf.command('motion_failed', 'safety HOLD', None)
    assert r.accepted and r.step == 'ALIGN' and 'align again' in r.message
    run(wf, ('align', '', READY), ('motion_done', '', None), ('confirm_alignment', '', None),
        ('insert_step', '0.01', READY))
    r = wf.command('motion_failed', 'scanner started', None)
    # An interrupted insertion must be imaged before anything else.
    assert r.accepted and (r.phase, r.step) == ('MONITORING', 'CONTROL_SCAN')
    assert wf.context.insertion_steps == 1


def test_replan_before_insertion_voids_plan_and_alignment():
    wf = Workflow()
    to_insert(wf)
    r = wf.command('replan', 'target moved', None)
    assert r.accepted and (r.phase, r.step) == ('PLANNING', 'PLAN')
    assert wf.context.plan_id == '' and wf.context.alignment_confirmed_by == ''
    assert not wf.command('align', '', READY).accepted  # must plan and confirm again
    run(wf, ('plan', 'p2', None), ('confirm_plan', 'p2', None))
    assert wf.step is Step.ALIGN


def test_reregistration_voids_the_plan():
    wf = Workflow()
    run(wf, ('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'z1', None),
        ('plan', 'p1', None))
    r = wf.command('register', 'z2', None)
    assert r.accepted and r.step == 'PLAN' and wf.context.plan_id == ''


def test_allowed_commands_match_table_and_config_validation():
    wf = Workflow()
    assert wf.allowed_commands() == ['abort', 'start']
    assert set(COMMANDS['abort']) == set(Step) - {Step.DONE, Step.ABORTED}
    with pytest.raises(WorkflowError, match='max_step_m'):
        Workflow(max_step_m=0.0)
    r = wf.command('start', '', None, now=1.0)
    assert r.accepted and r.message and wf.drain_events()[0].stamp == 1.0


def test_a_moved_target_holds_the_workflow_until_the_operator_decides():
    wf = Workflow()
    to_insert(wf)
    run(wf, ('insert_step', '', READY), ('motion_done', '', None), ('control_scan_done', 'scan03', None))
    moved = 'target moved 3.4 mm (tolerance 2.0 mm) between the planning scan and scan03'
    r = wf.command('target_moved', moved, None)
    assert r.accepted and r.step == 'CHECK_TIP' and 'accept_motion' in r.message
    assert wf.drain_events()[-1].severity == 2                    # recorded as an error
    run(wf, ('tip_checked', '0.004', None))
    # Nothing advances on the stale plan: no next step, no "done", no motion.
    for name in ('confirm_next', 'confirm', 'done'):
        r = wf.command(name, '', READY, operator_id=OP)
        assert not r.accepted and moved in r.message and 'accept_motion' in r.message, name
    assert wf.step is Step.CONFIRM_NEXT
    assert not wf.command('accept_motion', '', None).accepted     # the operator's decision, with an id
    r = wf.command('accept_motion', 'target within the lesion margin', None, operator_id=OP)
    assert r.accepted and wf.context.motion_accepted_by == OP and not wf.context.motion_hold
    assert wf.drain_events()[-1].kind == 'command'
    run(wf, ('confirm_next', '', None), ('insert_step', '', READY), ('motion_done', '', None),
        ('control_scan_done', 'scan04', None), ('tip_checked', '0.001', None), ('done', '', None))
    # At the confirmation scan: the report waits for the operator too; abort is always possible.
    run(wf, ('target_moved', 'target motion at scan05 not known: the motion check failed', None),
        ('confirmation_scan_done', 'scan05', None))
    r = wf.command('report', '/tmp/report.html', None)
    assert not r.accepted and 'not known' in r.message
    r = wf.command('abort', 'patient moved', None, operator_id=OP)
    assert r.accepted and r.step == 'ABORTED'


def test_accept_motion_needs_a_reported_motion_and_target_moved_a_reason():
    wf = Workflow()
    to_insert(wf)
    r = wf.command('accept_motion', '', None, operator_id=OP)
    assert not r.accepted and 'no target motion has been reported' in r.message
    run(wf, ('insert_step', '', READY), ('motion_done', '', None), ('control_scan_done', 'scan03', None))
    r = wf.command('target_moved', '', None)
    assert not r.accepted and 'needs an argument' in r.message
    r = wf.command('target_moved', 'x', None)     # only after a later scan
    assert r.accepted
    run(wf, ('tip_checked', '', None))
    assert not wf.command('target_moved', 'again', None).accepted   # CONFIRM_NEXT: not a scan step
