"""The acquisition interface: where the images of a procedure come from (no rclpy).

One :class:`AcquisitionSource` per procedure, chosen by configuration:

* ``simulated`` -- the stack triggers the scan and the simulation renders it (``make demo``);
* ``dicom`` -- a DICOM Storage SCP: the scanner or PACS pushes the series (C-STORE);
* ``igtl`` -- OpenIGTLink IMAGE messages (3D Slicer or a scanner bridge);
* ``folder`` -- a watched folder the scanner exports DICOM files into.

Only the simulated source triggers scans (``triggers_scans``). With every other
source the workflow asks the operator to acquire, files a :class:`ScanRequest`
and waits for a :class:`Series` that matches it (:func:`match_series`): right
modality, arrived after the request, protocol or series description naming the
requested scan. The interlock does not come from here: it comes from the scanner
state sources, whatever the image source.

Series volumes are kept in memory (scanner LPS, m): the image travels once, from
the network to registration, tip detection and the motion check.
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from igt_robot.record.dose import DoseFactors


class AcquisitionError(RuntimeError):
    """A scan could not be obtained; the message says why (shown to the operator)."""


@dataclasses.dataclass(frozen=True)
class IrradiationEvent:
    """One CT irradiation event of a Radiation Dose SR (TID 10013). CTDIvol mGy, DLP mGy·cm."""

    irradiation_event_uid: str
    ctdi_vol_mgy: float
    dlp_mgy_cm: float
    kv: float = 0.0
    mas: float = 0.0
    protocol: str = ''
    study_instance_uid: str = ''


@dataclasses.dataclass
class Series:
    """One image series as it arrived (or was rendered), with its volume in memory."""

    scan_id: str
    series_instance_uid: str
    modality: str
    series_description: str = ''
    protocol_name: str = ''
    volume: Optional[object] = None                 # igt_robot.imaging.volume.Volume
    instance_count: int = 0
    expected_count: int = 0                         # 0 = not announced by the sender
    first_received: float = 0.0                     # monotonic s
    last_received: float = 0.0                      # monotonic s
    calling_ae: str = ''
    source: str = ''                                # 'dicom', 'folder', 'igtl', 'simulated'
    dicom_dir: Optional[pathlib.Path] = None        # where the instances are kept on disk
    labelmap_path: Optional[pathlib.Path] = None    # segmentation of this series, when one exists
    header_dose: Optional[DoseFactors] = None       # CTDIvol, kV, mAs of the headers; DLP from the length
    irradiation_event_uids: Tuple[str, ...] = ()
    study_instance_uid: str = ''
    scan_length_m: float = 0.0
    refused: str = ''                               # why the series cannot be used ('' = usable)
    truth: Optional[object] = None                  # simulation only: the phantom's ground truth
    completed_at: float = 0.0                       # monotonic s: assembled and handed on

    @property
    def usable(self) -> bool:
        return not self.refused and self.volume is not None

    def describe(self) -> str:
        text = (f'{self.modality} series {self.series_instance_uid} "{self.series_description or self.protocol_name}"'
                f' ({self.instance_count} instance(s)')
        text += f' from {self.calling_ae})' if self.calling_ae else ')'
        return text


@dataclasses.dataclass(frozen=True)
class ScanRequest:
    """What the workflow asked the operator to acquire."""

    protocol: str                     # 'planning', 'control', 'confirmation'
    modality: str                     # 'CT' or 'MR'
    requested_at: float               # monotonic s
    keywords: Tuple[str, ...] = ()    # one must appear in the protocol name or series description ('' = any)
    slack_s: float = 2.0              # a series that started arriving this long before the request still counts

    @property
    def prompt(self) -> str:
        return f'acquire the {self.protocol} scan now ({self.modality})'


def match_series(request: ScanRequest, candidates: Sequence[Series]) -> Tuple[Optional[Series], List[str]]:
    """The one series answering ``request`` among ``candidates``, and why each other one does not.

    Raises :class:`AcquisitionError` when two or more series match equally (the
    operator must say which one; nothing is guessed).
    """
    matching, reasons = [], []
    for series in candidates:
        why = _mismatch(request, series)
        if why:
            reasons.append(f'{series.describe()}: {why}')
        else:
            matching.append(series)
    if len(matching) > 1:
        names = ', '.join(s.series_instance_uid for s in matching)
        raise AcquisitionError(f'{len(matching)} series match the {request.protocol} scan request ({names}); '
                               'send only the one to use')
    return (matching[0] if matching else None), reasons


def _mismatch(request: ScanRequest, series: Series) -> str:
    if series.first_received < request.requested_at - request.slack_s:
        return 'arrived before the scan was requested'
    if series.modality.upper() != request.modality.upper():
        return f'modality {series.modality}, the procedure needs {request.modality}'
    if request.keywords:
        text = f'{series.protocol_name} {series.series_description}'.lower()
        if not any(k.lower() in text for k in request.keywords):
            named = f'{series.protocol_name} {series.series_description}'.strip()
            return f'protocol/description "{named}" names none of {", ".join(request.keywords)}'
    return ''


class SeriesInbox:
    """Series that arrived (usable or refused), kept until the workflow takes them; thread-safe."""

    max_series = 8          # volumes held in memory at most

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._series: List[Series] = []
        self._listeners: List[Callable[[Series], None]] = []

    def add_listener(self, listener: Callable[[Series], None]) -> None:
        self._listeners.append(listener)

    def put(self, series: Series) -> None:
        series.completed_at = self._clock()
        with self._cond:
            self._series.append(series)
            # Bounded memory: series nobody asked for go first (they stay on disk, in the record).
            del self._series[:-self.max_series]
            self._cond.notify_all()
        for listener in list(self._listeners):
            listener(series)

    def all(self) -> List[Series]:
        with self._cond:
            return list(self._series)

    def wait_for(self, request: ScanRequest, timeout: float,
                 on_mismatch: Optional[Callable[[str], None]] = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Series:
        """Block until a usable series matches ``request``; AcquisitionError on timeout, ambiguity or refusal.

        A series refused by the receiver (missing slices, ...) that would otherwise match is
        reported with its reason; the wait goes on (a corrected resend may follow) until the
        timeout, whose message then names the refusal.
        """
        deadline = self._clock() + timeout
        told = set()
        last_refusal = ''
        with self._cond:
            while True:
                fresh = [s for s in self._series if s.first_received >= request.requested_at - request.slack_s]
                usable = [s for s in fresh if s.usable]
                for series in fresh:
                    if series.refused and id(series) not in told:
                        told.add(id(series))
                        if not _mismatch(request, series):
                            last_refusal = f'{series.describe()} refused: {series.refused}'
                            if on_mismatch:
                                on_mismatch(last_refusal)
                found, reasons = match_series(request, usable)
                for series, reason in zip([s for s in usable if s is not found], reasons):
                    if id(series) not in told:
                        told.add(id(series))
                        if on_mismatch:
                            on_mismatch(f'not the requested {request.protocol} scan: {reason}')
                if found is not None:
                    self._series.remove(found)
                    return found
                if cancelled():
                    raise AcquisitionError(f'the {request.protocol} scan request was withdrawn')
                remaining = deadline - self._clock()
                if remaining <= 0:
                    detail = f'; last refusal: {last_refusal}' if last_refusal else ''
                    raise AcquisitionError(f'no {request.modality} series for the {request.protocol} scan arrived '
                                           f'within {timeout:g} s{detail}')
                self._cond.wait(min(remaining, 0.5))


class AcquisitionSource(abc.ABC):
    """Where the procedure's images come from. ``start`` / ``stop`` bracket its life."""

    kind = ''
    triggers_scans = False      # True: the stack starts the scan (simulation); else the operator does

    def __init__(self):
        self.inbox = SeriesInbox()

    def start(self) -> None:
        """Open the network port / folder watch (idempotent)."""

    def stop(self) -> None:
        """Close it; series already received stay in the inbox and on disk."""

    def rdsr_events(self) -> List[IrradiationEvent]:
        """Irradiation events of the Radiation Dose SRs received so far."""
        return []

    def wait_for_series(self, request: ScanRequest, timeout: float,
                        on_mismatch: Optional[Callable[[str], None]] = None,
                        cancelled: Callable[[], bool] = lambda: False) -> Series:
        return self.inbox.wait_for(request, timeout, on_mismatch, cancelled)

    def describe(self) -> str:
        return self.kind
