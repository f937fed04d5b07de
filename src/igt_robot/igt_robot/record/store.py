"""Durable, append-only procedure record (one JSON-lines file per procedure).

Every entry is one line of ``events.jsonl``::

    {"kind":"dose","mono":1234.5,"payload":{...},"seq":17,"wall":"2025-01-02T03:04:05.678901Z","crc":"1a2b3c4d"}

* ``seq``     -- 1, 2, 3, ... without gaps; continues across reopenings.
* ``wall``    -- wall-clock time of the append, UTC, ISO 8601 (for people and for DICOM correlation).
* ``mono``    -- host monotonic clock (s) at the append; comparable between processes on one boot,
                 used for durations and for the timeline in the report.
* ``kind``    -- lower-case identifier: ``event``, ``plan``, ``registration``, ``interlock``,
                 ``confirmation``, ``dose``, ... (docs/record.md lists the payload of each).
* ``payload`` -- a JSON object; SI units, frames named in the key (``target_m`` in scanner LPS).
* ``crc``     -- CRC-32 (zlib) of the line's bytes *before* ``,"crc":...``, closed with ``}``.

Durability: :meth:`ProcedureRecord.append` returns only after ``os.write`` and
``os.fsync`` of the file (and of the directory when the file was created), so a
returned sequence number is *committed*: it survives a process crash or power
loss. A crash in the middle of a write leaves a torn last line; reopening the
record detects it (CRC or JSON failure), moves the torn bytes to
``events.jsonl.torn`` for forensics, truncates the file back to its last
committed line, records the repair as a ``record_recovery`` entry and continues
the sequence. A bad line *followed by good lines* is not a crash signature
(committed lines are never rewritten) and raises :class:`RecordCorruptError`
instead of silently dropping data.

Only one writer per record: the file is locked with ``flock`` while open.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import math
import os
import re
import threading
import time
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

EVENTS_FILE = 'events.jsonl'
TORN_SUFFIX = '.torn'

# Well-known kinds (free-form lower-case identifiers are accepted as well).
KIND_EVENT = 'event'
KIND_PLAN = 'plan'
KIND_REGISTRATION = 'registration'
KIND_INTERLOCK = 'interlock'
KIND_CONFIRMATION = 'confirmation'
KIND_DOSE = 'dose'
KIND_SCANNER = 'scanner'
KIND_MOTION = 'motion'
KIND_TIP = 'tip'
KIND_WORKFLOW = 'workflow'
KIND_RECOVERY = 'record_recovery'
# Session markers: a recorder session starts with ``recorder`` and ends with ``record_closed`` (normal end)
# or, found unfinished at the next start, ``ended_abnormally``.
KIND_SESSION_START = 'recorder'
KIND_CLOSED = 'record_closed'
KIND_ABNORMAL_END = 'ended_abnormally'
KIND_RECORD_GAP = 'record_gap'
KIND_POSITION = 'position'        # needle position sampled while the robot moves

# Free space a procedure needs in its record folder (docs/record.md, "Disk space"), from a real demo record:
# one simulated CT scan (DICOM series + label map) is 4.0 MiB; a procedure has about 8 scans (planning,
# control scans, unexpected scan, confirmation) = 33 MiB, plus events, MCAP and report (< 1 MiB); x3 for
# longer procedures.
PROCEDURE_SPACE_BYTES = 100 * 1024 * 1024

_KIND_RE = re.compile(r'^[a-z][a-z0-9_]{0,63}$')
# The CRC trailer has a fixed shape so it can be split off the raw bytes without
# re-serialising (re-serialisation could differ and give false CRC failures).
_CRC_TRAILER_RE = re.compile(rb',"crc":"([0-9a-f]{8})"\}$')


class RecordError(Exception):
    """Base class of procedure-record errors."""


class RecordPayloadError(RecordError, ValueError):
    """The payload cannot be stored (not a mapping, not JSON-serialisable, NaN/inf)."""


class RecordCorruptError(RecordError):
    """A committed line in the middle of the record fails validation (not a torn tail)."""


class RecordLockedError(RecordError):
    """Another ProcedureRecord (in this or another process) holds the record open."""


class RecordClosedError(RecordError):
    """append()/read on a closed record."""


@dataclasses.dataclass(frozen=True)
class RecordEntry:
    """One committed entry. ``mono`` in seconds (host monotonic clock); ``wall`` ISO 8601 UTC."""

    seq: int
    wall: str
    mono: float
    kind: str
    payload: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    """What reopening had to repair: a torn tail truncated at byte ``truncated_at``."""

    truncated_at: int          # file size after the repair (bytes)
    torn_bytes: int            # bytes moved to the side file
    torn_lines: int            # (partial) lines removed
    reason: str                # why the first removed line was rejected
    side_file: str             # where the torn bytes were kept
    last_seq: int              # last committed sequence number kept


def _json_default(obj):
    # numpy values arrive from the core all the time; store them as plain JSON.
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, 'value') and isinstance(getattr(obj, 'value'), (str, int)):  # enums
        return obj.value
    raise TypeError(f'{type(obj).__name__} is not JSON-serialisable')


def _find_non_finite(obj, path='payload'):
    """Path of the first NaN/inf in a JSON-like structure, or None (for a precise error)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            p = _find_non_finite(v, f'{path}.{k}')
            if p:
                return p
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            p = _find_non_finite(v, f'{path}[{i}]')
            if p:
                return p
    return None


def encode_line(seq: int, wall: str, mono: float, kind: str, payload: Mapping) -> bytes:
    """Serialise one entry to its line (with CRC trailer and newline)."""
    if not isinstance(payload, Mapping):
        raise RecordPayloadError(f'payload must be a mapping (dict), got {type(payload).__name__}')
    body = {'kind': kind, 'mono': float(mono), 'payload': payload, 'seq': int(seq), 'wall': wall}
    try:
        text = json.dumps(body, sort_keys=True, separators=(',', ':'), allow_nan=False,
                          default=_json_default, ensure_ascii=True)
    except ValueError as exc:
        # json reports NaN without saying where; find the key for the operator/developer.
        normalised = json.loads(json.dumps(payload, default=_json_default))
        where = _find_non_finite(normalised) or 'payload'
        raise RecordPayloadError(f'{where} is NaN or infinite; JSON records only finite numbers') from exc
    except TypeError as exc:
        raise RecordPayloadError(f'payload of kind {kind!r}: {exc}') from exc
    raw = text.encode('ascii')
    crc = zlib.crc32(raw) & 0xFFFFFFFF
    return raw[:-1] + b',"crc":"%08x"}\n' % crc


def decode_line(line: bytes) -> RecordEntry:
    """Validate and parse one line (without its newline); raise ValueError naming the problem."""
    m = _CRC_TRAILER_RE.search(line)
    if not m:
        raise ValueError('missing or malformed CRC trailer')
    body = line[:m.start()] + b'}'
    expected = int(m.group(1), 16)
    actual = zlib.crc32(body) & 0xFFFFFFFF
    if actual != expected:
        raise ValueError(f'CRC mismatch (stored {expected:08x}, computed {actual:08x})')
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f'invalid JSON: {exc}') from exc
    try:
        entry = RecordEntry(seq=int(obj['seq']), wall=str(obj['wall']), mono=float(obj['mono']),
                            kind=str(obj['kind']), payload=dict(obj['payload']))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f'missing or invalid field: {exc}') from exc
    return entry


def _scan(data: bytes):
    """Split file content into (entries, good_end_offset, problem).

    ``problem`` is None when every line is valid, else (offset, line_index, reason, is_tail).
    """
    entries: List[RecordEntry] = []
    pos = 0
    index = 0
    n = len(data)
    while pos < n:
        nl = data.find(b'\n', pos)
        end = n if nl < 0 else nl
        line = data[pos:end]
        reason = None
        if nl < 0:
            reason = 'incomplete last line (no newline)'
        else:
            try:
                entry = decode_line(line)
            except ValueError as exc:
                reason = str(exc)
            else:
                expected_seq = entries[-1].seq + 1 if entries else None
                if expected_seq is not None and entry.seq != expected_seq:
                    reason = f'sequence {entry.seq} where {expected_seq} was expected'
        if reason is not None:
            # A torn tail: nothing valid may follow the first bad line.
            rest_valid = _any_valid_line(data[(end + 1):]) if nl >= 0 else False
            return entries, pos, (pos, index, reason, not rest_valid)
        entries.append(entry)
        pos = end + 1
        index += 1
    return entries, pos, None


def _any_valid_line(data: bytes) -> bool:
    for line in data.split(b'\n'):
        if not line:
            continue
        try:
            decode_line(line)
            return True
        except ValueError:
            continue
    return False


def _utc_iso(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s, tz=datetime.timezone.utc).strftime(
        '%Y-%m-%dT%H:%M:%S.%fZ')


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path) -> int:
    """Bytes available to this (unprivileged) user on the filesystem of ``path`` (or its nearest parent)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_free_space(path, needed: int = PROCEDURE_SPACE_BYTES) -> Optional[str]:
    """None if ``path``'s filesystem has ``needed`` bytes free, else the reason (operator-readable)."""
    try:
        free = free_bytes(path)
    except OSError as exc:
        return f'free space of {path} unknown: {exc}'
    if free < needed:
        return (f'only {free / 2**20:.1f} MiB free for the record in {path}; a procedure needs '
                f'{needed / 2**20:.0f} MiB')
    return None


def describe_os_error(exc: BaseException) -> str:
    """'ENOSPC (No space left on device)'-style text naming the cause of a failed write."""
    import errno
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f'{name} ({os.strerror(exc.errno)})'
    return f'{type(exc).__name__}: {exc}'


def session_open(entries: Sequence[RecordEntry]) -> bool:
    """True if the last recorder session in ``entries`` was started and never closed (ended abnormally)."""
    for entry in reversed(entries):
        if entry.kind in (KIND_CLOSED, KIND_ABNORMAL_END):
            return False
        if entry.kind == KIND_SESSION_START:
            return True
    return False


def record_locked(directory) -> bool:
    """True if a live ProcedureRecord (any process) holds ``directory``'s record open."""
    path = os.path.join(os.fspath(directory), EVENTS_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def find_unfinished_records(root, exclude: Sequence[str] = ()) -> List[str]:
    """Record folders directly under ``root`` whose last session never closed and that no live process holds."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    skip = {os.path.realpath(p) for p in exclude}
    found = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.realpath(folder) in skip or not os.path.isfile(os.path.join(folder, EVENTS_FILE)):
            continue
        if record_locked(folder):
            continue   # its recorder is alive
        try:
            entries = read_entries(folder)
        except (OSError, RecordError) as exc:   # unreadable: leave it for a person, do not touch
            del exc
            continue
        if session_open(entries):
            found.append(folder)
    return found


def last_known_state(entries: Sequence[RecordEntry]) -> Dict[str, Any]:
    """What the record knew last: needle depth, last scan, dose so far, last entry (for an abnormal end)."""
    state: Dict[str, Any] = {'last_seq': entries[-1].seq if entries else 0,
                             'last_entry_wall': entries[-1].wall if entries else '',
                             'last_entry_kind': entries[-1].kind if entries else '',
                             'last_insertion_depth_m': None, 'last_scan': '', 'ct_scan_count': 0,
                             'total_dlp_mgy_cm': 0.0, 'workflow': ''}
    for e in entries:
        p = e.payload
        if e.kind in (KIND_MOTION, KIND_POSITION) and p.get('insertion_depth_m') is not None:
            state['last_insertion_depth_m'] = p['insertion_depth_m']
        elif e.kind == KIND_DOSE:
            state['ct_scan_count'] += 1 if p.get('modality', 'CT') == 'CT' else 0
            state['total_dlp_mgy_cm'] += float(p.get('dlp_mgy_cm') or 0.0)
            state['last_scan'] = str(p.get('scan_id', '')) or state['last_scan']
        elif e.kind == KIND_EVENT and p.get('kind') == 'scan_acquired':
            state['last_scan'] = str(p.get('values', {}).get('scan_id', '')) or state['last_scan']
        elif e.kind == KIND_WORKFLOW and p.get('accepted'):
            state['workflow'] = f"{p.get('phase', '')}/{p.get('step', '')}"
    state['total_dlp_mgy_cm'] = round(state['total_dlp_mgy_cm'], 3)
    return state


def read_entries(path: str) -> List[RecordEntry]:
    """Read a record (directory or events.jsonl) without opening it for writing.

    A torn tail is ignored (not repaired: this is a read-only view); corruption in
    the middle raises :class:`RecordCorruptError`.
    """
    file_path = os.path.join(path, EVENTS_FILE) if os.path.isdir(path) else path
    with open(file_path, 'rb') as f:
        data = f.read()
    entries, _, problem = _scan(data)
    if problem is not None and not problem[3]:
        raise RecordCorruptError(f'{file_path}: line {problem[1] + 1} (byte {problem[0]}) is invalid '
                                 f'({problem[2]}) but valid lines follow it')
    return entries


class ProcedureRecord:
    """Append-only, crash-safe procedure record in ``directory/events.jsonl``.

    Thread-safe (one lock around every file operation). ``wall_clock`` (epoch s)
    and ``mono_clock`` (s) are injectable for tests; defaults ``time.time`` and
    ``time.monotonic``. ``fsync=False`` is only for benchmarks comparing cost: it
    voids the durability guarantee.
    """

    def __init__(self, directory: str, *, wall_clock: Callable[[], float] = time.time,
                 mono_clock: Callable[[], float] = time.monotonic, fsync: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.path = os.path.join(self.directory, EVENTS_FILE)
        self.torn_path = self.path + TORN_SUFFIX
        self._wall_clock = wall_clock
        self._mono_clock = mono_clock
        self._fsync = fsync
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self.recovery: Optional[RecoveryReport] = None

        parent = os.path.dirname(self.directory)
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, exist_ok=True)
            if fsync:
                fsync_dir(parent)  # make the new directory entry itself durable
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RecordLockedError(f'{self.path} is already open for writing by another '
                                        'ProcedureRecord') from exc
            if created and fsync:
                os.fsync(fd)
                fsync_dir(self.directory)
            self._fd = fd
            self._validate_and_repair()
        except BaseException:
            os.close(fd)
            self._fd = None
            raise
        if self.recovery is not None:
            self.append(KIND_RECOVERY, dataclasses.asdict(self.recovery))

    # ------------------------------------------------------------------ opening
    def _validate_and_repair(self) -> None:
        fd = self._fd
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b''
        entries, good_end, problem = _scan(data)
        if problem is not None:
            offset, index, reason, is_tail = problem
            if not is_tail:
                raise RecordCorruptError(
                    f'{self.path}: line {index + 1} (byte {offset}) is invalid ({reason}) but valid lines '
                    'follow it; committed data is never rewritten, so this is not a crash signature. '
                    'Investigate the file before appending to it.')
            torn = data[offset:]
            # Keep the evidence durable *before* removing it from the record.
            with open(self.torn_path, 'ab') as side:
                side.write(torn)
                side.flush()
                if self._fsync:
                    os.fsync(side.fileno())
            if self._fsync:
                fsync_dir(self.directory)
            os.ftruncate(fd, offset)
            if self._fsync:
                os.fsync(fd)
            self.recovery = RecoveryReport(
                truncated_at=offset, torn_bytes=len(torn), torn_lines=torn.count(b'\n') + (not torn.endswith(b'\n')),
                reason=reason, side_file=self.torn_path, last_seq=entries[-1].seq if entries else 0)
            size = offset
        self._size = size
        self._count = len(entries)
        self._next_seq = entries[-1].seq + 1 if entries else 1
        self._kinds: Dict[str, int] = {}
        for e in entries:
            self._kinds[e.kind] = self._kinds.get(e.kind, 0) + 1
        self._first_wall = entries[0].wall if entries else None
        self._last_wall = entries[-1].wall if entries else None

    # ------------------------------------------------------------------ writing
    def append(self, kind: str, payload: Mapping[str, Any]) -> int:
        """Append one entry; return its sequence number once it is committed (fsync'ed).

        Raises :class:`RecordPayloadError` for a bad kind/payload (nothing written),
        :class:`RecordClosedError` after close(), OSError if the disk fails (the
        partial line is removed again, so the file stays valid).
        """
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise RecordPayloadError(f'kind must be a lower-case identifier ([a-z][a-z0-9_]*), got {kind!r}')
        with self._lock:
            if self._fd is None:
                raise RecordClosedError(f'{self.path} is closed')
            seq = self._next_seq
            wall = _utc_iso(self._wall_clock())
            line = encode_line(seq, wall, self._mono_clock(), kind, payload)
            try:
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(self._fd)
            except OSError:
                # Remove a partial line so later appends don't glue onto it.
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
                raise
            self._size += len(line)
            self._next_seq = seq + 1
            self._count += 1
            self._kinds[kind] = self._kinds.get(kind, 0) + 1
            if self._first_wall is None:
                self._first_wall = wall
            self._last_wall = wall
            return seq

    # ------------------------------------------------------------------ reading
    def read_all(self) -> List[RecordEntry]:
        """All committed entries, validated, in sequence order."""
        with self._lock:
            if self._fd is None:
                raise RecordClosedError(f'{self.path} is closed')
            data = os.pread(self._fd, self._size, 0) if self._size else b''
        entries, _, problem = _scan(data)
        if problem is not None:
            raise RecordCorruptError(f'{self.path}: line {problem[1] + 1} became invalid ({problem[2]})')
        return entries

    def summary(self) -> Dict[str, Any]:
        """Counts and time span: entries, last_seq, kinds {kind: n}, first/last wall time, recovery."""
        with self._lock:
            return {
                'path': self.path,
                'entries': self._count,
                'last_seq': self._next_seq - 1,
                'kinds': dict(sorted(self._kinds.items())),
                'first_wall': self._first_wall,
                'last_wall': self._last_wall,
                'bytes': self._size,
                'recovered': dataclasses.asdict(self.recovery) if self.recovery else None,
            }

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._next_seq - 1

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the lock and the file (idempotent). Committed data needs no flush."""
        with self._lock:
            if self._fd is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._fd)
                    self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> 'ProcedureRecord':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort only
        try:
            self.close()
        except Exception:
            pass
