"""Label map: a segmented volume placed in the scanner frame.

Array layout and frames
-----------------------
``data`` is indexed ``data[k, j, i]`` (slice, row, column = z, y, x), as
returned by SimpleITK/nibabel-to-numpy conversions. ``affine`` maps the voxel
index ``(i, j, k, 1)`` -- column first -- to the scanner frame (DICOM **LPS**,
metres). Inside the planner, points are handled in *array coordinates*
``(k, j, i)`` (continuous, voxel centres at integers) so they can be passed
directly to ``scipy.ndimage``; :attr:`LabelMap.array_to_world` is the matching
4x4 transform.

Label roles
-----------
* ``names``: label -> human-readable name used in every explanation.
* ``margins_m``: the *critical* labels and their safety margins (m). A path
  closer than the margin to that structure is rejected.
* ``bone_labels``: labels the needle must never cross (reported as bone); they
  are critical too (margin from ``margins_m``, default 0).
* ``air_labels``: labels outside the patient. The body is everything else;
  the skin is the body surface adjacent to air.
* ``tumour_labels``: the lesion (used by the ablation model).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import numpy as np

from .errors import (DegenerateAffine, EmptyLabelMap, InvalidAffine, InvalidLabelMap,
                     NonFiniteInput)

# Permutation from array coordinates (k, j, i, 1) to index (i, j, k, 1).
_ARRAY_TO_INDEX = np.array([[0, 0, 1, 0],
                            [0, 1, 0, 0],
                            [1, 0, 0, 0],
                            [0, 0, 0, 1]], dtype=float)

# Columns of the affine may deviate from orthogonal by this cosine: scanner
# affines carry float noise, but a real shear breaks the per-axis spacing the
# distance transform relies on.
_ORTHOGONALITY_TOL = 1e-4


def affine_from_itk(origin_mm, spacing_mm, direction) -> np.ndarray:
    """4x4 index (i, j, k) -> scanner LPS metres from ITK/DICOM geometry given in millimetres.

    ``direction`` is the 3x3 direction cosine matrix (row-major 9-tuple or
    3x3), columns = voxel axes in LPS.
    """
    from igt_robot.units import mm_to_m  # the single mm <-> m boundary

    d = np.asarray(direction, dtype=float).reshape(3, 3)
    a = np.eye(4)
    a[:3, :3] = d @ np.diag(mm_to_m(np.asarray(spacing_mm, dtype=float)))
    a[:3, 3] = mm_to_m(np.asarray(origin_mm, dtype=float))
    return a


def check_affine(affine) -> np.ndarray:
    """Validate a 4x4 index->scanner affine; return it as a float array.

    Raises NonFiniteInput (NaN/inf), InvalidAffine (shape, last row, shear) or
    DegenerateAffine (singular / zero-length voxel axis).
    """
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        raise InvalidAffine(f'affine must be 4x4, got shape {a.shape}')
    if not np.all(np.isfinite(a)):
        raise NonFiniteInput('affine contains NaN or infinite values')
    if not np.allclose(a[3], [0, 0, 0, 1], atol=1e-12):
        raise InvalidAffine(f'affine last row must be [0, 0, 0, 1], got {a[3].tolist()}')
    cols = a[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms < 1e-9):
        axis = 'ijk'[int(np.argmin(norms))]
        raise DegenerateAffine(f'affine is degenerate: voxel axis {axis} has zero length '
                               f'(spacings {norms.tolist()} m)')
    unit = cols / norms
    det = float(np.linalg.det(unit))
    if abs(det) < 1e-6:
        raise DegenerateAffine(f'affine is degenerate: voxel axes are collinear (det of unit axes = {det:.2e})')
    gram = unit.T @ unit
    off = np.abs(gram - np.eye(3)).max()
    if off > _ORTHOGONALITY_TOL:
        raise InvalidAffine(f'affine voxel axes are not orthogonal (max |cos| = {off:.2e}); sheared '
                            'grids are not supported: resample the label map first')
    return a


class LabelMap:
    """A label volume with its geometry and label roles (see module docstring).

    Args:
        data: integer array (z, y, x), e.g. uint8/uint16.
        affine: 4x4, voxel index (i, j, k, 1) -> scanner LPS metres.
        names: label -> name.
        margins_m: critical label -> safety margin (m, >= 0).
        bone_labels: labels never to be crossed.
        air_labels: labels outside the patient (default: 0).
        tumour_labels: lesion labels (ablation coverage).
    """

    def __init__(self, data, affine, names: Mapping[int, str], margins_m: Mapping[int, float],
                 bone_labels: Iterable[int] = (), air_labels: Iterable[int] = (0,),
                 tumour_labels: Iterable[int] = ()):
        arr = np.asarray(data)
        if arr.ndim != 3:
            raise InvalidLabelMap(f'label map must be a 3-D array (z, y, x), got {arr.ndim}-D shape {arr.shape}')
        if arr.size == 0:
            raise EmptyLabelMap(f'label map is empty (shape {arr.shape})')
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InvalidLabelMap(f'label map must hold integer labels (uint8/uint16), got dtype {arr.dtype}')
        if arr.min() < 0:
            raise InvalidLabelMap('label map holds negative labels')
        self.data = np.ascontiguousarray(arr)
        self.affine = check_affine(affine)
        self.names = {int(k): str(v) for k, v in dict(names).items()}
        margins = {}
        for label, margin in dict(margins_m).items():
            m = float(margin)
            if not np.isfinite(m):
                raise NonFiniteInput(f'safety margin of {self.name(int(label))!r} is not finite')
            if m < 0:
                raise InvalidLabelMap(f'safety margin of {self.name(int(label))!r} is negative ({m} m)')
            margins[int(label)] = m
        self.margins_m = margins
        self.bone_labels = frozenset(int(x) for x in bone_labels)
        self.air_labels = frozenset(int(x) for x in air_labels)
        self.tumour_labels = frozenset(int(x) for x in tumour_labels)
        overlap = self.air_labels & (set(self.margins_m) | self.bone_labels)
        if overlap:
            raise InvalidLabelMap(f'labels {sorted(overlap)} are declared both air and critical')

        self.array_to_world = self.affine @ _ARRAY_TO_INDEX
        self.world_to_array = np.linalg.inv(self.array_to_world)
        # Spacing per array axis (z, y, x order), metres: column norms.
        self.spacing = np.linalg.norm(self.array_to_world[:3, :3], axis=0)
        self._counts: Optional[np.ndarray] = None
        self._body: Optional[np.ndarray] = None
        if not np.any(self.body_mask):
            raise EmptyLabelMap(f'label map contains only air labels {sorted(self.air_labels)}: no body to plan in')

    @classmethod
    def from_sitk(cls, image, names, margins_m, **roles) -> 'LabelMap':
        """Build from a SimpleITK label image (origin/spacing in mm, LPS, as DICOM/ITK store them).

        ``roles``: bone_labels, air_labels, tumour_labels (see the class).
        """
        import SimpleITK as sitk  # optional: only for this boundary

        data = sitk.GetArrayFromImage(image)  # (z, y, x)
        affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        return cls(data, affine, names, margins_m, **roles)

    # ---- label roles -------------------------------------------------------
    def name(self, label: int) -> str:
        """Human-readable name of a label ('label 7' when unnamed)."""
        return self.names.get(int(label), f'label {int(label)}')

    @property
    def label_counts(self) -> np.ndarray:
        """Voxel count per label value (index = label)."""
        if self._counts is None:
            self._counts = np.bincount(self.data.ravel())
        return self._counts

    def present(self, label: int) -> bool:
        """True when at least one voxel carries ``label``."""
        c = self.label_counts
        return 0 <= label < c.size and c[label] > 0

    @property
    def critical_labels(self) -> list[int]:
        """Critical labels (margins or bone) that occur in the volume, sorted."""
        return sorted(label for label in set(self.margins_m) | self.bone_labels if self.present(label))

    def margin(self, label: int) -> float:
        """Safety margin of a label (m), 0 when none was given."""
        return self.margins_m.get(int(label), 0.0)

    @property
    def body_mask(self) -> np.ndarray:
        """Boolean (z, y, x) mask of voxels inside the patient (not air). Cached."""
        if self._body is None:
            lut = np.ones(int(self.data.max()) + 1, dtype=bool)
            for a in self.air_labels:
                if a < lut.size:
                    lut[a] = False
            self._body = lut[self.data]
        return self._body

    # ---- geometry ----------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel, m^3."""
        return float(np.prod(self.spacing))

    def to_array(self, points_world) -> np.ndarray:
        """Scanner LPS points (m), (3,) or (N, 3) -> continuous array coords (k, j, i)."""
        p = np.asarray(points_world, dtype=float)
        return p @ self.world_to_array[:3, :3].T + self.world_to_array[:3, 3]

    def to_world(self, array_coords) -> np.ndarray:
        """Array coords (k, j, i), (3,) or (N, 3) -> scanner LPS points (m)."""
        a = np.asarray(array_coords, dtype=float)
        return a @ self.array_to_world[:3, :3].T + self.array_to_world[:3, 3]

    def inside(self, array_coords) -> np.ndarray:
        """True where array coords fall inside the volume (within half a voxel of a centre)."""
        a = np.atleast_2d(np.asarray(array_coords, dtype=float))
        hi = np.asarray(self.shape, float) - 0.5
        return np.all((a >= -0.5) & (a <= hi), axis=-1)

    def label_at(self, points_world) -> np.ndarray:
        """Label of the voxel containing each point (nearest centre); -1 outside the volume."""
        a = np.atleast_2d(self.to_array(points_world))
        idx = np.rint(a).astype(np.intp)
        ok = self.inside(a)
        out = np.full(a.shape[0], -1, dtype=np.int64)
        if np.any(ok):
            i = idx[ok]
            out[ok] = self.data[i[:, 0], i[:, 1], i[:, 2]]
        return out

    def extent_world(self) -> tuple:
        """(min, max) corners of the voxel-centre bounding box in scanner LPS m."""
        n = np.asarray(self.shape, float) - 1
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
        w = self.to_world(corners)
        return w.min(axis=0), w.max(axis=0)
