"""Motor-controller firmware emulator on a pseudo-terminal.

Run it as a separate process, exactly like a real controller on a serial port::

    python -m igt_robot.hardware.emulator --control /tmp/emu.sock
    igt-firmware-emulator --help            # console script -> main()

It opens a pty pair (raw mode), prints ``PTY <slave path>`` as its first stdout
line (``TRIGGER_PTY <path>``, the trigger port of §9, as its second) and then speaks
the protocol of ``docs/serial_protocol.md`` on the master side: 5 axes (joint order and limits from the URDF via
:func:`igt_robot.robot_model.load_robot_model` when importable, else the
contract values), the motor controller of
:class:`~igt_robot.hardware.controller_core.ControllerCore` servoing at 2 kHz
(``--tick-hz``, at least 1 kHz) in this process's own timing, independent of the host: PVT
trajectory streaming, the stop ramp, encoder quantisation, a host watchdog
(``--watchdog-ms``), motion inhibit, e-stop, latched faults and a
scanner-trigger input that stops motion by itself.

Tests drive the "physical world" through a side channel, a UNIX stream socket
at ``--control PATH``: one command per line, one reply line each (``ok ...`` or
``error ...``)::

    trigger 0|1                 scanner-trigger input level; a rising edge (imaging) makes the
                                controller ramp down at once and latch its inhibit
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
    state                       ok {json}: the emulator's true state, for test assertions (includes
                                trigger_edge_wall / ramp_start_wall: host-monotonic times of the
                                last trigger edge and of the first tick of the last stop ramp)
    timing [reset]              ok {json}: servo-tick lateness p50/p99/max (ms) since the last reset
    ping                        ok

The process exits cleanly on SIGTERM/SIGINT and when its parent dies (it polls
``os.getppid()``). :class:`EmulatorProcess` spawns and controls it from Python.
"""
from __future__ import annotations

import argparse
import collections
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
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from igt_robot.hardware import protocol
from igt_robot.hardware.axis_model import AxisConfig, default_axis_configs
from igt_robot.hardware.controller_core import DEFAULT_BUFFER_CAPACITY, AxisLimits, ControllerCore
from igt_robot.hardware.interface import PvtPoint
from igt_robot.hardware.port_session import PortSession, TriggerPortSession
from igt_robot.hardware.trigger_port_pty import open_raw_pty, read_pty, send_replies
from igt_robot.hardware.protocol import Fault, MsgType, NakReason, StatusFlag

DEFAULT_FIRMWARE_VERSION = (2, 0, 0)
# Host silence the controller tolerates before WATCHDOG. Sized from measured host stalls (docs/safety.md,
# timeout table): a whole-process stall of 110 ms (watchdog feed gap) in a quiet bench/interlock.py run and
# heartbeat gaps up to 167 ms under load; 100 ms tripped spuriously at start-up in every interlock bench run.
DEFAULT_WATCHDOG_MS = 300
DEFAULT_TICK_HZ = 1000
# The emulator process's servo rate (its --tick-hz default). The scanner-trigger input is acted on at the next
# servo tick, so trigger edge -> first ramp tick is up to one period plus the input's wake-up: at 1 kHz
# 0.98-0.99 ms max (bench/controller_timing.py, 40 edges, SCHED_FIFO; 1.07 ms in an earlier run) against the
# 1 ms target, at 2 kHz 0.55-0.57 ms max, for 6 % of a core instead of 4 % (holding, host polling at 50 Hz).
PROCESS_TICK_HZ = 2000

DEVICE_NAME = 'igt-firmware-emulator'

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


_STREAM_STATES = {'': protocol.StreamState.NONE, 'open': protocol.StreamState.OPEN,
                  'running': protocol.StreamState.RUNNING, 'ramping': protocol.StreamState.RAMPING,
                  'done': protocol.StreamState.DONE, 'stopped': protocol.StreamState.STOPPED}


class Firmware(PortSession):
    """The controller's logic without any I/O: protocol handling around a
    :class:`~igt_robot.hardware.controller_core.ControllerCore` (in encoder counts) plus the
    axes' mechanics.

    Time advances only through :meth:`step` (one servo tick each); the watchdog and the
    decoder's inter-byte timeout are measured in that time. :meth:`receive` takes raw bytes
    from the line and returns the frames to transmit.
    """

    def __init__(self, axes: Sequence[AxisConfig], firmware_version=DEFAULT_FIRMWARE_VERSION,
                 protocol_version=protocol.PROTOCOL_VERSION, watchdog_ms: int = DEFAULT_WATCHDOG_MS,
                 device_name: str = DEVICE_NAME, tick_hz: float = DEFAULT_TICK_HZ,
                 buffer_capacity: int = DEFAULT_BUFFER_CAPACITY):
        if not 0 < watchdog_ms <= 0xFFFF:
            raise ValueError(f'watchdog period must be 1..65535 ms (u16 on the wire), got {watchdog_ms} ms')
        if tick_hz < 1000:
            raise ValueError(f'the servo loop must run at >= 1000 Hz, got {tick_hz}')
        self.axes = list(axes)
        self.infos = [a.to_axis_info() for a in self.axes]
        n = len(self.axes)
        self.following_error_limit = [max(FOLLOWING_ERROR_MIN_COUNTS, FOLLOWING_ERROR_SECONDS * i.max_velocity)
                                      for i in self.infos]
        self.limit_switch = [(i.min_counts - LIMIT_SWITCH_MARGIN * (i.max_counts - i.min_counts),
                              i.max_counts + LIMIT_SWITCH_MARGIN * (i.max_counts - i.min_counts))
                             for i in self.infos]
        # Park inside the range (insertion's range starts at 0, the stage is centred).
        park = np.array([float(min(max(0, i.min_counts), i.max_counts)) for i in self.infos])
        # The mechanics: axes follow the controller's reference exactly unless stalled
        # (plain lists: this runs every servo tick).
        self.actual = park.tolist()
        self.actual_velocity = [0.0] * n
        self.stalled = [False] * n
        self.core = ControllerCore(
            [AxisLimits(float(i.min_counts), float(i.max_counts), float(i.max_velocity), float(i.max_acceleration),
                        1.0, a.name) for i, a in zip(self.infos, self.axes)],
            servo_period=1.0 / tick_hz, buffer_capacity=buffer_capacity, watchdog_timeout=watchdog_ms / 1000.0,
            positions=park, measure=lambda: np.array(self.actual))
        self.firmware_version = tuple(firmware_version)
        self.protocol_version = tuple(protocol_version)
        self.watchdog_ms = int(watchdog_ms)
        self.device_name = device_name
        super().__init__(self.core, self.hello_reply)
        # The controller's second port (docs/serial_protocol.md §9), on the same core.
        self.trigger_port = TriggerPortSession(self.core, self.hello_reply)

    # ------------------------------------------------------------------ views of the core
    @property
    def time(self) -> float:
        return self.core.time

    @property
    def enabled(self) -> bool:
        return self.core.enabled

    @property
    def stopping_to_off(self) -> bool:
        return self.core.stopping_to_off

    @property
    def inhibited(self) -> bool:
        return self.core.inhibited

    @property
    def estop(self) -> bool:
        return self.core.estop

    @property
    def estop_input(self) -> bool:
        return self.core.estop_input

    @property
    def trigger(self) -> bool:
        return self.core.trigger

    @property
    def trigger_edges(self) -> int:
        return self.core.trigger_edges

    @property
    def watchdog_trips(self) -> int:
        return self.core.watchdog_trips

    @property
    def faults(self) -> int:
        """Latched fault bits (protocol.Fault)."""
        return protocol.fault_bits(self.core.faults)

    @property
    def fault_axes(self) -> int:
        return sum(1 << i for i in self.core.fault_axes)

    @property
    def moving(self) -> bool:
        return self.core.moving or any(self.actual_velocity)

    # ------------------------------------------------------------------ the main port
    accepts = frozenset(protocol.REPLY_TYPE) - {MsgType.TRIGGER_LEVEL}
    pre_handshake = _PRE_HANDSHAKE

    def _seen(self) -> None:
        self.core.host_seen()

    def _after_requests(self) -> None:
        self._follow()

    def hello_reply(self) -> protocol.HelloReply:
        return protocol.HelloReply(self.protocol_version, self.firmware_version, len(self.axes), self.watchdog_ms,
                                   self.device_name)

    def _on_get_status(self, frame):
        self._no_payload(frame)
        return MsgType.STATUS, protocol.encode_status(self.status())

    def _on_get_axis_config(self, frame):
        self._no_payload(frame)
        return MsgType.AXIS_CONFIG, protocol.encode_axis_config(self.infos)

    def _on_enable(self, frame):
        self._no_payload(frame)
        self.core.enable()                     # energise holding the current position
        return self._ack(frame)

    def _on_disable(self, frame):
        self._no_payload(frame)
        self.core.disable()
        return self._ack(frame)

    def _on_set_target(self, frame):
        target = protocol.decode_set_target(frame.payload)
        if len(target.positions) != len(self.axes):
            return self._nak(frame, NakReason.BAD_LENGTH)
        self.core.set_target(np.array(target.positions, dtype=float),
                             velocity_limits=np.array(target.velocity_limits, dtype=float),
                             feedforward=np.array(target.feedforward, dtype=float))
        return self._ack(frame)

    def _on_stop(self, frame):
        self._no_payload(frame)
        self.core.stop()
        return self._ack(frame)

    def _on_estop(self, frame):
        self._no_payload(frame)
        self.core.emergency_stop()
        return self._ack(frame)

    def _on_motion_inhibit(self, frame):
        self.core.set_inhibit(protocol.decode_motion_inhibit(frame.payload))
        return self._ack(frame)

    def _on_reset_faults(self, frame):
        self._no_payload(frame)
        self.core.reset_faults()
        return self._ack(frame)

    def _on_begin_stream(self, frame):
        start = protocol.decode_begin_stream(frame.payload)
        if len(start) != len(self.axes):
            return self._nak(frame, NakReason.BAD_LENGTH)
        self.core.begin_stream(np.array(start, dtype=float))
        self._count(frame)
        return MsgType.STREAM_STATUS, protocol.encode_stream_status(self.stream_info())

    def _on_push_points(self, frame):
        push = protocol.decode_push_points(frame.payload, len(self.axes))
        points = [PvtPoint(p.time_us * 1e-6, np.array(p.positions, dtype=float), np.array(p.velocities, dtype=float))
                  for p in push.points]
        self.core.push_points(push.stream_id, points, final=push.final)
        self._count(frame)
        return MsgType.STREAM_STATUS, protocol.encode_stream_status(self.stream_info())

    # ------------------------------------------------------------------ machine side
    def latch_fault(self, fault: Fault, axis: Optional[int] = None) -> None:
        """Latch ``fault`` (optionally on ``axis``) and take the axes to a safe state."""
        for name in protocol.fault_names(int(fault)):
            self.core.latch_fault(name, axis)
        self._follow()

    def trip_estop(self) -> None:
        self.core.emergency_stop()
        self._follow()

    def set_trigger(self, level: bool) -> None:
        """The scanner-trigger input: a rising edge ramps motion down and latches the inhibit."""
        self.core.set_trigger(level)

    def set_estop_input(self, pressed: bool) -> None:
        self.core.set_estop_input(pressed)
        self._follow()

    def step(self, dt: Optional[float] = None, host_seen: bool = False) -> None:
        """Advance the controller by one servo tick (``dt``, if given, in whole ticks).

        ``host_seen``: a valid host frame has arrived but is not executed yet
        (it counts for the watchdog, as a UART interrupt would have noted it).
        """
        ticks = 1 if dt is None else max(1, int(round(dt / self.core.servo_period)))
        for _ in range(ticks):
            self._tick(host_seen)

    def _tick(self, host_seen: bool) -> None:
        core = self.core
        core.step()
        if host_seen:
            core.host_seen()
        self._follow()
        if not core.enabled:
            return
        ref, _ = core.reference()
        checks = zip(ref, self.actual, self.following_error_limit, self.limit_switch)
        for i, (r, x, limit, (lo, hi)) in enumerate(checks):
            if abs(r - x) > limit and i not in core.fault_axes:
                core.latch_fault('FOLLOWING_ERROR', i)
            if not lo <= x <= hi:
                core.latch_fault('LIMIT_SWITCH', i)

    def _follow(self) -> None:
        """The mechanics follow the controller's reference at once, except a stalled axis."""
        ref, ref_vel = self.core.reference()
        for i in range(len(self.axes)):
            if self.stalled[i]:
                self.actual_velocity[i] = 0.0
            else:
                self.actual[i] = ref[i]
                self.actual_velocity[i] = ref_vel[i]

    def stream_info(self) -> protocol.StreamInfo:
        st = self.core.stream_status()
        return protocol.StreamInfo(
            stream_id=st.stream_id, state=_STREAM_STATES[self.core.stream_state],
            stop_cause=protocol.stop_cause_code(st.stop_cause),
            inhibit_cause=protocol.inhibit_cause_bits(self.core.inhibit_cause),
            executed_us=int(round(st.executed_time * 1e6)), buffered_until_us=int(round(st.buffered_until * 1e6)),
            free_slots=st.free_slots, underruns=st.underruns)

    def status(self) -> protocol.Status:
        flags = 0
        if self.enabled:
            flags |= StatusFlag.ENABLED
        if self.inhibited:
            flags |= StatusFlag.INHIBITED
        if self.estop:
            flags |= StatusFlag.ESTOP
        if self.moving:
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
            positions=tuple(int(round(p)) for p in self.actual),       # encoder quantisation
            velocities=tuple(int(round(v)) for v in self.actual_velocity),
            stream=self.stream_info())

    def snapshot(self) -> dict:
        """The true state for the control channel (JSON-serialisable)."""
        st = self.core.stream_status()
        return {
            'time': self.time, 'enabled': self.enabled, 'stopping_to_off': self.stopping_to_off,
            'inhibited': self.inhibited, 'inhibit_cause': self.core.inhibit_cause, 'estop': self.estop,
            'estop_input': self.estop_input, 'faults': list(protocol.fault_names(self.faults)),
            'fault_axes': sorted(int(i) for i in self.core.fault_axes),
            'positions': list(self.actual), 'velocities': list(self.actual_velocity),
            'targets': self.core.target.tolist(), 'stalled': list(self.stalled),
            'moving': self.moving, 'mode': self.core.mode, 'trigger': self.trigger,
            'trigger_edges': self.trigger_edges, 'handshake_done': self.handshake_done,
            'rx_frames': self.rx_frames, 'rx_crc_errors': self.rx_crc_errors, 'rx_seq_gaps': self.rx_seq_gaps,
            'rx_timeouts': self.decoder.timeouts, 'duplicates': self.duplicates, 'replays': self.replays,
            'watchdog_trips': self.watchdog_trips, 'executed': dict(self.executed),
            'trigger_inputs': dict(self.core.trigger_inputs),
            'trigger_port': {'armed': self.core.trigger_port_armed, 'silent': self.core.trigger_port_silent,
                             'timeouts': self.core.trigger_port_timeouts,
                             'handshake_done': self.trigger_port.handshake_done,
                             'rx_frames': self.trigger_port.rx_frames, 'executed': dict(self.trigger_port.executed)},
            'stream': {'stream_id': st.stream_id, 'state': self.core.stream_state, 'active': st.active,
                       'done': st.done, 'executed_time': st.executed_time, 'buffered_until': st.buffered_until,
                       'free_slots': st.free_slots, 'stop_cause': st.stop_cause},
            'underruns': self.core.underruns, 'last_stop_cause': self.core.last_stop_cause,
            'ramp_started_tick': self.core.ramp_started_tick, 'ticks': self.core.ticks,
        }


class EmulatorServer:
    """Pty + control socket + servo loop (>= 1 kHz) around a :class:`Firmware`."""

    CORRUPT_MODES = ('bitflip', 'garbage', 'length', 'truncate')

    def __init__(self, make_firmware, control_path: Optional[str] = None, tick_hz: float = DEFAULT_TICK_HZ,
                 log=None):
        """``make_firmware()`` builds a fresh :class:`Firmware` (at start and on ``power_cycle``)."""
        if tick_hz < 1000:
            raise ValueError(f'the servo loop must run at >= 1000 Hz, got {tick_hz}')
        self.make_firmware = make_firmware
        # The parent whose death ends the emulator, read before the PTY line lets it go on: a parent that exits
        # at once may be gone before the servo loop starts, which would then watch its adopter for ever.
        self.parent_pid = os.getppid()
        self.fw = make_firmware()
        self.tick = 1.0 / tick_hz
        self.control_path = control_path
        self.log = log or sys.stderr
        self.master = self.slave = -1
        self.pty_path = ''
        self._tx = bytearray()
        # The trigger port (docs/serial_protocol.md §9): a second pty, served by the same line thread.
        self.trigger_master = self.trigger_slave = -1
        self.trigger_pty_path = ''
        self._trigger_tx = bytearray()
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
        # Timing evidence for bench/controller_timing.py (host monotonic clock, shared by processes).
        self.tick_lateness: Deque[float] = collections.deque(maxlen=60000)
        self.trigger_edge_wall: Optional[float] = None
        self.ramp_start_wall: Optional[float] = None
        self._ramp_seen: Optional[int] = None
        self._lock = threading.Lock()          # the firmware state, shared by the servo and line threads
        self._host_seen = False

    # ------------------------------------------------------------------ setup / teardown
    def open(self) -> str:
        # Keep our slave fds open: the ptys stay valid while hosts open/close the ports.
        self.master, self.slave, self.pty_path = open_raw_pty()
        self.trigger_master, self.trigger_slave, self.trigger_pty_path = open_raw_pty()
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
        for fd in (self.trigger_master, self.trigger_slave):
            if fd >= 0:
                os.close(fd)
        self.trigger_master = self.trigger_slave = -1
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
        """Serve until stopped: the servo loop in this thread, the line and the control channel
        in a second one.

        Two threads, as a controller has a servo timer and a UART interrupt: the tty layer can
        hold a reader or writer of the pty for milliseconds (its buffer work runs in a normal
        kernel worker), which must not delay servo ticks. The firmware state is shared under
        one lock, held for microseconds. Python's default GIL switch interval is kept: the line
        thread releases the GIL whenever it waits on the pty, and a shorter interval makes the
        two threads convoy on the GIL when the machine is loaded.
        """
        io_thread = threading.Thread(target=self._io_loop, name='emulator-line', daemon=True)
        io_thread.start()
        try:
            return self._servo_loop()
        finally:
            self._stop = True
            io_thread.join(timeout=2.0)

    def _servo_loop(self) -> int:
        next_tick = time.monotonic()
        next_parent_check = next_tick
        max_catch_up = 100                     # ticks; beyond that we were starved: skip ahead
        while not self._stop:
            now = time.monotonic()
            if now < next_tick:
                time.sleep(next_tick - now)
                continue
            due = int((now - next_tick) / self.tick) + 1
            if due > max_catch_up:
                # Starved for longer than we are willing to replay: drop the excess
                # time (it never reaches the watchdog clock either) and go on.
                self.overruns += 1
                due = max_catch_up
                next_tick = now - (due - 1) * self.tick
            with self._lock:
                # Frames that arrived while this thread was not running count as received in
                # time for the watchdog (no false trip after the process was descheduled).
                seen, self._host_seen = self._host_seen, False
                for k in range(due):
                    self.tick_lateness.append(now - (next_tick + k * self.tick))
                    self.fw.step(host_seen=seen)
                    ramp = self.fw.core.ramp_started_tick
                    if ramp is not None and ramp != self._ramp_seen:
                        # The first servo tick of a new stop ramp has run.
                        self._ramp_seen = ramp
                        self.ramp_start_wall = time.monotonic()
            next_tick += due * self.tick
            if now >= next_parent_check:
                next_parent_check = now + 0.1
                if os.getppid() != self.parent_pid:
                    print('emulator: parent process died, exiting', file=self.log, flush=True)
                    break
        return 0

    def _io_loop(self) -> None:
        while not self._stop:
            rlist = list(self._clients)
            if self.master >= 0:
                rlist.append(self.master)
            if self.trigger_master >= 0:
                rlist.append(self.trigger_master)
            if self._listener is not None:
                rlist.append(self._listener)
            wlist = [self.master] if self._tx and self.master >= 0 else []
            try:
                readable, writable, _ = select.select(rlist, wlist, [], 0.1)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                continue                       # an fd closed under us (unplug): rebuild the lists
            if self.master in writable:
                self._flush_tx()
            for src in readable:
                if src is self._listener:
                    self._accept()
                elif src == self.master:
                    frames = self._read_frames()
                    with self._lock:
                        if frames:
                            self._host_seen = True
                        replies = self.fw.respond(frames)   # also a NAK(CRC) the decoder queued
                    for reply in replies:
                        self._transmit(reply)
                elif src == self.trigger_master:
                    self._serve_trigger_port()
                elif isinstance(src, socket.socket):
                    self._read_control(src)

    def _read_frames(self) -> List[protocol.Frame]:
        """Decode whatever the host has sent (non-blocking); [] when nothing or silenced."""
        if self.master < 0:
            return []
        data = read_pty(self.master)
        if self.silenced or not data:
            return []
        with self._lock:
            return self.fw.decode(data)

    def _read_trigger_frames(self) -> List[protocol.Frame]:
        """Decode what the relay sent on the trigger port (non-blocking)."""
        data = read_pty(self.trigger_master)
        if not data:
            return []
        with self._lock:
            return self.fw.trigger_port.decode(data)

    def _serve_trigger_port(self) -> None:
        frames = self._read_trigger_frames()
        with self._lock:
            replies = self.fw.trigger_port.respond(frames)
        send_replies(self.trigger_master, self._trigger_tx, replies)

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
                with self._lock:
                    result = self.control(line.decode('utf-8', 'replace'))
                reply = 'ok' + ((' ' + result) if result else '')
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
            snap.update(pty=self.pty_path, trigger_pty=self.trigger_pty_path, silenced=self.silenced,
                        unplugged=self.unplugged,
                        tx_frames=self.tx_frames, tx_corrupted=self.tx_corrupted, overruns=self.overruns,
                        trigger_edge_wall=self.trigger_edge_wall, ramp_start_wall=self.ramp_start_wall)
            return json.dumps(snap)
        if cmd == 'timing' and args in ([], ['reset']):
            late = sorted(self.tick_lateness)

            def pick(q):
                return late[min(len(late) - 1, int(q * len(late)))] * 1e3 if late else None
            out = {'ticks': len(late), 'lateness_p50_ms': pick(0.5), 'lateness_p99_ms': pick(0.99),
                   'lateness_max_ms': late[-1] * 1e3 if late else None, 'overruns': self.overruns,
                   'period_ms': self.tick * 1e3}
            if args:
                self.tick_lateness.clear()
                self.overruns = 0
            return json.dumps(out)
        if cmd == 'trigger' and len(args) == 1 and args[0] in ('0', '1'):
            if args[0] == '1' and not self.fw.trigger:
                self.trigger_edge_wall = time.monotonic()
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
            self.fw.stalled[self._axis_index(args[0])] = cmd == 'stall_axis'
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
            self._trigger_tx.clear()
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
    parser.add_argument('--tick-hz', type=float, default=PROCESS_TICK_HZ,
                        help='servo loop rate, Hz (>= 1000; default %(default)s)')
    parser.add_argument('--no-robot-model', action='store_true',
                        help='use the limits of docs/contracts.md instead of loading the URDF')
    parser.add_argument('--device-name', default=DEVICE_NAME)
    parser.add_argument('--rt-priority', type=int, default=0, metavar='N',
                        help='run the servo loop under SCHED_FIFO priority N (1..99), as the dedicated '
                             'microcontroller it stands in for is never starved by the host\'s load; 0 (default) '
                             '= normal scheduling. Falls back to normal scheduling (with a note) when not permitted')
    parser.add_argument('--link', metavar='PATH',
                        help='also make PATH a symlink to the pty (a fixed port name for launch files); '
                             'removed on exit')
    parser.add_argument('--trigger-link', metavar='PATH',
                        help='the same for the trigger port\'s pty (docs/serial_protocol.md §9)')
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
            return Firmware(axes, args.firmware_version, args.protocol_version, args.watchdog_ms, args.device_name,
                            tick_hz=args.tick_hz)
        server = EmulatorServer(make_firmware, args.control, args.tick_hz)
        firmware = server.fw
    except ValueError as exc:
        print(f'emulator: {exc}', file=sys.stderr)
        return 2
    if args.rt_priority:
        try:
            if not 1 <= args.rt_priority <= 99:
                raise ValueError(f'--rt-priority must be 1..99, got {args.rt_priority}')
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))
        except (OSError, AttributeError, ValueError) as exc:
            print(f'emulator: real-time priority not applied ({exc}); normal scheduling', file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    try:
        path = server.open()
        for link, target in ((args.link, path), (args.trigger_link, server.trigger_pty_path)):
            if link:
                if os.path.islink(link):
                    os.unlink(link)   # a stale link from an emulator that was killed
                os.symlink(target, link)
        print(f'PTY {path}', flush=True)
        print(f'TRIGGER_PTY {server.trigger_pty_path}', flush=True)
        print(f'emulator: firmware {".".join(map(str, firmware.firmware_version))}, protocol '
              f'{".".join(map(str, firmware.protocol_version))}, axes from {source}, watchdog '
              f'{args.watchdog_ms} ms, control {args.control or "-"}', file=sys.stderr, flush=True)
        return server.run()
    finally:
        links = ((args.link, server.pty_path), (args.trigger_link, server.trigger_pty_path))
        server.close()
        for link, target in links:
            if link and os.path.islink(link) and os.readlink(link) == target:
                os.unlink(link)


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
        self.trigger_pty_path = ''         # the trigger port (docs/serial_protocol.md §9)
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
        self.trigger_pty_path = self.state()['trigger_pty']
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
