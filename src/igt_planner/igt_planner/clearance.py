"""Clearance fields and exact, fast minima of a field along many segments.

Fields
------
For every critical label the planner needs the Euclidean distance (m) from any
point to the nearest voxel centre of that structure. :func:`build_structure_field`
computes it once per map with ``scipy.ndimage.distance_transform_edt`` (with
the voxel spacing) but only inside the structure's bounding box grown by the
*store cap* (see :func:`store_cap`): every structure voxel lies in that box, so
the distances inside it are exact, and every point outside it is farther than
the store cap. Values are stored clipped at the store cap (float32); samples
outside the box repeat the nearest box value (``mode='nearest'``), which is the
store cap on every side that does not touch the image border and keeps the
field Lipschitz everywhere. This bounds time and memory for small structures.
Minima at or above the reported cap ``cap_m`` are returned as ``cap_m`` ("at
least").

:func:`build_air_field` is the distance from body voxels to the nearest air
voxel (0 in air), used to detect paths that leave the body.

Minimum along segments (branch and bound)
-----------------------------------------
The reference semantics is *dense sampling*: each segment is cut into
``n_fine`` equal steps no longer than the configured fine step (<= half a
voxel) and the field is trilinearly interpolated (``map_coordinates``, order 1)
at all ``n_fine + 1`` points; the clearance is the minimum of those samples.
:func:`segment_minima` returns *exactly* that minimum without evaluating every
sample: a trilinearly interpolated distance field is Lipschitz along any line
with constant at most sqrt(3) (each axis derivative is a blend of voxel
differences of a 1-Lipschitz function, hence <= 1 in magnitude), so between two
samples f0, f1 a distance h apart no sample can be below
``(f0 + f1)/2 - sqrt(3)*h/2``. Starting from a coarse grid (every 2**levels-th
fine sample) intervals whose bound cannot beat the best sample found so far are
discarded and the others are bisected down to the fine grid. Every sample that
is skipped is provably >= the returned minimum, so the result equals dense
sampling while typically evaluating a few percent of the samples.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from scipy import ndimage

from .labelmap import LabelMap

LIPSCHITZ = math.sqrt(3.0)
# Float guard in the pruning test (m): intervals whose bound is within this of
# the best sample are kept, so float rounding can never prune the true minimum.
_PRUNE_EPS = 1e-7


@dataclasses.dataclass
class StructureField:
    """Distance (m) to one structure, clipped at ``cap_m``, stored in a box.

    ``values[a - origin]`` is the distance at array coordinate ``a``; outside
    the box the distance is ``outside_value``.
    """

    label: int
    name: str
    margin_m: float
    is_bone: bool
    cap_m: float                # reported cap: minima >= cap_m are returned as cap_m ("at least")
    store_cap_m: float          # stored values are exact up to this (> cap_m, see segment_minima)
    origin: np.ndarray          # (3,) int, array coords of values[0, 0, 0]
    values: np.ndarray          # float32 box of distances (m), clipped at store_cap_m
    outside_value: float        # value beyond the box (store cap for structures, 0 = air for the air field)
    image_shape: tuple = ()     # shape of the label map (box sides on the image border are not clipped)
    build_seconds: float = 0.0

    @property
    def box_hi(self) -> np.ndarray:
        """Array coords of the last voxel of the box (inclusive)."""
        return self.origin + np.asarray(self.values.shape) - 1

    def sample(self, array_coords: np.ndarray) -> np.ndarray:
        """Trilinear interpolation at (N, 3) array coords -> (N,) float64 distances (m)."""
        pts = np.asarray(array_coords, dtype=float)
        if pts.shape[0] == 0:
            return np.empty(0)
        local = (pts - self.origin).T
        # 'nearest' extends the box by its border values: the store cap inside the image
        # (0 = air for the air field), and a Lipschitz continuation beyond the image border.
        out = ndimage.map_coordinates(self.values, local, order=1, mode='nearest', prefilter=False)
        return out.astype(np.float64)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


def _box(mask_bounds_lo, mask_bounds_hi, pad, shape):
    lo = np.maximum(np.asarray(mask_bounds_lo) - pad, 0)
    hi = np.minimum(np.asarray(mask_bounds_hi) + pad, np.asarray(shape) - 1)
    return lo.astype(np.intp), hi.astype(np.intp)


def _bounds(mask: np.ndarray):
    """Inclusive (lo, hi) array-index bounds of a non-empty boolean mask."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(np.any(mask, axis=other))
        lo.append(nz[0])
        hi.append(nz[-1])
    return np.array(lo), np.array(hi)


def store_cap(cap_m: float, coarse_step_m: float, spacing_max_m: float) -> float:
    """Distance up to which a field must be exact so minima below ``cap_m`` are exact.

    A coarse interval whose two samples sit at the stored cap has the bound
    ``store_cap - sqrt(3)*H/2``; making that >= ``cap_m`` lets the search
    discard, at the coarse level, every interval that cannot go below the
    reported cap (one extra voxel absorbs rounding).
    """
    return cap_m + 0.5 * LIPSCHITZ * coarse_step_m + spacing_max_m


def build_structure_field(labelmap: LabelMap, label: int, cap_m: float,
                          coarse_step_m: float = 0.0) -> StructureField:
    """Exact EDT (m) to ``label`` inside its bounding box grown by the store cap; clipped there.

    ``cap_m`` is the reported cap; ``coarse_step_m`` the coarse sampling step
    of :func:`segment_minima` (sets the store cap, see :func:`store_cap`).
    """
    import time
    t0 = time.perf_counter()
    mask = labelmap.data == label
    if not np.any(mask):
        raise ValueError(f'label {label} is absent from the map')
    lo, hi = _bounds(mask)
    cap_store = store_cap(cap_m, coarse_step_m, float(labelmap.spacing.max()))
    # One voxel beyond the stored cap so the box border is already at that
    # value and interpolating across the border is continuous.
    pad = np.ceil(cap_store / labelmap.spacing).astype(np.intp) + 1
    lo, hi = _box(lo, hi, pad, labelmap.shape)
    sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    sub = mask[sl]
    dist = ndimage.distance_transform_edt(~sub, sampling=labelmap.spacing)
    values = np.minimum(dist, cap_store).astype(np.float32)
    return StructureField(label=int(label), name=labelmap.name(label), margin_m=labelmap.margin(label),
                          is_bone=int(label) in labelmap.bone_labels, cap_m=float(cap_m),
                          store_cap_m=cap_store, origin=lo, values=values, outside_value=cap_store,
                          image_shape=tuple(labelmap.shape), build_seconds=time.perf_counter() - t0)


def build_air_field(labelmap: LabelMap, cap_m: float, coarse_step_m: float = 0.0) -> StructureField:
    """Distance (m) from body voxels to the nearest air voxel (0 in air); reported cap ``cap_m``.

    The box is the body's bounding box plus one voxel: that layer is all air
    (or the image border), so distances inside the box are exact, and
    everything outside it is air (its border value, 0, repeats outward).
    """
    import time
    t0 = time.perf_counter()
    body = labelmap.body_mask
    lo, hi = _bounds(body)
    lo, hi = _box(lo, hi, 1, labelmap.shape)
    sl = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    dist = ndimage.distance_transform_edt(body[sl], sampling=labelmap.spacing)
    cap_store = store_cap(cap_m, coarse_step_m, float(labelmap.spacing.max()))
    values = np.minimum(dist, cap_store).astype(np.float32)
    return StructureField(label=-1, name='air', margin_m=0.0, is_bone=False, cap_m=float(cap_m),
                          store_cap_m=cap_store, origin=lo, values=values, outside_value=0.0,
                          image_shape=tuple(labelmap.shape), build_seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# Segment sampling
# ---------------------------------------------------------------------------
def fine_step_counts(lengths_m: np.ndarray, fine_step_m: float, levels: int) -> np.ndarray:
    """Number of fine steps per segment: >= length/fine_step, a multiple of 2**levels."""
    block = 1 << levels
    n_blocks = np.maximum(np.ceil(np.asarray(lengths_m) / (fine_step_m * block) - 1e-12), 1).astype(np.int64)
    return n_blocks * block


def sample_points(a0: np.ndarray, a1: np.ndarray, k: np.ndarray, n_fine: np.ndarray) -> np.ndarray:
    """Array coords of fine sample ``k`` of segments a0->a1 (rows already gathered per sample).

    The single formula used by both the branch-and-bound and the dense
    reference, so they interpolate at bit-identical points.
    """
    s = (k / n_fine)[:, None]
    return a0 + s * (a1 - a0)


def _group_min(values: np.ndarray, groups: np.ndarray):
    """Per-group minimum and the position (into ``values``) of its first occurrence.

    ``groups`` must be sorted (non-decreasing). Returns (group ids, minima, positions).
    """
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    mins = np.minimum.reduceat(values, starts)
    counts = np.diff(np.r_[starts, values.size])
    is_min = values == np.repeat(mins, counts)
    pos = np.flatnonzero(is_min)
    first = np.unique(groups[pos], return_index=True)[1]
    return groups[starts], mins, pos[first]


def _clip_to_box(a0, a1, lo, hi, shape):
    """Parametric interval [t0, t1] of each segment inside the box [lo, hi] (array coords).

    Returns (t0, t1, hit). The box is grown by one voxel so interpolation
    support at its border is included; sides on the image border extend to
    infinity (the field continues with its border values there).
    """
    shape = np.asarray(shape, float)
    lo = np.where(np.asarray(lo) > 0, np.asarray(lo, float) - 1.0, -np.inf)
    hi = np.where(np.asarray(hi) < shape - 1, np.asarray(hi, float) + 1.0, np.inf)
    d = a1 - a0
    with np.errstate(divide='ignore', invalid='ignore'):
        ta = (lo - a0) / d
        tb = (hi - a0) / d
    tmin = np.where(d != 0, np.minimum(ta, tb), -np.inf)
    tmax = np.where(d != 0, np.maximum(ta, tb), np.inf)
    inside_parallel = np.where(d == 0, (a0 >= lo) & (a0 <= hi), True)
    t0 = np.maximum(tmin.max(axis=1), 0.0)
    t1 = np.minimum(tmax.min(axis=1), 1.0)
    hit = (t0 <= t1) & np.all(inside_parallel, axis=1)
    return t0, t1, hit


def segment_minima(field: StructureField, a0: np.ndarray, a1: np.ndarray, lengths_m: np.ndarray,
                   fine_step_m: float, levels: int, stop_below: Optional[float] = None,
                   chunk_samples: int = 2_000_000):
    """Exact minimum of dense samples of ``field`` along each segment (see module docstring).

    Args:
        field: the distance field.
        a0, a1: (N, 3) segment ends in array coords.
        lengths_m: (N,) segment lengths in metres (scanner frame).
        fine_step_m: the dense sample step (m); each segment uses the largest
            step <= this that divides it into a multiple of 2**levels parts.
        levels: bisection depth of the coarse pass.
        stop_below: if given, a segment is settled as soon as one sample is
            below this value (a crossing rejects the path whatever the exact
            minimum); for such segments the returned value is only guaranteed
            to be < stop_below. Minima >= stop_below stay exact.
        chunk_samples: bound on coarse samples per interpolation call.

    Returns:
        (minima (N,) m, distance along the segment from a0 to the minimum (N,) m;
        NaN where the segment never enters the field's box).
    """
    a0 = np.asarray(a0, float)
    a1 = np.asarray(a1, float)
    lengths = np.asarray(lengths_m, float)
    n = a0.shape[0]
    # Minima are reported up to the cap: it is the starting value, and
    # intervals that cannot go below it are discarded.
    best = np.full(n, field.cap_m, dtype=float)
    at = np.full(n, np.nan)
    if n == 0:
        return best, at
    n_fine = fine_step_counts(lengths, fine_step_m, levels)
    block = 1 << levels
    if field.outside_value > 0:
        # Outside the box every sample equals the stored cap: only the part of
        # each segment inside the box can lower the minimum.
        t0, t1, hit = _clip_to_box(a0, a1, field.origin, field.box_hi, field.image_shape)
    else:
        t0, t1, hit = np.zeros(n), np.ones(n), np.ones(n, bool)
    rays = np.flatnonzero(hit)
    if rays.size == 0:
        return best, at
    k_lo = (np.floor(t0[rays] * n_fine[rays] / block) * block).astype(np.int64)
    k_hi = (np.ceil(t1[rays] * n_fine[rays] / block) * block).astype(np.int64)
    k_hi = np.minimum(np.maximum(k_hi, k_lo), n_fine[rays])
    n_coarse = (k_hi - k_lo) // block + 1
    # Chunk the coarse pass over segments so no single call holds more than chunk_samples points.
    csum = np.cumsum(n_coarse)
    start = 0
    while start < rays.size:
        base = csum[start - 1] if start else 0
        stop = max(int(np.searchsorted(csum, base + chunk_samples, side='right')), start + 1)
        _bisect(field, a0, a1, lengths, n_fine, block, rays[start:stop], k_lo[start:stop], n_coarse[start:stop],
                best, at, stop_below)
        start = stop
    return best, at


def _bisect(field, a0, a1, lengths, n_fine, block, rays, k_lo, n_coarse, best, at, stop_below):
    """Coarse pass then bisection for one chunk of segments (updates best/at in place)."""
    delta = lengths / n_fine  # fine step of each segment (m)
    ray = np.repeat(rays, n_coarse)
    first = np.repeat(np.cumsum(n_coarse) - n_coarse, n_coarse)
    k = np.repeat(k_lo, n_coarse) + (np.arange(ray.size) - first) * block
    f = field.sample(sample_points(a0[ray], a1[ray], k, n_fine[ray]))
    _update(best, at, ray, f, k * delta[ray])

    # Intervals between consecutive coarse samples of the same segment.
    same = ray[1:] == ray[:-1]
    iv_ray = ray[:-1][same]
    iv_k = k[:-1][same]
    iv_f0 = f[:-1][same]
    iv_f1 = f[1:][same]
    width = block
    while True:
        keep = _keep(iv_ray, iv_f0, iv_f1, width * delta[iv_ray], best, stop_below)
        iv_ray, iv_k, iv_f0, iv_f1 = iv_ray[keep], iv_k[keep], iv_f0[keep], iv_f1[keep]
        if width == 1 or iv_ray.size == 0:
            return
        half = width // 2
        k_mid = iv_k + half
        f_mid = field.sample(sample_points(a0[iv_ray], a1[iv_ray], k_mid, n_fine[iv_ray]))
        _update(best, at, iv_ray, f_mid, k_mid * delta[iv_ray])
        # Children interleaved (left, right) per parent keeps the arrays sorted by segment.
        iv_ray = np.repeat(iv_ray, 2)
        iv_k = np.stack([iv_k, k_mid], axis=1).ravel()
        iv_f0, iv_f1 = (np.stack([iv_f0, f_mid], axis=1).ravel(),
                        np.stack([f_mid, iv_f1], axis=1).ravel())
        width = half


def _keep(iv_ray, f0, f1, width_m, best, stop_below):
    """Intervals that may still hold a sample below the best one found for their segment (or the cap)."""
    bound = 0.5 * (f0 + f1) - 0.5 * LIPSCHITZ * width_m
    keep = bound < best[iv_ray] + _PRUNE_EPS
    if stop_below is not None:
        # A segment already known to dip below stop_below is settled.
        keep &= best[iv_ray] >= stop_below
    return keep


def _update(best, at, ray, values, t_m):
    if ray.size == 0:
        return
    ids, mins, pos = _group_min(values, ray)
    better = mins < best[ids]
    best[ids[better]] = mins[better]
    at[ids[better]] = t_m[pos[better]]


def dense_segment_minima(field: StructureField, a0, a1, lengths_m, fine_step_m: float, levels: int):
    """Reference: evaluate every fine sample (same points as :func:`segment_minima`). Slow; for tests/bench."""
    a0 = np.asarray(a0, float)
    a1 = np.asarray(a1, float)
    n_fine = fine_step_counts(lengths_m, fine_step_m, levels)
    out = np.empty(a0.shape[0])
    for r in range(a0.shape[0]):
        k = np.arange(n_fine[r] + 1)
        pts = sample_points(np.broadcast_to(a0[r], (k.size, 3)), np.broadcast_to(a1[r], (k.size, 3)), k,
                            np.full(k.size, n_fine[r]))
        out[r] = min(field.sample(pts).min(), field.cap_m)
    return out
