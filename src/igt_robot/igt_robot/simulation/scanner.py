"""The simulated scanner: renders what it would image and writes it as the scanner would (DICOM).

Each acquisition renders the scenario's phantom (with the needle where the
robot really holds it), writes a DICOM series into its own folder and, for the
planning scan, the label map of the anatomy as NIfTI (standing in for the
clinician's segmentation). CT acquisitions carry dose factors. No rclpy.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import numpy as np

from igt_robot.imaging.io import write_dicom_series, write_nifti
from igt_robot.imaging.phantom import make_phantom
from igt_robot.simulation.scenario import Scenario


@dataclasses.dataclass(frozen=True)
class DoseFactors:
    """CT dose factors of a protocol (IEC 60601-2-44 units)."""

    ctdi_vol_mgy: float
    kv: float
    mas: float

    def dlp(self, scan_length_m: float) -> float:
        """DLP (mGy*cm) = CTDIvol x scan length in cm."""
        return self.ctdi_vol_mgy * scan_length_m * 100.0


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

    @property
    def dlp_mgy_cm(self) -> float:
        return self.dose.dlp(self.scan_length_m) if self.dose else 0.0


class SimulatedScanner:
    """Renders and stores acquisitions of one scenario into ``out_dir``."""

    def __init__(self, scenario: Scenario, out_dir, T_base_zframe, kinematics=None):
        self.scenario = scenario
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.T_base_zframe = np.asarray(T_base_zframe, dtype=float)
        self.kinematics = kinematics
        self.count = 0

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
        write_dicom_series(volume, folder, series_description=f'igt_robot {protocol}')
        labels = None
        if with_labels:
            labels = self.out_dir / f'{scan_id}_labels.nii.gz'
            write_nifti(truth.label_volume, labels)
        dose = PROTOCOLS[protocol] if self.scenario.modality == 'CT' else None
        length = float(np.ptp(np.asarray(volume.affine[:3, :3] @ np.array([0, 0, volume.data.shape[0] - 1]))))
        return Acquisition(scan_id, protocol, volume, truth, folder, labels, dose,
                           scan_length_m=abs(float(volume.spacing[2])) * volume.data.shape[0] or length)
