"""igtl_bridge on a real DDS graph, driven by a pyigtl client the way 3D Slicer drives it (free port).

Fake /procedure/command, /safety/estop, /registration/register and /planner/validate services record
what reaches them and answer like the real ones (including refusals with a reason)."""
import threading

import numpy as np
import pytest
from geometry_msgs.msg import PointStamped

pyigtl = pytest.importorskip('pyigtl', reason='pyigtl not installed')

from igt_robot import frames, testing, units  # noqa: E402
from igt_robot.igtl import StatusCode, StatusMessage  # noqa: E402
from igt_robot.imaging import Volume, igtl_image_from_volume, make_affine, read_nifti  # noqa: E402
from igt_robot.nodes import qos  # noqa: E402
from igt_robot.nodes.igtl_bridge_node import IgtlBridgeNode  # noqa: E402
from igt_robot_msgs.msg import (NeedlePlan, ProcedureEvent, RegistrationResult, RobotState,  # noqa: E402
                                SafetyStatus)
from igt_robot.igtl.messages import GetStatusMessage  # noqa: E402
from igt_robot.safety.operator_session import issue_session  # noqa: E402
from igt_robot_msgs.srv import (AcknowledgeFaults, OperatorCommand, RegisterImage, ResumeMotion,  # noqa: E402
                                SetEstop, ValidatePlan)

ALIGN_REFUSAL = 'align refused: the plan is not confirmed (confirm_plan first)'


class FakeServices:
    """The services the bridge calls, recording requests; answers are scripted."""

    def __init__(self, graph, register_success=True):
        self.node = n = graph.create_node('fake_procedure_services')
        self.lock = threading.Lock()
        self.commands, self.estops, self.registrations, self.validations = [], [], [], []
        self.resumes, self.acknowledges, self.tokens = [], [], []
        self.register_success = register_success
        n.create_service(OperatorCommand, '/procedure/command', self._command)
        n.create_service(SetEstop, '/safety/estop', self._estop)
        n.create_service(ResumeMotion, '/safety/resume', self._resume)
        n.create_service(AcknowledgeFaults, '/safety/acknowledge', self._acknowledge)
        n.create_service(RegisterImage, '/registration/register', self._register)
        n.create_service(ValidatePlan, '/planner/validate', self._validate)

    def _command(self, req, resp):
        with self.lock:
            self.commands.append((req.command, req.argument, req.operator_id))
            self.tokens.append(('command', req.command, req.operator_token))
        if req.command == 'align':
            resp.accepted, resp.phase, resp.step, resp.message = False, 'PLANNING', 'CONFIRM_PLAN', ALIGN_REFUSAL
        else:
            resp.accepted, resp.phase, resp.step, resp.message = True, 'PLANNING', 'LOAD_PLANNING_SCAN', 'ok'
        return resp

    def _estop(self, req, resp):
        with self.lock:
            self.estops.append((req.active, req.source))
            self.tokens.append(('estop', req.active, req.operator_token))
        resp.success, resp.message = True, 'e-stop latched' if req.active else 'e-stop released'
        return resp

    def _resume(self, req, resp):
        with self.lock:
            self.resumes.append((req.operator_id, req.operator_token))
        resp.success, resp.message = True, 'motion permitted'
        return resp

    def _acknowledge(self, req, resp):
        with self.lock:
            self.acknowledges.append((list(req.codes), req.operator_token))
        resp.success, resp.message = False, 'ESTOP still pressed'
        return resp

    def _register(self, req, resp):
        with self.lock:
            self.registrations.append(req)
        resp.success = self.register_success
        resp.message = '' if self.register_success else 'rod 6 not found in 9 of 12 slices'
        resp.result.fre = 0.00042
        return resp

    def _validate(self, req, resp):
        with self.lock:
            self.validations.append(req)
        resp.valid, resp.message = False, "passes 2.0 mm from 'aorta' (margin 5.0 mm)"
        return resp


class Probe:
    """Subscribes to what the bridge publishes; publishes what it consumes."""

    def __init__(self, graph):
        self.node = n = graph.create_node('bridge_probe')
        self.lock = threading.Lock()
        self.targets, self.entries, self.events = [], [], []
        n.create_subscription(PointStamped, '/procedure/target', lambda m: self._keep(self.targets, m), qos.LATCHED)
        n.create_subscription(PointStamped, '/procedure/entry', lambda m: self._keep(self.entries, m), qos.LATCHED)
        n.create_subscription(ProcedureEvent, '/procedure/events', lambda m: self._keep(self.events, m), qos.EVENTS)
        self.registration = n.create_publisher(RegistrationResult, '/registration/result', qos.LATCHED)
        self.robot = n.create_publisher(RobotState, '/robot/state', qos.STATE_STREAM)
        self.plan = n.create_publisher(NeedlePlan, '/planner/current_plan', qos.LATCHED)
        self.safety = n.create_publisher(SafetyStatus, '/safety/status', qos.SAFETY_LATCHED)

    def _keep(self, store, msg):
        with self.lock:
            store.append(msg)

    def events_of(self, kind):
        with self.lock:
            return [e for e in self.events if e.kind == kind]


@pytest.fixture
def session_file(run_dir):
    path = run_dir / 'session' / 'operator_session'
    return path, issue_session(path)


@pytest.fixture
def bridge(graph, run_dir, session_file):
    node = graph.add(IgtlBridgeNode(context=graph.context, cli_args=[
        '--ros-args', '-p', 'port:=0', '-p', f'image_dir:={run_dir / "images"}', '-p', 'service_timeout_s:=10.0',
        '-p', 'pose_rate:=20.0', '-p', 'refusal_report_interval_s:=1.0',
        '-p', f'operator_session_file:={session_file[0]}']))
    client = pyigtl.OpenIGTLinkClient('127.0.0.1', node.port)
    try:
        testing.wait_for(lambda: node.bridge.connected and client.is_connected(), 10, 'the Slicer connection')
        yield node, client
    finally:
        client.stop()


def send(client, message):
    assert client.send_message(message, wait=False)


def reply(client, device, match=lambda m: True, timeout=15.0, what=''):
    """The next message named ``device`` that satisfies ``match`` (older ones are skipped)."""
    box = []

    def poll():
        msg = client.wait_for_message(device, timeout=0)
        if msg is not None and match(msg):
            box.append(msg)
        return box
    testing.wait_for(poll, timeout, what or f'a reply named {device}')
    return box[0]


def command(client, text, query_id):
    send(client, pyigtl.StringMessage(text, device_name=f'CMD_{query_id}'))
    ack = reply(client, f'ACK_{query_id}')
    assert ack.string == text


def test_target_and_entry_arrive_in_lps_metres_and_are_validated(graph, bridge):
    node, client = bridge
    services, probe = FakeServices(graph), Probe(graph)
    testing.wait_for(lambda: node.validate_client.service_is_ready(), 10, '/planner/validate discovery')
    send(client, pyigtl.PointMessage(positions=[12.5, -30.0, 85.0], names=['T'], device_name='TARGET'))
    status = reply(client, 'TARGET')
    assert isinstance(status, StatusMessage) and status.code == StatusCode.OK
    target = testing.wait_for(lambda: probe.targets and probe.targets[-1], 10, '/procedure/target')
    assert target.header.frame_id == 'scanner'
    # RAS (12.5, -30, 85) mm -> LPS (-12.5, 30, 85) mm -> metres
    assert [target.point.x, target.point.y, target.point.z] == pytest.approx([-0.0125, 0.030, 0.085], abs=1e-9)

    entry_ras = np.eye(4)
    entry_ras[:3, 3] = [-40.0, 10.0, -5.0]
    send(client, pyigtl.TransformMessage(entry_ras, device_name='ENTRY'))
    assert reply(client, 'ENTRY').code == StatusCode.OK
    entry = testing.wait_for(lambda: probe.entries and probe.entries[-1], 10, '/procedure/entry')
    assert [entry.point.x, entry.point.y, entry.point.z] == pytest.approx([0.040, -0.010, -0.005], abs=1e-9)

    # Both known: /planner/validate is asked and its verdict goes back as STATUS PLAN.
    plan_status = reply(client, 'PLAN', lambda m: isinstance(m, StatusMessage))
    assert plan_status.code == StatusCode.NOT_READY and "2.0 mm from 'aorta'" in plan_status.status_string
    request = services.validations[-1]
    assert request.target.header.frame_id == 'scanner' and request.target.point.x == pytest.approx(-0.0125)
    assert request.entry.point.y == pytest.approx(-0.010)


def test_commands_reach_the_services_and_refusals_come_back_with_the_reason(graph, bridge):
    node, client = bridge
    services = FakeServices(graph)
    testing.wait_for(lambda: node.command_client.service_is_ready() and node.estop_client.service_is_ready(), 10,
                     'service discovery')
    command(client, 'START_UP', '0001')
    ok = reply(client, 'START_UP')
    assert ok.code == StatusCode.OK and 'PLANNING/LOAD_PLANNING_SCAN' in ok.status_string
    assert services.commands[-1] == ('start', '', 'slicer')

    command(client, 'MOVE_TO_TARGET', '0002')
    refused = reply(client, 'MOVE_TO_TARGET')
    assert refused.code == StatusCode.NOT_READY and refused.error_name == 'REFUSED'
    assert refused.status_string == ALIGN_REFUSAL
    assert services.commands[-1][0] == 'align'

    command(client, 'PLANNING:scan_42', '0003')
    assert reply(client, 'PLANNING').code == StatusCode.OK
    assert services.commands[-1][:2] == ('load_planning_scan', 'scan_42')

    send(client, pyigtl.StringMessage('', device_name='CMD_STOP'))   # BRP short form
    assert reply(client, 'STOP').code == StatusCode.OK
    assert services.commands[-1][0] == 'stop'

    command(client, 'EMERGENCY', '0004')
    estop = reply(client, 'EMERGENCY')
    assert estop.code == StatusCode.OK and 'latched' in estop.status_string
    assert services.estops == [(True, 'igtl_bridge: Slicer EMERGENCY')]


def test_missing_services_are_reported_not_waited_for(bridge):
    node, client = bridge
    command(client, 'EMERGENCY', '0009')
    status = reply(client, 'EMERGENCY')
    assert status.code == StatusCode.NOT_READY and '/safety/estop is not available' in status.status_string
    assert 'hardware e-stop' in status.status_string
    command(client, 'START_UP', '0010')
    assert '/procedure/command is not available' in reply(client, 'START_UP').status_string


def test_needle_pose_is_sent_in_ras_mm_only_with_an_accepted_registration(graph, bridge):
    node, client = bridge
    probe = Probe(graph)
    # Robot state streaming (20 Hz) from the probe, like the hardware node.
    tip_base = frames.make_transform(frames.rotation_from_quaternion_xyzw([0.0, 0.0, 0.38268343, 0.92387953]),
                                     [0.010, -0.020, -0.060])
    state = RobotState(joint_names=['stage_x'], position=[0.01])
    q = frames.quaternion_xyzw(tip_base[:3, :3])
    state.needle_tip.position.x, state.needle_tip.position.y, state.needle_tip.position.z = tip_base[:3, 3]
    (state.needle_tip.orientation.x, state.needle_tip.orientation.y, state.needle_tip.orientation.z,
     state.needle_tip.orientation.w) = q
    probe.node.create_timer(0.05, lambda: probe.robot.publish(state))

    # A rejected registration is ignored: no pose while nothing is accepted.
    rejected = RegistrationResult(accepted=False, rejection_reason='rod 6 not found')
    rejected.transform.transform.rotation.w = 1.0
    probe.registration.publish(rejected)
    testing.wait_for(lambda: node._tip is not None, 10, 'the robot state at the bridge')
    ticks = node.pose_ticks
    testing.wait_for(lambda: node.pose_ticks >= ticks + 5, 10, 'five pose periods')
    assert node.poses_sent == 0 and client.wait_for_message('CURRENT_POSITION', timeout=0) is None

    # Accepted: scanner -> base_link is a rotation about z by 90 degrees and a shift.
    T_base_scanner = frames.make_transform(frames.rotation_from_quaternion_xyzw([0, 0, 0.70710678, 0.70710678]),
                                           [0.10, 0.02, -0.30])
    accepted = RegistrationResult(accepted=True, method='zframe', image_source='igtl:CALIBRATION')
    t = accepted.transform.transform
    t.translation.x, t.translation.y, t.translation.z = T_base_scanner[:3, 3]
    t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = frames.quaternion_xyzw(T_base_scanner[:3, :3])
    probe.registration.publish(accepted)
    pose = reply(client, 'CURRENT_POSITION', what='CURRENT_POSITION after the registration')
    expected = units.transform_m_to_mm(frames.lps_to_ras(frames.invert(T_base_scanner) @ tip_base))
    np.testing.assert_allclose(pose.matrix, expected, atol=1e-3)   # mm; float32 on the wire
    # Independent spot check of the tip position: base -> scanner LPS -> RAS, in mm.
    tip_lps = frames.apply(frames.invert(T_base_scanner), tip_base[:3, 3])
    np.testing.assert_allclose(np.asarray(pose.matrix)[:3, 3], [-tip_lps[0] * 1e3, -tip_lps[1] * 1e3,
                                                                tip_lps[2] * 1e3], atol=1e-3)

    # The plan goes out as POINT PLAN and safety changes as STATUS SAFETY.
    plan = NeedlePlan(plan_id='p1')
    plan.entry.x, plan.entry.y, plan.entry.z = 0.01, 0.02, 0.03
    plan.target.x, plan.target.y, plan.target.z = 0.02, 0.04, 0.09
    probe.plan.publish(plan)
    points = reply(client, 'PLAN', lambda m: m.message_type == 'POINT')
    np.testing.assert_allclose(points.positions, [[-10.0, -20.0, 30.0], [-20.0, -40.0, 90.0]], atol=1e-3)
    assert list(points.names) == ['ENTRY', 'TARGET']
    probe.safety.publish(SafetyStatus(state='ESTOP', reason='e-stop pressed'))
    safety = reply(client, 'SAFETY')
    assert safety.code == StatusCode.PANIC_MODE and safety.error_name == 'ESTOP'
    assert 'e-stop pressed' in safety.status_string


def test_calibration_image_is_saved_announced_and_registered(graph, bridge, run_dir):
    node, client = bridge
    services, probe = FakeServices(graph), Probe(graph)
    testing.wait_for(lambda: node.register_client.service_is_ready(), 10, '/registration/register discovery')
    data = (np.arange(6 * 5 * 4, dtype=np.int16).reshape(4, 5, 6) * 3) - 100   # (k, j, i)
    volume = Volume(data, make_affine(np.eye(3), [0.0005, 0.0006, 0.002], [-0.03, 0.01, 0.12]), 'CT')

    send(client, igtl_image_from_volume(volume, device_name='PLANNING_CT'))
    assert reply(client, 'PLANNING_CT').code == StatusCode.OK
    send(client, igtl_image_from_volume(volume, device_name='CALIBRATION'))
    assert reply(client, 'CALIBRATION').code == StatusCode.OK
    registered = reply(client, 'REGISTRATION', what='the registration outcome')
    assert registered.code == StatusCode.OK and 'FRE 0.42 mm' in registered.status_string

    announced = testing.wait_for(lambda: len(probe.events_of('image_received')) == 2 and
                                 probe.events_of('image_received'), 10, 'two image_received events')
    values = [{kv.key: kv.value for kv in e.values} for e in announced]
    assert [v['device'] for v in values] == ['PLANNING_CT', 'CALIBRATION']
    request = services.registrations[-1]
    assert request.image_path == values[1]['path'] and request.method == 'zframe'
    assert len(services.registrations) == 1          # only the calibration image is registered
    for v in values:
        back = read_nifti(v['path'])                  # written as NIfTI, same geometry (LPS m) and voxels
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
        np.testing.assert_array_equal(back.data, data)
    assert node.last_image_path == values[0]['path']


def test_rejected_registration_comes_back_with_its_reason(graph, bridge):
    node, client = bridge
    FakeServices(graph, register_success=False)
    testing.wait_for(lambda: node.register_client.service_is_ready(), 10, '/registration/register discovery')
    volume = Volume(np.zeros((3, 4, 5), np.uint8), make_affine(np.eye(3), [0.001] * 3, [0, 0, 0]), 'CT')
    send(client, igtl_image_from_volume(volume, device_name='CALIBRATION'))
    status = reply(client, 'REGISTRATION')
    assert status.code == StatusCode.NOT_READY and status.status_string == 'rod 6 not found in 9 of 12 slices'


class GarbageImage(pyigtl.messages.MessageBase):
    """An IMAGE whose body is 3 bytes: undecodable (the IMAGE header alone is 72 bytes)."""

    def __init__(self):
        super().__init__(device_name='SCAN')
        self._message_type = 'IMAGE'
        self._valid_message = True

    def _pack_content(self):
        return b'\x01\x02\x03'


def test_malformed_messages_get_an_error_status_and_the_link_keeps_working(graph, bridge):
    node, client = bridge
    probe = Probe(graph)
    send(client, GarbageImage())
    garbage = reply(client, 'SCAN')
    assert garbage.code == StatusCode.INVALID and 'malformed IMAGE' in garbage.status_string
    send(client, pyigtl.PointMessage(positions=[float('nan'), 0.0, 0.0], names=['T'], device_name='TARGET'))
    nan = reply(client, 'TARGET')
    assert nan.code == StatusCode.INVALID and 'NaN' in nan.status_string
    send(client, pyigtl.StringMessage('FLY_TO_MOON', device_name='CMD_0005'))
    unknown = reply(client, 'CMD_0005')
    assert unknown.code == StatusCode.ILLEGAL_INSTRUCTION and 'unknown command' in unknown.status_string
    identity = np.eye(4)
    identity[0, 0] = 2.0   # not rigid
    send(client, pyigtl.TransformMessage(identity, device_name='CLB_0001'))
    assert reply(client, 'CLB_0001').code == StatusCode.INVALID
    assert probe.targets == []                              # nothing bad was published

    send(client, pyigtl.PointMessage(positions=[1.0, 2.0, 3.0], names=['T'], device_name='TARGET'))
    assert reply(client, 'TARGET').code == StatusCode.OK
    target = testing.wait_for(lambda: probe.targets and probe.targets[-1], 10, 'the good target')
    assert [target.point.x, target.point.y, target.point.z] == pytest.approx([-0.001, -0.002, 0.003], abs=1e-9)
    # The four refusals are ONE record event (per client per interval), not four WARNs.
    refusals = testing.wait_for(lambda: probe.events_of('igtl_refused'), 10, 'the refusal digest')
    testing.wait_for(lambda: node.bridge._digest._open == {}, 5, 'no open digest')
    assert len(probe.events_of('igtl_refused')) == 1
    assert refusals[0].severity == ProcedureEvent.WARN
    values = {kv.key: kv.value for kv in refusals[0].values}
    assert values['count'] == '4' and 'INVALID' in values['codes'] and 'ILLEGAL_INSTRUCTION' in values['codes']
    assert node.bridge.connected


def test_operator_commands_carry_the_operator_session(graph, bridge, session_file):
    node, client = bridge
    services = FakeServices(graph)
    _, token = session_file
    needed = (node.command_client, node.estop_client, node.resume_client, node.acknowledge_client)
    testing.wait_for(lambda: all(c.service_is_ready() for c in needed), 10, 'service discovery')
    command(client, 'RELEASE_ESTOP', '0020')
    assert reply(client, 'RELEASE_ESTOP').code == StatusCode.OK
    assert services.tokens[-1] == ('estop', False, token)
    command(client, 'ACKNOWLEDGE:ESTOP,TRACKING_ERROR', '0021')
    refused = reply(client, 'ACKNOWLEDGE')
    assert refused.code == StatusCode.NOT_READY and refused.status_string == 'ESTOP still pressed'
    assert services.acknowledges == [(['ESTOP', 'TRACKING_ERROR'], token)]
    command(client, 'RESUME', '0022')
    assert reply(client, 'RESUME').code == StatusCode.OK
    assert services.resumes == [('slicer', token)]
    command(client, 'CONFIRM_PLAN:p7', '0023')
    assert reply(client, 'CONFIRM_PLAN').code == StatusCode.OK
    assert services.tokens[-1] == ('command', 'confirm_plan', token)
    assert services.commands[-1][:2] == ('confirm_plan', 'p7')
    command(client, 'START_UP', '0024')  # workflow commands carry it too (the procedure node decides)
    reply(client, 'START_UP')
    assert services.tokens[-1] == ('command', 'start', token)


def test_without_a_readable_session_operator_commands_are_refused_but_emergency_passes(graph, bridge, session_file):
    node, client = bridge
    services = FakeServices(graph)
    testing.wait_for(lambda: node.estop_client.service_is_ready() and node.resume_client.service_is_ready(), 10,
                     'service discovery')
    session_file[0].chmod(0o644)  # readable by others: not a secret any more
    command(client, 'RESUME', '0030')
    refused = reply(client, 'RESUME')
    assert refused.code == StatusCode.ACCESS_DENIED and 'readable by others' in refused.status_string
    session_file[0].unlink()
    command(client, 'RELEASE_ESTOP', '0031')
    refused = reply(client, 'RELEASE_ESTOP')
    assert refused.code == StatusCode.ACCESS_DENIED and 'cannot be read' in refused.status_string
    assert services.resumes == [] and services.estops == []
    command(client, 'EMERGENCY', '0032')  # pressing never needs the secret
    assert reply(client, 'EMERGENCY').code == StatusCode.OK
    assert services.estops == [(True, 'igtl_bridge: Slicer EMERGENCY')]
    assert services.tokens[-1] == ('estop', True, '')


def test_get_status_answers_the_safety_state_and_two_clients_are_served(graph, bridge):
    node, client = bridge
    probe = Probe(graph)
    send(client, GetStatusMessage(device_name='STATUS'))
    unknown = reply(client, 'STATUS', lambda m: isinstance(m, StatusMessage))
    assert unknown.code == StatusCode.NOT_READY and '/safety/status' in unknown.status_string
    scanner_bridge = pyigtl.OpenIGTLinkClient('127.0.0.1', node.port)
    try:
        testing.wait_for(lambda: len(node.bridge.clients()) == 2, 10, 'the second client')
        probe.safety.publish(SafetyStatus(state='SCAN_HOLD', reason='scanner ACQUIRING'))
        for c in (client, scanner_bridge):  # both clients get the broadcast
            assert reply(c, 'SAFETY').error_name == 'SCAN_HOLD'
        send(scanner_bridge, GetStatusMessage(device_name='STATUS'))
        status = reply(scanner_bridge, 'STATUS', lambda m: isinstance(m, StatusMessage))
        assert status.code == StatusCode.NOT_READY and status.error_name == 'SCAN_HOLD'
        assert 'scanner ACQUIRING' in status.status_string
    finally:
        scanner_bridge.stop()


def test_network_exposure_needs_an_allow_list_and_a_secret_file(graph, run_dir):
    from igt_robot.igtl import BridgeConfigError
    with pytest.raises(BridgeConfigError, match='allowed_clients'):  # refused before anything is bound
        IgtlBridgeNode(context=graph.context, cli_args=['--ros-args', '-p', 'port:=0', '-p', 'host:=0.0.0.0'])
    secret_file = run_dir / 'igtl' / 'secret'
    secret = issue_session(secret_file)
    node = graph.add(IgtlBridgeNode(context=graph.context, cli_args=[
        # Loopback bind (tests stay on loopback) with both protections a network bind would need.
        '--ros-args', '-p', 'port:=0', '-p', "allowed_clients:=['127.0.0.1']",
        '-p', f'shared_secret_file:={secret_file}']))
    client = pyigtl.OpenIGTLinkClient('127.0.0.1', node.port)
    try:
        testing.wait_for(lambda: client.is_connected() and node.bridge.clients(), 10, 'the connection')
        assert not node.bridge.connected  # connected, not yet authenticated: nothing is sent to it
        send(client, pyigtl.StringMessage(secret, device_name='AUTH'))
        assert reply(client, 'AUTH').code == StatusCode.OK
        testing.wait_for(lambda: node.bridge.connected, 10, 'the authenticated client')
        send(client, GetStatusMessage(device_name='STATUS'))
        assert reply(client, 'STATUS', lambda m: isinstance(m, StatusMessage)).code == StatusCode.NOT_READY
    finally:
        client.stop()
