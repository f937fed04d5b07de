#!/usr/bin/env python3
"""Stress benchmark: the interlock and whole procedures while the machine is busy.

Load (started and stopped here, each bounded by a deadline so nothing outlives the bench):
two busy-loop processes (one per core of the 2-core target) and one fsync-heavy writer
(64 KiB written and fsync'ed in a loop, rewriting one file of at most 64 MiB).

Under that load:

1. interlock latency, as bench/interlock.py measures it (stamping emulator, control process, scanner_trigger
   relay; ACQUIRING published -> the first frame that stops the drive read by it), ``--interlock-events`` events;
   beside it the scanner heartbeat's worst arrival gap (the figure the staleness timeout is
   sized against, docs/safety.md);
2. ``--procedures`` randomised procedures (default 20), each the whole `make demo` procedure as
   bench/procedure.py runs it (igt_robot.demo.run_simulated_procedure);
3. from each procedure's record (its MCAP log): motion during imaging -- the robot's joints
   moving beyond two encoder counts while the scanner reports PREPARING or ACQUIRING, after the
   controller's stop should have ended: ``STOP_LATENCY_ALLOWANCE_S`` after the imaging edge plus
   the controlled stop from the joint velocities at the edge at the axes' deceleration limits
   (the ramp the controller runs, hardware/controller_core.py) -- and the controller's
   trajectory-buffer underruns (RobotState.buffer_underruns). Times are the messages' own stamps
   (the scanner's publication, the drive's reading), not the recorder's arrival times.

The emulator (standing in for the controller's real-time firmware) and the control process run at a
raised CPU priority where allowed, as `make demo` runs its control process. In the interlock phase the
kernel workers that carry the ptys' bytes run at SCHED_FIFO 1 where permitted, as bench/interlock.py
explains (``--pty-workers-normal`` leaves them alone); the procedures run with them untouched.

Figures: procedure_completed_fraction_stressed = 1.0, motion_during_imaging_events = 0,
buffer_underruns_stressed = 0, interlock_latency_p99_stressed <= 10 ms.

    python bench/stress.py [--procedures 20] [--interlock-events 300] [--seed 2000]
"""
import argparse
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
STOP_LATENCY_ALLOWANCE_S = 0.1   # imaging edge -> the ramp starts: the interlock latency (p99 under this load
#                                  < 10 ms) plus one /robot/state period (40 ms) and its jitter
MOTION_EPS = {'prismatic': 2e-6, 'revolute': 2e-5}   # two encoder counts (config/robot.yaml)
IMAGING = (2, 3)             # ScannerState.PHASE_PREPARING, PHASE_ACQUIRING

BUSY = 'import time\nend = time.monotonic() + {d}\nwhile time.monotonic() < end:\n    pass\n'
WRITER = '''import os, time
end = time.monotonic() + {d}
block = os.urandom(65536)
path = {path!r}
while time.monotonic() < end:
    with open(path, 'wb') as f:
        for _ in range(1024):
            if time.monotonic() >= end:
                break
            f.write(block)
            f.flush()
            os.fsync(f.fileno())
os.unlink(path)
'''


class Load:
    """Two busy loops and one fsync-heavy writer, each ending by itself at ``duration`` s at the latest.

    Each runs in a session of its own, as the other programs of a shared workstation do: with the
    kernel's scheduler autogroups, load started inside this bench's session would share the CPU slice
    of this process (which hosts the workflow nodes) instead of competing with it as a neighbour."""

    def __init__(self, duration: float, work_dir: pathlib.Path):
        self.procs = []
        for _ in range(2):
            self.procs.append(subprocess.Popen([sys.executable, '-c', BUSY.format(d=duration)],
                                               start_new_session=True))
        self.procs.append(subprocess.Popen([sys.executable, '-c', WRITER.format(
            d=duration, path=str(work_dir / 'fsync_load.bin'))], start_new_session=True))

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@functools.lru_cache(maxsize=None)
def _load_module(name):
    """A sibling bench as a module, loaded once (the interlock phase and the report both use bench/interlock.py)."""
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parent / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_interlock_stressed(events: int, work_dir: pathlib.Path, pty_workers: bool = True):
    """(latencies s, scanner gaps s) with the stamping emulator and the control process under the load."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    from igt_robot import cpu_priority, testing
    from igt_robot.nodes import qos
    from igt_robot_msgs.msg import ScannerState
    bench = _load_module('interlock')
    env = testing.isolated_ros_env(work_dir / 'ros_log')
    testing.apply_env(env)
    control_path = str(work_dir / 'ctl')
    processes, graph, emulator, scanner, workers = [], None, None, None, None
    bench.scanner_stand_in_priority()        # for this phase only: the procedures' workflow nodes run at 0
    try:
        emu = testing.python_process(str(pathlib.Path(__file__).parent / 'interlock.py'),
                                     ['--emulator', '--control', control_path], env, work_dir / 'emulator.log',
                                     name='emulator')
        processes.append(emu)
        line = testing.wait_for(lambda: next((ln for ln in emu.output().splitlines() if ln.startswith('PTY ')),
                                             None) or (not emu.alive() and 'exited'), 30, 'the PTY line')
        if line == 'exited':
            raise RuntimeError(f'emulator failed: {emu.output()}')
        bench.emulator_as_controller(emu)
        workers = bench.pty_workers_as_uart(pty_workers)
        emulator = bench.EmulatorControl(control_path)
        log = bench.InhibitLog(emulator)
        processes.append(bench.control_process(line.split(' ', 1)[1].strip(), env, work_dir))
        # The scanner_trigger relay on the trigger port, as in bench/interlock.py.
        processes.append(bench.trigger_process(emulator.state()['trigger_pty'], env, work_dir))
        trigger_log = bench.InhibitLog(emulator, 'trigger_log')
        graph = testing.SpinningGraph()
        node = rclpy.create_node('interlock_bench', context=graph.context)
        gaps, last = [], [None]

        def on_state(msg):
            now = time.monotonic()
            if last[0] is not None:
                gaps.append(now - last[0])
            last[0] = now
        relay_late = []                      # the relay's worst late check so far (s), from its /diagnostics
        reply_max = {}                       # node -> its serial link's longest wait for a reply so far (s)

        def on_diagnostics(msg):
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                if status.name.startswith('scanner_trigger') and 'check_late_max_s' in values:
                    relay_late.append(float(values['check_late_max_s']))
                for who in ('scanner_trigger', 'hardware_node'):
                    if status.name.startswith(who) and 'reply_time_max_s' in values:
                        reply_max[who] = float(values['reply_time_max_s'])
        scanner = bench.ScannerSource(node)
        node.create_subscription(ScannerState, '/scanner/state', on_state, qos.SCANNER_STATE)
        node.create_subscription(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
        log.recover = bench.drive_reset(node, work_dir)
        graph.add(node)
        bench.permit_motion(node)
        scanner.start()
        log.wait_released(90)
        trigger_log.wait_released(90)
        paths = {}
        latencies, skipped = bench.measure_interlock(scanner, log, events, trigger_log=trigger_log, paths=paths)
        bench.report_paths(paths, '_stressed')
        seen = len(relay_late)
        testing.wait_for(lambda: len(relay_late) > seen, 10, "the relay's diagnostics after the measurement")
        # How late the relay's staleness check and re-send ran at worst: its margin to the trigger port's 300 ms.
        info('scanner_trigger_check_late_max_stressed', relay_late[-1] * 1e3, 'ms')
        # The longest write -> reply wait of each serial link: what the 50 ms reply timeout must cover.
        for who, worst in sorted(reply_max.items()):
            info(f'serial_reply_time_max_stressed ({who})', worst * 1e3, 'ms')
        info('interlock events skipped under load (inhibit already asserted)', skipped, 'events')
        info('drive fault resets needed under load', log.recoveries, 'resets')
        return latencies, gaps
    finally:
        bench.close_rig(scanner, graph, processes, emulator, workers)
        cpu_priority.raise_priority(0, 0)


def record_findings(record_dir: pathlib.Path):
    """(motion-during-imaging events, buffer underruns) from a procedure's MCAP log."""
    from mcap_ros2.reader import read_ros2_messages

    from igt_robot.hardware.mujoco_backend import DEFAULT_ACCEL_LIMITS
    from igt_robot.robot_model import load_robot_model
    model = load_robot_model()
    eps = np.array([MOTION_EPS['prismatic'] if p else MOTION_EPS['revolute'] for p in model.is_prismatic])
    decel = np.array([DEFAULT_ACCEL_LIMITS[name] for name in model.joint_names])
    events, underruns = 0, 0
    for path in sorted((record_dir / 'mcap').glob('*.mcap')):
        phase, edge, reference, counted, velocity, allowance = 1, None, None, False, None, 0.0
        for m in read_ros2_messages(str(path), topics=['/scanner/state', '/robot/state']):
            msg = m.ros_msg
            t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if m.channel.topic == '/scanner/state':
                imaging = msg.phase in IMAGING
                if imaging and phase not in IMAGING:
                    edge, reference, counted, allowance = t, None, False, None
                phase = msg.phase
                continue
            underruns = max(underruns, int(getattr(msg, 'buffer_underruns', 0)))
            if edge is not None and allowance is None:
                # The velocities last read before the edge set the length of the controlled stop.
                v = np.abs(np.asarray(velocity if velocity is not None else msg.velocity, dtype=float))
                allowance = STOP_LATENCY_ALLOWANCE_S + float(np.max(v / decel)) if v.size else STOP_LATENCY_ALLOWANCE_S
            velocity = msg.velocity
            if phase not in IMAGING or edge is None or t - edge < allowance:
                continue
            q = np.asarray(msg.position, dtype=float)
            if reference is None:
                reference = q
            elif not counted and np.any(np.abs(q - reference) > eps):
                events, counted = events + 1, True
    return events, underruns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--procedures', type=int, default=20, help='randomised procedures under load')
    parser.add_argument('--interlock-events', type=int, default=300, help='interlock events timed under load')
    parser.add_argument('--seed', type=int, default=2000)
    parser.add_argument('--max-duration', type=float, default=7200.0,
                        help='the load processes end by themselves after this many seconds at the latest')
    parser.add_argument('--pty-workers-normal', action='store_true',
                        help="leave the kernel workers that carry the ptys' bytes at normal priority")
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    from igt_robot import testing
    from igt_robot.demo import ProcedureFailed, run_simulated_procedure
    shm_before = testing.fastdds_shm_entries()
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix='bench_stress_'))
    load = Load(args.max_duration, work_dir)
    rng = np.random.default_rng(args.seed)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    completed, failures, motion_events, underruns = 0, [], 0, 0
    try:
        time.sleep(1.0)
        info('load processes running', load.alive(), 'processes')
        latencies, gaps = measure_interlock_stressed(args.interlock_events, work_dir,
                                                     pty_workers=not args.pty_workers_normal)
        p50, p99, worst = percentiles(latencies)
        info(f'interlock_latency_p50_stressed (n={len(latencies)})', p50 * 1e3, 'ms')
        report('interlock_latency_p99_stressed', p99 * 1e3, 'ms', '<=', 10.0)
        info('interlock_latency_max_stressed', worst * 1e3, 'ms')
        if gaps:
            g50, g99, gmax = percentiles(gaps)
            period_ms = 1e3 / _load_module('interlock').SCANNER_RATE_HZ
            info(f'scanner_heartbeat_gap_p99_stressed (period {period_ms:.0f} ms)', g99 * 1e3, 'ms')
            info('scanner_heartbeat_gap_max_stressed', gmax * 1e3, 'ms')
        for run in range(args.procedures):
            depth = float(rng.uniform(0.04, 0.12))
            seed = int(rng.integers(0, 1_000_000))
            procedure_id = f'stress-{stamp}-{run:02d}'
            testing.apply_env(testing.isolated_ros_env(work_dir / f'ros_log_{run}'))
            started = time.monotonic()
            try:
                run_simulated_procedure(seed=seed, depth=depth, steps=3, quiet_nodes=True, procedure_id=procedure_id,
                                        extra_overrides={'procedure_node': {'scan_duration': 0.3}})
                completed += 1
                outcome = 'completed'
            except ProcedureFailed as failure:
                failures.append(f'run {run} (seed {seed}, depth {depth * 1e3:.0f} mm): {failure}')
                outcome = f'FAILED {failure}'
            events, under = record_findings(REPO / 'build' / 'records' / procedure_id)
            motion_events += events
            underruns += under
            print(f'# run {run}: {outcome}; {time.monotonic() - started:.0f} s; motion during imaging {events}; '
                  f'buffer underruns {under}; load processes alive {load.alive()}', flush=True)
        report('procedure_completed_fraction_stressed', completed / max(args.procedures, 1), 'ratio', '>=', 1.0)
        report('motion_during_imaging_events', motion_events, 'events', '<=', 0)
        report('buffer_underruns_stressed', underruns, 'underruns', '<=', 0)
        for failure in failures:
            print(f'# failed: {failure}', flush=True)
        return 0
    finally:
        load.stop()
        testing.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])


if __name__ == '__main__':
    sys.exit(main())
