"""`make demo`: the whole needle placement in simulation, headless, in one process.

Brings the stack up in-process (igt_robot.bringup: the same nodes and config/*.yaml
that `ros2 launch igt_robot sim.launch.py` starts) with the MuJoCo robot, runs the
procedure node in demo mode and prints progress and a summary. The record, the
MCAP log, the scans and the HTML report go to build/records/<procedure id>/.
Exit code 0 only when the procedure completed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from igt_robot import paths
from igt_robot.bringup import PROFILES, Bringup, available_nodes


class ProcedureFailed(RuntimeError):
    """The simulated procedure did not complete; the message says why."""


def run_simulated_procedure(seed: int = 7, modality: str = 'CT', depth: float = 0.0, steps: int = 3,
                            timeout: float = 900.0, procedure_id: str = '', quiet_nodes: bool = False,
                            extra_overrides: dict = None) -> dict:
    """Bring the stack up in this process, run one simulated procedure, return its summary."""
    procedure_id = procedure_id or time.strftime('demo-%Y%m%d-%H%M%S')
    record_dir = paths.repo_root() / 'build' / 'records' / procedure_id
    shared = {'procedure_id': procedure_id, 'record_dir': str(record_dir)}
    overrides = {
        'recorder_node': dict(shared),
        'procedure_node': dict(shared, demo=True, scenario_seed=seed, modality=modality, target_depth=depth,
                               insertion_steps=steps),
        'hardware_node': {'backend': 'mujoco'},
        'igtl_bridge': {'port': 0},
        'scanner_interface': {'igtl_port': 0},
    }
    for name, values in (extra_overrides or {}).items():
        overrides.setdefault(name, {}).update(values)
    names = available_nodes(PROFILES['workflow'])
    record_dir.mkdir(parents=True, exist_ok=True)
    if not quiet_nodes:
        print(f'[demo] control process: {", ".join(PROFILES["control"])}; this process: {", ".join(names)}',
              flush=True)
    with _control_process(overrides, record_dir / 'control_process.log'), \
            Bringup(names, overrides=overrides) as bringup:
        procedure = bringup.nodes['procedure_node']
        finished = procedure.demo_done.wait(timeout)
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


def _raise_priority():
    """Control before image processing: the control process runs at a higher CPU priority where allowed."""
    with contextlib.suppress(OSError):
        os.nice(-10)   # needs CAP_SYS_NICE (root); elsewhere both processes share the CPU equally


@contextlib.contextmanager
def _control_process(overrides: dict, log_path):
    """The safety-critical nodes (hardware, scanner, supervisor, motion controller) in their own process."""
    args = [sys.executable, '-m', 'igt_robot.bringup', '--profile', 'control']
    for node in PROFILES['control']:
        for key, value in overrides.get(node, {}).items():
            args += ['--set', f'{node}.{key}={value}']
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=dict(os.environ), preexec_fn=_raise_priority)
    try:
        yield process
    finally:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace)


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
    parser.add_argument('--via-dicom', action='store_true',
                        help='every image by C-STORE: simulated scanner -> Orthanc -> the stack\'s DICOM receiver, '
                             'dose from the images')
    args = parser.parse_args(argv)
    from igt_robot import testing
    shm_before = testing.fastdds_shm_entries()
    try:
        with _dicom_chain(args.via_dicom) as extra:
            summary = run_simulated_procedure(args.seed, args.modality, args.depth, args.steps, args.timeout,
                                              extra_overrides=extra)
    except ProcedureFailed as failure:
        print(f'[demo] FAILED: {failure}', flush=True)
        return 1
    finally:
        # This process exits next: its Fast DDS shared-memory names can go (the mappings live on until exit).
        testing.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])
    print(f'[demo] done: tip {summary["tip_to_target_mm"]:.2f} mm from target; report {summary["report"]}',
          flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
