"""Trajectory streaming (protocol 2) through SerialHardware against the firmware emulator process.

The emulator servos at 2 kHz in its own process; the host only keeps its buffer ahead. Every wait
polls a condition with a deadline.
"""
import time

import numpy as np
import pytest

from igt_robot.hardware import protocol as P
from igt_robot.hardware.axis_model import contract_axis_configs
from igt_robot.hardware.emulator import EmulatorProcess, Firmware
from igt_robot.hardware.interface import PvtPoint
from igt_robot.hardware.serial_driver import CommandRefused, SerialHardware, SetpointRejected

REPLY_TIMEOUT = 0.2


def _move(distance=0.004, duration=1.0, spacing=0.01, axis=0):
    """A smooth (cosine-velocity) move of one axis, as PVT points."""
    w = 2 * np.pi / duration
    points = []
    for k in range(1, int(round(duration / spacing)) + 1):
        t = k * spacing
        pos, vel = np.zeros(5), np.zeros(5)
        pos[axis] = distance / duration * (t - np.sin(w * t) / w)
        vel[axis] = distance / duration * (1 - np.cos(w * t))
        points.append(PvtPoint(t, pos, vel))
    return points


def _wait(read, predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f'timed out waiting for {what}; last: {value}'


@pytest.fixture(scope='module')
def emulator(request):
    emu = EmulatorProcess('--watchdog-ms', '500')
    request.addfinalizer(emu.terminate)
    return emu.start()


@pytest.fixture
def hw(request, emulator):
    emulator.control('power_cycle')
    driver = SerialHardware(emulator.pty_path, timeout=REPLY_TIMEOUT)
    request.addfinalizer(driver.close)
    driver.connect()
    driver.enable()
    return driver


def _feed(hw, sid, points, lookahead=0.3, until=None):
    """Host loop: keep ``lookahead`` s buffered until all points are in (or ``until`` s of stream)."""
    pushed = 0
    status = hw.stream_status()
    while pushed < len(points):
        status = hw.stream_status()
        assert status.stop_cause == '', status
        if until is not None and status.executed_time >= until:
            break
        batch = [p for p in points[pushed:] if p.time <= status.executed_time + lookahead]
        if batch:
            status = hw.push_points(sid, batch, final=pushed + len(batch) == len(points))
            pushed += len(batch)
        hw.heartbeat()
    return status


def test_a_streamed_trajectory_is_executed_by_the_controller(hw, emulator):
    points = _move()
    sid = hw.begin_stream(hw.read().positions)
    _feed(hw, sid, points)
    state = _wait(hw.read, lambda s: s.stream.done, 'the stream to finish')
    assert state.stream.stream_id == sid and state.stream.underruns == 0 and state.stream.stop_cause == ''
    assert state.positions[0] == pytest.approx(0.004, abs=1e-6) and not state.moving
    truth = emulator.state()
    assert truth['stream']['state'] == 'done' and truth['executed']['PUSH_POINTS'] >= 20   # 5 points per frame


def test_the_trigger_input_stops_the_stream_and_the_host_cannot_release_it(hw, emulator):
    points = _move(distance=0.008, duration=2.0)
    sid = hw.begin_stream(hw.read().positions)
    _feed(hw, sid, points, until=0.6)
    emulator.control('trigger 1')
    state = hw.read()
    assert state.stream.stop_cause == 'TRIGGER' and state.motion_inhibited and state.inhibit_cause == 'TRIGGER'
    stopped = _wait(hw.read, lambda s: not s.moving, 'the ramp to end')
    assert stopped.stream.underruns == 0 and not stopped.stream.active
    with pytest.raises(CommandRefused) as err:
        hw.set_motion_inhibit(False)
    assert err.value.code == 'TRIGGER_ACTIVE'
    with pytest.raises(CommandRefused) as err:
        hw.push_points(sid, [p for p in points if p.time > 1.0][:3])
    assert err.value.code == 'STREAM_CLOSED'
    emulator.control('trigger 0')
    assert hw.read().motion_inhibited                 # latched: no resumption without the host
    hw.set_motion_inhibit(False)
    assert not hw.read().motion_inhibited


def test_a_host_that_stops_feeding_gets_a_controlled_underrun_stop(hw, emulator):
    points = _move(distance=0.008, duration=2.0)
    sid = hw.begin_stream(hw.read().positions)
    hw.push_points(sid, points[:10])                 # 0.1 s: starts, then runs dry mid-move
    state = _wait(hw.read, lambda s: s.stream.stop_cause != '' and not s.moving, 'the underrun stop')
    assert state.stream.stop_cause == 'UNDERRUN' and state.stream.underruns == 1
    assert state.enabled and state.faults == ()
    assert state.counters['underruns'] == 1


def test_host_inhibit_mid_stream_ramps_and_flushes(hw, emulator):
    points = _move(distance=0.008, duration=2.0)
    sid = hw.begin_stream(hw.read().positions)
    _feed(hw, sid, points, until=0.5)
    hw.set_motion_inhibit(True)
    state = hw.read()
    assert state.stream.stop_cause == 'INHIBIT' and state.inhibit_cause == 'HOST'
    assert state.stream.free_slots == emulator.state()['stream']['free_slots']
    _wait(hw.read, lambda s: not s.moving, 'the ramp to end')
    with pytest.raises(CommandRefused) as err:
        hw.begin_stream(hw.read().positions)
    assert err.value.code == 'INHIBITED'


def test_points_are_checked_before_sending(hw):
    sid = hw.begin_stream(hw.read().positions)
    with pytest.raises(SetpointRejected, match='stage_x'):
        hw.push_points(sid, [PvtPoint(0.1, np.array([0.5, 0, 0, 0, 0]), np.zeros(5))])
    with pytest.raises(SetpointRejected, match='not after'):
        hw.push_points(sid, [PvtPoint(0.1, np.zeros(5), np.zeros(5)), PvtPoint(0.1000001, np.zeros(5), np.zeros(5))])
    with pytest.raises(SetpointRejected, match='velocity'):
        hw.push_points(sid, [PvtPoint(0.1, np.zeros(5), np.array([1.0, 0, 0, 0, 0]))])
    with pytest.raises(CommandRefused) as err:
        hw.begin_stream(hw.read().positions + np.array([0.001, 0, 0, 0, 0]))
    assert err.value.code == 'START_MISMATCH'


def test_start_mismatch_is_refused_with_the_axis():
    fw = Firmware(contract_axis_configs(), watchdog_ms=60000)
    fw.receive(P.encode_frame(P.MsgType.HELLO, 0, P.encode_hello()))
    fw.receive(P.encode_frame(P.MsgType.ENABLE, 1))
    start = [int(round(p)) for p in fw.actual]
    start[3] += 1000
    (reply,) = fw.receive(P.encode_frame(P.MsgType.BEGIN_STREAM, 2, P.encode_begin_stream(start)))
    nak = P.decode_nak(P.FrameDecoder().feed(reply)[0].payload)
    assert (nak.reason, nak.detail) == (P.NakReason.START_MISMATCH, 3)
