"""Exit codes tell the truth: a failed simulated procedure exits non-zero, and fails fast on FAULT.

`make demo` (igt_robot.demo) and `ros2 launch igt_robot sim.launch.py` (procedure_node's exit code,
turned into the launch's by igt_robot.launch_support.end_launch_with) both end with the procedure's
outcome. Here procedure_node runs as its own process in demo mode against a safety supervisor stand-in
that reports a latched drive fault: the process must end promptly with a non-zero code and the fault's
reason, not time out with a wrong message.
"""
import threading
import types

import pytest

from igt_robot.nodes import qos, topics
from igt_robot.nodes.procedure_node import exit_code
from igt_robot.procedure.demo_run import DemoFailed, _settled
from igt_robot.waiting import wait_for
from igt_robot_msgs.msg import RobotState, SafetyFault, SafetyStatus


def _status(state, reason='', faults=()):
    return SafetyStatus(state=state, reason=reason, faults=list(faults), motion_permitted=state == 'READY')


def test_settled_waits_through_init_and_scan_hold_and_fails_at_once_on_fault_or_estop():
    assert _settled(None) is None
    assert _settled(_status('INIT')) is None
    assert _settled(_status('SCAN_HOLD')) is None
    assert _settled(_status('HOLD')).state == 'HOLD'
    watchdog = SafetyFault(code='WATCHDOG', detail='drive watchdog expired on stage_x')
    with pytest.raises(DemoFailed, match='FAULT: Motion halted: fault WATCHDOG.*WATCHDOG: drive watchdog expired'):
        _settled(_status('FAULT', 'Motion halted: fault WATCHDOG', [watchdog]))
    with pytest.raises(DemoFailed, match='ESTOP'):
        _settled(_status('ESTOP', 'e-stop pressed'))


def _node(demo, done, error):
    event = threading.Event()
    if done:
        event.set()
    return types.SimpleNamespace(p={'demo': demo}, demo_done=event, demo_error=error)


def test_exit_code_is_non_zero_only_for_a_failed_or_unfinished_demo():
    assert exit_code(_node(demo=True, done=True, error=None)) == 0
    assert exit_code(_node(demo=True, done=True, error='DemoFailed: plan: no feasible path')) == 1
    assert exit_code(_node(demo=True, done=False, error=None)) == 1      # stopped before the end
    assert exit_code(_node(demo=False, done=False, error=None)) == 0     # operator-driven: Ctrl-C is the end
    assert exit_code(None) == 1


def test_procedure_process_exits_non_zero_with_the_fault_reason(graph, processes, tmp_path):
    stand_in = graph.create_node('supervisor_stand_in')
    status_pub = stand_in.create_publisher(SafetyStatus, topics.SAFETY_STATUS, qos.SAFETY_LATCHED)
    robot_pub = stand_in.create_publisher(RobotState, topics.ROBOT_STATE, qos.STATE_STREAM)
    fault = SafetyFault(code='WATCHDOG', detail='drive watchdog expired', latched=True, cause_active=True)
    status_pub.publish(_status('FAULT', 'Motion halted: fault WATCHDOG (drive watchdog expired)', [fault]))
    robot_pub.publish(RobotState())
    procedure = processes('igt_robot.nodes.procedure_node', '--ros-args', '-p', 'demo:=true',
                          '-p', 'exit_when_done:=true', '-p', f'record_dir:={tmp_path / "record"}',
                          '-p', 'procedure_id:=exit-code-test', name='procedure_node')
    # RobotState is a stream (best effort, volatile): keep it coming until the process ends.
    code = wait_for(lambda: robot_pub.publish(RobotState()) or (not procedure.alive() and 'exited'), 120,
                    'procedure_node to end', poll=0.1)
    assert code == 'exited'
    output = procedure.output()
    assert procedure.stop() == 1, output
    assert 'FAILED' in output and 'WATCHDOG' in output and 'INIT/SCAN_HOLD' not in output, output
