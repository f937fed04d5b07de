"""Hardware node on a real DDS graph: lifecycle, state publishing, the motion-inhibit interlock,
configure failures, the serial backend against the firmware emulator, and the node as its own process."""
import itertools
import json
import math
import pathlib
import shutil
import socket
import tempfile
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.srv import GetState
from rclpy.lifecycle import TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Header

from igt_robot import testing
from igt_robot.hardware import shared as shared_hardware
from igt_robot.hardware.interface import HardwareError
from igt_robot.nodes import qos
from igt_robot.nodes.hardware_node import HardwareNode
from igt_robot_msgs.msg import RobotState, SafetyFault, ScannerState

REPO = pathlib.Path(__file__).resolve().parents[3]
JOINTS = ['stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion']
SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


def make_node(graph, **params):
    """A HardwareNode in the test graph, not autostarted; ``params`` as ROS overrides."""
    # scanner_timeout 0.5 s (production 0.28 s): a loaded 2-core test host must not trip it by jitter;
    # the staleness tests only wait a little longer. The probe node plays the scanner and the supervisor.
    params = {'autostart': False, 'diagnostics_rate': 10.0, 'scanner_period': 0.2, 'scanner_timeout': 0.5,
              'scanner_source': '/probe', 'supervisor_node': '/probe', **params}
    args = ['--ros-args']
    for key, value in params.items():
        text = ('true' if value else 'false') if isinstance(value, bool) else str(value)
        args += ['-p', f'{key}:={text}']
    return graph.add(HardwareNode(context=graph.context, cli_args=args))


class Probe:
    """Subscribes to everything the hardware node publishes and feeds it the interlock inputs."""

    def __init__(self, graph, name='probe'):
        self.node = graph.create_node(name)
        self.joint_states, self.robot_states, self.diagnostics, self.faults, self.heartbeats = [], [], [], [], []
        n = self.node
        n.create_subscription(JointState, '/joint_states', self.joint_states.append, 10)
        n.create_subscription(RobotState, '/robot/state', self.robot_states.append, qos.STATE_STREAM)
        n.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        n.create_subscription(SafetyFault, '/safety/faults', self.faults.append, qos.COMMANDS)
        n.create_subscription(Header, '/heartbeat', self.heartbeats.append, qos.COMMANDS)
        self.scanner_pub = n.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)
        self.permission_pub = n.create_publisher(Bool, '/safety/motion_permitted', qos.SAFETY_LATCHED)
        self.phase = None                  # None: the simulated scanner is silent
        self.counter = 0
        self.freeze_counter = False
        self.permission = None             # None: the simulated supervisor publishes nothing
        n.create_timer(0.02, self._feed_scanner)   # a 50 Hz scanner heartbeat
        n.create_timer(0.1, self._republish_permission)   # the supervisor republishes at 10 Hz

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.name.startswith('hardware_node'):
                self.diagnostics.append(status)

    def _feed_scanner(self):
        if self.phase is None:
            return
        if not self.freeze_counter:
            self.counter += 1
        msg = ScannerState(phase=self.phase, source='simulated', heartbeat=self.counter)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.scanner_pub.publish(msg)

    def send_scanner(self, phase):
        """Publish one message with ``phase`` now and keep the heartbeat going with it."""
        self.phase = phase
        self._feed_scanner()

    def _republish_permission(self):
        if self.permission is not None:
            self.permission_pub.publish(Bool(data=self.permission))

    def permit(self, value: bool):
        """Publish the permission now and keep republishing it (as the supervisor does)."""
        self.permission = value
        self._republish_permission()

    def latest_diagnostics(self):
        return self.diagnostics[-1] if self.diagnostics else None


def diag_values(status):
    return {kv.key: kv.value for kv in status.values}


def hw_inhibited(node) -> bool:
    """The inhibit as the hardware itself reports it (a fresh read through the shared handle)."""
    return node.shared.read().motion_inhibited


def wait_inhibit(node, expected: bool, what: str, timeout=10.0):
    testing.wait_for(lambda: hw_inhibited(node) is expected, timeout, what)


@pytest.fixture
def probe(graph):
    return Probe(graph)


@pytest.fixture
def active_node(graph, probe):
    node = make_node(graph)
    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.trigger_activate() == SUCCESS, node.last_failure
    yield node
    shared_hardware.unregister('hardware_node')


def release_interlock(node, probe):
    probe.send_scanner(ScannerState.PHASE_IDLE)
    probe.permit(True)
    wait_inhibit(node, False, 'the inhibit to be released (IDLE scanner and permission)')


def move_to(node, probe, target, attempts=3):
    """Command ``target`` and wait for the published state to arrive there.

    A staleness inhibit in between (this in-process graph's own 50 Hz scanner heartbeat starved on a
    loaded 2-core host) stops the move, as it must; the command is then sent again once the inhibit is
    released, as the motion controller's next goal would. The arrival itself is what is checked.
    """
    def arrived():
        return (probe.robot_states and not probe.robot_states[-1].moving
                and np.allclose(probe.robot_states[-1].position, target, atol=2e-5))
    for attempt in range(attempts):
        wait_inhibit(node, False, 'the inhibit to be released before the move')
        node.shared.write(target)
        try:
            testing.wait_for(lambda: arrived() or hw_inhibited(node), 30, 'the robot to arrive at the target')
        except testing.ConditionTimeout:
            break
        if arrived():
            return
    testing.wait_for(arrived, 1.0, f'the robot to arrive at the target ({attempts} attempts)')


# --------------------------------------------------------------------------- lifecycle (MuJoCo)

def test_lifecycle_configure_activate_deactivate_cleanup(graph):
    node = make_node(graph)
    assert node.lifecycle_state() == 'unconfigured'
    assert shared_hardware.lookup('hardware_node') is None

    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.lifecycle_state() == 'inactive'
    shared = shared_hardware.lookup('hardware_node')
    assert shared is node.shared and shared is not None
    state = shared.read()
    assert state.motion_inhibited and not state.enabled           # safe default right after configure
    assert state.firmware_version.startswith('mujoco')

    assert node.trigger_activate() == SUCCESS, node.last_failure
    state = shared.read()
    assert state.enabled
    assert state.motion_inhibited                                  # no scanner / permission seen yet
    assert 'no scanner state received' in node.describe_state()

    # The lifecycle services answer over DDS too (as a lifecycle manager would ask).
    client = graph.create_node('lifecycle_client').create_client(GetState, '/hardware_node/get_state')
    assert client.wait_for_service(timeout_sec=10.0)
    assert client.call(GetState.Request(), timeout_sec=10.0).current_state.label == 'active'

    assert node.trigger_deactivate() == SUCCESS
    state = shared.read()
    assert not state.enabled and state.motion_inhibited
    assert node.lifecycle_state() == 'inactive'

    assert node.trigger_cleanup() == SUCCESS
    assert node.lifecycle_state() == 'unconfigured'
    assert shared_hardware.lookup('hardware_node') is None
    assert node.shared is None
    with pytest.raises(HardwareError, match='retired'):
        shared.read()                                              # a stale handle fails loudly

    # Configure again after cleanup: a new handle, registered again.
    assert node.trigger_configure() == SUCCESS
    assert shared_hardware.lookup('hardware_node') is not shared
    assert node.trigger_cleanup() == SUCCESS


def test_config_file_section_is_what_the_node_declares(graph):
    node = graph.add(HardwareNode(context=graph.context,
                                  cli_args=['--ros-args', '--params-file', str(REPO / 'config' / 'robot.yaml')]))
    assert node.get_parameter('backend').value == 'mujoco'
    assert node.get_parameter('publish_rate').value == 25.0
    assert node.get_parameter('scanner_timeout').value == 0.28
    assert node.get_parameter('interlock_rate').value >= 100.0
    assert node.lifecycle_state() == 'unconfigured'               # constructing does not autostart


def test_publishes_joint_states_and_robot_state_with_the_needle_tip(active_node, probe):
    node = active_node
    testing.wait_for(lambda: probe.joint_states and probe.robot_states and probe.robot_states[-1].enabled, 10,
                     '/joint_states and /robot/state after activation')
    js = probe.joint_states[-1]
    assert list(js.name) == JOINTS and len(js.position) == 5 and len(js.velocity) == 5
    rs = probe.robot_states[-1]
    assert list(rs.joint_names) == JOINTS and rs.backend == 'mujoco' and rs.header.frame_id == 'base_link'
    assert rs.motion_inhibited

    # Move (as the motion controller would, through the shared handle) and check the published pose.
    release_interlock(node, probe)
    target = np.array([0.004, -0.003, 0.15, -0.1, 0.002])
    move_to(node, probe, target)
    rs = probe.robot_states[-1]
    x, y, pitch, yaw, insertion = rs.position
    direction = np.array([-math.sin(yaw), math.cos(yaw) * math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    expected_tip = np.array([x, y, 0.0]) + insertion * direction          # docs/contracts.md
    tip = rs.needle_tip.position
    assert np.allclose([tip.x, tip.y, tip.z], expected_tip, atol=1e-9)
    q = rs.needle_tip.orientation
    w, qx, qy, qz = q.w, q.x, q.y, q.z
    z_axis = np.array([2 * (qx * qz + w * qy), 2 * (qy * qz - w * qx), 1 - 2 * (qx * qx + qy * qy)])
    assert np.allclose(z_axis, direction, atol=1e-9)                       # tip z axis = needle direction
    assert rs.insertion_depth == pytest.approx(insertion)


class CachedReadings:
    """Stands in for the shared hardware handle: a cached reading of a given age, and a counted own read."""

    def __init__(self, age_s):
        self.last_state = 'cached state'
        self.last_read_time = time.monotonic() - age_s
        self.reads = 0

    def read(self):
        self.reads += 1
        self.last_read_time = time.monotonic()
        return 'own state'


def test_the_published_state_comes_from_the_control_loop_cache_only_while_it_is_fresh(graph):
    """The decision itself, free of thread timing: fresher than two publish periods and newer than the node's own
    last read -> the cache; otherwise the node reads the hardware."""
    node = make_node(graph, publish_rate=20.0)       # two periods: 0.1 s
    fresh = CachedReadings(age_s=0.01)
    state, _ = node._current_state(fresh)
    assert (state, fresh.reads, node.own_reads) == ('cached state', 0, 0)
    stale = CachedReadings(age_s=0.5)
    state, _ = node._current_state(stale)
    assert (state, stale.reads, node.own_reads) == ('own state', 1, 1)
    # the cache now holds the node's own read: not a control-loop reading, so the next publication reads again
    state, _ = node._current_state(stale)
    assert (state, stale.reads, node.own_reads) == ('own state', 2, 2)


def test_publishes_from_the_control_loop_cache_when_a_loop_runs(graph, probe):
    """With a real loop reading the same handle, some publications use its readings (how many depends on how the
    machine schedules the loop thread: the exact rule is tested above), and the node reads itself once it stops."""
    import threading
    node = make_node(graph, publish_rate=20.0)
    assert node.trigger_configure() == SUCCESS
    testing.wait_for(lambda: node.own_reads >= 3, 10, 'the node to read the hardware itself')
    stop = threading.Event()

    def control_loop():           # stands in for the motion controller's loop (same process, same handle)
        while not stop.is_set():
            node.shared.read()
            stop.wait(0.004)      # loop period

    loop = threading.Thread(target=control_loop)
    loop.start()
    try:
        testing.wait_for(lambda: node.shared.stats['reads'] > node.own_reads + 50, 10, 'the loop to run')
        own_before, published_before = node.own_reads, len(probe.joint_states)
        testing.wait_for(lambda: len(probe.joint_states) >= published_before + 20, 20, '20 more joint states')
        own_during, published_during = node.own_reads - own_before, len(probe.joint_states) - published_before
    finally:
        stop.set()
        loop.join(5)
    assert own_during < published_during, f'{own_during} own reads for {published_during} publications'
    testing.wait_for(lambda: node.own_reads > own_before + own_during + 3, 10,
                     'the node to read itself again once the loop stopped')
    assert node.trigger_cleanup() == SUCCESS


def test_configure_shortens_the_interpreter_switch_interval(graph):
    """The node's threads and a simulated controller's catch-up stepping wait for the interpreter lock many
    times a second, the interlock thread first: hosted in a process left at CPython's 5 ms default (or at the
    0.5 ms of the other entry points), a configured node shortens it to the interlock's interval."""
    import sys
    from igt_robot.nodes import spinning
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        node = make_node(graph)
        assert node.trigger_configure() == SUCCESS
        assert sys.getswitchinterval() == pytest.approx(spinning.INTERLOCK_GIL_SWITCH_INTERVAL_S, abs=2e-6)
        assert node.trigger_cleanup() == SUCCESS
    finally:
        sys.setswitchinterval(min(before, sys.getswitchinterval()))


def test_heartbeat_only_while_active(graph, probe):
    node = make_node(graph)
    assert node.trigger_configure() == SUCCESS
    testing.wait_for(lambda: len(probe.joint_states) >= 5, 10, 'joint states while inactive')
    assert probe.heartbeats == []                     # configured but not active: no heartbeat
    assert node.trigger_activate() == SUCCESS
    testing.wait_for(lambda: probe.heartbeats, 10, 'a heartbeat')
    assert probe.heartbeats[-1].frame_id == 'hardware_node'
    assert node.trigger_deactivate() == SUCCESS
    assert node.trigger_cleanup() == SUCCESS


# --------------------------------------------------------------------------- interlock

def test_inhibit_released_only_when_permission_and_fresh_idle_scanner_are_both_seen(active_node, probe):
    node = active_node
    assert hw_inhibited(node)
    probe.permit(True)                                   # permission alone is not enough
    testing.wait_for(lambda: node._permission is True, 10, 'the permission to arrive')
    assert hw_inhibited(node) and node.interlock_reason == 'no scanner state received from /probe'
    probe.permit(False)
    probe.send_scanner(ScannerState.PHASE_IDLE)          # an idle scanner alone is not enough
    testing.wait_for(lambda: 'withholds' in node.interlock_reason, 10, 'idle scanner without permission')
    assert hw_inhibited(node)
    probe.permit(True)                                   # both: released
    wait_inhibit(node, False, 'the release with both inputs OK')
    assert node.interlock_changes[-1][1:] == (False, 'motion permitted and scanner idle', 'permission')


def test_a_latched_permission_received_before_configure_still_counts(graph, probe):
    # A latched topic's last value is current: a permission that arrived while the node was still
    # unconfigured (a supervisor that publishes it once) must not be forgotten by configure.
    node = make_node(graph)
    probe.permission_pub.publish(Bool(data=True))        # once, never repeated
    testing.wait_for(lambda: node._permission is True, 10, 'the permission before configure')
    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.trigger_activate() == SUCCESS, node.last_failure
    probe.send_scanner(ScannerState.PHASE_IDLE)
    wait_inhibit(node, False, 'the release with the permission from before configure')


@pytest.mark.parametrize('phase, name', [(ScannerState.PHASE_ACQUIRING, 'ACQUIRING'),
                                         (ScannerState.PHASE_PREPARING, 'PREPARING'),
                                         (ScannerState.PHASE_UNKNOWN, 'UNKNOWN'),
                                         (77, 'UNKNOWN')])   # an undefined phase number is UNKNOWN (fail-safe)
def test_imaging_phase_asserts_the_inhibit_in_the_scanner_callback(active_node, probe, phase, name):
    node = active_node
    release_interlock(node, probe)
    probe.send_scanner(phase)
    wait_inhibit(node, True, f'the inhibit on scanner {name}')
    change = node.interlock_changes[-1]
    assert change[1:] == (True, f'scanner {name}', 'scanner')     # commanded from the callback itself
    probe.send_scanner(ScannerState.PHASE_IDLE)
    wait_inhibit(node, False, 'the release when the scanner is idle again')


def test_stale_scanner_asserts_the_inhibit_from_the_timer(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    probe.permission = None                               # nothing else wakes the node: only its timer can
    probe.phase = None                                    # the scanner falls silent
    wait_inhibit(node, True, 'the inhibit on a stale scanner state')
    change = node.interlock_changes[-1]
    assert change[1] is True and change[2].startswith('scanner state stale') and change[3] == 'staleness timer'
    probe.permit(True)
    probe.send_scanner(ScannerState.PHASE_IDLE)
    wait_inhibit(node, False, 'the release when fresh states return')


def test_the_staleness_check_runs_while_the_shared_executor_does_not_spin_the_node(active_node, probe, graph):
    """The check is a thread of its own on the steady clock: a busy or stalled executor cannot delay it."""
    node = active_node
    release_interlock(node, probe)
    graph.executor.remove_node(node)                      # nobody spins the node's timers and callbacks now
    try:
        probe.permission = None
        probe.phase = None
        wait_inhibit(node, True, 'the inhibit on a stale scanner state, from the check thread')
        assert node.interlock_changes[-1][3] == 'staleness timer'
    finally:
        graph.executor.add_node(node)


def test_the_watchdog_feed_runs_while_no_executor_spins_the_node(active_node, graph):
    """The controller watchdog feed is a thread of its own: not a timer in the interlock executor, where a
    scanner message arriving during a feed waited for its serial transaction (docs/safety.md)."""
    node = active_node
    feeds = []
    real_heartbeat = node.shared.heartbeat
    node.shared.heartbeat = lambda: (feeds.append(time.monotonic()), real_heartbeat())
    graph.executor.remove_node(node)
    node._scanner_subscription.stop()                     # nor is the scanner subscription served
    try:
        testing.wait_for(lambda: len(feeds) >= 5, 10, 'five watchdog feeds with no executor spinning')
    finally:
        graph.executor.add_node(node)
    assert list(node._fast_node.timers) == []             # the interlock node has only the scanner


def test_scanner_samples_reach_the_relay_after_the_drive_was_commanded(active_node, probe):
    """The motion controller's interlock gets the hardware node's samples in-process (safety.scanner_relay),
    after the hardware node has acted on them: the relay never delays the inhibit."""
    node = active_node
    release_interlock(node, probe)
    seen = []

    def listener(sample):
        seen.append((sample.phase.name, sample.node, hw_inhibited(node)))
    node.scanner_relay.subscribe(listener)
    try:
        probe.send_scanner(ScannerState.PHASE_ACQUIRING)
        testing.wait_for(lambda: any(phase == 'ACQUIRING' for phase, _, _ in seen), 10, 'the relayed ACQUIRING')
    finally:
        node.scanner_relay.unsubscribe(listener)
    phase, source, inhibited_then = next(entry for entry in seen if entry[0] == 'ACQUIRING')
    assert source == '/probe' and inhibited_then


def test_frozen_scanner_heartbeat_counts_as_stale(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    probe.freeze_counter = True                           # messages keep coming, the counter does not advance
    wait_inhibit(node, True, 'the inhibit on a frozen scanner heartbeat')
    assert node.interlock_changes[-1][2].startswith('scanner state stale')
    probe.freeze_counter = False
    wait_inhibit(node, False, 'the release when the counter advances again')


def test_late_scanner_message_counts_as_stale(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    probe.phase = None
    wait_inhibit(node, True, 'the inhibit after the scanner fell silent')
    # An IDLE message stamped long ago (delayed in transit) does not make the state fresh.
    old = ScannerState(phase=ScannerState.PHASE_IDLE, heartbeat=probe.counter + 100)
    stamp = probe.node.get_clock().now().nanoseconds - 2_000_000_000
    old.header.stamp.sec, old.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    probe.scanner_pub.publish(old)
    testing.wait_for(lambda: node._scanner_heartbeat == old.heartbeat, 10, 'the late message to arrive')
    assert hw_inhibited(node) and node.interlock_reason.startswith('scanner state stale')


def test_permission_false_asserts_the_inhibit_in_the_callback(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    probe.permit(False)
    wait_inhibit(node, True, 'the inhibit when permission is withdrawn')
    assert node.interlock_changes[-1][1:] == (True, 'safety supervisor withholds motion permission', 'permission')
    probe.permit(True)
    wait_inhibit(node, False, 'the release when permission returns')


def test_supervisor_lost_asserts_the_inhibit(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    lost = 'safety supervisor lost (liveliness)'
    # The supervisor republishes at 10 Hz; on Fast DDS a silent writer loses liveliness after the lease (1 s).
    # The reason is polled from the change log, not the instantaneous reason: under load a late scanner
    # message may make the state stale for a moment, and the reason shown then is the staleness.
    # The change log records only inhibit transitions (a moment of staleness may have asserted the inhibit
    # already); the current reason, re-decided every 10 ms, settles on the lost supervisor.

    def lost_since(start):
        return node.interlock_reason == lost or any(c[0] >= start and c[1] and c[2] == lost
                                                    for c in list(node.interlock_changes))
    start = time.monotonic()
    probe.permission = None                               # the supervisor hangs: no more publications
    testing.wait_for(lambda: lost_since(start), 10, 'liveliness lost after the lease')
    assert hw_inhibited(node)
    probe.permit(True)
    wait_inhibit(node, False, 'the release when the supervisor is back')


def test_supervisor_publisher_gone_asserts_the_inhibit(graph):
    """The supervisor's process ends: its publisher leaves the graph. The stand-in lives in a graph of its own,
    closed as a process ends (its spinning stops before its publisher goes; destroying a publisher under a
    spinning executor would end that executor instead). No probe here: its own permission publisher would be
    a foreign one for this node."""
    node = make_node(graph, scanner_source='/scanner_feed', supervisor_node='/supervisor_stand_in')
    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.trigger_activate() == SUCCESS, node.last_failure
    feed = graph.create_node('scanner_feed')
    scanner_pub = feed.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)
    beats = itertools.count(1)

    def scanner_idle():
        msg = ScannerState(phase=ScannerState.PHASE_IDLE, source='simulated', heartbeat=next(beats))
        msg.header.stamp = feed.get_clock().now().to_msg()
        scanner_pub.publish(msg)
    feed.create_timer(0.02, scanner_idle)                 # a 50 Hz scanner heartbeat
    stand_in_graph = testing.SpinningGraph()
    try:
        stand_in = stand_in_graph.create_node('supervisor_stand_in')
        permission_pub = stand_in.create_publisher(Bool, '/safety/motion_permitted', qos.SAFETY_LATCHED)
        stand_in.create_timer(0.1, lambda: permission_pub.publish(Bool(data=True)))   # republished at 10 Hz
        wait_inhibit(node, False, 'the release with the stand-in permitting')
        lost = 'safety supervisor lost (liveliness)'
        start = time.monotonic()
        stand_in_graph.close()                            # the supervisor's process ends
        stand_in_graph = None
        testing.wait_for(lambda: node.interlock_reason == lost or any(
            c[0] >= start and c[1] and c[2] == lost for c in list(node.interlock_changes)),
            10, 'liveliness lost with the publisher')
        assert hw_inhibited(node)
    finally:
        if stand_in_graph is not None:
            stand_in_graph.close()
        shared_hardware.unregister('hardware_node')


def test_deactivate_asserts_the_inhibit_and_it_stays_until_reactivated_with_inputs_ok(active_node, probe):
    node = active_node
    release_interlock(node, probe)
    assert node.trigger_deactivate() == SUCCESS
    assert hw_inhibited(node) and not node.shared.read().enabled
    assert node.interlock_reason == 'hardware node not active'
    assert node.trigger_activate() == SUCCESS
    wait_inhibit(node, False, 'the release after re-activation (inputs still OK)')


# --------------------------------------------------------------------------- configure failures

def test_unknown_backend_fails_configure_with_the_reason(graph, probe):
    node = make_node(graph, backend='stepper')
    assert node.trigger_configure() == FAILURE
    assert node.lifecycle_state() == 'unconfigured'
    assert "unknown hardware backend 'stepper'" in node.last_failure
    assert shared_hardware.lookup('hardware_node') is None
    testing.wait_for(lambda: probe.latest_diagnostics() is not None
                     and 'stepper' in probe.latest_diagnostics().message, 10, 'the failure on /diagnostics')
    assert probe.latest_diagnostics().level == DiagnosticStatus.ERROR
    assert 'stepper' in node.describe_state()


def test_missing_serial_port_fails_configure_with_the_reason(graph):
    node = make_node(graph, backend='serial', serial_port='/dev/igt_no_such_port')
    assert node.trigger_configure() == FAILURE
    assert node.lifecycle_state() == 'unconfigured'
    assert '/dev/igt_no_such_port' in node.last_failure and 'cannot open serial port' in node.last_failure
    assert shared_hardware.lookup('hardware_node') is None
    assert node.trigger_activate() != SUCCESS                  # nothing to activate
    assert node.lifecycle_state() == 'unconfigured'


# --------------------------------------------------------------------------- serial backend + emulator

class Emulator:
    """The firmware emulator as a process (processes fixture) and its control socket."""

    def __init__(self, processes, *args):
        self._dir = tempfile.mkdtemp(prefix='igtemu-')     # UNIX socket paths must stay short
        self.control_path = str(pathlib.Path(self._dir) / 'ctl')
        self.proc = processes('igt_robot.hardware.emulator', '--control', self.control_path, *args)
        line = testing.wait_for(lambda: next((ln for ln in self.proc.output().splitlines() if ln.startswith('PTY ')),
                                             None) or (not self.proc.alive() and 'exited'), 20, 'the PTY line')
        assert line != 'exited', self.proc.output()
        self.pty = line.split(' ', 1)[1].strip()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(5.0)
        testing.wait_for(lambda: self._try_connect(), 10, 'the control socket')
        self._buf = b''

    def _try_connect(self):
        try:
            self._sock.connect(self.control_path)
            return True
        except OSError:
            return False

    def control(self, command: str) -> str:
        self._sock.sendall(command.encode() + b'\n')
        while b'\n' not in self._buf:
            chunk = self._sock.recv(65536)
            assert chunk, 'emulator closed its control channel'
            self._buf += chunk
        line, self._buf = self._buf.split(b'\n', 1)
        reply = line.decode()
        assert reply.startswith('ok'), reply
        return reply[3:]

    def state(self) -> dict:
        return json.loads(self.control('state'))

    def close(self):
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def emulator(processes):
    emu = Emulator(processes, '--watchdog-ms', '500')   # generous: the node, not the watchdog, is under test
    yield emu
    emu.close()


def test_serial_backend_against_the_emulator_counts_corrupted_frames(graph, probe, emulator):
    node = make_node(graph, backend='serial', serial_port=emulator.pty)
    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.trigger_activate() == SUCCESS, node.last_failure
    assert emulator.state()['enabled'] is True
    testing.wait_for(lambda: probe.robot_states and probe.robot_states[-1].backend == 'serial', 10,
                     '/robot/state from the serial backend')
    assert list(probe.joint_states[-1].name) == JOINTS
    release_interlock(node, probe)
    assert emulator.state()['inhibited'] is False

    def counters():
        status = probe.latest_diagnostics()
        values = diag_values(status) if status is not None else {}
        return values if 'crc_errors' in values else None

    before = testing.wait_for(counters, 10, 'link counters on /diagnostics')
    assert before['firmware_version'] == '2.0.0' and before['backend'] == 'serial'
    # Fewer damaged replies in a row than the driver's retries: retransmitted, the link survives.
    emulator.control('corrupt_next 2')
    after = testing.wait_for(lambda: (c := counters()) and int(c['crc_errors']) >= int(before['crc_errors']) + 2
                             and c, 10, 'crc_errors to increase')
    assert int(after['retries']) >= int(before['retries']) + 2
    assert not any(f.code == 'HARDWARE_LINK' for f in probe.faults)
    n = len(probe.robot_states)
    testing.wait_for(lambda: len(probe.robot_states) > n + 5, 10, 'states to keep flowing')
    # More than the retries can absorb: a HARDWARE_LINK fault, cleared once the controller answers again.
    emulator.control('corrupt_next 9')
    raised = testing.wait_for(lambda: next((f for f in probe.faults if f.code == 'HARDWARE_LINK'), None), 10,
                              'a HARDWARE_LINK fault')
    assert raised.cause_active and 'no valid reply' in raised.detail
    testing.wait_for(lambda: any(f.code == 'HARDWARE_LINK' and not f.cause_active for f in probe.faults), 10,
                     'the HARDWARE_LINK cause to clear')
    testing.wait_for(lambda: probe.latest_diagnostics().level == DiagnosticStatus.OK, 10, 'diagnostics OK again')
    assert node.trigger_deactivate() == SUCCESS
    assert emulator.state()['inhibited'] is True
    assert node.trigger_cleanup() == SUCCESS


def test_firmware_major_mismatch_fails_configure(graph, processes):
    emu = Emulator(processes, '--firmware-version', '3.0.0')
    try:
        node = make_node(graph, backend='serial', serial_port=emu.pty)
        assert node.trigger_configure() == FAILURE
        assert node.lifecycle_state() == 'unconfigured'
        assert 'firmware 3.0.0' in node.last_failure and 'not supported' in node.last_failure
        assert shared_hardware.lookup('hardware_node') is None
    finally:
        emu.close()


def test_encoder_resolution_mismatch_fails_configure(graph, emulator):
    node = make_node(graph, backend='serial', serial_port=emulator.pty, encoder_counts_per_m=2.0e6)
    assert node.trigger_configure() == FAILURE
    assert 'encoder resolution mismatch' in node.last_failure


def test_unplug_mid_motion_reports_a_fault_and_stays_safe(graph, probe, emulator):
    node = make_node(graph, backend='serial', serial_port=emulator.pty)
    assert node.trigger_configure() == SUCCESS, node.last_failure
    assert node.trigger_activate() == SUCCESS, node.last_failure
    release_interlock(node, probe)
    node.shared.write([0.03, 0.0, 0.0, 0.0, 0.0])              # a 3 s move at 10 mm/s
    testing.wait_for(lambda: probe.robot_states and probe.robot_states[-1].moving, 10, 'the motion to start')
    emulator.control('unplug')

    fault = testing.wait_for(lambda: next((f for f in probe.faults if f.code == 'HARDWARE_LINK'), None), 10,
                             'a HARDWARE_LINK fault on /safety/faults')
    assert fault.latched and fault.cause_active and 'port lost' in fault.detail
    testing.wait_for(lambda: probe.latest_diagnostics() is not None
                     and probe.latest_diagnostics().level == DiagnosticStatus.ERROR, 10, 'diagnostics ERROR')
    assert 'link failure' in probe.latest_diagnostics().message
    testing.wait_for(lambda: probe.robot_states and 'HARDWARE_LINK' in probe.robot_states[-1].faults, 10,
                     'the fault in /robot/state')
    assert not probe.robot_states[-1].enabled and not probe.robot_states[-1].moving
    # Safe state: the driver refuses every command until an explicit reconnect (cleanup + configure).
    with pytest.raises(HardwareError, match='safe state'):
        node.shared.write([0.0] * 5)
    assert 'LINK FAILURE' in node.describe_state()
    # The firmware's watchdog stops the axes on its own side (the host is gone).
    testing.wait_for(lambda: not emulator.state()['enabled'], 10, 'the emulator watchdog to stop the axes')
    assert node.trigger_deactivate() == SUCCESS                # best effort, errors logged
    assert node.trigger_cleanup() == SUCCESS
    assert shared_hardware.lookup('hardware_node') is None


# --------------------------------------------------------------------------- own process

def test_hardware_node_as_its_own_process_publishes_joint_states(graph, processes):
    proc = processes('igt_robot.nodes.hardware_node', '--ros-args', '-p', 'backend:=mujoco', name='hardware_node')
    node = graph.create_node('cross_process_probe')
    got = []
    node.create_subscription(JointState, '/joint_states', got.append, 10)
    testing.wait_for(lambda: len(got) >= 3 or not proc.alive(), 30, '/joint_states from the hardware_node process')
    assert proc.alive(), proc.output()
    assert list(got[-1].name) == JOINTS
    code = proc.stop()
    log = proc.log_path.read_text(errors='replace')
    assert code == 0, log
    assert 'backend closed' in log                          # stopped and closed on SIGINT


# --------------------------------------------------------------------------- authority (issue 11)

def _spoofer(graph, name='spoofer'):
    node = graph.create_node(name)
    return node, node.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE), \
        node.create_publisher(Bool, '/safety/motion_permitted', qos.SAFETY_LATCHED)


def _foreign_faults(probe, node_name):
    return [f for f in probe.faults if f.code.startswith('FOREIGN_') and node_name in f.detail]


def test_spoofed_scanner_idle_during_acquisition_keeps_the_inhibit_and_names_the_node(graph, active_node, probe):
    node = active_node
    release_interlock(node, probe)
    probe.send_scanner(ScannerState.PHASE_ACQUIRING)
    wait_inhibit(node, True, 'the inhibit on ACQUIRING')
    start = time.monotonic()
    _, scanner_pub, _ = _spoofer(graph)
    for counter in range(1, 40):                          # a foreign node insists the scanner is idle
        scanner_pub.publish(ScannerState(phase=ScannerState.PHASE_IDLE, heartbeat=10_000 + counter))
        time.sleep(0.02)
        assert hw_inhibited(node), 'a foreign IDLE released the inhibit during the acquisition'
    assert not any(c[0] >= start and not c[1] for c in list(node.interlock_changes))
    testing.wait_for(lambda: _foreign_faults(probe, '/spoofer'), 10, 'the foreign publisher reported')
    fault = _foreign_faults(probe, '/spoofer')[0]
    assert fault.code == 'FOREIGN_SCANNER_PUBLISHER' and fault.cause_active
    # Even when the real scanner is idle again, nothing moves while the foreign publisher is there.
    probe.send_scanner(ScannerState.PHASE_IDLE)
    time.sleep(0.3)
    assert hw_inhibited(node) and '/spoofer' in node.interlock_reason


def test_spoofed_motion_permission_is_ignored_and_reported(graph, active_node, probe):
    node = active_node
    probe.send_scanner(ScannerState.PHASE_IDLE)
    probe.permit(False)                                   # the real supervisor withholds permission
    testing.wait_for(lambda: 'withholds' in node.interlock_reason, 10, 'the supervisor withholding')
    _, _, permission_pub = _spoofer(graph, 'rogue_permitter')
    for _ in range(30):
        permission_pub.publish(Bool(data=True))
        time.sleep(0.02)
        assert hw_inhibited(node), 'a foreign permission released the inhibit'
    testing.wait_for(lambda: _foreign_faults(probe, '/rogue_permitter'), 10, 'the foreign permission reported')
    assert _foreign_faults(probe, '/rogue_permitter')[0].code == 'FOREIGN_PERMISSION_PUBLISHER'
    assert node.interlock.ignored_permissions > 0


def test_operator_acknowledge_resets_drive_faults(graph, active_node, probe, tmp_path):
    from igt_robot.safety import operator_session
    from igt_robot_msgs.srv import AcknowledgeFaults
    session = tmp_path / 'session'
    token = operator_session.issue_session(session)
    node = active_node
    # The node reads the session file per request: point it at ours (its parameter is read-only by design).
    node.p['operator_session_file'] = str(session)
    node.shared.emergency_stop()                          # latched in the drive
    testing.wait_for(lambda: any(f.code == 'HARDWARE_ESTOP' and f.cause_active for f in probe.faults), 10,
                     'the latched e-stop reported')
    client = probe.node.create_client(AcknowledgeFaults, '/hardware_node/reset_faults')
    assert client.wait_for_service(timeout_sec=10)

    def call(tok):
        future = client.call_async(AcknowledgeFaults.Request(operator_id='op', operator_token=tok))
        return testing.wait_for(lambda: future.done() and future.result(), 10, 'the reset reply')
    refused = call('guessed')
    assert not refused.success and 'does not match' in refused.message
    assert node.shared.read().estopped
    reply = call(token)
    assert reply.success, reply.message
    state = node.shared.read()
    assert not state.estopped and not state.faults and state.enabled
    testing.wait_for(lambda: any(f.code == 'HARDWARE_ESTOP' and not f.cause_active for f in probe.faults), 10,
                     'the e-stop cause reported gone')


def test_publishers_and_subscriptions_carry_no_default_qos_event_handlers(graph):
    """rclpy's default handlers (a log line on incompatible QoS or type) are waitables its executor walks in
    Python at every wake-up (nodes/common.LeanQosEvents); handlers the node asks for itself stay."""
    node = make_node(graph)
    assert node.robot_state_pub.event_handlers == []
    assert all(sub.event_handlers == [] for sub in node._fast_node.subscriptions)
    permission = next(sub for sub in node.subscriptions if sub.topic_name == '/safety/motion_permitted')
    assert permission.event_handlers                      # the supervisor's liveliness, asked for explicitly
