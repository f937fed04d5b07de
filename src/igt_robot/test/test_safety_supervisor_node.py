"""safety_supervisor on a real DDS graph: the interlock, latches, acknowledge/resume and publication.

A probe node plays every input the supervisor needs (scanner state, heartbeats of the
required nodes, robot state, joint states) and can silence or change each one. Timeouts
in these tests are generous (1 s) so a loaded machine does not trip them by accident;
the tests that need a timeout stop the input altogether.
"""
import pathlib
import tempfile
import threading

import pytest
import rclpy
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Header

from igt_robot import testing
from igt_robot.nodes import common, qos
from igt_robot.nodes.safety_supervisor_node import SafetySupervisorNode
from igt_robot.safety import operator_session
from igt_robot_msgs.msg import ProcedureEvent, RobotState, SafetyStatus, ScannerState
from igt_robot_msgs.srv import AcknowledgeFaults, ResumeMotion, SetEstop, SetScannerState

JOINTS = ['stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion']
REQUIRED = ['scanner_interface', 'hardware_node', 'motion_controller']
SESSION = pathlib.Path(tempfile.mkdtemp(prefix='igt_session_')) / 'operator_session'
# The probe node plays the scanner source; the supervisor issues the operator secret into SESSION.
TEST_PARAMS = ['heartbeat_timeout_s:=1.0', 'scanner_timeout_s:=1.0', 'scanner_source:=/safety_probe',
               f'operator_session_file:={SESSION}']


def token():
    return operator_session.read_session(SESSION)


class Inputs:
    """Publishes the supervisor's inputs at 50 Hz from a timer; collects its outputs."""

    def __init__(self, graph, name='safety_probe', **node_kwargs):
        self.node = node = graph.create_node(name, **node_kwargs)
        self.lock = threading.Lock()
        self.scanner_phase = ScannerState.PHASE_IDLE
        self.scanner_on = True
        self.beating = {n: True for n in REQUIRED}
        self.q = [0.0] * 5
        self.estopped = False
        self.hw_faults = []
        self.counter = 0
        self.status, self.permitted, self.events = [], [], []
        self._scanner = node.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)
        self._heartbeat = node.create_publisher(Header, '/heartbeat', qos.COMMANDS)
        self._robot = node.create_publisher(RobotState, '/robot/state', qos.STATE_STREAM)
        self._joints = node.create_publisher(JointState, '/joint_states', 10)
        self.faults = common.FaultReporter(node)
        node.create_subscription(SafetyStatus, '/safety/status', self._keep(self.status), qos.SAFETY_LATCHED)
        node.create_subscription(Bool, '/safety/motion_permitted', self._keep(self.permitted), qos.SAFETY_LATCHED)
        node.create_subscription(ProcedureEvent, '/procedure/events', self._keep(self.events), qos.EVENTS)
        self.estop_client = node.create_client(SetEstop, '/safety/estop')
        self.ack_client = node.create_client(AcknowledgeFaults, '/safety/acknowledge')
        self.resume_client = node.create_client(ResumeMotion, '/safety/resume')
        common.create_steady_timer(node, 0.02, self._publish)   # also while a simulated clock stands still

    def _keep(self, store):
        def callback(msg):
            with self.lock:
                store.append(msg)
        return callback

    def _publish(self):
        now = self.node.get_clock().now().to_msg()
        if self.scanner_on:
            self.counter += 1
            msg = ScannerState(phase=self.scanner_phase, source='topic', heartbeat=self.counter,
                               protocol_name='control scan' if self.scanner_phase == ScannerState.PHASE_ACQUIRING
                               else '')
            msg.header.stamp = now
            self._scanner.publish(msg)
        for name, on in self.beating.items():
            if on:
                self._heartbeat.publish(Header(stamp=now, frame_id=name))
        self._robot.publish(RobotState(joint_names=JOINTS, position=list(self.q), estopped=self.estopped,
                                       faults=list(self.hw_faults), backend='test'))
        self._joints.publish(JointState(name=JOINTS, position=list(self.q)))

    # ----------------------------------------------------------------- outputs
    def last_status(self):
        with self.lock:
            return self.status[-1] if self.status else None

    def last_permitted(self):
        with self.lock:
            return self.permitted[-1].data if self.permitted else None

    def wait_state(self, state, what='', timeout=10.0, **fields):
        def match():
            st = self.last_status()
            return st is not None and st.state == state and all(getattr(st, k) == v for k, v in fields.items())
        testing.wait_for(match, timeout, what or f'safety state {state} {fields}')
        return self.last_status()

    def wait_permitted(self, value, what='', timeout=10.0):
        testing.wait_for(lambda: self.last_permitted() is value, timeout,
                         what or f'/safety/motion_permitted = {value}')

    def transitions(self):
        with self.lock:
            return [e for e in self.events if e.kind == 'safety_transition']

    # ---------------------------------------------------------------- services
    def call(self, client, request):
        assert client.wait_for_service(timeout_sec=10.0), client.srv_name
        future = client.call_async(request)
        return testing.wait_for(lambda: future.done() and future.result(), 10, f'{client.srv_name} response')

    def resume(self):
        return self.call(self.resume_client, ResumeMotion.Request(operator_id='tester', operator_token=token()))

    def acknowledge(self, *codes):
        return self.call(self.ack_client, AcknowledgeFaults.Request(operator_id='tester', codes=list(codes),
                                                                    operator_token=token()))

    def estop(self, active):
        return self.call(self.estop_client, SetEstop.Request(active=active, source='test console',
                                                             operator_token=token()))

    def make_ready(self):
        self.wait_state('HOLD', 'HOLD: all inputs seen, awaiting resume', awaiting_resume=True)
        assert self.resume().success
        self.wait_permitted(True)
        return self.wait_state('READY')


def start_supervisor(graph, *params):
    args = ['--ros-args']
    for p in [*TEST_PARAMS, *params]:
        args += ['-p', p]
    return graph.add(SafetySupervisorNode(context=graph.context, cli_args=args))


@pytest.fixture
def rig(graph):
    inputs = Inputs(graph)
    start_supervisor(graph)
    return inputs


def test_waits_in_init_until_every_input_was_seen(graph):
    inputs = Inputs(graph)
    inputs.beating['motion_controller'] = False
    start_supervisor(graph)
    status = inputs.wait_state('INIT')
    testing.wait_for(lambda: 'motion_controller' in inputs.last_status().reason
                     and 'hardware_node' not in inputs.last_status().reason, 10, 'INIT naming only the missing input')
    assert not status.motion_permitted and inputs.last_permitted() is False
    assert not inputs.resume().success
    inputs.beating['motion_controller'] = True
    inputs.make_ready()


def test_scan_halts_motion_and_needs_an_explicit_resume_after_it(rig):
    inputs = rig
    inputs.make_ready()
    inputs.scanner_phase = ScannerState.PHASE_ACQUIRING
    inputs.wait_permitted(False, 'motion withdrawn when the scanner acquires')
    status = inputs.wait_state('SCAN_HOLD')
    assert 'ACQUIRING' in status.reason and "control scan" in status.reason
    assert status.scanner_phase == 'ACQUIRING'
    answer = inputs.resume()
    assert not answer.success and 'SCAN_HOLD' in answer.message

    inputs.scanner_phase = ScannerState.PHASE_IDLE
    status = inputs.wait_state('HOLD', 'HOLD after the scan (no implicit resume)', awaiting_resume=True)
    assert not status.motion_permitted and inputs.last_permitted() is False
    assert 'after scan' in status.reason
    assert inputs.resume().success
    inputs.wait_permitted(True)
    inputs.wait_state('READY')
    # Every transition was recorded with the reason as its description.
    testing.wait_for(lambda: any(e.description.startswith('Motion halted: scanner ACQUIRING')
                                 for e in inputs.transitions()), 10, 'the READY -> SCAN_HOLD event')
    scan_hold = next(e for e in inputs.transitions() if 'ACQUIRING' in e.description)
    values = {kv.key: kv.value for kv in scan_hold.values}
    assert values['from_state'] == 'READY' and values['to_state'] == 'SCAN_HOLD'
    assert scan_hold.source == 'safety_supervisor'


def test_preparing_and_unknown_phases_also_halt(rig):
    inputs = rig
    for phase in (ScannerState.PHASE_PREPARING, ScannerState.PHASE_UNKNOWN, 42):
        inputs.make_ready()
        inputs.scanner_phase = phase
        inputs.wait_permitted(False, f'phase {phase} halts')
        inputs.wait_state('SCAN_HOLD')
        inputs.scanner_phase = ScannerState.PHASE_IDLE


def test_scanner_silence_latches_a_fault_acknowledged_only_once_it_is_back(rig):
    inputs = rig
    inputs.make_ready()
    inputs.scanner_on = False
    inputs.wait_permitted(False, 'motion withdrawn when the scanner falls silent')
    status = inputs.wait_state('FAULT')
    assert status.scanner_phase == 'UNKNOWN'
    fault = next(f for f in status.faults if f.code == 'SCANNER_SILENT')
    assert fault.latched and fault.cause_active
    answer = inputs.acknowledge()
    assert not answer.success and 'SCANNER_SILENT' in answer.message
    assert answer.status.state == 'FAULT'

    inputs.scanner_on = True
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'the cause to clear')
    assert inputs.last_status().state == 'FAULT'          # still latched
    answer = inputs.acknowledge('scanner_silent')
    assert answer.success, answer.message
    inputs.wait_state('HOLD', awaiting_resume=True)
    inputs.make_ready()


def test_estop_latches_until_released_and_reset(rig):
    inputs = rig
    inputs.make_ready()
    assert inputs.estop(True).success
    inputs.wait_permitted(False)
    inputs.wait_state('ESTOP', 'ESTOP while pressed')
    answer = inputs.acknowledge()
    assert not answer.success and 'still pressed' in answer.message
    assert not inputs.resume().success
    release = inputs.estop(False)
    assert release.success and 'acknowledge' in release.message
    status = inputs.wait_state('ESTOP', reason='Motion halted: emergency stop released, reset required')
    assert not status.motion_permitted
    assert inputs.acknowledge().success
    inputs.make_ready()

    # The hardware e-stop (RobotState.estopped) latches the same way.
    inputs.estopped = True
    inputs.wait_permitted(False)
    inputs.wait_state('ESTOP', reason='Motion halted: emergency stop pressed')
    inputs.estopped = False
    inputs.wait_state('ESTOP', reason='Motion halted: emergency stop released, reset required')
    assert inputs.acknowledge().success
    inputs.make_ready()


def test_heartbeat_loss_of_a_required_node(rig):
    inputs = rig
    inputs.make_ready()
    inputs.beating['motion_controller'] = False
    inputs.wait_permitted(False)
    status = inputs.wait_state('FAULT')
    fault = status.faults[0]
    assert fault.code == 'HEARTBEAT_LOST' and 'motion_controller' in fault.detail and fault.cause_active
    assert not inputs.acknowledge().success
    inputs.beating['motion_controller'] = True
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'heartbeats to return')
    assert inputs.acknowledge().success
    inputs.make_ready()


def test_fault_reports_one_off_and_persistent(rig):
    inputs = rig
    inputs.make_ready()
    inputs.faults.report('TRACKING_ERROR', 'guide_pitch 0.9 deg off its setpoint')
    inputs.wait_permitted(False)
    status = inputs.wait_state('FAULT')
    assert status.reason.startswith('Fault TRACKING_ERROR: guide_pitch 0.9 deg off')
    assert inputs.acknowledge().success            # a one-off event: acknowledge at once
    inputs.make_ready()

    inputs.faults.report('DRIVE_OVERTEMP', 'insertion drive 71 C', active=True)
    inputs.wait_state('FAULT')
    assert not inputs.acknowledge().success
    inputs.faults.clear('DRIVE_OVERTEMP')
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'the condition to clear')
    assert inputs.acknowledge('DRIVE_OVERTEMP').success
    inputs.make_ready()

    # A latched controller fault in /robot/state holds until the controller drops it.
    inputs.hw_faults = ['WATCHDOG']
    inputs.wait_state('FAULT')
    assert not inputs.acknowledge().success
    inputs.hw_faults = []
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'the controller to clear it')
    assert inputs.acknowledge().success
    inputs.make_ready()


def test_joint_limit_and_missing_joint(rig):
    inputs = rig
    inputs.make_ready()
    inputs.q = [0.05, 0.0, 0.0, 0.0, 0.0]                # stage_x limit is 0.04 m
    inputs.wait_permitted(False)
    status = inputs.wait_state('FAULT')
    assert status.faults[0].code == 'JOINT_LIMIT' and 'stage_x = 0.0500 m beyond upper limit' in status.faults[0].detail
    assert not inputs.acknowledge().success
    inputs.q = [0.0] * 5
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'the joint back inside')
    assert inputs.acknowledge().success
    inputs.make_ready()


def test_workspace_box_and_runtime_insertion_limit(graph):
    inputs = Inputs(graph)
    node = start_supervisor(graph, 'workspace_lower:=[-0.05, -0.05, -0.2]', 'workspace_upper:=[0.05, 0.05, 0.01]')
    inputs.make_ready()
    # Every joint inside its limits, but the tip is at x = 0.035 + 0.1 * sin(0.5) = 0.083 m > 0.05 m.
    inputs.q = [0.035, 0.0, 0.0, -0.5, 0.1]
    inputs.wait_permitted(False)
    status = inputs.wait_state('FAULT')
    assert status.faults[0].code == 'WORKSPACE_LIMIT'
    inputs.q = [0.0] * 5
    testing.wait_for(lambda: not inputs.last_status().faults[0].cause_active, 10, 'the tip back inside')
    assert inputs.acknowledge().success
    inputs.make_ready()

    refused = node.set_parameters([rclpy.parameter.Parameter('tick_rate_hz', value=200.0)])[0]
    assert not refused.successful and 'read-only' in refused.reason
    assert node.get_parameter('tick_rate_hz').value == 50.0
    assert node.set_parameters([rclpy.parameter.Parameter('max_insertion_depth', value=0.02)])[0].successful
    inputs.q = [0.0, 0.0, 0.0, 0.0, 0.03]
    status = inputs.wait_state('FAULT')
    assert status.faults[0].code == 'INSERTION_LIMIT'


def test_late_joiner_receives_the_current_status(graph):
    inputs = Inputs(graph)
    start_supervisor(graph, 'publish_rate_hz:=1.0')
    inputs.make_ready()
    assert inputs.estop(True).success
    inputs.wait_state('ESTOP')
    late = graph.create_node('late_console')
    info = late.get_publishers_info_by_topic('/safety/status')
    assert [i.qos_profile.durability for i in info] == [rclpy.qos.DurabilityPolicy.TRANSIENT_LOCAL]
    # Join right after a periodic publication (1 Hz here), so the next one is far away.
    seen = len(inputs.status)
    testing.wait_for(lambda: len(inputs.status) > seen, 10, 'a periodic publication')
    received = []
    joined = late.get_clock().now()
    late.create_subscription(SafetyStatus, '/safety/status', received.append, qos.SAFETY_LATCHED)
    late.create_subscription(Bool, '/safety/motion_permitted', received.append, qos.SAFETY_LATCHED)
    testing.wait_for(lambda: any(isinstance(m, SafetyStatus) for m in received)
                     and any(isinstance(m, Bool) for m in received), 10, 'the late joiner to get both')
    first = next(m for m in received if isinstance(m, SafetyStatus))
    # Published before the subscription existed: only transient-local durability delivers that.
    assert rclpy.time.Time.from_msg(first.header.stamp) < joined
    assert first.state == 'ESTOP' and not first.motion_permitted
    assert next(m for m in received if isinstance(m, Bool)).data is False


def test_bad_configuration_is_refused(graph):
    with pytest.raises(ValueError, match='heartbeat_timeouts_s'):
        SafetySupervisorNode(context=graph.context, cli_args=[
            '--ros-args', '-p', 'required_heartbeats:=[a, b]', '-p', 'heartbeat_timeouts_s:=[0.5]'])


def test_interlock_across_processes(graph, processes):
    """scanner_interface and safety_supervisor as their own processes: scan -> no motion -> resume."""
    scanner = processes('igt_robot.nodes.scanner_interface_node', '--ros-args', '-p', 'sources:=[service]',
                        '-p', 'service_initial_phase:=IDLE', '-p', f'operator_session_file:={SESSION}')
    supervisor = processes('igt_robot.nodes.safety_supervisor_node', '--ros-args',
                           '-p', f'operator_session_file:={SESSION}',
                           '-p', 'required_heartbeats:=[scanner_interface]', '-p', 'require_robot_state:=false',
                           '-p', 'require_joint_state:=false', '-p', 'scanner_timeout_s:=1.0')
    inputs = Inputs(graph)
    inputs.scanner_on = False                     # the real scanner_interface is the source now
    inputs.beating = {}
    set_state = inputs.node.create_client(SetScannerState, '/scanner/set_state')
    inputs.wait_state('HOLD', timeout=30.0, awaiting_resume=True)
    inputs.make_ready()
    testing.wait_for(lambda: SESSION.exists(), 30, 'the operator session issued')
    assert inputs.call(set_state, SetScannerState.Request(phase=ScannerState.PHASE_ACQUIRING,
                                                          protocol_name='control scan')).accepted
    inputs.wait_permitted(False, 'motion withdrawn after the scanner_interface reports ACQUIRING')
    inputs.wait_state('SCAN_HOLD')
    assert inputs.call(set_state, SetScannerState.Request(phase=ScannerState.PHASE_IDLE,
                                                          operator_token=token())).accepted
    inputs.wait_state('HOLD', awaiting_resume=True)
    assert inputs.last_permitted() is False
    inputs.make_ready()
    assert supervisor.stop() == 0, supervisor.output()
    assert scanner.stop() == 0, scanner.output()


# --------------------------------------------------------------------------- operator authority (issue 11)

def _events(inputs, kind='safety_command'):
    with inputs.lock:
        return [e for e in inputs.events if e.kind == kind]


def test_session_file_is_private_and_issued_afresh(rig):
    rig.wait_state('HOLD', awaiting_resume=True)
    assert SESSION.stat().st_mode & 0o077 == 0
    assert len(token()) >= 32


def test_rogue_resume_without_the_operator_secret_is_refused_and_recorded(rig):
    inputs = rig
    inputs.wait_state('HOLD', awaiting_resume=True)
    for bad in ('', 'invented-secret'):
        answer = inputs.call(inputs.resume_client, ResumeMotion.Request(operator_id='dr_who', operator_token=bad))
        assert not answer.success and 'operator session secret' in answer.message
    assert inputs.last_status().state == 'HOLD' and inputs.last_permitted() is False
    testing.wait_for(lambda: any('resume refused' in e.description and e.severity == ProcedureEvent.WARN
                                 for e in _events(inputs)), 10, 'the refusal recorded as an event')
    assert inputs.resume().success                         # the operator's secret works
    inputs.wait_permitted(True)


def test_estop_from_anyone_but_only_the_operator_releases_it(rig):
    inputs = rig
    inputs.make_ready()
    pressed = inputs.call(inputs.estop_client, SetEstop.Request(active=True, source='slicer'))   # no secret
    assert pressed.success
    inputs.wait_state('ESTOP')
    undo = inputs.call(inputs.estop_client, SetEstop.Request(active=False, source='rogue'))
    assert not undo.success and 'secret' in undo.message
    ack = inputs.call(inputs.ack_client, AcknowledgeFaults.Request(operator_id='rogue'))
    assert not ack.success and 'secret' in ack.message
    resume = inputs.call(inputs.resume_client, ResumeMotion.Request(operator_id='rogue'))
    assert not resume.success
    assert inputs.wait_state('ESTOP').motion_permitted is False
    assert inputs.estop(False).success and inputs.acknowledge().success   # the operator can
    inputs.make_ready()


def test_insertion_limit_cannot_be_removed_or_loosened_beyond_the_configuration_at_run_time(graph):
    inputs = Inputs(graph)
    node = start_supervisor(graph, 'max_insertion_depth:=0.05')
    inputs.make_ready()
    for value in (-1.0, 0.08):
        result = node.set_parameters([rclpy.parameter.Parameter('max_insertion_depth', value=value)])[0]
        assert not result.successful and 'within the configured limit' in result.reason
        assert node.get_parameter('max_insertion_depth').value == 0.05
    for value in (0.03, 0.05):                            # tightening, and restoring the configured limit
        assert node.set_parameters([rclpy.parameter.Parameter('max_insertion_depth', value=value)])[0].successful
        assert node.supervisor._max_insertion == value
    inputs.q = [0.0, 0.0, 0.0, 0.0, 0.06]                 # beyond the limit still in force
    assert inputs.wait_state('FAULT').faults[0].code == 'INSERTION_LIMIT'


def test_second_scanner_publisher_is_a_latched_fault_naming_the_node(rig, graph):
    inputs = rig
    inputs.make_ready()
    inputs.scanner_phase = ScannerState.PHASE_ACQUIRING
    inputs.wait_state('SCAN_HOLD')
    spoofer = graph.create_node('scanner_spoofer')
    pub = spoofer.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)

    def spoof():
        pub.publish(ScannerState(phase=ScannerState.PHASE_IDLE, heartbeat=1_000_000 + inputs.counter))
        st = inputs.last_status()
        return st is not None and any(f.code == 'FOREIGN_SCANNER_PUBLISHER' for f in st.faults)
    testing.wait_for(spoof, 10, 'the foreign publisher latched')
    status = inputs.last_status()
    assert status.state == 'FAULT' and not status.motion_permitted
    assert '/scanner_spoofer' in next(f.detail for f in status.faults if f.code == 'FOREIGN_SCANNER_PUBLISHER')


def test_supervisor_ticks_on_a_steady_clock_when_ros_time_steps_back(graph):
    """use_sim_time with /clock stepping backwards and then frozen: ROS-time timers would pause
    (ros2/rclpy#1490); the supervisor's tick still detects a silent heartbeat and it keeps publishing."""
    from rosgraph_msgs.msg import Clock
    # The probe stamps its messages on the same simulated clock, as every node of a sim-time graph does.
    inputs = Inputs(graph, parameter_overrides=[rclpy.parameter.Parameter('use_sim_time', value=True)])
    clock_node = graph.create_node('clock_source')
    clock_pub = clock_node.create_publisher(Clock, '/clock', 10)
    clock_pub.publish(Clock(clock=rclpy.time.Time(seconds=1000).to_msg()))
    node = start_supervisor(graph, 'use_sim_time:=true', 'publish_rate_hz:=5.0')

    def at(clock, seconds):
        return clock.now().nanoseconds == seconds * 10**9
    testing.wait_for(lambda: (at(node.get_clock(), 1000) and at(inputs.node.get_clock(), 1000)) or
                     clock_pub.publish(Clock(clock=rclpy.time.Time(seconds=1000).to_msg())), 10, 'sim time at 1000 s')
    inputs.make_ready()
    clock_pub.publish(Clock(clock=rclpy.time.Time(seconds=10).to_msg()))          # a step backwards ...
    testing.wait_for(lambda: at(node.get_clock(), 10) and at(inputs.node.get_clock(), 10), 10,
                     'sim time stepped back')
    seen = len(inputs.status)                                                     # ... and time frozen there
    testing.wait_for(lambda: len(inputs.status) >= seen + 3, 10, 'periodic status while ROS time is frozen')
    inputs.beating['motion_controller'] = False
    status = inputs.wait_state('FAULT', 'HEARTBEAT_LOST detected by the tick', timeout=10.0)
    assert any(f.code == 'HEARTBEAT_LOST' for f in status.faults)
