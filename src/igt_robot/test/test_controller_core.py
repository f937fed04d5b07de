"""The motor-controller core: PVT buffer, Hermite servo reference, stop ramp, interlocks."""
import math

import numpy as np
import pytest

from igt_robot.hardware.controller_core import AxisLimits, ControllerCore, Refusal, hermite
from igt_robot.hardware.interface import PvtPoint

# Two axes in SI: a linear stage (m) and a rotary one (rad).
AXES = (AxisLimits(-0.04, 0.04, 0.010, 0.02, 1e-6, 'stage_x'),
        AxisLimits(-0.5, 0.5, 0.20, 0.5, 1e-5, 'pitch'))
V_MAX = np.array([0.010, 0.20])
A_MAX = np.array([0.02, 0.5])
DT = 0.001


def make(**kw) -> ControllerCore:
    core = ControllerCore(AXES, **kw)
    core.enable()
    return core


def run(core, seconds, feed=True):
    """Advance tick by tick; the host stays alive unless ``feed`` is False. Returns reference samples."""
    samples = []
    for _ in range(int(round(seconds / DT))):
        if feed:
            core.host_seen()
        core.step()
        samples.append((core.time, core.ref_pos.copy(), core.ref_vel.copy()))
    return samples


def cruise(duration=1.0, spacing=0.02, speed=0.5):
    """A smooth move at ``speed`` x the velocity limit (cosine velocity profile), sampled as PVT."""
    points = []
    t_end = duration
    for k in range(1, int(round(t_end / spacing)) + 1):
        t = k * spacing
        # v(t) = V (1 - cos(2 pi t / T)) / 2 -> zero at both ends
        w = 2 * math.pi / t_end
        vel = speed * V_MAX * (1 - math.cos(w * t)) / 2
        pos = speed * V_MAX * (t - math.sin(w * t) / w) / 2
        points.append(PvtPoint(t, pos, vel))
    return points


def stream(core, points, batch=5, final=True):
    sid = core.begin_stream(core.ref_pos.copy())
    for i in range(0, len(points), batch):
        chunk = points[i:i + batch]
        core.push_points(sid, chunk, final=final and i + batch >= len(points))
    return sid


def accelerations(samples):
    vel = np.array([v for _, _, v in samples])
    return np.diff(vel, axis=0) / DT


# ------------------------------------------------------------------ streaming

def test_stream_follows_the_hermite_interpolation_and_holds_at_the_final_point():
    core = make()
    points = cruise()
    sid = stream(core, points)
    samples = run(core, 1.2)
    st = core.stream_status()
    assert st.stream_id == sid and st.done and not st.active and st.stop_cause == ''
    assert np.array_equal(core.ref_pos, points[-1].positions) and not core.ref_vel.any()
    assert core.mode == 'hold' and not core.moving
    # At each knot the reference passes exactly through the point; between knots it is the Hermite cubic.
    by_time = {round(t, 6): (p, v) for t, p, v in samples}
    for a, b in zip(points, points[1:]):
        p, v = by_time[round(b.time, 6)]
        np.testing.assert_allclose(p, b.positions, atol=1e-12)
        mid = round(a.time + 0.01, 6)
        np.testing.assert_allclose(by_time[mid][0], hermite(a, b, mid)[0], atol=1e-12)
    # Within the velocity limit throughout.
    assert max(np.max(np.abs(v) / V_MAX) for _, _, v in samples) <= 1 + 1e-9


def test_hermite_reproduces_a_cubic_exactly():
    a = PvtPoint(0.0, np.array([1.0]), np.array([2.0]))
    f = lambda t: 1 + 2 * t - 3 * t ** 2 + 0.5 * t ** 3      # noqa: E731
    df = lambda t: 2 - 6 * t + 1.5 * t ** 2                  # noqa: E731
    b = PvtPoint(0.7, np.array([f(0.7)]), np.array([df(0.7)]))
    for t in np.linspace(0, 0.7, 11):
        p, v = hermite(a, b, t)
        assert p[0] == pytest.approx(f(t), abs=1e-12) and v[0] == pytest.approx(df(t), abs=1e-12)


def test_a_host_stall_shorter_than_the_buffer_changes_nothing():
    points = cruise(duration=1.0)
    reference = make()
    stream(reference, points)
    expected = run(reference, 1.1)

    core = make()
    sid = core.begin_stream(core.ref_pos.copy())
    pushed = 0
    samples = []
    for tick in range(1100):
        # The host keeps ~150 ms ahead, except for a 400 ms stall starting at 0.3 s.
        stalled = 300 <= tick < 700
        if not stalled:
            core.host_seen()
            horizon = core.stream_status().executed_time + 0.15 if pushed else 0.15
            batch = [p for p in points[pushed:] if p.time <= horizon + 0.5 * (tick >= 250 and tick < 300)]
            if batch:
                core.push_points(sid, batch, final=pushed + len(batch) == len(points))
                pushed += len(batch)
        core.step()
        samples.append((core.time, core.ref_pos.copy(), core.ref_vel.copy()))
    assert core.underruns == 0 and core.faults == [] and core.stream_status().done
    for (_, p, v), (_, pe, ve) in zip(samples, expected):
        np.testing.assert_array_equal(p, pe)


def test_underrun_ramps_down_from_the_current_velocity_and_is_counted():
    core = make()
    points = cruise(duration=1.0)
    sid = core.begin_stream(core.ref_pos.copy())
    core.push_points(sid, points[:25])          # up to 0.5 s, mid-move, no final point
    samples = run(core, 1.0)
    st = core.stream_status()
    assert core.underruns == 1 and st.stop_cause == 'UNDERRUN' and not st.active and not st.done
    assert not core.moving and core.enabled and core.faults == []
    # The ramp starts at the last point's velocity (no jump) and stays within the deceleration limits.
    acc = accelerations(samples)
    assert np.all(np.abs(acc) <= A_MAX * (1 + 1e-6) + 1e-9)
    with pytest.raises(Refusal) as info:
        core.push_points(sid, points[25:26])
    assert info.value.reason == 'STREAM_CLOSED' and 'UNDERRUN' in str(info.value)


def test_underruns_are_counted_across_streams():
    core = make()
    for expected in (1, 2):
        sid = core.begin_stream(core.ref_pos.copy())
        core.push_points(sid, [PvtPoint(0.1, core.ref_pos + [1e-5, 0], np.array([1e-4, 0.0]))])
        run(core, 0.2)
        assert core.underruns == expected


def test_ramp_brings_all_axes_to_rest_together_along_the_path_within_their_own_limits():
    # Constant velocity on both axes: the limiting axis is the one with v/a largest.
    v = np.array([0.008, 0.05])
    core = make()
    sid = core.begin_stream(core.ref_pos.copy())
    accel_time = 0.4                            # both axes reach v within their limits
    pts = [PvtPoint(accel_time, v * accel_time / 2, v)] + [
        PvtPoint(accel_time + k * 0.1, v * (accel_time / 2 + k * 0.1), v) for k in range(1, 6)]
    core.push_points(sid, pts)
    run(core, 0.6)
    np.testing.assert_allclose(core.ref_vel, v, rtol=1e-9)
    start = core.ref_pos.copy()
    core.stop()
    assert core.ramp_started_tick == core.ticks
    samples = run(core, 1.0)
    st = core.stream_status()
    assert st.stop_cause == 'STOP' and st.free_slots == core.buffer_capacity
    acc = accelerations([(0, start, v)] + samples)
    assert np.all(np.abs(acc) <= A_MAX * (1 + 1e-6))
    # The slowest-stopping axis (stage: 0.008/0.02 = 0.4 s) uses its full limit.
    assert np.max(np.abs(acc[:, 0])) == pytest.approx(0.02, rel=1e-2)
    stop_ticks = [next(i for i, (_, _, vv) in enumerate(samples) if not vv[j]) for j in range(2)]
    assert stop_ticks[0] == stop_ticks[1]
    # Straight on along the tangent: the displacement is parallel to v.
    d = core.ref_pos - start
    assert abs(d[0] * v[1] - d[1] * v[0]) <= 1e-12
    assert d[0] == pytest.approx(0.008 ** 2 / (2 * 0.02), rel=1e-2)


# ------------------------------------------------------------------ stop causes

def _moving_stream(core):
    sid = stream(core, cruise(duration=1.0), final=True)
    run(core, 0.5)
    assert core.moving and np.any(core.ref_vel)
    return sid


def test_host_inhibit_mid_stream_ramps_flushes_and_reports_the_cause():
    core = make()
    sid = _moving_stream(core)
    core.set_inhibit(True)
    assert core.ramp_started_tick == core.ticks and core.inhibit_cause == 'HOST'
    st = core.stream_status()
    assert st.stop_cause == 'INHIBIT' and st.active and st.free_slots == core.buffer_capacity
    run(core, 1.0)
    assert not core.moving and not core.stream_status().active
    with pytest.raises(Refusal, match='STREAM_CLOSED'):
        core.push_points(sid, cruise()[-1:], final=True)
    with pytest.raises(Refusal, match='INHIBITED'):
        core.begin_stream(core.ref_pos)
    core.set_inhibit(False)
    core.begin_stream(core.ref_pos)


def test_trigger_edge_ramps_at_once_and_the_host_cannot_release_while_imaging():
    core = make()
    _moving_stream(core)
    core.set_trigger(True)
    assert core.ramp_started_tick == core.ticks          # reacts in the same tick as the edge
    assert core.stream_status().stop_cause == 'TRIGGER' and core.inhibit_cause == 'TRIGGER'
    assert core.trigger_edges == 1
    run(core, 1.0)
    with pytest.raises(Refusal) as info:
        core.set_inhibit(False)
    assert info.value.reason == 'TRIGGER_ACTIVE' and core.inhibited
    with pytest.raises(Refusal, match='INHIBITED'):
        core.set_target(core.ref_pos)
    core.set_trigger(False)
    # The edge stays latched after the trigger falls: nothing resumes by itself.
    assert core.inhibited and core.inhibit_cause == 'TRIGGER'
    with pytest.raises(Refusal, match='INHIBITED'):
        core.begin_stream(core.ref_pos)
    core.set_inhibit(False)
    assert not core.inhibited
    core.begin_stream(core.ref_pos)


def test_trigger_while_host_inhibit_reports_both_causes():
    core = make()
    core.set_inhibit(True)
    core.set_trigger(True)
    assert core.inhibit_cause == 'HOST+TRIGGER'


def test_trigger_edge_at_rest_latches_and_ends_an_open_stream():
    core = make()
    sid = core.begin_stream(core.ref_pos)
    core.set_trigger(True)
    assert core.stream_status().stop_cause == 'TRIGGER'
    with pytest.raises(Refusal, match='STREAM_CLOSED'):
        core.push_points(sid, cruise()[:1])


def test_watchdog_trips_on_host_silence_ramps_and_de_energises():
    core = make(watchdog_timeout=0.1)
    _moving_stream(core)
    core.stop()
    run(core, 1.0)
    core.set_target(core.ref_pos + np.array([0.005, 0.0]))
    run(core, 0.1)
    assert core.moving
    run(core, 0.3, feed=False)
    assert 'WATCHDOG' in core.faults and core.watchdog_trips == 1
    run(core, 1.0, feed=False)
    assert not core.enabled and not core.moving


def test_watchdog_tolerates_silence_within_the_buffer_while_streaming_then_stops():
    core = make(watchdog_timeout=0.1, max_lookahead=0.6)
    sid = core.begin_stream(core.ref_pos)
    points = cruise(duration=2.0)
    core.push_points(sid, [p for p in points if p.time <= 0.5])
    run(core, 0.45, feed=False)                # longer than the watchdog, shorter than the buffer
    assert core.faults == [] and core.stream_status().active
    run(core, 1.0, feed=False)                 # host dead: the buffer runs dry, then the watchdog
    assert core.underruns == 1 and 'WATCHDOG' in core.faults and not core.enabled


def test_emergency_stop_halts_at_once_and_latches():
    core = make()
    _moving_stream(core)
    at = core.ref_pos.copy()
    core.emergency_stop()
    assert not core.enabled and not core.ref_vel.any() and np.array_equal(core.ref_pos, at)
    assert core.stream_status().stop_cause == 'ESTOP'
    with pytest.raises(Refusal, match='ESTOPPED'):
        core.enable()
    core.reset_faults()
    core.enable()


@pytest.mark.parametrize('fault, cause, immediate', [
    ('OVERCURRENT', 'FAULT', True), ('LIMIT_SWITCH', 'LIMIT', True), ('FOLLOWING_ERROR', 'FAULT', False)])
def test_faults_stop_with_their_cause(fault, cause, immediate):
    core = make()
    _moving_stream(core)
    core.latch_fault(fault, axis=1)
    assert core.stream_status().stop_cause == cause and core.fault_axes == {1}
    assert core.enabled is not immediate
    run(core, 1.0)
    assert not core.enabled and not core.moving
    with pytest.raises(Refusal) as info:
        core.enable()
    assert info.value.reason == 'FAULTED' and info.value.fault == fault


def test_measured_positions_are_held_on_enable_and_halt():
    measured = np.array([0.001, 0.01])
    core = ControllerCore(AXES, measure=lambda: measured)
    core.enable()
    np.testing.assert_array_equal(core.ref_pos, measured)


# ------------------------------------------------------------------ refusals

def test_stream_refusals_say_why():
    core = ControllerCore(AXES)
    with pytest.raises(Refusal, match='NOT_ENABLED'):
        core.begin_stream(core.ref_pos)
    core.enable()
    with pytest.raises(Refusal) as info:
        core.begin_stream(core.ref_pos + [0.001, 0])
    assert info.value.reason == 'START_MISMATCH' and info.value.axis == 0
    sid = core.begin_stream(core.ref_pos)
    zero = np.zeros(2)

    def refused(points, reason, final=False, stream_id=sid):
        with pytest.raises(Refusal) as info:
            core.push_points(stream_id, points, final=final)
        assert info.value.reason == reason, str(info.value)
        return info.value

    refused([PvtPoint(0.1, zero, zero)], 'STREAM_CLOSED', stream_id=sid + 1)
    refused([PvtPoint(0.0, zero, zero)], 'TIME_ORDER')
    refused([PvtPoint(0.2, zero, zero), PvtPoint(0.1, zero, zero)], 'TIME_ORDER')
    refused([PvtPoint(0.1, np.array([0.05, 0]), zero)], 'RANGE')
    refused([PvtPoint(0.1, zero, np.array([0.02, 0]))], 'RANGE')
    # Knots inside the limits, but the cubic overshoots between them.
    edge = np.array([0.0399, 0.0])
    core2 = make(positions=edge)
    sid2 = core2.begin_stream(edge)
    with pytest.raises(Refusal, match='RANGE'):
        core2.push_points(sid2, [PvtPoint(0.1, edge, np.array([-0.0099, 0]))])
    # A segment whose mid-velocity exceeds the limit (a jump disguised as a PVT point).
    refused([PvtPoint(0.01, np.array([0.001, 0]), zero)], 'RANGE')
    refused([PvtPoint(0.1, np.array([1e-4, 0]), np.array([1e-3, 0]))], 'BAD_VALUE', final=True)
    refused([PvtPoint(0.1, np.array([np.nan, 0]), zero)], 'BAD_VALUE')
    refused([PvtPoint(1.5, zero, zero)], 'BUFFER_FULL')            # beyond the look-ahead bound
    many = [PvtPoint(0.001 * (k + 1), zero, zero) for k in range(core.buffer_capacity + 1)]
    refused(many, 'BUFFER_FULL')
    # Nothing of a refused batch was taken.
    assert core.stream_status().free_slots == core.buffer_capacity and core.stream_status().buffered_until == 0


def test_begin_stream_refused_while_another_runs_or_axes_move():
    core = make()
    _moving_stream(core)
    with pytest.raises(Refusal, match='STREAM_ACTIVE'):
        core.begin_stream(core.ref_pos)
    with pytest.raises(Refusal, match='STREAM_ACTIVE'):
        core.set_target(core.ref_pos)
    run(core, 1.0)
    core.set_target(core.ref_pos + [0.002, 0])
    core.step()
    with pytest.raises(Refusal, match='MOVING'):
        core.begin_stream(core.ref_pos)


def test_final_batch_is_the_end_of_the_stream():
    core = make()
    sid = stream(core, cruise(duration=0.2))
    with pytest.raises(Refusal, match='final'):
        core.push_points(sid, [PvtPoint(0.3, core.ref_pos, np.zeros(2))])


def test_construction_is_validated():
    with pytest.raises(ValueError):
        ControllerCore(AXES, servo_period=0.002)      # slower than 1 kHz
    with pytest.raises(ValueError):
        AxisLimits(1.0, 0.0, 1.0, 1.0, 1e-6)
    with pytest.raises(ValueError):
        ControllerCore(AXES, positions=[1.0, 0.0])


# ------------------------------------------------------------------ legacy setpoint tracking

def test_set_target_is_reached_within_the_limits_without_overshoot():
    core = make()
    goal = np.array([0.01, -0.3])
    core.set_target(goal)
    samples = run(core, 3.0)
    assert np.array_equal(core.ref_pos, goal) and core.mode == 'hold' and not core.moving
    vel = np.array([v for _, _, v in samples])
    pos = np.array([p for _, p, _ in samples])
    assert np.all(np.abs(vel) <= V_MAX * (1 + 1e-9))
    assert np.all(np.abs(accelerations(samples)) <= A_MAX * (1 + 1e-6))
    assert np.all(pos[:, 0] <= goal[0]) and np.all(pos[:, 1] >= goal[1])


def test_set_target_refusals():
    core = make()
    with pytest.raises(Refusal) as info:
        core.set_target([0.05, 0.0])
    assert info.value.reason == 'RANGE' and info.value.axis == 0
    core.set_inhibit(True)
    with pytest.raises(Refusal, match='INHIBITED'):
        core.set_target([0.0, 0.0])


def test_the_stream_starts_once_the_start_look_ahead_is_buffered():
    core = make()
    sid = core.begin_stream(core.ref_pos)
    points = cruise(duration=1.0, spacing=0.02)
    core.push_points(sid, points[:2])                 # 40 ms: not yet
    run(core, 0.2)
    assert core.stream_status().executed_time == 0.0 and core.stream_state == 'open' and not core.moving
    core.push_points(sid, points[2:5])                # 100 ms buffered: the clock starts
    run(core, 0.05)
    assert core.stream_status().executed_time == pytest.approx(0.05) and core.moving
    short = make()
    sid = short.begin_stream(short.ref_pos)
    short.push_points(sid, [PvtPoint(0.05, short.ref_pos + [1e-5, 0], np.zeros(2))], final=True)
    run(short, 0.1)                                   # a short final stream starts at once
    assert short.stream_status().done
