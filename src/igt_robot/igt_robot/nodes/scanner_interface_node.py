"""scanner_interface: the scanner's acquisition phase on /scanner/state, from one or more sources.

Sources (parameter ``sources``, any combination), each an adapter around a core
interpreter in ``igt_robot.scanner``:

* ``service``   -- /scanner/set_state (SetScannerState), e.g. the operator console.
* ``igtl``      -- OpenIGTLink STATUS/STRING texts (START_SEQUENCE, STOP_SEQUENCE, PREPARE ...)
  from a scanner bridge or 3D Slicer; this node is the server or the client.
* ``trigger``   -- a serial port's modem-status line (CTS/DSR/CD/RI) polled at >= 200 Hz.
* ``simulated`` -- a scripted scan schedule (parameter ``simulated_schedule``).

Fail-safe: a source that has not spoken, lost its link, cannot be read or is
stale reports UNKNOWN, which the supervisor treats as imaging. With several
sources the most restrictive phase wins (ACQUIRING > PREPARING > UNKNOWN > IDLE),
so motion is possible only when every configured source positively says IDLE.

Publishes ScannerState at ``publish_rate_hz`` and at once on every change (the
heartbeat counter increments with each message), a DoseRecord on /scanner/dose
when an ionising acquisition starts *with dose figures from its source* (the
simulated schedule, or /scanner/set_state; running totals from
``record.dose.DoseLedger``), and ProcedureEvents ``scan_started`` / ``scan_ended``
/ ``scanner_unknown`` / ``dose_not_reported``.

A source that only says a CT acquisition runs (igtl, trigger, a set_state without
figures) writes no dose record: that scan's one record comes from its images
(Radiation Dose SR or image headers, procedure node) or from the operator
(``enter_dose``, flagged MANUAL). A zero record here listed every such scan twice.
"""
from __future__ import annotations

import dataclasses
import select
import socket
import threading
import time
from typing import Callable, Dict, Optional

import yaml
from diagnostic_msgs.msg import DiagnosticStatus
from pyigtl import messages as pyigtl_messages
from rclpy.node import Node

from igt_robot.igtl.server import FramingError, IgtlServer, ServerSettings, StreamReader
from igt_robot.record import procedure_id
from igt_robot.record.dose import (MODALITY_CT, SOURCE_MANUAL, SOURCE_SIMULATED, DoseFactors, DoseLedger,
                                   DoseValueError, ScanDose)
from igt_robot.scanner import (MODEM_LINES, ModemTriggerInterpreter, ScannerPhase, SimulatedScannerSchedule,
                               StalenessGuard, phase_from_igtl_status, phase_from_igtl_text)
from igt_robot.safety import operator_session
from igt_robot_msgs.msg import DoseRecord, ProcedureEvent, ScannerState
from igt_robot_msgs.srv import SetScannerState

from . import common, qos, topics
from .params import Param, declare
from .spinning import SteadyPeriodicThread

SOURCES = ('service', 'igtl', 'trigger', 'simulated')
# Combination order: the most restrictive phase wins; UNKNOWN is below PREPARING/ACQUIRING only
# so that a known acquisition is what the operator sees (all three inhibit motion alike).
_RESTRICTIVENESS = {ScannerPhase.IDLE: 0, ScannerPhase.UNKNOWN: 1, ScannerPhase.PREPARING: 2,
                    ScannerPhase.ACQUIRING: 3}
IGTL_TEXT_TYPES = ('STATUS', 'STRING')
IGTL_MAX_TEXT_BODY = 64 * 1024     # bytes; larger STATUS/STRING bodies are refused (and mean UNKNOWN)
IGTL_RECONNECT_S = 0.5
TRIGGER_REOPEN_S = 0.5
# A trigger reading older than this means the poll loop stalled (blocked port, starved thread): UNKNOWN.
# 50 periods at 500 Hz; long enough not to flap when the host is busy, short next to the supervisor's
# scanner timeout.
TRIGGER_STALE_S = 0.1
SIMULATED_POLL_HZ = 100.0

PARAMS = [
    Param('sources', ['service'], 'scanner-state sources, any of: service, igtl, trigger, simulated; '
          'the most restrictive phase wins'),
    Param('publish_rate_hz', 20.0, '/scanner/state heartbeat publication rate (Hz)', 1.0, 200.0),
    Param('heartbeat_period_s', 0.1, '/heartbeat publication period (s)', 0.01, 1.0),
    Param('service_initial_phase', 'UNKNOWN', 'phase of the service source before the first call '
          '(IDLE only with a simulated scanner)', choices=('UNKNOWN', 'IDLE')),
    Param('igtl_mode', 'server', 'OpenIGTLink role of this node', choices=('server', 'client')),
    Param('igtl_host', '127.0.0.1', 'server: address to bind; client: scanner bridge / Slicer address'),
    Param('igtl_port', 18945, 'OpenIGTLink TCP port (server: 0 = any free port)', 0, 65535),
    Param('operator_session_file', '', 'operator session file (empty: the per-user default); an IDLE override '
          'through /scanner/set_state needs its secret'),
    Param('igtl_device', '', 'accept STATUS/STRING only from this device name (empty = any device)'),
    Param('igtl_timeout_s', 0.0, 'igtl phase becomes UNKNOWN without a message for this long (s); '
          '0 = keep the last phase while connected (bridges that send only on change)', 0.0, 3600.0),
    Param('scanner_is_ct', False, 'the scanner behind igtl/trigger is a CT: its acquisitions are ionising (the '
          'scan events say so; their dose records come from the images or the operator, not from here)'),
    Param('service_dose_source', SOURCE_MANUAL, 'what dose figures given through /scanner/set_state are recorded '
          'as: MANUAL (typed in at a console; flagged) or SIMULATED (the simulated scanner of the demo and tests)',
          choices=(SOURCE_MANUAL, SOURCE_SIMULATED)),
    Param('trigger_port', '/dev/ttyUSB1', 'serial device whose modem-status line carries the trigger'),
    Param('trigger_line', 'CTS', 'modem-status line carrying the trigger', choices=MODEM_LINES),
    Param('trigger_active_high', True, 'true: line asserted = imaging; false: line asserted = idle'),
    Param('trigger_assert_debounce_s', 0.0, 'imaging level must be stable this long (s)', 0.0, 1.0),
    Param('trigger_release_debounce_s', 0.05, 'idle level must be stable this long before IDLE (s)', 0.0, 5.0),
    Param('trigger_poll_rate_hz', 500.0, 'modem line poll rate (Hz)', 200.0, 5000.0),
    Param('simulated_schedule', '[]', 'YAML list of scans {start, duration, protocol, is_ct, ctdi_vol_mgy, '
          'dlp_mgy_cm, kv, mas, prepare_s}; start in s after node start'),
    Param('simulated_repeat_s', 0.0, 'repeat the simulated schedule with this period (s); 0 = once',
          0.0, 86400.0),
]


@dataclasses.dataclass(frozen=True)
class Reading:
    """What one source currently says. Dose figures: mGy, mGy·cm, kV, mAs (0 = not reported)."""

    phase: ScannerPhase = ScannerPhase.UNKNOWN
    protocol: str = ''
    is_ionising: bool = False
    ctdi_vol_mgy: float = 0.0
    dlp_mgy_cm: float = 0.0
    kv: float = 0.0
    mas: float = 0.0
    tag: object = None          # identifies the acquisition within its source
    scan_key: int = 0           # node-wide acquisition number (new number = new scan)
    note: str = ''              # why UNKNOWN, for diagnostics


def request_problem(req: SetScannerState.Request) -> Optional[str]:
    """Why a SetScannerState request is refused, or None. Dose figures: 0 = not known."""
    if not common.is_valid_phase_number(req.phase):
        return (f'unknown phase {req.phase}; expected 0 (UNKNOWN), 1 (IDLE), 2 (PREPARING) '
                f'or 3 (ACQUIRING)')
    try:
        factors = DoseFactors(req.ctdi_vol_mgy, req.dlp_mgy_cm, req.kv, req.mas)   # the one dose validator
    except DoseValueError as exc:
        return str(exc)
    if not req.is_ionising and factors.reported:
        return 'dose figures given for a non-ionising scan (set is_ionising for CT)'
    return None


class IgtlClientLink:
    """OpenIGTLink client that reconnects forever, framed by ``igtl.server.StreamReader``.

    pyigtl's own client keeps only the newest message per device (a short
    START/STOP pair could be lost) and does not notice a closed connection,
    so only its codecs are used here. Callbacks run on the link's thread.
    """

    def __init__(self, host: str, port: int, on_message: Callable, on_connection: Callable,
                 limit_for: Callable[[str], int], body_timeout_s: float = 5.0):
        self.host, self.port = host, int(port)
        self._on_message, self._on_connection, self._limit_for = on_message, on_connection, limit_for
        self._body_timeout_s = body_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f'igtl-client-{port}', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError:
                self._stop.wait(IGTL_RECONNECT_S)
                continue
            self._on_connection(True, (self.host, self.port))
            try:
                self._serve(sock)
            except (FramingError, OSError) as exc:
                self._on_connection(False, (self.host, self.port), str(exc))
            else:
                self._on_connection(False, (self.host, self.port), 'closed by the peer')
            finally:
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        reader = StreamReader(self._limit_for)
        while not self._stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if not readable:
                if reader.mid_message and time.monotonic() - reader.last_progress > self._body_timeout_s:
                    raise FramingError(f'message incomplete for {self._body_timeout_s:.1f} s')
                continue
            data = sock.recv(1 << 16)
            if not data:
                return
            for item in reader.feed(data):
                if item[0] == 'refused':
                    self._on_message(None, item[1], item[2])
                    continue
                _, fields, body = item
                message = pyigtl_messages.MessageBase.create_message(fields['message_type'])
                if message is None:
                    continue
                try:
                    message.unpack(fields, body)
                except Exception:  # pyigtl raises several types for a malformed body
                    self._on_message(None, fields['device_name'], fields['message_type'])
                    continue
                self._on_message(message)


class ScannerInterfaceNode(common.LeanQosEvents, Node):
    """Publishes the scanner phase; see the module docstring.

    ``serial_factory(port_name)`` opens the trigger port (default
    ``serial.Serial``); tests inject an object with ``cts/dsr/cd/ri`` attributes.
    """

    def __init__(self, context=None, cli_args=None, serial_factory=None, **kwargs):
        super().__init__('scanner_interface', context=context, cli_args=cli_args, **kwargs)
        self._stop = threading.Event()
        self._igtl = None
        self._trigger_thread = None
        self._publisher_thread: Optional[SteadyPeriodicThread] = None
        try:
            self._setup(serial_factory)
        except Exception:
            self.destroy_node()   # no half-built node (threads, sockets) left behind
            raise

    def _setup(self, serial_factory) -> None:
        self.p = declare(self, PARAMS, read_only=True)
        sources = [str(s).strip().lower() for s in self.p['sources']]
        bad = [s for s in sources if s not in SOURCES]
        if bad or not sources or len(set(sources)) != len(sources):
            raise ValueError(f"parameter 'sources' = {self.p['sources']!r}: give one or more distinct "
                             f"of {', '.join(SOURCES)}")
        self.sources = tuple(sources)
        self._lock = threading.RLock()
        self._readings: Dict[str, Reading] = {s: Reading(note='no data yet') for s in sources}
        self._staleness: Dict[str, StalenessGuard] = {}
        self._scan_counter = 0
        self._heartbeat = 0
        self._last_key = None                 # (phase, protocol, ionising, source, scan) last published
        self._scan = None                     # (source, scan_key) of the acquisition in progress
        self._scan_started = 0.0
        self._ledger = DoseLedger()
        self._ionising_scans = 0              # with or without dose figures (the ledger has those with)
        self._session = time.strftime('%Y%m%d-%H%M%S')
        self.igtl_connected = False
        self.igtl_port = None

        self._state_pub = self.create_publisher(ScannerState, topics.SCANNER_STATE, qos.SCANNER_STATE)
        self._dose_pub = self.create_publisher(DoseRecord, topics.SCANNER_DOSE, qos.EVENTS)
        self._event_pub = common.create_event_publisher(self)
        self._diag_pub = common.create_diagnostics_publisher(self)

        if 'service' in sources:
            self._readings['service'] = Reading(phase=ScannerPhase(self.p['service_initial_phase']),
                                                note='initial phase')
            self.create_service(SetScannerState, topics.SCANNER_SET_STATE, self._on_set_state)
        if 'simulated' in sources:
            self._schedule = SimulatedScannerSchedule(self._parse_schedule(self.p['simulated_schedule']))
            self._sim_t0 = time.monotonic()
            self._poll_simulated()
            if self._schedule.events:           # an empty schedule says IDLE for ever: nothing to poll
                common.create_steady_timer(self, 1.0 / SIMULATED_POLL_HZ, self._poll_simulated)
        if 'igtl' in sources:
            self._start_igtl()
        if 'trigger' in sources:
            self._start_trigger(serial_factory)

        # The heartbeat every interlock times runs in a thread of its own: as an executor timer it was
        # published up to 100 ms late at load 2 (the process's other callbacks first), and the receivers'
        # staleness limits tripped on those gaps (docs/safety.md, "Timeouts").
        self._publisher_thread = SteadyPeriodicThread(
            1.0 / self.p['publish_rate_hz'], lambda: self._refresh(force=True), name='scanner-state-heartbeat',
            on_error=lambda exc: self.get_logger().error(f'scanner state heartbeat failed: {exc}',
                                                         throttle_duration_sec=1.0))
        common.create_steady_timer(self, 1.0, self._publish_diagnostics)
        self.heartbeat = common.HeartbeatPublisher(self, self.p['heartbeat_period_s'])
        self._refresh(force=True)
        self.get_logger().info(f'scanner sources: {", ".join(sources)}'
                               + (f'; OpenIGTLink {self.p["igtl_mode"]} {self.p["igtl_host"]}:{self.igtl_port}'
                                  if self._igtl else ''))

    # ------------------------------------------------------------- combining
    def _set_reading(self, source: str, phase: ScannerPhase, protocol: str = '', is_ionising: bool = False,
                     dose=(0.0, 0.0, 0.0, 0.0), tag=None, note: str = '') -> None:
        """Record what ``source`` says now and publish at once if the combined state changed."""
        with self._lock:
            prev = self._readings[source]
            tag = protocol if tag is None else tag
            key = prev.scan_key
            if phase is ScannerPhase.ACQUIRING and (prev.phase is not ScannerPhase.ACQUIRING or tag != prev.tag):
                self._scan_counter += 1
                key = self._scan_counter
            self._readings[source] = Reading(phase, protocol, bool(is_ionising), *map(float, dose), tag, key, note)
            if source in self._staleness:
                self._staleness[source].update(phase, time.monotonic())
            self._refresh()

    def _effective(self, source: str, now: float) -> Reading:
        reading = self._readings[source]
        guard = self._staleness.get(source)
        if guard is not None and guard.is_stale(now) and reading.phase is not ScannerPhase.UNKNOWN:
            return dataclasses.replace(reading, phase=ScannerPhase.UNKNOWN, note=f'stale ({guard.age(now):.2f} s)')
        return reading

    def combined(self):
        """(source, Reading) of the most restrictive source now."""
        now = time.monotonic()
        with self._lock:
            best = None
            for source in self.sources:
                reading = self._effective(source, now)
                if best is None or _RESTRICTIVENESS[reading.phase] > _RESTRICTIVENESS[best[1].phase]:
                    best = (source, reading)
            return best

    def _refresh(self, force: bool = False) -> None:
        """Publish ScannerState when the combined state changed (or ``force``: the periodic heartbeat)."""
        with self._lock:
            source, reading = self.combined()
            key = (reading.phase, reading.protocol, reading.is_ionising, source, reading.scan_key)
            changed = key != self._last_key
            if not (changed or force):
                return
            if changed and reading.phase is ScannerPhase.UNKNOWN:
                notes = {s: self._effective(s, time.monotonic()).note for s in self.sources}
                self._event_pub.publish(common.make_event(
                    self, 'scanner_unknown', f'scanner state UNKNOWN from {source}: {notes[source]}',
                    ProcedureEvent.WARN, {f'{s}_note': n for s, n in notes.items()}))
            self._last_key = key
            self._heartbeat = (self._heartbeat + 1) % (1 << 32)
            msg = ScannerState(phase=common.phase_to_msg(reading.phase), source=source,
                               protocol_name=reading.protocol, is_ionising=reading.is_ionising,
                               heartbeat=self._heartbeat)
            msg.header.stamp = common.stamp_now(self)
            self._state_pub.publish(msg)
            self._track_scan(source, reading)

    def _track_scan(self, source: str, reading: Reading) -> None:
        scan = (source, reading.scan_key) if reading.phase is ScannerPhase.ACQUIRING else None
        if scan == self._scan:
            return
        now = time.monotonic()
        if self._scan is not None:
            self._event_pub.publish(common.make_event(
                self, 'scan_ended', f'scan {self._scan_id(self._scan[1])} ended',
                values={'scan_id': self._scan_id(self._scan[1]), 'duration_s': f'{now - self._scan_started:.3f}'}))
        self._scan, self._scan_started = scan, now
        if scan is None:
            return
        scan_id = self._scan_id(reading.scan_key)
        self._event_pub.publish(common.make_event(
            self, 'scan_started', f"scan {scan_id} started ('{reading.protocol}', from {source})",
            values={'scan_id': scan_id, 'protocol': reading.protocol, 'source': source,
                    'is_ionising': reading.is_ionising}))
        if not reading.is_ionising:
            return
        self._ionising_scans += 1
        factors = DoseFactors(reading.ctdi_vol_mgy, reading.dlp_mgy_cm, reading.kv, reading.mas)
        if not factors.reported:
            # The source knows the tube is on, not the dose: one record per scan, from its images or the operator.
            self._event_pub.publish(common.make_event(
                self, 'dose_not_reported', f'scan {scan_id}: ionising, no dose figures from {source}; its dose '
                'record comes from its images (RDSR or headers) or the operator (enter_dose)',
                values={'scan_id': scan_id, 'source': source}))
            return
        scan_dose = ScanDose(scan_id=scan_id, modality=MODALITY_CT, protocol_name=reading.protocol,
                             ctdi_vol_mgy=reading.ctdi_vol_mgy, dlp_mgy_cm=reading.dlp_mgy_cm,
                             kv=reading.kv, mas=reading.mas, stamp=time.time(),
                             source=SOURCE_SIMULATED if source == 'simulated' else self.p['service_dose_source'])
        self._ledger.add(scan_dose)
        record = DoseRecord(**self._ledger.dose_record_fields(scan_dose))
        record.procedure_id = procedure_id.current()   # the recorder keeps only its own procedure's doses
        record.header.stamp = common.stamp_now(self)
        self._dose_pub.publish(record)

    def _scan_id(self, key: int) -> str:
        return f'{self._session}-{key:03d}'

    # --------------------------------------------------------------- sources
    def _on_set_state(self, req, resp):
        problem = request_problem(req)
        if problem:
            resp.accepted, resp.message = False, problem
            return resp
        phase = common.phase_from_msg(req.phase)
        if phase is ScannerPhase.IDLE:
            # Saying "not imaging" is the operator's override: it needs the operator's session secret.
            # An imaging phase only stops motion and is honoured from anyone.
            ok, why = operator_session.check_token(common.operator_secret(self), req.operator_token)
            if not ok:
                resp.accepted, resp.message = False, f'scanner IDLE override refused: {why}'
                self.get_logger().warning(resp.message)
                self._event_pub.publish(common.make_event(self, 'scanner_override_refused', resp.message,
                                                          ProcedureEvent.WARN))
                return resp
        self._set_reading('service', phase, req.protocol_name, req.is_ionising,
                          (req.ctdi_vol_mgy, req.dlp_mgy_cm, req.kv, req.mas), note='set by service')
        resp.accepted, resp.message = True, f'scanner phase set to {phase.value}'
        return resp

    @staticmethod
    def _parse_schedule(text: str):
        try:
            events = yaml.safe_load(text) or []
        except yaml.YAMLError as exc:
            raise ValueError(f"parameter 'simulated_schedule' is not valid YAML: {exc}") from exc
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise ValueError("parameter 'simulated_schedule' must be a YAML list of mappings")
        return events

    def _poll_simulated(self) -> None:
        t = time.monotonic() - self._sim_t0
        cycle = 0
        if self.p['simulated_repeat_s'] > 0.0:
            cycle, t = divmod(t, self.p['simulated_repeat_s'])
        st = self._schedule.state_at(t)
        self._set_reading('simulated', st.phase, st.protocol, st.is_ct,
                          (st.ctdi_vol_mgy, st.dlp_mgy_cm, st.kv, st.mas), tag=(cycle, st.event_index))

    def _start_igtl(self) -> None:
        if self.p['igtl_timeout_s'] > 0.0:
            self._staleness['igtl'] = StalenessGuard(self.p['igtl_timeout_s'])
        self._readings['igtl'] = Reading(note='not connected')
        limit_for = lambda mtype: IGTL_MAX_TEXT_BODY if mtype in IGTL_TEXT_TYPES else 0  # noqa: E731
        host, port = self.p['igtl_host'], self.p['igtl_port']
        if self.p['igtl_mode'] == 'server':
            # One peer: the scanner. Others are told BUSY and closed without touching its reading; a silent
            # scanner keeps its connection however long it is quiet.
            self._igtl = IgtlServer(host, port, on_message=lambda m: self._on_igtl(m) or (),
                                    on_refused=lambda dev, mtype, code, why: self._on_igtl(None, dev, mtype) or (),
                                    limit_for=limit_for, on_connection=self._on_igtl_connection,
                                    settings=ServerSettings(max_clients=1, idle_timeout_s=0.0))
            self._igtl.start()
            self.igtl_port = self._igtl.port
        else:
            self._igtl = IgtlClientLink(host, port, self._on_igtl, self._on_igtl_connection, limit_for)
            self._igtl.start()
            self.igtl_port = port

    def _on_igtl(self, message, device: str = '', message_type: str = '') -> None:
        """A decoded message, or ``None`` for a refused/undecodable one from ``device``."""
        if message is not None:
            device, message_type = message.device_name, message.message_type
        if message_type not in IGTL_TEXT_TYPES or (self.p['igtl_device'] and device != self.p['igtl_device']):
            return
        if message is None:   # it may have been the scanner's command: we cannot tell, so UNKNOWN
            decoded, note = None, f'unreadable {message_type} from {device!r}'
        elif message_type == 'STATUS':
            decoded = phase_from_igtl_status(message.code, message.error_name, message.status_string)
            note = f'STATUS {decoded.raw!r}'
        else:
            decoded = phase_from_igtl_text(message.string)
            note = f'STRING {decoded.raw!r}'
        if decoded is None or decoded.phase is ScannerPhase.UNKNOWN:
            self.get_logger().warning(f'OpenIGTLink scanner message not understood ({note}): phase UNKNOWN')
            self._set_reading('igtl', ScannerPhase.UNKNOWN, note=note)
        else:
            self._set_reading('igtl', decoded.phase, decoded.protocol, self.p['scanner_is_ct'], note=note)

    def _on_igtl_connection(self, connected: bool, address, why: str = '') -> None:
        self.igtl_connected = connected
        self.get_logger().info(f'OpenIGTLink scanner link {"up" if connected else "down"}: {address} {why}')
        # Until the peer tells us the phase (and after it is gone) we do not know it.
        self._set_reading('igtl', ScannerPhase.UNKNOWN, note='connected, no message yet' if connected
                          else f'not connected {why}'.strip())

    def _start_trigger(self, serial_factory) -> None:
        if serial_factory is None:
            import serial  # pyserial; imported here so other sources do not need it

            def serial_factory(port):
                return serial.Serial(port, timeout=0)
        self._serial_factory = serial_factory
        self._interpreter = ModemTriggerInterpreter(
            self.p['trigger_line'], self.p['trigger_active_high'], self.p['trigger_assert_debounce_s'],
            self.p['trigger_release_debounce_s'])
        period = 1.0 / self.p['trigger_poll_rate_hz']
        self._staleness['trigger'] = StalenessGuard(TRIGGER_STALE_S)
        self._trigger_thread = threading.Thread(target=self._trigger_loop, args=(period,),
                                                name='scanner-trigger', daemon=True)
        self._trigger_thread.start()

    def _trigger_loop(self, period: float) -> None:
        port, next_poll = None, time.monotonic()
        ionising = self.p['scanner_is_ct']
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if port is None:
                    port = self._serial_factory(self.p['trigger_port'])
                phase, note = self._interpreter.update(port, now), f'{self._interpreter.line} line'
            except (OSError, KeyError, ValueError) as exc:   # pyserial's SerialException is an OSError
                phase, note = self._interpreter.report_read_error(), f'cannot read {self.p["trigger_port"]}: {exc}'
                self.get_logger().error(f'scanner trigger: {note}', throttle_duration_sec=5.0)
                if port is not None and hasattr(port, 'close'):
                    port.close()
                port, next_poll = None, now + TRIGGER_REOPEN_S - period
            self._set_reading('trigger', phase, is_ionising=ionising, note=note)
            next_poll = max(next_poll + period, time.monotonic())
            self._stop.wait(next_poll - time.monotonic())
        if port is not None and hasattr(port, 'close'):
            port.close()

    # ---------------------------------------------------------------- output
    def _publish_diagnostics(self) -> None:
        source, reading = self.combined()
        now = time.monotonic()
        with self._lock:
            values = {f'{s}_phase': self._effective(s, now).phase.value for s in self.sources}
            values.update({f'{s}_note': self._effective(s, now).note for s in self.sources})
            values['heartbeat'] = self._heartbeat
        if self._publisher_thread is not None:
            values['heartbeat_late_max_s'] = f'{self._publisher_thread.late_max:.4f}'
            values['ionising_scans'] = self._ionising_scans
        if self._igtl is not None:
            values['igtl_connected'] = self.igtl_connected
        level = DiagnosticStatus.WARN if reading.phase is ScannerPhase.UNKNOWN else DiagnosticStatus.OK
        status = common.diagnostic_status(self, 'scanner', level, f'{reading.phase.value} (from {source})', values)
        self._diag_pub.publish(common.diagnostic_array(self, [status]))

    def describe_state(self) -> str:
        source, reading = self.combined()
        return (f'scanner {reading.phase.value} from {source} (sources {", ".join(self.sources)}), '
                f'{self._heartbeat} messages, {self._ionising_scans} ionising scans')

    def destroy_node(self):
        self._stop.set()
        if self._publisher_thread is not None:
            self._publisher_thread.stop()
        if self._trigger_thread is not None:
            self._trigger_thread.join(2.0)
        if self._igtl is not None:
            self._igtl.stop()
            self._igtl = None
        return super().destroy_node()


def main(args=None) -> int:
    return common.run_node(ScannerInterfaceNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
