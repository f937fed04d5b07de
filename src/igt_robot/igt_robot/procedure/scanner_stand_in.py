"""The CT technologist and scanner of the ``--via-dicom`` demo, outside the stack's control (no rclpy).

When the workflow asks for a scan ("acquire the control scan now"), the stand-in
does what the scanner room would: the scanner goes ACQUIRING (reported through
the scanner state source, which holds the robot), the simulation renders the
image, the scanner stores the series and its Radiation Dose SR in its DICOM node
(a private Orthanc), the scanner goes IDLE, and the DICOM node sends everything
to the stack's receiver by C-STORE. The stack learns about the image only from
the network.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import time
from typing import Callable, Optional


class ScannerStandIn:
    """``set_phase(acquiring: bool, protocol: str, is_ionising: bool)`` drives the scanner state source."""

    def __init__(self, scanner, peer_url: str, receiver: str, set_phase: Callable[[bool, str, bool], None],
                 joints: Callable[[], object], scan_duration_s: float = 1.0,
                 on_error: Optional[Callable[[str], None]] = None):
        from igt_robot.simulation.dicom_peer import OrthancPeer
        self.scanner = scanner                      # simulation.scanner.SimulatedScanner
        self.peer = OrthancPeer.attach(peer_url)
        self.receiver = receiver
        self.set_phase, self.joints = set_phase, joints
        self.scan_duration_s = scan_duration_s
        self.on_error = on_error or (lambda text: None)
        self.labels = {}                            # SeriesInstanceUID -> label map (the segmentation)

    def request(self, protocol: str, with_labels: bool = False) -> threading.Thread:
        """Carry out the operator's scan request in the background (as the scanner room does)."""
        thread = threading.Thread(target=self._scan, args=(protocol, with_labels), name='scanner-stand-in',
                                  daemon=True)
        thread.start()
        return thread

    def _scan(self, protocol: str, with_labels: bool) -> None:
        # The scanner is another machine in a real suite: here its work must not take the CPU from the stack.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            ionising = self.scanner.scenario.modality == 'CT'
            self.set_phase(True, f'{protocol} scan', ionising)
            started = time.monotonic()
            try:
                acquisition = self.scanner.acquire(protocol, self.joints(), with_labels=with_labels)
                remaining = self.scan_duration_s - (time.monotonic() - started)
                if remaining > 0:
                    time.sleep(remaining)           # the scan's duration (simulated)
            finally:
                self.set_phase(False, '', False)
            if acquisition.labelmap_path is not None:
                self.labels[acquisition.series_instance_uid] = acquisition.labelmap_path
            files = sorted(pathlib.Path(acquisition.dicom_dir).glob('*.dcm'))
            report = self.scanner.write_dose_report(pathlib.Path(acquisition.dicom_dir).parent /
                                                    f'{acquisition.scan_id}_dose_report.dcm')
            self.peer.upload_and_send(self.receiver, files + ([report] if report else []))
        except Exception as exc:  # noqa: BLE001 -- the waiting workflow times out; say why here
            self.on_error(f'simulated scanner failed: {type(exc).__name__}: {exc}')
