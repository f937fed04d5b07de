"""Abnormal ends: find a record whose recorder never closed it, close it with ``ended_abnormally``, report it.

A recorder session starts with a ``recorder`` entry and a normal shutdown ends it with
``record_closed``. A session without its end (the recorder was killed, the machine lost power) is found
by the next recorder start (:func:`close_unfinished`): the record is reopened (a torn last line is
repaired by the store), an ``ended_abnormally`` entry states what the record knew last (needle depth,
last scan, dose so far, last entry time) and what was lost (the MCAP's unflushed tail), and the report
is written. The JSON-lines record itself loses nothing: every entry is fsync'ed before it counts.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional

from .store import (KIND_ABNORMAL_END, KIND_SESSION_START, ProcedureRecord, find_unfinished_records,
                    last_known_state, session_open)

MCAP_FOLDER = 'mcap'


def _iso_ns(ns: Optional[int]) -> str:
    if ns is None:
        return ''
    return datetime.datetime.fromtimestamp(ns * 1e-9, tz=datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def unfinished_mcaps(folder: str, entries) -> List[Dict[str, Any]]:
    """Status of the MCAP file(s) of the last session (those not finalised are what lost data)."""
    from .mcap_log import mcap_file_status
    paths = []
    for entry in reversed(entries):
        if entry.kind == KIND_SESSION_START:
            if entry.payload.get('mcap'):
                paths.append(entry.payload['mcap'])
            break
    out = []
    for path in paths:
        if not os.path.isfile(path):
            out.append({'path': path, 'missing': True})
            continue
        try:
            status = mcap_file_status(path)
        except Exception as exc:  # noqa: BLE001 -- reported, never fatal for the close
            status = {'path': path, 'read_error': f'{type(exc).__name__}: {exc}', 'finalised': False}
        status['last_log_time'] = _iso_ns(status.get('last_log_time_ns'))
        out.append(status)
    return out


def close_session(record: ProcedureRecord, detected_by: str, flush_period_s: float = 0.0) -> Dict[str, Any]:
    """Append ``ended_abnormally`` to an open record whose last session never closed; return its payload."""
    entries = record.read_all()
    payload = {'detected_by': detected_by, **last_known_state(entries),
               'mcap': unfinished_mcaps(record.directory, entries),
               'mcap_flush_period_s': float(flush_period_s),
               'record_loss': 'none: every record entry is fsync\'ed before it counts'}
    if record.recovery is not None:
        payload['torn_tail_bytes'] = record.recovery.torn_bytes
    record.append(KIND_ABNORMAL_END, payload)
    return payload


def close_unfinished(folder: str, detected_by: str, report_file: str = 'report.html',
                     flush_period_s: float = 0.0, figures=None) -> Dict[str, Any]:
    """Close one unfinished record (see the module docstring) and write its report; returns the payload."""
    from .report import write_report
    with ProcedureRecord(folder) as record:
        entries = record.read_all()
        if not session_open(entries):
            return {}
        payload = close_session(record, detected_by, flush_period_s)
        entries = record.read_all()
    name = os.path.basename(os.path.normpath(folder))
    payload['report'] = write_report(os.path.join(folder, report_file), entries,
                                     figures(folder) if figures else (),
                                     title=f'Procedure {name} (ended abnormally)')
    return payload


def close_all_unfinished(root: str, exclude=(), **kwargs) -> List[Dict[str, Any]]:
    """:func:`close_unfinished` for every unfinished record folder under ``root`` (other than ``exclude``)."""
    closed = []
    for folder in find_unfinished_records(root, exclude):
        try:
            payload = close_unfinished(folder, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- one bad folder must not stop the others or the recorder
            payload = {'folder': folder, 'error': f'{type(exc).__name__}: {exc}'}
        if payload:
            payload.setdefault('folder', folder)
            closed.append(payload)
    return closed
