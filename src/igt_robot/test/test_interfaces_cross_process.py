"""Every custom message type, a service call and an action goal cross between two OS processes."""
import pathlib

import pytest
from rclpy.action import ActionClient

from igt_robot import testing
from igt_robot_msgs import msg as igt_msg
from igt_robot_msgs.action import MoveGuide
from igt_robot_msgs.srv import SetScannerState

PEER = str(pathlib.Path(__file__).parent / 'peers' / 'interface_echo.py')


def sample_messages():
    """One filled-in instance of each custom type (non-default values in every kind of field)."""
    scanner = igt_msg.ScannerState(phase=igt_msg.ScannerState.PHASE_ACQUIRING, source='igtl',
                                   protocol_name='control scan', is_ionising=True, heartbeat=42)
    fault = igt_msg.SafetyFault(code='TRACKING_ERROR', detail='guide_pitch off by 0.9°', latched=True)
    status = igt_msg.SafetyStatus(motion_permitted=False, state='FAULT', faults=[fault], latched=True,
                                  reason='Fault TRACKING_ERROR', scanner_phase='IDLE')
    robot = igt_msg.RobotState(joint_names=['stage_x', 'needle_insertion'], position=[0.01, 0.05],
                               velocity=[0.0, 0.001], insertion_depth=0.05, enabled=True, backend='mujoco')
    registration = igt_msg.RegistrationResult(method='zframe', accepted=True, fre=0.0002, predicted_tre=0.0004,
                                              fiducial_count=84, slices_used=12, residuals=[1e-4, 2e-4])
    registration.transform.header.frame_id = 'base_link'
    registration.transform.child_frame_id = 'scanner'
    registration.transform.transform.translation.x = 0.123
    plan = igt_msg.NeedlePlan(plan_id='p1', depth=0.08, structure_names=['aorta'], min_clearance=[0.012],
                              required_margin=[0.005], score=0.7, reachable=True, feasible=True)
    plan.entry.x = -0.01
    plan.direction.z = 1.0
    event = igt_msg.ProcedureEvent(phase='CONTROL', severity=igt_msg.ProcedureEvent.WARN, source='safety',
                                   kind='interlock', description='scan started mid-motion')
    dose = igt_msg.DoseRecord(scan_id='s3', protocol_name='control scan', ctdi_vol_mgy=8.1, dlp_mgy_cm=120.0,
                              kv=120.0, mas=100.0, scan_count=3, total_dlp_mgy_cm=360.0)
    return {'ScannerState': scanner, 'SafetyFault': fault, 'SafetyStatus': status, 'RobotState': robot,
            'RegistrationResult': registration, 'NeedlePlan': plan, 'ProcedureEvent': event, 'DoseRecord': dose}


@pytest.fixture
def peer(processes):
    proc = processes(PEER, name='interface_echo')
    testing.wait_for(lambda: 'READY' in proc.output() or not proc.alive(), 20, 'the echo peer to start')
    assert proc.alive(), proc.output()
    return proc


def test_each_message_type_crosses_processes(graph, peer):
    node = graph.create_node('probe')
    messages = sample_messages()
    received = {}
    publishers = {}
    for name, message in messages.items():
        msg_type = type(message)
        publishers[name] = node.create_publisher(msg_type, f'/probe/{name}', 10)
        node.create_subscription(msg_type, f'/echo/{name}', lambda m, n=name: received.setdefault(n, m), 10)
    testing.wait_for(lambda: all(p.get_subscription_count() > 0 for p in publishers.values())
                     and all(node.count_publishers(f'/echo/{n}') > 0 for n in messages),
                     20, 'discovery of the echo peer')
    for name, message in messages.items():
        publishers[name].publish(message)
    testing.wait_for(lambda: len(received) == len(messages), 20, 'all echoes')
    for name, message in messages.items():
        assert received[name] == message, name


def test_service_call_crosses_processes(graph, peer):
    node = graph.create_node('probe_client')
    client = node.create_client(SetScannerState, '/probe/set_scanner_state')
    assert client.wait_for_service(timeout_sec=20.0)
    ok = client.call(SetScannerState.Request(phase=igt_msg.ScannerState.PHASE_ACQUIRING), timeout_sec=10.0)
    assert ok.accepted and 'set' in ok.message
    refused = client.call(SetScannerState.Request(phase=77), timeout_sec=10.0)
    assert not refused.accepted and 'unknown phase 77' in refused.message


def test_action_goal_crosses_processes(graph, peer):
    node = graph.create_node('probe_action')
    client = ActionClient(node, MoveGuide, '/probe/move_guide')
    assert client.wait_for_server(timeout_sec=20.0)
    feedback = []
    goal = MoveGuide.Goal()
    goal.target.header.frame_id = 'base_link'
    goal.target.point.x = 0.0125
    send_future = client.send_goal_async(goal, feedback_callback=lambda f: feedback.append(f.feedback.progress))
    handle = testing.wait_for(lambda: send_future.done() and send_future.result(), 20, 'goal acceptance')
    assert handle.accepted
    result_future = handle.get_result_async()
    result = testing.wait_for(lambda: result_future.done() and result_future.result(), 20, 'the action result')
    assert result.status == 4  # action_msgs/GoalStatus.STATUS_SUCCEEDED
    assert result.result.error_code == MoveGuide.Result.SUCCEEDED
    assert result.result.final_positions[0] == pytest.approx(0.0125)
    testing.wait_for(lambda: feedback, 5, 'feedback')
    assert all(0.0 < p <= 1.0 for p in feedback)
