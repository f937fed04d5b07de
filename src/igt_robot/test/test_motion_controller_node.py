"""Motion controller node in the in-process safety stack (MuJoCo backend, real DDS).

hardware_node + scanner_interface + safety_supervisor + motion_controller run in
one executor from config/*.yaml, as `igt-bringup --profile safety` runs them.
"""
import math
import time

import numpy as np
import pytest

from igt_robot import testing
from igt_robot.bringup import Bringup
from igt_robot_msgs.action import InsertNeedle, MoveGuide
from igt_robot_msgs.msg import ScannerState
from stack_probe import StackProbe, line_goal


SAFETY_STACK = ['hardware_node', 'scanner_interface', 'safety_supervisor', 'motion_controller']
# A reachable line in base_link: entry below the RCM plane, target 60 mm deeper, slightly oblique.
ENTRY = (0.004, -0.003, -0.010)
TARGET = (0.010, 0.002, -0.070)


# The hardware node's own scanner-staleness interlock (0.15 s in config) and the tracking monitor are
# exercised by their own tests; here a loaded test machine must not turn late scanner heartbeats
# into (safe but) spurious stops of the behaviour under test.
TEST_OVERRIDES = {'hardware_node': {'scanner_timeout': 0.5, 'scanner_period': 0.2},
                  'motion_controller': {'tracking_tolerance': [0.004, 0.004, 0.06, 0.06, 0.004],
                                        'tracking_hard_limit': [0.01, 0.01, 0.15, 0.15, 0.01]},
                  'safety_supervisor': {'heartbeat_timeout_s': 3.0, 'scanner_timeout_s': 2.0}}


@pytest.fixture
def stack():
    # The probe is built before the stack spins: creating entities in a context whose executor is already
    # waiting in another thread crashed the test process once in nine full runs (segfault in create_subscription).
    bringup = Bringup(SAFETY_STACK, overrides=TEST_OVERRIDES)
    try:
        probe = StackProbe(bringup.context, bringup.executor)
        bringup.adopt(probe.node)     # destroyed with the stack, its action clients first
    except BaseException:
        bringup.shutdown()
        raise
    with bringup:
        yield bringup, probe


def test_move_guide_aligns_on_the_line(stack):
    bringup, probe = stack
    probe.make_ready()
    handle = probe.send(probe.move, line_goal(ENTRY, TARGET))
    assert handle.accepted
    result = probe.result(handle)
    assert result.error_code == MoveGuide.Result.SUCCEEDED, result.message
    kinematics = bringup.nodes['motion_controller'].kinematics
    q = np.array(result.final_positions)
    # The needle line through the measured joints passes within 0.5 mm of the planned target.
    rcm, direction = kinematics.rcm(q), kinematics.needle_direction(q)
    miss = np.linalg.norm(np.cross(np.subtract(TARGET, rcm), direction))
    assert miss < 0.0005
    assert q[-1] == pytest.approx(0.0, abs=2e-4)  # aligning never inserts the needle


@pytest.mark.parametrize('goal, code, words', [
    (line_goal((math.nan, 0, -0.01), TARGET), MoveGuide.Result.INVALID_GOAL, 'non-finite'),
    (line_goal(ENTRY, TARGET, frame='map'), MoveGuide.Result.INVALID_GOAL, "frame 'map' unknown"),
    (line_goal(ENTRY, TARGET, frame='scanner'), MoveGuide.Result.INVALID_GOAL, 'no registration'),
    (line_goal((0.0, 0.0, -0.01), (0.09, 0.0, -0.03)), MoveGuide.Result.UNREACHABLE, 'beyond'),
    (line_goal(ENTRY, ENTRY), MoveGuide.Result.INVALID_GOAL, 'invalid needle line'),
], ids=['nan', 'unknown-frame', 'scanner-without-registration', 'unreachable', 'zero-length'])
def test_bad_move_goals_are_refused_with_the_reason(stack, goal, code, words):
    _, probe = stack
    probe.make_ready()
    before = probe.positions()
    result = probe.result(probe.send(probe.move, goal))
    assert result.error_code == code
    assert words in result.message
    assert np.allclose(probe.positions(), before, atol=1e-5)  # nothing moved


def test_insert_beyond_the_needle_range_is_unreachable(stack):
    _, probe = stack
    probe.make_ready()
    result = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.2)))
    assert result.error_code == InsertNeedle.Result.UNREACHABLE
    assert 'outside the insertion range' in result.message
    result = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=math.inf)))
    assert result.error_code == InsertNeedle.Result.INVALID_GOAL


def test_goal_while_scanning_is_refused_and_nothing_moves(stack):
    _, probe = stack
    probe.make_ready()
    assert probe.scan(ScannerState.PHASE_ACQUIRING).accepted
    probe.wait_status(lambda s: not s.motion_permitted, 'permission withdrawn by the scan')
    result = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.01)))
    assert result.error_code == InsertNeedle.Result.INTERLOCK
    assert 'ACQUIRING' in result.message or 'scan' in result.message.lower()


def test_scan_mid_motion_stops_and_motion_resumes_only_after_explicit_resume(stack):
    _, probe = stack
    probe.make_ready()
    handle = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.03))
    assert handle.accepted
    probe.wait_status(lambda s: probe.robot is not None and probe.robot.position[-1] > 0.003, 'insertion under way')
    assert probe.scan(ScannerState.PHASE_ACQUIRING).accepted
    result = probe.result(handle)
    assert result.error_code == InsertNeedle.Result.INTERLOCK, result.message
    probe.wait_still()
    stopped_at = probe.positions()[-1]
    assert 0.003 < stopped_at < 0.03
    # Scan over: the supervisor waits for the operator; a new goal is refused until then.
    assert probe.scan(ScannerState.PHASE_IDLE).accepted
    status = probe.wait_status(lambda s: s.state == 'HOLD', 'hold after the scan')
    assert not status.motion_permitted and status.awaiting_resume
    refused = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.03)))
    assert refused.error_code == InsertNeedle.Result.INTERLOCK
    assert probe.after_more_states()[-1] == pytest.approx(stopped_at, abs=2e-5)
    assert probe.resume().success
    probe.wait_status(lambda s: s.motion_permitted, 'permitted after resume')
    probe.wait_drive_released()
    done = probe.result(probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.03)))
    assert done.error_code == InsertNeedle.Result.SUCCEEDED, done.message
    assert done.depth == pytest.approx(0.03, abs=3e-4)
    kinds = {e.kind for e in probe.events}
    assert 'insert_needle_aborted' in kinds and 'safety_transition' in kinds


def test_second_goal_is_rejected_and_cancel_really_stops(stack):
    _, probe = stack
    probe.make_ready()
    first = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.04))
    assert first.accepted
    probe.wait_status(lambda s: probe.robot is not None and probe.robot.position[-1] > 0.002, 'insertion under way')
    second = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.01))
    assert not second.accepted  # one motion goal at a time (goal_policy: reject)
    first.cancel_goal_async()
    result = probe.result(first)
    assert result.error_code == InsertNeedle.Result.CANCELED, result.message
    probe.wait_still()
    held = probe.positions()[-1]
    assert held < 0.04 - 1e-3
    # Holding: the drive stays where the controlled stop ended.
    assert probe.after_more_states()[-1] == pytest.approx(held, abs=2e-5)


def _stall_host(bringup, seconds):
    """Pause the host side of the stream: the streaming cycle cannot run while we hold its lock."""
    node = bringup.nodes['motion_controller']
    with node.motion_lock:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)


def test_host_stall_shorter_than_the_lookahead_changes_nothing(stack):
    bringup, probe = stack
    node = bringup.nodes['motion_controller']
    probe.make_ready()
    underruns = node.stream_figures()['underruns']
    handle = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.01))
    assert handle.accepted
    probe.wait_status(lambda s: probe.robot is not None and probe.robot.position[-1] > 0.002, 'insertion under way')
    _stall_host(bringup, 0.5 * node.p['lookahead'])
    result = probe.result(handle)
    assert result.error_code == InsertNeedle.Result.SUCCEEDED, result.message
    assert result.depth == pytest.approx(0.01, abs=3e-4)
    assert node.stream_figures()['underruns'] == underruns


def test_host_stall_longer_than_the_lookahead_is_an_underrun_stop(stack):
    bringup, probe = stack
    node = bringup.nodes['motion_controller']
    probe.make_ready()
    handle = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.03))
    assert handle.accepted
    probe.wait_status(lambda s: probe.robot is not None and probe.robot.position[-1] > 0.002, 'insertion under way')
    _stall_host(bringup, node.p['lookahead'] + 0.5)
    result = probe.result(handle)
    assert result.error_code == InsertNeedle.Result.HARDWARE_FAULT, result.message
    assert 'UNDERRUN' in result.message
    probe.wait_still()
    assert 0.002 < probe.positions()[-1] < 0.03
    # A controlled stop the operator must see: latched as a hardware fault by the supervisor.
    status = probe.wait_status(lambda s: any(f.code == 'HARDWARE_FAULT' for f in s.faults),
                               'the underrun stop reported to the supervisor')
    assert not status.motion_permitted
    assert any('UNDERRUN' in f.detail for f in status.faults if f.code == 'HARDWARE_FAULT')


def test_robot_state_reports_the_controller_buffer(stack):
    _, probe = stack
    probe.make_ready()
    handle = probe.send(probe.insert, InsertNeedle.Goal(target_depth=0.006))
    assert handle.accepted
    state = probe.wait_status(lambda s: probe.robot is not None and probe.robot.buffer_lookahead > 0.1,
                              'the streamed look-ahead in /robot/state') and probe.robot
    assert state.buffer_lookahead <= 1.0 and state.buffer_underruns == 0
    assert probe.result(handle).error_code == InsertNeedle.Result.SUCCEEDED


def test_a_stack_shut_down_leaves_no_action_server_on_the_graph(graph):
    """Its action servers go with it, and with them its DDS participant: a stack brought up again in the same
    process must not find the old servers announced beside the new ones."""
    observer = graph.create_node('observer')

    def status_publishers():
        return len(observer.get_publishers_info_by_topic('/motion/insert_needle/_action/status'))
    stack = Bringup(['motion_controller'], overrides=TEST_OVERRIDES).start()
    try:
        testing.wait_for(lambda: status_publishers() == 1, 20, 'the insert_needle server in the graph')
    finally:
        stack.shutdown()
    testing.wait_for(lambda: status_publishers() == 0, 20, 'the server gone with the stack (still referenced here)')
    assert stack.nodes['motion_controller'] is not None       # the node object lives on; its server does not
