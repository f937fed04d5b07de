"""Dose figures from the images: image headers and X-Ray Radiation Dose SRs (no rclpy).

* Image headers (CT Image module): CTDIvol (0018,9345) mGy, KVP (0018,0060) kV,
  Exposure (0018,1152) mAs, and the Irradiation Event UID (0008,3010) that ties
  the images to their irradiation event in a dose report. DLP is not in the
  headers: it is CTDIvol × the imaged length (a lower bound: over-ranging adds).
* X-Ray Radiation Dose SR (SOP class 1.2.840.10008.5.1.4.1.1.88.67, TID 10011
  "CT Radiation Dose"): one CT Irradiation Event Data container (TID 10013) per
  event, with its Irradiation Event UID (113769), Acquisition Protocol (125203),
  CT Dose (113829) holding Mean CTDIvol (113830, mGy) and DLP (113838, mGy·cm),
  and CT X-Ray Source Parameters (113831) with KVP (113733), X-Ray Tube Current
  (113734, mA) and Exposure Time per Rotation (113834, s): their product is the
  mAs per rotation.

A dose record names where its figures came from (record.dose.SOURCE_*): an SR
event matching the series' Irradiation Event UID wins over the headers.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

from igt_robot.record.dose import SOURCE_IMAGE_HEADER, SOURCE_RDSR, DoseFactors, DoseValueError

from .base import IrradiationEvent

XRAY_RADIATION_DOSE_SR = '1.2.840.10008.5.1.4.1.1.88.67'

# (code value, coding scheme) of the concepts read from the content tree
CT_IRRADIATION_EVENT_DATA = ('113819', 'DCM')
IRRADIATION_EVENT_UID = ('113769', 'DCM')
ACQUISITION_PROTOCOL = ('125203', 'DCM')
CT_DOSE = ('113829', 'DCM')
MEAN_CTDIVOL = ('113830', 'DCM')
DLP = ('113838', 'DCM')
KVP = ('113733', 'DCM')
TUBE_CURRENT = ('113734', 'DCM')
TIME_PER_ROTATION = ('113834', 'DCM')


class DoseReportError(ValueError):
    """A Radiation Dose SR cannot be read; the message says what is wrong."""


def _concept(item) -> Tuple[str, str]:
    seq = getattr(item, 'ConceptNameCodeSequence', None)
    if not seq:
        return ('', '')
    return (str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator))


def _children(item):
    return list(getattr(item, 'ContentSequence', []) or [])


def _walk(item):
    for child in _children(item):
        yield child
        yield from _walk(child)


def _numeric(item, name: str) -> float:
    try:
        measured = item.MeasuredValueSequence[0]
        value = float(measured.NumericValue)
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise DoseReportError(f'{name} has no numeric value') from exc
    if not math.isfinite(value) or value < 0:
        raise DoseReportError(f'{name} = {value!r} is not a finite non-negative number')
    return value


def read_rdsr(ds) -> List[IrradiationEvent]:
    """The CT irradiation events of a Radiation Dose SR dataset (pydicom), in document order."""
    if str(getattr(ds, 'SOPClassUID', '')) != XRAY_RADIATION_DOSE_SR:
        raise DoseReportError(f'SOP class {getattr(ds, "SOPClassUID", "?")} is not an X-Ray Radiation Dose SR')
    events = []
    study = str(getattr(ds, 'StudyInstanceUID', ''))
    for container in _walk(ds):
        if _concept(container) != CT_IRRADIATION_EVENT_DATA:
            continue
        uid, protocol, ctdi, dlp, kv, current, rotation = '', '', None, None, 0.0, 0.0, 0.0
        for item in _walk(container):
            concept = _concept(item)
            if concept == IRRADIATION_EVENT_UID:
                uid = str(getattr(item, 'UID', ''))
            elif concept == ACQUISITION_PROTOCOL:
                protocol = str(getattr(item, 'TextValue', ''))
            elif concept == MEAN_CTDIVOL:
                ctdi = _numeric(item, 'Mean CTDIvol')
            elif concept == DLP:
                dlp = _numeric(item, 'DLP')
            elif concept == KVP:
                kv = _numeric(item, 'KVP')
            elif concept == TUBE_CURRENT:
                current = _numeric(item, 'X-Ray Tube Current')
            elif concept == TIME_PER_ROTATION:
                rotation = _numeric(item, 'Exposure Time per Rotation')
        if not uid:
            raise DoseReportError('a CT irradiation event has no Irradiation Event UID')
        if ctdi is None or dlp is None:
            raise DoseReportError(f'irradiation event {uid} lacks Mean CTDIvol or DLP')
        events.append(IrradiationEvent(uid, ctdi, dlp, kv, current * rotation, protocol, study))
    if not events:
        raise DoseReportError('the dose report holds no CT irradiation event')
    return events


def header_dose(datasets: Sequence, scan_length_m: float) -> Optional[DoseFactors]:
    """CTDIvol, kV and mAs of a CT series' headers, DLP = CTDIvol × length; None when not reported."""
    ctdi = [float(ds.CTDIvol) for ds in datasets if 'CTDIvol' in ds and ds.CTDIvol is not None]
    if not ctdi:
        return None
    kv = [float(ds.KVP) for ds in datasets if 'KVP' in ds and ds.KVP is not None]
    mas = [float(ds.Exposure) for ds in datasets if 'Exposure' in ds and ds.Exposure is not None]
    mean = lambda values: math.fsum(values) / len(values) if values else 0.0   # noqa: E731
    factors = DoseFactors(ctdi_vol_mgy=mean(ctdi), kv=mean(kv), mas=mean(mas))
    return factors.with_dlp(scan_length_m)


def irradiation_event_uids(datasets: Iterable) -> Tuple[str, ...]:
    return tuple(sorted({str(ds.IrradiationEventUID) for ds in datasets if 'IrradiationEventUID' in ds}))


def series_dose(series, events: Iterable[IrradiationEvent]) -> Tuple[Optional[DoseFactors], str, str]:
    """(factors, source, note) for a CT series: its SR event(s) when received, else its headers.

    Several events for one series (e.g. a scan split in two ranges) are summed (DLP) and
    the CTDIvol is the DLP-weighted mean. kV/mAs missing from the SR come from the headers.
    """
    uids = set(series.irradiation_event_uids)
    mine = [e for e in events if e.irradiation_event_uid in uids]
    header = series.header_dose
    if mine:
        dlp = math.fsum(e.dlp_mgy_cm for e in mine)
        ctdi = (math.fsum(e.ctdi_vol_mgy * e.dlp_mgy_cm for e in mine) / dlp if dlp > 0
                else max(e.ctdi_vol_mgy for e in mine))
        kv = max(e.kv for e in mine) or (header.kv if header else 0.0)
        mas = (header.mas if header and header.mas else max(e.mas for e in mine))   # per rotation, as the headers
        try:
            factors = DoseFactors(ctdi, dlp, kv, mas)
        except DoseValueError as exc:
            return None, SOURCE_RDSR, f'dose report figures refused: {exc}'
        return factors, SOURCE_RDSR, f'{len(mine)} irradiation event(s) of the dose report'
    if header is not None:
        return header, SOURCE_IMAGE_HEADER, 'image headers; DLP = CTDIvol × imaged length (no dose report)'
    return None, '', 'no dose figures in the image headers and no dose report'
