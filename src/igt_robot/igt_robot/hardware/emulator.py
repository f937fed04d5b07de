"""Motor-controller firmware emulator on a pseudo-terminal.

Run it as a separate process, exactly like a real controller on a serial port::

    python -m igt_robot.hardware.emulator --control /tmp/emu.sock
    igt-firmware-emulator --help            # console script -> main()

It opens a pty pair (raw mode), prints ``PTY <slave path>`` as its first stdout
line and then speaks the protocol of ``docs/serial_protocol.md`` on the master
side: 5 axes (joint order and limits from the URDF via
:func:`igt_robot.robot_model.load_robot_model` when importable, else the
contract values), velocity/acceleration-limited motion updated at 1 kHz
(``--tick-hz``), encoder quantisation, a host watchdog (``--watchdog-ms``),
motion inhibit, e-stop, latched faults and a scanner-trigger input.

Tests drive the "physical world" through a side channel, a UNIX stream socket
at ``--control PATH``: one command per line, one reply line each (``ok ...`` or
``error ...``)::

    trigger 0|1                 scanner-trigger input level
    fault NAME [AXIS]           latch a fault (NAME from protocol.Fault; AXIS index or joint name)
    corrupt_next N [MODE]       corrupt the next N transmitted frames; MODE = bitflip (default),
                                garbage (noise + a fake header before the frame), length, truncate
    corrupt_rx N                treat the next N received frames as damaged on the line (NAK CRC)
    stall_axis AXIS / release_axis AXIS   block / free an axis mechanically
    estop_input 0|1             the hardware e-stop button (pressing it latches e-stop)
    silence / talk              stop / resume answering (received bytes are ignored meanwhile)
    unplug                      close the pty (the host sees the port vanish)
    power_cycle                 restart the firmware from its power-on state (same pty; the host
                                must HELLO again); also clears injected line faults
    state                       ok {json}: the emulator's true state, for test assertions
    ping                        ok

The process exits cleanly on SIGTERM/SIGINT and when its parent dies (it polls
``os.getppid()``). :class:`EmulatorProcess` spawns and controls it from Python.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from igt_robot.hardware import protocol
from igt_robot.hardware.axis_model import AxisConfig, AxisDynamics, default_axis_configs
from igt_robot.hardware.protocol import Fault, MsgType, NakReason, StatusFlag

DEFAULT_FIRMWARE_VERSION = (1, 2, 0)
DEFAULT_WATCHDOG_MS = 100
DEFAULT_TICK_HZ = 1000
DEVICE_NAME = 'igt-firmware-emulator'

#: Faults that cut motion at once (position or power no longer trustworthy);
#: the others decelerate under control first. Both then de-energise the axes.
IMMEDIATE_FAULTS = Fault.OVERCURRENT | Fault.ENCODER | Fault.LIMIT_SWITCH | Fault.SUPPLY | Fault.INTERNAL

#: A following error larger than this many seconds of full-speed travel
#: (but at least FOLLOWING_ERROR_MIN_COUNTS) latches FOLLOWING_ERROR.
FOLLOWING_ERROR_SECONDS = 0.05
FOLLOWING_ERROR_MIN_COUNTS = 50
#: The limit switches sit this fraction of the range beyond the soft limits.
LIMIT_SWITCH_MARGIN = 0.02
#: Requests allowed before a compatible HELLO (ESTOP must always work).
_PRE_HANDSHAKE = frozenset({MsgType.HELLO, MsgType.GET_STATUS, MsgType.GET_AXIS_CONFIG,
                            MsgType.HEARTBEAT, MsgType.ESTOP, MsgType.STOP})


def _parse_version(text: str, parts: int) -> Tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split('.'))
    except ValueError:
        values = ()
    if len(values) != parts or any(not 0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f'expected {parts} dot-separated numbers 0..255, got {text!r}')
    return values


class Firmware:
    """The controller's logic without any I/O: protocol handling plus axes.

    Time advances only through :meth:`step` (seconds); the watchdog is measured
    in that time. :meth:`receive` takes raw bytes from the line and returns the
    frames to transmit.
    """

    def __init__(self, axes: Sequence[AxisConfig], firmware_version=DEFAULT_FIRMWARE_VERSION,
                 protocol_version=protocol.PROTOCOL_VERSION, watchdog_ms: int = DEFAULT_WATCHDOG_MS,
                 device_name: str = DEVICE_NAME):
        if not 0 < watchdog_ms <= 0xFFFF:
            raise ValueError(f'watchdog period must be 1..65535 ms (u16 on the wire), got {watchdog_ms} ms')
        self.axes = list(axes)
        self.infos = [a.to_axis_info() for a in self.axes]
        self.dyn = [AxisDynamics(i.max_velocity, i.max_acceleration) for i in self.infos]
        self.following_error_limit = [max(FOLLOWING_ERROR_MIN_COUNTS, FOLLOWING_ERROR_SECONDS * i.max_velocity)
                                      for i in self.infos]
        self.limit_switch = [(i.min_counts - LIMIT_SWITCH_MARGIN * (i.max_counts - i.min_counts),
                              i.max_counts + LIMIT_SWITCH_MARGIN * (i.max_counts - i.min_counts))
                             for i in self.infos]
        # Park inside the range (insertion's range starts at 0, the stage is centred).
        for d, info in zip(self.dyn, self.infos):
            d.position = d.profile_position = d.target = float(min(max(0, info.min_counts), info.max_counts))
        self.firmware_version = tuple(firmware_version)
        self.protocol_version = tuple(protocol_version)
        self.watchdog_ms = int(watchdog_ms)
        self.device_name = device_name
        self.time = 0.0
        self.enabled = False
        self.stopping_to_off = False      # decelerating before de-energising (DISABLE or fault)
        self.inhibited = False
        self.estop = False
        self.estop_input = False
        self.faults = 0
        self.fault_axes = 0
        self.trigger = False
        self.trigger_edges = 0
        self.handshake_done = False
        self.last_rx_time = 0.0
        self.last_seq: Optional[int] = None
        self.rx_crc_errors = 0
        self.rx_seq_gaps = 0
        self.rx_frames = 0
        self.duplicates = 0
        self.watchdog_trips = 0
        self.corrupt_rx = 0
        self.executed: Dict[str, int] = {}
        self._last_stateful: Optional[Tuple[int, int, bytes]] = None
        self._last_stateful_reply = b''
        self._out: List[bytes] = []
        self.decoder = protocol.FrameDecoder(on_crc_error=self._on_crc_error)

    # ------------------------------------------------------------------ line side
    def receive(self, data: bytes) -> List[bytes]:
        """Bytes from the host -> frames to send back (in order)."""
        return self.respond(self.decode(data))

    def decode(self, data: bytes) -> List[protocol.Frame]:
        """Bytes from the line -> valid request frames, not yet executed (CRC failures
        are NAKed into the pending output)."""
        frames = []
        for frame in self.decoder.feed(data):
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
        out, self._out = self._out, []
        return out

    def _on_crc_error(self, msg_type: int, seq: int) -> None:
        # The header was self-consistent, so TYPE/SEQ are probably right: a NAK
        # lets the host retransmit now instead of after its timeout. A wrong
        # SEQ is harmless, the host ignores NAKs for other sequence numbers.
        self.rx_crc_errors += 1
        self._out.append(protocol.encode_frame(
            MsgType.NAK, seq, protocol.encode_nak(protocol.Nak(msg_type, NakReason.CRC))))

    def handle(self, frame: protocol.Frame) -> bytes:
        """One valid request frame -> the reply frame bytes."""
        self.rx_frames += 1
        self.last_rx_time = self.time          # any valid frame feeds the watchdog
        if frame.type == MsgType.HELLO:
            self._last_stateful = None         # a (re)connecting host restarts its sequence
            self.last_seq = None
        if self.last_seq is not None and frame.seq not in (self.last_seq, (self.last_seq + 1) & 0xFF):
            self.rx_seq_gaps += 1
        self.last_seq = frame.seq
        key = (frame.type, frame.seq, frame.payload)
        if frame.type in protocol.STATEFUL_REQUESTS and key == self._last_stateful:
            # Retransmission (our reply was lost): answer again, do not execute twice.
            self.duplicates += 1
            return self._last_stateful_reply
        reply_type, payload = self._dispatch(frame)
        reply = protocol.encode_frame(reply_type, frame.seq, payload)
        if frame.type in protocol.STATEFUL_REQUESTS:
            self._last_stateful, self._last_stateful_reply = key, reply
        return reply

    def _nak(self, frame, reason: NakReason, detail: int = protocol.NO_AXIS):
        return MsgType.NAK, protocol.encode_nak(protocol.Nak(frame.type, reason, detail))

    def _ack(self, frame):
        name = protocol.type_name(frame.type)
        self.executed[name] = self.executed.get(name, 0) + 1
        return MsgType.ACK, protocol.encode_ack(frame.type)

    def _dispatch(self, frame: protocol.Frame):
        try:
            msg_type = MsgType(frame.type)
        except ValueError:
            return self._nak(frame, NakReason.UNKNOWN_TYPE)
        if msg_type not in protocol.REPLY_TYPE:      # a reply type sent to us
            return self._nak(frame, NakReason.UNKNOWN_TYPE)
        if not self.handshake_done and msg_type not in _PRE_HANDSHAKE:
            return self._nak(frame, NakReason.HANDSHAKE_REQUIRED)
        handler = getattr(self, f'_on_{msg_type.name.lower()}')
        try:
            return handler(frame)
        except protocol.PayloadLengthError:
            return self._nak(frame, NakReason.BAD_LENGTH)
        except protocol.ProtocolError:
            return self._nak(frame, NakReason.BAD_VALUE)

    @staticmethod
    def _no_payload(frame):
        if frame.payload:
            raise protocol.PayloadLengthError(f'{protocol.type_name(frame.type)} payload must be 0 bytes')

    def _fault_detail(self) -> int:
        return (self.faults & -self.faults).bit_length() - 1 if self.faults else protocol.NO_AXIS

    # --- request handlers -----------------------------------------------------------
    def _on_hello(self, frame):
        host_major, _ = protocol.decode_hello(frame.payload)
        # Always answer (the host needs our versions for its error message), but
        # accept further commands only from a host speaking our major version.
        self.handshake_done = host_major == self.protocol_version[0]
        return MsgType.HELLO_REPLY, protocol.encode_hello_reply(protocol.HelloReply(
            self.protocol_version, self.firmware_version, len(self.axes), self.watchdog_ms, self.device_name))

    def _on_get_status(self, frame):
        self._no_payload(frame)
        return MsgType.STATUS, protocol.encode_status(self.status())

    def _on_get_axis_config(self, frame):
        self._no_payload(frame)
        return MsgType.AXIS_CONFIG, protocol.encode_axis_config(self.infos)

    def _on_heartbeat(self, frame):
        self._no_payload(frame)
        return self._ack(frame)

    def _on_enable(self, frame):
        self._no_payload(frame)
        if self.estop or self.estop_input:
            return self._nak(frame, NakReason.ESTOPPED)
        if self.faults:
            return self._nak(frame, NakReason.FAULTED, self._fault_detail())
        if not self.enabled or self.stopping_to_off:
            if not self.stopping_to_off:
                for d in self.dyn:
                    d.hold()                   # energise holding the current position
            self.enabled, self.stopping_to_off = True, False
            self.last_rx_time = self.time
        return self._ack(frame)

    def _on_disable(self, frame):
        self._no_payload(frame)
        if self.enabled and not self.stopping_to_off:
            self._begin_stop_to_off()
        return self._ack(frame)

    def _on_set_target(self, frame):
        target = protocol.decode_set_target(frame.payload)
        if len(target.positions) != len(self.axes):
            return self._nak(frame, NakReason.BAD_LENGTH)
        if self.estop:
            return self._nak(frame, NakReason.ESTOPPED)
        if self.faults:
            return self._nak(frame, NakReason.FAULTED, self._fault_detail())
        if not self.enabled or self.stopping_to_off:
            return self._nak(frame, NakReason.NOT_ENABLED)
        if self.inhibited:
            return self._nak(frame, NakReason.INHIBITED)
        for i, (pos, info) in enumerate(zip(target.positions, self.infos)):
            if not info.min_counts <= pos <= info.max_counts:
                return self._nak(frame, NakReason.RANGE, i)
        for d, pos, vlim, vff in zip(self.dyn, target.positions, target.velocity_limits, target.feedforward):
            d.set_target(pos, vlim, vff)       # the axis clamps vlim and vff to its own maximum
        return self._ack(frame)

    def _on_stop(self, frame):
        self._no_payload(frame)
        if self.enabled:
            for d in self.dyn:
                d.begin_stop()
        return self._ack(frame)

    def _on_estop(self, frame):
        self._no_payload(frame)
        self.trip_estop()
        return self._ack(frame)

    def _on_motion_inhibit(self, frame):
        inhibit = protocol.decode_motion_inhibit(frame.payload)
        if inhibit and not self.inhibited and self.enabled:
            # Decelerate and hold; targets refused while set. A de-energised drive is not moving:
            # starting a stop there would leave it "stopping" (MOVING) forever, as it never steps.
            for d in self.dyn:
                d.begin_stop()
        self.inhibited = inhibit
        return self._ack(frame)

    def _on_reset_faults(self, frame):
        self._no_payload(frame)
        if self.estop_input:
            return self._nak(frame, NakReason.ESTOPPED)   # the button is still pressed
        self.faults = self.fault_axes = 0
        self.estop = False
        return self._ack(frame)

    # ------------------------------------------------------------------ machine side
    def _power_off(self) -> None:
        self.enabled = self.stopping_to_off = False
        for d in self.dyn:
            d.hold()

    def _begin_stop_to_off(self) -> None:
        self.stopping_to_off = True
        for d in self.dyn:
            d.begin_stop()

    def trip_estop(self) -> None:
        """E-stop: motion cut this instant, power off, latched until RESET_FAULTS."""
        self.estop = True
        for d in self.dyn:
            d.halt()
        self._power_off()

    def latch_fault(self, fault: Fault, axis: Optional[int] = None) -> None:
        """Latch ``fault`` (optionally on ``axis``) and take the axes to a safe state."""
        self.faults |= int(fault)
        if axis is not None:
            self.fault_axes |= 1 << axis
        if fault == Fault.WATCHDOG:
            self.watchdog_trips += 1
        if not self.enabled:
            return
        if fault & IMMEDIATE_FAULTS:
            for d in self.dyn:
                d.halt()
            self._power_off()
        elif not self.stopping_to_off:
            self._begin_stop_to_off()

    def set_trigger(self, level: bool) -> None:
        if level and not self.trigger:
            self.trigger_edges += 1
        self.trigger = bool(level)

    def set_estop_input(self, pressed: bool) -> None:
        self.estop_input = bool(pressed)
        if pressed:
            self.trip_estop()

    def step(self, dt: float, host_seen: bool = False) -> None:
        """Advance the controller by ``dt`` seconds (one servo tick).

        ``host_seen``: a valid host frame has arrived but is not executed yet
        (it counts for the watchdog, as a UART interrupt would have noted it).
        """
        self.time += dt
        if host_seen:
            self.last_rx_time = self.time
        if not self.enabled:
            return
        if not self.faults & Fault.WATCHDOG and (self.time - self.last_rx_time) * 1000.0 > self.watchdog_ms:
            self.latch_fault(Fault.WATCHDOG)
        for d in self.dyn:
            d.step(dt)
        for i, d in enumerate(self.dyn):
            if abs(d.following_error) > self.following_error_limit[i] and not self.fault_axes & (1 << i):
                self.latch_fault(Fault.FOLLOWING_ERROR, i)
            lo, hi = self.limit_switch[i]
            if not lo <= d.position <= hi:
                self.latch_fault(Fault.LIMIT_SWITCH, i)
        if self.stopping_to_off and not any(d.profile_velocity for d in self.dyn):
            self._power_off()

    def status(self) -> protocol.Status:
        flags = 0
        if self.enabled:
            flags |= StatusFlag.ENABLED
        if self.inhibited:
            flags |= StatusFlag.INHIBITED
        if self.estop:
            flags |= StatusFlag.ESTOP
        if any(d.moving for d in self.dyn):
            flags |= StatusFlag.MOVING
        if self.trigger:
            flags |= StatusFlag.SCANNER_TRIGGER
        if self.faults:
            flags |= StatusFlag.FAULT
        if self.handshake_done:
            flags |= StatusFlag.HANDSHAKE_DONE
        return protocol.Status(
            uptime_ms=int(self.time * 1000.0), flags=int(flags), faults=self.faults, fault_axes=self.fault_axes,
            rx_crc_errors=self.rx_crc_errors, rx_seq_gaps=self.rx_seq_gaps, trigger_edges=self.trigger_edges,
            positions=tuple(int(round(d.position)) for d in self.dyn),       # encoder quantisation
            velocities=tuple(int(round(d.velocity)) for d in self.dyn))

    def snapshot(self) -> dict:
        """The true state for the control channel (JSON-serialisable)."""
        return {
            'time': self.time, 'enabled': self.enabled, 'stopping_to_off': self.stopping_to_off,
            'inhibited': self.inhibited, 'estop': self.estop, 'estop_input': self.estop_input,
            'faults': list(protocol.fault_names(self.faults)),
            'fault_axes': [i for i in range(len(self.axes)) if self.fault_axes & (1 << i)],
            'positions': [d.position for d in self.dyn], 'velocities': [d.velocity for d in self.dyn],
            'targets': [d.target for d in self.dyn], 'stalled': [d.stalled for d in self.dyn],
            'moving': any(d.moving for d in self.dyn), 'trigger': self.trigger,
            'trigger_edges': self.trigger_edges, 'handshake_done': self.handshake_done,
            'rx_frames': self.rx_frames, 'rx_crc_errors': self.rx_crc_errors, 'rx_seq_gaps': self.rx_seq_gaps,
            'duplicates': self.duplicates, 'watchdog_trips': self.watchdog_trips, 'executed': dict(self.executed),
        }


class EmulatorServer:
    """Pty + control socket + 1 kHz servo loop around a :class:`Firmware`."""

    CORRUPT_MODES = ('bitflip', 'garbage', 'length', 'truncate')

    def __init__(self, make_firmware, control_path: Optional[str] = None, tick_hz: float = DEFAULT_TICK_HZ,
                 log=None):
        """``make_firmware()`` builds a fresh :class:`Firmware` (at start and on ``power_cycle``)."""
        if tick_hz < 1000:
            raise ValueError(f'the servo loop must run at >= 1000 Hz, got {tick_hz}')
        self.make_firmware = make_firmware
        self.fw = make_firmware()
        self.tick = 1.0 / tick_hz
        self.control_path = control_path
        self.log = log or sys.stderr
        self.master = self.slave = -1
        self.pty_path = ''
        self._tx = bytearray()
        self._listener: Optional[socket.socket] = None
        self._clients: Dict[socket.socket, bytearray] = {}
        self._stop = False
        self.silenced = False
        self.unplugged = False
        self.corrupt_next = 0
        self.corrupt_mode = 'bitflip'
        self.tx_frames = 0
        self.tx_corrupted = 0
        self.tx_dropped = 0
        self.overruns = 0

    # ------------------------------------------------------------------ setup / teardown
    def open(self) -> str:
        self.master, self.slave = os.openpty()
        # Raw mode: no echo, no line editing, no CR/LF translation -- a plain byte pipe like a UART.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        # Keep our slave fd open: the pty stays valid while hosts open/close the port.
        self.pty_path = os.ttyname(self.slave)
        if self.control_path:
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.control_path)
            self._listener.listen(4)
            self._listener.setblocking(False)
        return self.pty_path

    def close(self) -> None:
        self._unplug()
        for client in list(self._clients):
            client.close()
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass

    def _unplug(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1
        self._tx.clear()

    def request_stop(self, *_args) -> None:
        self._stop = True

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        parent = os.getppid()
        next_tick = time.monotonic()
        next_parent_check = next_tick
        max_catch_up = 100                     # ticks; beyond that we were starved: skip ahead
        while not self._stop:
            # Frames that arrived while we were not running are decoded first so the
            # catch-up ticks know the host was alive (no false watchdog trip after this
            # process was descheduled), and executed after them so that a STATUS reply
            # shows the present, not the moment we were descheduled.
            frames = self._read_frames()
            now = time.monotonic()
            if now >= next_tick:
                due = int((now - next_tick) / self.tick) + 1
                if due > max_catch_up:
                    # Starved for longer than we are willing to replay: drop the excess
                    # time (it never reaches the watchdog clock either) and go on.
                    self.overruns += 1
                    due = max_catch_up
                    next_tick = now - (due - 1) * self.tick
                for _ in range(due):
                    self.fw.step(self.tick, host_seen=bool(frames))
                next_tick += due * self.tick
                if now >= next_parent_check:
                    next_parent_check = now + 0.1
                    if os.getppid() != parent:
                        print('emulator: parent process died, exiting', file=self.log, flush=True)
                        break
            for reply in self.fw.respond(frames):
                self._transmit(reply)
            rlist = list(self._clients)
            if self.master >= 0:
                rlist.append(self.master)
            if self._listener is not None:
                rlist.append(self._listener)
            wlist = [self.master] if self._tx and self.master >= 0 else []
            try:
                readable, writable, _ = select.select(rlist, wlist, [], max(0.0, next_tick - time.monotonic()))
            except InterruptedError:
                continue
            if self.master in writable:
                self._flush_tx()
            for src in readable:
                if src is self._listener:
                    self._accept()
                elif src == self.master:
                    pass                               # read at the top of the loop
                elif isinstance(src, socket.socket):
                    self._read_control(src)
        return 0

    def _read_frames(self) -> List[protocol.Frame]:
        """Decode whatever the host has sent (non-blocking); [] when nothing or silenced."""
        if self.master < 0:
            return []
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno == errno.EIO:         # no slave side open at the moment
                return []
            raise
        if self.silenced or not data:
            return []
        return self.fw.decode(data)

    def _transmit(self, frame: bytes) -> None:
        self.tx_frames += 1
        if self.corrupt_next > 0:
            self.corrupt_next -= 1
            self.tx_corrupted += 1
            frame = self._corrupt(frame)
        self._tx += frame
        self._flush_tx()

    def _corrupt(self, frame: bytes) -> bytes:
        data = bytearray(frame)
        if self.corrupt_mode == 'bitflip':
            data[len(data) // 2] ^= 0x10       # inside TYPE..CRC: the CRC must catch it
        elif self.corrupt_mode == 'length':
            data[2] ^= 0x04                    # LEN no longer matches ~LEN
        elif self.corrupt_mode == 'truncate':
            data = data[:len(data) // 2]       # the rest of the frame is lost on the line
        elif self.corrupt_mode == 'garbage':
            # Line noise, then a plausible header (LEN 16, ~LEN) whose body never checks out.
            data = bytearray(b'\x00\x13\xA5\x37') + protocol.SYNC + bytearray(b'\x10\xEF\x83\x00') + data
        return bytes(data)

    def _flush_tx(self) -> None:
        if self.master < 0:
            self._tx.clear()
            return
        try:
            written = os.write(self.master, self._tx)
            del self._tx[:written]
        except BlockingIOError:
            pass                                # host not reading: keep it for later
        except OSError:
            self.tx_dropped += len(self._tx)
            self._tx.clear()
        if len(self._tx) > 65536:               # a UART would have overrun long ago
            self.tx_dropped += len(self._tx)
            self._tx.clear()

    # ------------------------------------------------------------------ control channel
    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        self._clients[client] = bytearray()

    def _read_control(self, client: socket.socket) -> None:
        try:
            data = client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            client.close()
            self._clients.pop(client, None)
            return
        buf = self._clients[client]
        buf += data
        while b'\n' in buf:
            line, _, rest = bytes(buf).partition(b'\n')
            buf[:] = rest
            try:
                reply = 'ok' + ((' ' + r) if (r := self.control(line.decode('utf-8', 'replace'))) else '')
            except (ValueError, KeyError, IndexError) as exc:
                reply = f'error {exc}'
            try:
                client.setblocking(True)
                client.sendall(reply.encode() + b'\n')
                client.setblocking(False)
            except OSError:
                client.close()
                self._clients.pop(client, None)
                return

    def _axis_index(self, token: str) -> int:
        names = [a.name for a in self.fw.axes]
        if token in names:
            return names.index(token)
        index = int(token)
        if not 0 <= index < len(names):
            raise ValueError(f'axis index {index} out of range 0..{len(names) - 1}')
        return index

    def control(self, line: str) -> str:
        """Execute one control command; returns the text after ``ok`` (ValueError on bad input)."""
        words = line.split()
        if not words:
            raise ValueError('empty command')
        cmd, args = words[0].lower(), words[1:]
        if cmd == 'ping':
            return ''
        if cmd == 'state':
            snap = self.fw.snapshot()
            snap.update(pty=self.pty_path, silenced=self.silenced, unplugged=self.unplugged,
                        tx_frames=self.tx_frames, tx_corrupted=self.tx_corrupted, overruns=self.overruns)
            return json.dumps(snap)
        if cmd == 'trigger' and len(args) == 1 and args[0] in ('0', '1'):
            self.fw.set_trigger(args[0] == '1')
            return ''
        if cmd == 'estop_input' and len(args) == 1 and args[0] in ('0', '1'):
            self.fw.set_estop_input(args[0] == '1')
            return ''
        if cmd == 'fault' and len(args) in (1, 2):
            bits = protocol.fault_bits([args[0]])
            self.fw.latch_fault(Fault(bits), self._axis_index(args[1]) if len(args) == 2 else None)
            return ''
        if cmd == 'corrupt_next' and len(args) in (1, 2):
            count = int(args[0])
            mode = args[1] if len(args) == 2 else 'bitflip'
            if count < 0 or mode not in self.CORRUPT_MODES:
                raise ValueError(f'corrupt_next N [{"|".join(self.CORRUPT_MODES)}], N >= 0')
            self.corrupt_next, self.corrupt_mode = count, mode
            return ''
        if cmd == 'corrupt_rx' and len(args) == 1:
            self.fw.corrupt_rx = max(0, int(args[0]))
            return ''
        if cmd in ('stall_axis', 'release_axis') and len(args) == 1:
            self.fw.dyn[self._axis_index(args[0])].stalled = cmd == 'stall_axis'
            return ''
        if cmd == 'silence' and not args:
            self.silenced = True
            return ''
        if cmd == 'talk' and not args:
            self.silenced = False
            return ''
        if cmd == 'power_cycle' and not args:
            self.fw = self.make_firmware()
            self.silenced, self.corrupt_next = False, 0
            self.tx_frames = self.tx_corrupted = self.tx_dropped = 0
            self._tx.clear()
            return ''
        if cmd == 'unplug' and not args:
            self.unplugged = True
            self._unplug()
            return ''
        raise ValueError(f'unknown or malformed control command {line.strip()!r}')


# ---------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='igt-firmware-emulator',
        description='Emulate the igt_robot motor controller on a pseudo-terminal. Prints "PTY <path>" '
                    'on the first stdout line; connect SerialHardware(<path>) to it.')
    parser.add_argument('--control', metavar='PATH', help='UNIX socket for test/fault-injection commands')
    parser.add_argument('--watchdog-ms', type=int, default=DEFAULT_WATCHDOG_MS,
                        help='host silence (ms) after which an enabled controller stops and latches WATCHDOG')
    parser.add_argument('--firmware-version', type=lambda s: _parse_version(s, 3),
                        default=DEFAULT_FIRMWARE_VERSION, metavar='MAJ.MIN.PATCH',
                        help='reported firmware version (default %(default)s; change it to test version checks)')
    parser.add_argument('--protocol-version', type=lambda s: _parse_version(s, 2),
                        default=protocol.PROTOCOL_VERSION, metavar='MAJ.MIN',
                        help='reported protocol version (default %(default)s)')
    parser.add_argument('--counts-per-unit', metavar='C1,C2,C3,C4,C5',
                        help='encoder counts per m (prismatic) or per rad (revolute), one per joint')
    parser.add_argument('--tick-hz', type=float, default=DEFAULT_TICK_HZ, help='servo loop rate (>= 1000)')
    parser.add_argument('--no-robot-model', action='store_true',
                        help='use the limits of docs/contracts.md instead of loading the URDF')
    parser.add_argument('--device-name', default=DEVICE_NAME)
    parser.add_argument('--link', metavar='PATH',
                        help='also make PATH a symlink to the pty (a fixed port name for launch files); '
                             'removed on exit')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--ros-args' in argv:   # started as a launch_ros Node, which appends ROS arguments
        argv = argv[:argv.index('--ros-args')]
    args = build_arg_parser().parse_args(argv)
    cpus = None
    if args.counts_per_unit:
        try:
            cpus = [float(v) for v in args.counts_per_unit.split(',')]
        except ValueError:
            print(f'emulator: --counts-per-unit {args.counts_per_unit!r} is not a comma list of numbers',
                  file=sys.stderr)
            return 2
    try:
        axes, source = default_axis_configs(cpus, use_robot_model=not args.no_robot_model)
        def make_firmware():
            return Firmware(axes, args.firmware_version, args.protocol_version, args.watchdog_ms, args.device_name)
        server = EmulatorServer(make_firmware, args.control, args.tick_hz)
        firmware = server.fw
    except ValueError as exc:
        print(f'emulator: {exc}', file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        path = server.open()
        if args.link:
            if os.path.islink(args.link):
                os.unlink(args.link)  # a stale link from an emulator that was killed
            os.symlink(path, args.link)
        print(f'PTY {path}', flush=True)
        print(f'emulator: firmware {".".join(map(str, firmware.firmware_version))}, protocol '
              f'{".".join(map(str, firmware.protocol_version))}, axes from {source}, watchdog '
              f'{args.watchdog_ms} ms, control {args.control or "-"}', file=sys.stderr, flush=True)
        return server.run()
    finally:
        server.close()
        if args.link and os.path.islink(args.link) and os.readlink(args.link) == server.pty_path:
            os.unlink(args.link)


# ---------------------------------------------------------------------------- spawning helper

class EmulatorError(RuntimeError):
    """The emulator process failed to start or rejected a control command."""


class EmulatorProcess:
    """Run the emulator as a child process and talk to its control socket.

    Usage::

        with EmulatorProcess('--watchdog-ms', '100') as emu:
            hw = SerialHardware(emu.pty_path)
            emu.control('trigger 1')
    """

    def __init__(self, *args: str, control_path: Optional[str] = None, startup_timeout: float = 10.0,
                 python: str = sys.executable):
        self._tmpdir = None
        if control_path is None:
            # UNIX socket paths are limited to ~107 bytes: keep it short, in /tmp.
            self._tmpdir = tempfile.mkdtemp(prefix='igtemu-')
            control_path = os.path.join(self._tmpdir, 'ctl')
        self.control_path = control_path
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.python = python
        self.proc: Optional[subprocess.Popen] = None
        self.pty_path = ''
        self._stderr = None
        self._sock: Optional[socket.socket] = None
        self._sock_buf = b''
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def start(self) -> 'EmulatorProcess':
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])     # .../src/igt_robot
        env['PYTHONPATH'] = os.pathsep.join(p for p in (package_root, env.get('PYTHONPATH')) if p)
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [self.python, '-m', 'igt_robot.hardware.emulator', '--control', self.control_path, *self.args],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, env=env, bufsize=0)
        line = self._read_first_line()
        if not line.startswith('PTY '):
            self.terminate()
            raise EmulatorError(f'emulator printed {line!r} instead of "PTY <path>"; stderr: {self.stderr_text()}')
        self.pty_path = line[4:].strip()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(self.startup_timeout)
        self._sock.connect(self.control_path)
        return self

    def _read_first_line(self) -> str:
        deadline = time.monotonic() + self.startup_timeout
        fd = self.proc.stdout.fileno()
        data = b''
        while b'\n' not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.terminate()
                raise EmulatorError(f'emulator did not print its PTY line within {self.startup_timeout} s; '
                                    f'stderr: {self.stderr_text()}')
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 256)
                if not chunk:
                    code = self.proc.wait(timeout=5)
                    raise EmulatorError(f'emulator exited with code {code} before printing its PTY line; '
                                        f'stderr: {self.stderr_text()}')
                data += chunk
        return data.split(b'\n', 1)[0].decode('utf-8', 'replace')

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ''
        self._stderr.seek(0)
        return self._stderr.read().decode('utf-8', 'replace')[-4000:]

    def control(self, command: str, timeout: float = 5.0) -> str:
        """Send one control command; return the reply text after ``ok`` (EmulatorError on ``error``)."""
        if self._sock is None:
            raise EmulatorError('emulator not started')
        with self._lock:
            self._sock.settimeout(timeout)
            self._sock.sendall(command.encode() + b'\n')
            while b'\n' not in self._sock_buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise EmulatorError(f'emulator closed the control channel (command {command!r}); '
                                        f'stderr: {self.stderr_text()}')
                self._sock_buf += chunk
            line, self._sock_buf = self._sock_buf.split(b'\n', 1)
        reply = line.decode('utf-8', 'replace')
        if reply == 'ok' or reply.startswith('ok '):
            return reply[3:]
        raise EmulatorError(f'emulator refused {command!r}: {reply}')

    def state(self) -> dict:
        """The emulator's true state (see :meth:`Firmware.snapshot`)."""
        return json.loads(self.control('state'))

    def terminate(self, timeout: float = 5.0) -> Optional[int]:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=timeout)
            code = self.proc.returncode
            if self.proc.stdout:
                self.proc.stdout.close()
        if self._tmpdir is not None:
            for name in os.listdir(self._tmpdir) if os.path.isdir(self._tmpdir) else ():
                try:
                    os.unlink(os.path.join(self._tmpdir, name))
                except OSError:
                    pass
            try:
                os.rmdir(self._tmpdir)
            except OSError:
                pass
            self._tmpdir = None
        return code

    def __enter__(self) -> 'EmulatorProcess':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()


if __name__ == '__main__':
    sys.exit(main())
