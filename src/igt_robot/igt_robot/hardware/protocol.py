"""Binary protocol between the host and the motor controller: a pure codec.

No I/O happens here. The serial driver (:mod:`.serial_driver`) and the firmware
emulator (:mod:`.emulator`) both build on these functions, so the two ends of
the link share one definition of every byte. The full specification, with byte
tables, is ``docs/serial_protocol.md``; keep the two in step.

Frame layout (all multi-byte integers little-endian)::

    A5 C3 | LEN | ~LEN | TYPE | SEQ | PAYLOAD (LEN bytes) | CRC16 (2 bytes)

* ``~LEN`` (bitwise complement of LEN) lets the receiver reject a corrupted
  length at once instead of waiting for up to 255 bytes that never come.
* CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR)
  covers LEN, ~LEN, TYPE, SEQ and PAYLOAD.
* Resynchronisation is length based: the decoder hunts for the sync pair,
  validates the header, waits for the announced length and checks the CRC.
  On any failure it drops only the first sync byte and hunts again, so a
  frame that starts inside the rejected bytes is still found. An inter-byte
  timeout rejects a candidate whose bytes stopped coming (a truncated frame),
  so it cannot swallow the requests that follow it.

Protocol 2 adds trajectory streaming (BEGIN_STREAM, PUSH_POINTS with PVT
points, STREAM_STATUS, buffer fields in STATUS) and sequence-number replay
protection for stateful requests (NAK REPLAY).

Values on the wire are integers in controller units: encoder counts for
positions, counts/s for velocities, counts/s^2 for accelerations. SI <-> counts
conversion lives with the axis configuration (:mod:`.axis_model`).
"""
from __future__ import annotations

import dataclasses
import enum
import struct
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from igt_robot.hardware.interface import STOP_CAUSES

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

#: (major, minor). A different major means an incompatible wire format.
PROTOCOL_VERSION: Tuple[int, int] = (2, 0)

# 0xA5 ^ 0xC3 != 0xFF on purpose: a frame cut off right after its sync pair and
# followed by a new frame must not read as a valid LEN/~LEN header.
SYNC = b'\xA5\xC3'
HEADER_SIZE = 6          # sync(2) + len + ~len + type + seq
CRC_SIZE = 2
FRAME_OVERHEAD = HEADER_SIZE + CRC_SIZE
MAX_PAYLOAD = 240        # largest payload either end will send or accept
NO_AXIS = 0xFF           # NAK detail when the refusal concerns no single axis
MAX_DEVICE_NAME = 32     # bytes of UTF-8 in HELLO_REPLY
#: A stateful request is accepted only if its SEQ is 1..SEQ_WINDOW ahead of the last accepted
#: request (serial-number arithmetic modulo 256); 0 or further "ahead" than this is behind: REPLAY.
SEQ_WINDOW = 127
#: A candidate frame whose next byte has not arrived within this many seconds is rejected
#: (one frame is written in one go; 248 bytes take 2.5 ms at 1 Mbit/s).
INTER_BYTE_TIMEOUT = 0.02


class ProtocolError(ValueError):
    """A frame or payload violates the protocol; the message says how."""


class PayloadLengthError(ProtocolError):
    """A payload has the wrong length for its TYPE (the controller NAKs BAD_LENGTH)."""


class MsgType(enum.IntEnum):
    """Frame TYPE byte. Requests (host -> controller) are < 0x80."""

    HELLO = 0x01
    ENABLE = 0x02
    DISABLE = 0x03
    SET_TARGET = 0x04
    STOP = 0x05
    ESTOP = 0x06
    MOTION_INHIBIT = 0x07
    RESET_FAULTS = 0x08
    HEARTBEAT = 0x09
    GET_STATUS = 0x0A
    GET_AXIS_CONFIG = 0x0B
    BEGIN_STREAM = 0x0C        # protocol 2
    PUSH_POINTS = 0x0D         # protocol 2
    TRIGGER_LEVEL = 0x0E       # protocol 2, trigger port only (§9)
    # replies (controller -> host)
    ACK = 0x80
    NAK = 0x81
    HELLO_REPLY = 0x82
    STATUS = 0x83
    AXIS_CONFIG = 0x84
    STREAM_STATUS = 0x85       # protocol 2


#: The reply type a successful request gets (a NAK is always possible instead).
REPLY_TYPE = {
    MsgType.HELLO: MsgType.HELLO_REPLY,
    MsgType.ENABLE: MsgType.ACK,
    MsgType.DISABLE: MsgType.ACK,
    MsgType.SET_TARGET: MsgType.ACK,
    MsgType.STOP: MsgType.ACK,
    MsgType.ESTOP: MsgType.ACK,
    MsgType.MOTION_INHIBIT: MsgType.ACK,
    MsgType.RESET_FAULTS: MsgType.ACK,
    MsgType.HEARTBEAT: MsgType.ACK,
    MsgType.GET_STATUS: MsgType.STATUS,
    MsgType.GET_AXIS_CONFIG: MsgType.AXIS_CONFIG,
    MsgType.BEGIN_STREAM: MsgType.STREAM_STATUS,
    MsgType.PUSH_POINTS: MsgType.STREAM_STATUS,
    MsgType.TRIGGER_LEVEL: MsgType.ACK,
}

#: Requests that change controller state. A retransmission of one of these
#: (same TYPE, SEQ and PAYLOAD as the last request) is answered from the
#: controller's reply cache and NOT executed twice; any other one whose SEQ is
#: not ahead of the last accepted request is a replay (NAK REPLAY).
STATEFUL_REQUESTS = frozenset({
    MsgType.ENABLE, MsgType.DISABLE, MsgType.SET_TARGET, MsgType.STOP, MsgType.ESTOP,
    MsgType.MOTION_INHIBIT, MsgType.RESET_FAULTS, MsgType.BEGIN_STREAM, MsgType.PUSH_POINTS,
    MsgType.TRIGGER_LEVEL,
})

#: What the trigger port (§9) accepts: it can say "imaging" and nothing that moves the robot.
TRIGGER_PORT_REQUESTS = frozenset({MsgType.HELLO, MsgType.HEARTBEAT, MsgType.TRIGGER_LEVEL})


class NakReason(enum.IntEnum):
    """Why the controller refused a request (NAK payload byte 1)."""

    CRC = 0x01                 # frame header intact but CRC wrong (line noise) -> retry
    UNKNOWN_TYPE = 0x02
    BAD_LENGTH = 0x03          # payload length wrong for this TYPE
    BAD_VALUE = 0x04           # a field has an invalid value (detail: axis or NO_AXIS)
    RANGE = 0x05               # target outside the axis limits (detail: axis index)
    NOT_ENABLED = 0x06
    INHIBITED = 0x07
    ESTOPPED = 0x08
    FAULTED = 0x09             # a latched fault blocks the request (detail: fault bit)
    HANDSHAKE_REQUIRED = 0x0A  # no compatible HELLO yet
    BUSY = 0x0B                # controller temporarily unable -> retry
    # protocol 2
    TRIGGER_ACTIVE = 0x0C      # inhibit release refused: the scanner-trigger input says imaging
    STREAM_ACTIVE = 0x0D       # another stream is executing (or SET_TARGET during a stream)
    STREAM_CLOSED = 0x0E       # points for a stream that is not current, has ended or got its final point
    BUFFER_FULL = 0x0F         # not enough free slots, or beyond the look-ahead bound
    TIME_ORDER = 0x10          # point times not strictly increasing / already executed
    START_MISMATCH = 0x11      # stream start differs from where the axes are (detail: axis)
    MOVING = 0x12              # BEGIN_STREAM while the axes move
    REPLAY = 0x13              # SEQ not ahead of the last accepted stateful request
    WRONG_PORT = 0x14          # a request this port does not take (TRIGGER_LEVEL on the main port, any
    #                            motion request on the trigger port)


#: NAK reasons worth retrying: the request itself was fine.
TRANSIENT_NAKS = frozenset({NakReason.CRC, NakReason.BUSY})


class StatusFlag(enum.IntFlag):
    """STATUS flags byte."""

    ENABLED = 0x01           # axes energised (includes decelerating before power-off)
    INHIBITED = 0x02         # motion-inhibit active
    ESTOP = 0x04             # e-stop latched
    MOVING = 0x08            # at least one axis has non-zero velocity
    SCANNER_TRIGGER = 0x10   # level of the scanner-trigger input
    FAULT = 0x20             # at least one fault latched
    HANDSHAKE_DONE = 0x40    # a compatible HELLO has been received


#: STATUS/STREAM_STATUS inhibit-cause bits.
INHIBIT_HOST = 0x01            # the host's MOTION_INHIBIT
INHIBIT_TRIGGER = 0x02         # the scanner-trigger input (level, or a latched edge)


class StreamState(enum.IntEnum):
    """Trajectory-stream state byte."""

    NONE = 0                   # no stream since power-on
    OPEN = 1                   # begun, no point yet
    RUNNING = 2                # executing points
    RAMPING = 3                # stopped by a cause, the stop ramp is running
    DONE = 4                   # the final point was reached
    STOPPED = 5                # ended by a cause (stop_cause), at rest


class Fault(enum.IntFlag):
    """Latched fault bits (STATUS ``faults`` u16). Cleared only by RESET_FAULTS."""

    WATCHDOG = 0x0001          # no valid host frame within the watchdog period while enabled
    OVERCURRENT = 0x0002
    FOLLOWING_ERROR = 0x0004   # axis did not follow its profile (stall, collision)
    ENCODER = 0x0008
    LIMIT_SWITCH = 0x0010
    OVERTEMP = 0x0020
    SUPPLY = 0x0040            # motor supply under/over-voltage
    INTERNAL = 0x0080
    TRIGGER_PORT = 0x0100      # the trigger port's relay fell silent after it had spoken (§9)


def fault_names(bits: int) -> Tuple[str, ...]:
    """Fault bit mask -> tuple of names in bit order, e.g. ``('WATCHDOG',)``.

    Unknown bits (from newer firmware) are reported as ``'FAULT_0x....'`` so
    they are never silently dropped.
    """
    names = []
    for bit in range(16):
        mask = 1 << bit
        if bits & mask:
            known = Fault._value2member_map_.get(mask)
            names.append(known.name if known is not None else f'FAULT_0x{mask:04X}')
    return tuple(names)


def fault_bits(names: Iterable[str]) -> int:
    """Names (case-insensitive) -> fault bit mask; unknown names raise ProtocolError."""
    bits = 0
    for name in names:
        try:
            bits |= Fault[name.upper()]
        except KeyError:
            raise ProtocolError(
                f'unknown fault name {name!r}; known: {", ".join(f.name for f in Fault)}') from None
    return bits


def type_name(msg_type: int) -> str:
    """Human-readable name of a TYPE byte (for error messages)."""
    try:
        return MsgType(msg_type).name
    except ValueError:
        return f'TYPE_0x{msg_type:02X}'


# ----------------------------------------------------------------------------
# CRC-16/CCITT-FALSE, table driven
# ----------------------------------------------------------------------------

def _make_crc_table(poly: int = 0x1021) -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ poly) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (check value for b'123456789' is 0x29B1).

    ``crc`` may carry a previous result to checksum data in pieces.
    """
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


# ----------------------------------------------------------------------------
# Framing
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Frame:
    """One decoded frame: TYPE byte, SEQ byte and raw payload."""

    type: int
    seq: int
    payload: bytes = b''


def encode_frame(msg_type: int, seq: int, payload: bytes = b'') -> bytes:
    """Build the bytes of one frame (sync, header, payload, CRC)."""
    if not 0 <= int(msg_type) <= 0xFF:
        raise ProtocolError(f'frame TYPE {msg_type} does not fit in one byte')
    if not 0 <= seq <= 0xFF:
        raise ProtocolError(f'frame SEQ {seq} does not fit in one byte (0..255)')
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f'payload of {len(payload)} bytes exceeds MAX_PAYLOAD={MAX_PAYLOAD}')
    body = bytes((len(payload), len(payload) ^ 0xFF, int(msg_type), seq)) + bytes(payload)
    crc = crc16_ccitt(body)
    return SYNC + body + bytes((crc & 0xFF, crc >> 8))


class FrameDecoder:
    """Streaming frame decoder that resynchronises after garbage, corruption or truncation.

    Feed it whatever bytes arrive (any chunking); it returns complete, CRC-valid
    frames. Diagnostics counters:

    * ``frames``          -- valid frames returned
    * ``crc_errors``      -- candidate frames whose CRC did not match
    * ``header_errors``   -- candidate headers with LEN/~LEN mismatch or LEN > MAX_PAYLOAD
    * ``timeouts``        -- candidates rejected because their bytes stopped coming (truncated)
    * ``discarded_bytes`` -- bytes thrown away while hunting for a sync pair
    * ``resyncs``         -- times the decoder had to hunt (garbage run or rejected candidate)

    ``on_crc_error(type, seq)`` is called for a candidate whose header was
    consistent but whose CRC failed; the controller uses it to NAK(CRC) at once
    so the host can retransmit without waiting for its timeout.

    ``inter_byte_timeout`` (s): when :meth:`feed` is given the arrival time ``now``
    and the buffered partial candidate is older than this, that candidate is
    rejected (one byte dropped, hunt again, as for a CRC error) before the new
    bytes are looked at. A truncated frame announcing a long payload then cannot
    consume the requests that follow it as its body.
    """

    def __init__(self, on_crc_error: Optional[Callable[[int, int], None]] = None,
                 inter_byte_timeout: Optional[float] = None):
        if inter_byte_timeout is not None and not inter_byte_timeout > 0:
            raise ValueError(f'inter_byte_timeout must be positive seconds or None, got {inter_byte_timeout!r}')
        self._buf = bytearray()
        self._on_crc_error = on_crc_error
        self.inter_byte_timeout = inter_byte_timeout
        self._last_rx: Optional[float] = None
        self.frames = 0
        self.crc_errors = 0
        self.header_errors = 0
        self.timeouts = 0
        self.discarded_bytes = 0
        self.resyncs = 0

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop buffered bytes (counted as discarded)."""
        self.discarded_bytes += len(self._buf)
        self._buf.clear()

    def _discard(self, count: int) -> None:
        if count > 0:
            del self._buf[:count]
            self.discarded_bytes += count

    def feed(self, data: bytes, now: Optional[float] = None) -> List[Frame]:
        """Consume ``data`` (arrived at time ``now``, s, any steady clock); return the frames
        completed by it (possibly none)."""
        out: List[Frame] = []
        if self.inter_byte_timeout is not None and now is not None:
            if (self._buf and self._last_rx is not None
                    and now - self._last_rx > self.inter_byte_timeout):
                self._scan(out, expire=True)       # what is left of the old bytes will never complete
            if data:
                self._last_rx = now
        self._buf.extend(data)
        self._scan(out, expire=False)
        return out

    def _scan(self, out: List[Frame], expire: bool) -> None:
        buf = self._buf
        while buf:
            start = buf.find(SYNC)
            if start < 0:
                # Keep a trailing first sync byte: its partner may be in the next chunk.
                keep = 1 if buf[-1] == SYNC[0] and not expire else 0
                if len(buf) - keep > 0:
                    self.resyncs += 1
                    self._discard(len(buf) - keep)
                break
            if start > 0:
                self.resyncs += 1
                self._discard(start)
            if len(buf) < HEADER_SIZE:
                if expire:
                    self._expire()
                    continue
                break
            length, length_inv = buf[2], buf[3]
            if length ^ length_inv != 0xFF or length > MAX_PAYLOAD:
                self.header_errors += 1
                self.resyncs += 1
                self._discard(1)       # skip this sync byte, hunt again
                continue
            total = HEADER_SIZE + length + CRC_SIZE
            if len(buf) < total:
                if expire:
                    self._expire()
                    continue
                break
            received_crc = buf[total - 2] | (buf[total - 1] << 8)
            if crc16_ccitt(memoryview(buf)[2:total - 2]) != received_crc:
                self.crc_errors += 1
                self.resyncs += 1
                msg_type, seq = buf[4], buf[5]
                self._discard(1)
                if self._on_crc_error is not None:
                    self._on_crc_error(msg_type, seq)
                continue
            out.append(Frame(buf[4], buf[5], bytes(buf[HEADER_SIZE:HEADER_SIZE + length])))
            del buf[:total]
            self.frames += 1

    def _expire(self) -> None:
        """Reject the incomplete candidate at the front: drop its first sync byte and hunt on."""
        self.timeouts += 1
        self.resyncs += 1
        self._discard(1)


# ----------------------------------------------------------------------------
# Payloads
# ----------------------------------------------------------------------------

def _expect_length(what: str, payload: bytes, expected: int) -> None:
    if len(payload) != expected:
        raise PayloadLengthError(f'{what} payload must be {expected} bytes, got {len(payload)}')


# --- HELLO (host -> controller) -------------------------------------------------

_HELLO = struct.Struct('<BB')


def encode_hello(protocol_version: Tuple[int, int] = PROTOCOL_VERSION) -> bytes:
    """HELLO payload: the host's protocol (major, minor)."""
    return _HELLO.pack(*protocol_version)


def decode_hello(payload: bytes) -> Tuple[int, int]:
    """HELLO payload -> host protocol (major, minor)."""
    _expect_length('HELLO', payload, _HELLO.size)
    return _HELLO.unpack(payload)


# --- HELLO_REPLY ---------------------------------------------------------------------

_HELLO_REPLY = struct.Struct('<BBBBBBH')


@dataclasses.dataclass(frozen=True)
class HelloReply:
    """The controller's identity: versions, axis count, watchdog period."""

    protocol_version: Tuple[int, int]
    firmware_version: Tuple[int, int, int]
    n_axes: int
    watchdog_ms: int
    device_name: str = ''

    @property
    def firmware_version_str(self) -> str:
        return '.'.join(str(v) for v in self.firmware_version)


def encode_hello_reply(reply: HelloReply) -> bytes:
    name = reply.device_name.encode('utf-8')[:MAX_DEVICE_NAME]
    return _HELLO_REPLY.pack(*reply.protocol_version, *reply.firmware_version,
                             reply.n_axes, reply.watchdog_ms) + name


def decode_hello_reply(payload: bytes) -> HelloReply:
    if len(payload) < _HELLO_REPLY.size:
        raise PayloadLengthError(f'HELLO_REPLY payload must be at least {_HELLO_REPLY.size} bytes, '
                                 f'got {len(payload)}')
    pmaj, pmin, fmaj, fmin, fpatch, n_axes, watchdog_ms = _HELLO_REPLY.unpack_from(payload)
    name = bytes(payload[_HELLO_REPLY.size:]).decode('utf-8', errors='replace')
    return HelloReply((pmaj, pmin), (fmaj, fmin, fpatch), n_axes, watchdog_ms, name)


# --- SET_TARGET ---------------------------------------------------------------------

_TARGET_AXIS = struct.Struct('<iIi')


@dataclasses.dataclass(frozen=True)
class SetTarget:
    """Per-axis target position (counts), velocity limit (counts/s, 0 = axis
    maximum) and feed-forward velocity (counts/s)."""

    positions: Tuple[int, ...]
    velocity_limits: Tuple[int, ...]
    feedforward: Tuple[int, ...]


def encode_set_target(target: SetTarget) -> bytes:
    n = len(target.positions)
    if not (len(target.velocity_limits) == len(target.feedforward) == n):
        raise ProtocolError('SET_TARGET needs equally many positions, velocity limits and '
                            f'feed-forward velocities, got {n}, {len(target.velocity_limits)}, '
                            f'{len(target.feedforward)}')
    out = bytearray()
    try:
        for p, v, f in zip(target.positions, target.velocity_limits, target.feedforward):
            out += _TARGET_AXIS.pack(int(p), int(v), int(f))
    except struct.error as exc:
        raise ProtocolError(f'SET_TARGET value does not fit its field: {exc}') from None
    return bytes(out)


def decode_set_target(payload: bytes) -> SetTarget:
    if len(payload) == 0 or len(payload) % _TARGET_AXIS.size:
        raise PayloadLengthError(f'SET_TARGET payload must be a positive multiple of '
                                 f'{_TARGET_AXIS.size} bytes, got {len(payload)}')
    fields = [_TARGET_AXIS.unpack_from(payload, off) for off in range(0, len(payload), _TARGET_AXIS.size)]
    return SetTarget(tuple(f[0] for f in fields), tuple(f[1] for f in fields), tuple(f[2] for f in fields))


# --- MOTION_INHIBIT -----------------------------------------------------------------

def encode_motion_inhibit(inhibit: bool) -> bytes:
    return bytes((1 if inhibit else 0,))


def decode_motion_inhibit(payload: bytes) -> bool:
    _expect_length('MOTION_INHIBIT', payload, 1)
    if payload[0] not in (0, 1):
        raise ProtocolError(f'MOTION_INHIBIT value must be 0 or 1, got {payload[0]}')
    return bool(payload[0])


def encode_trigger_level(imaging: bool) -> bytes:
    return bytes((1 if imaging else 0,))


def decode_trigger_level(payload: bytes) -> bool:
    _expect_length('TRIGGER_LEVEL', payload, 1)
    if payload[0] not in (0, 1):
        raise ProtocolError(f'TRIGGER_LEVEL value must be 0 or 1, got {payload[0]}')
    return bool(payload[0])


# --- ACK / NAK ------------------------------------------------------------------------

def encode_ack(request_type: int) -> bytes:
    return bytes((int(request_type),))


def decode_ack(payload: bytes) -> int:
    """ACK payload -> TYPE of the acknowledged request."""
    _expect_length('ACK', payload, 1)
    return payload[0]


@dataclasses.dataclass(frozen=True)
class Nak:
    request_type: int
    reason: int
    detail: int = NO_AXIS   # axis index for RANGE/BAD_VALUE, fault bit index for FAULTED

    @property
    def reason_name(self) -> str:
        try:
            return NakReason(self.reason).name
        except ValueError:
            return f'REASON_0x{self.reason:02X}'


_NAK = struct.Struct('<BBB')


def encode_nak(nak: Nak) -> bytes:
    return _NAK.pack(int(nak.request_type), int(nak.reason), int(nak.detail))


def decode_nak(payload: bytes) -> Nak:
    _expect_length('NAK', payload, _NAK.size)
    return Nak(*_NAK.unpack(payload))


# --- stream block (STATUS and STREAM_STATUS) -------------------------------------------

_STREAM = struct.Struct('<HBBBIIHH')
#: Stop-cause codes on the wire: the index into interface.STOP_CAUSES ('' = 0).
STOP_CAUSE_CODES = STOP_CAUSES


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """The controller's trajectory buffer, in controller units (µs)."""

    stream_id: int = 0           # u16, 0 = none yet
    state: int = StreamState.NONE
    stop_cause: int = 0          # index into STOP_CAUSE_CODES
    inhibit_cause: int = 0       # INHIBIT_HOST | INHIBIT_TRIGGER
    executed_us: int = 0         # stream time reached, µs
    buffered_until_us: int = 0   # stream time of the last buffered point, µs
    free_slots: int = 0
    underruns: int = 0           # since power-on, wraps at 65536

    @property
    def stop_cause_name(self) -> str:
        if 0 <= self.stop_cause < len(STOP_CAUSE_CODES):
            return STOP_CAUSE_CODES[self.stop_cause]
        return f'CAUSE_0x{self.stop_cause:02X}'

    @property
    def inhibit_cause_name(self) -> str:
        names = [n for bit, n in ((INHIBIT_HOST, 'HOST'), (INHIBIT_TRIGGER, 'TRIGGER')) if self.inhibit_cause & bit]
        return '+'.join(names)


def stop_cause_code(name: str) -> int:
    try:
        return STOP_CAUSE_CODES.index(name)
    except ValueError:
        raise ProtocolError(f'unknown stop cause {name!r}; known: {", ".join(c for c in STOP_CAUSE_CODES if c)}') \
            from None


def inhibit_cause_bits(name: str) -> int:
    parts = [p for p in name.split('+') if p]
    bits = 0
    for part in parts:
        if part == 'HOST':
            bits |= INHIBIT_HOST
        elif part == 'TRIGGER':
            bits |= INHIBIT_TRIGGER
        else:
            raise ProtocolError(f'unknown inhibit cause {part!r}')
    return bits


def _pack_stream(info: StreamInfo) -> bytes:
    try:
        return _STREAM.pack(info.stream_id, int(info.state), info.stop_cause, info.inhibit_cause,
                            info.executed_us & 0xFFFFFFFF, info.buffered_until_us & 0xFFFFFFFF,
                            info.free_slots, info.underruns & 0xFFFF)
    except struct.error as exc:
        raise ProtocolError(f'stream status value does not fit its field: {exc}') from None


def encode_stream_status(info: StreamInfo) -> bytes:
    """STREAM_STATUS payload (reply to BEGIN_STREAM and PUSH_POINTS)."""
    return _pack_stream(info)


def decode_stream_status(payload: bytes) -> StreamInfo:
    _expect_length('STREAM_STATUS', payload, _STREAM.size)
    return StreamInfo(*_STREAM.unpack(payload))


# --- STATUS ---------------------------------------------------------------------------

_STATUS_HEAD = struct.Struct('<IBBHBHHH')
_STATUS_AXIS = struct.Struct('<ii')


@dataclasses.dataclass(frozen=True)
class Status:
    """Controller status snapshot, in controller units."""

    uptime_ms: int
    flags: int
    faults: int
    fault_axes: int            # bit i set: fault concerns axis i
    rx_crc_errors: int         # controller-side count, wraps at 65536
    rx_seq_gaps: int           # requests the controller saw skipped, wraps at 65536
    trigger_edges: int         # rising edges of the scanner-trigger input, wraps at 65536
    positions: Tuple[int, ...]  # encoder counts
    velocities: Tuple[int, ...]  # counts/s
    stream: StreamInfo = StreamInfo()   # protocol 2: trajectory buffer and inhibit cause

    def has(self, flag: StatusFlag) -> bool:
        return bool(self.flags & flag)


def encode_status(status: Status) -> bytes:
    n = len(status.positions)
    if len(status.velocities) != n:
        raise ProtocolError('STATUS needs as many velocities as positions')
    out = bytearray(_STATUS_HEAD.pack(
        status.uptime_ms & 0xFFFFFFFF, status.flags, n, status.faults, status.fault_axes,
        status.rx_crc_errors & 0xFFFF, status.rx_seq_gaps & 0xFFFF, status.trigger_edges & 0xFFFF))
    out += _pack_stream(status.stream)
    try:
        for p, v in zip(status.positions, status.velocities):
            out += _STATUS_AXIS.pack(int(p), int(v))
    except struct.error as exc:
        raise ProtocolError(f'STATUS axis value does not fit its field: {exc}') from None
    return bytes(out)


def decode_status(payload: bytes) -> Status:
    fixed = _STATUS_HEAD.size + _STREAM.size
    if len(payload) < fixed:
        raise PayloadLengthError(f'STATUS payload must be at least {fixed} bytes, got {len(payload)}')
    uptime, flags, n, faults, fault_axes, crc_err, gaps, edges = _STATUS_HEAD.unpack_from(payload)
    _expect_length(f'STATUS ({n} axes)', payload, fixed + n * _STATUS_AXIS.size)
    stream = StreamInfo(*_STREAM.unpack_from(payload, _STATUS_HEAD.size))
    axes = [_STATUS_AXIS.unpack_from(payload, fixed + i * _STATUS_AXIS.size) for i in range(n)]
    return Status(uptime, flags, faults, fault_axes, crc_err, gaps, edges,
                  tuple(a[0] for a in axes), tuple(a[1] for a in axes), stream)


# --- BEGIN_STREAM (host -> controller) ----------------------------------------------------

_COUNT = struct.Struct('<i')


def encode_begin_stream(start_positions: Sequence[int]) -> bytes:
    """BEGIN_STREAM payload: the position (counts) the host planned the stream from, per axis."""
    try:
        return b''.join(_COUNT.pack(int(p)) for p in start_positions)
    except struct.error as exc:
        raise ProtocolError(f'BEGIN_STREAM position does not fit an i32: {exc}') from None


def decode_begin_stream(payload: bytes) -> Tuple[int, ...]:
    if len(payload) == 0 or len(payload) % _COUNT.size:
        raise PayloadLengthError(f'BEGIN_STREAM payload must be a positive multiple of 4 bytes, got {len(payload)}')
    return tuple(v[0] for v in _COUNT.iter_unpack(payload))


# --- PUSH_POINTS (host -> controller) ------------------------------------------------------

_PUSH_HEAD = struct.Struct('<HBB')
_POINT_TIME = struct.Struct('<I')
PUSH_FLAG_FINAL = 0x01         # the batch's last point is the stream's last


@dataclasses.dataclass(frozen=True)
class WirePoint:
    """One PVT point in controller units: stream time (µs), positions (counts), velocities (counts/s)."""

    time_us: int
    positions: Tuple[int, ...]
    velocities: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PushPoints:
    stream_id: int
    points: Tuple[WirePoint, ...]
    final: bool = False


def max_points_per_frame(n_axes: int) -> int:
    """How many points of ``n_axes`` axes one PUSH_POINTS frame carries."""
    return (MAX_PAYLOAD - _PUSH_HEAD.size) // (_POINT_TIME.size + n_axes * _STATUS_AXIS.size)


def encode_push_points(push: PushPoints) -> bytes:
    if not push.points:
        raise ProtocolError('PUSH_POINTS needs at least one point')
    n = len(push.points[0].positions)
    if len(push.points) > max_points_per_frame(n):
        raise ProtocolError(f'{len(push.points)} points of {n} axes exceed one frame '
                            f'(at most {max_points_per_frame(n)})')
    out = bytearray()
    try:
        out += _PUSH_HEAD.pack(push.stream_id, PUSH_FLAG_FINAL if push.final else 0, len(push.points))
        for p in push.points:
            if len(p.positions) != n or len(p.velocities) != n:
                raise ProtocolError('every point needs one position and one velocity per axis')
            out += _POINT_TIME.pack(int(p.time_us))
            for pos, vel in zip(p.positions, p.velocities):
                out += _STATUS_AXIS.pack(int(pos), int(vel))
    except struct.error as exc:
        raise ProtocolError(f'PUSH_POINTS value does not fit its field: {exc}') from None
    return bytes(out)


def decode_push_points(payload: bytes, n_axes: int) -> PushPoints:
    if len(payload) < _PUSH_HEAD.size:
        raise PayloadLengthError(f'PUSH_POINTS payload must be at least {_PUSH_HEAD.size} bytes')
    stream_id, flags, count = _PUSH_HEAD.unpack_from(payload)
    size = _POINT_TIME.size + n_axes * _STATUS_AXIS.size
    _expect_length(f'PUSH_POINTS ({count} points of {n_axes} axes)', payload, _PUSH_HEAD.size + count * size)
    if count == 0:
        raise ProtocolError('PUSH_POINTS carries no point')
    if flags & ~PUSH_FLAG_FINAL:
        raise ProtocolError(f'PUSH_POINTS flags 0x{flags:02X} has unknown bits')
    points = []
    for k in range(count):
        off = _PUSH_HEAD.size + k * size
        (t,) = _POINT_TIME.unpack_from(payload, off)
        axes = [_STATUS_AXIS.unpack_from(payload, off + _POINT_TIME.size + i * _STATUS_AXIS.size)
                for i in range(n_axes)]
        points.append(WirePoint(t, tuple(a[0] for a in axes), tuple(a[1] for a in axes)))
    return PushPoints(stream_id, tuple(points), bool(flags & PUSH_FLAG_FINAL))


# --- AXIS_CONFIG ----------------------------------------------------------------------

AXIS_KIND_PRISMATIC = 0
AXIS_KIND_REVOLUTE = 1
_AXIS_INFO = struct.Struct('<BdiiII')


@dataclasses.dataclass(frozen=True)
class AxisInfo:
    """One axis as the controller knows it (controller units)."""

    kind: int                  # AXIS_KIND_PRISMATIC (m) or AXIS_KIND_REVOLUTE (rad)
    counts_per_unit: float     # encoder counts per m or per rad
    min_counts: int            # lowest accepted target
    max_counts: int            # highest accepted target
    max_velocity: int          # counts/s
    max_acceleration: int      # counts/s^2


def encode_axis_config(axes: Sequence[AxisInfo]) -> bytes:
    out = bytearray((len(axes),))
    for a in axes:
        out += _AXIS_INFO.pack(a.kind, a.counts_per_unit, a.min_counts, a.max_counts,
                               a.max_velocity, a.max_acceleration)
    return bytes(out)


def decode_axis_config(payload: bytes) -> Tuple[AxisInfo, ...]:
    if not payload:
        raise PayloadLengthError('AXIS_CONFIG payload is empty')
    n = payload[0]
    _expect_length(f'AXIS_CONFIG ({n} axes)', payload, 1 + n * _AXIS_INFO.size)
    return tuple(AxisInfo(*_AXIS_INFO.unpack_from(payload, 1 + i * _AXIS_INFO.size)) for i in range(n))
