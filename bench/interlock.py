#!/usr/bin/env python3
"""Interlock benchmark: how fast a scan start reaches the drive as a motion inhibit.

Setup (each an OS process, real DDS, loopback, an isolated ROS domain):

* the firmware emulator on a pty -- the stock ``Firmware`` and ``EmulatorServer`` with one
  addition made here (the stock emulator has no receive timestamps): it records
  CLOCK_MONOTONIC when each MOTION_INHIBIT frame is read off the pty, and each TRIGGER_LEVEL frame off
  the trigger port's pty, read back through the control-socket commands ``inhibit_log`` / ``trigger_log``.
  It stands in for the controller's microcontroller: SCHED_FIFO where permitted (else nice -15). The kernel
  workers that carry bytes across a pty (the tty layer's flip-buffer work, normal priority) stand in for its
  UART and run at SCHED_FIFO 1 while the bench runs, where permitted (``--pty-workers-normal``: left alone).
  Measured under bench/stress.py load, the relay's frame waited up to 10 ms for such a worker after its write
  (cpu_priority.UnboundKernelWorkers); a real UART write has no such stage;
* the scanner_trigger relay in a process of its own (``igt-bringup --profile trigger``, SCHED_FIFO where
  permitted) on the emulator's trigger port (docs/serial_protocol.md §9); ``--no-trigger-port`` leaves it out;
* the control process (``igt-bringup --profile control``: hardware_node + motion_controller,
  serial backend) with the shipped config/*.yaml; ``--executor events`` runs it on rclpy's
  EventsExecutor instead of the MultiThreadedExecutor (the loop-jitter phase is then skipped: the
  motion controller's blocking goal callbacks need a multi-threaded executor). The hardware node is told
  that this process is the scanner source and the supervisor (its authority check names publishers);
* this process (nice -10 where permitted, as scanner_interface's supervision process in ``make demo``): the
  scanner (``/scanner/state`` at 10 Hz and at once on change, as scanner_interface publishes it) and the
  supervisor's permission (``/safety/motion_permitted`` true, latched). Neither the scanner_interface nor the
  safety_supervisor is on the measured paths (scanner state -> hardware_node or scanner_trigger -> serial ->
  drive), so they are not started.

CLOCK_MONOTONIC is system-wide, so the publication stamp (this process, just before
``publish()``) and the receive stamp (emulator) are on the same clock.

Figures:

1. interlock latency, ACQUIRING published -> the first frame that stops the drive received by it
   (TRIGGER_LEVEL(1) on the trigger port or MOTION_INHIBIT(1) on the main port; each path's own figures
   are printed beside it),
   p50/p99/max over >= 1000 events; beside it the plain DDS one-way p99 of the same run
   (``measure_dds_floor`` from bench/ros_floor.py, measured while the stack runs; reported beside it, the
   same with the scans' 20-100 ms spacing, which adds the receiver's wake-up). Targets:
   p99 <= 2 x DDS one-way p99, max <= 5 ms.
2. scanner-silence detection: the scanner source stops (at a random point of its heartbeat
   period, as a crash would) -> MOTION_INHIBIT(1) received, over >= 20 trials. Target: max <=
   3 heartbeat periods (300 ms at 10 Hz).
3. the host stream loop's period error p99 (50 Hz; the servo loop runs in the controller) from
   the motion controller's /diagnostics (``period_error_p99_s``), once holding still and once
   while moving; reported only: bench/streaming.py judges the stream loop against its period.

Usage: python bench/interlock.py [--events 1000] [--silence-trials 20] [--floor-count 1000] [--executor events]

``start_stack`` and the measurement functions are reused by bench/stress.py (the same figures under load).
"""
import argparse
import importlib.util
import json
import os
import pathlib
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / 'config'
SCANNER_RATE_HZ = 10.0               # scanner_interface's publish_rate_hz (config/safety.yaml)
STATS_WINDOW = 10000                 # FixedRateLoop's default stats window (cycles)
PHASE_CAP_S = 35.0                   # longest a jitter phase may run (s)
WAIT = 10.0                          # condition timeout for one event (s)


# ============================================================ the emulator with receive stamps

def run_stamping_emulator(control_path: str, watchdog_ms: int) -> int:
    """The stock emulator plus CLOCK_MONOTONIC receive stamps of MOTION_INHIBIT frames."""
    from igt_robot.hardware import protocol
    from igt_robot.hardware.axis_model import default_axis_configs
    from igt_robot.hardware.emulator import EmulatorServer, Firmware

    def stamp(frames, msg_type, decode, log) -> None:
        """Append (monotonic ns right after os.read() + decode, value) for each ``msg_type`` frame; a frame whose
        value does not decode is left out (the firmware NAKs it: it changes nothing)."""
        now = time.monotonic_ns()
        for frame in frames:
            if frame.type == msg_type:
                try:
                    log.append((now, bool(decode(frame.payload))))
                except protocol.ProtocolError:
                    continue

    class StampingEmulatorServer(EmulatorServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.inhibit_log = []            # (monotonic ns when read off the pty, inhibit)
            self.trigger_log = []            # (monotonic ns when read off the trigger port's pty, level)

        def _read_trigger_frames(self):
            frames = super()._read_trigger_frames()
            stamp(frames, protocol.MsgType.TRIGGER_LEVEL, protocol.decode_trigger_level, self.trigger_log)
            return frames

        def _read_frames(self):
            frames = super()._read_frames()
            stamp(frames, protocol.MsgType.MOTION_INHIBIT, protocol.decode_motion_inhibit, self.inhibit_log)
            return frames

        def control(self, line: str) -> str:
            if line.strip() == 'inhibit_log':
                log, self.inhibit_log = self.inhibit_log, []
                return json.dumps(log)
            if line.strip() == 'trigger_log':
                log, self.trigger_log = self.trigger_log, []
                return json.dumps(log)
            return super().control(line)

    axes, _ = default_axis_configs(None)
    server = StampingEmulatorServer(lambda: Firmware(axes, watchdog_ms=watchdog_ms), control_path)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        print(f'PTY {server.open()}', flush=True)
        return server.run()
    finally:
        server.close()


class EmulatorControl:
    """Line client of the emulator's control socket."""

    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10.0)
        self._sock.connect(path)
        self._buf = b''

    def command(self, line: str) -> str:
        self._sock.sendall(line.encode() + b'\n')
        while b'\n' not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError(f'emulator closed its control socket (command {line!r})')
            self._buf += chunk
        reply, self._buf = self._buf.split(b'\n', 1)
        reply = reply.decode()
        if not (reply == 'ok' or reply.startswith('ok ')):
            raise RuntimeError(f'emulator refused {line!r}: {reply}')
        return reply[3:]

    def state(self) -> dict:
        return json.loads(self.command('state'))

    def close(self):
        self._sock.close()


class InhibitLog:
    """The drive's MOTION_INHIBIT receive stamps (``command`` 'inhibit_log'), or its trigger port's TRIGGER_LEVEL
    ones ('trigger_log'), collected from the emulator as they come."""

    def __init__(self, emulator: EmulatorControl, command: str = 'inhibit_log'):
        self.emulator = emulator
        self.command = command
        self.entries = []
        self.last = None                     # the last inhibit level commanded to the drive
        self.recover = None                  # called once when the inhibit stays asserted (e.g. a drive fault)
        self.recoveries = 0

    def poll(self):
        new = [tuple(e) for e in json.loads(self.emulator.command(self.command))]
        self.entries.extend(new)
        if new:
            self.last = new[-1][1]

    def wait_released(self, timeout: float = WAIT):
        from igt_robot import testing
        try:
            testing.wait_for(lambda: self.poll() or self.last is False, timeout, 'the inhibit released', poll=0.002)
        except testing.ConditionTimeout:
            if self.recover is None:
                raise
            # A drive fault latched meanwhile (a watchdog trip of a starved host): the operator's acknowledge
            # resets it (the hardware node's reset service); counted and printed, never hidden.
            self.recoveries += 1
            print(f'# inhibit stuck ({self.emulator.state()["faults"]}); drive fault reset', flush=True)
            self.recover()
            testing.wait_for(lambda: self.poll() or self.last is False, timeout, 'the inhibit released', poll=0.002)

    def wait(self, inhibit: bool, after_ns: int, timeout: float = WAIT) -> int:
        """Receive stamp (ns) of the first MOTION_INHIBIT(``inhibit``) read at or after ``after_ns``."""
        from igt_robot import testing

        def found():
            self.poll()
            return next((t for t, v in self.entries if v is inhibit and t >= after_ns), None)
        return testing.wait_for(found, timeout, f"MOTION_INHIBIT({int(inhibit)}) at the drive", poll=0.002)

    def clear(self):
        self.poll()
        self.entries.clear()


# ============================================================ the scanner and permission source

class ScannerSource:
    """/scanner/state as scanner_interface publishes it: heartbeat at ``rate`` Hz (counter
    advancing) and at once on a change of phase. Can fall silent like a killed process."""

    def __init__(self, node, rate: float = SCANNER_RATE_HZ):
        from igt_robot.nodes import qos
        from igt_robot_msgs.msg import ScannerState
        self._msg_type = ScannerState
        self.node = node
        self.period = 1.0 / rate
        self.pub = node.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)
        self.lock = threading.Lock()
        self.phase = ScannerState.PHASE_IDLE
        self.counter = 0
        self.silent = False
        self.last_publish_ns = 0
        self.beat = threading.Event()        # set at every heartbeat publication
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='bench-scanner', daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(2.0)

    def _publish_locked(self) -> int:
        self.counter += 1
        msg = self._msg_type(phase=self.phase, source='bench', heartbeat=self.counter,
                             protocol_name='control scan' if self.phase == self._msg_type.PHASE_ACQUIRING else '')
        msg.header.stamp = self.node.get_clock().now().to_msg()
        stamp = time.monotonic_ns()          # the publication instant on CLOCK_MONOTONIC
        self.pub.publish(msg)
        self.last_publish_ns = stamp
        return stamp

    def set_phase(self, phase: int) -> int:
        """Change the phase and publish at once; returns the publication stamp (ns)."""
        with self.lock:
            self.phase = phase
            return self._publish_locked()

    def silence(self) -> int:
        """Stop publishing (as a crashed source); returns the instant (ns)."""
        with self.lock:
            self.silent = True
            return time.monotonic_ns()

    def speak(self) -> int:
        with self.lock:
            self.silent = False
            return self._publish_locked()

    def _run(self):
        deadline = time.monotonic()
        while not self._stop.is_set():
            deadline += self.period
            self._stop.wait(max(0.0, deadline - time.monotonic()))
            with self.lock:
                if not self.silent:
                    self._publish_locked()
                    self.beat.set()


# ============================================================ measurements

SCAN_GAP_S = (0.02, 0.1)             # a scan starts this long (uniform) after the previous release at the drive


def measure_interlock(scanner: ScannerSource, log: InhibitLog, events: int, warmup: int = 20, seed: int = 2,
                      trigger_log: Optional[InhibitLog] = None, paths: Optional[dict] = None):
    """Seconds from ACQUIRING published to MOTION_INHIBIT(1) at the drive, ``events`` times. With
    ``trigger_log`` (the scanner_trigger relay runs): to the first of MOTION_INHIBIT(1) and TRIGGER_LEVEL(1),
    whichever stops the drive first; ``paths`` then gets each path's own latencies ('host', 'trigger').
    Returns (latencies, skipped): an event is skipped when the inhibit was asserted for another
    reason (e.g. a late heartbeat made the state stale) just before the scan started -- an
    inhibit already asserted is not sent again, so there is nothing to time.

    Each scan starts a random ``SCAN_GAP_S`` after the previous release reached the drive, as real
    scans are apart: started at once, it landed while the control process was still handling that
    release (log line, event), and at a fixed phase of the process's periodic work."""
    from igt_robot import testing
    from igt_robot_msgs.msg import ScannerState
    rng = random.Random(seed)
    latencies, skipped = [], 0
    logs = [log] + ([trigger_log] if trigger_log is not None else [])
    while len(latencies) < events:
        for each in logs:
            each.wait_released()
        time.sleep(rng.uniform(*SCAN_GAP_S))
        for each in logs:
            each.clear()
        start = scanner.set_phase(ScannerState.PHASE_ACQUIRING)
        arrivals = []
        for each in logs:
            try:
                arrivals.append(each.wait(True, start))
            except testing.ConditionTimeout:
                arrivals.append(None)
        early = [any(v for t, v in each.entries if t < start) for each in logs]
        for each in logs:
            each.entries.clear()
        scanner.set_phase(ScannerState.PHASE_IDLE)
        if None in arrivals or any(early):
            skipped += 1
        elif warmup > 0:
            warmup -= 1
        else:
            latencies.append((min(arrivals) - start) / 1e9)
            if paths is not None:
                for name, arrived in zip(('host', 'trigger'), arrivals):
                    paths.setdefault(name, []).append((arrived - start) / 1e9)
    return latencies, skipped


def report_paths(paths: dict, suffix: str = '') -> None:
    """Each path's own figures (``measure_interlock``'s ``paths``) beside the first-stop-frame figure."""
    for name, what in (('trigger', 'scanner_trigger -> trigger port'), ('host', 'hardware_node -> main port')):
        if paths.get(name):
            q50, q99, qmax = percentiles(paths[name])
            info(f'interlock_latency_{name}_path{suffix}_p50 ({what})', q50 * 1e3, 'ms')
            info(f'interlock_latency_{name}_path{suffix}_p99', q99 * 1e3, 'ms')
            info(f'interlock_latency_{name}_path{suffix}_max', qmax * 1e3, 'ms')


def measure_silence(scanner: ScannerSource, log: InhibitLog, trials: int, seed: int = 1,
                    trigger_log: Optional[InhibitLog] = None):
    """(from the source's stop, from its last message) to MOTION_INHIBIT(1), or to the first of it and
    TRIGGER_LEVEL(1) with ``trigger_log``, in seconds."""
    rng = random.Random(seed)
    from_stop, from_last = [], []
    logs = [log] + ([trigger_log] if trigger_log is not None else [])
    for _ in range(trials):
        for each in logs:
            each.wait_released()
            each.clear()
        scanner.beat.clear()
        scanner.beat.wait(5.0)               # just after a heartbeat ...
        time.sleep(rng.uniform(0.0, scanner.period))   # ... the source dies at a random point of its period
        stopped = scanner.silence()
        last = scanner.last_publish_ns
        arrived = min(each.wait(True, stopped) for each in logs)
        from_stop.append((arrived - stopped) / 1e9)
        from_last.append((arrived - last) / 1e9)
        scanner.speak()
    return from_stop, from_last


class LoopDiagnostics:
    """The motion controller's 'control loop' diagnostics, newest first."""

    def __init__(self, node):
        from diagnostic_msgs.msg import DiagnosticArray
        self.latest = None
        self.count = 0
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on, 10)

    def _on(self, msg):
        for status in msg.status:
            if status.name.endswith('control loop') and status.values:
                self.latest = {kv.key: kv.value for kv in status.values}
                self.count += 1

    def fresh(self, timeout: float = 10.0) -> dict:
        from igt_robot import testing
        seen = self.count
        testing.wait_for(lambda: self.count > seen, timeout, 'a fresh control-loop diagnostics message')
        return dict(self.latest)


def measure_jitter(diagnostics: LoopDiagnostics, work=None):
    """Run until the loop's stats window holds only this phase's cycles (or PHASE_CAP_S);
    ``work()`` is called repeatedly meanwhile. Returns (p99 s, coverage 0..1, cycles/s, overruns)."""
    first = diagnostics.fresh()
    c0, o0, t0 = int(first['cycles']), int(first['overruns']), time.monotonic()
    while True:
        if work is not None:
            work()
        last = diagnostics.fresh()
        done = int(last['cycles']) - c0
        if done >= STATS_WINDOW or time.monotonic() - t0 > PHASE_CAP_S:
            break
    elapsed = time.monotonic() - t0
    return (float(last['period_error_p99_s']), min(1.0, done / STATS_WINDOW), done / elapsed,
            int(last['overruns']) - o0)


# ============================================================ main

def raise_priority(proc, nice: int = -10) -> None:
    """Run ``proc`` (a testing.ManagedProcess) at a higher CPU priority where allowed, as `make demo` runs its
    control process: the emulator stands in for the controller's real-time firmware, the control process for
    the lean control process; on a loaded machine a starved stand-in would measure itself, not the stack."""
    from igt_robot import cpu_priority
    why = cpu_priority.raise_priority(proc.proc.pid, nice)
    if why:
        print(f'# note: priority of {proc.name} not raised ({why})', flush=True)


EMULATOR_RT_PRIORITY = 30           # above the relay's 20: the controller answers before the host goes on


def emulator_as_controller(proc) -> None:
    """The emulator stands in for the controller's microcontroller, whose servo timer and UART interrupt no load
    on the host can delay: SCHED_FIFO for its threads where permitted (``--rt-priority`` of the stock emulator),
    else nice -15. Called once its line thread exists (after the PTY line)."""
    from igt_robot import cpu_priority, testing
    testing.wait_for(lambda: len(os.listdir(f'/proc/{proc.proc.pid}/task')) >= 2, 10, "the emulator's line thread")
    why = cpu_priority.set_realtime(proc.proc.pid, EMULATOR_RT_PRIORITY)
    if why:
        print(f'# note: emulator not real-time ({why}); nice -15 instead', flush=True)
        raise_priority(proc, -15)


def pty_workers_as_uart(enabled: bool = True):
    """The kernel workers that carry bytes across the emulator's ptys, at SCHED_FIFO 1 while the bench runs
    (cpu_priority.UnboundKernelWorkers has the measurement): with the emulator they stand in for the
    controller's UART, which no load on the host delays. Returns the object to ``stop()``, or None (not
    ``enabled``, or not permitted: a note says the figures then include the pty's normal-priority worker)."""
    from igt_robot import cpu_priority
    if not enabled:
        print('# pty kernel workers left at normal priority (--pty-workers-normal)', flush=True)
        return None
    workers = cpu_priority.UnboundKernelWorkers()
    why = workers.start()
    if why:
        print(f"# note: the pty's kernel workers keep normal priority ({why}); the figures include them",
              flush=True)
        return None
    return workers


def scanner_stand_in_priority() -> None:
    """This process publishes the scanner state in scanner_interface's place, which runs at nice -10 in the
    supervision process (igt_robot/demo.py): the same here, where permitted. Threads started later inherit it."""
    from igt_robot import cpu_priority
    why = cpu_priority.raise_priority(0, -10)
    if why:
        print(f'# note: the scanner stand-in keeps its priority ({why})', flush=True)


def control_process(pty: str, env, work_dir, executor: str = 'multi', source_node: str = '/interlock_bench'):
    """The control process (hardware_node + motion_controller) on the emulator's pty; ``source_node`` is
    configured as both the scanner source and the supervisor (this bench plays both), and the bench
    holds the operator session (work_dir/operator_session) to reset a drive fault."""
    from igt_robot import testing
    sets = {'hardware_node.backend': 'serial', 'hardware_node.serial_port': pty,
            'hardware_node.scanner_source': source_node, 'hardware_node.supervisor_node': source_node,
            'hardware_node.operator_session_file': str(pathlib.Path(work_dir) / 'operator_session')}
    args = ['--profile', 'control', '--executor', executor]
    for key, value in sets.items():
        args += ['--set', f'{key}={value}']
    proc = testing.python_process('igt_robot.bringup', args, env, work_dir / 'control.log', name='control')
    raise_priority(proc)
    return proc


def trigger_process(trigger_pty: str, env, work_dir, source_node: str = '/interlock_bench'):
    """The scanner_trigger relay alone in its process (bringup profile 'trigger', config/robot.yaml: SCHED_FIFO
    where permitted) on the emulator's trigger port; ``source_node`` is its scanner source."""
    from igt_robot import testing
    args = ['--profile', 'trigger', '--set', f'scanner_trigger.trigger_port={trigger_pty}',
            '--set', f'scanner_trigger.scanner_source={source_node}']
    proc = testing.python_process('igt_robot.bringup', args, env, work_dir / 'trigger.log', name='trigger')
    raise_priority(proc)
    return proc


def close_rig(scanner, graph, processes, emulator, workers=None) -> None:
    """Stop what a bench started, newest first (each may be None / empty when start-up failed early)."""
    if workers is not None:
        workers.stop()
    if scanner is not None:
        scanner.stop()
    if graph is not None:
        graph.close()
    for proc in reversed(processes):
        proc.stop()
    if emulator is not None:
        emulator.close()


def permit_motion(node):
    """Play the supervisor's permission as safety_supervisor publishes it: latched, True, republished at
    10 Hz (its publish_rate_hz)."""
    from std_msgs.msg import Bool

    from igt_robot.nodes import qos
    publisher = node.create_publisher(Bool, '/safety/motion_permitted', qos.SAFETY_LATCHED)
    publisher.publish(Bool(data=True))
    return node.create_timer(0.1, lambda: publisher.publish(Bool(data=True)))


def drive_reset(node, work_dir):
    """A callable resetting the drive's latched faults as the operator would (the hardware node's service)."""
    from igt_robot import testing
    from igt_robot.safety import operator_session
    from igt_robot_msgs.srv import AcknowledgeFaults
    token = operator_session.issue_session(pathlib.Path(work_dir) / 'operator_session')
    client = node.create_client(AcknowledgeFaults, '/hardware_node/reset_faults')

    def reset():
        if not client.wait_for_service(timeout_sec=10.0):
            raise RuntimeError('/hardware_node/reset_faults not available')
        future = client.call_async(AcknowledgeFaults.Request(operator_id='bench', operator_token=token))
        reply = testing.wait_for(lambda: future.done() and future.result(), 10, 'the drive reset')
        print(f'# drive reset: {reply.message}', flush=True)
    return reset


def _load_ros_floor():
    spec = importlib.util.spec_from_file_location('ros_floor', pathlib.Path(__file__).parent / 'ros_floor.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--emulator', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--control', help=argparse.SUPPRESS)
    parser.add_argument('--watchdog-ms', type=int, default=300, help='emulator watchdog (firmware default 300 ms)')
    parser.add_argument('--events', type=int, default=1000, help='interlock events to time (>= 1000)')
    parser.add_argument('--silence-trials', type=int, default=20, help='scanner-silence trials (>= 20)')
    parser.add_argument('--floor-count', type=int, default=1000, help='DDS floor pings')
    parser.add_argument('--no-trigger-port', action='store_true',
                        help='without the scanner_trigger relay: only the hardware node commands the drive')
    parser.add_argument('--executor', choices=['multi', 'events'], default='multi',
                        help='rclpy executor of the control process')
    parser.add_argument('--pty-workers-normal', action='store_true',
                        help="leave the kernel workers that carry the ptys' bytes at normal priority")
    args = parser.parse_args()
    if args.emulator:
        return run_stamping_emulator(args.control, args.watchdog_ms)
    if args.events < 1000 or args.silence_trials < 20:
        parser.error('--events must be >= 1000 and --silence-trials >= 20 for meaningful figures')

    from igt_robot import testing
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix='bench_interlock_'))
    env = testing.isolated_ros_env(work_dir / 'ros_log')
    testing.apply_env(env)
    shm_before = testing.fastdds_shm_entries()
    control_path = str(work_dir / 'ctl')
    processes, graph, emulator, scanner, workers = [], None, None, None, None
    try:
        emu_proc = testing.python_process(__file__, ['--emulator', '--control', control_path, '--watchdog-ms',
                                                     str(args.watchdog_ms)], env, work_dir / 'emulator.log',
                                          name='emulator')
        processes.append(emu_proc)
        line = testing.wait_for(lambda: next((ln for ln in emu_proc.output().splitlines() if ln.startswith('PTY ')),
                                             None) or (not emu_proc.alive() and 'exited'), 20, 'the PTY line')
        if line == 'exited':
            raise RuntimeError(f'emulator failed: {emu_proc.output()}')
        emulator_as_controller(emu_proc)
        workers = pty_workers_as_uart(not args.pty_workers_normal)
        scanner_stand_in_priority()
        pty = line.split(' ', 1)[1].strip()
        emulator = EmulatorControl(control_path)
        log = InhibitLog(emulator)
        processes.append(control_process(pty, env, work_dir, args.executor))
        trigger_log = None
        if not args.no_trigger_port:
            processes.append(trigger_process(emulator.state()['trigger_pty'], env, work_dir))
            trigger_log = InhibitLog(emulator, 'trigger_log')

        import rclpy
        from rclpy.action import ActionClient

        from igt_robot_msgs.action import InsertNeedle
        graph = testing.SpinningGraph()
        node = rclpy.create_node('interlock_bench', context=graph.context)
        insert = ActionClient(node, InsertNeedle, '/motion/insert_needle')
        scanner = ScannerSource(node)
        diagnostics = LoopDiagnostics(node)
        log.recover = drive_reset(node, work_dir)
        graph.add(node)            # after the ActionClient: rclpy's rule for clients on a spun node
        permit_motion(node)
        scanner.start()
        log.wait_released(60)                # the node is up, has seen the permission and a fresh IDLE
        if trigger_log is not None:
            trigger_log.wait_released(60)    # the relay is up and has seen a fresh IDLE
        if emulator.state()['faults']:
            print(f"# emulator faults latched at start-up: {emulator.state()['faults']}")

        # 1. DDS floor in the same run, with the stack running.
        rtt, one_way = _load_ros_floor().measure_dds_floor(args.floor_count, env=env, log_dir=work_dir)
        testing.apply_env(env)
        dds_p50, dds_p99, dds_max = percentiles(one_way)
        # The same with the scans' spacing: a message to a receiver whose threads sleep costs their wake-up
        # (reported beside the target's back-to-back floor, which stays the reference).
        _, spaced = _load_ros_floor().measure_dds_floor(args.floor_count // 4, env=env, log_dir=work_dir,
                                                        gap_s=SCAN_GAP_S)
        testing.apply_env(env)
        spaced_p50, spaced_p99, spaced_max = percentiles(spaced)

        # 2. Interlock latency.
        paths = {}
        latencies, skipped = measure_interlock(scanner, log, args.events, trigger_log=trigger_log, paths=paths)
        p50, p99, worst = percentiles(latencies)
        info('dds_one_way_p50 (same run)', dds_p50 * 1e3, 'ms')
        info('dds_one_way_p99 (same run)', dds_p99 * 1e3, 'ms')
        info('dds_one_way_max (same run)', dds_max * 1e3, 'ms')
        info(f'dds_one_way_spaced_p50 (same run, {SCAN_GAP_S[0] * 1e3:.0f}-{SCAN_GAP_S[1] * 1e3:.0f} ms apart, '
             f'n={len(spaced)})', spaced_p50 * 1e3, 'ms')
        info('dds_one_way_spaced_p99 (same run)', spaced_p99 * 1e3, 'ms')
        info('dds_one_way_spaced_max (same run)', spaced_max * 1e3, 'ms')
        info(f'interlock_latency_p50 (n={len(latencies)})', p50 * 1e3, 'ms')
        report('interlock_latency_p99', p99 * 1e3, 'ms', '<=', 2.0 * dds_p99 * 1e3)
        report('interlock_latency_max', worst * 1e3, 'ms', '<=', 5.0)
        info('interlock_p99_over_dds_one_way_p99', p99 / dds_p99, 'x')
        print('# interlock latency: to the first frame that stops the drive, '
              + ('MOTION_INHIBIT(1) or TRIGGER_LEVEL(1)' if trigger_log else 'MOTION_INHIBIT(1) (no trigger port)'),
              flush=True)
        report_paths(paths)
        info('interlock events skipped (inhibit already asserted before the scan)', skipped, 'events')
        info('drive fault resets needed (watchdog trips of a starved host)', log.recoveries, 'resets')

        # 3. Scanner silence.
        from_stop, from_last = measure_silence(scanner, log, args.silence_trials, trigger_log=trigger_log)
        s50, _, smax = percentiles(from_stop)
        info(f'scanner_silence_detection_p50 (n={len(from_stop)}, from the source stopping)', s50 * 1e3, 'ms')
        report('scanner_silence_detection_max', smax * 1e3, 'ms', '<=', 3.0 / SCANNER_RATE_HZ * 1e3)
        info('scanner_silence_detection_max_from_last_message', max(from_last) * 1e3, 'ms')

        # 4. Host stream-loop period error, holding and moving (reported; targets in bench/streaming.py).
        try:
            diagnostics.fresh(timeout=5.0)
        except testing.ConditionTimeout:
            print('# no host control-loop diagnostics: the controller servos itself (streaming); loop phase skipped')
            return 0
        if args.executor == 'events':
            print('# --executor events: the moving phase needs blocking goal callbacks; loop phase skipped')
            return 0
        idle_p99, idle_cov, idle_rate, idle_over = measure_jitter(diagnostics)
        # The servo loop runs in the controller; the host loop streams at 50 Hz and is judged in
        # bench/streaming.py (period error against its period, look-ahead, underruns): reported here only.
        info('host_stream_loop_period_error_p99_idle', idle_p99 * 1e3, 'ms')
        info('host_stream_loop_idle: cycles per second', idle_rate, 'Hz')
        info('host_stream_loop_idle: overruns in the phase', idle_over, 'cycles')
        info('host_stream_loop_idle: share of the p99 window from this phase', idle_cov, '')
        if not insert.wait_for_server(timeout_sec=10.0):
            raise RuntimeError('insert_needle action server not available')
        target = [0.04]
        pending = []
        failures = []

        def keep_moving():
            if pending and not pending[0].done():
                return
            if pending:
                result = pending.pop().result().result
                if result.error_code != InsertNeedle.Result.SUCCEEDED:
                    failures.append(result.message)
                target[0] = 0.0 if target[0] > 0.0 else 0.04
            send = insert.send_goal_async(InsertNeedle.Goal(target_depth=target[0]))
            handle = testing.wait_for(lambda: send.done() and send.result(), 10, 'goal response')
            pending.append(handle.get_result_async())
        moving_p99, moving_cov, moving_rate, moving_over = measure_jitter(diagnostics, keep_moving)
        # The servo loop runs in the controller; the host loop streams at 50 Hz and is judged in
        # bench/streaming.py (period error against its period, look-ahead, underruns): reported here only.
        info('host_stream_loop_period_error_p99_moving', moving_p99 * 1e3, 'ms')
        info('host_stream_loop_moving: cycles per second', moving_rate, 'Hz')
        info('host_stream_loop_moving: overruns in the phase', moving_over, 'cycles')
        info('host_stream_loop_moving: share of the p99 window from this phase', moving_cov, '')
        if failures:
            print(f'# {len(failures)} motion goal(s) failed during the moving phase; first: {failures[0]}')
        end = emulator.state()
        print(f"# emulator at the end: faults {end['faults']}, watchdog trips {end['watchdog_trips']}, "
              f"overruns {end['overruns']}")
        return 0
    finally:
        close_rig(scanner, graph, processes, emulator, workers)
        testing.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])


if __name__ == '__main__':
    sys.exit(main())
