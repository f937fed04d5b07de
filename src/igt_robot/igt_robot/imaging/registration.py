"""Top-level image-to-robot registration used by the rest of the stack.

:func:`register_image` turns a scan (any :class:`Volume`, e.g. from
:func:`igt_robot.imaging.io.read_dicom_series`) into ``T_base_scanner``: the
transform mapping scanner LPS points (m) into the robot's ``base_link``.

    T_base_scanner = T_base_zframe @ inv(T_scanner_zframe)

where ``T_base_zframe`` is the fixed mounting of the fiducial frame on the
robot (URDF; contracts.md) and ``T_scanner_zframe`` is what the image shows.
A rejected registration never carries a transform.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from igt_robot import frames, units
from igt_robot.imaging.errors import ImageError, RegistrationRejected
from igt_robot.imaging.fiducials import (DEFAULT_FIDUCIALS_ZFRAME, DEFAULT_MARKER_RADIUS_M,
                                         register_fiducials)
from igt_robot.imaging.volume import Volume
from igt_robot.imaging.zframe import ZFrameGates, register_zframe

DEFAULT_MAX_PREDICTED_TRE_M = units.mm_to_m(1.5)


@dataclasses.dataclass
class RegistrationOutcome:
    """Result of :func:`register_image`.

    Attributes:
        accepted: all quality gates passed.
        reason: 'accepted' or the operator-readable rejection reason.
        method: 'zframe' or 'fiducials'.
        T_base_scanner: 4x4, scanner LPS (m) -> base_link (m); None unless accepted.
        T_scanner_fiducial: pose of the fiducial frame (zframe / marker model) in the
            scanner; None unless accepted.
        fre_m: fiducial registration error (RMS residual, m).
        tre_predicted_m: predicted RMS target registration error at the target (m),
            NaN without a target.
        fiducial_count: rod cross-sections used (zframe) or markers used (fiducials).
        details: the method's own result (ZFrameResult / FiducialResult).
    """

    accepted: bool
    reason: str
    method: str
    T_base_scanner: Optional[np.ndarray]
    T_scanner_fiducial: Optional[np.ndarray]
    fre_m: float
    tre_predicted_m: float
    fiducial_count: int
    details: object = None

    def require_accepted(self):
        """Return self, or raise :class:`RegistrationRejected` with the reason."""
        if not self.accepted:
            raise RegistrationRejected(self.reason)
        return self


def register_image(volume: Volume, method: str = 'zframe', T_base_zframe=None, target_scanner=None, *,
                   zframe_gates: Optional[ZFrameGates] = None,
                   fiducials_model_m=DEFAULT_FIDUCIALS_ZFRAME,
                   marker_radius_m: float = DEFAULT_MARKER_RADIUS_M,
                   max_predicted_tre_m: float = DEFAULT_MAX_PREDICTED_TRE_M) -> RegistrationOutcome:
    """Register a scan to the robot.

    Args:
        volume: the scan (scanner LPS, m).
        method: 'zframe' (7-rod Z-frame) or 'fiducials' (spherical markers whose
            positions ``fiducials_model_m`` are given in the zframe frame).
        T_base_zframe: 4x4 pose of the zframe frame on base_link (m), from the
            robot model (``RobotModel.T_base_zframe``). Required.
        target_scanner: optional target (scanner LPS, m) for the predicted TRE;
            the registration is rejected when that exceeds ``max_predicted_tre_m``.

    Raises:
        ImageError: the volume is unusable (NaN, constant, zero spacing, ...).
        ValueError: bad arguments (unknown method, missing T_base_zframe).
    """
    if T_base_zframe is None:
        raise ValueError('T_base_zframe is required (take it from the robot model / URDF)')
    T_base_zframe = np.asarray(T_base_zframe, float)
    if T_base_zframe.shape != (4, 4):
        raise ValueError('T_base_zframe must be a 4x4 matrix')
    if not isinstance(volume, Volume):
        raise ImageError(f'expected a Volume, got {type(volume).__name__}')
    target = None if target_scanner is None else np.asarray(target_scanner, float).reshape(3)

    if method == 'zframe':
        result = register_zframe(volume, zframe_gates)
        T_scanner_fid = result.T_scanner_zframe
        tre = result.predicted_tre_m(target) if target is not None else float('nan')
        count = int(sum(result.rod_points.values()))
    elif method == 'fiducials':
        result = register_fiducials(volume, fiducials_model_m, marker_radius_m=marker_radius_m,
                                    target_scanner=target)
        T_scanner_fid = result.T_scanner_model
        tre = result.tre_predicted_m
        count = result.fiducial_count
    else:
        raise ValueError(f"unknown registration method {method!r}; use 'zframe' or 'fiducials'")

    accepted, reason = result.accepted, result.reason
    if accepted and target is not None and not np.isfinite(tre):
        accepted, reason = False, 'predicted TRE at the target could not be computed'
    if accepted and target is not None and tre > max_predicted_tre_m:
        accepted, reason = False, (f'predicted TRE at the target {units.m_to_mm(tre):.2f} mm > '
                                   f'{units.m_to_mm(max_predicted_tre_m):.2f} mm limit')
    T_base_scanner = None
    if accepted:
        T_base_scanner = T_base_zframe @ frames.invert(T_scanner_fid)
    return RegistrationOutcome(accepted=accepted, reason=reason, method=method, T_base_scanner=T_base_scanner,
                               T_scanner_fiducial=T_scanner_fid if accepted else None, fre_m=result.fre_m,
                               tre_predicted_m=tre, fiducial_count=count, details=result)
