"""Control core: fixed-rate loop scheduling, tracking monitor, goal manager, motion executor."""
import threading

import numpy as np
import pytest

from igt_robot.control import (ExecutorMode, FixedRateLoop, GoalManager, GoalState, GoalStateError,
                               MotionExecutor, ResultCode, TrackingMonitor)
from igt_robot.hardware.interface import HardwareFault, HardwareInterface, HardwareState
from igt_robot.safety import SafetyConfig, SafetyState, SafetySupervisor
from igt_robot.trajectory import JointLimits

NAMES = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
VEL = np.array([0.010, 0.010, 0.20, 0.20, 0.005])
ACC = np.array([0.02, 0.02, 0.5, 0.5, 0.01])
LOWER = np.array([-0.04, -0.04, -0.5236, -0.5236, 0.0])
UPPER = np.array([0.04, 0.04, 0.5236, 0.5236, 0.150])
DT = 0.001


# --------------------------------------------------------------------------- loop
class FakeClock:
    """Simulated monotonic clock: sleep advances it exactly; steps may cost time."""

    def __init__(self, t0=100.0):
        self.t = t0

    def __call__(self):
        return self.t

    def sleep(self, d):
        assert d >= 0
        self.t += d


def test_loop_keeps_absolute_deadlines_without_drift():
    clock = FakeClock()
    starts = []

    def step(now):
        starts.append(now)
        clock.t += 0.0003          # the work takes 0.3 ms

    loop = FixedRateLoop(step, rate_hz=1000, spin_s=0.0, clock=clock, sleep=clock.sleep)
    stats = loop.run(max_cycles=5000)
    starts = np.array(starts)
    grid = starts[0] + np.arange(starts.size) * 1e-3
    assert stats.cycles == 5000 and stats.overruns == 0
    assert np.max(np.abs(starts - grid)) < 1e-9          # 5000 cycles later still on the grid
    assert stats.period_error_max < 1e-9 and stats.mean_period == pytest.approx(1e-3, rel=1e-9)


@pytest.mark.parametrize('cost_periods,expected_next,skipped,max_error',
                         [(1.4, 11.4, 0, 0.4e-3),    # < 1 period late: catch up at once
                          (2.5, 13.0, 2, 2.0e-3)])   # whole slots lost: skip them
def test_loop_counts_overruns_and_resyncs_to_the_grid(cost_periods, expected_next, skipped, max_error):
    clock = FakeClock(0.0)
    starts = []

    def step(now):
        starts.append(now)
        clock.t += (cost_periods if len(starts) == 11 else 0.1) * 1e-3

    loop = FixedRateLoop(step, rate_hz=1000, spin_s=0.0, clock=clock, sleep=clock.sleep)
    stats = loop.run(max_cycles=20)
    assert stats.overruns == 1 and stats.skipped_cycles == skipped
    assert starts[11] == pytest.approx(expected_next * 1e-3)
    # Afterwards back on the original 1 ms grid (no phase drift from the overrun).
    later = np.array(starts[12:]) / 1e-3
    assert np.allclose(later, np.round(later), atol=1e-6)
    assert stats.period_error_max == pytest.approx(max_error, rel=1e-6)


def test_loop_stops_on_false_and_propagates_errors():
    clock = FakeClock()
    n = []
    loop = FixedRateLoop(lambda now: n.append(now) or len(n) < 7, rate_hz=500, spin_s=0.0,
                         clock=clock, sleep=clock.sleep)
    assert loop.run().cycles == 7

    def bad(now):
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        FixedRateLoop(bad, clock=clock, sleep=clock.sleep, spin_s=0.0).run()
    with pytest.raises(ValueError, match='rate_hz'):
        FixedRateLoop(lambda now: None, rate_hz=0)
    with pytest.raises(ValueError, match='spin_s'):
        FixedRateLoop(lambda now: None, rate_hz=1000, spin_s=0.002)


def test_loop_in_thread_runs_and_stops():
    seen = threading.Event()
    count = [0]

    def step(now):
        count[0] += 1
        if count[0] >= 50:
            seen.set()

    loop = FixedRateLoop(step, rate_hz=1000)
    loop.start()
    try:
        assert seen.wait(timeout=10.0)
    finally:
        assert loop.stop(timeout=5.0)
    assert not loop.running and loop.error is None
    s = loop.stats()
    assert s.cycles >= 50 and s.period_error_p99 >= s.period_error_p50 >= 0.0

    def bad(now):
        raise RuntimeError('step failed')

    failing = FixedRateLoop(bad, rate_hz=1000)
    failing.start()
    assert failing.join(timeout=10.0)
    assert isinstance(failing.error, RuntimeError) and not failing.running


# ----------------------------------------------------------------------- tracking
def test_tracking_monitor_consecutive_and_hard_limit():
    mon = TrackingMonitor(tolerance=[1e-3, 1e-2], hard_limit=[5e-3, 5e-2], consecutive_cycles=3,
                          joint_names=('a', 'b'))
    assert mon.update([0, 0], [0.0015, 0]) is None
    assert mon.update([0, 0], [0.0015, 0]) is None
    assert mon.update([0, 0], [0.0005, 0]) is None          # back within: counter resets
    assert mon.update([0, 0], [0.0015, 0]) is None
    assert mon.update([0, 0], [0.0015, 0]) is None
    fault = mon.update([0, 0], [-0.0015, 0])
    assert fault is not None and fault.joint == 'a' and fault.kind == 'tolerance' and fault.cycles == 3
    assert mon.update([0, 0], [0, 0]) is fault                # latched
    mon.reset()
    fault = mon.update([0, 0], [0, 0.06])
    assert fault.kind == 'hard_limit' and fault.joint == 'b' and 'hard limit' in fault.describe()
    mon.reset()
    assert mon.update([0, 0], [float('nan'), 0]).kind == 'hard_limit'
    with pytest.raises(ValueError, match='hard_limit'):
        TrackingMonitor([1e-3], [1e-4])


# ------------------------------------------------------------------- goal manager
def test_goal_manager_reject_policy():
    gm = GoalManager()
    d1 = gm.submit('g1', None, 0.0)
    assert d1.accepted and d1.goal.state is GoalState.ACCEPTED
    d2 = gm.submit('g2', None, 0.1)
    assert not d2.accepted and d2.code is ResultCode.REJECTED_BUSY and "'g1'" in d2.message
    assert gm.submit('g1', None, 0.1).code is ResultCode.REJECTED_INVALID   # duplicate id
    gm.start('g1', 0.2)
    with pytest.raises(GoalStateError, match='ACCEPTED'):
        gm.finish('g1', GoalState.ACCEPTED, ResultCode.SUCCEEDED, '', 0.3)
    g = gm.finish('g1', GoalState.SUCCEEDED, ResultCode.SUCCEEDED, 'ok', 0.3)
    assert g.done and g.finished_at == 0.3 and gm.active is None
    assert gm.submit('g3', None, 0.4).accepted


def test_goal_manager_preempt_policy():
    gm = GoalManager('preempt')
    gm.submit('g1', None, 0.0)
    gm.start('g1', 0.0)
    d = gm.submit('g2', None, 0.1)
    assert d.accepted and d.preempted_goal_id == 'g1'
    assert gm.active.state is GoalState.CANCELING and gm.active.cancel_code is ResultCode.PREEMPTED
    d3 = gm.submit('g3', None, 0.2)                        # replaces the pending g2
    assert d3.accepted and gm.get('g2').result_code is ResultCode.PREEMPTED
    gm.finish('g1', GoalState.CANCELED, ResultCode.PREEMPTED, 'stopped', 0.3)
    assert gm.active.goal_id == 'g3' and gm.pending is None
    assert gm.request_cancel('g3', 0.4)                      # not started: canceled at once
    assert gm.get('g3').state is GoalState.CANCELED and gm.active is None
    assert not gm.request_cancel('nope', 0.5)
    with pytest.raises(ValueError):
        GoalManager('queue')


# ----------------------------------------------------------------------- executor
class FakeHardware(HardwareInterface):
    """Drive model: each axis reaches the last setpoint by the next read (one-cycle lag).

    ``stuck`` joints do not move. ``inhibit`` refuses setpoints like a real
    controller with motion inhibit engaged. stop() freezes the axes where they are.
    """

    joint_names = NAMES

    def __init__(self, q0=None):
        self.pos = np.zeros(5) if q0 is None else np.array(q0, float)
        self.setpoint = self.pos.copy()
        self.prev = self.pos.copy()
        self.inhibit = False
        self.stuck = np.zeros(5, bool)
        self.writes = []
        self.stop_calls = 0

    def connect(self): pass
    def close(self): pass
    def enable(self): pass
    def disable(self): pass
    def emergency_stop(self): pass
    def reset_faults(self): pass

    def set_motion_inhibit(self, inhibit):
        self.inhibit = inhibit

    def read(self):
        self.prev = self.pos.copy()
        self.pos = np.where(self.stuck, self.pos, self.setpoint)
        moving = bool(np.any(self.pos != self.prev))
        return HardwareState(stamp=0.0, positions=self.pos.copy(), velocities=(self.pos - self.prev) / DT,
                             enabled=True, motion_inhibited=self.inhibit, moving=moving)

    def write(self, positions, velocities=None):
        if self.inhibit:
            raise HardwareFault('INHIBITED', 'motion inhibit is engaged')
        self.setpoint = np.array(positions, float)
        self.writes.append((self.setpoint.copy(), np.array(velocities, float)))

    def stop(self):
        self.stop_calls += 1
        self.setpoint = self.pos.copy()


class Permission:
    def __init__(self):
        self.ok = True

    def __call__(self):
        return self.ok


def make_executor(policy='reject', q0=None, permission=None):
    hw = FakeHardware(q0)
    perm = permission or Permission()
    lim = JointLimits(velocity=VEL, acceleration=ACC, lower=LOWER, upper=UPPER, joint_names=NAMES)
    mon = TrackingMonitor(tolerance=VEL * DT * 2 + 1e-6, hard_limit=VEL * DT * 20, consecutive_cycles=5,
                          joint_names=NAMES)
    ex = MotionExecutor(hw, perm, lim, mon, goal_policy=policy, goal_tolerance=1e-6, settle_timeout=0.05)
    return ex, hw, perm


def run_until(ex, t, predicate, max_cycles=20000):
    """Step the executor at 1 kHz simulated time until predicate(report) holds."""
    finished = []
    for _ in range(max_cycles):
        t += DT
        rep = ex.step(t)
        finished.extend(rep.finished)
        if predicate(rep):
            return t, rep, finished
    raise AssertionError('condition not reached')


def test_goal_succeeds_within_limits():
    ex, hw, _ = make_executor()
    goal = np.array([0.004, -0.002, 0.05, 0.0, 0.003])
    assert ex.submit('g1', goal, 0.0).accepted
    t, rep, fin = run_until(ex, 0.0, lambda r: r.finished)
    g = fin[0]
    assert g.state is GoalState.SUCCEEDED and g.result_code is ResultCode.SUCCEEDED
    assert np.allclose(hw.pos, goal, atol=1e-12)
    cmd = np.array([w[0] for w in hw.writes])
    vel = np.array([w[1] for w in hw.writes])
    assert np.all(np.abs(vel) <= VEL * (1 + 1e-9))
    assert np.all(np.abs(np.diff(cmd, axis=0)) <= VEL * DT * (1 + 1e-6))
    n_writes = len(hw.writes)
    for k in range(1, 50):
        ex.step(t + k * DT)
    assert len(hw.writes) == n_writes and ex.mode is ExecutorMode.IDLE   # holding = no writes


def _drop_and_check_stop(ex, hw, trigger, expect_state, expect_code):
    goal = np.array([0.02, 0.0, 0.3, 0.0, 0.0])
    assert ex.submit('g1', goal, 0.0).accepted
    t, rep, _ = run_until(ex, 0.0, lambda r: r.now >= 1.0)   # mid-motion, at cruise speed
    last_pos, last_vel = hw.writes[-1]
    assert np.all(np.abs(last_vel[[0, 2]]) > 0)
    trigger()
    t, rep, fin = run_until(ex, t, lambda r: r.finished)
    g = fin[0]
    assert g.state is expect_state and g.result_code is expect_code
    assert 'holding' in g.message
    travelled = hw.pos - last_pos
    # Stops exactly at the braking distance v^2/2a of each joint from the last setpoint.
    assert np.allclose(travelled, last_vel * np.abs(last_vel) / (2 * ACC), atol=1e-12)
    assert not np.allclose(hw.pos, goal)
    # The setpoint stream stays within the acceleration limits through the switch
    # to the stop (no pause-then-continue, no jump).
    cmd = np.array([w[0] for w in hw.writes])
    accel = np.diff(cmd, n=2, axis=0) / DT ** 2
    assert np.all(np.abs(accel) <= ACC * (1 + 1e-6) + 1e-9)
    # Never accelerates while stopping and holds afterwards.
    vel_after = np.array([w[1] for w in hw.writes[-int(1.0 / DT):]])
    assert np.all(np.abs(vel_after) <= np.abs(last_vel) + 1e-12)
    n = len(hw.writes)
    for k in range(1, 100):
        ex.step(t + k * DT)
    assert len(hw.writes) == n and ex.mode is ExecutorMode.IDLE
    return g


def test_permission_drop_mid_motion_stops_within_braking_distance_and_holds():
    sup_reason = 'Motion halted: scanner ACQUIRING (protocol \'control scan\')'

    class Status:
        motion_permitted = True
        reason = ''

    status = Status()
    ex, hw, _ = make_executor(permission=lambda: status)

    def drop():
        status.motion_permitted = False
        status.reason = sup_reason

    g = _drop_and_check_stop(ex, hw, drop, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK)
    assert sup_reason in g.message
    # While not permitted a new goal is refused with the reason.
    d = ex.submit('g2', np.zeros(5), 10.0)
    assert d.code is ResultCode.REJECTED_NOT_PERMITTED and 'scanner ACQUIRING' in d.message


def test_cancel_stops_under_control():
    ex, hw, _ = make_executor()
    g = _drop_and_check_stop(ex, hw, lambda: ex.cancel('g1', 0.0), GoalState.CANCELED, ResultCode.CANCELED)
    assert 'canceled' in g.message


def test_tracking_error_aborts_and_hands_over_to_hardware_stop():
    ex, hw, _ = make_executor()
    assert ex.submit('g1', [0.01, 0, 0, 0, 0], 0.0).accepted
    t, _, _ = run_until(ex, 0.0, lambda r: r.now >= 0.6)
    hw.stuck[0] = True                                       # stage_x jams
    t, rep, fin = run_until(ex, t, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_TRACKING_ERROR
    assert rep.tracking_fault is not None and rep.tracking_fault.joint == 'stage_x'
    assert 'stage_x' in fin[0].message and hw.stop_calls == 1
    assert ex.mode is ExecutorMode.IDLE
    n = len(hw.writes)
    for k in range(1, 20):
        assert ex.step(t + k * DT).tracking_fault is None   # holding where the drive stopped
    assert len(hw.writes) == n


def test_second_goal_rejected_by_default():
    ex, hw, _ = make_executor()
    assert ex.submit('g1', [0.005, 0, 0, 0, 0], 0.0).accepted
    ex.step(DT)
    d = ex.submit('g2', [0, 0.005, 0, 0, 0], DT)
    assert not d.accepted and d.code is ResultCode.REJECTED_BUSY
    _, _, fin = run_until(ex, DT, lambda r: r.finished)
    assert fin[0].goal_id == 'g1' and fin[0].result_code is ResultCode.SUCCEEDED


def test_preempt_policy_stops_then_runs_the_new_goal():
    ex, hw, _ = make_executor(policy='preempt')
    assert ex.submit('g1', [0.02, 0, 0, 0, 0], 0.0).accepted
    t, _, _ = run_until(ex, 0.0, lambda r: r.now >= 1.0)
    new_goal = np.array([0.0, 0.004, 0.0, 0.0, 0.0])
    d = ex.submit('g2', new_goal, t)
    assert d.accepted and d.preempted_goal_id == 'g1'
    results = []
    t, rep, fin = run_until(ex, t, lambda r: results.extend(r.finished) or len(results) == 2)
    first, second = results
    assert (first.goal_id, first.state, first.result_code) == ('g1', GoalState.CANCELED, ResultCode.PREEMPTED)
    assert (second.goal_id, second.result_code) == ('g2', ResultCode.SUCCEEDED)
    assert np.allclose(hw.pos, new_goal, atol=1e-12)
    # The new goal started from rest: the stop ended at zero velocity before g2 moved,
    # and stage_x reversed direction only through that rest.
    writes = np.array([w[1] for w in hw.writes])
    first_y = np.flatnonzero(np.abs(writes[:, 1]) > 0)[0]
    assert np.all(writes[first_y - 1] == 0)
    assert np.all(writes[:first_y, 0] >= 0) and np.all(writes[first_y:, 0] <= 0)


def test_invalid_goals_rejected_with_reason():
    ex, _, perm = make_executor()
    assert ex.submit('a', [0, 0, 0, 0, 0.2], 0.0).code is ResultCode.REJECTED_INVALID
    d = ex.submit('b', [[0, 0, 0, 0], [0, 0, 0, 0]], 0.0)
    assert d.code is ResultCode.REJECTED_INVALID and 'shape' in d.message
    d = ex.submit('c', [0, float('nan'), 0, 0, 0], 0.0)
    assert d.code is ResultCode.REJECTED_INVALID and 'waypoint 0' in d.message and 'non-finite' in d.message
    d = ex.submit('e', np.zeros(5), 0.0, speed_scale=1.5)
    assert d.code is ResultCode.REJECTED_INVALID and 'speed_scale' in d.message
    perm.ok = False
    assert ex.submit('d', np.zeros(5), 0.0).code is ResultCode.REJECTED_NOT_PERMITTED


def test_hardware_inhibit_during_stop_is_an_interlock_not_a_hardware_fault():
    ex, hw, perm = make_executor()
    assert ex.submit('g1', [0.02, 0, 0, 0, 0], 0.0).accepted
    t, _, _ = run_until(ex, 0.0, lambda r: r.now >= 1.0)
    perm.ok = False
    ex.step(t + DT)                                          # stop begins
    hw.inhibit = True                                        # the node also engages the hardware inhibit
    rep = ex.step(t + 2 * DT)
    g = rep.finished[0]
    assert g.result_code is ResultCode.ABORTED_INTERLOCK and rep.hardware_error is None
    assert hw.stop_calls == 1 and 'drive braked' in g.message


def test_write_refused_while_moving_is_a_hardware_abort():
    ex, hw, _ = make_executor()
    assert ex.submit('g1', [0.02, 0, 0, 0, 0], 0.0).accepted
    t, _, _ = run_until(ex, 0.0, lambda r: r.now >= 0.2)
    hw.inhibit = True
    rep = ex.step(t + DT)
    assert rep.finished[0].result_code is ResultCode.ABORTED_HARDWARE
    assert 'INHIBITED' in rep.hardware_error and hw.stop_calls == 1


def test_executor_with_supervisor_and_fixed_rate_loop():
    """End to end on a simulated clock: a scan starting mid-motion stops the robot."""
    cfg = SafetyConfig(heartbeat_timeouts={'motion_controller': 0.1}, scanner_timeout=1.5,
                       require_estop_input=False, require_joint_state=False)
    sup = SafetySupervisor(cfg)
    sup.heartbeat('motion_controller', 0.0)
    sup.update_scanner('IDLE', None, 0, 0.0)
    assert sup.resume(0.0).accepted
    ex, hw, _ = make_executor(permission=lambda: sup)   # the supervisor itself: cheap per cycle
    clock = FakeClock(0.0)
    outcome = []

    def cycle(now):
        sup.heartbeat('motion_controller', now)
        sup.update_scanner('ACQUIRING' if now >= 0.8 else 'IDLE', None, int(now * 1e6), now,
                           protocol='control scan')
        sup.tick(now)
        rep = ex.step(now)
        outcome.extend(rep.finished)
        clock.t += 5e-5
        return not outcome

    assert ex.submit('g1', [0.01, 0, 0.2, 0, 0], 0.0).accepted
    FixedRateLoop(cycle, rate_hz=1000, spin_s=0.0, clock=clock, sleep=clock.sleep).run(max_cycles=10000)
    assert sup.state is SafetyState.SCAN_HOLD
    g = outcome[0]
    assert g.result_code is ResultCode.ABORTED_INTERLOCK and "scanner ACQUIRING (protocol 'control scan')" in g.message
    assert 0.0 < hw.pos[0] < 0.01
