"""The procedure node's service calls: an idempotent request with no answer is sent again, others are not.

Fast DDS drops a server's answer when the caller's reply reader is not matched within 100 ms (a server
process that has just started, on a loaded machine). The stand-in server here never answers its first
request in time, as such a dropped answer looks to the caller.
"""
import threading
import types

import pytest
from action_msgs.srv import CancelGoal
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.task import Future

from igt_robot.nodes import procedure_node
from igt_robot.nodes.procedure_node import NoAnswer, ProcedureNode
from igt_robot import testing
from igt_robot_msgs.action import InsertNeedle
from igt_robot_msgs.srv import SetScannerState


@pytest.fixture
def first_answer_lost(graph, monkeypatch):
    monkeypatch.setattr(procedure_node, 'IDEMPOTENT_RETRY_S', 0.5)
    release = threading.Event()
    requests = []

    def serve(request, response):
        requests.append(request.protocol_name)
        if len(requests) == 1:
            release.wait(30)            # this answer comes too late: the caller has moved on
        response.accepted, response.message = True, f'answer {len(requests)}'
        return response
    server_node = graph.create_node('scanner_stand_in')
    server_node.create_service(SetScannerState, '/test/set_state', serve, callback_group=ReentrantCallbackGroup())
    caller = graph.create_node('caller')
    client = caller.create_client(SetScannerState, '/test/set_state')
    stub = types.SimpleNamespace(p={'service_timeout': 20.0}, _waiting=set(), _loss_reason='',
                                 get_logger=caller.get_logger, _operator_token=lambda: 'token')
    stub._wait_future = types.MethodType(ProcedureNode._wait_future, stub)
    yield stub, client, requests
    release.set()


def test_an_idempotent_request_without_an_answer_is_sent_again(first_answer_lost):
    stub, client, requests = first_answer_lost
    reply = ProcedureNode._call(stub, client, SetScannerState.Request(protocol_name='control scan'), idempotent=True)
    assert reply.accepted and reply.message == 'answer 2'
    assert requests == ['control scan', 'control scan']


def test_other_requests_are_sent_once_and_fail_with_the_reason(first_answer_lost):
    stub, client, requests = first_answer_lost
    stub.p['service_timeout'] = 1.0
    with pytest.raises(NoAnswer, match='did not answer within 1 s'):
        ProcedureNode._call(stub, client, SetScannerState.Request(protocol_name='registration'))
    assert requests == ['registration']


def test_a_goal_without_an_answer_cancels_every_goal_of_the_action(graph):
    """Its acceptance may have been lost on the way while the goal moves the robot: nobody would wait for it."""
    cancels = []

    def serve_cancel(request, response):
        cancels.append(bytes(request.goal_info.goal_id.uuid))
        return response
    server_node = graph.create_node('controller_stand_in')
    server_node.create_service(CancelGoal, '/test/insert/_action/cancel_goal', serve_cancel)
    caller = graph.create_node('caller')
    events = []
    stub = types.SimpleNamespace(
        p={'service_timeout': 0.5}, _waiting=set(), _loss_reason='', get_logger=caller.get_logger,
        _wait_drive_released=lambda: None, _active_goal=None,
        _event=lambda kind, text, severity: events.append(kind),
        _cancel_all_clients={'/test/insert': caller.create_client(CancelGoal, '/test/insert/_action/cancel_goal')})
    stub._wait_future = types.MethodType(ProcedureNode._wait_future, stub)
    stub._cancel_all_goals = types.MethodType(ProcedureNode._cancel_all_goals, stub)
    assert stub._cancel_all_clients['/test/insert'].wait_for_service(timeout_sec=10)
    unanswered = types.SimpleNamespace(_action_name='/test/insert', wait_for_server=lambda timeout_sec: True,
                                       send_goal_async=lambda goal: Future())
    with pytest.raises(NoAnswer, match=r'/test/insert \(goal\) did not answer'):
        ProcedureNode._run_action(stub, unanswered, InsertNeedle.Goal(target_depth=0.01))
    testing.wait_for(lambda: cancels, 10, 'the cancel-all request')
    assert cancels == [bytes(16)] and events == ['motion_cancelled']     # zero goal id: every goal
