"""The simulated scanner: renders what it would image and writes it as the scanner would (DICOM).

Each acquisition renders the scenario's phantom (with the needle where the
robot really holds it), writes a DICOM series into its own folder and, for the
planning scan, the label map of the anatomy as NIfTI (standing in for the
clinician's segmentation). CT acquisitions carry dose factors. No rclpy.
"""
from __future__ import annotations

import dataclasses
import datetime
import pathlib
from typing import Optional

import numpy as np
from pydicom.uid import generate_uid

from igt_robot.imaging.io import write_dicom_series, write_nifti
from igt_robot.imaging.phantom import make_phantom
from igt_robot.record.dose import DoseFactors
from igt_robot.simulation.rdsr import DoseEvent, write_rdsr
from igt_robot.simulation.scenario import Scenario


PROTOCOLS = {
    'planning': DoseFactors(ctdi_vol_mgy=12.0, kv=120.0, mas=200.0),
    'control': DoseFactors(ctdi_vol_mgy=4.0, kv=100.0, mas=60.0),        # low-dose, limited range
    'confirmation': DoseFactors(ctdi_vol_mgy=8.0, kv=120.0, mas=120.0),
}


# Each of these scans starts a new breath-hold (the patient holds breath for the scan, the re-plan and the step
# that follows); the confirmation scan is taken in the breath-hold of the last step.
BREATH_HOLD_PROTOCOLS = ('planning', 'control')


@dataclasses.dataclass
class Acquisition:
    scan_id: str
    protocol: str
    volume: object                  # igt_robot.imaging.volume.Volume
    truth: object                   # PhantomTruth
    dicom_dir: pathlib.Path
    labelmap_path: Optional[pathlib.Path]
    dose: Optional[DoseFactors]
    scan_length_m: float
    series_instance_uid: str = ''
    dose_event: Optional[object] = None          # simulation.rdsr.DoseEvent of a CT scan

    @property
    def dlp_mgy_cm(self) -> float:
        return self.dose.dlp_for_length(self.scan_length_m) if self.dose else 0.0


class SimulatedScanner:
    """Renders and stores acquisitions of one scenario into ``out_dir``."""

    def __init__(self, scenario: Scenario, out_dir, T_base_zframe, kinematics=None):
        self.scenario = scenario
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.T_base_zframe = np.asarray(T_base_zframe, dtype=float)
        self.kinematics = kinematics
        self.count = 0
        self.study_instance_uid = generate_uid()     # one study per procedure, as at the scanner console
        self.dose_events = []                        # simulation.rdsr.DoseEvent of each CT scan, in order

    def acquire(self, protocol: str, joints=None, with_labels: bool = False) -> Acquisition:
        """Image the scene now (``joints``: the robot's measured joint positions, for the needle)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f'unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}')
        self.count += 1
        if protocol in BREATH_HOLD_PROTOCOLS:
            self.scenario.breath_hold += 1
        if protocol == 'planning':
            self.scenario.reference_breath_hold = self.scenario.breath_hold
        scan_id = f'scan{self.count:02d}_{protocol}'
        spec = self.scenario.phantom_spec(self.T_base_zframe, joints, self.kinematics, scan_index=self.count)
        volume, truth = make_phantom(spec)
        folder = self.out_dir / scan_id
        dose = PROTOCOLS[protocol] if self.scenario.modality == 'CT' else None
        length = abs(float(volume.spacing[2])) * volume.data.shape[0]
        series_uid, event_uid = generate_uid(), generate_uid()
        # What a scanner writes into every image: the protocol, how many images the acquisition has and,
        # for CT, the dose figures and the irradiation event the dose report refers to.
        attributes = {'ProtocolName': f'{protocol} scan', 'ImagesInAcquisition': int(volume.data.shape[0])}
        dose_event = None
        if dose is not None:
            dose = dose.with_dlp(length)
            attributes.update(CTDIvol=float(dose.ctdi_vol_mgy), KVP=f'{dose.kv:.4g}', Exposure=int(round(dose.mas)),
                              IrradiationEventUID=event_uid)
            dose_event = DoseEvent(event_uid, f'{protocol} scan', dose.ctdi_vol_mgy, dose.dlp_mgy_cm, dose.kv,
                                   dose.mas, length * 1000.0, datetime.datetime.now())
            self.dose_events.append(dose_event)
        write_dicom_series(volume, folder, series_description=f'igt_robot {protocol}',
                           series_instance_uid=series_uid, study_instance_uid=self.study_instance_uid,
                           extra_attributes=attributes)
        labels = None
        if with_labels:
            labels = self.out_dir / f'{scan_id}_labels.nii.gz'
            write_nifti(truth.label_volume, labels)
        return Acquisition(scan_id, protocol, volume, truth, folder, labels, dose, scan_length_m=length,
                           series_instance_uid=series_uid, dose_event=dose_event)

    def write_dose_report(self, path) -> Optional[pathlib.Path]:
        """The study's Radiation Dose SR so far (every CT irradiation event), as the scanner sends it."""
        if not self.dose_events:
            return None
        return write_rdsr(path, self.dose_events, study_instance_uid=self.study_instance_uid)
