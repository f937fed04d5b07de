"""Find the target lesion again in a control scan (it moves: breathing, the needle's push).

The lesion is a compact blob slightly brighter than the tissue around it (CT: about
+50 HU; MR: brighter than muscle-like tissue, darker than fat). Near the expected
position (scanner LPS, m):

1. crop a box around the expectation;
2. ignore what cannot be lesion -- metal and its streak peaks, bone, contrast-filled
   vessels, fat, air and the MR needle void -- by giving those voxels zero weight,
   then smooth with normalised convolution (the hole the needle leaves is filled
   from its surroundings instead of biasing the result);
3. matched filter: mean over a ball of the lesion's size minus the mean over a
   shell around it; the peak within the search radius, refined to sub-voxel by the
   weighted centroid of the response's top.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

from igt_robot import units
from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.volume import Volume

_MM = units.mm_to_m(1.0)


def _plausible(volume: Volume, data):
    """Weights: 1 where a voxel could be lesion or the tissue around it. In CT the blurred rim of metal
    and bone passes through soft-tissue values: everything within 3 mm of them is left out too."""
    if volume.modality == 'CT':
        dense = data > 400.0
        reach = [max(1, int(round(3.0 * _MM / s))) for s in (volume.spacing[2], volume.spacing[1], volume.spacing[0])]
        dense = ndimage.maximum_filter(dense, size=[2 * r + 1 for r in reach])
        return ((data > -60.0) & (data < 160.0) & ~dense).astype(np.float32)
    tissue = float(np.median(data))
    return ((data > 0.6 * tissue) & (data < 1.65 * tissue)).astype(np.float32)


def find_target(volume: Volume, expected, radius_m: float, search_m: float = 15.0 * _MM) -> np.ndarray:
    """Centre (scanner LPS, m) of the lesion of about ``radius_m`` nearest ``expected``.

    Raises :class:`ImageError` when nothing lesion-like is within ``search_m``.
    """
    expected = np.asarray(expected, float)
    half = search_m + radius_m + 5.0 * _MM
    idx = volume.scanner_to_index(expected)
    extent = np.ceil(half / volume.spacing).astype(int)
    shape_ijk = np.array(volume.data.shape[::-1])
    lo = np.clip(np.floor(idx).astype(int) - extent, 0, shape_ijk)
    hi = np.clip(np.ceil(idx).astype(int) + extent + 1, 0, shape_ijk)
    if np.any(hi - lo < 3):
        raise ImageError('target not found: the expected position is outside the scan')
    data = volume.data[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].astype(np.float32)
    weight = _plausible(volume, data)
    if weight.sum() < 10:
        raise ImageError('target not found: no soft tissue around the expected position')
    # matched filter: mean inside a ball of the lesion's radius minus the mean in the shell around it,
    # each over the plausible voxels only; metal streaks are periodic about the needle and cancel over a ball
    ball, shell = _ball_and_shell(volume.spacing, radius_m)
    fw = data * weight

    def mean_over(kernel):
        num = signal.fftconvolve(fw, kernel, mode='same')
        den = signal.fftconvolve(weight, kernel, mode='same')
        return np.where(den > 0.3 * kernel.sum(), num / np.maximum(den, 1e-6), np.nan)
    response = mean_over(ball) - mean_over(shell)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in data.shape), indexing='ij')
    pts = np.stack([ii + lo[0], jj + lo[1], kk + lo[2]], axis=-1).astype(float)
    dist = np.linalg.norm(volume.index_to_scanner(pts.reshape(-1, 3)) - expected, axis=1).reshape(data.shape)
    response[(dist > search_m) | ~np.isfinite(response)] = -np.inf
    peak = float(response.max())
    noise = float(np.std(data[weight > 0]))
    if not np.isfinite(peak) or peak < max(0.3 * noise, 1e-6):
        raise ImageError(f'target not found within {units.m_to_mm(search_m):.0f} mm of the expected position '
                         '(no lesion-like contrast)')
    at = np.unravel_index(int(np.argmax(response)), response.shape)
    top = response >= 0.8 * peak
    labels, _ = ndimage.label(top)
    comp = labels == labels[at]
    w = response[comp] - 0.8 * peak
    cen = (pts[comp] * w[:, None]).sum(axis=0) / w.sum()
    return volume.index_to_scanner(cen)


def _ball_and_shell(spacing, radius_m):
    """Normalised kernels: a ball of ``radius_m`` and the shell from 1.3 to 1.8 radii (k, j, i)."""
    outer = 1.8 * radius_m
    half = [int(np.ceil(outer / s)) for s in (spacing[2], spacing[1], spacing[0])]
    k, j, i = np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing='ij')
    r = np.sqrt((k * spacing[2]) ** 2 + (j * spacing[1]) ** 2 + (i * spacing[0]) ** 2)
    ball = (r <= radius_m).astype(np.float32)
    shell = ((r >= 1.3 * radius_m) & (r <= outer)).astype(np.float32)
    return ball, shell
