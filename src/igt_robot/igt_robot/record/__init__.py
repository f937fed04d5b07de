"""Procedure record: durable event store, dose accounting, MCAP log and HTML report.

Pure Python (no rclpy): the recorder node converts ROS messages to plain dicts and
calls these. ``mcap_log`` and ``report`` import their heavy dependencies (mcap,
matplotlib) only when used.
"""
from .dose import (DoseLedger, DoseTotals, DoseValueError, K_FACTORS_MSV_PER_MGY_CM, ScanDose, ct_scan,
                   k_factor, mr_scan, scan_from_dict)
from .store import (KIND_CONFIRMATION, KIND_DOSE, KIND_EVENT, KIND_INTERLOCK, KIND_MOTION, KIND_PLAN,
                    KIND_RECOVERY, KIND_REGISTRATION, KIND_SCANNER, KIND_TIP, KIND_WORKFLOW, ProcedureRecord,
                    RecordClosedError, RecordCorruptError, RecordEntry, RecordError, RecordLockedError,
                    RecordPayloadError, RecoveryReport, read_entries)

__all__ = [
    'DoseLedger', 'DoseTotals', 'DoseValueError', 'K_FACTORS_MSV_PER_MGY_CM', 'ScanDose', 'ct_scan', 'k_factor',
    'mr_scan', 'scan_from_dict',
    'KIND_CONFIRMATION', 'KIND_DOSE', 'KIND_EVENT', 'KIND_INTERLOCK', 'KIND_MOTION', 'KIND_PLAN', 'KIND_RECOVERY',
    'KIND_REGISTRATION', 'KIND_SCANNER', 'KIND_TIP', 'KIND_WORKFLOW', 'ProcedureRecord', 'RecordClosedError',
    'RecordCorruptError', 'RecordEntry', 'RecordError', 'RecordLockedError', 'RecordPayloadError',
    'RecoveryReport', 'read_entries',
]
