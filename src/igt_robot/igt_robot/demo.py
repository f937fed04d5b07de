"""`make demo`: the whole needle placement in simulation, headless, in one process.

Brings the stack up in-process (igt_robot.bringup: the same nodes and config/*.yaml
that `ros2 launch igt_robot sim.launch.py` starts) with the MuJoCo robot, runs the
procedure node in demo mode and prints progress and a summary. The record, the
MCAP log, the scans and the HTML report go to build/records/<procedure id>/.
Exit code 0 only when the procedure completed; 130 after Ctrl-C (everything stopped, no traceback).

No orphan (docs/record.md): the control process dies with this one (PR_SET_PDEATHSIG, and it watches a
pipe from this process as a fallback); the supervisor requires the heartbeats of the recorder and the
procedure node, so losing this process or the recorder stops the motion. Fast DDS shared-memory files of
dead processes are removed at start.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from igt_robot import cpu_priority, fastdds_shm, paths
from igt_robot.bringup import PARENT_PIPE_ENV, PROFILES, Bringup, available_nodes
from igt_robot.nodes import topics
from igt_robot.record import procedure_id as procedure_identity

# Nodes of this (workflow) process whose heartbeat the supervisor requires for motion: without the workflow
# or the recorder nothing moves. Only for motion: image work may starve this process while nothing moves.
WORKFLOW_HEARTBEATS = list(topics.WORKFLOW_HEARTBEAT_NODES)
PR_SET_PDEATHSIG = 1


class ProcedureFailed(RuntimeError):
    """The simulated procedure did not complete; the message says why."""


def run_simulated_procedure(seed: int = 7, modality: str = 'CT', depth: float = 0.0, steps: int = 3,
                            timeout: float = 900.0, procedure_id: str = '', quiet_nodes: bool = False,
                            extra_overrides: dict = None, record_dir: str = '') -> dict:
    """Bring the stack up in this process, run one simulated procedure, return its summary."""
    procedure_id = procedure_id or time.strftime('demo-%Y%m%d-%H%M%S')
    with tempfile.TemporaryDirectory(prefix='igt-demo-') as run_dir:
        return _run_simulated_procedure(seed, modality, depth, steps, timeout, procedure_id, quiet_nodes,
                                        extra_overrides, record_dir, pathlib.Path(run_dir) / 'trigger_port')


def _run_simulated_procedure(seed, modality, depth, steps, timeout, procedure_id, quiet_nodes, extra_overrides,
                             record_dir, trigger_link: pathlib.Path) -> dict:
    procedure_identity.set_current(procedure_id)   # every event and dose of both processes carries it
    record_dir = paths.record_dir(procedure_id, record_dir)
    shared = {'procedure_id': procedure_id, 'record_dir': str(record_dir)}
    overrides = {
        'safety_supervisor': {'motion_heartbeats': WORKFLOW_HEARTBEATS},
        'recorder_node': dict(shared),
        'procedure_node': dict(shared, demo=True, scenario_seed=seed, modality=modality, target_depth=depth,
                               insertion_steps=steps),
        # The simulated controller offers its trigger port (docs/serial_protocol.md §9) to the relay process.
        'hardware_node': {'backend': 'mujoco', 'mujoco_trigger_port_link': str(trigger_link)},
        'scanner_trigger': {'trigger_port': str(trigger_link)},
        'igtl_bridge': {'port': 0},
        'scanner_interface': {'igtl_port': 0},
    }
    for name, values in (extra_overrides or {}).items():
        overrides.setdefault(name, {}).update(values)
    names = available_nodes(PROFILES['workflow'])
    record_dir.mkdir(parents=True, exist_ok=True)
    if not quiet_nodes:
        print(f'[demo] control process: {", ".join(PROFILES["control"])}; supervision process: '
              f'{", ".join(PROFILES["supervision"])}; trigger process: {", ".join(PROFILES["trigger"])}; '
              f'this process: {", ".join(names)}', flush=True)
    with _control_process(overrides, record_dir / 'control_process.log') as control, \
            _control_process(overrides, record_dir / 'supervision_process.log', 'supervision') as supervision, \
            _control_process(overrides, record_dir / 'trigger_process.log', 'trigger') as trigger, \
            Bringup(names, overrides=overrides) as bringup:
        procedure = bringup.nodes['procedure_node']
        if not quiet_nodes:
            print(f'[demo] control process pid {control.pid}, supervision process pid {supervision.pid}, '
                  f'trigger process pid {trigger.pid}', flush=True)
        try:
            finished = _wait_for_procedure(procedure, control, timeout, trigger)
        except BaseException:
            control.request_stop()   # the robot stops first; this process's nodes shut down meanwhile
            raise
        if not quiet_nodes:
            for name, node in bringup.nodes.items():
                describe = getattr(node, 'describe_state', None)
                if callable(describe):
                    print(f'[demo] {name}: {describe()}', flush=True)
    if not finished:
        raise ProcedureFailed(f'the procedure did not finish within {timeout:g} s')
    if procedure.demo_error:
        raise ProcedureFailed(procedure.demo_error)
    return procedure.demo_summary


def _wait_for_procedure(procedure, control, timeout: float, trigger=None) -> bool:
    """Wait for the demo; a lost control (or trigger) process ends it at once with the reason."""
    deadline = time.monotonic() + timeout
    while not procedure.demo_done.wait(0.2):
        if trigger is not None and trigger.poll() is not None:
            # Its silence holds the controller's trigger at imaging: nothing would move again.
            raise ProcedureFailed(f'the trigger process exited (code {trigger.returncode}); see '
                                  'trigger_process.log in the record folder')
        if control.poll() is not None:
            # The procedure node sees the loss within one heartbeat timeout: let it record and say so first.
            with contextlib.suppress(Exception):
                from igt_robot.waiting import wait_for
                wait_for(lambda: procedure.control_lost, 3.0, 'the procedure node to see the loss', poll=0.05)
                time.sleep(0.3)   # the control_lost event reaches the recorder
            raise ProcedureFailed(f'the control process exited (code {control.returncode}); see '
                                  'control_process.log in the record folder')
        if procedure.control_lost and time.monotonic() - procedure.control_lost_since > 5.0:
            raise ProcedureFailed(f'{procedure.control_lost} (process alive but silent)')
        if time.monotonic() > deadline:
            return False
    return True


def _control_child_setup():
    """In the control process before exec: die with the parent; control before image processing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)   # SIGTERM: the control process stops the robot
    cpu_priority.raise_priority(0, -10)   # needs CAP_SYS_NICE (root); elsewhere the CPU is shared equally


class ControlProcess:
    """Safety-critical nodes in their own process (bringup profile 'control' or 'supervision').

    It dies with this process: PR_SET_PDEATHSIG (SIGTERM) and, as a fallback (the death signal follows
    the parent *thread*), a pipe whose only writer is this process (end-of-file = this process is gone).
    """

    def __init__(self, overrides: dict, log_path, profile: str = 'control'):
        args = [sys.executable, '-m', 'igt_robot.bringup', '--profile', profile]
        for node in PROFILES[profile]:
            for key, value in overrides.get(node, {}).items():
                args += ['--set', f'{node}.{key}={_set_text(value)}']
        read_end, self._write_end = os.pipe()
        env = dict(os.environ, **{PARENT_PIPE_ENV: str(read_end)})
        try:
            with open(log_path, 'wb') as log:
                self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, env=env, pass_fds=(read_end,),
                                                preexec_fn=_control_child_setup)
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def poll(self):
        return self.process.poll()

    @property
    def returncode(self):
        return self.process.returncode

    @property
    def pid(self) -> int:
        return self.process.pid

    def request_stop(self) -> None:
        """Ask the control process to stop (it stops the robot and exits); does not wait."""
        if self._write_end is not None:
            os.close(self._write_end)
            self._write_end = None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, grace: float = 4.0) -> None:
        """Stop and reap it: SIGTERM, then SIGKILL after ``grace`` s (its whole process group)."""
        self.request_stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(grace)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _control_process(overrides: dict, log_path, profile: str = 'control') -> ControlProcess:
    """'control' (hardware node, motion controller) or 'supervision' (scanner interface, safety supervisor)."""
    return ControlProcess(overrides, log_path, profile)


def _set_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(str(v) for v in value) + ']'
    return str(value)


def _interrupt_once(signum, frame):
    """Ctrl-C / SIGTERM: one KeyboardInterrupt ends the demo; more are ignored while it cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _dicom_chain(enabled: bool):
    """``--via-dicom``: a private Orthanc as the scanner's DICOM node, forwarding to the stack's receiver."""
    if not enabled:
        yield {}
        return
    from igt_robot.simulation.dicom_peer import OrthancPeer, PeerError, free_port
    port = free_port()
    folder = paths.repo_root() / 'build' / 'orthanc' / time.strftime('%Y%m%d-%H%M%S')
    try:
        peer = OrthancPeer(folder, {'stack': ('IGT_ROBOT', port)})
        peer.start()
    except PeerError as exc:
        raise ProcedureFailed(f'--via-dicom needs Orthanc: {exc}') from exc
    try:
        yield {'procedure_node': {'acquisition': 'dicom', 'dicom_port': port, 'dicom_allowed_calling_aets': peer.aet,
                                  'demo_dicom_peer': peer.url, 'demo_dicom_receiver': 'stack'}}
    finally:
        peer.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', type=int, default=7, help='simulated patient and robot mounting')
    parser.add_argument('--modality', choices=('CT', 'MR'), default='CT')
    parser.add_argument('--depth', type=float, default=0.0, help='target depth below the skin, m (0 = random)')
    parser.add_argument('--steps', type=int, default=3, help='insertion steps (each followed by a control scan)')
    parser.add_argument('--timeout', type=float, default=900.0, help='give up after this many seconds')
    parser.add_argument('--procedure-id', default='', help='procedure id (default demo-<date>-<time>)')
    parser.add_argument('--record-dir', default='', help='record folder (default build/records/<procedure id>)')
    parser.add_argument('--via-dicom', action='store_true',
                        help='every image by C-STORE: simulated scanner -> Orthanc -> the stack\'s DICOM receiver, '
                             'dose from the images')
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    removed = fastdds_shm.remove_dead_fastdds_shm()
    if removed:
        print(f'[demo] removed {len(removed)} Fast DDS shared-memory file(s) of dead processes', flush=True)
    shm_before = fastdds_shm.fastdds_shm_entries()
    try:
        with _dicom_chain(args.via_dicom) as extra:
            summary = run_simulated_procedure(args.seed, args.modality, args.depth, args.steps, args.timeout,
                                              extra_overrides=extra, procedure_id=args.procedure_id,
                                              record_dir=args.record_dir)
    except ProcedureFailed as failure:
        print(f'[demo] FAILED: {failure}', flush=True)
        return 1
    except KeyboardInterrupt:
        # The with-blocks have stopped both processes by now (Ctrl-C during clean-up is ignored below).
        print('[demo] interrupted: the robot is stopped and the record closed', flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the clean-up short
        # This process exits next: its Fast DDS shared-memory names can go (the mappings live on until exit).
        fastdds_shm.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])
    print(f'[demo] done: tip {summary["tip_to_target_mm"]:.2f} mm from target; report {summary["report"]}',
          flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
