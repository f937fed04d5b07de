"""Recorder node: the durable procedure record, the dose ledger, an MCAP log and the HTML report.

Thin adapter over :mod:`igt_robot.record` (docs/record.md):

* ``<record_dir>/events.jsonl`` -- :class:`~igt_robot.record.ProcedureRecord`, one fsync'ed line per
  entry (a callback returns only after its entry is committed):

  ============================  ====================================================================
  input                         record entries
  ============================  ====================================================================
  /procedure/events (EVENTS)    ``event`` for every ProcedureEvent, plus a derived entry for the
                                report: ``interlock`` (safety_transition into SCAN_HOLD/HOLD/FAULT/
                                ESTOP; hardware ``interlock`` with inhibit true), ``confirmation``
                                (accepted safety_command with an operator_id), ``workflow``
                                (``workflow_*`` events), ``tip`` (``tip_measured``)
  /scanner/dose (EVENTS)        ``dose`` (validated by the DoseLedger) or ``dose_unverified``
  /registration/result          ``registration``
  /planner/current_plan         ``plan``
  /scanner/state                ``scanner`` at each phase change
  /robot/state                  ``motion`` at each change of ``moving``
  ============================  ====================================================================

  EVENTS and LATCHED are TRANSIENT_LOCAL, so a recorder (re)started late gets what was published
  before; entries already in the record (same stamp and source, same plan/registration stamp, same
  scan id) are recognised and not written twice.

* ``<record_dir>/mcap/session_<n>.mcap`` -- rosbag2-compatible MCAP (profile ros2, CDR) of
  /procedure/events, /scanner/state, /safety/status, /robot/state and /joint_states (decimated),
  /scanner/dose, /registration/result, /planner/current_plan; one new file per recorder start.
  The MCAP is a convenience log: it is chunked (up to ``mcap_chunk_kib`` of messages are buffered
  in memory) and finalised at shutdown; the JSONL record is the durable one.

* ``~/write_report`` (std_srvs/Trigger) writes ``<record_dir>/report.html`` from the record and the
  figures in ``<record_dir>/figures/*.png`` (the procedure node renders them); it is also written at
  shutdown when ``write_report_on_shutdown`` is set. The recorder is the only writer of the report.

The record is required (docs/record.md, "A required participant"):

* A failed durable write (ENOSPC, EIO, read-only, ...) or less free space than a procedure needs
  (``min_free_mib``, checked at start and every ``diagnostics_period_s``) is reported to the safety
  supervisor as the active fault RECORD_FAILED naming the cause (motion halts, latched). While it lasts a
  ``record_gap`` entry is tried every period; once one is committed (it says how many entries were lost)
  the cause is cleared and the operator can acknowledge.
* /heartbeat (required by the supervisor while the stack runs): stops when a write hangs longer than
  ``write_hang_s``.
* Only this procedure's events and doses enter the record (``procedure_id`` of the message; an empty id
  is accepted as unlabelled); another procedure's are counted and reported as one ``foreign_procedure``
  entry per ``foreign_report_period_s``.
* At start, unfinished records of earlier sessions (this folder and its siblings) are closed with an
  ``ended_abnormally`` entry and their report is written (igt_robot.record.recovery). A normal shutdown
  ends the session with ``record_closed``. The MCAP is flushed every ``mcap_flush_period_s``.
"""
from __future__ import annotations

import collections
import glob
import json
import math
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger

from igt_robot import paths
from igt_robot.nodes import common, msg_convert, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.record import (KIND_CONFIRMATION, KIND_DOSE, KIND_EVENT, KIND_INTERLOCK, KIND_MOTION, KIND_PLAN,
                              KIND_REGISTRATION, KIND_SCANNER, KIND_TIP, KIND_WORKFLOW, DoseLedger, DoseValueError,
                              ProcedureRecord, RecordError, ct_scan)
from igt_robot.record import procedure_id as procedure_identity
from igt_robot.record.dose import CM_PER_M
from igt_robot.record.recovery import close_all_unfinished, close_session
from igt_robot.record.store import (KIND_CLOSED, KIND_POSITION, KIND_RECORD_GAP, PROCEDURE_SPACE_BYTES,
                                    check_free_space, describe_os_error, session_open)
from igt_robot.workflow import CONFIRMATIONS
from igt_robot_msgs.msg import (DoseRecord, NeedlePlan, ProcedureEvent, RegistrationResult, RobotState, SafetyStatus,
                                ScannerState)

NODE_NAME = 'recorder_node'
KIND_DOSE_UNVERIFIED = 'dose_unverified'
KIND_RECORDER = 'recorder'
KIND_FOREIGN = 'foreign_procedure'
RECORD_FAILED = 'RECORD_FAILED'
FIGURES_FOLDER = 'figures'
# Safety states entered by a transition that stops or prevents motion (an "interlock activation").
INTERLOCK_STATES = frozenset({'SCAN_HOLD', 'HOLD', 'FAULT', 'ESTOP'})
_ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')

PARAMS = [
    Param('procedure_id', '', 'procedure identifier (1-64 of [A-Za-z0-9_.-]); empty = $IGT_PROCEDURE_ID, '
                              'else the start time YYYYmmdd-HHMMSS', read_only=True),
    Param('record_dir', '', 'folder of the procedure record; empty = <repo>/build/records/<procedure_id>. '
                            'An existing record is continued (sequence numbers go on)', read_only=True),
    Param('mcap_enabled', True, 'also log the key topics to a rosbag2-compatible MCAP file', read_only=True),
    Param('mcap_compression', 'zstd', 'MCAP chunk compression', read_only=True, choices=('zstd', 'lz4', 'none')),
    Param('mcap_chunk_kib', 256, 'MCAP chunk size, KiB (messages buffered before a chunk is written)', 16, 65536,
          read_only=True),
    Param('robot_state_rate_hz', 20.0, 'max rate of /robot/state in the MCAP, Hz (0 = every message)',
          0.0, 1000.0),
    Param('joint_states_rate_hz', 20.0, 'max rate of /joint_states in the MCAP, Hz (0 = every message)',
          0.0, 1000.0),
    Param('scanner_state_rate_hz', 0.0, 'max rate of /scanner/state in the MCAP, Hz (0 = every message); '
                                        'a phase change is always logged', 0.0, 1000.0),
    Param('body_region', 'abdomen', 'body region of the CT scans, for the effective-dose estimate',
          choices=('head', 'head_neck', 'neck', 'chest', 'abdomen', 'pelvis', 'abdomen_pelvis', 'trunk')),
    Param('scan_length_m', 0.0, 'CT scan length for the DLP plausibility check, m; 0 = derive it from '
                                'DLP / CTDIvol (the check is then void)', 0.0, 2.5),
    Param('write_report_on_shutdown', True, 'write report.html from the record when the node shuts down'),
    Param('report_file', 'report.html', 'report file name inside record_dir'),
    Param('diagnostics_period_s', 1.0, 'period of /diagnostics and of the free-space / write-retry checks, s',
          0.1, 60.0),
    Param('min_free_mib', PROCEDURE_SPACE_BYTES // 2**20, 'free space the record folder needs at start (preflight), '
          'MiB; less is the fault RECORD_FAILED (docs/record.md, "Disk space")', 0, 1_000_000, read_only=True),
    Param('reserve_free_mib', 8, 'once the preflight passed: less free space than this is RECORD_FAILED (the disk '
          'is about to fill; checked before every entry), MiB', 0, 1_000_000, read_only=True),
    Param('mcap_flush_period_s', 2.0, 'the MCAP chunk in progress is written out this often, s (a kill loses '
                                      'at most this much of the MCAP)', 0.2, 60.0, read_only=True),
    Param('position_sample_period_s', 0.2, 'while the robot moves, a position entry this often, s (the last '
                                           'known needle depth after an abnormal end)', 0.05, 10.0, read_only=True),
    Param('foreign_report_period_s', 5.0, "another procedure's messages are reported as one entry per "
                                          'period, s', 0.5, 600.0, read_only=True),
    Param('close_unfinished_records', True, 'at start, close unfinished records in the record folder and its '
                                            'siblings with an ended_abnormally entry and write their report',
          read_only=True),
    Param('heartbeat_period_s', 0.1, 'own /heartbeat period, s', 0.01, 1.0, read_only=True),
    Param('write_hang_s', 2.0, 'a record write taking longer stops the heartbeat, s', 0.1, 60.0, read_only=True),
]


def _json_safe(value):
    """Non-finite floats -> None (JSON has no NaN/inf; e.g. an unbounded clearance)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _parse_json(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _as_float(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class _Decimator:
    """Lets a message through at most once per ``period`` s (period 0: always)."""

    def __init__(self, rate_hz: float):
        self.period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self._last = -math.inf

    def due(self, now: float, force: bool = False) -> bool:
        if force or now - self._last >= self.period:
            self._last = now
            return True
        return False


class RecorderNode(Node):
    """See the module docstring. Public: ``record``, ``record_dir``, ``ledger``, ``write_report()``,
    ``finalize()``, ``describe_state()``."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS)
        procedure_id = self.p['procedure_id'] or procedure_identity.current() or time.strftime('%Y%m%d-%H%M%S')
        if not _ID_RE.match(procedure_id):
            raise ValueError(f"parameter 'procedure_id' = {procedure_id!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        self.procedure_id = procedure_id
        self.record_dir = str(paths.record_dir(procedure_id, self.p['record_dir']))
        if not self.p['report_file'] or os.sep in self.p['report_file']:
            raise ValueError(f"parameter 'report_file' = {self.p['report_file']!r} must be a plain file name")
        self.report_path = os.path.join(self.record_dir, self.p['report_file'])

        self._lock = threading.Lock()          # dedup state, counters
        self.fault_reporter = common.FaultReporter(self)
        self.closed_abnormal: List[Dict[str, Any]] = []
        if self.p['close_unfinished_records']:
            self._close_unfinished_siblings()
        self.record = ProcedureRecord(self.record_dir)
        self.ledger = DoseLedger()
        self._event_keys, self._plan_keys, self._registration_keys = set(), set(), set()
        self._unverified_scans = set()
        existing = self._load_existing()
        self.failures = 0
        self.last_failure = ''
        self.lost_entries = 0
        self._write_failure: Optional[str] = None    # cause of the last failed write, until a write succeeds
        self._space_problem: Optional[str] = None
        self._preflight_ok = False
        self._space_checked = -math.inf
        self._fault_active = False
        self._write_started: Optional[float] = None
        self._foreign = collections.Counter()        # (what, source, procedure_id) -> messages ignored
        self.foreign_total = 0
        self._scanner_phase: Optional[str] = None
        self._moving: Optional[bool] = None
        self._last_position_sample = -math.inf
        self._finalized = False
        if existing and session_open(existing):
            # This record's previous session never closed (its recorder was killed): say so before going on.
            try:
                payload = close_session(self.record, f'{NODE_NAME} pid {os.getpid()}', self.p['mcap_flush_period_s'])
                self.closed_abnormal.append(dict(payload, folder=self.record_dir))
                self.get_logger().warning(f'the previous session of {self.record_dir} ended abnormally; '
                                          f'closed at seq {payload["last_seq"]}')
            except (RecordError, OSError) as exc:
                self._on_write_failure('ended_abnormally', exc)

        self.mcap = None
        self.mcap_path = ''
        if self.p['mcap_enabled']:
            from igt_robot.record.mcap_log import McapLog
            self.mcap_path = self._next_mcap_path()
            self.mcap = McapLog(self.mcap_path, compression=self.p['mcap_compression'],
                                chunk_size=int(self.p['mcap_chunk_kib']) * 1024)
        self._decimators = {topics.ROBOT_STATE: _Decimator(self.p['robot_state_rate_hz']),
                            topics.JOINT_STATES: _Decimator(self.p['joint_states_rate_hz']),
                            topics.SCANNER_STATE: _Decimator(self.p['scanner_state_rate_hz'])}
        self._append(KIND_RECORDER, {'procedure_id': procedure_id, 'record_dir': self.record_dir,
                                     'mcap': self.mcap_path, 'pid': os.getpid(),
                                     'resumed_at_seq': self.record.last_seq,
                                     'closed_abnormal': [c.get('folder', '') for c in self.closed_abnormal]})

        # Record writers in one exclusive group: entries keep their arrival order.
        record_group = MutuallyExclusiveCallbackGroup()
        stream_group = MutuallyExclusiveCallbackGroup()
        report_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(ProcedureEvent, topics.PROCEDURE_EVENTS, self._on_event, qos.EVENTS,
                                 callback_group=record_group)
        self.create_subscription(DoseRecord, topics.SCANNER_DOSE, self._on_dose, qos.EVENTS,
                                 callback_group=record_group)
        self.create_subscription(RegistrationResult, topics.REGISTRATION_RESULT, self._on_registration, qos.LATCHED,
                                 callback_group=record_group)
        self.create_subscription(NeedlePlan, topics.PLANNER_CURRENT_PLAN, self._on_plan, qos.LATCHED,
                                 callback_group=record_group)
        self.create_subscription(SafetyStatus, topics.SAFETY_STATUS, self._on_safety, qos.SAFETY_LATCHED,
                                 callback_group=stream_group)
        self.create_subscription(ScannerState, topics.SCANNER_STATE, self._on_scanner, qos.SCANNER_STATE,
                                 callback_group=stream_group)
        self.create_subscription(RobotState, topics.ROBOT_STATE, self._on_robot, qos.STATE_STREAM,
                                 callback_group=stream_group)
        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joints, qos.STATE_STREAM,
                                 callback_group=stream_group)
        self.create_service(Trigger, '~/write_report', self._on_write_report, callback_group=report_group)
        self.diagnostics = common.create_diagnostics_publisher(self)
        self.create_timer(self.p['diagnostics_period_s'], self._publish_diagnostics, callback_group=stream_group)
        self.create_timer(self.p['diagnostics_period_s'], self._check_record, callback_group=record_group)
        self.create_timer(self.p['foreign_report_period_s'], self._report_foreign, callback_group=record_group)
        self.create_timer(0.1, self._watch_space, callback_group=MutuallyExclusiveCallbackGroup())
        if self.mcap is not None:
            self.create_timer(self.p['mcap_flush_period_s'], self._flush_mcap, callback_group=stream_group)
        self.heartbeat = common.HeartbeatPublisher(self, self.p['heartbeat_period_s'],
                                                   callback_group=MutuallyExclusiveCallbackGroup(),
                                                   alive=self._writer_alive)
        self._check_space()
        self._update_fault()
        self.get_logger().info(f'recording procedure {procedure_id} to {self.record_dir} (seq '
                               f'{self.record.last_seq}); MCAP: {self.mcap_path or "off"}')

    # ------------------------------------------------------------ setup
    def _close_unfinished_siblings(self) -> None:
        """Close earlier records (siblings of this one) whose recorder was killed; write their reports."""
        root = os.path.dirname(self.record_dir)
        try:
            closed = close_all_unfinished(root, exclude=[self.record_dir], detected_by=f'{NODE_NAME} pid {os.getpid()}',
                                          report_file=self.p['report_file'],
                                          flush_period_s=self.p['mcap_flush_period_s'], figures=figure_pngs)
        except OSError as exc:
            self.get_logger().error(f'unfinished records under {root} not checked: {exc}')
            return
        for payload in closed:
            if 'error' in payload:
                self.get_logger().error(f"unfinished record {payload['folder']} not closed: {payload['error']}")
            else:
                self.get_logger().warning(
                    f"record {payload['folder']} had ended abnormally (last entry {payload['last_entry_wall']}, "
                    f"needle depth {payload['last_insertion_depth_m']} m): closed, report {payload['report']}")
        self.closed_abnormal.extend(closed)

    def _load_existing(self):
        """Rebuild dedup keys and the dose ledger from a record that already has entries (restart)."""
        entries = self.record.read_all()
        for entry in entries:
            p = entry.payload
            if entry.kind == KIND_EVENT:
                self._event_keys.add(self._event_key_of(p))
            elif entry.kind == KIND_PLAN:
                self._plan_keys.add((p.get('plan_id'), p.get('stamp_ns')))
            elif entry.kind == KIND_REGISTRATION:
                self._registration_keys.add((p.get('stamp_ns'), p.get('method'), p.get('image_source')))
            elif entry.kind == KIND_DOSE:
                try:
                    self.ledger.add_ct(p['scan_id'], ctdi_vol_mgy=p['ctdi_vol_mgy'], dlp_mgy_cm=p['dlp_mgy_cm'],
                                       kv=p['kv'], mas=p['mas'], scan_length_m=p['scan_length_m'],
                                       protocol_name=p.get('protocol_name', ''),
                                       body_region=p.get('body_region', 'abdomen'), stamp=p.get('stamp', 0.0))
                except (KeyError, DoseValueError) as exc:
                    self.get_logger().error(f'dose entry {entry.seq} of the existing record is unusable: {exc}')
            elif entry.kind == KIND_DOSE_UNVERIFIED:
                self._unverified_scans.add(p.get('scan_id'))
        return entries

    def _next_mcap_path(self) -> str:
        folder = os.path.join(self.record_dir, 'mcap')
        os.makedirs(folder, exist_ok=True)
        n = 0
        while os.path.exists(os.path.join(folder, f'session_{n:03d}.mcap')):
            n += 1
        return os.path.join(folder, f'session_{n:03d}.mcap')

    # ------------------------------------------------------------ writing
    def _append(self, kind: str, payload: Dict[str, Any]) -> Optional[int]:
        """Commit one entry; a failure is logged and counted (diagnostics ERROR), never raised into rclpy."""
        if self._finalized:
            return None  # shutting down: callbacks still queued in the executor find the record closed
        self._write_started = now = time.monotonic()
        if now - self._space_checked >= 0.1:   # statvfs is cheap; slack in the file's last block hides a full disk
            self._watch_space()
        try:
            return self.record.append(kind, _json_safe(payload))
        except (RecordError, OSError) as exc:
            self._on_write_failure(kind, exc)
            return None
        finally:
            self._write_started = None

    def _on_write_failure(self, kind: str, exc: BaseException) -> None:
        """A lost entry: counted; a disk error halts motion (RECORD_FAILED) until a write succeeds again."""
        with self._lock:
            self.failures += 1
            self.last_failure = f'{kind}: {exc}'
        self.get_logger().error(f'could not record a {kind} entry: {exc}', throttle_duration_sec=1.0)
        if isinstance(exc, OSError):
            with self._lock:
                self.lost_entries += 1
                first = self._write_failure is None
                self._write_failure = f'record write failed: {describe_os_error(exc)} on {self.record.path}'
            if first:
                self._update_fault()

    def _writer_alive(self) -> bool:
        started = self._write_started
        return started is None or time.monotonic() - started < self.p['write_hang_s']

    def _watch_space(self) -> None:
        """Free space now (also every 0.1 s from its own timer): a filling disk halts motion at once."""
        if self._finalized:
            return
        had = self._space_problem
        self._check_space()
        if self._space_problem != had:
            self._update_fault()

    def _check_space(self) -> None:
        """Free space: the preflight amount until it was once available, then the reserve."""
        self._space_checked = time.monotonic()
        needed = self.p['reserve_free_mib'] if self._preflight_ok else self.p['min_free_mib']
        problem = check_free_space(self.record_dir, int(needed) * 2**20)
        with self._lock:
            self._space_problem = problem
            self._preflight_ok = self._preflight_ok or problem is None

    def _check_record(self) -> None:
        """Periodic: free space; after a failed write, try a record_gap entry; keep the fault up to date."""
        if self._finalized:
            return
        self._check_space()
        if self._write_failure is not None:
            with self._lock:
                lost, cause = self.lost_entries, self._write_failure
            self._write_started = time.monotonic()
            try:
                self.record.append(KIND_RECORD_GAP, {'lost_entries': lost, 'cause': cause})
            except (RecordError, OSError) as exc:
                with self._lock:
                    self._write_failure = f'record write failed: {describe_os_error(exc)} on {self.record.path}'
            else:
                with self._lock:
                    self._write_failure = None
                    self.lost_entries = 0
                self.get_logger().warning(f'record writable again; {lost} entries were lost ({cause})')
            finally:
                self._write_started = None
        self._update_fault()

    def _update_fault(self) -> None:
        """RECORD_FAILED active while a cause lasts (re-sent each period: the supervisor may start later)."""
        with self._lock:
            causes = [c for c in (self._write_failure, self._space_problem) if c]
        if causes:
            detail = '; '.join(causes)
            if not self._fault_active:
                self.get_logger().error(f'{RECORD_FAILED}: {detail} -- motion halts until the record is writable '
                                        'and the operator acknowledges')
            self._fault_active = True
            self.fault_reporter.report(RECORD_FAILED, detail, active=True)
        elif self._fault_active:
            self._fault_active = False
            self.fault_reporter.clear(RECORD_FAILED, 'the record is writable again')

    @property
    def record_failed(self) -> Optional[str]:
        """The cause of RECORD_FAILED, or None."""
        with self._lock:
            causes = [c for c in (self._write_failure, self._space_problem) if c]
        return '; '.join(causes) or None

    def _flush_mcap(self) -> None:
        if self.mcap is None or self._finalized:
            return
        try:
            self.mcap.flush()
        except Exception as exc:  # noqa: BLE001 -- the MCAP is secondary; the JSONL record is the durable one
            self.get_logger().error(f'MCAP flush failed: {exc}', throttle_duration_sec=5.0)

    # ------------------------------------------------------------ other procedures
    def _is_foreign(self, what: str, source: str, their_id: str) -> bool:
        """True (and counted) if a message belongs to another procedure on this domain."""
        if not their_id or their_id == self.procedure_id:
            return False
        with self._lock:
            self._foreign[(what, source, their_id)] += 1
            self.foreign_total += 1
        return True

    def _report_foreign(self) -> None:
        with self._lock:
            counts, self._foreign = self._foreign, collections.Counter()
        if not counts:
            return
        items = [{'what': w, 'source': src, 'procedure_id': pid, 'messages': n}
                 for (w, src, pid), n in sorted(counts.items())]
        summary = ', '.join(f"{i['messages']} {i['what']}(s) of {i['procedure_id']} from {i['source']}"
                            for i in items)
        self.get_logger().warning(f'ignored messages of another procedure on this ROS domain: {summary}')
        self._append(KIND_FOREIGN, {'ignored': items, 'period_s': self.p['foreign_report_period_s']})

    def _log(self, topic: str, type_name: str, msg, force: bool = False) -> None:
        if self.mcap is None or self._finalized:
            return
        decimator = self._decimators.get(topic)
        if decimator is not None and not decimator.due(time.monotonic(), force):
            return
        try:
            self.mcap.write(topic, type_name, msg_convert.to_dict(msg), time.time_ns())
        except Exception as exc:  # the MCAP is secondary: never let it stop the durable record
            self.get_logger().error(f'MCAP write of {topic} failed: {exc}', throttle_duration_sec=5.0)

    # ------------------------------------------------------------ events
    @staticmethod
    def _event_key_of(payload: Dict[str, Any]):
        return (payload.get('source'), payload.get('kind'), payload.get('stamp_ns'), payload.get('description'))

    def _on_event(self, msg: ProcedureEvent) -> None:
        if self._is_foreign('event', msg.source, msg.procedure_id):
            return
        self._log(topics.PROCEDURE_EVENTS, 'igt_robot_msgs/msg/ProcedureEvent', msg)
        values = msg_convert.key_values_dict(msg.values)
        payload = {'phase': msg.phase, 'severity': int(msg.severity), 'source': msg.source, 'kind': msg.kind,
                   'description': msg.description, 'values': values,
                   'stamp_ns': msg_convert.stamp_ns(msg.header.stamp), 'procedure_id': msg.procedure_id}
        key = self._event_key_of(payload)
        if key in self._event_keys:
            return  # re-delivered by TRANSIENT_LOCAL after a restart: already committed
        if self._append(KIND_EVENT, payload) is None:
            return
        self._event_keys.add(key)
        derived = self._derived_entry(msg, values)
        if derived is not None:
            self._append(*derived)

    def _derived_entry(self, msg: ProcedureEvent, values: Dict[str, str]):
        """The report-level entry an event implies, as (kind, payload), or None."""
        kind = msg.kind
        if kind == 'safety_transition' and values.get('to_state') in INTERLOCK_STATES:
            return KIND_INTERLOCK, {'state': values['to_state'], 'from_state': values.get('from_state', ''),
                                    'reason': msg.description, 'source': msg.source}
        if kind == 'interlock' and values.get('inhibit', '').lower() == 'true':
            return KIND_INTERLOCK, {'state': 'HW_INHIBIT', 'reason': values.get('reason', msg.description),
                                    'source': msg.source}
        if (kind == 'safety_command' and values.get('operator_id') and msg.severity == ProcedureEvent.INFO):
            return KIND_CONFIRMATION, {'operator_id': values['operator_id'], 'what': msg.description,
                                       'source': msg.source}
        if kind.startswith('workflow_'):
            command = values.get('command', '')
            return KIND_WORKFLOW, {
                'kind': kind[len('workflow_'):], 'command': command, 'argument': values.get('argument', ''),
                'operator_id': values.get('operator_id', ''), 'accepted': values.get('accepted', '') == 'true',
                'from_phase': values.get('from_phase', ''), 'from_step': values.get('from_step', ''),
                'phase': msg.phase, 'step': values.get('step', ''), 'message': msg.description,
                'severity': int(msg.severity), 'confirmation': command in CONFIRMATIONS}
        if kind == 'tip_measured':
            tip = _parse_json(values.get('tip_m', ''))
            if not (isinstance(tip, list) and len(tip) == 3):
                self.get_logger().warning(f"tip_measured event without a valid 'tip_m' [x, y, z]: {values}")
                return None
            payload = {'tip_m': tip, 'scan_id': values.get('scan_id', '')}
            target = _parse_json(values.get('target_m', ''))
            if isinstance(target, list) and len(target) == 3:
                payload['target_m'] = target
            error = _as_float(values.get('error_m'))
            if error is not None:
                payload['error_m'] = error
            return KIND_TIP, payload
        return None

    # ------------------------------------------------------------ dose, registration, plan
    def _on_dose(self, msg: DoseRecord) -> None:
        if self._is_foreign('dose', msg.scan_id, msg.procedure_id):
            return   # another procedure's dose never enters this record
        self._log(topics.SCANNER_DOSE, 'igt_robot_msgs/msg/DoseRecord', msg)
        scan_id = msg.scan_id
        known = {s.scan_id for s in self.ledger.scans}
        if scan_id in known or scan_id in self._unverified_scans:
            return  # the same scan re-delivered: counted once
        reported = {'reported_scan_count': int(msg.scan_count),
                    'reported_total_dlp_mgy_cm': float(msg.total_dlp_mgy_cm)}
        length, length_source = self.p['scan_length_m'], 'parameter'
        if length <= 0.0:
            length_source = 'derived from DLP / CTDIvol (consistency check void)'
            length = msg.dlp_mgy_cm / (msg.ctdi_vol_mgy * CM_PER_M) if msg.ctdi_vol_mgy > 0 else 0.0
        stamp = msg_convert.stamp_ns(msg.header.stamp) * 1e-9
        try:
            scan = ct_scan(scan_id, ctdi_vol_mgy=msg.ctdi_vol_mgy, dlp_mgy_cm=msg.dlp_mgy_cm, kv=msg.kv, mas=msg.mas,
                           scan_length_m=length, protocol_name=msg.protocol_name,
                           body_region=self.p['body_region'], stamp=stamp, source=msg.source,
                           series_instance_uid=msg.series_instance_uid)
        except DoseValueError as exc:
            # Kept in the record (the scan happened) but not totalled: the figures are missing or implausible.
            self.get_logger().warning(f'dose of scan {scan_id!r} not totalled: {exc}')
            if self._append(KIND_DOSE_UNVERIFIED, {
                    'scan_id': scan_id, 'protocol_name': msg.protocol_name, 'ctdi_vol_mgy': msg.ctdi_vol_mgy,
                    'dlp_mgy_cm': msg.dlp_mgy_cm, 'kv': msg.kv, 'mas': msg.mas, 'stamp': stamp,
                    'reason': str(exc), **reported}) is not None:
                self._unverified_scans.add(scan_id)
            return
        totals = self.ledger.add(scan)
        payload = {**scan.to_dict(), 'scan_length_source': length_source, **reported}
        if (totals.ct_scan_count != msg.scan_count
                or not math.isclose(totals.total_dlp_mgy_cm, msg.total_dlp_mgy_cm, rel_tol=1e-6, abs_tol=1e-6)):
            payload['totals_mismatch'] = (f'ledger {totals.ct_scan_count} scans / {totals.total_dlp_mgy_cm:.1f} '
                                          f'mGy·cm, scanner interface {msg.scan_count} / '
                                          f'{msg.total_dlp_mgy_cm:.1f} mGy·cm')
        if self._append(KIND_DOSE, payload) is None:
            # Not committed: take it out again so a re-delivery can try once more.
            self.ledger = DoseLedger(s for s in self.ledger.scans if s.scan_id != scan_id)

    def _on_registration(self, msg: RegistrationResult) -> None:
        self._log(topics.REGISTRATION_RESULT, 'igt_robot_msgs/msg/RegistrationResult', msg)
        stamp = msg_convert.stamp_ns(msg.header.stamp)
        key = (stamp, msg.method, msg.image_source)
        if key in self._registration_keys:
            return
        payload = {'method': msg.method, 'accepted': bool(msg.accepted), 'rejection_reason': msg.rejection_reason,
                   'fre_m': msg.fre, 'predicted_tre_m': msg.predicted_tre,
                   'target_scanner_m': msg_convert.point_list(msg.target_scanner),
                   'fiducial_count': int(msg.fiducial_count), 'slices_used': int(msg.slices_used),
                   'residuals_m': list(msg.residuals), 'image_source': msg.image_source,
                   'frame_id': msg.transform.header.frame_id, 'child_frame_id': msg.transform.child_frame_id,
                   'T_base_scanner': msg_convert.transform_matrix(msg.transform.transform).tolist(),
                   'stamp_ns': stamp}
        if self._append(KIND_REGISTRATION, payload) is not None:
            self._registration_keys.add(key)

    def _on_plan(self, msg: NeedlePlan) -> None:
        self._log(topics.PLANNER_CURRENT_PLAN, 'igt_robot_msgs/msg/NeedlePlan', msg)
        stamp = msg_convert.stamp_ns(msg.header.stamp)
        key = (msg.plan_id, stamp)
        if key in self._plan_keys:
            return
        payload = {'plan_id': msg.plan_id, 'frame_id': msg.header.frame_id,
                   'entry_m': msg_convert.point_list(msg.entry), 'target_m': msg_convert.point_list(msg.target),
                   'direction': msg_convert.point_list(msg.direction), 'depth_m': msg.depth,
                   'insertion_depth_m': msg.insertion_depth, 'structure_names': list(msg.structure_names),
                   'min_clearance_m': list(msg.min_clearance), 'required_margin_m': list(msg.required_margin),
                   'skin_angle_rad': msg.skin_angle, 'joint_limit_margin': msg.joint_limit_margin,
                   'score': msg.score, 'reachable': bool(msg.reachable), 'feasible': bool(msg.feasible),
                   'reasons': list(msg.reasons), 'joint_names': list(msg.joint_solution.name),
                   'joint_positions': list(msg.joint_solution.position), 'stamp_ns': stamp}
        if self._append(KIND_PLAN, payload) is not None:
            self._plan_keys.add(key)

    # ------------------------------------------------------------ streams
    def _on_safety(self, msg: SafetyStatus) -> None:
        self._log(topics.SAFETY_STATUS, 'igt_robot_msgs/msg/SafetyStatus', msg)

    def _on_scanner(self, msg: ScannerState) -> None:
        phase = common.phase_from_msg(msg.phase).value
        changed = phase != self._scanner_phase
        self._log(topics.SCANNER_STATE, 'igt_robot_msgs/msg/ScannerState', msg, force=changed)
        if changed:
            self._scanner_phase = phase
            self._append(KIND_SCANNER, {'phase': phase, 'protocol_name': msg.protocol_name, 'source': msg.source,
                                        'is_ionising': bool(msg.is_ionising)})

    def _on_robot(self, msg: RobotState) -> None:
        moving = bool(msg.moving)
        changed = moving != self._moving
        self._log(topics.ROBOT_STATE, 'igt_robot_msgs/msg/RobotState', msg, force=changed)
        now = time.monotonic()
        if changed:
            self._moving = moving
            self._last_position_sample = now
            self._append(KIND_MOTION, {'moving': moving, 'joint_names': list(msg.joint_names),
                                       'position': list(msg.position), 'insertion_depth_m': msg.insertion_depth})
        elif moving and now - self._last_position_sample >= self.p['position_sample_period_s']:
            self._last_position_sample = now
            self._append(KIND_POSITION, {'position': list(msg.position), 'insertion_depth_m': msg.insertion_depth})

    def _on_joints(self, msg: JointState) -> None:
        self._log(topics.JOINT_STATES, 'sensor_msgs/msg/JointState', msg)

    # ------------------------------------------------------------ report and lifetime
    def write_report(self) -> str:
        """Write the HTML report from the committed record; returns its path."""
        from igt_robot.record.report import write_report
        entries = self.record.read_all()
        return write_report(self.report_path, entries, figure_pngs(self.record_dir),
                            title=f'Procedure {self.procedure_id}')

    def _on_write_report(self, request, response):
        try:
            response.message = self.write_report()
            response.success = True
        except Exception as exc:  # the operator must see why, the node keeps recording
            response.success = False
            response.message = f'report not written: {type(exc).__name__}: {exc}'
            self.get_logger().error(response.message)
        return response

    def _publish_diagnostics(self) -> None:
        summary = self.record.summary() if not self.record.closed else {'entries': 0, 'last_seq': 0}
        level = DiagnosticStatus.ERROR if self.failures else DiagnosticStatus.OK
        message = f'{self.failures} entries could not be recorded ({self.last_failure})' if self.failures \
            else 'recording'
        failed = self.record_failed
        if failed:
            level, message = DiagnosticStatus.ERROR, f'{RECORD_FAILED}: {failed}'
        values = {'record_dir': self.record_dir, 'entries': summary['entries'], 'last_seq': summary['last_seq'],
                  'mcap_messages': self.mcap.message_count if self.mcap else 0,
                  'foreign_messages_ignored': self.foreign_total}
        self.diagnostics.publish(common.diagnostic_array(
            self, [common.diagnostic_status(self, 'procedure record', level, message, values)]))

    def describe_state(self) -> str:
        totals = self.ledger.totals()
        mcap = f'{self.mcap.message_count} MCAP messages' if self.mcap else 'no MCAP'
        return (f'{self.procedure_id}: last seq {self.record.last_seq if not self.record.closed else "-"}, '
                f'{totals.ct_scan_count} CT scans ({totals.total_dlp_mgy_cm:.1f} mGy·cm), {mcap}, '
                f'{self.failures} failures; {self.record_dir}')

    def finalize(self) -> None:
        """Write the report (if configured), finish the MCAP, close the record; idempotent."""
        with self._lock:
            if self._finalized:
                return
        self._report_foreign()
        try:
            self.record.append(KIND_CLOSED, {'reason': 'recorder shut down', 'failures': self.failures,
                                             'lost_entries': self.lost_entries})
        except (RecordError, OSError) as exc:
            self.get_logger().error(f'record not closed cleanly ({exc}): the next start reports it as ended '
                                    'abnormally')
        with self._lock:
            self._finalized = True
        heartbeat = getattr(self, 'heartbeat', None)
        if heartbeat is not None:
            heartbeat.stop()
        if self.p['write_report_on_shutdown']:
            try:
                path = self.write_report()
                self.get_logger().info(f'report written to {path}')
            except Exception as exc:
                self.get_logger().error(f'report not written at shutdown: {exc}')
        if self.mcap is not None:
            try:
                self.mcap.close()
            except Exception as exc:
                self.get_logger().error(f'MCAP not finalised: {exc}')
        self.record.close()

    def on_bringup_shutdown(self) -> None:
        self.finalize()

    def destroy_node(self):
        self.finalize()
        return super().destroy_node()


def figure_pngs(record_dir: str) -> List[bytes]:
    """The report figures the procedure node left in ``<record_dir>/figures`` (PNG files, name order)."""
    pngs = []
    for path in sorted(glob.glob(os.path.join(record_dir, FIGURES_FOLDER, '*.png'))):
        try:
            with open(path, 'rb') as f:
                pngs.append(f.read())
        except OSError:
            continue
    return pngs


def main(args=None) -> int:
    return common.run_node(RecorderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
