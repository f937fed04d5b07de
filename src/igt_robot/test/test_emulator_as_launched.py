"""The emulator started as sim.launch.py starts it, and the hardware node waiting for its port.

launch_ros starts the emulator as a Node (its arguments followed by ``--ros-args ...``) at the same
time as the hardware node; the emulator's pty link appears a moment later, so the hardware node
retries opening the port for ``serial_connect_timeout`` instead of failing its configure at once.
"""
import threading

from rclpy.lifecycle import TransitionCallbackReturn

from igt_robot.nodes.hardware_node import HardwareNode
from igt_robot.waiting import wait_for


def _node(graph, **params):
    args = ['--ros-args'] + [a for key, value in {'autostart': False, **params}.items()
                             for a in ('-p', f'{key}:={str(value).lower() if isinstance(value, bool) else value}')]
    return graph.add(HardwareNode(context=graph.context, cli_args=args))


def test_hardware_node_waits_for_the_emulator_port_that_appears_later(graph, processes, tmp_path):
    link = tmp_path / 'emulator_pty'
    node = _node(graph, backend='serial', serial_port=str(link), serial_connect_timeout=30.0)
    outcome = {}
    configuring = threading.Thread(target=lambda: outcome.setdefault('configure', node.trigger_configure()))
    configuring.start()
    # The port is not there yet: the node keeps trying rather than failing.
    assert not link.exists() and node.lifecycle_state() in ('unconfigured', 'configuring')
    emulator = processes('igt_robot.hardware.emulator', '--link', str(link), '--watchdog-ms', '500',
                         '--ros-args', '-r', '__node:=firmware_emulator', name='emulator')
    wait_for(lambda: not configuring.is_alive(), 40, 'the configure to finish', poll=0.05)
    assert emulator.alive(), emulator.output()
    assert outcome['configure'] == TransitionCallbackReturn.SUCCESS, node.last_failure
    node.trigger_cleanup()


def test_without_patience_a_missing_port_fails_at_once_naming_it(graph, tmp_path):
    node = _node(graph, backend='serial', serial_port=str(tmp_path / 'nothing_here'))
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'nothing_here' in node.last_failure and 'retried' not in node.last_failure
