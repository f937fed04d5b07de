"""Needle detection in a confirmation scan (for tip-to-target error).

CT shows the needle as a thin bright (saturated metal) line with streaks; MR
shows a dark signal void (susceptibility artefact, wider than the needle).
Steps (scanner LPS metres):

1. body mask (largest bright region, holes filled) -- the needle that matters
   is inside the patient, and the mask keeps Z-frame rods and air gaps out;
2. enhance thin bright (CT: white top-hat) or thin dark (MR: black top-hat)
   structures inside the body;
3. line candidates (components, half-max core, weighted PCA), choose the one
   closest to the expected tip/direction when given, else the longest;
4. orient it from entry to tip (expected direction, else towards the body's
   interior); refine the centre line (straight or quadratic) to the
   intensity-weighted centroid of every voxel in a 2.5 mm tube around it, no
   intensity cut (the half-max core of step 3 is biased towards the nearest
   slice centre by up to half a slice gap);
5. locate the tip as the half-maximum point of the enhanced profile sampled
   along that centre line (sub-voxel, cubic-spline interpolation).

Note: in MR the void's end is not exactly the metal tip (artefact shape
depends on field strength, orientation and sequence); a calibrated offset can
be added by the caller.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from igt_robot import units
from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.rods import (black_tophat, find_line_candidates, robust_noise_sigma,
                                    white_tophat)
from igt_robot.imaging.volume import Volume, validate_intensities

_MM = units.mm_to_m(1.0)


def body_threshold(volume: Volume, smoothed=None):
    """Intensity separating the body from air: -500 HU in CT, Otsu in MR."""
    if volume.modality == 'CT':
        return -500.0
    if smoothed is None:
        smoothed = ndimage.uniform_filter(volume.data.astype(np.float32), size=3)
    return _otsu(smoothed)


def body_mask(volume: Volume):
    """Boolean mask of the patient body: threshold of a smoothed image (CT:
    -500 HU, MR: Otsu), opened, largest component, holes filled slice by
    slice (fills the MR needle void)."""
    data = ndimage.uniform_filter(volume.data.astype(np.float32), size=3)
    mask = data > body_threshold(volume, data)
    # an opening cuts thin bridges (the needle shaft in air, touching Z-frame
    # rods) so the largest component is the body alone
    mask = ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)
    for k in range(mask.shape[0]):
        mask[k] = ndimage.binary_fill_holes(mask[k])
    return mask


def _otsu(data, bins=256):
    values = data.ravel()[:: max(1, data.size // 200000)]   # a sub-sample is plenty for a histogram
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


@dataclasses.dataclass
class NeedleObservation:
    """A needle found in an image (scanner LPS, m).

    ``direction``: the fitted line, entry -> tip; ``tip_direction``: the tangent at
    the tip of the fitted quadratic centre line (differs when the needle bends);
    ``curve``: points (N, 3) of that centre line from the entry side to the tip.
    """

    tip: np.ndarray
    direction: np.ndarray
    tip_direction: np.ndarray
    curve: np.ndarray


def find_needle(volume: Volume, expected_tip=None, expected_direction=None, *,
                max_angle_deg: float = 25.0, max_offset_m: float = 10.0 * _MM):
    """Detect the needle; returns ``(tip_scanner, direction)`` in scanner LPS (m),
    ``direction`` a unit vector pointing from the entry towards the tip.

    Raises :class:`ImageError` when no needle-like line is found (or none near
    the expected tip/direction within ``max_offset_m``/``max_angle_deg``).
    """
    found = locate_needle(volume, expected_tip, expected_direction, max_angle_deg=max_angle_deg,
                          max_offset_m=max_offset_m)
    return found.tip, found.direction


def _corridor(volume: Volume, tip, direction, radius_m, behind_m=0.15, beyond_m=0.02):
    """Mask of the voxels within ``radius_m`` of the segment from ``behind_m`` before to ``beyond_m`` past
    ``tip`` along ``direction`` (where the robot put the needle, give or take its bending)."""
    nk, nj, ni = volume.data.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing='ij', sparse=True)
    a = volume.affine
    rel = [a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + (a[r, 3] - tip[r]) for r in range(3)]
    along = rel[0] * direction[0] + rel[1] * direction[1] + rel[2] * direction[2]
    radial2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along ** 2
    return (radial2 <= radius_m ** 2) & (along >= -behind_m) & (along <= beyond_m)


def locate_needle(volume: Volume, expected_tip=None, expected_direction=None, *,
                  max_angle_deg: float = 25.0, max_offset_m: float = 10.0 * _MM) -> NeedleObservation:
    """Like :func:`find_needle`, with the needle's bend: a quadratic centre line through the detected
    line's voxels, the tip found along that curve and its tangent there. With both an expected tip and
    direction, only a corridor of ``max_offset_m`` around the expected needle is searched."""
    validate_intensities(volume)
    mask = body_mask(volume)
    inner = ndimage.binary_erosion(mask, iterations=2)
    if expected_tip is not None and expected_direction is not None:
        d = np.asarray(expected_direction, float)
        inner &= _corridor(volume, np.asarray(expected_tip, float), d / np.linalg.norm(d), max_offset_m)
    if volume.modality == 'CT':
        enhanced = white_tophat(volume, 6.0 * _MM)
    else:
        enhanced = black_tophat(volume, 8.0 * _MM)
    enhanced = np.where(inner, enhanced, 0.0).astype(np.float32)
    noise = robust_noise_sigma(enhanced[inner]) if inner.any() else robust_noise_sigma(enhanced)
    # the needle is the strongest thin structure in the body (metal saturates in
    # CT; the void is the darkest in MR): threshold relative to the top voxels
    top = np.sort(enhanced[inner] if inner.any() else enhanced.ravel())[-30:]
    ref = float(np.mean(top))
    threshold = max(6.0 * noise, 0.3 * ref)
    # thin: a needle (CT) or its void (MR, ~3 mm wide) has a radial RMS well
    # under 2 mm; ribs and vessels are thicker
    candidates = find_line_candidates(volume, enhanced, threshold, min_length_m=8.0 * _MM,
                                      max_radial_rms_m=1.8 * _MM, min_voxels=5,
                                      split_radius_m=2.0 * _MM, max_split_voxels=20000)
    if not candidates:
        raise ImageError('needle not found: no thin straight '
                         f'{"bright" if volume.modality == "CT" else "dark"} structure inside the body')
    rejections = []
    plausible = []
    for cand in candidates:
        try:
            _check_needle_contrast(volume, mask, cand)
            plausible.append(cand)
        except ImageError as exc:
            rejections.append(str(exc))
    if not plausible:
        raise ImageError(rejections[0])
    candidates = plausible
    if expected_direction is not None:
        expected_direction = np.asarray(expected_direction, float)
        expected_direction = expected_direction / np.linalg.norm(expected_direction)
    scored = []
    for cand in candidates:
        angle = 0.0
        offset = 0.0
        if expected_direction is not None:
            angle = np.degrees(np.arccos(min(1.0, abs(float(cand.direction @ expected_direction)))))
            if angle > max_angle_deg:
                continue
        if expected_tip is not None:
            offset = float(cand.distance_to(np.asarray(expected_tip, float))[0])
            if offset > max_offset_m:
                continue
        # near the expectation first; otherwise the strongest (length breaks ties)
        scored.append((offset / _MM + angle - cand.peak / ref - 1e-3 * cand.length_m / _MM, cand))
    if not scored:
        raise ImageError(f'needle not found near the expected position: {len(candidates)} line(s) detected, '
                         f'none within {units.m_to_mm(max_offset_m):.0f} mm / {max_angle_deg:.0f} deg')
    needle = min(scored, key=lambda s: s[0])[1]
    u = needle.direction.copy()
    lo, hi = needle.extent()
    if expected_direction is not None:
        if u @ expected_direction < 0:
            u = -u
            lo, hi = -hi, -lo
    else:
        # the tip is the end deeper inside the body
        inside = [_mask_fraction(volume, mask, needle.centroid + s * u, 10.0 * _MM) for s in (lo, hi)]
        if inside[0] > inside[1]:
            u = -u
            lo, hi = -hi, -lo
    curve_fn = _refine_centre_line(volume, enhanced, _quadratic_centre_line(needle, u), lo, hi)
    tip, tangent, curve = _tip_along_curve(volume, enhanced, curve_fn, lo, hi)
    return NeedleObservation(tip=tip, direction=u, tip_direction=tangent, curve=curve)


def _lateral_basis(u):
    """Two unit vectors perpendicular to ``u`` and to each other."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(u, helper)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(u, e1)


def _fit_lateral(points, weights, centroid, u, order):
    """Weighted least-squares polynomial (``order`` 1 or 2) of the points' lateral offsets from the line
    (``centroid``, ``u``) in the along-line coordinate: one coefficient row (c0, c1, c2) per lateral axis,
    and the weighted residual sums of squares of the straight and the quadratic fits."""
    e1, e2 = _lateral_basis(u)
    rel = points - centroid
    s = rel @ u
    w = np.sqrt(np.clip(weights, 0.0, None))
    design = np.stack([np.ones_like(s), s, s * s], axis=1) * w[:, None]
    coeffs, straight, bent = [], [], []
    for e in (e1, e2):
        y = (rel @ e) * w
        c2, *_ = np.linalg.lstsq(design, y, rcond=None)
        c1 = np.append(np.linalg.lstsq(design[:, :2], y, rcond=None)[0], 0.0)
        coeffs.append(c2 if order == 2 else c1)
        straight.append(float(np.sum((y - design @ c1) ** 2)))
        bent.append(float(np.sum((y - design @ c2) ** 2)))
    return coeffs, straight, bent


def _centre_line(centroid, u, coeffs, order):
    """s -> point on the centre line ``centroid + s u + lateral(s)`` (lateral: ``coeffs`` per axis of
    :func:`_lateral_basis`), with ``.tangent(s)`` and ``.order`` (1 straight, 2 quadratic)."""
    e1, e2 = _lateral_basis(u)

    def at(sv):
        sv = np.atleast_1d(np.asarray(sv, float))
        lateral = [c[0] + c[1] * sv + c[2] * sv * sv for c in coeffs]
        return centroid + sv[:, None] * u + lateral[0][:, None] * e1 + lateral[1][:, None] * e2

    def tangent(sv):
        t = u + (coeffs[0][1] + 2 * coeffs[0][2] * sv) * e1 + (coeffs[1][1] + 2 * coeffs[1][2] * sv) * e2
        return t / np.linalg.norm(t)
    at.tangent = tangent
    at.order = order
    at.centroid = centroid
    at.u = u
    return at


def _quadratic_centre_line(line, u):
    """s -> point: the line's voxels' lateral offsets fitted by a quadratic in the along-line coordinate
    (weighted); falls back to the straight line when the fit is not better than a voxel."""
    coeffs, straight, bent = _fit_lateral(line.points, line.weights, line.centroid, u, 2)
    if not any(b < 0.6 * st for b, st in zip(bent, straight)):
        # the bend does not explain the voxels clearly better than a line (thick slices make steps): a line
        return _centre_line(line.centroid, u, [np.zeros(3), np.zeros(3)], 1)
    return _centre_line(line.centroid, u, coeffs, 2)


# The tube around the first centre line whose voxels refine it: wider than the needle's blurred image
# (radius 0.6 mm, point spread ~0.5 mm, 1.5 mm slices) plus the first line's error, narrow enough to
# keep other structures out.
TUBE_RADIUS_M = 2.5 * _MM
TUBE_ITERATIONS = 4


def _tube_samples(volume, enhanced, curve, lo, hi, radius_m=TUBE_RADIUS_M):
    """Voxels within ``radius_m`` of ``curve`` between arc lengths ``lo`` and ``hi``: (points (N, 3),
    along-line coordinate s (N,), background-subtracted enhanced intensity (N,))."""
    ends = curve(np.array([lo, 0.5 * (lo + hi), hi]))
    idx = volume.scanner_to_index(ends)
    reach = radius_m / volume.spacing + 2.0          # i, j, k
    first = np.maximum(np.floor(idx.min(axis=0) - reach).astype(int), 0)
    last = np.minimum(np.ceil(idx.max(axis=0) + reach).astype(int) + 1, np.array(enhanced.shape[::-1]))
    if np.any(last <= first):
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    k, j, i = np.meshgrid(np.arange(first[2], last[2]), np.arange(first[1], last[1]),
                          np.arange(first[0], last[0]), indexing='ij')
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    points = volume.index_to_scanner(ijk.astype(float))
    s = (points - curve.centroid) @ curve.u
    radial = np.linalg.norm(points - curve(s), axis=1)
    keep = (radial <= radius_m) & (s >= lo) & (s <= hi)
    values = enhanced[ijk[keep, 2], ijk[keep, 1], ijk[keep, 0]].astype(float)
    if values.size == 0:
        return points[keep], s[keep], values
    # most of the tube is tissue: its median is the background (top-hat residue, noise, streaks)
    return points[keep], s[keep], np.clip(values - float(np.median(values)), 0.0, None)


def _refine_centre_line(volume, enhanced, curve, lo, hi, iterations=TUBE_ITERATIONS):
    """The centre line through the intensity-weighted centroid of the whole tube around ``curve``.

    The first line is fitted to the voxels above half the line's peak: across 1.5 mm slices a needle
    lying between two slices shows in one of them above that cut and not in the other, which pulls the
    line up to ~0.5 mm into the brighter slice. Weighting every voxel of a tube around the line by its
    intensity (no cut) uses both slices' partial volumes, so the centroid lands between them where the
    needle is. Repeated a few times, as the tube follows the line; the line's order (straight or
    quadratic) stays the first fit's.
    """
    for _ in range(iterations):
        points, _, weights = _tube_samples(volume, enhanced, curve, lo, hi)
        if weights.size < 10 or float(weights.sum()) <= 0.0:
            return curve
        coeffs, _, _ = _fit_lateral(points, weights, curve.centroid, curve.u, curve.order)
        curve = _centre_line(curve.centroid, curve.u, coeffs, curve.order)
    return curve


def _half_max_crossing(volume, enhanced, points_at, lo, hi, step_m):
    """Arc length where the enhanced profile along ``points_at(s)`` falls to half its plateau beyond ``hi``.

    The plateau is the profile's median 3-20 mm before ``hi``; ``hi`` itself when no crossing is found.
    """
    s = np.arange(lo, hi + 8.0 * _MM, step_m)
    idx = volume.scanner_to_index(points_at(s))
    # cubic spline, not linear: the needle's image is ~0.75 mm wide (sd) across 1.5 mm slices, and linear
    # interpolation sags between slices, so the profile rippled with the slice phase and moved the crossing
    # by up to ~0.4 mm along an oblique needle (cubic: ~0.3 mm, mean 0.15 -> 0.13 mm on synthetic images)
    profile = ndimage.map_coordinates(enhanced, [idx[:, 2], idx[:, 1], idx[:, 0]], order=3, mode='constant',
                                      cval=0.0)
    inner = (s >= hi - 20.0 * _MM) & (s <= hi - 3.0 * _MM)
    if inner.sum() < 3:
        inner = s <= hi
    half = 0.5 * float(np.median(profile[inner]))
    for n in range(int(np.nonzero(inner)[0][-1]), len(s) - 1):
        if profile[n] >= half > profile[n + 1]:
            return s[n] + (profile[n] - half) / (profile[n] - profile[n + 1]) * step_m
    return hi


def _tip_along_curve(volume, enhanced, curve, lo, hi, step_m=0.2 * _MM):
    """Half-maximum crossing of the enhanced profile along the centre line beyond its far end ``hi``."""
    s_tip = _half_max_crossing(volume, enhanced, curve, lo, hi, step_m)
    tip = curve(s_tip)[0]
    return tip, curve.tangent(s_tip), curve(np.linspace(lo, s_tip, 20))


# A needle is metal in CT (far above any tissue) and a near-complete signal
# void in MR; anything weaker is a vessel, a tissue gap or noise, not a needle.
CT_MIN_NEEDLE_CONTRAST_HU = 1800.0   # above cortical bone; metal saturates near 3071 HU
MR_MAX_VOID_LEVEL = 0.35     # darkest quarter of the line's voxels vs the body's median signal


def _check_needle_contrast(volume, mask, needle):
    if volume.modality == 'CT':
        if needle.peak < CT_MIN_NEEDLE_CONTRAST_HU:
            raise ImageError(f'needle not found: the thin bright line has only {needle.peak:.0f} HU '
                             f'contrast (metal needs > {CT_MIN_NEEDLE_CONTRAST_HU:.0f} HU)')
        return
    body_level = float(np.median(volume.data[mask])) if mask.any() else float(np.max(volume.data))
    idx = np.rint(volume.scanner_to_index(needle.points)).astype(int)
    raw = volume.data[idx[:, 2], idx[:, 1], idx[:, 0]]
    level = float(np.percentile(raw, 25)) / max(body_level, 1e-12)
    if level > MR_MAX_VOID_LEVEL:
        raise ImageError(f'needle not found: the thin dark line is not a signal void (its signal is '
                         f'{level:.0%} of the body median, a void is < {MR_MAX_VOID_LEVEL:.0%})')
    # a void is a thin tube in tissue; the rim of a large dark region (bone,
    # air) is thin too, but has dark on one side: sample a ring around the line
    ring_dark = _dark_ring_fraction(volume, needle, 0.5 * body_level, NEEDLE_RING_RADIUS_M)
    if ring_dark > MR_MAX_DARK_RING_FRACTION:
        raise ImageError(f'needle not found: the thin dark line is the edge of a larger dark region '
                         f'({ring_dark:.0%} of its surroundings are dark)')


NEEDLE_RING_RADIUS_M = 4.0 * _MM
MR_MAX_DARK_RING_FRACTION = 0.25


def _dark_ring_fraction(volume, line, dark_level, radius_m, n_angles=12):
    """Fraction of points on rings around the line whose intensity is below ``dark_level``."""
    u = line.direction
    e1, e2 = _lateral_basis(u)
    lo, hi = line.extent()
    s = np.linspace(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), 9)
    phi = np.linspace(0.0, 2 * np.pi, n_angles, endpoint=False)
    ring = (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2) * radius_m
    pts = (line.centroid + s[:, None, None] * u + ring[None]).reshape(-1, 3)
    idx = volume.scanner_to_index(pts)
    vals = ndimage.map_coordinates(volume.data.astype(np.float32), [idx[:, 2], idx[:, 1], idx[:, 0]], order=1,
                                   mode='nearest')
    return float(np.mean(vals < dark_level))


def _mask_fraction(volume, mask, point, radius_m):
    idx = volume.scanner_to_index(point)
    half = np.ceil(radius_m / volume.spacing).astype(int)
    lo = np.maximum(np.floor(idx).astype(int) - half, 0)
    hi = np.minimum(np.ceil(idx).astype(int) + half + 1, np.array(mask.shape[::-1]))
    if np.any(hi <= lo):
        return 0.0
    return float(mask[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].mean())


def _tip_from_profile(volume, enhanced, centroid, u, lo, hi, step_m=0.2 * _MM):
    """Half-maximum crossing of the line profile beyond the far end ``hi``."""
    s_tip = _half_max_crossing(volume, enhanced, lambda s: centroid[None, :] + np.atleast_1d(s)[:, None] * u[None, :],
                               lo, hi, step_m)
    return centroid + s_tip * u
