"""SerialHardware: the motor controller over a serial port (pyserial).

Implements :class:`igt_robot.hardware.interface.HardwareInterface` on top of
the binary protocol in :mod:`.protocol` (spec: ``docs/serial_protocol.md``).
Works the same against the real controller and against the firmware emulator
on a pseudo-terminal (:mod:`.emulator`).

Link discipline:

* One request is outstanding at a time; a lock around each transaction makes
  the driver safe to call from a control loop and a heartbeat timer at once.
* Every request carries a sequence number; the reply echoes it. Replies with
  another number are stale (late duplicates) and dropped (counted).
* No reply within ``timeout`` seconds, a NAK(CRC/BUSY), or a corrupted reply ->
  the *same* frame is retransmitted, up to ``retries`` more times. The
  controller recognises a retransmitted command and answers from its reply
  cache instead of executing it twice.
* A vanished port (unplugged USB adapter, closed pty) puts the driver into its
  safe state: every later call raises :class:`HardwareError` naming the cause
  until ``close()`` + ``connect()``. It never silently carries on.
* The port is held exclusively: an ``flock`` (keeps out every cooperating
  opener, e.g. a second driver) plus the kernel's TIOCEXCL (refuses any further
  ``open()`` of the tty by an unprivileged process). A second opener fails
  with a clear error instead of interleaving frames with ours.
* Trajectory streaming (protocol 2): :meth:`begin_stream`, :meth:`push_points`
  (split into PUSH_POINTS frames of up to 5 points), :meth:`stream_status`.

Units: SI on the interface (m, rad, s); encoder counts only on the wire, with
the conversion owned by :class:`.axis_model.AxisConfig`. Linux/POSIX only (the
reply wait uses ``select`` on the port's file descriptor).
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import math
import select
import termios
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import serial

from igt_robot.hardware import protocol
from igt_robot.hardware.axis_model import JOINT_NAMES, AxisConfig
from igt_robot.hardware import interface
from igt_robot.hardware.interface import (HardwareError, HardwareInterface, HardwareState, HardwareTimeout,
                                          PvtPoint, StreamStatus)
from igt_robot.hardware.protocol import MsgType, NakReason

#: Firmware major versions this driver has been validated against.
SUPPORTED_FIRMWARE_MAJORS = (2,)

_COUNTER_NAMES = ('transactions', 'timeouts', 'naks', 'retries', 'reconnects', 'stale_frames',
                  'crc_errors', 'header_errors', 'resyncs', 'discarded_bytes', 'rx_timeouts')

_STREAM_STATES_ACTIVE = (protocol.StreamState.RUNNING, protocol.StreamState.RAMPING)


class IncompatibleFirmware(HardwareError):
    """The controller's protocol or firmware major version is not supported."""


class CommandRefused(interface.CommandRefused):
    """The controller answered NAK. ``code`` is the reason (``'RANGE'``,
    ``'NOT_ENABLED'``, ``'INHIBITED'``, ``'ESTOPPED'``, ``'TRIGGER_ACTIVE'``,
    ``'REPLAY'``, ...) or, for a latched fault, the fault name (``'WATCHDOG'``, ...);
    ``reason`` / ``detail`` are the raw NAK bytes."""

    def __init__(self, code: str, message: str, reason: int, detail: int):
        super().__init__(code, message)
        self.reason = reason
        self.detail = detail


class SetpointRejected(HardwareError, ValueError):
    """The driver refused a setpoint before sending it (out of range, wrong shape, not finite)."""


class SerialLink:
    """One serial port of the motor controller, host side: exclusive open, the HELLO handshake and the
    request/reply discipline of the module docstring. :class:`SerialHardware` drives the main port with
    it, :class:`TriggerLink` the trigger port (docs/serial_protocol.md §9).

    :param port: serial device path.
    :param baudrate: line rate in bit/s (ignored by ptys).
    :param timeout: seconds to wait for each reply before retransmitting.
    :param retries: retransmissions after the first attempt.
    """

    axes: Sequence[AxisConfig] = ()      # the main port reads them from the controller (SerialHardware)

    def __init__(self, port: str, baudrate: int = 1_000_000, timeout: float = 0.05, retries: int = 2):
        if not port:
            raise ValueError('serial port path must be a non-empty string')
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f'timeout must be a positive number of seconds, got {timeout!r}')
        if int(retries) != retries or retries < 0:
            raise ValueError(f'retries must be a non-negative integer, got {retries!r}')
        self.port = port
        self.baudrate = int(baudrate)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.firmware_version = ''
        self.protocol_version: Tuple[int, int] = (0, 0)
        self.device_name = ''
        self.watchdog_ms = 0
        self._serial: Optional[serial.Serial] = None
        self._decoder = protocol.FrameDecoder(inter_byte_timeout=protocol.INTER_BYTE_TIMEOUT)
        self._lock = threading.RLock()
        self._seq = 0
        self._fault_reason: Optional[str] = None
        self._ever_connected = False
        self._counters: Dict[str, int] = {k: 0 for k in _COUNTER_NAMES}
        # Longest wait from a request's write to its reply, s: what the reply timeout has to cover (docs/safety.md).
        self._reply_time_max = 0.0

    # ------------------------------------------------------------------ properties
    @property
    def connected(self) -> bool:
        return self._serial is not None and self._fault_reason is None

    @property
    def faulted(self) -> bool:
        """True after a link failure put the driver into its safe state."""
        return self._fault_reason is not None

    @property
    def fault_reason(self) -> Optional[str]:
        return self._fault_reason

    @property
    def counters(self) -> Dict[str, float]:
        """Link diagnostics: transactions, timeouts, naks, retries, reconnects,
        stale_frames, crc_errors, header_errors, resyncs, discarded_bytes, rx_timeouts (counts), and
        reply_time_max_s (the longest wait for a reply so far, s)."""
        with self._lock:
            out: Dict[str, float] = dict(self._counters)
            out['reply_time_max_s'] = round(self._reply_time_max, 6)
            d = self._decoder
            out.update(crc_errors=d.crc_errors, header_errors=d.header_errors, resyncs=d.resyncs,
                       discarded_bytes=d.discarded_bytes, rx_timeouts=d.timeouts)
            return out

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Open the port, check protocol/firmware versions and axis configuration. Idempotent."""
        with self._lock:
            if self.connected:
                return
            self._close_port()
            self._serial = self._open_exclusive()
            self._fault_reason = None
            if self._ever_connected:
                self._counters['reconnects'] += 1
            try:
                self._serial.reset_input_buffer()      # whatever the controller sent before we listened
                self._decoder.reset()
                self._handshake()
                self._after_handshake()
            except BaseException:
                self._close_port()
                raise
            self._ever_connected = True

    def _open_exclusive(self) -> serial.Serial:
        """Open the port so that no second process can use it (a second opener would
        interleave its frames with ours: issue "safety authority", serial)."""
        try:
            port = serial.Serial(self.port, self.baudrate, timeout=self.timeout, exclusive=False)
        except (serial.SerialException, OSError, ValueError) as exc:
            busy = getattr(exc, 'errno', None) == errno.EBUSY or 'busy' in str(exc).lower()
            why = ('it is held exclusively by another process (TIOCEXCL)' if busy else str(exc))
            raise HardwareError(f'cannot open serial port {self.port!r}: {why}') from exc
        fd = port.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            port.close()
            raise HardwareError(f'cannot open serial port {self.port!r}: it is in use by another process '
                                f'(flock held); only one driver may own the controller link') from exc
        try:
            # The kernel then refuses any further open() of this tty (EBUSY), flock or not;
            # processes with CAP_SYS_ADMIN are exempt (docs/serial_protocol.md §2.2).
            fcntl.ioctl(fd, termios.TIOCEXCL)
        except OSError as exc:
            port.close()
            raise HardwareError(f'cannot make serial port {self.port!r} exclusive (TIOCEXCL): {exc}') from exc
        return port

    def _handshake(self) -> None:
        reply = self._transact_locked(MsgType.HELLO, protocol.encode_hello(protocol.PROTOCOL_VERSION))
        hello = self._decode(protocol.decode_hello_reply, reply, 'HELLO_REPLY')
        proto = '.'.join(map(str, hello.protocol_version))
        fw = hello.firmware_version_str
        if hello.protocol_version[0] != protocol.PROTOCOL_VERSION[0]:
            raise IncompatibleFirmware(
                f'controller on {self.port} speaks protocol {proto} (firmware {fw}), this driver speaks '
                f'protocol {protocol.PROTOCOL_VERSION[0]}.x: incompatible major version, refusing to drive it; '
                f'flash a firmware with protocol {protocol.PROTOCOL_VERSION[0]}.x or update igt_robot')
        if hello.firmware_version[0] not in SUPPORTED_FIRMWARE_MAJORS:
            raise IncompatibleFirmware(
                f'controller on {self.port} runs firmware {fw}, major version {hello.firmware_version[0]} is not '
                f'supported by this driver (supported majors: {", ".join(map(str, SUPPORTED_FIRMWARE_MAJORS))}); '
                f'refusing to drive it')
        self._check_hello(hello)
        self.firmware_version, self.protocol_version = fw, hello.protocol_version
        self.device_name, self.watchdog_ms = hello.device_name, hello.watchdog_ms

    def _check_hello(self, hello: protocol.HelloReply) -> None:
        """What else this port's user requires of the controller (raise IncompatibleFirmware)."""

    def _after_handshake(self) -> None:
        """Further set-up once the handshake succeeded (with the lock held)."""

    def _before_close(self) -> None:
        """Last words on a working link before it is released (with the lock held)."""

    def close(self) -> None:
        """Say goodbye if the link still works (the main port: STOP, best effort), then release the port.
        Idempotent."""
        with self._lock:
            if self.connected:
                self._before_close()
            self._close_port()
            self._fault_reason = None

    def _close_port(self) -> None:
        if self._serial is not None:
            try:
                # A pty stays allocated while the controller side is open: clear the exclusive
                # flag, or our own reconnect would be refused.
                fcntl.ioctl(self._serial.fileno(), termios.TIOCNXCL)
            except (OSError, ValueError, serial.SerialException):
                pass
            try:
                self._serial.close()
            except (serial.SerialException, OSError):
                pass
            self._serial = None

    # ------------------------------------------------------------------ transactions
    def transact(self, msg_type: int, payload: bytes = b'') -> protocol.Frame:
        """Send one request, return its (non-NAK) reply frame.

        Low-level access for diagnostics and tests: no driver-side checks are
        applied to ``payload``. Raises :class:`CommandRefused` on NAK,
        :class:`HardwareTimeout` when no valid reply arrives, HardwareError when
        the port is lost.
        """
        with self._lock:
            return self._transact_locked(msg_type, payload)

    def _transact_locked(self, msg_type: int, payload: bytes = b'') -> protocol.Frame:
        if self._fault_reason is not None:
            raise HardwareError(f'driver for {self.port} is in its safe state after: {self._fault_reason}; '
                                f'call close() and connect() again')
        if self._serial is None:
            raise HardwareError(f'serial port {self.port} is not connected; call connect() first')
        name = protocol.type_name(msg_type)
        seq = self._seq
        self._seq = (seq + 1) & 0xFF
        frame = protocol.encode_frame(msg_type, seq, payload)
        expected = protocol.REPLY_TYPE.get(msg_type, MsgType.ACK)
        self._counters['transactions'] += 1
        self._drain_stale(name)
        failures = []
        for attempt in range(self.retries + 1):
            if attempt:
                self._counters['retries'] += 1
            self._write(frame, name)
            outcome, reply = self._await_reply(seq, msg_type, expected, name)
            if reply is None:
                failures.append(outcome)
                continue
            if reply.type == MsgType.NAK:
                nak = self._decode(protocol.decode_nak, reply, 'NAK')
                self._counters['naks'] += 1
                if nak.reason in protocol.TRANSIENT_NAKS:
                    failures.append(f'NAK {nak.reason_name}')
                    continue
                raise self._refusal(msg_type, nak)
            return reply
        raise HardwareTimeout(
            f'no valid reply to {name} (seq {seq}) from the controller on {self.port} after '
            f'{self.retries + 1} attempts ({", ".join(failures)}; {self.timeout * 1e3:.0f} ms each)')

    def _write(self, frame: bytes, name: str) -> None:
        try:
            self._serial.write(frame)
        except (serial.SerialException, OSError) as exc:
            raise self._port_lost(f'sending {name}', exc) from exc

    def _read_available(self, wait: float, name: str) -> bytes:
        """Bytes available within ``wait`` seconds (possibly none)."""
        try:
            ready, _, _ = select.select([self._serial.fileno()], [], [], max(0.0, wait))
            if not ready:
                return b''
            # A closed peer shows as "readable" with no data: pyserial raises for that.
            return self._serial.read(self._serial.in_waiting or 1)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise self._port_lost(f'waiting for the reply to {name}', exc) from exc

    def _drain_stale(self, name: str) -> None:
        """Consume bytes that arrived unasked (late duplicate replies) before a new request."""
        data = self._read_available(0.0, name)
        while data:
            self._counters['stale_frames'] += len(self._decoder.feed(data, now=time.monotonic()))
            data = self._read_available(0.0, name)

    def _await_reply(self, seq: int, msg_type: int, expected: int, name: str):
        """-> ('reply', frame) | ('timeout', None) | ('corrupted reply', None)."""
        sent = time.monotonic()
        deadline = sent + self.timeout
        d = self._decoder
        damaged_before = d.crc_errors + d.header_errors
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._counters['timeouts'] += 1
                return 'timeout', None
            data = self._read_available(remaining, name)
            if not data:
                continue
            match = None
            for frame in d.feed(data, now=time.monotonic()):
                if match is None and frame.seq == seq and self._answers(frame, msg_type, expected):
                    match = frame
                else:
                    self._counters['stale_frames'] += 1
            if match is not None:
                self._reply_time_max = max(self._reply_time_max, time.monotonic() - sent)
                return 'reply', match
            if d.crc_errors + d.header_errors > damaged_before:
                # Our reply was probably the damaged frame: retransmit now rather than
                # wait out the timeout (a duplicate reply would just be dropped as stale).
                return 'corrupted reply', None

    @staticmethod
    def _answers(frame: protocol.Frame, msg_type: int, expected: int) -> bool:
        if frame.type == MsgType.NAK:
            return len(frame.payload) == 3 and frame.payload[0] == msg_type
        if frame.type != expected:
            return False
        if frame.type == MsgType.ACK:
            return frame.payload == bytes((msg_type,))
        return True

    def _port_lost(self, action: str, exc: BaseException) -> HardwareError:
        self._fault_reason = f'port lost: {self.port} failed while {action} ({exc})'
        self._close_port()
        return HardwareError(f'{self._fault_reason}; the driver is now in its safe state '
                             f'(no further commands) until close() and connect()')

    def _decode(self, decoder, frame: protocol.Frame, what: str):
        try:
            return decoder(frame.payload)
        except protocol.ProtocolError as exc:
            raise HardwareError(f'malformed {what} from the controller on {self.port}: {exc} '
                                f'(protocol mismatch?)') from exc

    def _refusal(self, msg_type: int, nak: protocol.Nak) -> CommandRefused:
        what = protocol.type_name(msg_type)
        code = nak.reason_name
        axis = self.axes[nak.detail] if nak.detail < len(self.axes) else None
        if nak.reason == NakReason.RANGE and axis is not None:
            why = (f'target for {axis.name} is outside the controller limits '
                   f'[{axis.lower:.6g}, {axis.upper:.6g}] {axis.unit}')
        elif nak.reason == NakReason.FAULTED:
            code = protocol.fault_names(1 << nak.detail)[0] if nak.detail < 16 else 'FAULTED'
            why = f'fault {code} is latched; clear the cause, then reset_faults()'
        else:
            why = {
                NakReason.NOT_ENABLED: 'the axes are not enabled (enable() first)',
                NakReason.INHIBITED: 'motion inhibit is active',
                NakReason.ESTOPPED: 'e-stop is latched; release it, then reset_faults()',
                NakReason.HANDSHAKE_REQUIRED: 'no valid HELLO handshake on this link (reconnect)',
                NakReason.UNKNOWN_TYPE: 'the controller does not know this command (firmware too old?)',
                NakReason.BAD_LENGTH: 'payload length is wrong for this command (protocol mismatch?)',
                NakReason.BAD_VALUE: 'a field has an invalid value' + (f' ({axis.name})' if axis else ''),
                NakReason.TRIGGER_ACTIVE: 'the scanner-trigger input says imaging; the inhibit stays until it falls',
                NakReason.STREAM_ACTIVE: 'a trajectory stream is executing (stop it or wait for its end)',
                NakReason.STREAM_CLOSED: 'the stream has ended or is not the current one (stop cause in STATUS)',
                NakReason.BUFFER_FULL: 'the trajectory buffer is full or the points lie beyond its look-ahead',
                NakReason.TIME_ORDER: 'point times must increase strictly and lie after the executed time',
                NakReason.START_MISMATCH: 'the stream does not start where the axes are'
                                          + (f' ({axis.name})' if axis else ''),
                NakReason.MOVING: 'the axes are moving; stop them before starting a stream',
                NakReason.REPLAY: 'the sequence number is not ahead of the last accepted request (replay)',
                NakReason.WRONG_PORT: 'this port does not take this request (main port vs trigger port)',
            }.get(nak.reason, f'reason code 0x{nak.reason:02X}')
        return CommandRefused(code, f'controller on {self.port} refused {what}: {why}', nak.reason, nak.detail)


class SerialHardware(SerialLink, HardwareInterface):
    """The motor controller on ``port`` (e.g. ``/dev/ttyUSB0`` or an emulator pty), its main port.

    :param port: serial device path.
    :param baudrate: line rate in bit/s (ignored by ptys).
    :param timeout: seconds to wait for each reply before retransmitting.
    :param counts_per_unit: expected encoder counts per m / per rad for each
        joint; when given, connect() refuses a controller reporting otherwise.
        None: take the controller's values.
    :param retries: retransmissions after the first attempt.
    :param joint_names: joint order on the controller (default: the contract order).
    :param lower, upper: optional host-side joint limits (m / rad); the driver
        enforces the intersection with the controller's own limits.
    """

    joint_names = JOINT_NAMES

    def __init__(self, port: str, baudrate: int = 1_000_000, timeout: float = 0.05,
                 counts_per_unit: Optional[Sequence[float]] = None, retries: int = 2, *,
                 joint_names: Optional[Sequence[str]] = None,
                 lower: Optional[Sequence[float]] = None, upper: Optional[Sequence[float]] = None):
        super().__init__(port, baudrate, timeout, retries)
        self.joint_names = tuple(joint_names) if joint_names is not None else JOINT_NAMES
        n = len(self.joint_names)
        for what, values in (('counts_per_unit', counts_per_unit), ('lower', lower), ('upper', upper)):
            if values is not None and len(values) != n:
                raise ValueError(f'{what} needs {n} values ({", ".join(self.joint_names)}), got {len(values)}')
        if counts_per_unit is not None and not all(math.isfinite(c) and c > 0 for c in counts_per_unit):
            raise ValueError(f'counts_per_unit must be positive and finite, got {list(counts_per_unit)}')
        self.expected_counts_per_unit = None if counts_per_unit is None else [float(c) for c in counts_per_unit]
        self.host_lower = None if lower is None else [float(v) for v in lower]
        self.host_upper = None if upper is None else [float(v) for v in upper]
        self.axes: List[AxisConfig] = []
        self.fault_axes: Tuple[str, ...] = ()        # joints named by the last STATUS fault mask

    def _check_hello(self, hello: protocol.HelloReply) -> None:
        if hello.n_axes != len(self.joint_names):
            raise IncompatibleFirmware(
                f'controller on {self.port} has {hello.n_axes} axes, the driver is configured for '
                f'{len(self.joint_names)} ({", ".join(self.joint_names)})')

    def _after_handshake(self) -> None:
        self._load_axis_config()

    def _before_close(self) -> None:
        try:
            self._transact_locked(MsgType.STOP)
        except HardwareError:
            pass                          # closing anyway; the controller's watchdog stops it

    def _load_axis_config(self) -> None:
        reply = self._transact_locked(MsgType.GET_AXIS_CONFIG)
        infos = self._decode(protocol.decode_axis_config, reply, 'AXIS_CONFIG')
        if len(infos) != len(self.joint_names):
            raise HardwareError(f'controller on {self.port} reports {len(infos)} axes in AXIS_CONFIG, '
                                f'expected {len(self.joint_names)}')
        axes = []
        for i, (name, info) in enumerate(zip(self.joint_names, infos)):
            try:
                axis = AxisConfig.from_axis_info(name, info)
            except ValueError as exc:
                raise HardwareError(f'controller on {self.port}: invalid configuration for {name}: {exc}') from exc
            if self.expected_counts_per_unit is not None:
                expected = self.expected_counts_per_unit[i]
                if abs(axis.counts_per_unit - expected) > 1e-9 * expected:
                    raise HardwareError(
                        f'encoder resolution mismatch on {name}: the host is configured for {expected:g} '
                        f'counts/{axis.unit}, the controller on {self.port} reports {axis.counts_per_unit:g}')
            lower = axis.lower if self.host_lower is None else max(axis.lower, self.host_lower[i])
            upper = axis.upper if self.host_upper is None else min(axis.upper, self.host_upper[i])
            if not lower < upper:
                raise HardwareError(f'{name}: host limits [{self.host_lower and self.host_lower[i]}, '
                                    f'{self.host_upper and self.host_upper[i]}] {axis.unit} do not overlap the '
                                    f'controller limits [{axis.lower}, {axis.upper}] {axis.unit}')
            axes.append(dataclasses.replace(axis, lower=lower, upper=upper))
        self.axes = axes

    # ------------------------------------------------------------------ HardwareInterface
    def enable(self) -> None:
        self.transact(MsgType.ENABLE)

    def disable(self) -> None:
        """Controlled stop, then de-energise; returns once the controller reports the axes off."""
        self.transact(MsgType.DISABLE)
        # Worst case: every axis decelerating from full speed, plus link slack.
        deadline = time.monotonic() + max(a.max_velocity / a.max_acceleration for a in self.axes) + 1.0
        while self.read().enabled:
            if time.monotonic() > deadline:
                raise HardwareError(f'controller on {self.port} still reports the axes energised after DISABLE')
            time.sleep(0.005)   # poll period

    def read(self) -> HardwareState:
        """GET_STATUS -> positions (m / rad, encoder-quantised), velocities, flags, faults."""
        reply = self.transact(MsgType.GET_STATUS)
        stamp = time.monotonic()
        st = self._decode(protocol.decode_status, reply, 'STATUS')
        if len(st.positions) != len(self.axes):
            raise HardwareError(f'STATUS from {self.port} has {len(st.positions)} axes, expected {len(self.axes)}')
        self.fault_axes = tuple(a.name for i, a in enumerate(self.axes) if st.fault_axes & (1 << i))
        counters = self.counters
        counters.update(fw_rx_crc_errors=st.rx_crc_errors, fw_rx_seq_gaps=st.rx_seq_gaps,
                        scanner_trigger_edges=st.trigger_edges, fw_uptime_ms=st.uptime_ms,
                        underruns=st.stream.underruns)
        flag = protocol.StatusFlag
        return HardwareState(
            stamp=stamp,
            positions=np.array([a.from_counts(c) for a, c in zip(self.axes, st.positions)]),
            velocities=np.array([a.from_counts(v) for a, v in zip(self.axes, st.velocities)]),
            enabled=st.has(flag.ENABLED), motion_inhibited=st.has(flag.INHIBITED), estopped=st.has(flag.ESTOP),
            moving=st.has(flag.MOVING), faults=protocol.fault_names(st.faults),
            scanner_trigger=st.has(flag.SCANNER_TRIGGER), firmware_version=self.firmware_version,
            counters=counters, inhibit_cause=st.stream.inhibit_cause_name,
            stream=self._stream_status(st.stream))

    def write(self, positions: Sequence[float], velocities: Optional[Sequence[float]] = None,
              velocity_limits: Optional[Sequence[float]] = None) -> None:
        """Command target positions (m / rad).

        :param velocities: optional feed-forward velocities (m/s, rad/s), clipped
            to each axis' maximum (for streamed trajectories).
        :param velocity_limits: optional per-axis speed caps for this move
            (positive, at most the axis maximum; default the axis maximum).
        :raises SetpointRejected: before sending, when a target is outside the
            limits (message names the joint and by how much) or not finite.
        :raises CommandRefused: when the controller NAKs (not enabled,
            inhibited, e-stopped, faulted, out of its range).
        """
        axes = self._require_axes()
        counts = self._counts(positions, 'setpoint')
        vff = [0] * len(axes)
        if velocities is not None:
            vel = self._vector(velocities, 'velocities')
            vff = [axis.velocity_to_counts(max(-axis.max_velocity, min(axis.max_velocity, v)))
                   for axis, v in zip(axes, vel)]
        vlim = [0] * len(axes)                             # 0 = the axis maximum
        if velocity_limits is not None:
            lim = self._vector(velocity_limits, 'velocity_limits')
            for axis, v in zip(axes, lim):
                if not 0 < v <= axis.max_velocity * (1 + 1e-9):
                    raise SetpointRejected(f'{axis.name} velocity limit {v:.6g} {axis.unit}/s must be in '
                                           f'(0, {axis.max_velocity:.6g}] -- nothing was sent')
            vlim = [max(1, axis.velocity_to_counts(min(v, axis.max_velocity))) for axis, v in zip(axes, lim)]
        self.transact(MsgType.SET_TARGET, protocol.encode_set_target(protocol.SetTarget(
            tuple(counts), tuple(vlim), tuple(vff))))

    def stop(self) -> None:
        """Controlled stop (returns at once; the axes decelerate within their limits, then hold)."""
        self.transact(MsgType.STOP)

    def emergency_stop(self) -> None:
        """Immediate stop, latched until reset_faults()."""
        self.transact(MsgType.ESTOP)

    def set_motion_inhibit(self, inhibit: bool) -> None:
        self.transact(MsgType.MOTION_INHIBIT, protocol.encode_motion_inhibit(bool(inhibit)))

    def reset_faults(self) -> None:
        self.transact(MsgType.RESET_FAULTS)

    def heartbeat(self) -> None:
        """Feed the controller's watchdog (any valid request does; this one costs least)."""
        self.transact(MsgType.HEARTBEAT)

    # ------------------------------------------------------------------ trajectory streaming
    @staticmethod
    def _stream_status(info: protocol.StreamInfo) -> StreamStatus:
        return StreamStatus(
            stream_id=info.stream_id, active=info.state in _STREAM_STATES_ACTIVE,
            done=info.state == protocol.StreamState.DONE, executed_time=info.executed_us * 1e-6,
            buffered_until=info.buffered_until_us * 1e-6, free_slots=info.free_slots, underruns=info.underruns,
            stop_cause=info.stop_cause_name)

    def _counts(self, positions, what: str) -> List[int]:
        """Positions (m / rad) -> counts, refusing (nothing sent) anything beyond the limits."""
        axes = self._require_axes()
        pos = self._vector(positions, what)
        problems, counts = [], []
        for axis, x in zip(axes, pos):
            half_count = 0.5 / axis.counts_per_unit    # rounding slack, not a loosened limit
            for side, excess, limit in (('lower', axis.lower - x, axis.lower), ('upper', x - axis.upper, axis.upper)):
                if excess > half_count:
                    problems.append(f'{axis.name} {what} {x:.6g} {axis.unit} is {excess:.3g} {axis.unit} '
                                    f'({axis.format(excess)}) beyond its {side} limit {limit:.6g} {axis.unit}')
            counts.append(axis.to_counts(min(max(x, axis.lower), axis.upper)))
        if problems:
            raise SetpointRejected('; '.join(problems) + ' -- nothing was sent to the controller')
        return counts

    def begin_stream(self, start_positions: Sequence[float]) -> int:
        """BEGIN_STREAM from ``start_positions`` (m / rad); returns the controller's stream id."""
        counts = self._counts(start_positions, 'stream start')
        reply = self.transact(MsgType.BEGIN_STREAM, protocol.encode_begin_stream(counts))
        return self._decode(protocol.decode_stream_status, reply, 'STREAM_STATUS').stream_id

    def push_points(self, stream_id: int, points: Sequence[PvtPoint], final: bool = False) -> StreamStatus:
        """Send ``points`` in PUSH_POINTS frames of up to 5 points (the last frame carries ``final``).

        Checked before sending (SetpointRejected, nothing sent): positions within the limits,
        velocities within the axis maxima, times strictly increasing once rounded to the wire's
        microseconds. The controller checks the rest (CommandRefused). A batch longer than one
        frame is not atomic: when a later frame is refused, the earlier ones stay buffered (the
        error says how many points were accepted).
        """
        axes = self._require_axes()
        if not points:
            raise SetpointRejected('push_points needs at least one point')
        wire = []
        last_us = -1
        for k, point in enumerate(points):
            t_us = int(round(float(point.time) * 1e6))
            if not (math.isfinite(point.time) and 0 < t_us <= 0xFFFFFFFF) or t_us <= last_us:
                raise SetpointRejected(f'point {k} time {point.time!r} s is not after the previous point '
                                       f'(microsecond resolution) -- nothing was sent')
            last_us = t_us
            counts = self._counts(point.positions, f'point {k} position')
            vel = self._vector(point.velocities, f'point {k} velocities')
            for axis, v in zip(axes, vel):
                if abs(v) > axis.max_velocity * (1 + 1e-9):
                    raise SetpointRejected(f'point {k}: {axis.name} velocity {v:.6g} {axis.unit}/s exceeds '
                                           f'{axis.max_velocity:.6g} {axis.unit}/s -- nothing was sent')
            wire.append(protocol.WirePoint(t_us, tuple(counts),
                                           tuple(axis.velocity_to_counts(v) for axis, v in zip(axes, vel))))
        per_frame = protocol.max_points_per_frame(len(axes))
        status = None
        for start in range(0, len(wire), per_frame):
            chunk = tuple(wire[start:start + per_frame])
            last = start + per_frame >= len(wire)
            payload = protocol.encode_push_points(protocol.PushPoints(int(stream_id), chunk, bool(final) and last))
            try:
                reply = self.transact(MsgType.PUSH_POINTS, payload)
            except CommandRefused as exc:
                if start:
                    exc.args = (f'{exc.args[0]} (the first {start} of {len(wire)} points were accepted)',)
                raise
            status = self._stream_status(self._decode(protocol.decode_stream_status, reply, 'STREAM_STATUS'))
        return status

    def stream_status(self) -> StreamStatus:
        """The controller's trajectory buffer (one GET_STATUS)."""
        return self.read().stream

    # ------------------------------------------------------------------ helpers
    def _require_axes(self) -> List[AxisConfig]:
        if not self.axes or self._serial is None:
            if self._fault_reason is not None:
                raise HardwareError(f'driver for {self.port} is in its safe state after: {self._fault_reason}; '
                                    f'call close() and connect() again')
            raise HardwareError(f'serial port {self.port} is not connected; call connect() first')
        return self.axes

    def _vector(self, values, what: str) -> np.ndarray:
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as exc:
            raise SetpointRejected(f'{what} must be {len(self.joint_names)} numbers: {exc}') from None
        if arr.shape != (len(self.joint_names),):
            raise SetpointRejected(f'{what} must have {len(self.joint_names)} entries '
                                   f'({", ".join(self.joint_names)}), got shape {arr.shape}')
        bad = [n for n, v in zip(self.joint_names, arr) if not math.isfinite(v)]
        if bad:
            raise SetpointRejected(f'{what} not finite for {", ".join(bad)} -- nothing was sent')
        return arr


class TriggerLink(SerialLink):
    """The controller's trigger port (docs/serial_protocol.md §9), host side: the scanner-trigger level
    from a lean process that does nothing else. The port takes HELLO, HEARTBEAT and TRIGGER_LEVEL only;
    once spoken to, its silence for the watchdog period reads as imaging, so the caller sends the level
    at least every ``watchdog_ms / 3``."""

    def set_level(self, imaging: bool) -> None:
        """The scanner says imaging (True: the controller stops and latches its inhibit) or idle."""
        self.transact(MsgType.TRIGGER_LEVEL, protocol.encode_trigger_level(bool(imaging)))
