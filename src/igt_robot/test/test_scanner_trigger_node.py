"""scanner_trigger: /scanner/state to the controller's trigger port (emulator process, real DDS in-process)."""
import pytest
import rclpy
from rclpy.parameter import Parameter

from igt_robot import testing
from igt_robot.hardware.emulator import EmulatorProcess
from igt_robot.nodes import qos, topics
from igt_robot.nodes.scanner_trigger_node import ScannerTriggerNode
from igt_robot_msgs.msg import ScannerState


@pytest.fixture
def emulator():
    # The port's silence limit: long enough that a relay thread stalled by a loaded test machine does not trip it
    # (a test here is about the scanner, not about the relay's own silence, but for the last one).
    with EmulatorProcess('--watchdog-ms', '1000') as emu:
        yield emu


class Scanner:
    """A publisher of /scanner/state owned by a node of the given name."""

    def __init__(self, graph, name):
        self.node = graph.add(rclpy.create_node(name, context=graph.context))
        self.pub = self.node.create_publisher(ScannerState, topics.SCANNER_STATE, qos.SCANNER_STATE)
        self.beat = 0

    def say(self, phase):
        self.beat += 1
        msg = ScannerState(phase=phase, source='test', heartbeat=self.beat)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.pub.publish(msg)


def port_level(emulator):
    return emulator.state()['trigger_inputs']['PORT']


def make_node(graph, emulator, **params):
    overrides = [Parameter('trigger_port', value=emulator.trigger_pty_path)]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    return graph.add(ScannerTriggerNode(context=graph.context, parameter_overrides=overrides))


def test_the_scanner_state_drives_the_trigger_port_and_only_the_configured_source_lowers_it(graph, emulator):
    node = make_node(graph, emulator)
    try:
        scanner = Scanner(graph, 'scanner_interface')
        rogue = Scanner(graph, 'rogue_scanner')
        testing.wait_for(lambda: emulator.state()['trigger_port']['armed'], 10, 'the relay to speak on the port')
        assert port_level(emulator)                     # nothing heard from the scanner yet: imaging

        def say_until(source, phase, level, what, also=None):
            def step():
                source.say(phase)
                if also is not None:
                    also.say(ScannerState.PHASE_IDLE)   # the configured source stays fresh meanwhile
                return port_level(emulator) == level
            testing.wait_for(step, 10, what)

        say_until(scanner, ScannerState.PHASE_IDLE, False, 'a fresh IDLE from the configured source to lower it')
        scanner.say(ScannerState.PHASE_ACQUIRING)
        testing.wait_for(lambda: port_level(emulator), 10, 'ACQUIRING to raise the level')
        assert emulator.state()['inhibited']            # the controller latched its inhibit by itself
        say_until(scanner, ScannerState.PHASE_IDLE, False, 'IDLE to lower it again')
        rogue.say(ScannerState.PHASE_PREPARING)         # imaging from anyone raises it
        testing.wait_for(lambda: port_level(emulator), 10, 'a foreign PREPARING to raise the level')
        say_until(rogue, ScannerState.PHASE_IDLE, False, "a foreign IDLE to end the foreign node's own imaging",
                  also=scanner)
        scanner.say(ScannerState.PHASE_ACQUIRING)
        testing.wait_for(lambda: port_level(emulator), 10, 'the configured ACQUIRING to raise the level')
        heard = node._subscription.messages
        for _ in range(5):
            rogue.say(ScannerState.PHASE_IDLE)          # ... but never the configured source's imaging
        testing.wait_for(lambda: node._subscription.messages >= heard + 5, 10, "the foreign IDLEs to arrive")
        assert port_level(emulator) and node.level
        before = len(node.changes)
        say_until(scanner, ScannerState.PHASE_IDLE, False, 'the configured IDLE to lower it')
        assert (False, 'scanner idle') in [(level, why) for _, level, why in list(node.changes)[before - 1:]]
        assert node.failures == 0
    finally:
        node.shutdown()


def test_a_silent_scanner_raises_the_level_within_the_staleness_limit(graph, emulator):
    node = make_node(graph, emulator, scanner_timeout=0.12, scanner_period=0.05)
    try:
        scanner = Scanner(graph, 'scanner_interface')
        testing.wait_for(lambda: scanner.say(ScannerState.PHASE_IDLE) or not port_level(emulator), 10,
                         'the level to fall on IDLE')
        # The scanner goes quiet: the relay's staleness check raises the level, no message needed.
        testing.wait_for(lambda: port_level(emulator) and 'stale' in node.reason, 5, 'the level to rise on silence')
        assert not emulator.state()['trigger_port']['silent']     # raised by the relay's word, not its silence
    finally:
        node.shutdown()


def test_the_relay_going_away_leaves_the_controller_reading_imaging(graph, emulator):
    node = make_node(graph, emulator)
    scanner = Scanner(graph, 'scanner_interface')
    testing.wait_for(lambda: scanner.say(ScannerState.PHASE_IDLE) or not port_level(emulator), 10,
                     'the level to fall on IDLE')
    node.shutdown()                                    # the port is closed without another word
    testing.wait_for(lambda: emulator.state()['trigger_port']['silent'], 5, 'the port to read as imaging')
    assert port_level(emulator)


def test_an_empty_trigger_port_is_refused_with_its_name(graph):
    with pytest.raises(ValueError, match="'trigger_port' is empty"):
        ScannerTriggerNode(context=graph.context)
