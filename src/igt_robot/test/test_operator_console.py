"""igt-operator against fake safety/scanner/procedure services: in-process (its functions) and as a
subprocess on the isolated graph (exit codes and output)."""
import io
import threading

import pytest

from igt_robot import testing
from igt_robot.nodes import qos
from igt_robot.safety import operator_session
from igt_robot.operator_console import (EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, ConsoleError, OperatorConsole,
                                        advice, format_status, interactive)
from igt_robot_msgs.msg import SafetyFault, SafetyStatus, ScannerState
from igt_robot_msgs.srv import AcknowledgeFaults, OperatorCommand, ResumeMotion, SetEstop, SetScannerState

RESUME_REFUSAL = 'fault TRACKING_ERROR latched: acknowledge it first'
ALIGN_REFUSAL = 'motion refused: scanner ACQUIRING'


def hold_status():
    fault = SafetyFault(code='TRACKING_ERROR', detail='guide_pitch off by 0.9°', latched=True, cause_active=False)
    return SafetyStatus(state='HOLD', motion_permitted=False, latched=True, reason='fault TRACKING_ERROR latched',
                        scanner_phase='IDLE', faults=[fault])


class FakeStack:
    """/safety/status publisher and the services the console calls, recording requests."""

    def __init__(self, graph, with_procedure=True):
        self.node = n = graph.create_node('fake_stack')
        self.lock = threading.Lock()
        self.requests = []
        self.status_pub = n.create_publisher(SafetyStatus, '/safety/status', qos.SAFETY_LATCHED)
        self.status_pub.publish(hold_status())
        n.create_service(ResumeMotion, '/safety/resume', self._resume)
        n.create_service(AcknowledgeFaults, '/safety/acknowledge', self._ack)
        n.create_service(SetEstop, '/safety/estop', self._estop)
        n.create_service(SetScannerState, '/scanner/set_state', self._scan)
        if with_procedure:
            n.create_service(OperatorCommand, '/procedure/command', self._command)

    def _keep(self, name, req):
        with self.lock:
            self.requests.append((name, req))

    def last(self, name):
        with self.lock:
            return [r for n, r in self.requests if n == name][-1]

    def _resume(self, req, resp):
        self._keep('resume', req)
        resp.success, resp.message, resp.status = False, RESUME_REFUSAL, hold_status()
        return resp

    def _ack(self, req, resp):
        self._keep('ack', req)
        resp.success, resp.message = True, 'acknowledged'
        resp.status = SafetyStatus(state='HOLD', awaiting_resume=True, reason='resume needed')
        return resp

    def _estop(self, req, resp):
        self._keep('estop', req)
        resp.success, resp.message = True, 'software e-stop ' + ('latched' if req.active else 'released')
        return resp

    def _scan(self, req, resp):
        self._keep('scan', req)
        resp.accepted, resp.message = True, 'phase set'
        return resp

    def _command(self, req, resp):
        self._keep('cmd', req)
        if req.command == 'align':
            resp.accepted, resp.message = False, ALIGN_REFUSAL
        else:
            resp.accepted, resp.message = True, '' if req.command == 'status' else f'{req.command} done'
        resp.phase, resp.step = 'PLANNING', 'REGISTER'
        return resp


@pytest.fixture
def session(tmp_path):
    path = tmp_path / 'operator_session'
    return path, operator_session.issue_session(path)


@pytest.fixture
def console(graph, session):
    return OperatorConsole(graph.create_node('console_under_test'), timeout=10.0, operator_id='dr_a',
                           session_file=str(session[0]))


def test_status_shows_safety_faults_and_workflow(graph, console):
    FakeStack(graph)
    outcome = console.status()
    assert outcome.ok and outcome.exit_code == EXIT_OK
    text = outcome.text
    assert 'safety: HOLD (motion not permitted)' in text
    assert 'reason: fault TRACKING_ERROR latched' in text
    assert '- TRACKING_ERROR [latched]: guide_pitch off by 0.9°' in text
    assert 'workflow: PLANNING/REGISTER' in text


def test_each_action_sends_the_right_request_and_reports_refusals(graph, console):
    stack = FakeStack(graph)
    resumed = console.resume()
    assert not resumed.ok and resumed.exit_code == EXIT_REFUSED and RESUME_REFUSAL in resumed.text
    assert stack.last('resume').operator_id == 'dr_a'

    acked = console.acknowledge(['tracking_error', ' '])
    assert acked.ok and 'awaiting resume' in acked.text
    assert list(stack.last('ack').codes) == ['TRACKING_ERROR'] and stack.last('ack').operator_id == 'dr_a'

    assert console.estop(True).ok and stack.last('estop').active
    released = console.estop(False)
    assert not stack.last('estop').active and 'resumed' in released.text
    assert stack.last('estop').source == 'igt-operator:dr_a'

    assert console.scan(True, 'control scan', ionising=True, ctdi_vol_mgy=8.0, dlp_mgy_cm=120.0, kv=120.0,
                        mas=100.0).ok
    scan = stack.last('scan')
    assert scan.phase == ScannerState.PHASE_ACQUIRING and scan.protocol_name == 'control scan' and scan.is_ionising
    assert scan.dlp_mgy_cm == 120.0
    console.scan(False)
    assert stack.last('scan').phase == ScannerState.PHASE_IDLE and not stack.last('scan').is_ionising

    refused = console.command('align')
    assert refused.exit_code == EXIT_REFUSED and f'align: REFUSED - {ALIGN_REFUSAL}' in refused.text
    confirmed = console.command('confirm_plan', 'plan-3')
    assert confirmed.ok and (stack.last('cmd').command, stack.last('cmd').argument,
                             stack.last('cmd').operator_id) == ('confirm_plan', 'plan-3', 'dr_a')
    # Every operator-only request carries the operator's session secret.
    token = operator_session.read_session(console.session_file)
    for name in ('resume', 'ack', 'scan', 'cmd'):
        assert stack.last(name).operator_token == token, name
    assert stack.last('estop').operator_token == token          # the release


def test_without_a_session_operator_actions_are_refused_but_the_estop_is_pressed(graph, tmp_path):
    stack = FakeStack(graph)
    console = OperatorConsole(graph.create_node('sessionless_console'), timeout=10.0, operator_id='dr_a',
                              session_file=str(tmp_path / 'missing'))
    with pytest.raises(ConsoleError, match='cannot be read') as err:
        console.resume()
    assert err.value.exit_code == EXIT_REFUSED
    assert console.estop(True).ok and stack.last('estop').active and stack.last('estop').operator_token == ''


@pytest.mark.parametrize('status, expected, forbidden', [
    (SafetyStatus(state='FAULT', faults=[SafetyFault(code='WATCHDOG', cause_active=True, latched=True)]),
     '"ack" resets the drive (WATCHDOG)', 'resume'),
    (SafetyStatus(state='FAULT', faults=[SafetyFault(code='TRACKING_ERROR', latched=True)]), 'run "ack"', 'resume'),
    (SafetyStatus(state='FAULT', faults=[SafetyFault(code='SCANNER_SILENT', cause_active=True, latched=True)]),
     'remove the cause of SCANNER_SILENT', 'resume'),
    (SafetyStatus(state='ESTOP', faults=[SafetyFault(code='ESTOP', cause_active=True, latched=True)]),
     'release the e-stop', 'resume'),
    (SafetyStatus(state='HOLD', awaiting_resume=True), 'run "resume"', None),
    (SafetyStatus(state='SCAN_HOLD'), 'wait for the scan to end', 'resume'),
])
def test_status_advice_fits_the_state(status, expected, forbidden):
    text = advice(status)
    assert expected in text
    if forbidden:
        assert forbidden not in text


def test_interactive_prompt_prints_phase_safety_and_refusal_reasons(graph, console):
    stack = FakeStack(graph)
    console.wait_status()
    out = io.StringIO()
    code = interactive(console, ['status', '', 'align', 'estop sideways', 'ack TRACKING_ERROR', 'help', 'quit',
                                 'resume'], out)
    text = out.getvalue()
    assert 'safety: HOLD' in text and 'workflow: PLANNING/REGISTER' in text
    assert f'align: REFUSED - {ALIGN_REFUSAL}' in text
    assert '[PLANNING/REGISTER | HOLD (fault TRACKING_ERROR latched)]' in text   # state line after a command
    assert "invalid choice: 'sideways'" in text                                  # usage error, loop goes on
    assert 'acknowledge TRACKING_ERROR: done' in text
    assert 'commands:' in text
    assert 'resume' not in [n for n, _ in stack.requests]                         # after quit: not run
    assert code == EXIT_OK                                                         # the last command (ack)


def test_missing_service_and_status_raise_a_clear_error(graph, session):
    console = OperatorConsole(graph.create_node('lonely_console'), timeout=0.5, operator_id='dr_a',
                              session_file=str(session[0]))
    # A supervisor destroyed by an earlier test can linger in DDS discovery for a moment: then the service
    # is "seen" but never answers. Both are the same operator-facing failure: unavailable, named.
    with pytest.raises(ConsoleError, match=r'/safety/resume (not available|did not answer) within 0\.5 s') as err:
        console.resume()
    assert err.value.exit_code == EXIT_UNAVAILABLE
    with pytest.raises(ConsoleError, match='no /safety/status within 0.5 s'):
        console.status()


def test_format_status_of_a_ready_system():
    lines = format_status(SafetyStatus(state='READY', motion_permitted=True))
    assert lines == ['safety: READY (motion PERMITTED)', 'faults: none']


def run_console(processes, name, *args):
    proc = processes('igt_robot.operator_console', *args, name=name)
    testing.wait_for(lambda: not proc.alive(), 60, f'igt-operator {" ".join(args)} to finish')
    return proc.proc.returncode, proc.output()


def test_command_line_status_and_unavailable_service_as_subprocesses(graph, processes, session):
    FakeStack(graph)
    code, output = run_console(processes, 'console_status', 'status', '--timeout', '20')
    assert code == EXIT_OK, output
    assert 'safety: HOLD (motion not permitted)' in output and 'TRACKING_ERROR' in output
    assert 'workflow: PLANNING/REGISTER' in output

    code, output = run_console(processes, 'console_cmd', '--operator', 'dr_b', '--timeout', '20',
                               '--session-file', str(session[0]), 'cmd', 'align')
    assert code == EXIT_REFUSED and ALIGN_REFUSAL in output, output

    code, output = run_console(processes, 'console_missing', '--timeout', '1', 'scan', 'start', '--protocol', 'x',
                               '--mas', 'lots')
    assert code == 2 and "invalid float value: 'lots'" in output, output


def test_command_line_exits_3_when_the_service_is_missing(processes):
    code, output = run_console(processes, 'console_no_stack', '--timeout', '1', 'estop', 'on')
    assert code == EXIT_UNAVAILABLE
    assert 'service /safety/estop not available within 1 s: is the safety_supervisor running?' in output
