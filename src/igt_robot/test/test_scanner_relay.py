"""The in-process scanner relay (igt_robot.safety.scanner_relay): fan-out, isolation, registry."""
import pytest

from igt_robot.safety import scanner_relay
from igt_robot.safety.interlock import ScannerPhase
from igt_robot.safety.scanner_relay import ScannerRelay, ScannerSample

SAMPLE = ScannerSample(publisher=b'gid', node='/scanner_interface', phase=ScannerPhase.ACQUIRING, heartbeat=7,
                       received=12.5, stamp_age=0.001)


def test_every_listener_gets_the_sample_in_subscription_order():
    relay, got = ScannerRelay(), []
    relay.subscribe(lambda s: got.append(('first', s)))
    relay.subscribe(lambda s: got.append(('second', s)))
    relay.publish(SAMPLE)
    assert got == [('first', SAMPLE), ('second', SAMPLE)]


def test_a_failing_listener_is_reported_and_the_others_still_get_the_sample():
    errors, got = [], []
    relay = ScannerRelay(on_error=lambda listener, exc: errors.append(str(exc)))

    def broken(_sample):
        raise RuntimeError('listener bug')
    relay.subscribe(broken)
    relay.subscribe(got.append)
    relay.publish(SAMPLE)                          # does not raise into the receiving thread
    assert got == [SAMPLE] and errors == ['listener bug']


def test_subscribing_twice_delivers_once_and_unsubscribe_stops_delivery():
    relay, got = ScannerRelay(), []
    relay.subscribe(got.append)
    relay.subscribe(got.append)
    assert relay.listener_count == 1
    relay.publish(SAMPLE)
    relay.unsubscribe(got.append)
    relay.publish(SAMPLE)
    assert got == [SAMPLE] and relay.listener_count == 0


def test_a_listener_may_unsubscribe_itself_while_being_called():
    relay, got = ScannerRelay(), []

    def once(sample):
        got.append(sample)
        relay.unsubscribe(once)
    relay.subscribe(once)
    relay.subscribe(got.append)
    relay.publish(SAMPLE)
    relay.publish(SAMPLE)
    assert got == [SAMPLE, SAMPLE, SAMPLE]         # 'once' once, the other twice


def test_one_relay_per_hardware_node_name_whoever_asks_first():
    first = scanner_relay.relay_for('test_relay_hw_a')
    assert scanner_relay.relay_for('test_relay_hw_a') is first
    assert scanner_relay.relay_for('test_relay_hw_b') is not first
    with pytest.raises(ValueError, match='non-empty'):
        scanner_relay.relay_for('')
