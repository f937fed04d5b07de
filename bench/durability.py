"""Durability of the record and of the stop when processes die or the disk fills (issue 12).

Runs the real `make demo` stack (``python -m igt_robot.demo``: workflow process + control process) on an
isolated ROS domain, with an observer node in this process, and measures:

* ``records_lost_after_sigkill``: over ``--kills`` random SIGKILLs (alternately the whole demo -- the
  workflow process; its control process must follow by itself -- and the control process only), the
  record entries lost: entries committed before the kill and missing afterwards, events of this
  procedure the observer saw published at least ``--margin`` s before the kill and absent from the
  record, plus one per record that the next start does not close as ended abnormally (or, when only
  the control process died, that the surviving recorder does not close normally) with a report.
* ``motion_after_workflow_kill_s``: the workflow process is SIGKILLed while the robot moves; how long
  any joint keeps moving afterwards (last change > 2 um of the observed /joint_states).
* ``motion_with_record_failure_s``: the record folder is on a small tmpfs that is filled while the robot
  moves; how long any joint keeps moving after the disk is full (RECORD_FAILED stops it).

The two motion figures use a lean workflow process (``--role workflow``: the demo's control process as
its child, the recorder, and a driver that resumes and sends one slow InsertNeedle goal) rather than the
whole demo, whose imaging steps do not reliably reach motion on a heavily loaded 2-core machine; the stop
paths measured (parent death -> control process; record failure -> supervisor) are the same.
* ``orphans_left``: control processes still alive 10 s after their demo ended.
* ``ctrl_c_exit_s``: SIGINT to a running demo until it and its control process have exited (exit code 130,
  no traceback, or the figure is NaN).

    python bench/durability.py [--kills 10] [--seed 1]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_report import info, report  # noqa: E402

from igt_robot import fastdds_shm, testing  # noqa: E402
from igt_robot.record import read_entries  # noqa: E402
from igt_robot.record.recovery import close_all_unfinished  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MOVE_EPS_M = 2e-6          # a joint change larger than this between two samples is motion


class Observer:
    """/joint_states and /procedure/events as the rest of the ROS graph sees them."""

    def __init__(self, graph):
        from sensor_msgs.msg import JointState

        from igt_robot.nodes import qos
        from igt_robot_msgs.msg import ProcedureEvent, SafetyStatus
        self.lock = threading.Lock()
        self.joints = []          # (t_monotonic, positions)
        self.events = []          # (t_monotonic, procedure_id, source, kind, stamp_ns)
        self.faults = set()
        node = graph.create_node('durability_observer')
        node.create_subscription(JointState, '/joint_states', self._on_joints, qos.STATE_STREAM)
        node.create_subscription(ProcedureEvent, '/procedure/events', self._on_event, qos.EVENTS)
        node.create_subscription(SafetyStatus, '/safety/status', self._on_status, qos.SAFETY_LATCHED)

    def _on_joints(self, msg):
        with self.lock:
            self.joints.append((time.monotonic(), tuple(msg.position)))

    def _on_event(self, msg):
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        with self.lock:
            self.events.append((time.monotonic(), msg.procedure_id, msg.source, msg.kind, stamp))

    def _on_status(self, msg):
        with self.lock:
            self.faults.update(f.code for f in msg.faults)

    def reset(self):
        with self.lock:
            self.joints.clear()
            self.events.clear()
            self.faults.clear()

    def moving_since(self, window_s=0.3) -> bool:
        """The robot has been moving over the last ``window_s``."""
        now = time.monotonic()
        with self.lock:
            recent = [p for t, p in self.joints if now - t <= window_s]
        return len(recent) >= 3 and _changed(recent[0], recent[-1])

    def last_motion_after(self, t0: float) -> float:
        """Seconds after ``t0`` of the last sample that differs from the one before it (0: none)."""
        with self.lock:
            samples = list(self.joints)
        last = t0
        for (_, a), (t, b) in zip(samples, samples[1:]):
            if t > t0 and _changed(a, b):
                last = t
        return last - t0


def _changed(a, b) -> bool:
    return len(a) == len(b) and any(abs(x - y) > MOVE_EPS_M for x, y in zip(a, b))


class Demo:
    """One `python -m igt_robot.demo` run in its own session, output to a log file."""

    def __init__(self, env, procedure_id, record_dir, log_path, steps=2, lean=False):
        self.record_dir = pathlib.Path(record_dir)
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, 'wb')
        argv = ([sys.executable, __file__, '--role', 'workflow'] if lean else
                [sys.executable, '-m', 'igt_robot.demo', '--steps', str(steps), '--timeout', '300'])
        self.proc = subprocess.Popen(
            argv + ['--procedure-id', procedure_id, '--record-dir', str(record_dir)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.control_pid = None

    def output(self) -> str:
        return self.log_path.read_text(errors='replace')

    def wait_control_pid(self, timeout=120.0) -> int:
        def found():
            m = re.search(r'control process pid (\d+)', self.output())
            return int(m.group(1)) if m else (self.proc.poll() is not None and -1)
        pid = testing.wait_for(found, timeout, 'the demo to start its control process')
        if pid < 0:
            raise RuntimeError(f'the demo exited early:\n{self.output()[-2000:]}')
        self.control_pid = pid
        return pid

    def entries(self):
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            return read_entries(str(self.record_dir))
        return []

    def stop(self, timeout=20.0):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._log.close()


def pid_alive(pid) -> bool:
    if not pid or pid < 0:
        return False
    try:
        state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != 'Z'


def reap_orphan(pid, grace=10.0) -> int:
    """1 if the control process is still alive ``grace`` s later (then it is killed), else 0."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return 1
    return 0


def kill_trial(env, run_dir, index, mode, rng, observer, margin):
    """One random SIGKILL; returns (records lost, orphans)."""
    pid_text = f'dur-{os.getpid()}-{index:02d}'
    record_dir = run_dir / 'records' / pid_text
    observer.reset()
    demo = Demo(env, pid_text, record_dir, run_dir / f'{pid_text}.log')
    control = demo.wait_control_pid()
    testing.wait_for(lambda: len(demo.entries()) >= 3 or demo.proc.poll() is not None, 120,
                     'the record to start')
    time.sleep(rng.uniform(0.0, 8.0))
    before = {e.seq: e for e in demo.entries()}
    kill_t = time.monotonic()
    victim = demo.proc.pid if mode == 'demo' else control
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)
    if mode == 'demo':
        demo.proc.wait(10)
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.proc.wait(30)     # the workflow side sees the loss and ends by itself
    orphans = reap_orphan(control)
    demo.stop()
    lost = 0
    problems = []
    if mode == 'demo':
        # What the next recorder start does (igt_robot.record.recovery, run by RecorderNode at start).
        closed = close_all_unfinished(str(record_dir.parent), detected_by='bench next start')
        ok = any(c.get('folder') == str(record_dir) and 'error' not in c for c in closed)
        if not ok:
            lost += 1
            problems.append(f'not closed as ended abnormally: {closed}')
    after = demo.entries()
    by_seq = {e.seq: e for e in after}
    missing = [s for s, e in before.items() if by_seq.get(s) is None or by_seq[s].payload != e.payload]
    lost += len(missing)
    if missing:
        problems.append(f'{len(missing)} committed entries missing')
    end_kinds = {e.kind for e in after[-3:]}
    if mode == 'control' and 'record_closed' not in end_kinds:
        lost += 1
        problems.append(f'surviving recorder did not close the record (last kinds {end_kinds})')
    if not (record_dir / 'report.html').is_file():
        lost += 1
        problems.append('no report')
    recorded = {(e.payload.get('source'), e.payload.get('kind'), e.payload.get('stamp_ns'))
                for e in after if e.kind == 'event'}
    with observer.lock:
        seen = [(src, kind, stamp) for t, pid, src, kind, stamp in observer.events
                if pid == pid_text and t <= kill_t - margin]
    unrecorded = [s for s in seen if s not in recorded]
    lost += len(unrecorded)
    if unrecorded:
        problems.append(f'{len(unrecorded)} observed events not recorded: {unrecorded[:3]}')
    print(f'# kill {index + 1} ({mode}) at {len(before)} entries: {len(seen)} observed events checked, '
          f'lost {lost}, orphan {orphans}' + (f'; {"; ".join(problems)}' if problems else ''), flush=True)
    return lost, orphans


def motion_trial(env, run_dir, name, observer, action, timeout=240.0):
    """Start a demo, wait for motion, run ``action(demo)`` -> t0; returns (seconds of motion after t0, orphans)."""
    procedure = f'dur-{os.getpid()}-{name}'
    record_dir = run_dir / ('fullfs' if name == 'disk' else 'records') / procedure
    observer.reset()
    demo = Demo(env, procedure, record_dir, run_dir / f'{procedure}.log', lean=True)
    control = demo.wait_control_pid()
    try:
        testing.wait_for(lambda: observer.moving_since() or demo.proc.poll() is not None, timeout,
                         'the robot to move')
    except testing.ConditionTimeout:
        demo.stop()
        return float('nan'), reap_orphan(control)
    if demo.proc.poll() is not None:
        print(f'# {name}: the demo ended before any motion:\n{demo.output()[-1500:]}', flush=True)
        return float('nan'), reap_orphan(control)
    t0 = action(demo)
    time.sleep(3.0)
    moved = observer.last_motion_after(t0)
    with observer.lock:
        faults = sorted(observer.faults)
    demo.stop()
    orphans = reap_orphan(control)
    print(f'# {name}: motion {moved:.3f} s after the trigger; faults seen {faults}', flush=True)
    return moved, orphans


def workflow_role(procedure_id: str, record_dir: str) -> int:
    """A lean workflow process: the demo's control process (child), the recorder and a motion driver."""
    import rclpy
    from rclpy.action import ActionClient

    from igt_robot.bringup import Bringup
    from igt_robot.demo import ControlProcess
    from igt_robot.nodes import common, qos
    from igt_robot.record import procedure_id as identity
    from igt_robot_msgs.action import InsertNeedle
    from igt_robot_msgs.msg import SafetyStatus
    from igt_robot_msgs.srv import AcknowledgeFaults, ResumeMotion
    identity.set_current(procedure_id)
    pathlib.Path(record_dir).mkdir(parents=True, exist_ok=True)
    overrides = {'safety_supervisor': {'motion_heartbeats': ['recorder_node', 'durability_driver']},
                 'hardware_node': {'backend': 'mujoco'}, 'scanner_interface': {'igtl_port': 0},
                 'recorder_node': {'procedure_id': procedure_id, 'record_dir': record_dir,
                                   'close_unfinished_records': False}}
    try:
        from igt_robot.safety.operator_session import read_session
        token = read_session()
    except Exception:  # noqa: BLE001 -- no operator session configured: resume without one
        token = ''
    with ControlProcess(overrides, pathlib.Path(record_dir) / 'control_process.log') as control, \
            Bringup(['recorder_node'], overrides=overrides) as bringup:
        print(f'[demo] control process pid {control.pid}', flush=True)
        driver = rclpy.create_node('durability_driver', context=bringup.context)
        bringup.executor.add_node(driver)
        common.HeartbeatPublisher(driver, 0.1)
        status = {}
        driver.create_subscription(SafetyStatus, '/safety/status', lambda m: status.update(msg=m), qos.SAFETY_LATCHED)
        resume = driver.create_client(ResumeMotion, '/safety/resume')
        ack = driver.create_client(AcknowledgeFaults, '/safety/acknowledge')
        insert = ActionClient(driver, InsertNeedle, '/motion/insert_needle')
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            msg = status.get('msg')
            if msg is not None and msg.motion_permitted:
                break
            if msg is not None and msg.state == 'FAULT':      # start-up faults under load: the operator acks
                ack.call_async(AcknowledgeFaults.Request(operator_id='bench', operator_token=token))
            elif msg is not None and msg.state == 'HOLD':
                resume.call_async(ResumeMotion.Request(operator_id='bench', operator_token=token))
            time.sleep(0.5)
        insert.wait_for_server(timeout_sec=30)
        depths = [0.12, 0.01]
        result = None
        try:
            while control.poll() is None:
                # Keep the needle moving: a goal ended by an interlock (stale scanner state under load) is sent
                # again after the operator's resume.
                msg = status.get('msg')
                if result is None or result.done():
                    if msg is not None and msg.state == 'HOLD':
                        resume.call_async(ResumeMotion.Request(operator_id='bench', operator_token=token))
                    if msg is not None and msg.motion_permitted:
                        handle = insert.send_goal_async(InsertNeedle.Goal(target_depth=depths[0], max_velocity=0.005))
                        while not handle.done():
                            time.sleep(0.05)
                        result = handle.result().get_result_async() if handle.result().accepted else None
                        depths.reverse()
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


def ctrl_c_trial(env, run_dir, observer):
    """SIGINT a running demo; seconds until the demo and its control process have both exited."""
    procedure = f'dur-{os.getpid()}-ctrl-c'
    demo = Demo(env, procedure, run_dir / 'records' / procedure, run_dir / f'{procedure}.log')
    control = demo.wait_control_pid()
    testing.wait_for(lambda: len(demo.entries()) >= 3 or demo.proc.poll() is not None, 120, 'the record to start')
    time.sleep(2.0)
    sent = time.monotonic()
    os.kill(demo.proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        demo.proc.wait(30)
    testing.wait_for(lambda: not pid_alive(control), 30, 'the control process to end')
    took = time.monotonic() - sent
    code = demo.proc.returncode
    demo.stop()
    output = demo.output()
    clean = code == 130 and 'Traceback' not in output
    print(f'# ctrl-c: exit code {code}, {took:.2f} s, traceback {"Traceback" in output}', flush=True)
    return took if clean else float('nan'), reap_orphan(control, 0.0)


def fill_disk(folder: pathlib.Path) -> float:
    fd = os.open(folder / 'filler', os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b'\0' * (1 << 20))
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b'\0' * 512)
    finally:
        os.close(fd)
    return time.monotonic()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--kills', type=int, default=10, help='random SIGKILLs (>= 10 for the figure)')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--margin', type=float, default=2.0,
                        help='events published at least this long before a kill must be in the record (s)')
    parser.add_argument('--role', choices=('bench', 'workflow'), default='bench', help=argparse.SUPPRESS)
    parser.add_argument('--procedure-id', default='', help=argparse.SUPPRESS)
    parser.add_argument('--record-dir', default='', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == 'workflow':
        from igt_robot.demo import _interrupt_once
        signal.signal(signal.SIGINT, _interrupt_once)
        signal.signal(signal.SIGTERM, _interrupt_once)
        try:
            return workflow_role(args.procedure_id, args.record_dir)
        except KeyboardInterrupt:
            return 130
    rng = random.Random(args.seed)
    run_dir = REPO / 'build' / 'bench_durability' / time.strftime('%Y%m%d-%H%M%S')
    run_dir.mkdir(parents=True)
    env = testing.isolated_ros_env(run_dir / 'ros_log', domain_id=testing.pick_domain_id(
        int(os.environ.get('ROS_DOMAIN_ID') or 0) or None))
    testing.apply_env(env)
    shm_before = fastdds_shm.fastdds_shm_entries()
    lost_total, orphans = 0, 0
    fullfs = run_dir / 'fullfs'
    fullfs.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=150m', 'tmpfs', str(fullfs)],
                             capture_output=True).returncode == 0
    started = time.monotonic()
    try:
        with testing.SpinningGraph() as graph:
            observer = Observer(graph)
            for i in range(args.kills):
                lost, orphan = kill_trial(env, run_dir, i, 'demo' if i % 2 == 0 else 'control', rng, observer,
                                          args.margin)
                lost_total += lost
                orphans += orphan

            def kill_workflow(demo):
                os.kill(demo.proc.pid, signal.SIGKILL)
                return time.monotonic()
            ctrl_c_s, orphan = ctrl_c_trial(env, run_dir, observer)
            orphans += orphan
            moved_kill, orphan = motion_trial(env, run_dir, 'workflow-kill', observer, kill_workflow)
            orphans += orphan
            moved_disk = float('nan')
            if mounted:
                moved_disk, orphan = motion_trial(env, run_dir, 'disk', observer, lambda demo: fill_disk(fullfs))
                orphans += orphan
            else:
                print('# no tmpfs (needs root): motion_with_record_failure_s not measured', flush=True)
    finally:
        if mounted:
            subprocess.run(['umount', '-l', str(fullfs)], check=False)
        fastdds_shm.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])
    info('bench_wall_time', time.monotonic() - started, 's')
    info('kills', args.kills, 'count')
    ok = report('records_lost_after_sigkill', lost_total if args.kills >= 10 else float('nan'), 'entries', '<=', 0)
    ok &= report('motion_after_workflow_kill_s', moved_kill, 's', '<=', 0.5)
    ok &= report('motion_with_record_failure_s', moved_disk, 's', '<=', 0.5)
    ok &= report('orphans_left', orphans, 'processes', '<=', 0)
    ok &= report('ctrl_c_exit_s', ctrl_c_s, 's', '<=', 5.0)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
