"""Attacks on the controller link (issue 11, item 4), each of which succeeded before protocol 2:

* a second process opens the serial port (pyserial's ``exclusive=True`` was only an advisory flock);
* an older stateful frame replayed with its old sequence number was executed again;
* a truncated frame swallowed the requests that followed it (no inter-byte timeout).

Part 1 drives the firmware in-process (deterministic time), part 2 the emulator process on a pty.
"""
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from igt_robot.hardware import protocol as P
from igt_robot.hardware.axis_model import contract_axis_configs
from igt_robot.hardware.emulator import EmulatorProcess, Firmware
from igt_robot.hardware.interface import HardwareError
from igt_robot.hardware.serial_driver import CommandRefused, SerialHardware

REPLY_TIMEOUT = 0.2


def _firmware():
    return Firmware(contract_axis_configs(), watchdog_ms=60000)


def _request(fw, msg_type, seq, payload=b''):
    replies = fw.receive(P.encode_frame(msg_type, seq, payload))
    assert len(replies) == 1
    (frame,) = P.FrameDecoder().feed(replies[0])
    assert frame.seq == seq
    return frame


def _nak(frame):
    assert frame.type == P.MsgType.NAK, f'expected a NAK, got {P.type_name(frame.type)}'
    return P.decode_nak(frame.payload)


def _target(x):
    return P.encode_set_target(P.SetTarget((x, 0, 0, 0, 0), (0,) * 5, (0,) * 5))


def _ready_firmware(first_seq=0):
    fw = _firmware()
    _request(fw, P.MsgType.HELLO, first_seq, P.encode_hello())
    assert _request(fw, P.MsgType.ENABLE, (first_seq + 1) & 0xFF).type == P.MsgType.ACK
    return fw


# ============================================================================ replay

def test_an_older_stateful_frame_replayed_is_refused_with_reason_replay():
    fw = _ready_firmware()
    old = P.encode_frame(P.MsgType.SET_TARGET, 2, _target(1000))
    fw.receive(old)
    _request(fw, P.MsgType.SET_TARGET, 3, _target(2000))
    _request(fw, P.MsgType.GET_STATUS, 4)
    (reply,) = fw.receive(old)                       # the attacker replays the recorded frame
    nak = _nak(P.FrameDecoder().feed(reply)[0])
    assert nak.reason == P.NakReason.REPLAY and nak.request_type == P.MsgType.SET_TARGET
    assert fw.core.target[0] == 2000 and fw.executed['SET_TARGET'] == 2 and fw.replays == 1
    # The same sequence number with another payload is no retransmission either.
    assert _nak(_request(fw, P.MsgType.STOP, 4)).reason == P.NakReason.REPLAY


def test_the_identical_last_frame_is_a_retransmission_answered_from_the_cache():
    fw = _ready_firmware()
    frame = P.encode_frame(P.MsgType.SET_TARGET, 2, _target(1000))
    first = fw.receive(frame)
    assert fw.receive(frame) == first                 # reply lost, host retransmits: same answer
    _request(fw, P.MsgType.GET_STATUS, 3)
    assert fw.receive(frame) == first                 # a late duplicate on the line: still harmless
    assert fw.executed['SET_TARGET'] == 1 and fw.duplicates == 2 and fw.replays == 0


def test_a_stream_frame_replayed_is_refused():
    fw = _ready_firmware()
    start = tuple(int(round(p)) for p in fw.actual)
    begin = _request(fw, P.MsgType.BEGIN_STREAM, 2, P.encode_begin_stream(start))
    sid = P.decode_stream_status(begin.payload).stream_id
    point = P.WirePoint(100_000, start, (0,) * 5)
    push = P.encode_frame(P.MsgType.PUSH_POINTS, 3, P.encode_push_points(P.PushPoints(sid, (point,))))
    fw.receive(push)
    _request(fw, P.MsgType.HEARTBEAT, 4)
    _request(fw, P.MsgType.STOP, 5)
    (reply,) = fw.receive(push)
    assert _nak(P.FrameDecoder().feed(reply)[0]).reason == P.NakReason.REPLAY
    assert fw.executed['PUSH_POINTS'] == 1


def test_sequence_numbers_wrap_around_without_false_replays():
    fw = _ready_firmware(first_seq=250)
    seq = 252
    for k in range(600):                             # more than two wraps, stateful and not
        msg = P.MsgType.SET_TARGET if k % 3 else P.MsgType.GET_STATUS
        reply = _request(fw, msg, seq & 0xFF, _target(k) if msg == P.MsgType.SET_TARGET else b'')
        assert reply.type != P.MsgType.NAK, (k, _nak(reply))
        seq += 1
    assert fw.replays == 0 and fw.rx_seq_gaps == 0


def test_more_than_half_the_sequence_space_behind_counts_as_behind():
    fw = _ready_firmware()                           # last accepted: 1
    assert _request(fw, P.MsgType.STOP, 1 + P.SEQ_WINDOW).type == P.MsgType.ACK   # far but ahead
    assert _nak(_request(fw, P.MsgType.STOP, 2)).reason == P.NakReason.REPLAY      # 126 behind


def test_hello_restarts_the_sequence():
    fw = _ready_firmware(first_seq=100)
    assert _nak(_request(fw, P.MsgType.STOP, 5)).reason == P.NakReason.REPLAY
    _request(fw, P.MsgType.HELLO, 0, P.encode_hello())     # a reconnecting host starts at any number
    assert _request(fw, P.MsgType.STOP, 1).type == P.MsgType.ACK


# ============================================================================ truncated frames

def test_a_truncated_frame_does_not_swallow_the_following_request():
    fw = _ready_firmware()
    # A header announcing 200 payload bytes, then the line goes quiet (cable glitch, killed writer).
    truncated = P.encode_frame(P.MsgType.SET_TARGET, 2, bytes(200))[:20]
    assert fw.receive(truncated) == []
    for _ in range(int(P.INTER_BYTE_TIMEOUT * 1000) + 5):
        fw.step()
    replies = fw.receive(P.encode_frame(P.MsgType.GET_STATUS, 3))
    assert len(replies) == 1 and P.FrameDecoder().feed(replies[0])[0].type == P.MsgType.STATUS
    assert fw.decoder.timeouts == 1


def test_bytes_arriving_without_a_gap_are_not_cut_by_the_timeout():
    fw = _ready_firmware()
    frame = P.encode_frame(P.MsgType.GET_STATUS, 2)
    assert fw.receive(frame[:3]) == []
    fw.step()                                         # 1 ms between two chunks of one frame
    assert len(fw.receive(frame[3:])) == 1 and fw.decoder.timeouts == 0


# ============================================================================ part 2: the emulator on a pty

@pytest.fixture
def emulator(request):
    emu = EmulatorProcess('--watchdog-ms', '2000')
    request.addfinalizer(emu.terminate)
    return emu.start()


@pytest.fixture
def hw(request, emulator):
    driver = SerialHardware(emulator.pty_path, timeout=REPLY_TIMEOUT)
    request.addfinalizer(driver.close)
    driver.connect()
    return driver


def _raw_exchange(hw, frame: bytes) -> P.Frame:
    """Put a raw frame on the line through the driver's own port (as an attacker sharing the
    line would) and return the controller's answer to it."""
    with hw._lock:
        hw._serial.write(frame)
        decoder = P.FrameDecoder()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            data = hw._serial.read(hw._serial.in_waiting or 1)
            frames = decoder.feed(data)
            if frames:
                return frames[0]
    raise AssertionError('no answer from the controller')


def test_second_driver_on_the_port_fails_with_a_clear_error(hw, emulator):
    second = SerialHardware(emulator.pty_path, timeout=REPLY_TIMEOUT)
    with pytest.raises(HardwareError, match='in use by another process'):
        second.connect()
    assert hw.read().firmware_version                 # the owner's link is untouched


def _open_as_unprivileged(path: str) -> subprocess.CompletedProcess:
    """os.open() the tty from a process without CAP_SYS_ADMIN (the kernel exempts that from TIOCEXCL)."""
    code = ('import os, sys\n'
            'try:\n'
            '    fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)\n'
            '    os.write(fd, bytes.fromhex(sys.argv[2]))\n'
            '    print("opened")\n'
            'except OSError as exc:\n'
            '    print("refused", exc.errno)\n')
    hostile = P.encode_frame(P.MsgType.MOTION_INHIBIT, 77, P.encode_motion_inhibit(False)).hex()
    kwargs = {}
    if os.geteuid() == 0:
        kwargs['user'] = 65534
        kwargs['group'] = 65534
    python = shutil.which('python3', path='/usr/bin:/bin') or 'python3'
    return subprocess.run([python, '-c', code, path, hostile], capture_output=True, text=True, timeout=30,
                          **kwargs)


def test_an_unprivileged_process_cannot_open_the_port_while_the_driver_holds_it(hw, emulator):
    path = emulator.pty_path
    mode = os.stat(path).st_mode
    os.chmod(path, 0o666)                             # so only TIOCEXCL can stop the other process
    try:
        result = _open_as_unprivileged(path)
        assert result.stdout.split() == ['refused', '16'], (result.stdout, result.stderr)   # EBUSY
        hw.close()
        freed = _open_as_unprivileged(path)           # the driver released it on close
        assert freed.stdout.strip() == 'opened', (freed.stdout, freed.stderr)
    finally:
        os.chmod(path, mode & 0o7777)
    hw.connect()                                      # and can take it again


def test_replayed_frame_on_the_line_is_refused_by_the_controller(hw, emulator):
    hw.enable()
    hw.set_motion_inhibit(True)
    old_seq = (hw._seq - 1) & 0xFF                    # MOTION_INHIBIT 1 went out with this number
    hw.read()
    hw.set_motion_inhibit(False)
    hw.set_motion_inhibit(True)
    # Replaying an older MOTION_INHIBIT 0 (recorded off the line) must not release the inhibit.
    replay = P.encode_frame(P.MsgType.MOTION_INHIBIT, (old_seq + 2) & 0xFF, P.encode_motion_inhibit(False))
    reply = _raw_exchange(hw, replay)
    assert P.decode_nak(reply.payload).reason == P.NakReason.REPLAY
    assert emulator.state()['inhibited'] and hw.read().motion_inhibited
    assert emulator.state()['replays'] == 1


def test_truncated_frame_on_the_line_does_not_swallow_the_next_request(hw, emulator):
    with hw._lock:
        hw._serial.write(P.encode_frame(P.MsgType.SET_TARGET, 200, bytes(200))[:12])
    time.sleep(0.1)                                   # the line goes quiet: the scenario, not a wait
    state = hw.read()                                 # 3 attempts x 8 bytes never filled 200 before
    assert state.firmware_version and hw.counters['retries'] <= 1
    assert emulator.state()['rx_timeouts'] >= 1


def test_refusals_on_the_wire_name_their_reason(hw, emulator):
    hw.enable()
    emulator.control('trigger 1')
    with pytest.raises(CommandRefused) as err:
        hw.set_motion_inhibit(False)
    assert err.value.code == 'TRIGGER_ACTIVE' and 'imaging' in str(err.value)
    np.testing.assert_array_equal(hw.read().velocities, np.zeros(5))
