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


@pytest.mark.parametrize('keep', [1, 2, 5, 6, 7, 20])
def test_a_truncated_frame_expires_after_the_inter_byte_timeout(keep):
    """Without the timeout a header announcing 200 bytes swallows the next 200 bytes of requests."""
    cut = P.encode_frame(P.MsgType.SET_TARGET, 3, bytes(200))[:keep]
    follower = P.Frame(P.MsgType.GET_STATUS, 4)
    dec = P.FrameDecoder(inter_byte_timeout=0.02)
    assert dec.feed(cut, now=1.0) == []
    assert dec.feed(_encode(follower), now=1.1) == [follower]
    assert dec.timeouts == (1 if keep >= 2 else 0) and dec.pending == 0
    # Without the timeout (old behaviour) the follower disappears into the cut frame's body.
    old = P.FrameDecoder()
    old.feed(cut)
    assert keep < 4 or old.feed(_encode(follower)) == []


def test_a_complete_frame_inside_an_expired_candidate_is_still_found():
    inner = P.Frame(P.MsgType.HEARTBEAT, 5)
    data = P.encode_frame(P.MsgType.SET_TARGET, 3, bytes(200))[:10] + _encode(inner)
    dec = P.FrameDecoder(inter_byte_timeout=0.02)
    assert dec.feed(data, now=0.0) == []
    assert dec.feed(b'', now=0.5) == [inner]


def test_chunks_within_the_timeout_form_one_frame():
    frame = P.Frame(P.MsgType.STATUS, 5, bytes(range(30)))
    data = _encode(frame)
    dec = P.FrameDecoder(inter_byte_timeout=0.02)
    assert dec.feed(data[:10], now=0.0) == [] and dec.feed(data[10:20], now=0.015) == []
    assert dec.feed(data[20:], now=0.03) == [frame] and dec.timeouts == 0


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
    assert len(payload) == 15 + 17 + 5 * 8          # head, stream block (protocol 2), axes
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


# ----------------------------------------------------------------------------- protocol 2: streaming

def test_protocol_version_is_2():
    assert P.PROTOCOL_VERSION[0] == 2


def test_push_points_round_trip_and_frame_capacity():
    assert P.max_points_per_frame(5) == 5
    points = tuple(P.WirePoint(10_000 * (k + 1), (k, -k, 2 ** 31 - 1, -2 ** 31, 0), (1, -1, 0, 5, -5))
                   for k in range(5))
    push = P.PushPoints(0xFFFF, points, final=True)
    payload = P.encode_push_points(push)
    assert len(payload) == 4 + 5 * (4 + 5 * 8) <= P.MAX_PAYLOAD
    assert P.decode_push_points(payload, 5) == push
    with pytest.raises(P.ProtocolError, match='exceed one frame'):
        P.encode_push_points(P.PushPoints(1, points + points[:1]))
    with pytest.raises(P.PayloadLengthError):
        P.decode_push_points(payload[:-1], 5)
    bad_flags = bytearray(payload)
    bad_flags[2] = 0x80
    with pytest.raises(P.ProtocolError, match='flags'):
        P.decode_push_points(bytes(bad_flags), 5)


def test_stream_status_round_trip_and_names():
    info = P.StreamInfo(7, P.StreamState.RAMPING, P.stop_cause_code('TRIGGER'),
                        P.INHIBIT_HOST | P.INHIBIT_TRIGGER, 1_500_000, 1_800_000, 120, 3)
    back = P.decode_stream_status(P.encode_stream_status(info))
    assert back == info and back.stop_cause_name == 'TRIGGER' and back.inhibit_cause_name == 'HOST+TRIGGER'
    assert P.StreamInfo(stop_cause=200).stop_cause_name == 'CAUSE_0xC8'    # never silently dropped
    assert P.inhibit_cause_bits('HOST+TRIGGER') == 3 and P.inhibit_cause_bits('') == 0
    with pytest.raises(P.ProtocolError):
        P.stop_cause_code('NOPE')


def test_begin_stream_round_trip():
    assert P.decode_begin_stream(P.encode_begin_stream((1, -2, 3, -4, 5))) == (1, -2, 3, -4, 5)
    with pytest.raises(P.PayloadLengthError):
        P.decode_begin_stream(b'\x00' * 3)


def test_stream_requests_are_stateful_and_have_replies():
    for msg in (P.MsgType.BEGIN_STREAM, P.MsgType.PUSH_POINTS):
        assert msg in P.STATEFUL_REQUESTS and P.REPLY_TYPE[msg] == P.MsgType.STREAM_STATUS
