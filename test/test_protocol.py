"""Codec tests for the motor-controller protocol (igt_robot.hardware.protocol).

Pure functions only: CRC, framing, streaming decoder resync, payload codecs,
and the SI <-> encoder-count conversion of the axis configuration.
"""
import random

import pytest

from igt_robot.hardware import protocol as P
from igt_robot.hardware.axis_model import AxisConfig, contract_axis_configs


def crc16_bitwise(data: bytes) -> int:
    """Reference CRC-16/CCITT-FALSE, bit by bit, straight from the definition."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


# ----------------------------------------------------------------------------- CRC

def test_crc_standard_check_value():
    assert P.crc16_ccitt(b'123456789') == 0x29B1     # published check value of CRC-16/CCITT-FALSE
    assert P.crc16_ccitt(b'') == 0xFFFF


def test_crc_table_matches_bitwise_definition_and_chains():
    rng = random.Random(7)
    for length in (1, 2, 5, 63, 200):
        data = bytes(rng.randrange(256) for _ in range(length))
        assert P.crc16_ccitt(data) == crc16_bitwise(data)
        cut = length // 2
        assert P.crc16_ccitt(data[cut:], P.crc16_ccitt(data[:cut])) == P.crc16_ccitt(data)


# ----------------------------------------------------------------------------- framing

def test_frame_layout_byte_by_byte():
    frame = P.encode_frame(P.MsgType.GET_STATUS, 7, b'\x01\x02')
    assert frame[:2] == b'\xA5\xC3'
    assert frame[2] == 2 and frame[3] == 0xFD              # LEN, ~LEN
    assert frame[4] == 0x0A and frame[5] == 7              # TYPE, SEQ
    assert frame[6:8] == b'\x01\x02'
    crc = crc16_bitwise(frame[2:8])
    assert frame[8:] == bytes((crc & 0xFF, crc >> 8))      # little-endian CRC over LEN..PAYLOAD
    assert len(frame) == P.FRAME_OVERHEAD + 2


def test_worked_examples_in_the_protocol_document():
    assert P.encode_frame(P.MsgType.GET_STATUS, 7) == bytes.fromhex('a5c300ff0a078fd4')
    assert P.encode_frame(P.MsgType.HEARTBEAT, 8) == bytes.fromhex('a5c300ff09083370')
    assert P.encode_frame(P.MsgType.ACK, 8, P.encode_ack(P.MsgType.HEARTBEAT)) == bytes.fromhex('a5c301fe80080990a5')


def test_encode_frame_rejects_what_does_not_fit():
    with pytest.raises(P.ProtocolError, match='MAX_PAYLOAD'):
        P.encode_frame(P.MsgType.SET_TARGET, 0, bytes(P.MAX_PAYLOAD + 1))
    with pytest.raises(P.ProtocolError, match='SEQ 256'):
        P.encode_frame(P.MsgType.HEARTBEAT, 256)
    with pytest.raises(P.ProtocolError, match='TYPE'):
        P.encode_frame(300, 0)


def _frames(n, rng=None):
    """Distinct frames of varied size whose payloads never contain the sync byte."""
    rng = rng or random.Random(1)
    out = []
    for i in range(n):
        payload = bytes(rng.choice([b for b in range(256) if b != 0xA5]) for _ in range(rng.randrange(0, 40)))
        out.append(P.Frame(rng.choice(list(P.MsgType)), i & 0xFF, payload))
    return out


def _encode(frame):
    return P.encode_frame(frame.type, frame.seq, frame.payload)


def test_decoder_returns_frames_for_any_chunking():
    frames = _frames(20)
    stream = b''.join(_encode(f) for f in frames)
    whole = P.FrameDecoder()
    assert whole.feed(stream) == frames
    bytewise = P.FrameDecoder()
    got = []
    for b in stream:
        got += bytewise.feed(bytes((b,)))
    assert got == frames
    assert bytewise.crc_errors == bytewise.header_errors == bytewise.discarded_bytes == 0
    assert bytewise.pending == 0


def test_decoder_resyncs_after_garbage_with_fake_sync_bytes():
    frames = _frames(3)
    garbage = b'\x00\xFF\xA5\x12' + P.SYNC + b'\x10\xEF\x83' + b'\xA5'   # a fake header claiming 16 bytes
    stream = garbage + _encode(frames[0]) + b'\xA5\xA5\x00' + _encode(frames[1]) + _encode(frames[2])
    dec = P.FrameDecoder()
    assert dec.feed(stream) == frames
    assert dec.discarded_bytes > 0 and dec.resyncs > 0
    assert dec.crc_errors + dec.header_errors >= 1      # the fake header was examined and rejected


@pytest.mark.parametrize('bit', range(8 * (P.FRAME_OVERHEAD + 6)))
def test_any_single_bit_error_is_caught_and_the_next_frame_survives(bit):
    victim = P.encode_frame(P.MsgType.STATUS, 3, b'\x10\x20\x30\x40\x50\x60')
    follower = P.Frame(P.MsgType.ACK, 4, b'\x02')
    damaged = bytearray(victim)
    damaged[bit // 8] ^= 1 << (bit % 8)
    dec = P.FrameDecoder()
    assert dec.feed(bytes(damaged) + _encode(follower)) == [follower]
    # Every damaged frame is accounted for: skipped as noise, bad header, or bad CRC.
    assert dec.discarded_bytes + dec.header_errors + dec.crc_errors > 0


def test_crc_error_reports_header_to_callback():
    seen = []
    dec = P.FrameDecoder(on_crc_error=lambda t, s: seen.append((t, s)))
    damaged = bytearray(P.encode_frame(P.MsgType.ENABLE, 42))
    damaged[-1] ^= 0x01
    assert dec.feed(bytes(damaged)) == []
    assert seen == [(P.MsgType.ENABLE, 42)] and dec.crc_errors == 1


def test_corrupted_length_is_rejected_without_waiting_for_the_body():
    frame = bytearray(P.encode_frame(P.MsgType.STATUS, 1, bytes(50)))
    frame[2] ^= 0x40                                  # LEN 50 -> 114, ~LEN unchanged
    dec = P.FrameDecoder()
    assert dec.feed(bytes(frame[:6])) == []
    assert dec.header_errors == 1
    assert dec.pending <= 1                           # not holding out for 114 bytes


@pytest.mark.parametrize('keep', range(1, 29))         # the whole frame is 29 bytes
def test_truncated_frame_followed_by_whole_frames(keep):
    whole = P.encode_frame(P.MsgType.STATUS, 9, bytes(range(1, 22)))
    assert len(whole) == 29
    truncated = whole[:keep]
    followers = _frames(4, random.Random(keep))
    dec = P.FrameDecoder()
    out = dec.feed(truncated)
    for f in followers:
        out += dec.feed(_encode(f))
    # Followers total more bytes than the cut frame, so its candidate always resolves.
    assert sum(len(_encode(f)) for f in followers) > len(truncated) + 30
    assert out == followers


def test_frame_split_at_end_completes_later():
    frame = P.Frame(P.MsgType.STATUS, 5, bytes(range(30)))
    data = _encode(frame)
    dec = P.FrameDecoder()
    assert dec.feed(data[:-3]) == []
    assert dec.pending == len(data) - 3
    assert dec.feed(data[-3:]) == [frame]
    assert dec.crc_errors == 0


def test_reset_drops_partial_frame():
    dec = P.FrameDecoder()
    dec.feed(P.encode_frame(P.MsgType.STATUS, 1, bytes(10))[:7])
    dec.reset()
    assert dec.pending == 0 and dec.discarded_bytes == 7


# ----------------------------------------------------------------------------- payloads

def test_hello_round_trip():
    assert P.decode_hello(P.encode_hello((1, 3))) == (1, 3)
    reply = P.HelloReply((1, 0), (1, 2, 3), 5, 100, 'ctrl-α')
    assert P.decode_hello_reply(P.encode_hello_reply(reply)) == reply
    assert reply.firmware_version_str == '1.2.3'


def test_set_target_round_trip_with_negative_and_extreme_values():
    target = P.SetTarget((-40000, 0, 2 ** 31 - 1, -2 ** 31, 150000), (0, 1, 10000, 2 ** 32 - 1, 5000),
                         (-5000, 0, 1, -1, 5000))
    payload = P.encode_set_target(target)
    assert len(payload) == 5 * 12
    assert P.decode_set_target(payload) == target


def test_set_target_rejects_overflow_and_mismatched_lengths():
    with pytest.raises(P.ProtocolError, match='does not fit'):
        P.encode_set_target(P.SetTarget((2 ** 31,), (0,), (0,)))
    with pytest.raises(P.ProtocolError, match='equally many'):
        P.encode_set_target(P.SetTarget((1, 2), (0,), (0, 0)))
    with pytest.raises(P.PayloadLengthError):
        P.decode_set_target(bytes(13))


def test_status_round_trip_and_flags():
    st = P.Status(uptime_ms=123456, flags=int(P.StatusFlag.ENABLED | P.StatusFlag.SCANNER_TRIGGER),
                  faults=int(P.Fault.WATCHDOG | P.Fault.OVERTEMP), fault_axes=0b00100, rx_crc_errors=3,
                  rx_seq_gaps=1, trigger_edges=7, positions=(-1, 2, -3, 4, 150000), velocities=(10, -20, 0, 0, 5))
    payload = P.encode_status(st)
    assert len(payload) == 15 + 5 * 8
    back = P.decode_status(payload)
    assert back == st
    assert back.has(P.StatusFlag.ENABLED) and back.has(P.StatusFlag.SCANNER_TRIGGER)
    assert not back.has(P.StatusFlag.ESTOP)
    assert P.fault_names(back.faults) == ('WATCHDOG', 'OVERTEMP')


def test_status_with_wrong_length_is_rejected():
    payload = P.encode_status(P.Status(0, 0, 0, 0, 0, 0, 0, (1, 2), (0, 0)))
    with pytest.raises(P.PayloadLengthError, match='STATUS'):
        P.decode_status(payload[:-1])
    with pytest.raises(P.PayloadLengthError):
        P.decode_status(payload[:5])


def test_axis_config_ack_nak_inhibit_round_trips():
    infos = tuple(a.to_axis_info() for a in contract_axis_configs())
    assert P.decode_axis_config(P.encode_axis_config(infos)) == infos
    assert P.decode_ack(P.encode_ack(P.MsgType.ENABLE)) == P.MsgType.ENABLE
    nak = P.Nak(P.MsgType.SET_TARGET, P.NakReason.RANGE, 4)
    assert P.decode_nak(P.encode_nak(nak)) == nak and nak.reason_name == 'RANGE'
    assert P.decode_motion_inhibit(P.encode_motion_inhibit(True)) is True
    assert P.decode_motion_inhibit(P.encode_motion_inhibit(False)) is False
    with pytest.raises(P.ProtocolError, match='0 or 1'):
        P.decode_motion_inhibit(b'\x02')
    with pytest.raises(P.PayloadLengthError):
        P.decode_nak(b'\x01')


def test_fault_names_round_trip_and_unknown_bits_are_kept():
    assert P.fault_bits(['watchdog', 'ENCODER']) == P.Fault.WATCHDOG | P.Fault.ENCODER
    assert P.fault_names(P.fault_bits(['LIMIT_SWITCH'])) == ('LIMIT_SWITCH',)
    assert P.fault_names(0x8000) == ('FAULT_0x8000',)
    with pytest.raises(P.ProtocolError, match='unknown fault name'):
        P.fault_bits(['SMOKE'])


def test_every_request_has_a_reply_type():
    requests = [t for t in P.MsgType if t < 0x80]
    assert set(P.REPLY_TYPE) == set(requests)
    assert P.STATEFUL_REQUESTS <= set(requests)


# ----------------------------------------------------------------------------- SI <-> counts

def test_counts_conversion_rounds_to_nearest_and_back():
    axis = AxisConfig('stage_x', 'prismatic', -0.04, 0.04, 0.01, 0.02, 1_000_000.0)
    assert axis.to_counts(0.0123454) == 12345
    assert axis.to_counts(-0.0123456) == -12346
    assert axis.from_counts(12345) == pytest.approx(0.012345)
    assert (axis.min_counts, axis.max_counts) == (-40000, 40000)
    rot = AxisConfig('guide_pitch', 'revolute', -0.523645, 0.523645, 0.2, 0.5, 100_000.0)
    # Limits that are not whole counts round inwards: the controller never accepts beyond the SI limit.
    assert (rot.min_counts, rot.max_counts) == (-52364, 52364)
    assert rot.unit == 'rad' and axis.unit == 'm'


def test_axis_info_round_trip_preserves_si_values():
    for axis in contract_axis_configs():
        back = AxisConfig.from_axis_info(axis.name, axis.to_axis_info())
        assert back.kind == axis.kind
        assert back.counts_per_unit == axis.counts_per_unit
        assert back.lower == pytest.approx(axis.lower, abs=1 / axis.counts_per_unit)
        assert back.upper == pytest.approx(axis.upper, abs=1 / axis.counts_per_unit)
        assert back.max_velocity == pytest.approx(axis.max_velocity, rel=1e-4)


def test_axis_config_rejects_nonsense():
    with pytest.raises(ValueError, match='lower limit'):
        AxisConfig('a', 'prismatic', 0.1, 0.0, 0.01, 0.02, 1e6)
    with pytest.raises(ValueError, match='kind'):
        AxisConfig('a', 'helical', 0.0, 0.1, 0.01, 0.02, 1e6)
    with pytest.raises(ValueError, match='int32'):
        AxisConfig('a', 'prismatic', 0.0, 10.0, 0.01, 0.02, 1e9)
