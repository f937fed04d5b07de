"""Parameters never lie (issue 11): every parameter of the safety nodes is either refused at run time or,
when accepted, in force at once. Each node's every parameter is set to another valid value here."""
import pytest
import rclpy
from rclpy.parameter import Parameter

from igt_robot.nodes.hardware_node import HardwareNode
from igt_robot.nodes.safety_supervisor_node import SafetySupervisorNode
from igt_robot.nodes.scanner_interface_node import ScannerInterfaceNode
from igt_robot.nodes.scanner_trigger_node import ScannerTriggerNode

# rclpy's own parameter, applied live by rclpy itself (the node clock follows it).
RCLPY_OWN = {'use_sim_time'}


def other_value(value):
    """A different value of the same type (what a careless or hostile `ros2 param set` would send)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value > 0 else 0.01
    if isinstance(value, str):
        return value + 'x'
    if isinstance(value, (list, tuple)) or hasattr(value, 'tolist'):
        values = list(value)
        return values[:-1] if values else None
    return None


def in_force_checks(node):
    """Live parameters and how to see that the new value is the one in force."""
    if isinstance(node, SafetySupervisorNode):
        return {'max_insertion_depth': lambda v: node.supervisor._max_insertion == pytest.approx(v)}
    return {}


@pytest.mark.parametrize('make, args', [
    (HardwareNode, ['-p', 'autostart:=false']),
    (SafetySupervisorNode, ['-p', 'max_insertion_depth:=0.1']),
    (ScannerInterfaceNode, ['-p', 'sources:=[service]']),
    # No controller here: the relay waits for its port (reconnect_period) and its parameters are what is tested.
    (ScannerTriggerNode, ['-p', 'trigger_port:=/nonexistent/igt-trigger-port']),
], ids=['hardware_node', 'safety_supervisor', 'scanner_interface', 'scanner_trigger'])
def test_each_parameter_is_refused_or_in_force(graph, make, args):
    node = graph.add(make(context=graph.context, cli_args=['--ros-args', *args]))
    checks = in_force_checks(node)
    names = [n for n in node._parameters if n not in RCLPY_OWN]
    assert names, 'the node declares parameters'
    accepted = []
    for name in names:
        before = node._parameters[name].value           # None: declared by type only (unset)
        new = other_value(before) if before is not None else [0.5, 0.5, 0.5]
        if new is None:
            continue
        result = node.set_parameters([Parameter(name, value=new)])[0]
        after = node._parameters[name].value
        if result.successful:
            assert name in checks, f'{name} accepted a change but nothing applies it (a lying parameter)'
            assert checks[name](after), f'{name} reports {after!r} but another value is in force'
            accepted.append(name)
        else:
            assert result.reason, f'{name}: a refusal says why'
            assert after == before, f'{name}: refused but changed'
    assert sorted(accepted) == sorted(n for n in checks if n in names)


def test_supervisor_depth_limit_is_applied_within_the_configured_limit(graph):
    node = graph.add(SafetySupervisorNode(context=graph.context,
                                          cli_args=['--ros-args', '-p', 'max_insertion_depth:=0.1']))
    assert node.set_parameters([Parameter('max_insertion_depth', value=0.04)])[0].successful
    assert node.supervisor._max_insertion == pytest.approx(0.04)
    refused = node.set_parameters([Parameter('max_insertion_depth', value=-1.0)])[0]   # the attack of issue 11
    assert not refused.successful and node.supervisor._max_insertion == pytest.approx(0.04)
    assert node.get_parameter('max_insertion_depth').value == pytest.approx(0.04)


def test_parameter_set_through_the_service_is_refused_with_the_reason(graph):
    """The path `ros2 param set` takes (the parameter service), from another node."""
    from rcl_interfaces.srv import SetParameters
    from igt_robot import testing
    graph.add(HardwareNode(context=graph.context, cli_args=['--ros-args', '-p', 'autostart:=false']))
    client_node = graph.create_node('param_setter')
    client = client_node.create_client(SetParameters, '/hardware_node/set_parameters')
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(SetParameters.Request(
        parameters=[Parameter('scanner_timeout', value=2.0).to_parameter_msg()]))
    reply = testing.wait_for(lambda: future.done() and future.result(), 10, 'the set_parameters reply')
    assert not reply.results[0].successful and 'read-only' in reply.results[0].reason
    _ = rclpy  # imported for the graph fixture's rclpy context
