"""Control core: fixed-rate loop scheduling, tracking monitor, goal manager, streaming executor."""
import threading
import types

import numpy as np
import pytest

from igt_robot.control import (ExecutorMode, FixedRateLoop, GoalManager, GoalState, GoalStateError, ResultCode,
                               StreamingExecutor, TrackingMonitor, TrajectoryStreamer)
from igt_robot.hardware.controller_core import AxisLimits, ControllerCore, Refusal
from igt_robot.hardware.interface import HardwareFault, HardwareInterface, HardwareState, PvtPoint, StreamStatus
from igt_robot.safety import SafetyConfig, SafetyState, SafetySupervisor
from igt_robot.trajectory import JointLimits, plan_waypoints

NAMES = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
VEL = np.array([0.010, 0.010, 0.20, 0.20, 0.005])
ACC = np.array([0.02, 0.02, 0.5, 0.5, 0.01])
LOWER = np.array([-0.04, -0.04, -0.5236, -0.5236, 0.0])
UPPER = np.array([0.04, 0.04, 0.5236, 0.5236, 0.150])
SERVO_DT = 0.001          # the controller's servo period, s (ControllerCore's default)
HOST_DT = 0.02           # the executor's cycle (50 Hz), s


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

    loop = FixedRateLoop(step, rate_hz=1000, clock=clock, sleep=clock.sleep)
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

    loop = FixedRateLoop(step, rate_hz=1000, clock=clock, sleep=clock.sleep)
    stats = loop.run(max_cycles=20)
    assert stats.overruns == 1 and stats.skipped_cycles == skipped
    assert starts[11] == pytest.approx(expected_next * 1e-3)
    # Afterwards back on the original 1 ms grid (no phase drift from the overrun).
    later = np.array(starts[12:]) / 1e-3
    assert np.allclose(later, np.round(later), atol=1e-6)
    assert stats.period_error_max == pytest.approx(max_error, rel=1e-6)


def test_loop_period_stats_restart_for_a_new_phase():
    clock = FakeClock(0.0)

    def step(now):
        clock.t += 0.035 if 5 <= now / 0.02 < 6 else 0.001     # one late cycle early on

    loop = FixedRateLoop(step, rate_hz=50, clock=clock, sleep=clock.sleep)
    assert loop.run(max_cycles=20).period_error_max == pytest.approx(0.015, rel=1e-6)
    loop.reset_period_stats()
    stats = loop.run(max_cycles=40)
    assert stats.period_error_max < 1e-9 and stats.cycles == 40 and stats.mean_period == pytest.approx(0.02)


def test_loop_stops_on_false_and_propagates_errors():
    clock = FakeClock()
    n = []
    loop = FixedRateLoop(lambda now: n.append(now) or len(n) < 7, rate_hz=500,
                         clock=clock, sleep=clock.sleep)
    assert loop.run().cycles == 7

    def bad(now):
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        FixedRateLoop(bad, clock=clock, sleep=clock.sleep).run()
    with pytest.raises(ValueError, match='rate_hz'):
        FixedRateLoop(lambda now: None, rate_hz=0)
    with pytest.raises(ValueError, match='rate_hz'):
        FixedRateLoop(lambda now: None, rate_hz=2000)


def test_loop_in_thread_runs_and_stops():
    seen = threading.Event()
    count = [0]

    def step(now):
        count[0] += 1
        if count[0] >= 50:
            seen.set()

    loop = FixedRateLoop(step, rate_hz=200)
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

    failing = FixedRateLoop(bad, rate_hz=200)
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
class CoreController(HardwareInterface):
    """The controller model (:class:`ControllerCore`, the same logic the emulator and the MuJoCo
    backend run) behind the hardware interface, on a simulated clock (``advance``).

    The axes follow the controller's reference exactly, except ``stuck`` ones. Its drive limits
    are 25 % above what the executor plans with (the 80 % headroom of config/motion.yaml).
    """

    joint_names = NAMES

    def __init__(self, q0=None, capacity=128):
        axes = [AxisLimits(LOWER[i], UPPER[i], VEL[i] / 0.8, ACC[i] / 0.8, 1e-7, NAMES[i]) for i in range(5)]
        self.pos = np.zeros(5) if q0 is None else np.array(q0, float)
        self.vel = np.zeros(5)
        self.core = ControllerCore(axes, watchdog_timeout=None, buffer_capacity=capacity, positions=self.pos,
                                   measure=lambda: self.pos)
        self.core.enable()
        self.decel = self.core.a_max
        self.stuck = np.zeros(5, bool)
        self.stop_calls = 0
        self.pushes = []              # (controller time, number of points)
        self.lookaheads = []          # (look-ahead, final point buffered?) every servo tick while streaming
        self.trace = []               # (t, positions) every servo tick

    @property
    def t(self):
        return self.core.time

    def _do(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Refusal as exc:
            raise HardwareFault(exc.reason, str(exc)) from exc

    # the interface ---------------------------------------------------------------
    def connect(self): pass
    def close(self): pass
    def enable(self): self._do(self.core.enable)
    def disable(self): self._do(self.core.disable)
    def emergency_stop(self): self.core.emergency_stop()
    def reset_faults(self): self._do(self.core.reset_faults)

    def write(self, positions, velocities=None):
        raise HardwareFault('PROTOCOL', 'this test controller only takes streamed trajectories')

    def read(self):
        return HardwareState(stamp=self.t, positions=self.pos.copy(), velocities=self.vel.copy(), enabled=True,
                             motion_inhibited=self.core.inhibited, moving=self.core.moving,
                             faults=tuple(self.core.faults), inhibit_cause=self.core.inhibit_cause,
                             stream=self.core.stream_status())

    def stream_status(self):
        return self.core.stream_status()

    def begin_stream(self, start_positions):
        return self._do(self.core.begin_stream, start_positions)

    def push_points(self, stream_id, points, final=False):
        status = self._do(self.core.push_points, stream_id, points, final)
        self.pushes.append((self.t, len(points)))
        return status

    def stop(self):
        self.stop_calls += 1
        self.core.stop()

    def set_motion_inhibit(self, inhibit):
        self._do(self.core.set_inhibit, inhibit)

    def set_trigger(self, imaging):
        self.core.set_trigger(imaging)

    # the servo -------------------------------------------------------------------
    @property
    def underruns(self):
        return self.core.underruns

    @property
    def stop_cause(self):
        return self.core.stream_status().stop_cause

    @property
    def stream_id(self):
        return self.core.stream_status().stream_id

    def advance(self, duration):
        for _ in range(int(round(duration / SERVO_DT))):
            self.core.step()
            before = self.pos
            self.pos = np.where(self.stuck, self.pos, self.core.ref_pos)
            self.vel = (self.pos - before) / SERVO_DT
            status = self.core.stream_status()
            if status.active and not status.stop_cause:
                self.lookaheads.append((status.lookahead, self.core._stream.final_received))
            self.trace.append((self.t, self.pos.copy()))


class Permission:
    def __init__(self):
        self.ok = True

    def __call__(self):
        return self.ok


LIMITS = JointLimits(velocity=VEL, acceleration=ACC, lower=LOWER, upper=UPPER, joint_names=NAMES)


def make_executor(policy='reject', q0=None, permission=None, lookahead=0.3, spacing=0.02, tolerance=None,
                  cycles=3, capacity=128):
    ctrl = CoreController(q0, capacity)
    perm = permission or Permission()
    tol = VEL * 0.002 if tolerance is None else np.asarray(tolerance, float)
    mon = TrackingMonitor(tolerance=tol, hard_limit=tol * 10, consecutive_cycles=cycles, joint_names=NAMES)
    ex = StreamingExecutor(ctrl, perm, LIMITS, mon, goal_policy=policy, goal_tolerance=1e-6, settle_timeout=0.2,
                           lookahead=lookahead, point_spacing=spacing)
    return ex, ctrl, perm


def run_until(ex, ctrl, predicate, period=HOST_DT, stall=None, max_time=60.0, reports=None):
    """Advance the controller and step the executor every ``period`` until predicate(report) holds.

    ``stall`` = (from, duration): the host does not step during that controller-time window."""
    finished = []
    t_end = ctrl.t + max_time
    while ctrl.t < t_end:
        ctrl.advance(period)
        if stall is not None and stall[0] <= ctrl.t < stall[0] + stall[1]:
            continue
        rep = ex.step(ctrl.t)
        finished.extend(rep.finished)
        if reports is not None:
            reports.append(rep)
        if predicate(rep):
            return rep, finished
    raise AssertionError('condition not reached')


def test_streamer_cuts_points_at_the_spacing_and_ends_at_rest_on_the_goal():
    traj = plan_waypoints(np.zeros(5), [[0.004, 0.0, 0.1, 0.0, 0.002]], LIMITS)
    streamer = TrajectoryStreamer(traj, 0.02)
    first, final = streamer.take(0.1, 100)
    assert not final and [p.time for p in first] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.10, 0.12])
    few, _ = streamer.take(10.0, 3)                          # bounded by the free slots
    assert len(few) == 3
    rest, final = streamer.take(1e9, 10 ** 6)
    times = np.array([p.time for p in first + few + rest])
    assert final and streamer.finished and times[-1] == traj.duration
    assert np.allclose(np.diff(times)[:-1], 0.02) and 0.02 - 1e-12 <= times[-1] - times[-2] < 0.04
    assert np.array_equal(rest[-1].positions, traj.end_positions) and not rest[-1].velocities.any()
    for p in first:
        assert np.allclose(p.positions, traj.sample(p.time).positions)
    assert streamer.take(1e9, 10) == ([], False)


def test_goal_streams_ahead_and_succeeds():
    ex, ctrl, _ = make_executor()
    goal = np.array([0.004, -0.002, 0.05, 0.0, 0.003])
    assert ex.submit('g1', goal, 0.0).accepted
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    g = fin[0]
    assert g.state is GoalState.SUCCEEDED and g.result_code is ResultCode.SUCCEEDED, g.message
    assert np.allclose(ctrl.pos, goal, atol=1e-12)
    assert ctrl.underruns == 0 and ex.stats.underruns == 0 and ex.stats.moves == 1
    # Until the final point was sent, the controller always had the look-ahead minus one host period buffered.
    ahead = np.array([la for la, final in ctrl.lookaheads if not final])
    assert ahead.size > 100 and ahead.min() >= 0.3 - HOST_DT - SERVO_DT - 1e-9
    assert ex.stats.lookahead_min >= 0.3 - HOST_DT - 1e-9
    # The controller never moved an axis faster than its (scaled) limit.
    pos = np.array([p for _, p in ctrl.trace])
    assert np.all(np.abs(np.diff(pos, axis=0)) <= VEL * SERVO_DT * (1 + 1e-3))
    # Holding: nothing more is streamed.
    pushes = len(ctrl.pushes)
    for k in range(1, 20):
        ex.step(ctrl.t + k * HOST_DT)
    assert len(ctrl.pushes) == pushes and ex.mode is ExecutorMode.IDLE


def _moving(ex, ctrl, goal=(0.02, 0.0, 0.3, 0.0, 0.0)):
    assert ex.submit('g1', np.array(goal), 0.0).accepted
    run_until(ex, ctrl, lambda r: r.now >= 1.0)              # mid-motion, at cruise speed
    assert np.all(np.abs(ctrl.vel[[0, 2]]) > 0)


def test_host_stall_shorter_than_the_lookahead_changes_nothing():
    goal = (0.006, 0.0, 0.1, 0.0, 0.004)
    ex_ref, ctrl_ref, _ = make_executor(lookahead=0.4)
    assert ex_ref.submit('g1', np.array(goal), 0.0).accepted
    run_until(ex_ref, ctrl_ref, lambda r: r.finished)
    ex, ctrl, _ = make_executor(lookahead=0.4)
    assert ex.submit('g1', np.array(goal), 0.0).accepted
    rep, fin = run_until(ex, ctrl, lambda r: r.finished, stall=(0.5, 0.3))
    assert fin[0].result_code is ResultCode.SUCCEEDED, fin[0].message
    assert ctrl.underruns == 0 and ex.stats.underruns == 0
    # The motion itself is unchanged: same positions at the same controller times.
    a = np.array([p for _, p in ctrl_ref.trace])
    b = np.array([p for _, p in ctrl.trace])
    n = min(a.shape[0], b.shape[0])
    assert np.max(np.abs(a[:n] - b[:n])) < 1e-12
    # ... although no point was pushed for 0.3 s in the middle.
    gaps = np.diff([t for t, _ in ctrl.pushes])
    assert gaps.max() >= 0.3 - 1e-9


def test_host_stall_longer_than_the_lookahead_is_an_underrun_stop_reported_as_such():
    ex, ctrl, _ = make_executor(lookahead=0.2)
    assert ex.submit('g1', np.array([0.02, 0.0, 0.3, 0.0, 0.0]), 0.0).accepted
    rep, fin = run_until(ex, ctrl, lambda r: r.finished, stall=(1.0, 0.6))
    g = fin[0]
    assert g.state is GoalState.ABORTED and g.result_code is ResultCode.ABORTED_HARDWARE
    assert 'UNDERRUN' in g.message and 'holding' in g.message
    assert rep.hardware_error is not None and 'UNDERRUN' in rep.hardware_error
    assert ctrl.underruns == 1 and ex.stats.underruns == 1 and ex.stats.controller_stops == 1
    assert ctrl.stop_calls == 0                               # the controller stopped by itself
    assert not np.allclose(ctrl.pos, [0.02, 0.0, 0.3, 0.0, 0.0])
    # The controller is at rest; the executor holds there and takes the next goal from there.
    assert ex.mode is ExecutorMode.IDLE and not ctrl.core.moving
    assert ex.submit('g2', np.zeros(5), ctrl.t).accepted
    _, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.SUCCEEDED and np.allclose(ctrl.pos, 0.0, atol=1e-12)


def test_irregular_host_cycles_cause_no_false_tracking_fault():
    """Tracking compares with the trajectory at the controller's executed time, not the host's clock."""
    tight = VEL * 2e-5                                        # far below one host period of motion
    ex, ctrl, _ = make_executor(tolerance=tight, cycles=1, lookahead=0.4)
    assert ex.submit('g1', np.array([0.01, 0.005, 0.2, -0.1, 0.004]), 0.0).accepted
    rng = np.random.default_rng(3)
    finished = []
    while not finished:
        ctrl.advance(float(rng.choice([0.005, 0.01, 0.02, 0.05, 0.15])))
        rep = ex.step(ctrl.t + float(rng.uniform(0.0, 0.05)))   # the host's clock is not the controller's
        assert rep.tracking_fault is None
        finished.extend(rep.finished)
    assert finished[0].result_code is ResultCode.SUCCEEDED
    assert ctrl.underruns == 0


def _check_stop(ex, ctrl, trigger, expect_state, expect_code):
    _moving(ex, ctrl)
    v0 = ctrl.vel.copy()
    p0 = ctrl.pos.copy()
    trigger()
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    g = fin[0]
    assert g.state is expect_state and g.result_code is expect_code, g.message
    assert 'holding' in g.message
    assert not ctrl.core.moving and ex.mode is ExecutorMode.IDLE
    # Stopped by the controller's ramp (every axis at rest together, the slowest-stopping at its own
    # deceleration limit) within that braking distance, plus one host period of travel before it began.
    ramp_time = np.max(np.abs(v0) / ctrl.decel)
    travelled = np.abs(ctrl.pos - p0)
    assert np.all(travelled <= np.abs(v0) * (ramp_time / 2 + HOST_DT) + 1e-9)
    pushes = len(ctrl.pushes)
    for k in range(1, 20):
        ex.step(ctrl.t + k * HOST_DT)
    assert len(ctrl.pushes) == pushes                          # holding = streaming nothing
    return g, rep


def test_permission_drop_mid_motion_stops_under_control_with_the_reason():
    sup_reason = 'Motion halted: scanner ACQUIRING (protocol \'control scan\')'

    class Status:
        motion_permitted = True
        reason = ''

    status = Status()
    ex, ctrl, _ = make_executor(permission=lambda: status)

    def drop():
        status.motion_permitted = False
        status.reason = sup_reason

    g, rep = _check_stop(ex, ctrl, drop, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK)
    assert sup_reason in g.message and ctrl.stop_calls == 1 and rep.hardware_error is None
    d = ex.submit('g2', np.zeros(5), 10.0)
    assert d.code is ResultCode.REJECTED_NOT_PERMITTED and 'scanner ACQUIRING' in d.message


def test_cancel_stops_under_control():
    ex, ctrl, _ = make_executor()
    g, _ = _check_stop(ex, ctrl, lambda: ex.cancel('g1', 0.0), GoalState.CANCELED, ResultCode.CANCELED)
    assert 'canceled' in g.message and ctrl.stop_calls == 1


@pytest.mark.parametrize('cause', ['TRIGGER', 'INHIBIT'])
def test_controller_stopping_by_itself_ends_the_goal_quoting_its_cause(cause):
    ex, ctrl, _ = make_executor()
    trigger = (lambda: ctrl.set_trigger(True)) if cause == 'TRIGGER' else (lambda: ctrl.set_motion_inhibit(True))
    g, rep = _check_stop(ex, ctrl, trigger, GoalState.ABORTED, ResultCode.ABORTED_INTERLOCK)
    assert cause in g.message and rep.hardware_error is None and ctrl.stop_calls == 0
    # While the controller's inhibit holds, a new goal cannot open a stream: an interlock, with its cause.
    assert ex.submit('g2', np.zeros(5), ctrl.t).accepted
    rep = ex.step(ctrl.t + HOST_DT)
    g2 = rep.finished[0]
    assert g2.result_code is ResultCode.ABORTED_INTERLOCK and rep.hardware_error is None
    assert 'INHIBITED' in g2.message and ('TRIGGER' if cause == 'TRIGGER' else 'HOST') in g2.message
    assert ctrl.core.stream_status().stream_id == 1 and ex.mode is ExecutorMode.IDLE


def test_controller_inhibit_ahead_of_the_supervisor_ends_the_goal_with_the_supervisor_reason():
    """The hardware node inhibits the controller one hop after a scan starts, usually before the
    supervisor's verdict reaches the executor: the result still says why."""
    status = types.SimpleNamespace(motion_permitted=True, reason='')
    ex, ctrl, _ = make_executor(permission=lambda: status)
    _moving(ex, ctrl)
    ctrl.set_motion_inhibit(True)
    ctrl.advance(HOST_DT)
    ex.step(ctrl.t)                                           # sees the controller's INHIBIT first
    status.motion_permitted, status.reason = False, 'scanner ACQUIRING'
    _, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_INTERLOCK
    assert 'INHIBIT' in fin[0].message and 'scanner ACQUIRING' in fin[0].message


def test_tracking_error_aborts_and_hands_over_to_the_controller_stop():
    ex, ctrl, _ = make_executor()
    assert ex.submit('g1', [0.01, 0, 0, 0, 0], 0.0).accepted
    run_until(ex, ctrl, lambda r: r.now >= 0.6)
    ctrl.stuck[0] = True                                      # stage_x jams
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_TRACKING_ERROR
    assert rep.tracking_fault is not None and rep.tracking_fault.joint == 'stage_x'
    assert 'stage_x' in fin[0].message and ctrl.stop_calls == 1 and ctrl.stop_cause == 'STOP'
    assert ex.mode is ExecutorMode.IDLE
    ctrl.stuck[0] = False
    rep, _ = run_until(ex, ctrl, lambda r: not ctrl.core.moving and r.mode is ExecutorMode.IDLE)
    for _ in range(20):
        ctrl.advance(HOST_DT)
        assert ex.step(ctrl.t).tracking_fault is None         # holding where the controller stopped


def test_second_goal_rejected_by_default():
    ex, ctrl, _ = make_executor()
    assert ex.submit('g1', [0.005, 0, 0, 0, 0], 0.0).accepted
    run_until(ex, ctrl, lambda r: True)
    d = ex.submit('g2', [0, 0.005, 0, 0, 0], ctrl.t)
    assert not d.accepted and d.code is ResultCode.REJECTED_BUSY
    _, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].goal_id == 'g1' and fin[0].result_code is ResultCode.SUCCEEDED


def test_preempt_policy_stops_then_streams_the_new_goal_from_rest():
    ex, ctrl, _ = make_executor(policy='preempt')
    _moving(ex, ctrl)
    new_goal = np.array([0.0, 0.004, 0.0, 0.0, 0.0])
    d = ex.submit('g2', new_goal, ctrl.t)
    assert d.accepted and d.preempted_goal_id == 'g1'
    results = []
    run_until(ex, ctrl, lambda r: results.extend(r.finished) or len(results) == 2)
    first, second = results
    assert (first.goal_id, first.state, first.result_code) == ('g1', GoalState.CANCELED, ResultCode.PREEMPTED)
    assert (second.goal_id, second.result_code) == ('g2', ResultCode.SUCCEEDED)
    assert np.allclose(ctrl.pos, new_goal, atol=1e-12) and ctrl.stream_id == 2
    # stage_y only started moving after stage_x had come to rest.
    pos = np.array([p for _, p in ctrl.trace])
    first_y = np.flatnonzero(pos[:, 1] != 0)[0]
    assert pos[first_y - 1, 0] == pos[first_y - 2, 0]


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
    with pytest.raises(ValueError, match='lookahead'):
        make_executor(lookahead=0.03, spacing=0.02)


def test_a_stop_the_executor_did_not_send_is_a_hardware_abort():
    ex, ctrl, _ = make_executor()
    _moving(ex, ctrl)
    ctrl.core.stop()                              # e.g. another client of the controller sent STOP
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_HARDWARE and 'itself: STOP' in fin[0].message
    assert rep.hardware_error is not None and not ctrl.core.moving


@pytest.mark.parametrize('fault', ['OVERCURRENT', 'FOLLOWING_ERROR'])   # immediate halt / ramp first
def test_a_controller_fault_ends_the_goal_naming_the_fault(fault):
    ex, ctrl, _ = make_executor()
    _moving(ex, ctrl)
    ctrl.core.latch_fault(fault, 4)
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_HARDWARE
    assert 'FAULT' in fin[0].message and fault in fin[0].message and fault in rep.hardware_error


def test_a_goal_waits_for_the_controller_to_end_its_stream_but_not_forever():
    ex, ctrl, _ = make_executor()
    stuck = StreamStatus(stream_id=7, active=True, executed_time=1.0, buffered_until=1.0)
    ctrl.core.stream_status = lambda: stuck       # a controller that never ends stream 7
    assert ex.submit('g1', [0.004, 0, 0, 0, 0], 0.0).accepted
    assert not ex.step(1.0).finished and ctrl.pushes == []
    fin = ex.step(ex.stop_timeout + 0.1).finished
    assert fin[0].result_code is ResultCode.ABORTED_HARDWARE and 'still runs stream 7' in fin[0].message


class WireController(CoreController):
    """The controller model behind a serial link: positions in whole encoder counts (1 um) and
    velocities in whole counts/s on the wire, as protocol 2 sends them."""

    def __init__(self, q0=None, capacity=128):
        super().__init__(q0, capacity)
        self.core = ControllerCore([AxisLimits(a.lower, a.upper, a.max_velocity, a.max_acceleration, 1e-6, a.name)
                                    for a in self.core.axes], watchdog_timeout=None, buffer_capacity=capacity,
                                   positions=self.pos, measure=lambda: self.pos)
        self.core.enable()

    def push_points(self, stream_id, points, final=False):
        wire = [PvtPoint(p.time, np.round(p.positions * 1e6) / 1e6, np.round(p.velocities * 1e6) / 1e6)
                for p in points]
        return super().push_points(stream_id, wire, final)


@pytest.mark.parametrize('speed', [1.0, 0.5])
def test_retracting_onto_the_joint_limit_survives_the_wire_quantisation(speed):
    """Retract the needle to 0 (its lower limit) over the quantised link from many depths: the last
    streamed segment must not dip below the limit (the controller would refuse it: RANGE)."""
    ctrl = WireController(np.zeros(5))
    # The shipped headroom: trajectories at 80 % of the drive limits (the insertion axis decelerates at 8 mm/s^2).
    limits = JointLimits(velocity=VEL * 0.8, acceleration=ACC * 0.8, lower=LOWER, upper=UPPER, joint_names=NAMES)
    ex = StreamingExecutor(ctrl, lambda: True, limits, TrackingMonitor(VEL * 0.002, VEL * 0.02, 3, NAMES),
                           goal_tolerance=1e-6, settle_timeout=0.2, lookahead=0.3, point_spacing=0.02)
    rng = np.random.default_rng(7)
    for k, depth in enumerate(rng.uniform(0.0005, 0.006, 12)):
        for target in (depth, 0.0):
            assert ex.submit(f'g{k}-{target}', [0, 0, 0, 0, target], ctrl.t, speed_scale=speed).accepted
            _, fin = run_until(ex, ctrl, lambda r: r.finished)
            assert fin[0].result_code is ResultCode.SUCCEEDED, fin[0].message


def test_goal_at_the_current_position_succeeds_without_a_stream():
    ex, ctrl, _ = make_executor(q0=[0.001, 0, 0, 0, 0])
    assert ex.submit('g1', [0.001, 0, 0, 0, 0], 0.0).accepted
    _, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.SUCCEEDED and ctrl.stream_id == 0


def test_refused_points_with_no_controller_stop_are_a_hardware_abort():
    ex, ctrl, _ = make_executor()
    assert ex.submit('g1', [0.02, 0, 0, 0, 0], 0.0).accepted
    run_until(ex, ctrl, lambda r: r.now >= 0.2)

    def refuse(*args, **kwargs):
        raise HardwareFault('CHECKSUM', 'frame rejected')

    ctrl.push_points = refuse                                 # the link starts failing
    rep, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.ABORTED_HARDWARE
    assert 'CHECKSUM' in rep.hardware_error and ctrl.stop_calls == 1 and ctrl.stop_cause == 'STOP'


def test_a_full_buffer_is_respected_not_overfilled():
    ex, ctrl, _ = make_executor(lookahead=0.5, capacity=8)    # fewer slots than the look-ahead needs
    assert ex.submit('g1', [0.004, 0, 0, 0, 0], 0.0).accepted
    _, fin = run_until(ex, ctrl, lambda r: r.finished)
    assert fin[0].result_code is ResultCode.SUCCEEDED and ctrl.underruns == 0


def test_executor_with_supervisor_and_fixed_rate_loop():
    """End to end on a simulated clock: a scan starting mid-motion stops the robot."""
    cfg = SafetyConfig(heartbeat_timeouts={'motion_controller': 0.1}, scanner_timeout=1.5,
                       require_estop_input=False, require_joint_state=False)
    sup = SafetySupervisor(cfg)
    sup.heartbeat('motion_controller', 0.0)
    sup.update_scanner('IDLE', None, 0, 0.0)
    assert sup.resume(0.0).accepted
    ex, ctrl, _ = make_executor(permission=lambda: sup)   # the supervisor itself
    clock = FakeClock(0.0)
    outcome = []

    def cycle(now):
        ctrl.advance(now - ctrl.t)
        sup.heartbeat('motion_controller', now)
        sup.update_scanner('ACQUIRING' if now >= 0.8 else 'IDLE', None, int(now * 1e6), now,
                           protocol='control scan')
        sup.tick(now)
        rep = ex.step(now)
        outcome.extend(rep.finished)
        clock.t += 5e-4
        return not outcome

    assert ex.submit('g1', [0.01, 0, 0.2, 0, 0], 0.0).accepted
    FixedRateLoop(cycle, rate_hz=50, clock=clock, sleep=clock.sleep).run(max_cycles=1000)
    assert sup.state is SafetyState.SCAN_HOLD
    g = outcome[0]
    assert g.result_code is ResultCode.ABORTED_INTERLOCK and "scanner ACQUIRING (protocol 'control scan')" in g.message
    assert 0.0 < ctrl.pos[0] < 0.01
