"""DICOM network receiver: a Storage SCP the scanner or the PACS pushes series to (pynetdicom).

Configured with its AE title, address and port, and the calling AE titles allowed
to send (an association from any other is rejected, and the rejection recorded).
Presentation contexts: CT Image Storage, MR Image Storage and the X-Ray Radiation
Dose SR. Every accepted instance is durable on disk before the C-STORE is
answered with success (nothing acknowledged is lost: its bytes as received,
fdatasync'ed, renamed to its final name, the folder fsync'ed -- one flush per
instance, since the sender waits for each answer before it sends the next, so
batching flushes could only delay answers) and handed in memory to the
:class:`SeriesAssembler`; refused instances (a full disk among them) get a
failure status and a recorded reason. Completed series are assembled off the
network thread and put in the inbox; the volume stays in memory.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import pathlib
import re
import socket
import tempfile
import threading
from typing import Callable, List, Optional, Sequence

from pydicom.filewriter import write_file_meta_info

from igt_robot.record.store import fsync_dir

from .assembler import ACCEPTED_SOP_CLASSES, SeriesAssembler, build_series
from .base import AcquisitionSource, IrradiationEvent
from .dose import DoseReportError, read_rdsr

_log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_MATCHING_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
_AE_TITLE = re.compile(r'^[\x20-\x5b\x5d-\x7e]{1,16}$')    # DICOM AE: 16 chars, no backslash


def check_ae_title(title: str) -> str:
    title = str(title).strip()
    if not _AE_TITLE.match(title):
        raise ValueError(f'AE title {title!r} must be 1-16 printable characters without a backslash')
    return title


class DicomReceiver(AcquisitionSource):
    """Storage SCP; ``on_event(kind, description, values)`` reports receptions and refusals."""

    kind = 'dicom'

    def __init__(self, storage_dir, *, ae_title: str = 'IGT_ROBOT', host: str = '127.0.0.1', port: int = 11112,
                 allowed_calling_aets: Sequence[str] = (), modalities=('CT', 'MR'), quiet_period_s: float = 5.0,
                 max_instance_bytes: int = 16 * 1024 * 1024,
                 on_event: Optional[Callable[[str, str, dict], None]] = None):
        super().__init__()
        self.storage_dir = pathlib.Path(storage_dir)
        self.ae_title = check_ae_title(ae_title)
        self.host, self.port = host, int(port)
        self.allowed_calling_aets = tuple(check_ae_title(a) for a in allowed_calling_aets if str(a).strip())
        self.assembler = SeriesAssembler(modalities=modalities, quiet_period_s=quiet_period_s,
                                         max_instance_bytes=max_instance_bytes)
        self.on_event = on_event or (lambda kind, text, values: _log.info(text))
        self._events: List[IrradiationEvent] = []
        self._events_lock = threading.Lock()
        self._server = None
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._count = 0
        self._durable_folders = set()
        self._staging = self.storage_dir / '.incoming'
        self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.instances_received = 0
        self.refusals: List[str] = []

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        if self._server is not None:
            return
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix='dicom-store')
        ae = AE(ae_title=self.ae_title)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 0          # no limit: fewer PDUs per slice
        if self.allowed_calling_aets:
            ae.require_calling_aet = list(self.allowed_calling_aets)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_OPEN, _no_delay)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]       # port 0 -> the one the OS chose
        self._stop.clear()
        self._worker = threading.Thread(target=self._assemble_loop, name='dicom-series', daemon=True)
        self._worker.start()
        self.on_event('dicom_receiver_started', f'DICOM receiver {self.ae_title} listening on '
                      f'{self.host}:{self.port} (calling AE titles: '
                      f'{", ".join(self.allowed_calling_aets) or "any"})', {'port': self.port})

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self._writer.shutdown(wait=True)
        self._stop.set()
        if self._worker is not None:
            self._worker.join(5.0)
        self._poll()        # what completed meanwhile still reaches the inbox

    def describe(self) -> str:
        return f'DICOM {self.ae_title}@{self.host}:{self.port}'

    def rdsr_events(self) -> List[IrradiationEvent]:
        with self._events_lock:
            return list(self._events)

    # ------------------------------------------------------------------ network thread
    def _refuse(self, status: int, reason: str, values: dict) -> int:
        self.refusals.append(reason)
        self.on_event('dicom_instance_refused', f'DICOM instance refused: {reason}', dict(values, reason=reason))
        return status

    def _on_store(self, event) -> int:
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        raw = event.request.DataSet
        size = raw.getbuffer().nbytes if raw is not None else 0     # no copy of the (large) dataset
        values = {'calling_ae': calling, 'bytes': size}
        if size > self.assembler.max_instance_bytes:      # before decoding it at all
            return self._refuse(STATUS_OUT_OF_RESOURCES, f'instance of {size} bytes from {calling} exceeds the '
                                f'limit of {self.assembler.max_instance_bytes} bytes', values)
        try:
            file_meta = event.file_meta
            staged = self._writer.submit(self._stage, raw, file_meta, str(event.request.AffectedSOPInstanceUID))
        except Exception as exc:  # noqa: BLE001 -- a malformed request is refused, not fatal
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f'unreadable request from {calling}: {exc}', values)
        try:
            return self._take(event, raw, file_meta, staged, calling, size, values)
        finally:
            self._discard(staged)       # refused or not stored: no staged file stays behind

    def _take(self, event, raw, file_meta, staged, calling, size, values) -> int:
        """Parse and check the instance while its bytes are being written and flushed (``staged``)."""
        try:
            ds = event.dataset          # pydicom defers converting values until they are read
            ds.file_meta = file_meta
        except Exception as exc:  # noqa: BLE001 -- a malformed dataset is refused, not fatal
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f'unreadable dataset from {calling}: {exc}', values)
        verdict = self.assembler.check(ds, size)
        if not verdict.accepted:
            status = {'size': STATUS_OUT_OF_RESOURCES, 'sop_class': STATUS_SOP_CLASS_NOT_SUPPORTED,
                      'modality': STATUS_NOT_MATCHING_SOP_CLASS}.get(verdict.problem, STATUS_CANNOT_UNDERSTAND)
            return self._refuse(status, f'{verdict.reason} (from {calling})', values)
        if verdict.kind == 'rdsr':
            return self._store_rdsr(staged, ds, calling, values)
        folder = self.storage_dir / _safe_name(verdict.series_instance_uid)
        try:
            self._commit(staged, folder / f'{_safe_name(str(ds.SOPInstanceUID))}.dcm')
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f'cannot store the instance: {exc}', values)
        self.assembler.add(ds, calling, size, verdict)
        self.instances_received += 1
        return STATUS_SUCCESS

    def _store_rdsr(self, staged, ds, calling, values) -> int:
        try:
            events = read_rdsr(ds)
        except DoseReportError as exc:
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f'dose report from {calling} unreadable: {exc}', values)
        try:
            self._commit(staged, self.storage_dir / 'dose_reports' / f'{_safe_name(str(ds.SOPInstanceUID))}.dcm')
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f'cannot store the dose report: {exc}', values)
        with self._events_lock:
            known = {e.irradiation_event_uid for e in self._events}
            fresh = [e for e in events if e.irradiation_event_uid not in known]
            self._events.extend(fresh)
        self.on_event('dose_report_received', f'radiation dose SR from {calling}: {len(events)} irradiation '
                      f'event(s), {len(fresh)} new', dict(values, events=len(events)))
        return STATUS_SUCCESS

    # Durable storage, before the C-STORE is answered. The bytes as received (never decoded and re-encoded)
    # after the file meta go to a staging file, flushed to the disk (fdatasync) by a writer thread while the
    # network thread parses and checks the instance (the two overlap: ~1 ms of the ~5 ms an instance may take
    # at 200 instances/s); an accepted instance is then renamed into its series folder and that folder flushed
    # (fsync). A crash never leaves a half file under a final name; an instance answered with success survives
    # a crash or a power loss; a refused one leaves nothing.
    def _stage(self, raw, file_meta, sop_instance_uid: str) -> pathlib.Path:
        self._durable_folder(self._staging)
        header = io.BytesIO()
        header.write(b'\x00' * 128 + b'DICM')
        write_file_meta_info(header, file_meta)
        fd, name = tempfile.mkstemp(suffix='.part', prefix=f'{_safe_name(sop_instance_uid)}.dcm.',
                                    dir=self._staging)       # a unique name: concurrent resends stay apart
        tmp = pathlib.Path(name)
        try:
            try:
                os.fchmod(fd, 0o644)
                with raw.getbuffer() as body:
                    _write_all(fd, header.getbuffer())
                    _write_all(fd, body)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)          # a full disk keeps no partial file
            raise
        return tmp

    def _commit(self, staged, path: pathlib.Path) -> None:
        tmp = staged.result()           # OSError: not stored
        self._durable_folder(path.parent)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def _discard(staged) -> None:
        try:
            tmp = staged.result()
        except OSError:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)          # committed ones were renamed away

    def _durable_folder(self, folder: pathlib.Path) -> None:
        """Create ``folder`` (once per series) with its entry in the parent flushed to the disk."""
        if folder in self._durable_folders:
            return
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            fsync_dir(created.parent)
        self._durable_folders.add(folder)

    def _on_rejected(self, event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        self._refuse(0, f'association from calling AE title {calling!r} rejected: not among the allowed '
                     f'({", ".join(self.allowed_calling_aets)})', {'calling_ae': calling})

    def _on_aborted(self, event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        self.on_event('dicom_association_aborted', f'association from {calling} aborted; instances received so far '
                      'are kept', {'calling_ae': calling})

    # ------------------------------------------------------------------ assembling
    def _assemble_loop(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 -- never let the worker die silently
                _log.exception('series assembly failed')

    def _poll(self) -> None:
        self.assembler.decode_arrived()
        complete, incomplete = self.assembler.poll()
        for pending, reason in incomplete:
            self.refusals.append(reason)
            self.on_event('dicom_series_incomplete', f'series {pending.uid}: {reason}',
                          {'series_instance_uid': pending.uid, 'reason': reason})
        for pending in complete:
            self._count += 1
            series = build_series(pending, f'rx{self._count:03d}', self.kind,
                                  self.storage_dir / _safe_name(pending.uid))
            if series.refused:
                self.refusals.append(series.refused)
                self.on_event('dicom_series_refused', f'{series.describe()} refused: {series.refused}',
                              {'series_instance_uid': series.series_instance_uid, 'reason': series.refused})
            else:
                self.on_event('dicom_series_received', f'{series.describe()} complete',
                              {'series_instance_uid': series.series_instance_uid,
                               'instances': series.instance_count})
            self.inbox.put(series)


def _no_delay(event) -> None:
    """Small replies (C-STORE-RSP) go out at once: Nagle's algorithm with delayed ACKs costs ~40 ms per
    instance, which caps a series at ~25 instances/s."""
    set_no_delay(event.assoc)


def set_no_delay(assoc) -> None:
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):       # no socket yet / already closed: nothing to tune
        pass


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _safe_name(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    return re.sub(r'[^0-9A-Za-z.]', '_', uid)[:128] or 'unnamed'
