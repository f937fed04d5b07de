"""Process-wide interpreter settings of igt_robot.nodes.spinning."""
import sys

import pytest

from igt_robot import testing
from igt_robot.nodes import spinning


@pytest.fixture
def switch_interval():
    """Restores the process's interpreter-lock switch interval after the test."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_switch_interval_is_shortened_from_the_default(switch_interval):
    sys.setswitchinterval(0.005)                    # CPython's default
    spinning.shorten_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(spinning.GIL_SWITCH_INTERVAL_S, abs=2e-6)


def test_a_shorter_switch_interval_chosen_by_the_process_is_kept(switch_interval):
    sys.setswitchinterval(0.0002)
    spinning.shorten_gil_switch_interval()
    assert sys.getswitchinterval() == pytest.approx(0.0002, abs=2e-6)


def _direct(graph, callback, on_error=None):
    """A node nobody spins, with a DirectSubscription on /direct_test; and a publisher on a spun node."""
    import rclpy
    from std_msgs.msg import Int32
    node = rclpy.create_node('direct_subscriber', context=graph.context)
    direct = spinning.DirectSubscription(node, Int32, '/direct_test', 10, callback, name='direct-test',
                                         on_error=on_error)
    publisher_node = graph.add(rclpy.create_node('direct_publisher', context=graph.context))
    publisher = publisher_node.create_publisher(Int32, '/direct_test', 10)
    return node, direct, publisher, Int32


def _publish_until_matched(publisher, msg_type):
    testing.wait_for(lambda: publisher.get_subscription_count() > 0, 10, 'the direct subscription matched')
    for value in range(5):
        publisher.publish(msg_type(data=value))


def test_a_direct_subscription_serves_its_messages_with_their_info_and_no_executor(graph):
    """The scanner path's subscription: every message, in order, with the publisher's gid (the authority
    check needs it), although no executor spins its node."""
    received = []
    node, direct, publisher, Int32 = _direct(graph, lambda msg, info: received.append((msg.data, info)))
    try:
        _publish_until_matched(publisher, Int32)
        testing.wait_for(lambda: len(received) == 5, 10, 'five messages through the direct subscription')
        assert [data for data, _ in received] == [0, 1, 2, 3, 4]
        assert all(info['publisher_gid'] for _, info in received)
        assert all(info['received_timestamp'] >= info['source_timestamp'] > 0 for _, info in received)
        assert direct.messages == 5
    finally:
        direct.stop()
        node.destroy_node()


def test_a_failing_callback_is_reported_and_the_next_message_still_served(graph):
    served, errors = [], []

    def callback(msg, info):
        served.append(msg.data)
        if msg.data == 1:
            raise ValueError('callback broke on 1')
    node, direct, publisher, Int32 = _direct(graph, callback, on_error=errors.append)
    try:
        _publish_until_matched(publisher, Int32)
        testing.wait_for(lambda: len(served) == 5, 10, 'all five messages served')
        assert [str(e) for e in errors] == ['callback broke on 1']
    finally:
        direct.stop()
        node.destroy_node()


def test_a_direct_subscription_stops_at_once_and_with_its_context():
    import threading

    import rclpy
    from std_msgs.msg import Int32
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('direct_stopping', context=context)
    first = spinning.DirectSubscription(node, Int32, '/direct_a', 10, lambda *_: None, name='direct-a',
                                        poll_sec=30.0)
    second = spinning.DirectSubscription(node, Int32, '/direct_b', 10, lambda *_: None, name='direct-b',
                                         poll_sec=30.0)
    try:
        first.stop(timeout_sec=5.0)         # woken by its guard condition, not by the 30 s wait ending
        assert not first._thread.is_alive()
        rclpy.shutdown(context=context)     # the context going away wakes the other
        second._thread.join(5.0)
        assert not second._thread.is_alive()
        assert 'direct-a' not in [t.name for t in threading.enumerate()]
    finally:
        second.stop()
        node.destroy_node()
        if context.ok():
            rclpy.shutdown(context=context)
