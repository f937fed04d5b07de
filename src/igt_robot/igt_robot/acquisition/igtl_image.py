"""OpenIGTLink IMAGE as an image source (3D Slicer, or a scanner's OpenIGTLink bridge).

Each IMAGE message is one complete volume: converted with
:func:`igt_robot.imaging.io.volume_from_igtl_image` (the header names RAS or LPS;
the core gets LPS metres), kept on disk as NIfTI (the record holds every image
used) and handed on in memory. The device name plays the role of the series
description when matching a scan request (e.g. ``CONTROL`` or ``control scan``).
Bodies above ``max_image_bytes`` are refused before they are buffered.
"""
from __future__ import annotations

import pathlib
import time
from typing import Callable, Optional

from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.io import volume_from_igtl_image, write_nifti

from .base import AcquisitionSource, Series


class IgtlImageSource(AcquisitionSource):
    kind = 'igtl'

    def __init__(self, storage_dir, *, host: str = '127.0.0.1', port: int = 18945, modality: str = 'CT',
                 max_image_bytes: int = 256 * 1024 * 1024,
                 on_event: Optional[Callable[[str, str, dict], None]] = None):
        super().__init__()
        self.storage_dir = pathlib.Path(storage_dir)
        self.host, self.port, self.modality = host, int(port), modality
        self.max_image_bytes = int(max_image_bytes)
        self.on_event = on_event or (lambda kind, text, values: None)
        self._server = None
        self._count = 0

    def start(self) -> None:
        if self._server is not None:
            return
        from igt_robot.igtl.server import IgtlServer
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._server = IgtlServer(self.host, self.port, on_message=self._on_message, on_refused=self._on_refused,
                                  limit_for=lambda kind: self.max_image_bytes if kind == 'IMAGE' else 1 << 16)
        self.port = self._server.port
        self._server.start()
        self.on_event('igtl_image_source_started', f'OpenIGTLink image source on {self.host}:{self.port}',
                      {'port': self.port})

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def describe(self) -> str:
        return f'OpenIGTLink IMAGE {self.host}:{self.port}'

    def _on_refused(self, device, mtype, code, reason):
        self.on_event('igtl_image_refused', f'OpenIGTLink {mtype} {device!r} refused: {reason}',
                      {'device': device, 'reason': reason})
        return ()

    def _on_message(self, message):
        if getattr(message, 'message_type', '') != 'IMAGE':
            return ()
        now = time.monotonic()
        self._count += 1
        device = str(getattr(message, 'device_name', '') or 'Image')
        scan_id = f'igtl{self._count:03d}'
        series = Series(scan_id=scan_id, series_instance_uid=f'igtl:{device}:{self._count}', modality=self.modality,
                        series_description=device, instance_count=1, expected_count=1, first_received=now,
                        last_received=now, source=self.kind, calling_ae=f'{self.host}:{self.port}')
        try:
            volume = volume_from_igtl_image(message, self.modality)
            path = self.storage_dir / f'{scan_id}_{_safe(device)}.nii.gz'
            write_nifti(volume, path)
            volume.metadata['source'] = str(path)
            series.volume, series.dicom_dir = volume, path
            series.scan_length_m = float(abs(volume.spacing[2]) * volume.data.shape[0])
        except (ImageError, OSError, ValueError) as exc:
            series.refused = str(exc)
            self.on_event('igtl_image_refused', f'OpenIGTLink IMAGE {device!r} refused: {exc}',
                          {'device': device, 'reason': str(exc)})
        self.inbox.put(series)
        return ()


def _safe(text: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_' else '_' for c in text)[:40]
