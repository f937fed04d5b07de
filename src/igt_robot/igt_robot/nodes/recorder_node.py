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

* ``~/write_report`` (std_srvs/Trigger) writes ``<record_dir>/report.html`` from the record; it is
  also written at shutdown when ``write_report_on_shutdown`` is set.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from typing import Any, Dict, Optional

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
from igt_robot.record.dose import CM_PER_M
from igt_robot.workflow import CONFIRMATIONS
from igt_robot_msgs.msg import (DoseRecord, NeedlePlan, ProcedureEvent, RegistrationResult, RobotState, SafetyStatus,
                                ScannerState)

NODE_NAME = 'recorder_node'
KIND_DOSE_UNVERIFIED = 'dose_unverified'
KIND_RECORDER = 'recorder'
# Safety states entered by a transition that stops or prevents motion (an "interlock activation").
INTERLOCK_STATES = frozenset({'SCAN_HOLD', 'HOLD', 'FAULT', 'ESTOP'})
_ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')

PARAMS = [
    Param('procedure_id', '', 'procedure identifier (1-64 of [A-Za-z0-9_.-]); empty = start time '
                              'YYYYmmdd-HHMMSS', read_only=True),
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
    Param('diagnostics_period_s', 1.0, 'period of /diagnostics, s', 0.1, 60.0),
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
        procedure_id = self.p['procedure_id'] or time.strftime('%Y%m%d-%H%M%S')
        if not _ID_RE.match(procedure_id):
            raise ValueError(f"parameter 'procedure_id' = {procedure_id!r}: use 1-64 characters of [A-Za-z0-9_.-]")
        self.procedure_id = procedure_id
        self.record_dir = str(paths.record_dir(procedure_id, self.p['record_dir']))
        if not self.p['report_file'] or os.sep in self.p['report_file']:
            raise ValueError(f"parameter 'report_file' = {self.p['report_file']!r} must be a plain file name")
        self.report_path = os.path.join(self.record_dir, self.p['report_file'])

        self._lock = threading.Lock()          # dedup state, counters
        self.record = ProcedureRecord(self.record_dir)
        self.ledger = DoseLedger()
        self._event_keys, self._plan_keys, self._registration_keys = set(), set(), set()
        self._unverified_scans = set()
        self._load_existing()
        self.failures = 0
        self.last_failure = ''
        self._scanner_phase: Optional[str] = None
        self._moving: Optional[bool] = None
        self._finalized = False

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
                                     'resumed_at_seq': self.record.last_seq})

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
        self.get_logger().info(f'recording procedure {procedure_id} to {self.record_dir} (seq '
                               f'{self.record.last_seq}); MCAP: {self.mcap_path or "off"}')

    # ------------------------------------------------------------ setup
    def _load_existing(self) -> None:
        """Rebuild dedup keys and the dose ledger from a record that already has entries (restart)."""
        for entry in self.record.read_all():
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
        try:
            return self.record.append(kind, _json_safe(payload))
        except (RecordError, OSError) as exc:
            with self._lock:
                self.failures += 1
                self.last_failure = f'{kind}: {exc}'
            self.get_logger().error(f'could not record a {kind} entry: {exc}', throttle_duration_sec=1.0)
            return None

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
        self._log(topics.PROCEDURE_EVENTS, 'igt_robot_msgs/msg/ProcedureEvent', msg)
        values = msg_convert.key_values_dict(msg.values)
        payload = {'phase': msg.phase, 'severity': int(msg.severity), 'source': msg.source, 'kind': msg.kind,
                   'description': msg.description, 'values': values,
                   'stamp_ns': msg_convert.stamp_ns(msg.header.stamp)}
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
                           body_region=self.p['body_region'], stamp=stamp)
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
        if changed:
            self._moving = moving
            self._append(KIND_MOTION, {'moving': moving, 'joint_names': list(msg.joint_names),
                                       'position': list(msg.position), 'insertion_depth_m': msg.insertion_depth})

    def _on_joints(self, msg: JointState) -> None:
        self._log(topics.JOINT_STATES, 'sensor_msgs/msg/JointState', msg)

    # ------------------------------------------------------------ report and lifetime
    def write_report(self) -> str:
        """Write the HTML report from the committed record; returns its path."""
        from igt_robot.record.report import write_report
        entries = self.record.read_all()
        return write_report(self.report_path, entries, title=f'Procedure {self.procedure_id}')

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
        values = {'record_dir': self.record_dir, 'entries': summary['entries'], 'last_seq': summary['last_seq'],
                  'mcap_messages': self.mcap.message_count if self.mcap else 0}
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
            self._finalized = True
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


def main(args=None) -> int:
    return common.run_node(RecorderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
