"""Instances into series: the receiving side's decisions, independent of the transport (no rclpy).

:class:`SeriesAssembler` takes one instance at a time (from the DICOM network, a
watched folder or a test) and answers at once whether it is accepted, with the
reason when not: only CT and MR Image Storage (and the X-Ray Radiation Dose SR,
handed back separately), the Modality consistent with the SOP class and one the
procedure uses, the attributes a volume needs, a size limit. Accepted instances
are grouped by SeriesInstanceUID (interleaved series stay apart; a re-sent
instance counts once). A series is complete when the number its sender announced
(Images in Acquisition (0020,1002)) has arrived, or when nothing more arrived for
``quiet_period_s``. A series whose announced count is not reached by then is
reported incomplete, and kept: a resend of the missing instances completes it.

Assembling the volume (and its checks: missing slices, mixed geometry) is
:func:`build_series`, run off the network thread.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.io import CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, decode_slice, volume_from_datasets

from .base import Series
from .dose import XRAY_RADIATION_DOSE_SR, header_dose, irradiation_event_uids

IMAGE_SOP_CLASSES = {CT_IMAGE_STORAGE: 'CT', MR_IMAGE_STORAGE: 'MR'}
ACCEPTED_SOP_CLASSES = tuple(IMAGE_SOP_CLASSES) + (XRAY_RADIATION_DOSE_SR,)
REQUIRED_IMAGE_ATTRIBUTES = ('SeriesInstanceUID', 'SOPInstanceUID', 'ImagePositionPatient',
                             'ImageOrientationPatient', 'PixelSpacing', 'Rows', 'Columns', 'PixelData')
DEFAULT_MAX_INSTANCE_BYTES = 16 * 1024 * 1024      # a 1024² 16-bit slice is 2 MiB; 16 MiB leaves room
DECODE_IN_PAUSES_S = 0.03       # a stream faster than ~30 instances/s is decoded when complete


@dataclasses.dataclass
class Verdict:
    """The answer to one instance."""

    accepted: bool
    reason: str = ''
    kind: str = 'image'            # 'image' or 'rdsr'
    problem: str = ''              # refusals: 'size', 'sop_class', 'modality' or 'attributes'
    series_instance_uid: str = ''
    duplicate: bool = False


@dataclasses.dataclass
class PendingSeries:
    uid: str
    instances: Dict[str, object] = dataclasses.field(default_factory=dict)   # SOPInstanceUID -> dataset
    pixels: Dict[str, object] = dataclasses.field(default_factory=dict)      # SOPInstanceUID -> float32 slice
    first_received: float = 0.0
    last_received: float = 0.0
    expected: int = 0
    calling_aes: set = dataclasses.field(default_factory=set)
    reported_incomplete: bool = False


class SeriesAssembler:
    """Groups accepted instances into series and says when each is complete; thread-safe."""

    def __init__(self, *, modalities=('CT', 'MR'), quiet_period_s: float = 5.0,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, clock: Callable[[], float] = time.monotonic):
        if not quiet_period_s > 0:
            raise ValueError(f'quiet_period_s must be > 0 s, got {quiet_period_s!r}')
        self.modalities = tuple(m.upper() for m in modalities)
        self.quiet_period_s = float(quiet_period_s)
        self.max_instance_bytes = int(max_instance_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: Dict[str, PendingSeries] = {}

    def check(self, ds, size_bytes: int = 0) -> Verdict:
        """Whether one instance is acceptable (no state change)."""
        sop_class = str(getattr(ds, 'SOPClassUID', '') or '')
        if size_bytes > self.max_instance_bytes:
            return Verdict(False, f'instance of {size_bytes} bytes exceeds the limit of {self.max_instance_bytes} '
                                  'bytes', problem='size')
        if sop_class == XRAY_RADIATION_DOSE_SR:
            return Verdict(True, kind='rdsr')
        if sop_class not in IMAGE_SOP_CLASSES:
            return Verdict(False, f'SOP class {sop_class or "(none)"} is not CT or MR Image Storage '
                                  'or an X-Ray Radiation Dose SR', problem='sop_class')
        modality = str(getattr(ds, 'Modality', '') or '').upper()
        if modality != IMAGE_SOP_CLASSES[sop_class]:
            return Verdict(False, f'Modality {modality or "(none)"} does not match the SOP class '
                                  f'({IMAGE_SOP_CLASSES[sop_class]} Image Storage)', problem='modality')
        if modality not in self.modalities:
            return Verdict(False, f'modality {modality} is not used by this procedure ({", ".join(self.modalities)})',
                           problem='modality')
        missing = [a for a in REQUIRED_IMAGE_ATTRIBUTES if a not in ds]
        if missing:
            return Verdict(False, f'instance lacks {", ".join(missing)}', problem='attributes')
        return Verdict(True, series_instance_uid=str(ds.SeriesInstanceUID))

    def add(self, ds, calling_ae: str = '', size_bytes: int = 0, verdict: Optional[Verdict] = None) -> Verdict:
        """Check and take one image instance (an RDSR is only checked: the caller reads it); ``verdict``: the
        answer :meth:`check` already gave for this very instance (the network thread does not check twice)."""
        verdict = verdict if verdict is not None else self.check(ds, size_bytes)
        if not verdict.accepted or verdict.kind != 'image':
            return verdict
        now = self._clock()
        with self._lock:
            pending = self._pending.get(verdict.series_instance_uid)
            if pending is None:
                pending = self._pending[verdict.series_instance_uid] = PendingSeries(
                    verdict.series_instance_uid, first_received=now)
            sop = str(ds.SOPInstanceUID)
            verdict.duplicate = sop in pending.instances
            pending.instances[sop] = ds
            pending.pixels.pop(sop, None)       # a resent instance is decoded again
            pending.last_received = now
            pending.calling_aes.add(calling_ae)
            announced = int(getattr(ds, 'ImagesInAcquisition', 0) or 0)
            pending.expected = max(pending.expected, announced)
        return verdict

    def poll(self) -> Tuple[List[PendingSeries], List[Tuple[PendingSeries, str]]]:
        """(complete series, newly incomplete series with the reason); complete ones leave the assembler."""
        now = self._clock()
        complete, incomplete = [], []
        with self._lock:
            for uid, pending in list(self._pending.items()):
                count = len(pending.instances)
                quiet = now - pending.last_received >= self.quiet_period_s
                if pending.expected and count >= pending.expected:
                    complete.append(self._pending.pop(uid))
                elif quiet and not pending.expected:
                    complete.append(self._pending.pop(uid))
                elif quiet and not pending.reported_incomplete:
                    pending.reported_incomplete = True
                    incomplete.append((pending, f'incomplete: {count} of {pending.expected} instances arrived, '
                                                f'then nothing for {self.quiet_period_s:g} s (connection dropped?); '
                                                'the instances are kept, a resend of the rest completes it'))
        return complete, incomplete

    def decode_arrived(self) -> int:
        """Decode the slices that arrived since the last call (a worker thread, not the network thread), of the
        series with a pause of DECODE_IN_PAUSES_S since their last instance: a slow sender's slices are decoded
        between arrivals, so that when the series completes only the stacking is left to do, while a fast
        stream keeps the CPU (and Python's interpreter lock) for the network threads, which would otherwise
        contend with the decoder at every instance (measured: ~2 ms more CPU per 512×512 instance, mostly lock
        hand-overs); its slices are decoded when it completes (a 512×512×100 CT is assembled in ~0.1 s). A pause
        of a fast stream (a loaded machine) decodes only until the next instance arrives, not every slice
        received so far (~1 ms each, which stalled the stream behind it). Returns how many were decoded."""
        now = self._clock()
        with self._lock:
            todo = [(p, p.last_received, sop, ds) for p in self._pending.values()
                    if now - p.last_received >= DECODE_IN_PAUSES_S
                    for sop, ds in p.instances.items() if sop not in p.pixels]
        decoded = 0
        for pending, seen, sop, ds in todo:
            if pending.last_received != seen:
                continue            # its stream resumed: the network threads have the CPU again
            try:
                pixels = decode_slice(ds)
            except ImageError:
                continue            # left to volume assembly, which refuses the series with the reason
            with self._lock:
                if pending.instances.get(sop) is ds:
                    pending.pixels[sop] = pixels
            decoded += 1
        return decoded

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)


def build_series(pending: PendingSeries, scan_id: str, source: str, folder=None) -> Series:
    """The :class:`Series` of complete instances: volume in memory, header dose; ``refused`` says why not usable."""
    datasets = list(pending.instances.values())
    first = datasets[0]
    series = Series(
        scan_id=scan_id, series_instance_uid=pending.uid, modality=str(getattr(first, 'Modality', '')),
        series_description=str(getattr(first, 'SeriesDescription', '') or ''),
        protocol_name=str(getattr(first, 'ProtocolName', '') or ''), instance_count=len(datasets),
        expected_count=pending.expected, first_received=pending.first_received,
        last_received=pending.last_received, calling_ae=', '.join(sorted(a for a in pending.calling_aes if a)),
        source=source, dicom_dir=folder, irradiation_event_uids=irradiation_event_uids(datasets),
        study_instance_uid=str(getattr(first, 'StudyInstanceUID', '') or ''))
    try:
        series.volume = volume_from_datasets(datasets, pending.uid, source=f'series {pending.uid}',
                                             decoded=pending.pixels)
    except ImageError as exc:
        series.refused = str(exc)
        return series
    volume = series.volume
    if folder is not None:
        volume.metadata['source'] = str(folder)
    series.scan_length_m = float(abs(volume.spacing[2]) * volume.data.shape[0])
    if series.modality == 'CT':
        try:
            series.header_dose = header_dose(datasets, series.scan_length_m)
        except ValueError as exc:       # DoseValueError: implausible header figures are not used
            series.header_dose = None
            volume.metadata['header_dose_refused'] = str(exc)
    return series
