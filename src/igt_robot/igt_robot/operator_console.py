"""igt-operator: the operator's command-line console for the running stack.

    igt-operator status                        safety state, permission, reason, faults; workflow phase/step
    igt-operator resume                        /safety/resume
    igt-operator ack [CODE ...]                /safety/acknowledge (no code = all latched faults)
    igt-operator estop on|off                  /safety/estop (off releases it; motion still needs a resume)
    igt-operator scan start|stop [--protocol NAME] [--ionising ...]   /scanner/set_state
    igt-operator cmd NAME [ARG]                /procedure/command (workflow: start, confirm_plan, align, ...)
    igt-operator                               interactive: a prompt reading the commands above

Exit codes: 0 done/accepted, 1 refused (the reason is printed), 2 usage error, 3 a service or the
safety status was not available within ``--timeout`` seconds. ``--operator`` (default $IGT_OPERATOR,
else $USER) is the operator id sent with confirmations, acknowledges and resumes.

Operator-only requests (resume, ack, e-stop release, scan overrides, workflow commands) carry the
operator's session secret, read from the file the safety supervisor issues at start-up
(``--session-file``, default $IGT_OPERATOR_SESSION, else the per-user default of
igt_robot.safety.operator_session). Pressing the e-stop never needs it.

``status`` needs /safety/status; the workflow line comes from /procedure/command with command
``status`` and says "unknown" when the procedure node does not answer (the exit code is still 0).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
import threading
import time
from typing import Callable, Iterable, List, Optional, TextIO

import rclpy
from rclpy.executors import SingleThreadedExecutor

from igt_robot.hardware import protocol
from igt_robot.nodes import qos, topics
from igt_robot.safety import operator_session
from igt_robot_msgs.msg import SafetyStatus, ScannerState
from igt_robot_msgs.srv import AcknowledgeFaults, OperatorCommand, ResumeMotion, SetEstop, SetScannerState

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

SERVICES = {
    'resume': (ResumeMotion, topics.SAFETY_RESUME, 'safety_supervisor'),
    'ack': (AcknowledgeFaults, topics.SAFETY_ACKNOWLEDGE, 'safety_supervisor'),
    'estop': (SetEstop, topics.SAFETY_ESTOP, 'safety_supervisor'),
    'scan': (SetScannerState, topics.SCANNER_SET_STATE, 'scanner_interface'),
    'cmd': (OperatorCommand, topics.PROCEDURE_COMMAND, 'procedure_node'),
}


class ConsoleError(Exception):
    """A console action could not be carried out; ``exit_code`` says why (see module docstring)."""

    def __init__(self, message: str, exit_code: int = EXIT_UNAVAILABLE):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class Outcome:
    """Result of one console action: ``ok`` (accepted) and the lines to print."""

    ok: bool
    lines: List[str]

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_REFUSED

    @property
    def text(self) -> str:
        return '\n'.join(self.lines)


def advice(status: SafetyStatus) -> Optional[str]:
    """What the operator does next in this state (None: nothing to do). Never "resume" while a fault or
    an e-stop is latched: the supervisor would refuse it."""
    active = [f.code for f in status.faults if f.cause_active]
    if status.state == 'ESTOP':
        return 'next: release the e-stop ("estop off"), then "ack"'
    if status.state == 'FAULT' or status.faults:
        if active:
            drive = [c for c in active if c.startswith('HARDWARE_') or c in _DRIVE_FAULTS]
            if drive and len(drive) == len(active):
                return f'next: "ack" resets the drive ({", ".join(drive)}) once the cause is gone'
            return f'next: remove the cause of {", ".join(active)}, then "ack"'
        return 'next: run "ack" to acknowledge the latched faults'
    if status.state == 'SCAN_HOLD':
        return 'next: wait for the scan to end' + (', then "resume"' if status.awaiting_resume else '')
    if status.state == 'INIT':
        return 'next: wait for the stack to start (every required input seen)'
    if status.awaiting_resume:
        return 'awaiting resume: run "resume" to permit motion again'
    return None


# Fault codes the motor controller latches itself (docs/serial_protocol.md): cleared by the operator's ack.
_DRIVE_FAULTS = tuple(f.name for f in protocol.Fault)


def format_status(status: SafetyStatus) -> List[str]:
    """Operator-readable lines of a SafetyStatus."""
    lines = [f"safety: {status.state} (motion {'PERMITTED' if status.motion_permitted else 'not permitted'})"]
    if status.reason:
        lines.append(f'reason: {status.reason}')
    hint = advice(status)
    if hint:
        lines.append(hint)
    if status.scanner_phase:
        lines.append(f'scanner: {status.scanner_phase}')
    if status.faults:
        lines.append(f'faults ({len(status.faults)}):')
        for f in status.faults:
            flags = ', '.join(x for x, on in (('latched', f.latched), ('cause active', f.cause_active)) if on)
            lines.append(f'  - {f.code}' + (f' [{flags}]' if flags else '') + (f': {f.detail}' if f.detail else ''))
    else:
        lines.append('faults: none')
    return lines


class OperatorConsole:
    """Console actions on a node that someone else spins (see :func:`open_console`).

    Every action waits up to ``timeout`` s for its service and for the answer and raises
    :class:`ConsoleError` (exit code 3) when either does not come.
    """

    def __init__(self, node, timeout: float = 5.0, operator_id: str = '', session_file: Optional[str] = None):
        if not timeout > 0:
            raise ValueError(f'timeout must be > 0 s, got {timeout!r}')
        self.node = node
        self.session_file = session_file or os.environ.get('IGT_OPERATOR_SESSION') or None
        self.timeout = float(timeout)
        self.operator_id = operator_id or os.environ.get('IGT_OPERATOR') or os.environ.get('USER') or 'operator'
        self._status: Optional[SafetyStatus] = None
        self._status_event = threading.Event()
        self._status_lock = threading.Lock()
        self._clients = {key: node.create_client(t, name) for key, (t, name, _) in SERVICES.items()}
        self._subscription = node.create_subscription(SafetyStatus, topics.SAFETY_STATUS, self._on_status,
                                                      qos.SAFETY_LATCHED)

    # ------------------------------------------------------------ plumbing
    def _on_status(self, msg: SafetyStatus) -> None:
        with self._status_lock:
            self._status = msg
        self._status_event.set()

    def latest_status(self) -> Optional[SafetyStatus]:
        with self._status_lock:
            return self._status

    def wait_status(self, timeout: Optional[float] = None) -> SafetyStatus:
        """The current /safety/status (latched: arrives at once from a running supervisor)."""
        timeout = self.timeout if timeout is None else timeout
        if not self._status_event.wait(timeout):
            raise ConsoleError(f'no /safety/status within {timeout:g} s: is the safety_supervisor running?')
        return self.latest_status()

    def call(self, key: str, request, timeout: Optional[float] = None):
        """Call one of :data:`SERVICES`; the response, or ConsoleError naming the missing service."""
        timeout = self.timeout if timeout is None else timeout
        _, name, server = SERVICES[key]
        client = self._clients[key]
        deadline = time.monotonic() + timeout
        if not client.wait_for_service(timeout_sec=timeout):
            raise ConsoleError(f'service {name} not available within {timeout:g} s: is the {server} running?')
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(max(0.0, deadline - time.monotonic())):
            client.remove_pending_request(future)
            raise ConsoleError(f'service {name} did not answer within {timeout:g} s')
        if future.exception() is not None:
            raise ConsoleError(f'service {name} failed: {future.exception()}')
        return future.result()

    def token(self, required: bool = True) -> str:
        """The operator's session secret (read afresh: the supervisor issues a new one at each start)."""
        try:
            return operator_session.read_session(self.session_file)
        except operator_session.OperatorSessionError as exc:
            if not required:
                return ''
            raise ConsoleError(f'{exc}; is the safety_supervisor running as this user?', EXIT_REFUSED) from None

    # ------------------------------------------------------------ actions
    def workflow(self, timeout: Optional[float] = None) -> Optional[OperatorCommand.Response]:
        """The procedure node's answer to ``status`` (phase, step, message), or None if it is not running."""
        try:
            return self.call('cmd', OperatorCommand.Request(command='status', operator_id=self.operator_id,
                                                            operator_token=self.token(required=False)), timeout)
        except ConsoleError:
            return None

    def status(self) -> Outcome:
        status = self.wait_status()
        lines = format_status(status)
        wf = self.workflow()
        if wf is None:
            lines.append(f'workflow: unknown (/procedure/command did not answer within {self.timeout:g} s)')
        else:
            lines.append(f'workflow: {wf.phase}/{wf.step}' + (f' - {wf.message}' if wf.message else ''))
        return Outcome(True, lines)

    def resume(self) -> Outcome:
        r = self.call('resume', ResumeMotion.Request(operator_id=self.operator_id, operator_token=self.token()))
        return self._safety_outcome('resume', r.success, r.message, r.status)

    def acknowledge(self, codes: Iterable[str] = ()) -> Outcome:
        codes = [c.strip().upper() for c in codes if c.strip()]
        r = self.call('ack', AcknowledgeFaults.Request(operator_id=self.operator_id, codes=codes,
                                                       operator_token=self.token()))
        return self._safety_outcome(f"acknowledge {' '.join(codes) or '(all)'}", r.success, r.message, r.status)

    def estop(self, active: bool) -> Outcome:
        # Pressing never needs the secret (sent if readable); releasing does.
        r = self.call('estop', SetEstop.Request(active=bool(active), source=f'igt-operator:{self.operator_id}',
                                                operator_token=self.token(required=not active)))
        lines = [f"e-stop {'ON' if active else 'released'}: {'done' if r.success else 'REFUSED'}"
                 + (f' - {r.message}' if r.message else '')]
        if not active and r.success:
            lines.append('motion stays stopped until the faults are acknowledged and motion is resumed')
        return Outcome(bool(r.success), lines)

    def scan(self, start: bool, protocol: str = '', ionising: bool = False, ctdi_vol_mgy: float = 0.0,
             dlp_mgy_cm: float = 0.0, kv: float = 0.0, mas: float = 0.0) -> Outcome:
        phase = ScannerState.PHASE_ACQUIRING if start else ScannerState.PHASE_IDLE
        r = self.call('scan', SetScannerState.Request(
            phase=phase, protocol_name=protocol if start else '', is_ionising=bool(ionising and start),
            ctdi_vol_mgy=float(ctdi_vol_mgy), dlp_mgy_cm=float(dlp_mgy_cm), kv=float(kv), mas=float(mas),
            operator_token=self.token()))
        what = f"scan {'start' if start else 'stop'}" + (f" ('{protocol}')" if start and protocol else '')
        return Outcome(bool(r.accepted), [f"{what}: {'accepted' if r.accepted else 'REFUSED'}"
                                          + (f' - {r.message}' if r.message else '')])

    def command(self, name: str, arg: str = '') -> Outcome:
        r = self.call('cmd', OperatorCommand.Request(command=name, argument=arg, operator_id=self.operator_id,
                                                     operator_token=self.token()))
        head = f"{name}{(' ' + arg) if arg else ''}: {'accepted' if r.accepted else 'REFUSED'}"
        lines = [head + (f' - {r.message}' if r.message else ''), f'workflow: {r.phase}/{r.step}']
        return Outcome(bool(r.accepted), lines)

    def _safety_outcome(self, what: str, success: bool, message: str, status: SafetyStatus) -> Outcome:
        lines = [f"{what}: {'done' if success else 'REFUSED'}" + (f' - {message}' if message else '')]
        if status is not None and status.state:
            lines += format_status(status)
        return Outcome(bool(success), lines)


# ====================================================================== command line
def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='igt-operator', description='Operator console of igt_robot.',
                                     exit_on_error=exit_on_error)
    parser.add_argument('--timeout', type=float, default=5.0,
                        help='seconds to wait for a service or the safety status (default 5)')
    parser.add_argument('--operator', default='', help='operator id (default $IGT_OPERATOR or $USER)')
    parser.add_argument('--session-file', default=None,
                        help='operator session file (default $IGT_OPERATOR_SESSION, else the per-user default)')
    # The same options after the action ("igt-operator status --timeout 2"); SUPPRESS keeps the
    # top-level value when they are not repeated there.
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument('--timeout', type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    shared.add_argument('--operator', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    shared.add_argument('--session-file', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest='action')
    sub.add_parser('status', parents=[shared], help='safety state, permission, reason, faults and workflow phase/step')
    sub.add_parser('resume', parents=[shared], help='permit motion again (/safety/resume)')
    ack = sub.add_parser('ack', parents=[shared], help='acknowledge latched faults (all when no code is given)')
    ack.add_argument('codes', nargs='*', metavar='CODE')
    estop = sub.add_parser('estop', parents=[shared], help='software e-stop on or off')
    estop.add_argument('state', choices=['on', 'off'])
    scan = sub.add_parser('scan', parents=[shared], help='tell the scanner interface a scan starts or stops')
    scan.add_argument('state', choices=['start', 'stop'])
    scan.add_argument('--protocol', default='', help='scanner protocol name, e.g. "control scan"')
    scan.add_argument('--ionising', action='store_true', help='CT scan (a dose record is written)')
    scan.add_argument('--ctdi', type=float, default=0.0, help='CTDIvol, mGy')
    scan.add_argument('--dlp', type=float, default=0.0, help='DLP, mGy·cm')
    scan.add_argument('--kv', type=float, default=0.0, help='tube voltage, kV')
    scan.add_argument('--mas', type=float, default=0.0, help='tube current-time product, mAs')
    cmd = sub.add_parser('cmd', parents=[shared], help='a workflow command for /procedure/command')
    cmd.add_argument('name')
    cmd.add_argument('arg', nargs='?', default='')
    return parser


def run_action(console: OperatorConsole, args: argparse.Namespace) -> Outcome:
    """Carry out one parsed command; raises ConsoleError when a service is missing."""
    if args.action == 'status':
        return console.status()
    if args.action == 'resume':
        return console.resume()
    if args.action == 'ack':
        return console.acknowledge(args.codes)
    if args.action == 'estop':
        return console.estop(args.state == 'on')
    if args.action == 'scan':
        return console.scan(args.state == 'start', args.protocol, args.ionising, args.ctdi, args.dlp, args.kv,
                            args.mas)
    if args.action == 'cmd':
        return console.command(args.name, args.arg)
    raise ConsoleError(f'unknown action {args.action!r}', EXIT_USAGE)


INTERACTIVE_HELP = """commands: status | resume | ack [CODE...] | estop on|off | scan start|stop [--protocol NAME]
          cmd NAME [ARG] | NAME [ARG] (a workflow command, e.g. confirm_plan) | help | quit"""
_ACTIONS = ('status', 'resume', 'ack', 'estop', 'scan', 'cmd')


def interactive(console: OperatorConsole, lines: Iterable[str], out: TextIO = sys.stdout,
                prompt: Callable[[], None] = lambda: None) -> int:
    """The prompt loop: one command per line; after each, the phase, safety state and any refusal.

    Returns the exit code of the last command (0 when none ran). A missing service is
    reported and the loop goes on (the operator may start it and retry).
    """
    parser = build_parser(exit_on_error=False)
    last = EXIT_OK
    prompt()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith('#'):
            prompt()
            continue
        if line in ('quit', 'exit', 'q'):
            break
        if line in ('help', '?'):
            print(INTERACTIVE_HELP, file=out)
            prompt()
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            print(f'cannot read {line!r}: {exc}', file=out)
            prompt()
            continue
        if words[0] not in _ACTIONS:
            words = ['cmd'] + words  # bare workflow command: "confirm_plan", "insert_step 0.01"
        try:
            with contextlib.redirect_stderr(out):
                args = parser.parse_args(words)
        except (argparse.ArgumentError, SystemExit) as exc:
            print(f'usage error: {exc}' if isinstance(exc, argparse.ArgumentError) else INTERACTIVE_HELP, file=out)
            last = EXIT_USAGE
            prompt()
            continue
        try:
            outcome = run_action(console, args)
            print(outcome.text, file=out)
            last = outcome.exit_code
        except ConsoleError as exc:
            print(f'ERROR: {exc}', file=out)
            last = exc.exit_code
        if args.action not in ('status',):
            print(_state_line(console), file=out)
        prompt()
    return last


def _state_line(console: OperatorConsole) -> str:
    """One line after each interactive command: workflow phase/step and safety state."""
    wf = console.workflow(timeout=min(console.timeout, 2.0))
    status = console.latest_status()
    phase = f'{wf.phase}/{wf.step}' if wf is not None else 'workflow unknown'
    safety = (f"{status.state}{'' if status.motion_permitted else ' (' + (status.reason or 'not permitted') + ')'}"
              if status is not None else 'safety status unknown')
    return f'[{phase} | {safety}]'


@contextlib.contextmanager
def open_console(timeout: float = 5.0, operator_id: str = '', args=None, session_file: Optional[str] = None):
    """A console on its own rclpy context and node, spun in a background thread."""
    context = rclpy.Context()
    rclpy.init(args=args, context=context)
    node = rclpy.create_node(f'igt_operator_{os.getpid()}', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=lambda: _spin_quietly(executor), name='igt-operator-spin', daemon=True)
    thread.start()
    try:
        yield OperatorConsole(node, timeout, operator_id, session_file)
    finally:
        executor.shutdown(timeout_sec=2.0)
        with contextlib.suppress(Exception):
            node.destroy_node()
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=context)
        thread.join(timeout=3.0)


def _spin_quietly(executor) -> None:
    with contextlib.suppress(Exception):
        executor.spin()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    if not args.timeout > 0:
        print('igt-operator: --timeout must be > 0 s', file=sys.stderr)
        return EXIT_USAGE
    with open_console(args.timeout, args.operator, session_file=args.session_file) as console:
        if args.action is None:
            print(f'igt-operator (operator {console.operator_id}); "help" lists the commands, "quit" leaves')
            tty = sys.stdin.isatty()
            return interactive(console, sys.stdin, sys.stdout,
                               prompt=(lambda: print('igt> ', end='', flush=True)) if tty else (lambda: None))
        try:
            outcome = run_action(console, args)
        except ConsoleError as exc:
            print(f'igt-operator: {exc}', file=sys.stderr)
            return exc.exit_code
        print(outcome.text)
        return outcome.exit_code


if __name__ == '__main__':
    sys.exit(main())
