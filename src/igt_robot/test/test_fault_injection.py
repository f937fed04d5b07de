"""Fault injection across OS processes: the robot stops, says why, records it, and resumes only when told.

The stack runs as it does on the robot, one OS process each, over real DDS:

* the firmware emulator (``igt_robot.hardware.emulator``) on a pty -- the hardware; its
  control socket injects faults and reports the true axis state;
* ``motion_controller`` (hardware_node + motion_controller in one process, serial backend);
* ``scanner_interface`` and ``safety_supervisor`` (config/safety.yaml);
* ``scanner_trigger``, the relay on the emulator's trigger port (docs/serial_protocol.md §9);
* a probe node in this process (operator console stand-in).

Every scenario checks four things: the robot stopped (the emulator's true axis state shows zero
velocity and positions that stay put over further servo time), the supervisor reports the state with the right
fault and reason, a ProcedureEvent was recorded, and a goal is refused until the operator's
explicit acknowledge / resume -- after which a goal succeeds.

One stack is shared by the module; :meth:`Stack.recover` brings it back to READY with the
needle retracted before each scenario (restarting a killed process, power-cycling the emulator
and re-configuring the hardware node after a drive fault). Timeouts are generous (a shared,
loaded 2-core machine); nothing here asserts timing -- that is bench/interlock.py.

Test-only parameter changes, each to keep a loaded machine from producing (safe but) spurious
stops, never to loosen a check a scenario is about: hardware_node ``scanner_timeout`` 1.0 s and
``serial_timeout`` 0.2 s, supervisor ``scanner_timeout_s`` 1.0 s and ``heartbeat_timeout_s``
1.5 s, emulator watchdog 1000 ms (test_controller_start_... uses the firmware default, 300 ms).

Each scenario once documented a node bug found here (start-up watchdog gap, stale faults after a
reconfigure, a removed depth limit that never cleared, a goal refused right after retracting to a limit);
those are fixed and the tests now guard them.
"""
import collections
import math
import pathlib
import signal
import time

import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from std_msgs.msg import Bool

from igt_robot import testing
from igt_robot.hardware.emulator import EmulatorProcess
from igt_robot.nodes import qos
from igt_robot_msgs.action import InsertNeedle, MoveGuide
from igt_robot_msgs.msg import ScannerState
from igt_robot_msgs.srv import SetEstop
from stack_probe import StackProbe, line_goal


REPO = pathlib.Path(__file__).resolve().parents[3]
CONFIG = REPO / 'config'
WAIT = 30.0                      # s: generous condition timeout (shared, loaded machine)
INSERTION = 4                    # needle_insertion index (joint order of docs/contracts.md)
COUNTS_PER_M = 1.0e6             # emulator encoder resolution of the prismatic axes (config/robot.yaml)
UNDER_WAY = 0.002                # m: an insertion deeper than this is "mid-motion"
GOAL_DEPTH = 0.03                # m: far enough that every scenario interrupts it
EMULATOR_WATCHDOG_MS = 1000

# Tracking tolerances inside the drive's following-error window (see test_tracking_error_...).
# (insertion: 0.10 mm for one 20 ms stream cycle or 0.20 mm at once, inside the drive's 0.25 mm window, with
# room for the drive's own lag on a loaded machine)
TIGHT_TRACKING = ['-p', 'motion_controller:tracking_tolerance:=[0.0015, 0.0015, 0.02, 0.02, 0.0001]',
                  '-p', 'motion_controller:tracking_hard_limit:=[0.004, 0.004, 0.06, 0.06, 0.0002]',
                  '-p', 'motion_controller:tracking_cycles:=1']


NODE_PROCESSES = ('motion_controller', 'scanner_interface', 'safety_supervisor', 'scanner_trigger')


def _node_commands(pty: str, trigger_pty: str, extra_controller_args=()):
    return {
        'motion_controller': ('igt_robot.nodes.motion_controller_node', [
            '--ros-args', '--params-file', str(CONFIG / 'robot.yaml'), '--params-file', str(CONFIG / 'motion.yaml'),
            '-p', 'backend:=serial', '-p', f'serial_port:={pty}', '-p', 'hardware_node:scanner_timeout:=1.0',
            '-p', 'hardware_node:scanner_period:=0.34',
            '-p', 'hardware_node:serial_timeout:=0.2',
            *extra_controller_args]),
        'scanner_interface': ('igt_robot.nodes.scanner_interface_node', [
            '--ros-args', '--params-file', str(CONFIG / 'safety.yaml')]),
        'safety_supervisor': ('igt_robot.nodes.safety_supervisor_node', [
            '--ros-args', '--params-file', str(CONFIG / 'safety.yaml'),
            '-p', 'safety_supervisor:scanner_timeout_s:=1.0', '-p', 'safety_supervisor:heartbeat_timeout_s:=1.5']),
        # The relay decides by the hardware node's staleness values (the same test-only ones).
        'scanner_trigger': ('igt_robot.nodes.scanner_trigger_node', [
            '--ros-args', '--params-file', str(CONFIG / 'robot.yaml'),
            '-p', f'scanner_trigger:trigger_port:={trigger_pty}',
            '-p', 'scanner_trigger:scanner_timeout:=1.0', '-p', 'scanner_trigger:scanner_period:=0.34']),
    }


class _CollectNodes:
    """Stands in for the executor while StackProbe builds its node, so that more clients can be
    added before the node joins the spinning executor (rclpy's rule for ActionClients)."""

    def add_node(self, node):
        self.node = node


class FaultProbe(StackProbe):
    """StackProbe plus the supervisor's parameter service and the hardware node's lifecycle."""

    def __init__(self, context, executor):
        super().__init__(context, _CollectNodes(), name='fault_probe')
        self.permitted_true = 0          # /safety/motion_permitted messages saying true
        self.node.create_subscription(Bool, '/safety/motion_permitted', self._on_permitted, qos.SAFETY_LATCHED)
        self.set_params_client = self.node.create_client(SetParameters, '/safety_supervisor/set_parameters')
        self.change_state_client = self.node.create_client(ChangeState, '/hardware_node/change_state')
        self.get_state_client = self.node.create_client(GetState, '/hardware_node/get_state')
        executor.add_node(self.node)

    def _on_permitted(self, msg):
        if msg.data:
            self.permitted_true += 1

    def estop(self, active: bool):
        return self.call(self.estop_client, SetEstop.Request(active=active, source='test'))

    def set_max_insertion_depth(self, depth: float):
        request = SetParameters.Request(parameters=[Parameter('max_insertion_depth', value=float(depth))
                                                    .to_parameter_msg()])
        return self.call(self.set_params_client, request).results[0]

    def hardware_lifecycle(self) -> str:
        return self.call(self.get_state_client, GetState.Request()).current_state.label

    def hardware_transition(self, transition_id: int) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return self.call(self.change_state_client, request, timeout=WAIT).success


def event_values(event) -> dict:
    return {kv.key: kv.value for kv in event.values}


def fault_codes(status) -> set:
    return {f.code for f in status.faults}


class Stack:
    """The emulator and the three node processes, restartable one by one, plus the probe."""

    def __init__(self, env: dict, run_dir: pathlib.Path):
        self.env, self.run_dir = env, run_dir
        self.procs = {}
        self.started_at = {}                 # process name -> time.monotonic() of its latest start
        self.starts = collections.Counter()
        self.emulator = EmulatorProcess('--watchdog-ms', str(EMULATOR_WATCHDOG_MS)).start()
        self.controller_args = ()
        self._dead_servers = set()
        self.graph = None
        try:
            for name in NODE_PROCESSES:
                self.start(name)
            self.graph = testing.SpinningGraph()
            self.probe = FaultProbe(self.graph.context, self.graph.executor)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ processes
    def start(self, name: str):
        module, args = _node_commands(self.emulator.pty_path, self.emulator.trigger_pty_path,
                                      self.controller_args)[name]
        self.starts[name] += 1
        self.started_at[name] = time.monotonic()
        proc = testing.python_process(module, args, self.env, self.run_dir / f'{name}-{self.starts[name]}.log',
                                      name=name)
        self.procs[name] = proc
        return proc

    def action_server_gids(self) -> set:
        """Endpoint GIDs of the motion action servers' status publishers now in the graph."""
        return {bytes(info.endpoint_gid) for action in ('insert_needle', 'move_guide')
                for info in self.probe.node.get_publishers_info_by_topic(f'/motion/{action}/_action/status')}

    def kill(self, name: str):
        """SIGKILL the process (no clean-up code runs, as in a crash)."""
        if name == 'motion_controller':
            # A killed participant stays in the DDS graph until its lease expires, so the action
            # clients keep "seeing" its servers: remember them to wait for the new ones.
            self._dead_servers = self.action_server_gids()
        proc = self.procs[name]
        proc.kill(signal.SIGKILL)
        testing.wait_for(lambda: not proc.alive(), WAIT, f'{name} to die')
        proc.stop()   # reap; closes the log

    def restart_controller(self, *extra_args):
        """Stop the motion_controller process cleanly and start it again (with ``extra_args``)."""
        # Even after a clean stop the test's graph may still list the old servers for a moment, and
        # /robot/state still holds the old process's last sample: wait for the new process's own.
        self._dead_servers = self.action_server_gids()
        self.procs['motion_controller'].stop()
        self.probe.robot = None
        self.controller_args = tuple(extra_args)
        self.start('motion_controller')
        self.wait_controller_ready()

    def wait_controller_ready(self):
        assert self.probe.insert.wait_for_server(timeout_sec=WAIT), 'insert_needle action server'
        dead = self._dead_servers
        if dead:
            testing.wait_for(lambda: len(self.action_server_gids() - dead) >= 2, WAIT,
                             'the restarted action servers in the graph')
            self._dead_servers = set()
        testing.wait_for(lambda: self.probe.robot is not None and self.probe.robot.backend == 'serial'
                         and self.probe.robot.enabled, WAIT, 'an enabled robot on /robot/state')
        # The servers being in the graph says this probe found the new process; the new process must also have
        # found this probe's readers, or it drops its answer to our first goal. Its heartbeat arriving here says
        # it has matched them (they are announced together).
        started = self.started_at.get('motion_controller', 0.0)
        testing.wait_for(lambda: self.probe.heartbeat_seen.get('motion_controller', 0.0) > started, WAIT,
                         'a heartbeat of the (re)started motion controller at the probe')

    def log(self, name: str) -> str:
        return self.procs[name].log_path.read_text(errors='replace')

    def close(self):
        try:
            for proc in reversed(list(self.procs.values())):
                proc.stop()
        finally:
            self.emulator.terminate()
            if self.graph is not None:
                self.graph.close()

    # ------------------------------------------------------------------ the hardware's truth
    def emu_state(self) -> dict:
        return self.emulator.state()

    def wait_emu(self, predicate, what: str) -> dict:
        """Wait until ``predicate(state)`` holds for the emulator's state; return that state.
        Polled at 100 Hz: each query is served by the emulator's servo loop."""
        return testing.wait_for(lambda: (s := self.emu_state()) and predicate(s) and s, WAIT, what, poll=0.01)

    def assert_held_still(self, settle: float = 0.3) -> np.ndarray:
        """No axis moves: zero velocity and the same positions over ``settle`` s of the emulator's
        own servo time. Returns the positions (encoder counts). (The physical truth, not the MOVING
        flag, which the emulator gets wrong after an immediate fault: see
        test_drive_fault_state_is_reported_truthfully_....)"""
        first = self.wait_emu(lambda s: not any(s['velocities']), 'the emulator axes at rest')
        later = self.wait_emu(lambda s: s['time'] >= first['time'] + settle, f'{settle} s of emulator servo time')
        assert not any(later['velocities']), later
        assert np.allclose(later['positions'], first['positions'], atol=0.5), (first['positions'], later['positions'])
        return np.array(later['positions'])

    def set_targets_executed(self) -> int:
        return self.emu_state()['executed'].get('SET_TARGET', 0)

    # ------------------------------------------------------------------ operator actions
    def start_insertion(self, depth: float = GOAL_DEPTH, under_way: float = UNDER_WAY, max_velocity: float = 0.0):
        handle = self.probe.send(self.probe.insert, InsertNeedle.Goal(target_depth=depth, max_velocity=max_velocity))
        assert handle.accepted
        result = handle.get_result_async()
        testing.wait_for(lambda: result.done() or (self.probe.robot is not None
                                                   and self.probe.robot.position[INSERTION] > under_way),
                         WAIT, 'the insertion to be under way')
        assert not result.done(), f'the goal ended before the scenario began: {result.result().result.message}'
        return handle

    def insert_to(self, depth: float):
        return self.probe.result(self.probe.send(self.probe.insert, InsertNeedle.Goal(target_depth=depth)), WAIT * 2)

    def assert_goal_refused(self, *words):
        """A goal now is refused (INTERLOCK) naming ``words``, and nothing reaches the drive."""
        writes, before = self.set_targets_executed(), self.emu_state()['positions']
        depth = self.probe.robot.position[INSERTION] if self.probe.robot is not None else 0.0
        result = self.insert_to(min(depth + 0.005, 0.1))
        assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
        for word in words:
            assert word in result.message, result.message
        assert self.set_targets_executed() == writes
        assert np.allclose(self.emu_state()['positions'], before, atol=0.5)
        return result

    def events_since(self, mark: int, kind: str, **values):
        found = []
        for event in list(self.probe.events)[mark:]:
            if event.kind != kind:
                continue
            have = event_values(event)
            if all(have.get(k) == v for k, v in values.items()):
                found.append(event)
        return found

    def wait_event(self, mark: int, kind: str, **values):
        return testing.wait_for(lambda: self.events_since(mark, kind, **values), WAIT,
                                f'a {kind} event {values or ""}')[0]

    def assert_acknowledge_refused(self, code: str):
        """An acknowledge while ``code``'s cause is present leaves it latched, says so, and motion
        stays forbidden. (Other, cleared faults may be acknowledged by the same call.)"""
        reply = self.probe.acknowledge()
        assert f'still active: {code}' in reply.message or (not reply.success and code in reply.message), \
            reply.message
        assert reply.status.state == 'FAULT' and not reply.status.motion_permitted
        assert any(f.code == code and f.cause_active for f in reply.status.faults), reply.status.faults
        return reply

    def reconfigure_hardware(self):
        """The hardware node's lifecycle back to active: what an operator does after the drive
        was power-cycled (docs/safety.md: drive faults are cleared at the drive)."""
        probe = self.probe
        state = probe.hardware_lifecycle()
        if state == 'active':
            assert probe.hardware_transition(Transition.TRANSITION_DEACTIVATE)
            state = 'inactive'
        if state == 'inactive':
            assert probe.hardware_transition(Transition.TRANSITION_CLEANUP)
        assert probe.hardware_transition(Transition.TRANSITION_CONFIGURE), self.log('motion_controller')[-2000:]
        assert probe.hardware_transition(Transition.TRANSITION_ACTIVATE), self.log('motion_controller')[-2000:]
        self.wait_emu(lambda s: s['enabled'], 'the emulator axes enabled again')

    def clear_drive(self):
        """Power-cycle the emulator (the only way its latched faults clear: no node sends
        RESET_FAULTS, see the report) and bring the hardware node back to active on the fresh
        firmware. Before re-configuring, let the hardware node read the cleared drive once: it
        withdraws its fault reports only from a reading (test_drive_fault_state_is_reported_...)."""
        self.emulator.control('power_cycle')
        seen = self.probe.robot_count
        testing.wait_for(lambda: self.probe.robot_count > seen + 2 and not self.probe.robot.faults, WAIT,
                         'a /robot/state without faults after the power cycle')
        self.reconfigure_hardware()

    def describe(self) -> str:
        status, emu = self.probe.status, self.emu_state()
        faults = [(f.code, f.cause_active, f.detail[:80]) for f in status.faults] if status else None
        return (f"supervisor {status.state if status else None} ({status.reason if status else ''}) faults {faults}; "
                f"emulator enabled={emu['enabled']} inhibited={emu['inhibited']} faults={emu['faults']}; "
                f"processes alive: {{{', '.join(f'{n}: {p.alive()}' for n, p in self.procs.items())}}}")

    def wait_causes_cleared(self):
        try:
            return self.probe.wait_status(lambda s: s.state != 'INIT' and not any(f.cause_active for f in s.faults),
                                          'every fault cause cleared', WAIT)
        except testing.ConditionTimeout as exc:
            raise testing.ConditionTimeout(f'{exc}: {self.describe()}') from None

    def resume(self):
        """The operator's resume, then :meth:`wait_motion_ready`."""
        reply = self.probe.resume()
        assert reply.success, reply.message
        self.wait_motion_ready()

    def wait_motion_ready(self, timeout: float = WAIT):
        """Motion permitted, the drive's inhibit released, and two periodic republications of the
        permission seen since. A goal sent earlier can fail although the resume succeeded: the
        hardware node and the motion controller each take the new permission from their own
        subscription, in no fixed order (see the report)."""
        self.probe.wait_status(lambda s: s.motion_permitted, 'motion permitted', timeout)
        self.wait_emu(lambda s: not s['inhibited'], 'the hardware motion-inhibit released')
        seen = self.probe.permitted_true
        testing.wait_for(lambda: self.probe.permitted_true >= seen + 2 and self.probe.status.motion_permitted,
                         timeout, 'two more motion_permitted=true republications')

    def acknowledge_and_resume(self, attempts: int = 5):
        """Acknowledge (reset) and resume. Retried a few times: a restart or re-configure can
        latch one more fault shortly after the first acknowledge (e.g. HARDWARE_FAULT reports from
        the control loop while the hardware handle was being replaced)."""
        for attempt in range(attempts):
            status = self.wait_causes_cleared()
            if status.state in ('FAULT', 'ESTOP'):
                self.probe.acknowledge()
            try:
                self.probe.wait_status(lambda s: s.state in ('HOLD', 'READY', 'FAULT'), 'the acknowledge', WAIT)
                if self.probe.status.state == 'HOLD':
                    self.probe.resume()
                self.wait_motion_ready(timeout=5.0)
                return
            except testing.ConditionTimeout:
                if attempt == attempts - 1:
                    raise AssertionError(f'could not acknowledge and resume: {self.describe()}') from None

    def recover(self):
        """Back to READY, nothing latched, scanner IDLE, needle retracted, drive enabled. If the
        operator's way back fails (a scenario failed and left an unforeseen state, or a node bug
        keeps a cause active), restart every node process on a power-cycled drive and try again."""
        try:
            self._recover()
        except (AssertionError, testing.ConditionTimeout) as exc:
            print(f'recover: the operator path failed ({exc}); restarting the stack')
            for proc in self.procs.values():
                proc.stop()
            self.emulator.control('power_cycle')
            self.controller_args = ()
            for name in NODE_PROCESSES:
                self.start(name)
            self.probe.status = None
            self.probe.wait_status(lambda st: st.state != 'INIT', 'the supervisor out of INIT', 60)
            self._recover()

    def _recover(self):
        probe = self.probe
        for name in ('scanner_interface', 'safety_supervisor', 'scanner_trigger'):
            if not self.procs[name].alive():
                self.start(name)
        emu = self.emu_state()
        print(f"recover: emulator enabled={emu['enabled']} faults={emu['faults']} positions={emu['positions']}; "
              f"supervisor {probe.status.state if probe.status else None}")
        if any(emu['stalled']):
            for axis, stalled in enumerate(emu['stalled']):
                if stalled:
                    self.emulator.control(f'release_axis {axis}')
        if not self.procs['motion_controller'].alive():
            self.emulator.control('power_cycle')
            self.start('motion_controller')
        elif emu['faults'] or emu['estop'] or not emu['enabled'] or emu['positions'][INSERTION] <= -0.5:
            # A drive that came to rest a hair below the insertion's lower limit (0) blocks every goal
            # (the first setpoint of any trajectory is refused): a node bug, see the report.
            self.clear_drive()
        self.wait_controller_ready()
        probe.estop(False)
        # A large limit rather than "none" (-1): removing the limit leaves an INSERTION_LIMIT cause
        # active (test_removing_the_depth_limit_clears_its_cause); 0.15 m is the joint's own limit.
        reply = probe.set_max_insertion_depth(0.15)
        assert reply.successful, reply.reason
        if probe.status is None or probe.status.scanner_phase != 'IDLE':
            assert probe.scan(ScannerState.PHASE_IDLE).accepted
        self.acknowledge_and_resume()
        if probe.positions()[INSERTION] > 2e-4:
            result = self.insert_to(0.0)
            assert result.error_code == InsertNeedle.Result.SUCCEEDED, result.message
            if self.assert_held_still(settle=0.05)[INSERTION] <= -0.5:
                # Came to rest a hair below the lower limit (see above): re-park the drive.
                self.clear_drive()
                self.acknowledge_and_resume()
        assert probe.status.state == 'READY', probe.status.reason


@pytest.fixture(scope='module')
def stack(ros_env):
    run_dir = pathlib.Path(ros_env['ROS_LOG_DIR']).parent / 'test_fault_injection'
    run_dir.mkdir(parents=True, exist_ok=True)
    s = Stack(ros_env, run_dir)
    try:
        s.probe.wait_status(lambda st: st.state != 'INIT', 'the supervisor out of INIT', 60)
        yield s
    finally:
        s.close()


@pytest.fixture
def ready(stack):
    """The shared stack in READY with the needle retracted; the event index where this test starts."""
    stack.recover()
    return stack, len(stack.probe.events)


# ================================================================ start-up

def test_controller_start_does_not_trip_the_drive_watchdog(ros_env):
    """With the firmware's default watchdog (300 ms) the controller process must feed the drive
    from the moment it enables the axes. Own emulator and ROS domain (not the shared stack)."""
    run_dir = pathlib.Path(ros_env['ROS_LOG_DIR']).parent / 'test_fault_injection'
    env = dict(ros_env, ROS_DOMAIN_ID=str(testing.pick_domain_id()))   # free, so never the stack's
    with EmulatorProcess() as emulator:
        module, args = _node_commands(emulator.pty_path, emulator.trigger_pty_path)['motion_controller']
        proc = testing.python_process(module, args, env, run_dir / 'startup_motion_controller.log',
                                      name='startup_motion_controller')
        try:
            testing.wait_for(lambda: 'trajectory streaming at' in proc.output() or not proc.alive(), WAIT,
                             'the streaming loop to start')
            assert proc.alive(), proc.output()
            state = testing.wait_for(lambda: (s := emulator.state())['rx_frames'] > 200 and s, WAIT,
                                     'the control loop to talk to the drive', poll=0.01)
            assert 'WATCHDOG' not in state['faults'], (
                f"the drive's watchdog tripped while the controller started (faults {state['faults']}): the axes "
                'were enabled before anything fed the watchdog')
            assert state['enabled']
        finally:
            proc.stop()


# ================================================================ a. scan starts mid-motion

def test_scan_starting_mid_motion_stops_the_robot_until_the_operator_resumes(ready):
    stack, mark = ready
    probe = stack.probe
    handle = stack.start_insertion()
    assert probe.scan(ScannerState.PHASE_ACQUIRING, protocol='control scan').accepted

    result = probe.result(handle, WAIT)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    # The cause is in the result unless the drive refused a setpoint before the controller's own
    # scanner callback ran (then 'stopped by the hardware motion-inhibit': a race, see the report).
    assert 'ACQUIRING' in result.message or 'motion-inhibit' in result.message, result.message
    stopped = stack.assert_held_still()
    assert UNDER_WAY * COUNTS_PER_M < stopped[INSERTION] < GOAL_DEPTH * COUNTS_PER_M
    stack.wait_emu(lambda s: s['inhibited'], 'the hardware node to assert the drive motion-inhibit')

    status = probe.wait_status(lambda s: s.state == 'SCAN_HOLD', 'SCAN_HOLD', WAIT)
    assert not status.motion_permitted and status.scanner_phase == 'ACQUIRING'
    assert 'scanner ACQUIRING' in status.reason and 'control scan' in status.reason
    stack.wait_event(mark, 'scan_started', protocol='control scan')
    stack.wait_event(mark, 'safety_transition', to_state='SCAN_HOLD')
    stack.wait_event(mark, 'interlock', inhibit='True')
    stack.wait_event(mark, 'insert_needle_aborted')

    stack.assert_goal_refused('ACQUIRING')                       # still scanning
    assert probe.scan(ScannerState.PHASE_IDLE).accepted
    status = probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the scan', WAIT)
    assert status.awaiting_resume and not status.motion_permitted
    stack.assert_goal_refused()                                  # scan over, but not resumed
    assert np.allclose(stack.assert_held_still(), stopped, atol=0.5)

    stack.resume()
    done = stack.insert_to(0.0)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


# ================================================================ b. scanner link goes silent

def test_scanner_process_killed_latches_scanner_silent_until_restart_and_acknowledge(ready):
    stack, mark = ready
    probe = stack.probe
    handle = stack.start_insertion()
    stack.kill('scanner_interface')

    result = probe.result(handle, WAIT)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    stack.assert_held_still()
    status = probe.wait_status(lambda s: 'SCANNER_SILENT' in fault_codes(s), 'SCANNER_SILENT', WAIT)
    assert status.state == 'FAULT' and status.latched and not status.motion_permitted
    assert status.scanner_phase == 'UNKNOWN'
    silent = next(f for f in status.faults if f.code == 'SCANNER_SILENT')
    assert silent.cause_active and 'no scanner state' in silent.detail
    fault = stack.wait_event(mark, 'safety_fault', code='SCANNER_SILENT')
    assert 'no scanner state' in fault.description
    stack.wait_event(mark, 'safety_transition', to_state='FAULT')

    stack.assert_acknowledge_refused('SCANNER_SILENT')          # the link is still down
    stack.assert_goal_refused()

    stack.start('scanner_interface')
    probe.wait_status(lambda s: s.scanner_phase == 'IDLE' and not any(f.cause_active for f in s.faults),
                      'scanner back and the cause cleared', WAIT)
    assert probe.status.state == 'FAULT' and probe.status.latched   # still latched: not implicit
    stack.assert_goal_refused()
    assert probe.acknowledge().success
    probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the acknowledge', WAIT)
    stack.assert_goal_refused()
    stack.resume()
    done = stack.insert_to(0.0)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


# ================================================================ b2. the trigger-port relay dies

def test_trigger_relay_killed_mid_motion_latches_trigger_port_until_the_operator_acknowledges(ready):
    """The relay's silence reads as imaging in the controller and latches TRIGGER_PORT there: the axes stop and go
    off by the controller's own decision; the operator sees a drive fault; a restarted relay clears nothing by
    itself; the acknowledge resets the drive and the resume lets motion go on."""
    stack, mark = ready
    probe = stack.probe
    stack.wait_emu(lambda s: s['trigger_port']['armed'], 'the relay to have armed the trigger port')
    handle = stack.start_insertion()
    stack.kill('scanner_trigger')

    result = probe.result(handle, WAIT)
    assert result.error_code != InsertNeedle.Result.SUCCEEDED, result.message
    stack.assert_held_still()
    emu = stack.wait_emu(lambda s: 'TRIGGER_PORT' in s['faults'] and not s['enabled'], 'TRIGGER_PORT latched')
    assert emu['trigger_port']['silent'] and emu['trigger_inputs']['PORT']
    status = probe.wait_status(lambda s: 'TRIGGER_PORT' in fault_codes(s), 'TRIGGER_PORT reported', WAIT)
    assert status.state == 'FAULT' and not status.motion_permitted
    stack.wait_event(mark, 'safety_fault', code='TRIGGER_PORT')
    stack.assert_goal_refused()

    stack.start('scanner_trigger')                   # the relay is back and says idle ...
    stack.wait_emu(lambda s: not s['trigger_inputs']['PORT'], 'the restarted relay to lower its level')
    assert 'TRIGGER_PORT' in stack.emu_state()['faults']   # ... which clears nothing by itself
    stack.assert_goal_refused()
    reply = probe.acknowledge()
    assert reply.success, reply.message
    emu = stack.emu_state()
    assert emu['faults'] == [] and emu['enabled'] and emu['trigger_port']['armed'], emu
    probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the acknowledge', WAIT)
    stack.resume()
    done = stack.insert_to(0.0)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


# ================================================================ c. e-stop

def test_software_estop_mid_motion_needs_release_reset_and_resume(ready):
    stack, mark = ready
    probe = stack.probe
    handle = stack.start_insertion()
    assert probe.estop(True).success

    result = probe.result(handle, WAIT)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    stack.assert_held_still()
    stack.wait_emu(lambda s: s['inhibited'], 'the hardware node to assert the drive motion-inhibit')
    status = probe.wait_status(lambda s: s.state == 'ESTOP', 'ESTOP', WAIT)
    assert not status.motion_permitted and 'emergency stop' in status.reason.lower()
    event = stack.wait_event(mark, 'safety_transition', to_state='ESTOP')
    assert event.severity == event.ERROR

    refused = probe.acknowledge()                               # still pressed
    assert not refused.success
    stack.assert_goal_refused()
    released = probe.estop(False)
    assert released.success and 'reset' in released.message
    status = probe.wait_status(lambda s: 'reset' in s.reason, 'released, reset required', WAIT)
    assert status.state == 'ESTOP'                              # releasing alone does not move anything
    stack.assert_goal_refused()
    assert probe.acknowledge().success                          # no codes: reset()
    probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the reset', WAIT)
    stack.assert_goal_refused()
    stack.resume()
    done = stack.insert_to(0.0)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


# ================================================================ e. hardware fault in the drive

def test_drive_fault_mid_motion_stops_and_the_operator_acknowledge_resets_the_drive(ready):
    stack, mark = ready
    probe = stack.probe
    handle = stack.start_insertion()
    stack.emulator.control('fault OVERCURRENT needle_insertion')

    result = probe.result(handle, WAIT)
    assert result.error_code != InsertNeedle.Result.SUCCEEDED
    assert 'OVERCURRENT' in result.message, result.message
    stack.assert_held_still()
    emu = stack.emu_state()
    assert emu['faults'] == ['OVERCURRENT'] and emu['fault_axes'] == [INSERTION] and not emu['enabled']
    status = probe.wait_status(lambda s: 'OVERCURRENT' in fault_codes(s), 'OVERCURRENT reported', WAIT)
    assert status.state == 'FAULT' and 'OVERCURRENT' in status.reason
    stack.wait_event(mark, 'safety_fault', code='OVERCURRENT')
    stack.wait_event(mark, 'safety_transition', to_state='FAULT')

    stack.assert_goal_refused()
    # The operator's acknowledge resets the drive (RESET_FAULTS through the hardware node, issue 14): the
    # emulator models no lasting cause for OVERCURRENT, so the drive clears and the latch with it.
    reply = probe.acknowledge()
    assert reply.success, reply.message
    emu = stack.emu_state()
    assert emu['faults'] == [] and emu['enabled'], emu
    probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the acknowledge', WAIT)
    stack.resume()
    done = stack.insert_to(0.005)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


def test_drive_fault_state_is_reported_truthfully_and_clears_after_the_drive_is_fixed(ready):
    """Two reporting defects after an immediate drive fault (each checked, both reported).

    1. the de-energised drive (zero velocity, constant positions) must not report MOVING -- it
    does once the host's MOTION_INHIBIT arrives after the power-off (emulator);
    2. the drive is fixed (power-cycled) while the hardware node is unconfigured -- the natural
    order: deactivate, clean up, fix, configure, activate. The drive then reports no fault,
    so the supervisor must see the cause gone -- it keeps it active (hardware_node)."""
    stack, _ = ready
    probe = stack.probe
    problems = []
    stack.start_insertion()
    stack.emulator.control('fault OVERCURRENT needle_insertion')
    probe.wait_status(lambda s: 'OVERCURRENT' in fault_codes(s), 'OVERCURRENT reported', WAIT)
    stack.wait_emu(lambda s: s['inhibited'], 'the inhibit asserted after the fault')
    stack.assert_held_still()
    emu = stack.emu_state()
    assert not emu['enabled'] and not any(emu['velocities'])
    if emu['moving']:
        problems.append('emulator: de-energised, zero velocity, positions constant, yet it reports MOVING')

    assert probe.hardware_transition(Transition.TRANSITION_DEACTIVATE)
    assert probe.hardware_transition(Transition.TRANSITION_CLEANUP)
    stack.emulator.control('power_cycle')
    assert probe.hardware_transition(Transition.TRANSITION_CONFIGURE)
    assert probe.hardware_transition(Transition.TRANSITION_ACTIVATE)
    stack.wait_emu(lambda s: s['enabled'] and not s['faults'], 'the drive enabled without faults')
    seen = probe.robot_count
    testing.wait_for(lambda: probe.robot_count > seen + 5 and not probe.robot.faults, WAIT,
                     '/robot/state without faults')
    try:
        probe.wait_status(lambda s: not any(f.code == 'OVERCURRENT' and f.cause_active for f in s.faults),
                          'the OVERCURRENT cause cleared', 10)
    except testing.ConditionTimeout:
        problems.append('hardware_node: the drive reports no fault, yet the supervisor keeps OVERCURRENT active')
    assert not problems, problems


# ================================================================ f. tracking error (stalled axis)

def test_stalled_axis_is_caught_by_the_drive_following_error_first(ready):
    """With the shipped tolerances the drive's following-error window (0.05 s of full speed:
    0.25 mm on the insertion axis) is far inside the host's tracking tolerance (1 mm), so a
    stall latches FOLLOWING_ERROR in the drive before the host's monitor can fire."""
    stack, mark = ready
    probe = stack.probe
    handle = stack.start_insertion()
    stack.emulator.control('stall_axis needle_insertion')

    result = probe.result(handle, WAIT)
    assert result.error_code == InsertNeedle.Result.HARDWARE_FAULT, result.message
    assert 'FOLLOWING_ERROR' in result.message
    stack.assert_held_still()
    status = probe.wait_status(lambda s: 'FOLLOWING_ERROR' in fault_codes(s), 'FOLLOWING_ERROR', WAIT)
    assert status.state == 'FAULT'
    stack.wait_event(mark, 'safety_fault', code='FOLLOWING_ERROR')
    stack.assert_goal_refused()
    stack.emulator.control('release_axis needle_insertion')
    # The operator's acknowledge resets the drive's FOLLOWING_ERROR (RESET_FAULTS through the hardware node).
    reply = probe.acknowledge()
    assert reply.success, reply.message
    assert stack.emu_state()['faults'] == []
    probe.wait_status(lambda s: s.state == 'HOLD', 'HOLD after the acknowledge', WAIT)
    stack.resume()
    done = stack.insert_to(0.005)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


# No longer a timing race: the host compares the measured position with the trajectory at the controller's
# executed stream time, so a late host cycle does not show up as lag (it did with 1 kHz host setpoints).
def test_tracking_error_latches_tracking_error_and_needs_acknowledge(ready):
    """The host's tracking monitor as the first line: tolerances inside the drive's window
    (0.08 mm / 0.15 mm on the insertion axis against the drive's 0.25 mm) and a slow insertion,
    so that the host sees the stall before the drive does."""
    stack, mark = ready
    probe = stack.probe
    stack.restart_controller(*TIGHT_TRACKING)
    try:
        stack.acknowledge_and_resume()      # the restart's heartbeat gap may have latched a fault
        handle = stack.start_insertion(0.01, under_way=0.001, max_velocity=0.001)
        stack.emulator.control('stall_axis needle_insertion')
        result = probe.result(handle, WAIT)
        assert result.error_code == InsertNeedle.Result.TRACKING_ERROR, result.message
        stack.assert_held_still()
        status = probe.wait_status(lambda s: 'TRACKING_ERROR' in fault_codes(s), 'TRACKING_ERROR', WAIT)
        assert status.state == 'FAULT'
        tracking = next(f for f in status.faults if f.code == 'TRACKING_ERROR')
        assert 'needle_insertion' in tracking.detail
        stack.wait_event(mark, 'safety_fault', code='TRACKING_ERROR')
        stack.assert_goal_refused()
        stack.emulator.control('release_axis needle_insertion')
        if stack.emu_state()['faults']:
            stack.clear_drive()             # the drive may also have latched FOLLOWING_ERROR meanwhile
        stack.acknowledge_and_resume()
        # Slowly: at full speed the drive's normal lag exceeds these tolerances.
        done = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.0, max_velocity=0.001)), WAIT)
        assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message
    finally:
        stack.restart_controller()          # back to the shipped tolerances for the others


# ================================================================ g. limits

def test_insertion_deeper_than_the_procedure_limit_stops_with_the_reason(ready):
    stack, mark = ready
    probe = stack.probe
    limit = 0.004
    assert probe.set_max_insertion_depth(limit).successful
    handle = probe.send(probe.insert, InsertNeedle.Goal(target_depth=GOAL_DEPTH))
    assert handle.accepted

    result = probe.result(handle, WAIT)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    # The result names the cause only when /safety/status reached the controller before the
    # permission did and before the drive refused a setpoint (a race, see the report); the
    # supervisor's status below always has it.
    stopped = stack.assert_held_still()
    assert limit * COUNTS_PER_M < stopped[INSERTION] < GOAL_DEPTH * COUNTS_PER_M
    status = probe.wait_status(lambda s: 'INSERTION_LIMIT' in fault_codes(s), 'INSERTION_LIMIT', WAIT)
    assert status.state == 'FAULT' and 'deeper than allowed 0.0040 m' in status.reason
    stack.wait_event(mark, 'safety_fault', code='INSERTION_LIMIT')
    stack.assert_acknowledge_refused('INSERTION_LIMIT')         # the needle is still too deep
    stack.assert_goal_refused()
    # Motion is forbidden, so the needle cannot be withdrawn: the operator raises the limit instead.
    assert probe.set_max_insertion_depth(0.1).successful
    stack.wait_causes_cleared()
    stack.assert_goal_refused()
    stack.acknowledge_and_resume()
    done = stack.insert_to(0.0)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message


def test_removing_the_depth_limit_clears_its_cause(ready):
    """max_insertion_depth < 0 means "no procedure limit": an INSERTION_LIMIT raised under the
    old limit must then count as cleared (acknowledge possible), as it does when the limit is raised."""
    stack, _ = ready
    probe = stack.probe
    assert probe.set_max_insertion_depth(0.002).successful
    result = stack.insert_to(0.01)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    probe.wait_status(lambda s: 'INSERTION_LIMIT' in fault_codes(s), 'INSERTION_LIMIT', WAIT)
    assert probe.set_max_insertion_depth(-1.0).successful
    try:
        probe.wait_status(lambda s: not any(f.cause_active for f in s.faults), 'the INSERTION_LIMIT cause cleared', 10)
    except testing.ConditionTimeout:
        active = [(f.code, f.detail) for f in probe.status.faults if f.cause_active]
        pytest.fail(f'no depth limit any more, yet the supervisor keeps these causes active: {active}')


def test_a_goal_right_after_retracting_to_the_lower_limit_is_accepted(ready):
    """A retract to 0 can end with the drive a few counts below 0 (it overshoots and is still
    returning when the goal counts as reached, within goal_tolerance). A goal planned from that
    reading must still run: the start is a measurement, not a command."""
    stack, _ = ready
    for attempt in range(3):
        out = stack.insert_to(0.003)
        assert out.error_code == InsertNeedle.Result.SUCCEEDED, f'attempt {attempt}, insert: {out.message}'
        back = stack.insert_to(0.0)
        assert back.error_code == InsertNeedle.Result.SUCCEEDED, f'attempt {attempt}, retract: {back.message}'


# ================================================================ h. bad goals: refused, nothing moves

ENTRY, TARGET = (0.004, -0.003, -0.010), (0.010, 0.002, -0.070)
BAD_GOALS = {
    'insert-nan': ('insert', InsertNeedle.Goal(target_depth=math.nan), InsertNeedle.Result.INVALID_GOAL,
                   'not finite'),
    'insert-beyond-joint-limit': ('insert', InsertNeedle.Goal(target_depth=0.2), InsertNeedle.Result.UNREACHABLE,
                                  'outside the insertion range'),
    'insert-negative-speed': ('insert', InsertNeedle.Goal(target_depth=0.01, max_velocity=-0.001),
                              InsertNeedle.Result.INVALID_GOAL, 'must be finite and >= 0'),
    'move-nan': ('move', line_goal((math.nan, 0.0, -0.01), TARGET), MoveGuide.Result.INVALID_GOAL, 'non-finite'),
    'move-unreachable': ('move', line_goal((0.0, 0.0, -0.01), (0.09, 0.0, -0.03)), MoveGuide.Result.UNREACHABLE,
                         'beyond'),
    'move-velocity-scale': ('move', MoveGuide.Goal(entry=line_goal(ENTRY, TARGET).entry,
                                                   target=line_goal(ENTRY, TARGET).target, velocity_scale=2.0),
                            MoveGuide.Result.INVALID_GOAL, 'velocity_scale'),
}


@pytest.mark.parametrize('case', list(BAD_GOALS))
def test_bad_goal_is_refused_with_the_reason_and_nothing_moves(ready, case):
    stack, mark = ready
    kind, goal, code, words = BAD_GOALS[case]
    writes, before = stack.set_targets_executed(), stack.assert_held_still(settle=0.05)
    client = stack.probe.insert if kind == 'insert' else stack.probe.move
    result = stack.probe.result(stack.probe.send(client, goal), WAIT)
    assert result.error_code == code, result.message
    assert words in result.message
    assert stack.set_targets_executed() == writes
    assert np.allclose(stack.assert_held_still(settle=0.05), before, atol=0.5)
    refused = stack.wait_event(mark, f'{"insert_needle" if kind == "insert" else "move_guide"}_refused')
    assert words in refused.description


def test_goal_while_a_scan_is_running_is_refused_and_nothing_moves(ready):
    stack, _ = ready
    probe = stack.probe
    assert probe.scan(ScannerState.PHASE_ACQUIRING, protocol='planning CT').accepted
    probe.wait_status(lambda s: s.state == 'SCAN_HOLD', 'SCAN_HOLD', WAIT)
    stack.assert_goal_refused('ACQUIRING')
    result = probe.result(probe.send(probe.move, line_goal(ENTRY, TARGET)), WAIT)
    assert result.error_code == MoveGuide.Result.INTERLOCK and 'ACQUIRING' in result.message
    stack.assert_held_still(settle=0.05)


# ================================================================ d. controller process killed

def test_controller_killed_mid_motion_watchdog_stops_the_axes_and_heartbeat_lost_is_latched(ready):
    stack, mark = ready
    probe = stack.probe
    stack.start_insertion()
    stack.kill('motion_controller')

    # WATCHDOG brakes under control, then de-energises the axes.
    stack.wait_emu(lambda s: 'WATCHDOG' in s['faults'] and not s['enabled'], 'the emulator watchdog to stop the axes')
    held = stack.assert_held_still()
    assert held[INSERTION] > UNDER_WAY * COUNTS_PER_M
    status = probe.wait_status(lambda s: 'HEARTBEAT_LOST' in fault_codes(s), 'HEARTBEAT_LOST', WAIT)
    assert status.state == 'FAULT' and not status.motion_permitted
    lost = ' '.join(f.detail for f in status.faults if f.code == 'HEARTBEAT_LOST')
    assert 'hardware_node' in lost or 'motion_controller' in lost
    stack.wait_event(mark, 'safety_fault', code='HEARTBEAT_LOST')
    stack.assert_acknowledge_refused('HEARTBEAT_LOST')          # the controller is still gone

    # Operator: power-cycle the drive (its WATCHDOG latch), restart the controller.
    stack.emulator.control('power_cycle')
    stack.start('motion_controller')
    stack.wait_controller_ready()
    stack.wait_causes_cleared()
    assert probe.status.state == 'FAULT'
    stack.assert_goal_refused()
    stack.acknowledge_and_resume()
    done = stack.insert_to(0.005)
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message
