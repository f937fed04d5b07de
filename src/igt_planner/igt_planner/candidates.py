"""Candidate skin entries and skin normals.

The skin is the set of body voxels that share a face with an air voxel (see
:class:`~igt_planner.labelmap.LabelMap` for what counts as air). Candidate
entries are the centres of the skin voxels inside the allowed entry region, so
an entry lies at most half a voxel under the true skin surface.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
from scipy.spatial import cKDTree

from .errors import InvalidEntryRegion, NonFiniteInput
from .labelmap import LabelMap


def skin_voxels(labelmap: LabelMap) -> np.ndarray:
    """Flat indices (into ``labelmap.data``) of body voxels 6-adjacent to air.

    The image border is not air: a body cut by the field of view has no skin
    there.
    """
    body = labelmap.body_mask
    skin = np.zeros_like(body)
    for axis in range(3):
        n = body.shape[axis]
        if n < 2:
            continue
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, n - 1), slice(1, n)
        a, b = tuple(a), tuple(b)
        # A body voxel next to an air voxel along this axis, in either direction.
        skin[a] |= body[a] & ~body[b]
        skin[b] |= body[b] & ~body[a]
    return np.flatnonzero(skin)


class EntryRegion:
    """Where the needle may enter the skin: a boolean mask or a set of labels.

    * ``EntryRegion.from_mask(mask)``: a (z, y, x) boolean volume (e.g. painted
      by the operator); skin voxels inside it are allowed.
    * ``EntryRegion.from_labels([label, ...])``: skin voxels carrying one of
      these labels are allowed (a "skin entry zone" label in the label map).
    """

    def __init__(self, mask: Optional[np.ndarray] = None, labels: Optional[Iterable[int]] = None,
                 name: str = 'allowed skin region'):
        if (mask is None) == (labels is None):
            raise InvalidEntryRegion('give exactly one of an entry mask or entry labels')
        self.mask = None if mask is None else np.asarray(mask)
        self.labels = None if labels is None else frozenset(int(x) for x in labels)
        self.name = name
        if self.mask is not None and self.mask.dtype != bool:
            raise InvalidEntryRegion(f'entry mask must be boolean, got dtype {self.mask.dtype}')

    @classmethod
    def from_mask(cls, mask, name: str = 'allowed skin region') -> 'EntryRegion':
        return cls(mask=mask, name=name)

    @classmethod
    def from_labels(cls, labels, name: str = 'allowed skin region') -> 'EntryRegion':
        return cls(labels=labels, name=name)

    def select(self, labelmap: LabelMap, flat_idx: np.ndarray) -> np.ndarray:
        """Boolean per voxel in ``flat_idx``: is it inside the region?"""
        if self.mask is not None:
            if self.mask.shape != labelmap.shape:
                raise InvalidEntryRegion(f'entry mask shape {self.mask.shape} differs from the label map '
                                         f'shape {labelmap.shape}')
            return self.mask.ravel()[flat_idx]
        lut = np.zeros(int(labelmap.data.max()) + 1, dtype=bool)
        for label in self.labels:
            if label < lut.size:
                lut[label] = True
        return lut[labelmap.data.ravel()[flat_idx]]


def flat_to_array(labelmap: LabelMap, flat_idx: np.ndarray) -> np.ndarray:
    """Flat voxel indices -> (N, 3) integer array coords (k, j, i)."""
    return np.stack(np.unravel_index(flat_idx, labelmap.shape), axis=1)


class SkinIndex:
    """Skin voxels of a map and of an entry region, with a nearest-voxel lookup.

    Built once per (map, region) and reused by every plan/validate call.
    """

    def __init__(self, labelmap: LabelMap, region: Optional[EntryRegion]):
        self.labelmap = labelmap
        self.region = region
        self.skin_flat = skin_voxels(labelmap)
        if self.skin_flat.size == 0:
            raise InvalidEntryRegion('the body has no skin voxel (no body voxel touches air); '
                                     'check air_labels')
        if region is None:
            self.allowed_flat = self.skin_flat
        else:
            self.allowed_flat = self.skin_flat[region.select(labelmap, self.skin_flat)]
            if self.allowed_flat.size == 0:
                raise InvalidEntryRegion(f'the {region.name} contains no skin voxel '
                                         '(the region must overlap the body surface)')
        self._tree: Optional[cKDTree] = None

    @property
    def describes(self) -> str:
        return 'the allowed skin region' if self.region is not None else 'the skin surface'

    def allowed_world(self) -> np.ndarray:
        """(N, 3) scanner LPS centres of the allowed skin voxels."""
        return self.labelmap.to_world(flat_to_array(self.labelmap, self.allowed_flat).astype(float))

    def distance_to_allowed(self, points_world: np.ndarray) -> np.ndarray:
        """Distance (m) from each point to the nearest allowed skin voxel centre."""
        if self._tree is None:
            self._tree = cKDTree(self.allowed_world())
        d, _ = self._tree.query(np.atleast_2d(points_world))
        return np.asarray(d, float)


def check_points(points, what: str) -> np.ndarray:
    """Validate (3,) or (N, 3) finite points; return (N, 3) float."""
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 3:
        raise InvalidEntryRegion(f'{what} must have shape (N, 3), got {np.shape(points)}')
    bad = ~np.all(np.isfinite(p), axis=1)
    if np.any(bad):
        raise NonFiniteInput(f'{what} contains NaN or infinite coordinates (row {int(np.flatnonzero(bad)[0])})')
    return p


def thin(n: int, keep: int, seed: int) -> np.ndarray:
    """Sorted indices of a uniform random subset of size min(n, keep), reproducible by seed."""
    if n <= keep:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=keep, replace=False))


def _gauss1d(sigma_vox: float, truncate: float) -> np.ndarray:
    """Normalised 1-D Gaussian with scipy.ndimage's radius rule (so both paths agree)."""
    radius = int(truncate * sigma_vox + 0.5)
    x = np.arange(-radius, radius + 1, dtype=float)
    w = np.exp(-0.5 * (x / sigma_vox) ** 2)
    return w / w.sum()


class SkinNormals:
    """Outward skin normals from the gradient of the Gaussian-smoothed body mask.

    The smoothed mask is built once (float32) over the bounding box of the
    allowed skin voxels, grown by the kernel radius so the values inside are
    those of smoothing the whole volume. The gradient at a point is the
    central difference at its nearest voxel centre. Points outside that box
    (e.g. an operator's entry elsewhere) get the same quantity from a local
    window sum. Rows where the smoothed mask is flat (deep inside or far
    outside the body) are NaN.

    Args:
        labelmap: the map (its body mask is smoothed).
        box_coords: (N, 3) integer array coords whose bounding box is covered
            (the allowed skin voxels).
        sigma_m: Gaussian sigma (m), converted per axis with the voxel spacing.
        truncate: kernel half-width in sigmas.
    """

    def __init__(self, labelmap: LabelMap, box_coords: np.ndarray, sigma_m: float, truncate: float):
        from scipy import ndimage
        self.labelmap = labelmap
        self.shape = np.asarray(labelmap.shape)
        self.sigma_vox = sigma_m / labelmap.spacing
        self.truncate = truncate
        self.kernels = [_gauss1d(s, truncate) for s in self.sigma_vox]
        radius = np.array([(k.size - 1) // 2 for k in self.kernels])
        c = np.asarray(box_coords)
        # Inner box: where central differences are read (one voxel beyond the points).
        self.lo = np.maximum(c.min(axis=0) - 1, 0)
        self.hi = np.minimum(c.max(axis=0) + 1, self.shape - 1)
        # Outer box: inner + kernel radius, so smoothing inside is unaffected by the crop.
        olo = np.maximum(self.lo - radius, 0)
        ohi = np.minimum(self.hi + radius, self.shape - 1)
        sub = labelmap.body_mask[tuple(slice(a, b + 1) for a, b in zip(olo, ohi))].astype(np.float32)
        for axis, k in enumerate(self.kernels):
            sub = ndimage.correlate1d(sub, k.astype(np.float32), axis=axis, mode='nearest')
        inner = tuple(slice(a - o, b - o + 1) for a, b, o in zip(self.lo, self.hi, olo))
        self.smoothed = np.ascontiguousarray(sub[inner])

    def _window_gradient(self, p: np.ndarray) -> np.ndarray:
        """Central differences of the smoothed mask at voxel centres p (M, 3), by window sums."""
        body = self.labelmap.body_mask
        out = np.empty((p.shape[0], 3))
        for row, c in enumerate(p):
            for axis in range(3):
                vals = []
                for sgn in (1, -1):
                    q = c.copy()
                    q[axis] += sgn
                    q = np.clip(q, 0, self.shape - 1)
                    sl = []
                    for a, k in enumerate(self.kernels):
                        r = (k.size - 1) // 2
                        sl.append(np.clip(np.arange(q[a] - r, q[a] + r + 1), 0, self.shape[a] - 1))
                    patch = body[np.ix_(*sl)].astype(float)
                    vals.append(np.einsum('ijk,i,j,k->', patch, *self.kernels))
                out[row, axis] = 0.5 * (vals[0] - vals[1])
        return out

    def normals(self, array_coords: np.ndarray) -> np.ndarray:
        """(N, 3) outward unit normals (scanner LPS) at (N, 3) array coords."""
        p = np.clip(np.rint(np.atleast_2d(array_coords)).astype(np.intp), 0, self.shape - 1)
        grad = np.empty((p.shape[0], 3))
        inside = np.all((p - 1 >= self.lo) & (p + 1 <= self.hi), axis=1)
        q = p[inside] - self.lo
        sm = self.smoothed
        for axis in range(3):
            e = np.zeros(3, np.intp)
            e[axis] = 1
            hi_i, lo_i = q + e, q - e
            grad[inside, axis] = 0.5 * (sm[hi_i[:, 0], hi_i[:, 1], hi_i[:, 2]].astype(float)
                                        - sm[lo_i[:, 0], lo_i[:, 1], lo_i[:, 2]])
        if not np.all(inside):
            grad[~inside] = self._window_gradient(p[~inside])
        # grad is d(smoothed)/d(array coord); world gradient = J^T grad, J = d(array)/d(world).
        world = grad @ self.labelmap.world_to_array[:3, :3]
        norm = np.linalg.norm(world, axis=1)
        # A flat smoothed mask (change < 1e-3 per voxel) has no meaningful orientation.
        flat = np.abs(grad).max(axis=1) < 1e-3
        with np.errstate(invalid='ignore', divide='ignore'):
            out = -world / norm[:, None]
        out[flat] = np.nan
        return out
