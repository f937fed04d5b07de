"""A watched folder as an image source: the scanner (or a DICOM router) exports files into it.

The folder is scanned every ``poll_s``. A file is taken once its size and
modification time have not changed for ``settle_s`` (the exporter has finished
writing it); each is read with pydicom and goes through the same
:class:`SeriesAssembler` as network instances (same refusals, same completion:
announced count or quiet period). Files are never moved or deleted: the folder
is the record of what arrived. Unreadable or refused files are reported once.
"""
from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from .assembler import SeriesAssembler, build_series
from .base import AcquisitionSource
from .dose import DoseReportError, read_rdsr


class WatchedFolder(AcquisitionSource):
    kind = 'folder'

    def __init__(self, folder, *, modalities=('CT', 'MR'), quiet_period_s: float = 5.0, poll_s: float = 0.5,
                 settle_s: float = 1.0, max_instance_bytes: int = 16 * 1024 * 1024,
                 on_event: Optional[Callable[[str, str, dict], None]] = None):
        super().__init__()
        self.folder = pathlib.Path(folder)
        self.poll_s, self.settle_s = float(poll_s), float(settle_s)
        self.assembler = SeriesAssembler(modalities=modalities, quiet_period_s=quiet_period_s,
                                         max_instance_bytes=max_instance_bytes)
        self.on_event = on_event or (lambda kind, text, values: None)
        self._candidates: Dict[str, Tuple[int, float, float]] = {}
        self._done = set()
        self._events = []
        self._folders: Dict[str, pathlib.Path] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._count = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name='watched-folder', daemon=True)
        self._thread.start()
        self.on_event('folder_source_started', f'watching {self.folder} for DICOM files', {'folder': str(self.folder)})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def describe(self) -> str:
        return f'watched folder {self.folder}'

    def rdsr_events(self):
        return list(self._events)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.scan_once()

    def scan_once(self) -> None:
        """One pass: take settled files, then hand on the series that are complete."""
        import pydicom
        now = time.monotonic()
        for root, _, names in os.walk(self.folder):
            for name in names:
                path = os.path.join(root, name)
                if path in self._done or name.endswith(('.part', '.tmp')):
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                signature = (st.st_size, st.st_mtime)
                previous = self._candidates.get(path)
                if previous is None or previous[:2] != signature:
                    self._candidates[path] = (*signature, now)
                    continue
                if now - previous[2] < self.settle_s:
                    continue
                self._done.add(path)
                self._candidates.pop(path, None)
                self._take(pydicom, path, st.st_size)
        complete, incomplete = self.assembler.poll()
        for pending, reason in incomplete:
            self.on_event('folder_series_incomplete', f'series {pending.uid}: {reason}', {'reason': reason})
        for pending in complete:
            self._count += 1
            series = build_series(pending, f'fs{self._count:03d}', self.kind, self._folders.get(pending.uid))
            if series.refused:
                self.on_event('folder_series_refused', f'{series.describe()} refused: {series.refused}',
                              {'reason': series.refused})
            self.inbox.put(series)

    def _take(self, pydicom, path: str, size: int) -> None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 -- not DICOM (notes, DICOMDIR companions): reported, skipped
            self.on_event('folder_file_refused', f'{path}: not a readable DICOM file ({exc})', {'path': path})
            return
        verdict = self.assembler.add(ds, 'folder', size)
        if not verdict.accepted:
            self.on_event('folder_file_refused', f'{path}: {verdict.reason}', {'path': path, 'reason': verdict.reason})
        elif verdict.kind == 'rdsr':
            try:
                events: list = read_rdsr(ds)
            except DoseReportError as exc:
                self.on_event('folder_file_refused', f'{path}: dose report unreadable: {exc}', {'path': path})
                return
            known = {e.irradiation_event_uid for e in self._events}
            self._events.extend(e for e in events if e.irradiation_event_uid not in known)
        else:
            self._folders.setdefault(verdict.series_instance_uid, pathlib.Path(path).parent)
