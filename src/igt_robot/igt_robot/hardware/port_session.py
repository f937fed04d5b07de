"""One serial port of the motor controller, controller side: framing, the sequence rule, dispatch.

The controller has two ports (docs/serial_protocol.md): the **main port**, which takes every motion
request (:class:`igt_robot.hardware.emulator.Firmware`), and the **trigger port** (§9,
:class:`TriggerPortSession`), which takes only the scanner-trigger level from a lean host process. Each
port has its own decoder, sequence numbers and handshake; both act on one
:class:`~igt_robot.hardware.controller_core.ControllerCore`. No I/O here: bytes in, reply frames out,
time is the core's.
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from igt_robot.hardware import protocol
from igt_robot.hardware.controller_core import ControllerCore, Refusal
from igt_robot.hardware.protocol import MsgType, NakReason


class PortSession:
    """Framing, the sequence rule (§2) and dispatch of one controller port.

    Subclasses name what the port takes (:attr:`accepts`, :attr:`pre_handshake`), what a valid frame
    means for the watchdog (:meth:`_seen`) and handle each type in ``_on_<type name>(frame)`` returning
    ``(reply type, payload)``.
    """

    #: Request types this port executes; any other gets NAK WRONG_PORT.
    accepts: FrozenSet[int] = frozenset()
    #: Request types executed before a compatible HELLO; others get NAK HANDSHAKE_REQUIRED.
    pre_handshake: FrozenSet[int] = frozenset({MsgType.HELLO})

    def __init__(self, core: ControllerCore, hello_reply: Callable[[], protocol.HelloReply]):
        self.core = core
        self._hello_reply = hello_reply
        self.handshake_done = False
        self.last_seq: Optional[int] = None
        self.rx_crc_errors = 0
        self.rx_seq_gaps = 0
        self.rx_frames = 0
        self.duplicates = 0
        self.replays = 0
        self.corrupt_rx = 0
        self.executed: Dict[str, int] = {}
        self._last_stateful: Optional[Tuple[int, int, bytes]] = None
        self._last_stateful_reply = b''
        self._out: List[bytes] = []
        self.decoder = protocol.FrameDecoder(on_crc_error=self._on_crc_error,
                                             inter_byte_timeout=protocol.INTER_BYTE_TIMEOUT)

    # ------------------------------------------------------------------ bytes in, frames out
    def receive(self, data: bytes) -> List[bytes]:
        """Bytes from the host -> frames to send back (in order)."""
        return self.respond(self.decode(data))

    def decode(self, data: bytes) -> List[protocol.Frame]:
        """Bytes from the line -> valid request frames, not yet executed (CRC failures
        are NAKed into the pending output). Arrival time is the controller's clock."""
        frames = []
        for frame in self.decoder.feed(data, now=self.core.time):
            if self.corrupt_rx > 0:
                # Injected line noise: behave exactly as for a CRC failure.
                self.corrupt_rx -= 1
                self._on_crc_error(frame.type, frame.seq)
                continue
            frames.append(frame)
        return frames

    def respond(self, frames: Sequence[protocol.Frame]) -> List[bytes]:
        """Execute decoded requests; return every pending reply frame in order."""
        for frame in frames:
            self._out.append(self.handle(frame))
        if frames:
            self._after_requests()
        out, self._out = self._out, []
        return out

    def _after_requests(self) -> None:
        """Hook run after a batch of requests was executed."""

    def _seen(self) -> None:
        """A valid frame arrived on this port (feeds its watchdog)."""
        raise NotImplementedError

    def _on_crc_error(self, msg_type: int, seq: int) -> None:
        # The header was self-consistent, so TYPE/SEQ are probably right: a NAK
        # lets the host retransmit now instead of after its timeout. A wrong
        # SEQ is harmless, the host ignores NAKs for other sequence numbers.
        self.rx_crc_errors += 1
        self._out.append(protocol.encode_frame(
            MsgType.NAK, seq, protocol.encode_nak(protocol.Nak(msg_type, NakReason.CRC))))

    def handle(self, frame: protocol.Frame) -> bytes:
        """One valid request frame -> the reply frame bytes.

        Sequence rule (docs/serial_protocol.md §2): HELLO starts a new sequence. A stateful
        request must be 1..SEQ_WINDOW ahead of the last accepted request (modulo 256);
        otherwise it is the retransmission of the last stateful request (identical TYPE,
        SEQ, PAYLOAD: answered from the reply cache, not executed again) or a replay
        (NAK REPLAY, nothing executed).
        """
        self.rx_frames += 1
        self._seen()                           # any valid frame feeds the watchdog
        if frame.type == MsgType.HELLO:
            self._last_stateful = None         # a (re)connecting host restarts its sequence
            self.last_seq = None
        ahead = None if self.last_seq is None else (frame.seq - self.last_seq) & 0xFF
        key = (frame.type, frame.seq, frame.payload)
        stateful = frame.type in protocol.STATEFUL_REQUESTS
        if stateful and ahead is not None and not 1 <= ahead <= protocol.SEQ_WINDOW:
            if key == self._last_stateful:
                # Retransmission (our reply was lost): answer again, do not execute twice.
                self.duplicates += 1
                return self._last_stateful_reply
            self.replays += 1
            return protocol.encode_frame(MsgType.NAK, frame.seq, protocol.encode_nak(
                protocol.Nak(frame.type, NakReason.REPLAY)))
        if ahead is not None and ahead > 1 and ahead <= protocol.SEQ_WINDOW:
            self.rx_seq_gaps += 1
        if ahead is None or 1 <= ahead <= protocol.SEQ_WINDOW:
            self.last_seq = frame.seq          # a late side-effect-free request does not move it back
        reply_type, payload = self._dispatch(frame)
        reply = protocol.encode_frame(reply_type, frame.seq, payload)
        if stateful:
            self._last_stateful, self._last_stateful_reply = key, reply
        return reply

    def _nak(self, frame, reason: NakReason, detail: int = protocol.NO_AXIS):
        return MsgType.NAK, protocol.encode_nak(protocol.Nak(frame.type, reason, detail))

    def _refused(self, frame, refusal: Refusal):
        """A core refusal as a NAK: detail = axis, or the fault's bit index for FAULTED."""
        try:
            reason = NakReason[refusal.reason]
        except KeyError:
            reason = NakReason.BAD_VALUE
        detail = protocol.NO_AXIS
        if refusal.fault:
            detail = protocol.fault_bits([refusal.fault]).bit_length() - 1
        elif refusal.axis is not None:
            detail = int(refusal.axis)
        return self._nak(frame, reason, detail)

    def _ack(self, frame):
        self._count(frame)
        return MsgType.ACK, protocol.encode_ack(frame.type)

    def _count(self, frame):
        name = protocol.type_name(frame.type)
        self.executed[name] = self.executed.get(name, 0) + 1

    def _dispatch(self, frame: protocol.Frame):
        try:
            msg_type = MsgType(frame.type)
        except ValueError:
            return self._nak(frame, NakReason.UNKNOWN_TYPE)
        if msg_type not in protocol.REPLY_TYPE:      # a reply type sent to us
            return self._nak(frame, NakReason.UNKNOWN_TYPE)
        if msg_type not in self.accepts:
            return self._nak(frame, NakReason.WRONG_PORT)
        if not self.handshake_done and msg_type not in self.pre_handshake:
            return self._nak(frame, NakReason.HANDSHAKE_REQUIRED)
        handler = getattr(self, f'_on_{msg_type.name.lower()}')
        try:
            return handler(frame)
        except protocol.PayloadLengthError:
            return self._nak(frame, NakReason.BAD_LENGTH)
        except protocol.ProtocolError:
            return self._nak(frame, NakReason.BAD_VALUE)
        except Refusal as refusal:
            return self._refused(frame, refusal)

    @staticmethod
    def _no_payload(frame):
        if frame.payload:
            raise protocol.PayloadLengthError(f'{protocol.type_name(frame.type)} payload must be 0 bytes')

    # --- requests every port takes ------------------------------------------------------
    def _on_hello(self, frame):
        host_major, _ = protocol.decode_hello(frame.payload)
        reply = self._hello_reply()
        # Always answer (the host needs our versions for its error message), but
        # accept further commands only from a host speaking our major version.
        self.handshake_done = host_major == reply.protocol_version[0]
        return MsgType.HELLO_REPLY, protocol.encode_hello_reply(reply)

    def _on_heartbeat(self, frame):
        self._no_payload(frame)
        return self._ack(frame)


class TriggerPortSession(PortSession):
    """The trigger port (docs/serial_protocol.md §9): a second input of the scanner trigger, driven by a
    lean host process from the scanner's state. It can say "imaging" (and "idle"), nothing else: every
    request that could move the robot gets NAK WRONG_PORT. The first valid frame after a compatible HELLO
    arms the port's silence timer in the core: a relay that falls silent reads as imaging."""

    accepts = protocol.TRIGGER_PORT_REQUESTS
    pre_handshake = frozenset({MsgType.HELLO})

    def _seen(self) -> None:
        if self.handshake_done:
            self.core.trigger_port_seen()

    def _on_trigger_level(self, frame):
        self.core.set_trigger(protocol.decode_trigger_level(frame.payload), source='PORT')
        return self._ack(frame)
