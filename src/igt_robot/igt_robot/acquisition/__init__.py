"""Where the procedure's images come from: the acquisition interface and its implementations (no rclpy).

See :mod:`igt_robot.acquisition.base` for the interface; :func:`make_source` builds
the one a procedure is configured with.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Optional

from .base import (AcquisitionError, AcquisitionSource, IrradiationEvent, ScanRequest, Series, SeriesInbox,
                   match_series)

KINDS = ('simulated', 'dicom', 'igtl', 'folder')


def make_source(kind: str, *, storage_dir, simulated_scanner=None, modality: str = 'CT',
                dicom_ae_title: str = 'IGT_ROBOT', dicom_host: str = '127.0.0.1', dicom_port: int = 11112,
                allowed_calling_aets=(), quiet_period_s: float = 5.0, max_instance_bytes: int = 16 << 20,
                igtl_port: int = 18945, watch_dir: str = '',
                on_event: Optional[Callable[[str, str, dict], None]] = None) -> AcquisitionSource:
    """The configured image source (not started)."""
    storage_dir = pathlib.Path(storage_dir)
    if kind == 'simulated':
        if simulated_scanner is None:
            raise ValueError('the simulated source needs a simulated scanner')
        from .simulated import SimulatedAcquisition
        return SimulatedAcquisition(simulated_scanner)
    if kind == 'dicom':
        from .dicom_receiver import DicomReceiver
        return DicomReceiver(storage_dir / 'dicom', ae_title=dicom_ae_title, host=dicom_host, port=dicom_port,
                             allowed_calling_aets=allowed_calling_aets, modalities=(modality,),
                             quiet_period_s=quiet_period_s, max_instance_bytes=max_instance_bytes, on_event=on_event)
    if kind == 'igtl':
        from .igtl_image import IgtlImageSource
        return IgtlImageSource(storage_dir / 'igtl', host=dicom_host, port=igtl_port, modality=modality,
                               on_event=on_event)
    if kind == 'folder':
        if not watch_dir:
            raise ValueError('the folder source needs watch_dir')
        from .folder import WatchedFolder
        return WatchedFolder(watch_dir, modalities=(modality,), quiet_period_s=quiet_period_s,
                             max_instance_bytes=max_instance_bytes, on_event=on_event)
    raise ValueError(f'unknown acquisition source {kind!r}; use one of {", ".join(KINDS)}')


__all__ = ['AcquisitionError', 'AcquisitionSource', 'IrradiationEvent', 'KINDS', 'ScanRequest', 'Series',
           'SeriesInbox', 'make_source', 'match_series']
