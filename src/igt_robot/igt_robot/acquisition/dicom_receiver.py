"""DICOM network receiver: a Storage SCP the scanner or the PACS pushes series to (pynetdicom).

Configured with its AE title, address and port, and the calling AE titles allowed
to send (an association from any other is rejected, and the rejection recorded).
Presentation contexts: CT Image Storage, MR Image Storage and the X-Ray Radiation
Dose SR. Every accepted instance is durable on disk before the C-STORE is
answered with success (nothing acknowledged is lost: its bytes as received,
fdatasync'ed, renamed to its final name, the folder fsync'ed -- one flush per
instance, since the sender waits for each answer before it sends the next, so
batching flushes could only delay answers; the flush starts as the last fragment
of the instance arrives) and handed in memory to the
:class:`SeriesAssembler`; refused instances (a full disk among them) get a
failure status and a recorded reason. Completed series are assembled off the
network thread and put in the inbox; the volume stays in memory.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging
import os
import pathlib
import re
import socket
import struct
import tempfile
import threading
import time
from typing import Callable, List, Optional, Sequence

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
# pynetdicom's reader thread sleeps ``_run_loop_delay`` (1 ms) whenever it finds nothing to do: between the
# fragments of an instance, and before it sends the answer the handler queued for it (measured: ~0.55 ms per
# instance on the answer alone, of ~5.6 ms). While instances arrive on an association it polls every 0.1 ms;
# after 50 ms without one it is given back its own delay, since at 0.1 ms an idle open association cost 14 %
# of a core against 5 % (a scanner or PACS may keep one open between series).
FAST_POLL_S = 0.0001
FAST_POLL_QUIET_S = 0.05
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
        self._arriving = {}         # association -> _Arriving: the C-STORE whose fragments are arriving
        self._early = {}            # (association, message id) -> _EarlyStage: staged before its handler ran
        self._early_lock = threading.Lock()
        self._fast_polled = {}      # association -> [last P-DATA (monotonic s), pynetdicom's own poll delay]
        self._fast_lock = threading.Lock()
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
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_OPEN, _tune_association),
                    (evt.EVT_PDU_RECV, self._on_pdu), (evt.EVT_CONN_CLOSE, self._on_closed)]
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
            staged = self._early_stage(assoc, event.request, size) or \
                self._writer.submit(self._stage, raw, part10_header(
                    file_meta.MediaStorageSOPClassUID, file_meta.MediaStorageSOPInstanceUID,
                    file_meta.TransferSyntaxUID), str(event.request.AffectedSOPInstanceUID))
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
    # after the file meta go to a staging file, flushed to the disk (fdatasync) by a writer thread, started as
    # the last fragment arrives (below) while pynetdicom hands the message on and the network thread parses and
    # checks it; an accepted instance is then renamed into its series folder and that folder flushed (fsync).
    # A crash never leaves a half file under a final name; an instance answered with success survives a crash
    # or a power loss; a refused one leaves nothing. The folder flush stays per instance (~0.3 ms median on
    # this ext4 disk, the data flush ~1 ms): renaming before the data flush would save it on ext4 (one journal
    # commit) but open a window where a crash leaves a partial file under its final name.
    def _stage(self, body, header: bytes, sop_instance_uid: str) -> pathlib.Path:
        """The staging file of one instance: ``body`` is the dataset as received (a BytesIO, or the list of its
        fragments as they arrived), ``header`` its preamble and file meta (:func:`part10_header`)."""
        self._durable_folder(self._staging)
        fd, name = tempfile.mkstemp(suffix='.part', prefix=f'{_safe_name(sop_instance_uid)}.dcm.',
                                    dir=self._staging)       # a unique name: concurrent resends stay apart
        tmp = pathlib.Path(name)
        try:
            try:
                os.fchmod(fd, 0o644)
                _write_all(fd, header)
                if isinstance(body, io.BytesIO):
                    with body.getbuffer() as view:
                        _write_all(fd, view)
                else:
                    for fragment in body:
                        _write_all(fd, fragment)
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

    # ------------------------------------------------------------------ staging as the fragments arrive
    # The flush of an instance (fdatasync: ~1 ms on a quiet disk, more beside other writers) is started by the
    # reader thread when the last fragment of its dataset arrives, not when the handler runs: pynetdicom hands
    # a complete message to the association's thread by polling (up to ~1 ms later) and decodes it there, so the
    # flush overlaps that wait and the instance's checks instead of following them. The handler takes the early
    # staging file only when it is the very same message (association, message ID, SOP instance, byte count);
    # otherwise it stages the bytes pynetdicom assembled, as before. The success answer still waits for the flush.
    def _on_pdu(self, event) -> None:
        items = getattr(event.pdu, 'presentation_data_value_items', None)
        if not items:
            return                  # not a P-DATA-TF
        assoc = event.assoc
        self._poll_fast(assoc)
        arriving = self._arriving.get(assoc)
        for item in items:
            value = item.presentation_data_value
            header = value[0]
            if header & 1:          # command fragment
                if arriving is None or arriving.command_done:       # a new message
                    arriving = self._arriving[assoc] = _Arriving()
                arriving.command.append(value[1:])
                if header & 2:
                    arriving.command_complete(item.presentation_context_id, self.assembler.max_instance_bytes)
            elif arriving is not None and arriving.wanted:
                arriving.dataset.append(memoryview(value)[1:])
                arriving.size += len(value) - 1
                if arriving.size > self.assembler.max_instance_bytes:
                    arriving.wanted = False         # refused by size in the handler; nothing staged
                    arriving.dataset.clear()
                elif header & 2:
                    self._stage_early(assoc, arriving)
                    del self._arriving[assoc]
                    arriving = None

    def _poll_fast(self, assoc) -> None:
        dul = getattr(assoc, 'dul', None)
        if dul is None or not hasattr(dul, '_run_loop_delay'):
            return                  # a pynetdicom without the attribute: its own polling, nothing else changes
        with self._fast_lock:
            entry = self._fast_polled.get(assoc)
            if entry is None:
                self._fast_polled[assoc] = [time.monotonic(), dul._run_loop_delay]
                dul._run_loop_delay = min(dul._run_loop_delay, FAST_POLL_S)
            else:
                entry[0] = time.monotonic()

    def relax_quiet_associations(self, now: Optional[float] = None) -> None:
        """Give associations with no instance arriving for :data:`FAST_POLL_QUIET_S` their own poll delay."""
        now = time.monotonic() if now is None else now
        with self._fast_lock:
            for assoc, (last, own_delay) in list(self._fast_polled.items()):
                if now - last >= FAST_POLL_QUIET_S:
                    assoc.dul._run_loop_delay = own_delay
                    del self._fast_polled[assoc]

    def _stage_early(self, assoc, arriving) -> None:
        context = next((c for c in assoc.accepted_contexts if c.context_id == arriving.context_id), None)
        if context is None:
            return                  # refused by pynetdicom itself
        header = part10_header(arriving.sop_class_uid, arriving.sop_instance_uid, context.transfer_syntax[0])
        staged = self._writer.submit(self._stage, arriving.dataset, header, arriving.sop_instance_uid)
        with self._early_lock:
            self._early[(assoc, arriving.message_id)] = _EarlyStage(staged, arriving.sop_instance_uid,
                                                                    arriving.size)

    def _early_stage(self, assoc, request, size: int):
        """The staging of this C-STORE begun as its fragments arrived, if it is the very same message."""
        with self._early_lock:
            early = self._early.pop((assoc, request.MessageID), None)
        if early is None:
            return None
        if early.sop_instance_uid == str(request.AffectedSOPInstanceUID) and early.size == size:
            return early.staged
        self._discard(early.staged)
        return None

    def _on_closed(self, event) -> None:
        """An association gone before its handler took a staged instance (aborted): nothing of it stays staged."""
        self._arriving.pop(event.assoc, None)
        with self._fast_lock:
            self._fast_polled.pop(event.assoc, None)
        with self._early_lock:
            orphans = [key for key in self._early if key[0] is event.assoc]
            stages = [self._early.pop(key).staged for key in orphans]
        for staged in stages:
            self._discard(staged)

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
                self.relax_quiet_associations()
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


@dataclasses.dataclass
class _Arriving:
    """The fragments of one C-STORE request as they arrive on an association."""

    command: list = dataclasses.field(default_factory=list)
    dataset: list = dataclasses.field(default_factory=list)
    size: int = 0
    command_done: bool = False
    wanted: bool = False
    context_id: int = 0
    message_id: int = -1
    sop_class_uid: str = ''
    sop_instance_uid: str = ''

    def command_complete(self, context_id: int, max_bytes: int) -> None:
        from pynetdicom.dsutils import decode
        self.command_done = True
        try:
            command = decode(io.BytesIO(b''.join(self.command)), True, True)    # implicit VR little endian
            if int(command.CommandField) != 0x0001 or int(command.CommandDataSetType) == 0x0101:
                return              # not a C-STORE-RQ with a dataset
            self.message_id = int(command.MessageID)
            self.sop_class_uid = str(command.AffectedSOPClassUID)
            self.sop_instance_uid = str(command.AffectedSOPInstanceUID)
        except Exception:  # noqa: BLE001 -- left to pynetdicom and the handler, which refuse it with the reason
            return
        self.context_id, self.wanted = context_id, max_bytes > 0


@dataclasses.dataclass
class _EarlyStage:
    staged: concurrent.futures.Future
    sop_instance_uid: str
    size: int


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The DICOM file's preamble, prefix and File Meta Information (PS3.10 7.1; explicit VR little endian) for a
    received dataset, with the elements pynetdicom's ``event.file_meta`` carries. Encoded directly: pydicom's
    writer takes ~0.15 ms per instance on the path to the success answer."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    def element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b'OB':
            return struct.pack('<HH2s2xI', 0x0002, element, vr, len(value)) + value
        return struct.pack('<HH2sH', 0x0002, element, vr, len(value)) + value
    body = b''.join((
        element(0x0001, b'OB', b'\x00\x01', b'\x00'),
        element(0x0002, b'UI', str(sop_class_uid).encode('ascii'), b'\x00'),
        element(0x0003, b'UI', str(sop_instance_uid).encode('ascii'), b'\x00'),
        element(0x0010, b'UI', str(transfer_syntax_uid).encode('ascii'), b'\x00'),
        element(0x0012, b'UI', str(PYNETDICOM_IMPLEMENTATION_UID).encode('ascii'), b'\x00'),
        element(0x0013, b'SH', str(PYNETDICOM_IMPLEMENTATION_VERSION).encode('ascii'), b' ')))
    return b'\x00' * 128 + b'DICM' + struct.pack('<HH2sHI', 0x0002, 0x0000, b'UL', 4, len(body)) + body


def _tune_association(event) -> None:
    """Per association, before it starts (measured on 512×512 CT slices, ~0.5 MB each):

    * small replies (C-STORE-RSP) go out at once: Nagle's algorithm with delayed ACKs costs ~40 ms per instance,
      which caps a series at ~25 instances/s;
    * the reader takes what the socket holds in one call (pynetdicom reads 4 KiB per call: ~130 calls and
      buffer extensions per slice), and acknowledges each read at once (:func:`acknowledge_now`);
    * pynetdicom's standard logging handlers are unbound unless its logger shows DEBUG: they format every PDU
      and message (and copy every dataset, to say "Present") whatever the log level, ~0.3 ms per instance.
      Receptions and refusals are reported by ``on_event``.
    """
    assoc = event.assoc
    set_no_delay(assoc)
    sock = getattr(assoc.dul, 'socket', None)
    if sock is not None and getattr(sock, 'socket', None) is not None:
        sock.recv = functools.partial(_recv_exactly, sock)
    if not logging.getLogger('pynetdicom').isEnabledFor(logging.DEBUG):
        from pynetdicom import _handlers, evt
        for kind, handler in ((evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
                              (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
                              (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
                              (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler)):
            assoc.unbind(kind, handler)


_RECV_CHUNK = 1 << 20       # bytes per call at most: memory grows only as data arrives, whatever a PDU announces
# Linux only; None elsewhere (the ACKs are then the kernel's to time).
_TCP_QUICKACK = getattr(socket, 'TCP_QUICKACK', None)


def _recv_exactly(assoc_socket, nr_bytes: int) -> bytearray:
    """pynetdicom's ``AssociationSocket.recv`` contract (up to ``nr_bytes``; fewer when the peer closed; socket
    errors raised) with large reads, every read acknowledged at once (:func:`acknowledge_now`)."""
    sock = assoc_socket.socket
    data = bytearray()
    while len(data) < nr_bytes:
        chunk = sock.recv(min(nr_bytes - len(data), _RECV_CHUNK))
        acknowledge_now(sock)
        if not chunk:
            break
        data += chunk
    return data


def acknowledge_now(sock) -> None:
    """Have the kernel acknowledge what ``sock`` received at once rather than up to 40 ms later.

    From Orthanc, about 1 instance in 30 of a 512x512 CT stalled for 40-48 ms, Linux's delayed-ACK time (a
    sender with Nagle's algorithm on holds the short tail of a message until what went before is acknowledged):
    a quarter of the series' time. Linux leaves quick-ACK mode again by itself, so it is set after every read.
    """
    if _TCP_QUICKACK is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:         # closed under us: the read reports it
        pass


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
