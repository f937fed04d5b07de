"""The simulated image source: the stack triggers the scan, the simulation renders it (``make demo``).

Wraps :class:`igt_robot.simulation.scanner.SimulatedScanner`. The dose figures
are the simulated protocol's (source SIMULATED); they also travel in the image
headers the simulated scanner writes, as a real CT's do.
"""
from __future__ import annotations

import time

from .base import AcquisitionSource, Series


class SimulatedAcquisition(AcquisitionSource):
    kind = 'simulated'
    triggers_scans = True

    def __init__(self, scanner):
        super().__init__()
        self.scanner = scanner          # igt_robot.simulation.scanner.SimulatedScanner

    @property
    def modality(self) -> str:
        return self.scanner.scenario.modality

    def describe(self) -> str:
        return f'simulated {self.modality} scanner'

    def acquire(self, protocol: str, joints=None, with_labels: bool = False) -> Series:
        """Render the scan now; the series comes back at once, volume in memory."""
        now = time.monotonic()
        acquisition = self.scanner.acquire(protocol, joints, with_labels=with_labels)
        volume = acquisition.volume
        return Series(
            scan_id=acquisition.scan_id, series_instance_uid=acquisition.series_instance_uid,
            modality=self.modality, series_description=f'igt_robot {protocol}', protocol_name=f'{protocol} scan',
            volume=volume, instance_count=int(volume.data.shape[0]), expected_count=int(volume.data.shape[0]),
            first_received=now, last_received=time.monotonic(), source=self.kind, dicom_dir=acquisition.dicom_dir,
            labelmap_path=acquisition.labelmap_path, header_dose=acquisition.dose,
            study_instance_uid=self.scanner.study_instance_uid, scan_length_m=acquisition.scan_length_m,
            truth=acquisition.truth)
