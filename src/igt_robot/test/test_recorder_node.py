"""recorder_node on a real DDS graph: what reaches the durable record, the dose ledger, the MCAP log
and the report; a SIGKILLed recorder loses nothing it committed; a restarted one continues the record
without duplicating what TRANSIENT_LOCAL delivers again. Also the generic message converter."""
import json
import signal

import pytest
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger

from igt_robot import testing
from igt_robot.nodes import msg_convert, qos
from igt_robot.nodes.recorder_node import RecorderNode, _Decimator
from igt_robot.record import ProcedureRecord, read_entries
from igt_robot_msgs.msg import (DoseRecord, NeedlePlan, ProcedureEvent, RegistrationResult, RobotState, SafetyFault,
                                SafetyStatus, ScannerState)

mcap_reader = pytest.importorskip('mcap_ros2.reader', reason='mcap_ros2 not installed')


def event(kind, description, source='test', severity=ProcedureEvent.INFO, sec=1, nanosec=0, phase='', **values):
    msg = ProcedureEvent(kind=kind, description=description, source=source, severity=severity, phase=phase,
                         values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    return msg


def entries(path):
    try:
        return read_entries(str(path))
    except FileNotFoundError:
        return []


def of_kind(path, kind):
    return [e for e in entries(path) if e.kind == kind]


def start_recorder(graph, record_dir, *params):
    args = ['--ros-args', '-p', f'record_dir:={record_dir}', '-p', 'procedure_id:=test_proc']
    for p in params:
        args += ['-p', p]
    return graph.add(RecorderNode(context=graph.context, cli_args=args))


class Publishers:
    def __init__(self, graph):
        self.node = n = graph.create_node('recorder_probe')
        self.events = n.create_publisher(ProcedureEvent, '/procedure/events', qos.EVENTS)
        self.dose = n.create_publisher(DoseRecord, '/scanner/dose', qos.EVENTS)
        self.registration = n.create_publisher(RegistrationResult, '/registration/result', qos.LATCHED)
        self.plan = n.create_publisher(NeedlePlan, '/planner/current_plan', qos.LATCHED)
        self.safety = n.create_publisher(SafetyStatus, '/safety/status', qos.SAFETY_LATCHED)
        self.scanner = n.create_publisher(ScannerState, '/scanner/state', qos.SCANNER_STATE)
        self.robot = n.create_publisher(RobotState, '/robot/state', qos.STATE_STREAM)
        self.joints = n.create_publisher(JointState, '/joint_states', qos.STATE_STREAM)

    def wait_matched(self):
        pubs = [self.scanner, self.robot, self.joints, self.safety]
        testing.wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), 10, 'recorder subscriptions')


def sample_plan():
    plan = NeedlePlan(plan_id='plan-7', depth=0.082, insertion_depth=0.09, structure_names=['aorta', 'kidney'],
                      min_clearance=[0.012, float('inf')], required_margin=[0.005, 0.003], reachable=True,
                      feasible=True, score=0.8)
    plan.header.frame_id = 'scanner'
    plan.header.stamp.sec = 50
    plan.entry.x, plan.entry.y, plan.entry.z = -0.01, 0.02, 0.03
    plan.target.x, plan.target.y, plan.target.z = -0.02, 0.05, 0.10
    plan.joint_solution.name = ['stage_x', 'stage_y']
    plan.joint_solution.position = [0.001, -0.002]
    return plan


def sample_registration():
    reg = RegistrationResult(method='zframe', accepted=True, fre=0.0004, predicted_tre=0.0009, fiducial_count=84,
                             slices_used=12, residuals=[1e-4, 3e-4], image_source='igtl:CALIBRATION')
    reg.header.stamp.sec = 40
    reg.transform.header.frame_id = 'base_link'
    reg.transform.child_frame_id = 'scanner'
    reg.transform.transform.translation.x = 0.25
    reg.transform.transform.rotation.w = 1.0
    return reg


def test_everything_reaches_the_record_mcap_and_report(graph, run_dir):
    pubs = Publishers(graph)
    # Published before the recorder exists: TRANSIENT_LOCAL must still deliver it.
    pubs.events.publish(event('procedure_started', 'early event', sec=1))
    record_dir = run_dir / 'record'
    recorder = start_recorder(graph, record_dir, 'joint_states_rate_hz:=0.0', 'robot_state_rate_hz:=0.0')
    pubs.wait_matched()

    testing.wait_for(lambda: any(e.payload.get('description') == 'early event' for e in of_kind(record_dir, 'event')),
                     10, 'the event published before the recorder started')

    pubs.events.publish(event('safety_transition', 'scanner ACQUIRING', source='safety_supervisor', sec=2,
                              from_state='READY', to_state='SCAN_HOLD'))
    pubs.events.publish(event('safety_transition', 'all clear', source='safety_supervisor', sec=3,
                              from_state='SCAN_HOLD', to_state='READY'))
    pubs.events.publish(event('safety_command', 'motion resumed by dr_a', source='safety_supervisor', sec=4,
                              from_state='READY', to_state='READY', operator_id='dr_a'))
    pubs.events.publish(event('safety_command', 'refused: fault latched', source='safety_supervisor', sec=5,
                              severity=ProcedureEvent.WARN, operator_id='dr_a'))
    pubs.events.publish(event('interlock', 'motion inhibit ASSERTED', source='hardware_node', sec=6,
                              inhibit=True, reason='scanner ACQUIRING'))
    pubs.events.publish(event('workflow_confirmation', 'plan plan-7 confirmed by dr_a', source='workflow', sec=7,
                              phase='PLANNING', command='confirm_plan', argument='', operator_id='dr_a',
                              from_phase='PLANNING', from_step='CONFIRM_PLAN', step='ALIGN', accepted='true'))
    pubs.events.publish(event('tip_measured', 'tip found', sec=8, tip_m='[-0.021, 0.049, 0.099]', scan_id='s2',
                              target_m='[-0.02, 0.05, 0.10]'))
    pubs.dose.publish(DoseRecord(scan_id='s1', protocol_name='planning CT', ctdi_vol_mgy=10.0, dlp_mgy_cm=200.0,
                                 kv=120.0, mas=150.0, scan_count=1, total_dlp_mgy_cm=200.0))
    pubs.dose.publish(DoseRecord(scan_id='s2', protocol_name='control scan', ctdi_vol_mgy=5.0, dlp_mgy_cm=50.0,
                                 kv=100.0, mas=80.0, scan_count=2, total_dlp_mgy_cm=250.0))
    pubs.dose.publish(DoseRecord(scan_id='s3', protocol_name='unreported', scan_count=3, total_dlp_mgy_cm=250.0))
    pubs.dose.publish(DoseRecord(scan_id='s1', protocol_name='planning CT', ctdi_vol_mgy=10.0, dlp_mgy_cm=200.0,
                                 kv=120.0, mas=150.0, scan_count=1, total_dlp_mgy_cm=200.0))  # re-delivery
    pubs.registration.publish(sample_registration())
    pubs.plan.publish(sample_plan())
    status = SafetyStatus(state='SCAN_HOLD', reason='scanner ACQUIRING', faults=[SafetyFault(code='X')])
    pubs.safety.publish(status)
    pubs.scanner.publish(ScannerState(phase=ScannerState.PHASE_ACQUIRING, protocol_name='control scan', heartbeat=1))
    pubs.scanner.publish(ScannerState(phase=ScannerState.PHASE_IDLE, heartbeat=2))
    pubs.robot.publish(RobotState(joint_names=['stage_x'], position=[0.01], moving=True))
    pubs.joints.publish(JointState(name=['stage_x'], position=[0.01]))

    testing.wait_for(lambda: of_kind(record_dir, 'plan') and of_kind(record_dir, 'registration')
                     and len(of_kind(record_dir, 'dose')) == 2 and of_kind(record_dir, 'dose_unverified')
                     and of_kind(record_dir, 'tip') and len(of_kind(record_dir, 'scanner')) == 2
                     and of_kind(record_dir, 'motion') and len(of_kind(record_dir, 'event')) == 8,
                     15, 'all record entries')

    # Interlocks: the transition into SCAN_HOLD and the hardware inhibit, not the return to READY.
    interlocks = [e.payload for e in of_kind(record_dir, 'interlock')]
    assert [(i['state'], i['reason']) for i in interlocks] == [
        ('SCAN_HOLD', 'scanner ACQUIRING'), ('HW_INHIBIT', 'scanner ACQUIRING')]
    # Accepted operator command -> confirmation; the refused one is only an event.
    assert [(c.payload['operator_id'], c.payload['what']) for c in of_kind(record_dir, 'confirmation')] == \
        [('dr_a', 'motion resumed by dr_a')]
    workflow = of_kind(record_dir, 'workflow')[0].payload
    assert workflow['confirmation'] and workflow['accepted'] and workflow['step'] == 'ALIGN'
    assert of_kind(record_dir, 'tip')[0].payload['tip_m'] == [-0.021, 0.049, 0.099]

    doses = [e.payload for e in of_kind(record_dir, 'dose')]
    assert [d['scan_id'] for d in doses] == ['s1', 's2']        # s1 counted once
    assert 'totals_mismatch' not in doses[1]
    unverified = of_kind(record_dir, 'dose_unverified')[0].payload
    assert unverified['scan_id'] == 's3' and 'kv' in unverified['reason']
    totals = recorder.ledger.totals()
    assert totals.ct_scan_count == 2 and totals.total_dlp_mgy_cm == pytest.approx(250.0)

    plan = of_kind(record_dir, 'plan')[0].payload
    assert plan['plan_id'] == 'plan-7' and plan['target_m'] == [-0.02, 0.05, 0.10]
    assert plan['min_clearance_m'] == [0.012, None]             # inf is not JSON: stored as null
    reg = of_kind(record_dir, 'registration')[0].payload
    assert reg['fre_m'] == pytest.approx(0.0004) and reg['T_base_scanner'][0][3] == pytest.approx(0.25)
    assert [s.payload['phase'] for s in of_kind(record_dir, 'scanner')] == ['ACQUIRING', 'IDLE']
    testing.wait_for(lambda: recorder.mcap.message_count >= 13, 10, 'the MCAP to receive every topic')

    # ~/write_report: an HTML report from the record.
    client = pubs.node.create_client(Trigger, '/recorder_node/write_report')
    assert client.wait_for_service(timeout_sec=10.0)
    future = client.call_async(Trigger.Request())
    response = testing.wait_for(lambda: future.done() and future.result(), 60, 'the report')
    assert response.success, response.message
    html = (record_dir / 'report.html').read_text()
    assert 'plan-7' in html and 'SCAN_HOLD' in html and 'dr_a' in html and '250.0 mGy·cm' in html

    recorder.finalize()  # closes the MCAP (summary written) and the record
    messages = list(mcap_reader.read_ros2_messages(str(recorder.mcap_path)))
    by_topic = {}
    for m in messages:
        by_topic.setdefault(m.channel.topic, []).append(m)
    assert set(by_topic) == {'/procedure/events', '/scanner/state', '/safety/status', '/robot/state',
                             '/joint_states', '/scanner/dose', '/registration/result', '/planner/current_plan'}
    decoded_plan = by_topic['/planner/current_plan'][0].ros_msg
    assert decoded_plan.plan_id == 'plan-7' and decoded_plan.target.z == pytest.approx(0.10)
    assert list(decoded_plan.joint_solution.position) == pytest.approx([0.001, -0.002])
    assert by_topic['/planner/current_plan'][0].schema.name == 'igt_robot_msgs/msg/NeedlePlan'
    assert [m.ros_msg.scan_id for m in by_topic['/scanner/dose']] == ['s1', 's2', 's3', 's1']
    assert by_topic['/safety/status'][0].ros_msg.faults[0].code == 'X'
    assert by_topic['/scanner/state'][0].ros_msg.phase == ScannerState.PHASE_ACQUIRING


def test_sigkill_keeps_every_committed_entry_and_a_restart_does_not_duplicate(graph, processes, run_dir):
    record_dir = run_dir / 'record'
    pubs = Publishers(graph)
    params = ['--ros-args', '-p', f'record_dir:={record_dir}', '-p', 'procedure_id:=killed',
              '-p', 'write_report_on_shutdown:=false']
    proc = processes('igt_robot.nodes.recorder_node', *params, name='recorder_1')
    testing.wait_for(lambda: pubs.events.get_subscription_count() > 0 or not proc.alive(), 30,
                     'the recorder process to subscribe')
    assert proc.alive(), proc.output()

    for i in range(40):
        pubs.events.publish(event('step', f'event {i}', sec=100 + i))
    # Wait until some of them are committed, then kill without any chance to clean up.
    committed = testing.wait_for(lambda: [e for e in of_kind(record_dir, 'event')] if
                                 len(of_kind(record_dir, 'event')) >= 10 else None, 20, '10 committed events')
    proc.kill(signal.SIGKILL)
    testing.wait_for(lambda: not proc.alive(), 10, 'the recorder to die')

    after = entries(record_dir)
    seqs = [e.seq for e in after]
    assert seqs == list(range(1, len(seqs) + 1))               # contiguous, every line valid
    by_seq = {e.seq: e for e in after}
    for e in committed:                                        # everything seen committed is intact
        assert by_seq[e.seq] == e
    with ProcedureRecord(str(record_dir)) as reopened:        # a writer accepts it (repairs only a torn tail)
        assert [e for e in reopened.read_all() if e.kind == 'event'][:len(committed)] == committed
    last_before = max(seqs)

    # Restart: the publisher is alive, so TRANSIENT_LOCAL delivers all 40 events again.
    proc2 = processes('igt_robot.nodes.recorder_node', *params, name='recorder_2')
    testing.wait_for(lambda: len(of_kind(record_dir, 'event')) >= 40 or not proc2.alive(), 30,
                     'the restarted recorder to catch up')
    pubs.events.publish(event('step', 'after restart', sec=500))
    testing.wait_for(lambda: any(e.payload['description'] == 'after restart' for e in of_kind(record_dir, 'event')),
                     20, 'the new event')
    assert proc2.stop() == 0, proc2.output()                   # SIGINT: clean shutdown, exit 0
    final = entries(record_dir)
    descriptions = [e.payload['description'] for e in final if e.kind == 'event']
    assert sorted(descriptions) == sorted([f'event {i}' for i in range(40)] + ['after restart'])  # no duplicates
    assert [e.seq for e in final] == list(range(1, len(final) + 1))
    assert any(e.kind == 'recorder' and e.payload['resumed_at_seq'] >= last_before for e in final)


def test_decimator_limits_the_rate_but_lets_changes_through():
    d = _Decimator(20.0)
    assert d.due(0.0) and not d.due(0.01) and not d.due(0.049) and d.due(0.05)
    assert d.due(0.06, force=True) and not d.due(0.07)
    always = _Decimator(0.0)
    assert all(always.due(t) for t in (0.0, 0.0, 0.001))


def test_bad_procedure_id_is_refused(graph, run_dir):
    with pytest.raises(ValueError, match='procedure_id'):
        RecorderNode(context=graph.context, cli_args=['--ros-args', '-p', 'procedure_id:=../etc',
                                                      '-p', f'record_dir:={run_dir / "x"}'])


def test_message_converter_round_trips_nested_sequences_and_octets():
    plan = sample_plan()
    d = msg_convert.to_dict(plan)
    assert d['entry'] == {'x': -0.01, 'y': 0.02, 'z': 0.03}
    assert d['joint_solution']['position'] == [0.001, -0.002] and d['header']['stamp'] == {'sec': 50, 'nanosec': 0}
    json.dumps(d, allow_nan=True)  # plain Python values only
    assert msg_convert.from_dict(NeedlePlan, d) == plan
    status = SafetyStatus(state='FAULT', faults=[SafetyFault(code='A', latched=True), SafetyFault(code='B')])
    assert msg_convert.from_dict(SafetyStatus, msg_convert.to_dict(status)) == status
    diag = DiagnosticStatus(level=DiagnosticStatus.ERROR, values=[KeyValue(key='k', value='v')])
    assert msg_convert.to_dict(diag)['level'] == 2
    assert msg_convert.from_dict(DiagnosticStatus, msg_convert.to_dict(diag)) == diag
    with pytest.raises(KeyError, match='no field'):
        msg_convert.from_dict(SafetyStatus, {'stat': 'READY'})
    with pytest.raises(TypeError):
        msg_convert.to_dict({'not': 'a message'})
