"""MuJoCo hardware backend: servo tracking, safety semantics, encoders, rendering."""
import time

import numpy as np
import pytest

pytest.importorskip('mujoco', reason='MuJoCo is not installed')

from igt_robot.hardware import create_backend  # noqa: E402
from igt_robot.hardware.interface import HardwareError, HardwareFault, HardwareInterface  # noqa: E402
from igt_robot.hardware.mujoco_backend import MujocoHardware  # noqa: E402

# Simulated-time budget when waiting for motion to finish (s); conditions, not timing.
SETTLE_BUDGET = 40.0
CONTROL_PERIOD = 0.01


def make(**params):
    params.setdefault('realtime', False)
    hw = MujocoHardware(**params)
    hw.connect()
    return hw


@pytest.fixture
def hw():
    backend = make()
    yield backend
    backend.close()


def run_until_still(hw, budget=SETTLE_BUDGET, record=None):
    """Advance in control periods until the axes report not moving; returns the last state."""
    end = hw.sim_time + budget
    while hw.sim_time < end:
        hw.advance(CONTROL_PERIOD)
        state = hw.read()
        if record is not None:
            record.append(state)
        if not state.moving:
            return state
    raise AssertionError(f'axes still moving after {budget} s of simulated time')


def test_is_a_hardware_interface_and_starts_disabled(hw):
    assert isinstance(hw, HardwareInterface)
    state = hw.read()
    assert not state.enabled and not state.estopped and state.faults == ()
    np.testing.assert_array_equal(state.positions, np.zeros(5))
    with pytest.raises(HardwareError, match='disabled'):
        hw.write(np.zeros(5))


def test_not_connected_is_an_error():
    hw = MujocoHardware(realtime=False)
    with pytest.raises(HardwareError, match='not connected'):
        hw.read()
    hw.connect()
    hw.connect()    # idempotent
    hw.close()
    hw.close()
    with pytest.raises(HardwareError, match='not connected'):
        hw.write(np.zeros(5))


def test_step_is_tracked_within_limits_and_without_overshoot(hw):
    hw.enable()
    target = np.array([0.012, -0.008, 0.15, -0.1, 0.01])
    hw.write(target)
    states = []
    final = run_until_still(hw, record=states)
    # Settled within one encoder count (1 µm / 10 µrad) plus servo residue.
    tolerance = np.array([2e-6, 2e-6, 2e-5, 2e-5, 2e-6])
    assert np.all(np.abs(final.positions - target) <= tolerance), final.positions - target
    positions = np.array([s.positions for s in states])
    velocities = np.array([s.velocities for s in states])
    # Setpoints are rate limited: no joint beyond its velocity limit (servo margin 5 %).
    assert np.all(np.abs(velocities).max(axis=0) <= 1.05 * hw.robot.velocity)
    # Critically damped or slower: no overshoot past the target (beyond 2 counts).
    overshoot = (positions - target) * np.sign(target)
    assert np.all(overshoot.max(axis=0) <= tolerance), overshoot.max(axis=0)
    # The slowest axis (insertion at 5 mm/s) sets the move duration: ~2 s, not instant.
    assert final.counters['sim_time'] >= 0.01 / 0.005


def _trapezoid(t, distance=0.02, speed=0.008, accel=0.02):
    """Position and velocity of a trapezoidal move at time t (s)."""
    t_acc = speed / accel
    t_cruise = (distance - speed * t_acc) / speed
    if t < t_acc:
        return 0.5 * accel * t * t, accel * t
    if t < t_acc + t_cruise:
        return 0.5 * accel * t_acc ** 2 + speed * (t - t_acc), speed
    if t < 2 * t_acc + t_cruise:
        tt = t - t_acc - t_cruise
        return distance - 0.5 * accel * (t_acc - tt) ** 2, speed - accel * tt
    return distance, 0.0


@pytest.mark.parametrize('period, explicit_velocity, tolerance', [
    (0.01, False, 2.5e-4),     # 100 Hz stream, feed-forward estimated from the setpoints
    (0.01, True, 1.5e-4),      # 100 Hz stream with explicit feed-forward velocities
    (0.001, False, 3e-5),      # 1 kHz stream
])
def test_streamed_trajectory_is_followed_closely(hw, period, explicit_velocity, tolerance):
    hw.enable()
    errors, speeds = [], []
    for k in range(int(round(3.5 / period))):
        position, velocity = _trapezoid(k * period)
        hw.write([position, 0, 0, 0, 0], [velocity, 0, 0, 0, 0] if explicit_velocity else None)
        hw.advance(period)
        state = hw.read()
        errors.append(state.positions[0] - _trapezoid((k + 1) * period)[0])
        speeds.append(abs(state.velocities[0]))
    assert max(np.abs(errors)) < tolerance
    assert max(speeds) <= hw.robot.velocity[0]
    final = run_until_still(hw)
    assert final.positions[0] == pytest.approx(0.02, abs=2e-6)   # no drift past the last setpoint


def test_silent_host_mid_stream_does_not_carry_the_axis_on(hw):
    hw.enable()
    period = 0.01
    for k in range(150):                       # cruising at 8 mm/s when the stream stops
        hw.write([_trapezoid(k * period)[0], 0, 0, 0, 0])
        hw.advance(period)
    last_setpoint = _trapezoid(149 * period)[0]
    states = []
    final = run_until_still(hw, record=states)
    beyond = max(s.positions[0] for s in states) - last_setpoint
    # Feed-forward expires max(1.5 periods, the late-cycle bridge) after the last setpoint, then
    # the axis brakes at its 20 mm/s² limit: at most 0.05 s * v + v²/(2a) = 0.4 + 1.6 mm past it.
    from igt_robot.hardware.mujoco_backend import FEEDFORWARD_BRIDGE
    speed = 0.008
    assert beyond < max(1.5 * period, FEEDFORWARD_BRIDGE) * speed + speed ** 2 / (2 * 0.02) + 5e-5
    assert final.positions[0] == pytest.approx(last_setpoint, abs=2e-6)


def test_inhibit_decelerates_holds_and_refuses_setpoints(hw):
    hw.enable()
    hw.write([0.0, 0.0, 0.0, 0.0, 0.10])
    hw.advance(1.0)                           # insertion cruising at 5 mm/s
    before = hw.read()
    assert before.moving and before.velocities[4] == pytest.approx(0.005, rel=0.05)
    hw.set_motion_inhibit(True)
    stopped = run_until_still(hw)
    assert stopped.motion_inhibited
    # Stopping distance v²/(2a) = 1.25 mm at a = 0.01 m/s² (plus servo lag).
    travelled = stopped.positions[4] - before.positions[4]
    assert 0.0005 < travelled < 0.0025
    assert stopped.positions[4] < 0.02
    with pytest.raises(HardwareError, match='inhibited'):
        hw.write([0.0, 0.0, 0.0, 0.0, 0.10])
    hw.advance(1.0)
    np.testing.assert_allclose(hw.read().positions, stopped.positions, atol=2e-6)
    hw.set_motion_inhibit(False)
    hw.write([0.0, 0.0, 0.0, 0.0, 0.02])
    final = run_until_still(hw)
    assert final.positions[4] == pytest.approx(0.02, abs=2e-6)


def test_emergency_stop_latches_until_reset(hw):
    hw.enable()
    hw.write([0.03, 0.0, 0.0, 0.0, 0.0])
    hw.advance(1.0)
    at_stop = hw.read().positions.copy()
    hw.emergency_stop()
    hw.advance(1.0)
    state = hw.read()
    assert state.estopped and not state.enabled and not state.moving
    # Cut immediately: well under the 20 mm/s² controlled-stop distance (2.5 mm).
    assert abs(state.positions[0] - at_stop[0]) < 2e-4
    with pytest.raises(HardwareError, match='emergency stop'):
        hw.write(np.zeros(5))
    with pytest.raises(HardwareError, match='reset_faults'):
        hw.enable()
    hw.advance(1.0)
    assert hw.read().estopped                 # still latched
    hw.reset_faults()
    state = hw.read()
    assert not state.estopped and not state.enabled   # reset does not re-energise
    with pytest.raises(HardwareError, match='disabled'):
        hw.write(np.zeros(5))
    hw.enable()
    hw.write(np.zeros(5))
    assert run_until_still(hw).positions[0] == pytest.approx(0.0, abs=2e-6)


def test_stop_and_disable_decelerate_then_hold(hw):
    hw.enable()
    hw.write([0.0, 0.03, 0.0, 0.0, 0.0])
    hw.advance(1.0)
    before = hw.read()
    hw.stop()
    stopped = run_until_still(hw)
    # Decelerates at 20 mm/s²: stopping distance v²/(2a), then holds short of the target.
    expected = before.positions[1] + before.velocities[1] ** 2 / (2 * 0.02)
    assert stopped.positions[1] == pytest.approx(expected, abs=3e-4)
    assert stopped.positions[1] < 0.025
    hw.write([0.0, 0.0, 0.0, 0.3, 0.0])                   # stop is not latched
    hw.advance(0.5)
    hw.disable()
    state = run_until_still(hw)
    assert not state.enabled
    held = state.positions.copy()
    hw.advance(1.0)
    np.testing.assert_allclose(hw.read().positions, held, atol=2e-5)
    with pytest.raises(HardwareError, match='disabled'):
        hw.write(np.zeros(5))


def test_out_of_range_setpoint_latches_setpoint_range(hw):
    hw.enable()
    with pytest.raises(HardwareFault, match='guide_pitch beyond upper limit') as info:
        hw.write([0.0, 0.0, 0.6, 0.0, 0.0])
    assert info.value.code == 'SETPOINT_RANGE'
    assert hw.read().faults == ('SETPOINT_RANGE',)
    with pytest.raises(HardwareError, match='SETPOINT_RANGE'):
        hw.write(np.zeros(5))                 # latched: even a valid setpoint is refused
    hw.reset_faults()
    assert hw.read().faults == ()
    hw.write([0.0, 0.0, 0.1, 0.0, 0.0])       # still enabled after a range fault
    assert run_until_still(hw).positions[2] == pytest.approx(0.1, abs=2e-5)


@pytest.mark.parametrize('positions, velocities, match', [
    ([0.0, 0.0, float('nan'), 0.0, 0.0], None, 'non-finite position for guide_pitch'),
    ([0.0, 0.0, 0.0, 0.0, -0.001], None, 'needle_insertion beyond lower limit by 1.0 mm'),
    ([0.0, 0.0, 0.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0, 0.02], 'needle_insertion velocity 20.0 mm/s'),
])
def test_invalid_setpoints_are_refused(hw, positions, velocities, match):
    hw.enable()
    with pytest.raises(HardwareFault, match=match):
        hw.write(positions, velocities)
    assert 'SETPOINT_RANGE' in hw.read().faults


def test_wrong_length_is_a_value_error(hw):
    hw.enable()
    with pytest.raises(ValueError, match='5 positions'):
        hw.write([0.0, 0.0])


def test_setpoint_exactly_on_limits_is_accepted(hw):
    hw.enable()
    hw.write(hw.robot.upper)
    assert hw.read().faults == ()


def test_encoder_quantisation_is_visible():
    hw = make(counts_per_unit={'prismatic': 1000.0, 'revolute': 100.0})
    try:
        hw.enable()
        hw.write([0.0123, 0.0, 0.0123, 0.0, 0.0])
        state = run_until_still(hw)
        np.testing.assert_allclose(state.positions[:3], [0.012, 0.0, 0.01], atol=1e-12)
        counts = state.positions * np.array([1000, 1000, 100, 100, 1000])
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    finally:
        hw.close()


def test_seeded_noise_is_reproducible_and_has_the_given_spread():
    readings = []
    for _ in range(2):
        hw = make(noise_std=1e-4, seed=7)
        try:
            readings.append(np.array([hw.read().positions for _ in range(300)]))
        finally:
            hw.close()
    np.testing.assert_array_equal(readings[0], readings[1])
    spread = readings[0][:, 0].std()
    assert 0.7e-4 < spread < 1.3e-4


def test_backlash_loses_motion_on_reversal():
    play = 0.001
    hw = make(backlash=[play, 0.0, 0.0, 0.0, 0.0])
    try:
        hw.enable()
        hw.write([0.010, 0.0, 0.0, 0.0, 0.0])
        forward = run_until_still(hw).positions[0]
        assert forward == pytest.approx(0.010 - play / 2, abs=3e-6)   # pushing on one flank
        hw.write([0.0095, 0.0, 0.0, 0.0, 0.0])                          # reverse by half the play
        assert run_until_still(hw).positions[0] == pytest.approx(forward, abs=3e-6)
        hw.write([0.005, 0.0, 0.0, 0.0, 0.0])                           # reverse beyond the play
        assert run_until_still(hw).positions[0] == pytest.approx(0.005 + play / 2, abs=3e-6)
    finally:
        hw.close()


def test_overpowering_disturbance_latches_following_error(hw):
    hw.enable()
    hw.apply_external_force([30.0, 0.0, 0.0, 0.0, 0.0])   # above the 20 N stage drive
    hw.advance(0.5)
    state = hw.read()
    assert 'FOLLOWING_ERROR' in state.faults and not state.enabled
    hw.apply_external_force(np.zeros(5))
    with pytest.raises(HardwareError, match='FOLLOWING_ERROR'):
        hw.enable()


def test_realtime_mode_follows_the_wall_clock():
    hw = MujocoHardware(realtime=True)
    hw.connect()
    try:
        deadline = time.monotonic() + 10.0
        while hw.read().counters['sim_time'] < 0.05:
            assert time.monotonic() < deadline, 'simulation did not advance with the wall clock'
        with pytest.raises(HardwareError, match='realtime'):
            hw.advance(0.1)
    finally:
        hw.close()


def test_advance_accumulates_fractions_of_a_step(hw):
    for _ in range(4):
        hw.advance(0.00025)
    assert hw.sim_time == pytest.approx(0.001)
    with pytest.raises(ValueError):
        hw.advance(-1.0)


@pytest.mark.parametrize('params, match', [
    (dict(timestep=0.5), 'timestep'),
    (dict(counts_per_unit=0.0), 'counts_per_unit'),
    (dict(noise_std=-1.0), 'noise_std'),
    (dict(backlash=[0.0, 0.0]), 'backlash'),
    (dict(initial_positions=[0.0, 0.0, 0.0, 0.0, 0.2]), 'needle_insertion beyond upper limit'),
])
def test_invalid_construction(params, match):
    with pytest.raises(ValueError, match=match):
        MujocoHardware(realtime=False, **params)


def test_render_produces_an_image(hw):
    try:
        image = hw.render(160, 120)
    except HardwareError as exc:
        pytest.skip(f'no offscreen OpenGL: {exc}')
    assert image.shape == (120, 160, 3) and image.dtype == np.uint8
    assert image.std() > 5.0                   # not a blank frame
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    with pytest.raises(ValueError, match='unknown camera'):
        hw.render(32, 32, camera='nope')


def test_create_backend_factory():
    hw = create_backend('mujoco', realtime=False)
    assert isinstance(hw, MujocoHardware)
    with pytest.raises(ValueError, match='unknown hardware backend'):
        create_backend('ros1')


# ------------------------------------------------------------------ trajectory streaming (protocol 2 model)

def _pvt_move(distance=0.02, duration=4.0, spacing=0.02, axis=0):
    """A smooth (cosine-velocity) move of one axis, sampled as PVT points."""
    from igt_robot.hardware.interface import PvtPoint
    points = []
    w = 2 * np.pi / duration
    for k in range(1, int(round(duration / spacing)) + 1):
        t = k * spacing
        pos, vel = np.zeros(5), np.zeros(5)
        pos[axis] = distance / duration * (t - np.sin(w * t) / w)
        vel[axis] = distance / duration * (1 - np.cos(w * t))
        points.append(PvtPoint(t, pos, vel))
    return points


def _play(hw, points, lookahead=0.2, period=0.02):
    """Host side at 50 Hz keeping ``lookahead`` s buffered; returns the states read each cycle."""
    sid = hw.begin_stream(hw.read().positions)
    pushed, states = 0, []
    while True:
        status = hw.stream_status()
        horizon = status.executed_time + lookahead
        batch = [p for p in points[pushed:] if p.time <= horizon][:5]
        if batch:
            hw.push_points(sid, batch, final=pushed + len(batch) == len(points))
            pushed += len(batch)
        hw.advance(period)
        state = hw.read()
        states.append(state)
        if state.stream.done or not (state.stream.active or pushed < len(points)):
            return sid, states


def test_streamed_pvt_trajectory_is_servoed_by_the_controller(hw):
    hw.enable()
    points = _pvt_move()
    sid, states = _play(hw, points)
    final = states[-1]
    assert final.stream.stream_id == sid and final.stream.done and final.stream.underruns == 0
    assert final.stream.stop_cause == ''
    by_time = {round(p.time, 6): p.positions[0] for p in points}
    errors = [abs(s.positions[0] - by_time[round(s.stream.executed_time, 6)]) for s in states
              if round(s.stream.executed_time, 6) in by_time]
    assert len(errors) > 100 and max(errors) < 3e-5          # servo lag of a 24 Hz position loop
    assert run_until_still(hw).positions[0] == pytest.approx(0.02, abs=2e-6)


def test_trigger_edge_stops_the_stream_and_blocks_release_while_imaging(hw):
    from igt_robot.hardware.interface import CommandRefused
    hw.enable()
    sid = hw.begin_stream(hw.read().positions)
    points = _pvt_move(duration=4.0)
    hw.push_points(sid, [p for p in points if p.time <= 0.9])
    hw.advance(0.8)
    before = hw.read()
    assert before.moving and before.stream.active
    hw.set_scanner_trigger(True)
    state = hw.read()
    assert state.stream.stop_cause == 'TRIGGER' and state.motion_inhibited and state.inhibit_cause == 'TRIGGER'
    stopped = run_until_still(hw)
    # Ramped at the stage's 20 mm/s² (v²/2a ~ 0.1 mm), not an underrun.
    assert stopped.positions[0] - before.positions[0] < 5e-4 and stopped.stream.underruns == 0
    with pytest.raises(CommandRefused) as info:
        hw.set_motion_inhibit(False)
    assert info.value.code == 'TRIGGER_ACTIVE'
    with pytest.raises(CommandRefused):
        hw.push_points(sid, points[45:46])
    hw.set_scanner_trigger(False)
    assert hw.read().motion_inhibited                          # latched until the host releases it
    hw.set_motion_inhibit(False)
    assert not hw.read().motion_inhibited


def test_stream_underrun_is_a_controlled_stop(hw):
    hw.enable()
    sid = hw.begin_stream(hw.read().positions)
    points = _pvt_move(duration=4.0)
    hw.push_points(sid, [p for p in points if p.time <= 1.0])
    state = run_until_still(hw)
    assert state.stream.stop_cause == 'UNDERRUN' and state.stream.underruns == 1
    assert state.counters['underruns'] == 1 and state.enabled and state.faults == ()


def test_realtime_host_stall_shorter_than_the_buffer_changes_nothing():
    hw = MujocoHardware(realtime=True)
    hw.connect()
    try:
        hw.enable()
        points = _pvt_move(distance=0.005, duration=1.5)
        sid = hw.begin_stream(hw.read().positions)
        hw.push_points(sid, [p for p in points if p.time <= 0.9][:120])
        time.sleep(0.3)                                       # the host stalls; physics catches up later
        status = hw.stream_status()
        assert status.active and status.executed_time >= 0.29 and status.underruns == 0
        pushed = len([p for p in points if p.time <= 0.9])
        deadline = time.monotonic() + 10.0
        while not (status := hw.stream_status()).done:
            assert time.monotonic() < deadline and status.active, status
            batch = [p for p in points[pushed:] if p.time <= status.executed_time + 0.8][:20]
            if batch:
                hw.push_points(sid, batch, final=pushed + len(batch) == len(points))
                pushed += len(batch)
            time.sleep(0.05)
        state = hw.read()
        assert state.stream.underruns == 0 and state.faults == ()
        assert state.positions[0] == pytest.approx(0.005, abs=3e-5)
    finally:
        hw.close()


def test_optional_watchdog_stops_a_silent_host():
    hw = make(watchdog_timeout=0.1)
    try:
        hw.enable()
        hw.write([0.02, 0.0, 0.0, 0.0, 0.0])
        hw.advance(0.5)                                       # no host call for 0.5 s
        state = hw.read()
        assert 'WATCHDOG' in state.faults
        assert not run_until_still(hw).enabled
    finally:
        hw.close()


def test_coarse_physics_step_still_servos_at_1khz():
    hw = make(timestep=0.004)
    try:
        assert hw.core.servo_period == pytest.approx(0.001)
        hw.enable()
        hw.write([0.005, 0.0, 0.0, 0.0, 0.0])
        assert run_until_still(hw).positions[0] == pytest.approx(0.005, abs=5e-6)
    finally:
        hw.close()
