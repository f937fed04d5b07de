"""Imaging: volumes, image I/O, simulated scanner, Z-frame / point-fiducial
registration, needle detection and the patient-motion check.

Frames: the core holds everything in the ``scanner`` frame (LPS, metres).
RAS (NIfTI, Slicer/OpenIGTLink) and millimetres appear only inside
:mod:`igt_robot.imaging.io` and the SimpleITK conversions. No rclpy here.

Most callers need only::

    from igt_robot.imaging import read_dicom_series, register_image, find_needle
"""
from igt_robot.imaging.errors import ImageError, RegistrationRejected
from igt_robot.imaging.fiducials import (DEFAULT_FIDUCIALS_ZFRAME, FiducialResult, predicted_tre,
                                         register_fiducials, rigid_fit)
from igt_robot.imaging.io import (igtl_image_from_volume, read_dicom_series, read_nifti, volume_from_igtl_image,
                                  write_dicom_series, write_nifti)
from igt_robot.imaging.motion_check import MotionCheckResult, check_motion
from igt_robot.imaging.needle import find_needle
from igt_robot.imaging.phantom import LABELS, PhantomSpec, PhantomTruth, Tube, make_phantom
from igt_robot.imaging.registration import RegistrationOutcome, register_image
from igt_robot.imaging.volume import Volume, make_affine, validate_intensities
from igt_robot.imaging.zframe import ZFrameGates, ZFrameResult, register_zframe
from igt_robot.imaging.zframe_model import ZFRAME_ROD_RADIUS_M, ZFRAME_RODS

__all__ = [
    'ImageError', 'RegistrationRejected', 'Volume', 'make_affine', 'validate_intensities',
    'read_dicom_series', 'write_dicom_series', 'read_nifti', 'write_nifti', 'volume_from_igtl_image',
    'igtl_image_from_volume', 'make_phantom', 'PhantomSpec', 'PhantomTruth', 'Tube', 'LABELS',
    'register_image', 'RegistrationOutcome', 'register_zframe', 'ZFrameResult', 'ZFrameGates',
    'register_fiducials', 'FiducialResult', 'rigid_fit', 'predicted_tre', 'DEFAULT_FIDUCIALS_ZFRAME',
    'find_needle', 'check_motion', 'MotionCheckResult', 'ZFRAME_RODS', 'ZFRAME_ROD_RADIUS_M',
]
