"""Writing an X-Ray Radiation Dose SR as a CT scanner would (simulation and tests; no rclpy).

The content tree follows DICOM PS3.16 TID 10011 "CT Radiation Dose": the root
container (113701) with the procedure reported, a "CT Accumulated Dose Data"
container (113811: total number of irradiation events, DLP total) and one
"CT Acquisition" container per irradiation event (TID 10013, 113819) holding the
acquisition protocol, target region, acquisition type, the Irradiation Event UID
(113769), "CT Acquisition Parameters" (113822) with the X-ray source parameters
(113831: KVP, tube current, exposure time per rotation) and "CT Dose" (113829:
Mean CTDIvol 113830, phantom type, DLP 113838). Units are UCUM (mGy, mGy.cm, kV,
mA, s, mm). The reader is :mod:`igt_robot.acquisition.dose`.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path
from typing import Sequence

XRAY_RADIATION_DOSE_SR = '1.2.840.10008.5.1.4.1.1.88.67'
ROTATION_TIME_S = 0.5


@dataclasses.dataclass(frozen=True)
class DoseEvent:
    """One CT irradiation event as the scanner reports it."""

    irradiation_event_uid: str
    protocol: str
    ctdi_vol_mgy: float
    dlp_mgy_cm: float
    kv: float
    mas: float                      # effective mAs (per rotation)
    scan_length_mm: float
    started: datetime.datetime


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(relationship: str, value_type: str, concept):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(*concept)]
    return item


def _container(relationship, concept, children):
    item = _item(relationship, 'CONTAINER', concept)
    item.ContinuityOfContent = 'SEPARATE'
    item.ContentSequence = list(children)
    return item


def _num(concept, value: float, unit: tuple):
    from pydicom.dataset import Dataset
    item = _item('CONTAINS', 'NUM', concept)
    measured = Dataset()
    measured.NumericValue = f'{value:.6g}'
    measured.MeasurementUnitsCodeSequence = [_code(unit[0], 'UCUM', unit[1])]
    item.MeasuredValueSequence = [measured]
    return item


def _text(concept, text: str, relationship='CONTAINS'):
    item = _item(relationship, 'TEXT', concept)
    item.TextValue = text
    return item


def _codeitem(concept, value, relationship='CONTAINS'):
    item = _item(relationship, 'CODE', concept)
    item.ConceptCodeSequence = [_code(*value)]
    return item


def _uidref(concept, uid: str):
    item = _item('CONTAINS', 'UIDREF', concept)
    item.UID = uid
    return item


MGY, MGYCM, KV, MA, SEC, MM = ('mGy', 'mGy'), ('mGy.cm', 'mGy.cm'), ('kV', 'kV'), ('mA', 'mA'), ('s', 's'), \
    ('mm', 'mm')


def _event_container(event: DoseEvent):
    current_ma = event.mas / ROTATION_TIME_S
    rotations = max(1.0, math.ceil(event.scan_length_mm / 20.0))      # 20 mm table feed per rotation
    source = _container('CONTAINS', ('113831', 'DCM', 'CT X-Ray Source Parameters'), [
        _text(('113832', 'DCM', 'Identification of the X-Ray Source'), 'A'),
        _num(('113733', 'DCM', 'KVP'), event.kv, KV),
        _num(('113833', 'DCM', 'Maximum X-Ray Tube Current'), current_ma, MA),
        _num(('113734', 'DCM', 'X-Ray Tube Current'), current_ma, MA),
        _num(('113834', 'DCM', 'Exposure Time per Rotation'), ROTATION_TIME_S, SEC)])
    parameters = _container('CONTAINS', ('113822', 'DCM', 'CT Acquisition Parameters'), [
        _num(('113824', 'DCM', 'Exposure Time'), rotations * ROTATION_TIME_S, SEC),
        _num(('113825', 'DCM', 'Scanning Length'), event.scan_length_mm, MM),
        _num(('113826', 'DCM', 'Nominal Single Collimation Width'), 0.625, MM),
        _num(('113827', 'DCM', 'Nominal Total Collimation Width'), 40.0, MM),
        source])
    dose = _container('CONTAINS', ('113829', 'DCM', 'CT Dose'), [
        _num(('113830', 'DCM', 'Mean CTDIvol'), event.ctdi_vol_mgy, MGY),
        _codeitem(('113835', 'DCM', 'CTDIw Phantom Type'), ('113691', 'DCM', 'IEC Body Dosimetry Phantom')),
        _num(('113838', 'DCM', 'DLP'), event.dlp_mgy_cm, MGYCM)])
    return _container('CONTAINS', ('113819', 'DCM', 'CT Acquisition'), [
        _text(('125203', 'DCM', 'Acquisition Protocol'), event.protocol),
        _codeitem(('123014', 'DCM', 'Target Region'), ('T-D4000', 'SRT', 'Abdomen')),
        _codeitem(('113820', 'DCM', 'CT Acquisition Type'), ('P5-08001', 'SRT', 'Spiral Acquisition')),
        _uidref(('113769', 'DCM', 'Irradiation Event UID'), event.irradiation_event_uid),
        parameters, dose])


def make_rdsr(events: Sequence[DoseEvent], *, study_instance_uid: str, patient_id: str = 'PHANTOM',
              series_instance_uid: str = '', sop_instance_uid: str = ''):
    """A complete X-Ray Radiation Dose SR dataset (pydicom FileDataset) for ``events`` of one study."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    if not events:
        raise ValueError('a dose report needs at least one irradiation event')
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRAY_RADIATION_DOSE_SR
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset('', {}, file_meta=meta, preamble=b'\0' * 128)
    now = datetime.datetime.now()
    ds.SOPClassUID = XRAY_RADIATION_DOSE_SR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = 'SR'
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.PatientName = ds.PatientID = patient_id
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime('%Y%m%d')
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime('%H%M%S')
    ds.Manufacturer = 'igt_robot simulation'
    ds.SeriesNumber = 999
    ds.InstanceNumber = 1
    ds.SeriesDescription = 'Dose Report'
    ds.ValueType = 'CONTAINER'
    ds.ConceptNameCodeSequence = [_code('113701', 'DCM', 'X-Ray Radiation Dose Report')]
    ds.ContinuityOfContent = 'SEPARATE'
    template = _code('', '', '')
    del template.CodeValue, template.CodingSchemeDesignator, template.CodeMeaning
    template.MappingResource = 'DCMR'
    template.TemplateIdentifier = '10011'
    ds.ContentTemplateSequence = [template]
    ds.CompletionFlag = 'COMPLETE'
    ds.VerificationFlag = 'UNVERIFIED'
    accumulated = _container('CONTAINS', ('113811', 'DCM', 'CT Accumulated Dose Data'), [
        _num(('113812', 'DCM', 'Total Number of Irradiation Events'), len(events), ('{events}', 'events')),
        _num(('113813', 'DCM', 'CT Dose Length Product Total'), math.fsum(e.dlp_mgy_cm for e in events), MGYCM)])
    ds.ContentSequence = [
        _codeitem(('121058', 'DCM', 'Procedure reported'), ('P5-08000', 'SRT', 'Computed Tomography X-Ray'),
                  relationship='HAS CONCEPT MOD'),
        accumulated] + [_event_container(e) for e in events]
    return ds


def write_rdsr(path, events: Sequence[DoseEvent], **kwargs) -> Path:
    ds = make_rdsr(events, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path
