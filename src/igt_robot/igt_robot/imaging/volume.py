"""The in-memory image volume used by the whole imaging package.

A :class:`Volume` is a 3-D numpy array indexed ``data[k, j, i]`` (slice, row,
column -- the order SimpleITK and pydicom use) plus a 4x4 ``affine`` that maps
the *continuous index* ``(i, j, k, 1)`` to the ``scanner`` frame: DICOM patient
coordinates, **LPS, metres**. Millimetres only appear when converting to or
from SimpleITK/DICOM/NIfTI/OpenIGTLink, always through :mod:`igt_robot.units`.

The columns of ``affine[:3, :3]`` are the scanner-frame vectors of one index
step along i, j and k; their norms are the voxel spacings (m) and their
directions the direction cosines. Slices (the array's first axis) may be
oblique (direction cosines not axis-aligned) and voxels anisotropic.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from igt_robot import frames, units
from igt_robot.imaging.errors import ImageError

# Anything smaller than this (m) is treated as a zero voxel spacing.
MIN_SPACING_M = 1e-6
# Directions whose columns deviate from orthonormal by more than this are a
# sheared grid, which neither DICOM nor the registration code supports.
ORTHONORMAL_TOL = 1e-3


def make_affine(direction, spacing_m, origin_m):
    """Build an index->scanner affine from direction cosines (3x3, columns =
    scanner directions of the i, j, k axes), spacings (m, for i, j, k) and the
    scanner position of voxel (0, 0, 0) (m, LPS)."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(spacing_m, dtype=float).reshape(3)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = np.asarray(origin_m, dtype=float).reshape(3)
    return affine


def affine_centered(shape_kji, spacing_m, direction, center_m):
    """Affine of a grid of ``shape_kji`` voxels whose *centre* lies at
    ``center_m`` (scanner LPS, m)."""
    nk, nj, ni = shape_kji
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(spacing_m, dtype=float).reshape(3)
    half_extent = (np.array([ni, nj, nk], dtype=float) - 1.0) / 2.0
    origin = np.asarray(center_m, dtype=float) - direction @ (spacing * half_extent)
    return make_affine(direction, spacing, origin)


def affine_m_to_mm(affine_m):
    """Index->world affine in metres -> the same affine in millimetres (every
    element of the top 3x4 block carries a length)."""
    out = np.array(affine_m, dtype=float, copy=True)
    out[:3, :] = units.m_to_mm(out[:3, :])
    return out


def affine_mm_to_m(affine_mm):
    """Index->world affine in millimetres -> metres."""
    out = np.array(affine_mm, dtype=float, copy=True)
    out[:3, :] = units.mm_to_m(out[:3, :])
    return out


@dataclasses.dataclass
class Volume:
    """A scalar image on a regular grid in the scanner frame.

    Attributes:
        data: array indexed ``[k, j, i]`` (slice, row, column).
        affine: 4x4, continuous index ``(i, j, k, 1)`` -> scanner LPS metres.
        modality: ``'CT'`` (values in HU), ``'MR'`` (arbitrary units) or
            ``'LABEL'`` (integer label map).
        metadata: free-form (series UID, description, label names, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    modality: str = 'CT'
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.data = np.asarray(self.data)
        self.affine = np.asarray(self.affine, dtype=float)
        if self.data.ndim != 3:
            raise ImageError(f'volume must be 3-D, got array of shape {self.data.shape}')
        if min(self.data.shape) < 1:
            raise ImageError(f'volume has an empty axis: shape {self.data.shape}')
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise ImageError('volume affine must be a finite 4x4 matrix')
        spacing = self.spacing
        if np.any(spacing < MIN_SPACING_M):
            raise ImageError(f'volume has zero voxel spacing: {units.m_to_mm(spacing)} mm (i, j, k)')
        gram = self.direction.T @ self.direction
        if np.max(np.abs(gram - np.eye(3))) > ORTHONORMAL_TOL:
            raise ImageError('volume direction cosines are not orthonormal (sheared or degenerate grid)')

    # --- geometry -----------------------------------------------------------------
    @property
    def shape_kji(self):
        """Array shape (slices, rows, columns)."""
        return self.data.shape

    @property
    def spacing(self):
        """Voxel spacing (m) along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self):
        """3x3 direction cosines; column n is the scanner direction of index axis n (i, j, k)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)[None, :]

    @property
    def origin(self):
        """Scanner position (m, LPS) of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def slice_normal(self):
        """Unit scanner vector of increasing slice index k."""
        return self.direction[:, 2].copy()

    @property
    def center(self):
        """Scanner position (m) of the grid centre."""
        nk, nj, ni = self.data.shape
        return self.index_to_scanner(np.array([(ni - 1) / 2.0, (nj - 1) / 2.0, (nk - 1) / 2.0]))

    def index_to_scanner(self, ijk):
        """Continuous indices (..., 3) ordered (i, j, k) -> scanner LPS (m)."""
        return frames.apply(self.affine, ijk)

    def scanner_to_index(self, points):
        """Scanner LPS points (m) -> continuous indices (i, j, k)."""
        inv = np.linalg.inv(self.affine)
        return frames.apply(inv, points)

    def contains(self, points, margin_voxels=0.0):
        """True for scanner points whose continuous index lies inside the grid
        (shrunk by ``margin_voxels`` on every side)."""
        ijk = np.atleast_2d(self.scanner_to_index(points))
        upper = np.array(self.data.shape[::-1], dtype=float) - 1.0 - margin_voxels
        return np.all((ijk >= margin_voxels) & (ijk <= upper), axis=1)

    def with_data(self, data, modality: Optional[str] = None):
        """Same grid, new voxel values."""
        return Volume(np.asarray(data), self.affine.copy(),
                      self.modality if modality is None else modality, dict(self.metadata))

    # --- SimpleITK ------------------------------------------------------------------
    def to_sitk(self):
        """Convert to a SimpleITK image (ITK geometry is in mm, LPS)."""
        import SimpleITK as sitk
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.data))
        image.SetSpacing(tuple(float(s) for s in units.m_to_mm(self.spacing)))
        image.SetOrigin(tuple(float(o) for o in units.m_to_mm(self.origin)))
        image.SetDirection(tuple(float(d) for d in self.direction.reshape(-1)))
        return image

    @classmethod
    def from_sitk(cls, image, modality='CT', metadata=None):
        """Build a Volume from a 3-D SimpleITK image (mm, LPS)."""
        import SimpleITK as sitk
        if image.GetDimension() != 3:
            raise ImageError(f'expected a 3-D image, got {image.GetDimension()}-D')
        data = sitk.GetArrayFromImage(image)
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        spacing = units.mm_to_m(np.array(image.GetSpacing(), dtype=float))
        origin = units.mm_to_m(np.array(image.GetOrigin(), dtype=float))
        return cls(data, make_affine(direction, spacing, origin), modality, dict(metadata or {}))


# Plausible value ranges per modality; outside them the data is not what the
# header claims (wrong rescale, float garbage, a raw detector dump ...).
CT_HU_RANGE = (-3100.0, 31000.0)
MAX_ABS_INTENSITY = 1e7


def validate_intensities(volume: Volume, min_slices: int = 1):
    """Raise :class:`ImageError` when the voxel values cannot be a real image.

    Checks: finite values, not all zero, not constant, magnitudes within a sane
    bound, CT values inside the Hounsfield range, at least ``min_slices`` slices.
    """
    data = volume.data
    if data.shape[0] < min_slices:
        raise ImageError(f'volume has {data.shape[0]} slice(s), need at least {min_slices}')
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ImageError(f'volume data type {data.dtype} is not a real scalar type')
    finite = np.isfinite(data)
    if not np.all(finite):
        bad = int(np.size(data) - np.count_nonzero(finite))
        raise ImageError(f'volume contains {bad} NaN/infinite voxel(s)')
    lo, hi = float(np.min(data)), float(np.max(data))
    if lo == 0.0 and hi == 0.0:
        raise ImageError('volume is all zero')
    if lo == hi:
        raise ImageError(f'volume is constant (every voxel = {lo:g})')
    if max(abs(lo), abs(hi)) > MAX_ABS_INTENSITY:
        raise ImageError(f'volume intensities [{lo:.3g}, {hi:.3g}] are implausible (|value| > {MAX_ABS_INTENSITY:g})')
    if volume.modality == 'CT':
        # a regular sub-sample of a million voxels gives the same percentiles at a fraction of the cost
        sample = data.ravel()[:: max(1, data.size // 1_000_000)]
        p_lo, p_hi = np.percentile(sample, [0.5, 99.5])
        if p_lo < CT_HU_RANGE[0] or p_hi > CT_HU_RANGE[1]:
            raise ImageError(f'CT intensities [{p_lo:.0f}, {p_hi:.0f}] are outside the Hounsfield range '
                             f'{CT_HU_RANGE} (missing rescale slope/intercept?)')
        if p_hi - p_lo < 50.0:
            raise ImageError(f'CT intensity spread {p_hi - p_lo:.1f} HU is too small for a real scan')
