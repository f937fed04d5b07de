"""Z-frame registration: find the 7-rod frame in a CT/MR volume, fit its pose.

Method (all geometry in scanner LPS metres; see docs/registration.md):

1. **Enhance** thin bright tubes with a white top-hat (grey-opening residue with
   a structuring element wider than a rod), so fat, bone and the body vanish
   and only rods, markers and metal remain.
2. **Detect** line candidates: connected components, each re-thresholded at
   half its own peak, fitted with a weighted PCA line, kept when long and thin.
3. **Identify** rods: every pair of non-parallel candidates is matched to every
   pair of model rods with the same inter-line angle and distance; each such
   pair fixes a full rigid pose (two skew/crossing lines do), which is scored
   by how many candidates land on model rods. The best-scoring hypothesis gives
   the correspondence and the initial pose. The model has no rigid
   self-symmetry (see :mod:`zframe_model`) so the answer is unique.
4. **Measure** sub-voxel rod points: in every slice (plane of the index axis
   most aligned with the rod, normally the slice axis) the background-subtracted
   intensity centroid inside a window around the predicted rod. A cylinder cut
   by a slab is centrally symmetric about the axis point, so the centroid is an
   unbiased axis point even for oblique rods and thick slices. Cross-sections
   near rod ends, cut by the field of view, or crowded by another rod are
   skipped.
5. **Fit** all 6 DoF by robust least squares (soft-L1) of the point-to-model-
   line distances; re-measure with the refined pose and fit again; drop a
   few (<= 5 %) isolated points > 1 mm off and refit.
6. **Gate**: every rod found in enough slices, enough slices showing all 7
   rods, per-rod RMS residual, per-slice RMS (slice-to-slice consistency:
   motion during the acquisition shows up as a bad slice), overall FRE.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
from scipy import optimize
from scipy.spatial.transform import Rotation

from igt_robot import frames, units
from igt_robot.imaging.rods import (find_line_candidates, line_to_line, robust_noise_sigma,
                                    white_tophat)
from igt_robot.imaging.volume import Volume, validate_intensities
from igt_robot.imaging.zframe_model import ZFRAME_HALF_SIDE_M, ZFRAME_ROD_RADIUS_M, ZFRAME_RODS

_MM = units.mm_to_m(1.0)


@dataclasses.dataclass
class ZFrameGates:
    """Quality gates (lengths in m)."""

    min_usable_slices: int = 3            # slices in which all 7 rods are measured
    min_points_per_rod: int = 3
    min_found_fraction: float = 0.5       # of the slices where the model says the rod is visible
    max_rod_rms_m: float = 0.5 * _MM
    max_slice_rms_m: float = 1.0 * _MM
    max_fre_m: float = 0.5 * _MM
    outlier_m: float = 1.0 * _MM          # a rod point this far off the fitted rod is an outlier ...
    max_outlier_fraction: float = 0.05    # ... and up to this fraction of them are dropped before gating
    max_warp: float = 0.015               # largest local scale/shear the rods may show beyond rigid (1.5 %)


@dataclasses.dataclass
class ZFrameResult:
    """Outcome of :func:`register_zframe`.

    ``T_scanner_zframe`` maps zframe points into the scanner frame (LPS, m);
    it is set only when ``accepted``. ``covariance`` is the 6x6 covariance of
    (rotation vector [rad], translation [m]) from the least-squares fit.
    """

    accepted: bool
    reason: str
    T_scanner_zframe: Optional[np.ndarray] = None
    fre_m: float = float('nan')
    rod_rms_m: dict = dataclasses.field(default_factory=dict)
    rod_points: dict = dataclasses.field(default_factory=dict)
    slices_used: int = 0
    usable_slices: int = 0
    slice_rms_m: dict = dataclasses.field(default_factory=dict)
    candidates: int = 0
    outliers_dropped: int = 0
    covariance: Optional[np.ndarray] = None
    elapsed_s: float = 0.0
    T_estimate: Optional[np.ndarray] = None  # best pose even when rejected (diagnostics only)
    warp: Optional[np.ndarray] = None        # local linear warp the rods show beyond rigid (see local_warp)

    def predicted_tre_m(self, target_scanner):
        """RMS target registration error (m) predicted at a scanner point: the random part from the fit
        covariance (first-order propagation through the rigid transform) and, in quadrature, the systematic
        part -- how far the image's local warp around the frame (scale, spacing, distortion) carries a point
        at the target's distance."""
        random = self.random_tre_m(target_scanner)
        return float(np.hypot(random, self.systematic_tre_m(target_scanner)))

    def random_tre_m(self, target_scanner):
        T = self.T_scanner_zframe if self.T_scanner_zframe is not None else self.T_estimate
        if T is None or self.covariance is None:
            return float('nan')
        return _tre_from_covariance(T, self.covariance, np.asarray(target_scanner, float))

    def systematic_tre_m(self, target_scanner):
        T = self.T_scanner_zframe if self.T_scanner_zframe is not None else self.T_estimate
        if T is None or self.warp is None:
            return 0.0
        return float(np.linalg.norm(self.warp @ (np.asarray(target_scanner, float) - T[:3, 3])))


# ----------------------------------------------------------------------------- helpers
def _pose_to_params(T):
    return np.concatenate([Rotation.from_matrix(T[:3, :3]).as_rotvec(), units.m_to_mm(T[:3, 3])])


def _params_to_pose(x):
    return frames.make_transform(Rotation.from_rotvec(x[:3]).as_matrix(), units.mm_to_m(x[3:]))


def _tre_from_covariance(T, covariance, target_scanner):
    target_z = frames.apply(frames.invert(T), target_scanner)
    x0 = np.concatenate([Rotation.from_matrix(T[:3, :3]).as_rotvec(), T[:3, 3]])

    def mapped(x):
        return Rotation.from_rotvec(x[:3]).apply(target_z) + x[3:]

    jac = np.zeros((3, 6))
    for n in range(6):
        h = 1e-6
        dx = np.zeros(6)
        dx[n] = h
        jac[:, n] = (mapped(x0 + dx) - mapped(x0 - dx)) / (2 * h)
    return float(np.sqrt(max(np.trace(jac @ covariance @ jac.T), 0.0)))


_MODEL_POINT = np.array([0.5 * (r.start_array + r.end_array) for r in ZFRAME_RODS])
_MODEL_DIR = np.array([r.direction for r in ZFRAME_RODS])
_MAX_ROD_LENGTH_M = max(r.length for r in ZFRAME_RODS)


# ----------------------------------------------------------------------------- identification
def _cross(a, b):
    # np.cross has a large fixed overhead; this runs thousands of times per volume
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _pose_from_line_pair(m1, m2, o1, o2):
    """Rigid transform taking model lines (point, unit dir) m1, m2 onto observed o1, o2."""
    def triad(u, v):
        n = _cross(u, v)
        n /= np.sqrt(n @ n)
        return np.stack([u, n, _cross(u, n)], axis=1)
    R = triad(o1[1], o2[1]) @ triad(m1[1], m2[1]).T
    pm1, pm2, _ = line_to_line(m1[0], m1[1], m2[0], m2[1])
    po1, po2, _ = line_to_line(o1[0], o1[1], o2[0], o2[1])
    t = 0.5 * ((po1 - R @ pm1) + (po2 - R @ pm2))
    return frames.make_transform(R, t)


def _match_candidates(T, centroids, directions, angle_tol, dist_tol, model=None):
    """For a pose hypothesis: best candidate index per model rod (or -1) and the
    mean centroid-to-line distance of the matches (vectorised over candidates)."""
    model_point, model_dir = (_MODEL_POINT, _MODEL_DIR) if model is None else model
    R, t = T[:3, :3], T[:3, 3]
    U = model_dir @ R.T                       # (7, 3) predicted rod directions
    P = model_point @ R.T + t                 # (7, 3) predicted rod mid-points
    cosines = np.abs(directions @ U.T)        # (n, 7)
    rel = centroids[:, None, :] - P[None, :, :]
    along = np.einsum('nmc,mc->nm', rel, U)
    dist = np.sqrt(np.maximum(np.einsum('nmc,nmc->nm', rel, rel) - along ** 2, 0.0))
    dist[(cosines < np.cos(angle_tol)) | (dist >= dist_tol)] = np.inf
    best = np.argmin(dist, axis=0)
    best_d = dist[best, np.arange(7)]
    assign = np.where(np.isfinite(best_d), best, -1)
    matched = assign >= 0
    return assign, (float(best_d[matched].mean()) if matched.any() else np.inf)


def _identify(candidates, angle_tol=np.radians(4.0), dist_tol=3.0 * _MM, model=None):
    """Search pose hypotheses from candidate line pairs; best (count, mean distance,
    T, assignment). Stops early once all 7 rods match tightly. ``model``: (rod mid-points,
    directions), default the frame's own."""
    model_point, model_dir = (_MODEL_POINT, _MODEL_DIR) if model is None else model
    model_pairs = []
    for a in range(7):
        for b in range(7):
            if a == b:
                continue
            cos_ab = float(model_dir[a] @ model_dir[b])
            if abs(cos_ab) > np.cos(np.radians(10.0)):
                continue   # (nearly) parallel pairs do not fix the rotation
            _, _, dist = line_to_line(model_point[a], model_dir[a], model_point[b], model_dir[b])
            model_pairs.append((a, b, np.arccos(np.clip(cos_ab, -1, 1)), dist))
    centroids = np.array([c.centroid for c in candidates])
    directions = np.array([c.direction for c in candidates])
    best = (-1, np.inf, None, None)
    n = len(candidates)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cos_ij = float(directions[i] @ directions[j])
            _, _, dist_obs = line_to_line(centroids[i], directions[i], centroids[j], directions[j])
            for a, b, angle_ab, dist_ab in model_pairs:
                if abs(dist_obs - dist_ab) > dist_tol:
                    continue
                for sign_i, sign_j in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
                    ang = np.arccos(np.clip(sign_i * sign_j * cos_ij, -1, 1))
                    if abs(ang - angle_ab) > angle_tol:
                        continue
                    T = _pose_from_line_pair((model_point[a], model_dir[a]), (model_point[b], model_dir[b]),
                                             (centroids[i], sign_i * directions[i]),
                                             (centroids[j], sign_j * directions[j]))
                    assign, mean_d = _match_candidates(T, centroids, directions, angle_tol, dist_tol, model)
                    count = int((assign >= 0).sum())
                    if count > best[0] or (count == best[0] and mean_d < best[1]):
                        best = (count, mean_d, T, assign)
                        if count == 7 and mean_d < 1.0 * _MM:
                            return best
    return best


# ----------------------------------------------------------------------------- measurement
@dataclasses.dataclass
class _CrossSection:
    rod: int           # 1..7
    plane: int         # index of the plane along the chosen axis
    axis: int          # index axis perpendicular to the plane (0=i, 1=j, 2=k)
    point: np.ndarray  # scanner, m
    signal: float      # background-subtracted integral normalised to a perpendicular cut
    offset_m: float    # distance of the centroid from the predicted line


def _rod_lines(T):
    R, t = T[:3, :3], T[:3, 3]
    return [(R @ _MODEL_POINT[m] + t, R @ _MODEL_DIR[m]) for m in range(7)]


# Rods are cut by the acquired slices unless they run within ~70 deg of the
# slice plane; only then is another index axis used for the cross-sections.
_MIN_SLICE_AXIS_COSINE = np.cos(np.radians(70.0))


def _cross_sections(volume, enhanced, T, window_m, rod_radius_m):
    """Sub-voxel rod points per plane for all 7 rods predicted by pose ``T``.

    Returns (list of _CrossSection, dict rod -> number of planes where the
    model predicts a complete, measurable cross-section). Vectorised over the
    planes of one rod.
    """
    inv = np.linalg.inv(volume.affine)
    A, origin = volume.affine[:3, :3], volume.affine[:3, 3]
    shape_ijk = np.array(volume.data.shape[::-1])
    spacing = volume.spacing
    direction = volume.direction
    lines = _rod_lines(T)
    T_inv = frames.invert(T)
    out = []
    predicted = {}
    for m, (p, u) in enumerate(lines):
        rod_no = m + 1
        predicted[rod_no] = 0
        cosines = np.abs(direction.T @ u)
        axis = 2 if cosines[2] >= _MIN_SLICE_AXIS_COSINE else int(np.argmax(cosines))
        cos_theta = float(cosines[axis])
        tan_theta = np.sqrt(max(1.0 - cos_theta ** 2, 0.0)) / cos_theta
        slab = spacing[axis]
        # keep away from the rod ends: the end cap tilts the cut ellipse there
        end_margin = rod_radius_m * tan_theta + 0.5 * slab / cos_theta + 1.5 * _MM
        p_idx = inv[:3, :3] @ p + inv[:3, 3]
        u_idx = inv[:3, :3] @ u
        others = [a for a in range(3) if a != axis]
        half = [int(np.ceil((window_m / cos_theta) / spacing[a])) + 1 for a in others]
        planes = np.arange(shape_ijk[axis])
        s_par = (planes - p_idx[axis]) / u_idx[axis]
        centre_idx = p_idx[None, :] + s_par[:, None] * u_idx[None, :]          # (P, 3)
        centre = centre_idx @ A.T + origin
        z_model = centre @ T_inv[2, :3] + T_inv[2, 3]
        ok = np.abs(z_model) <= ZFRAME_HALF_SIDE_M - end_margin
        base = [np.floor(centre_idx[:, a]).astype(int) - h for a, h in zip(others, half)]
        size = [2 * h + 2 for h in half]
        for a, b0, sz in zip(others, base, size):
            ok &= (b0 >= 0) & (b0 + sz <= shape_ijk[a])   # cut by the FOV would bias the centroid
        for mo, (q, v) in enumerate(lines):
            if mo == m:
                continue
            rel = centre - q
            along = rel @ v
            d = np.linalg.norm(rel - along[:, None] * v, axis=1)
            foot = q + along[:, None] * v
            z_other = foot @ T_inv[2, :3] + T_inv[2, 3]
            ok &= ~((d < 2.2 * window_m / cos_theta) & (np.abs(z_other) <= ZFRAME_HALF_SIDE_M + window_m))
        predicted[rod_no] = int(ok.sum())
        if not ok.any():
            continue
        sel = np.nonzero(ok)[0]
        g0, g1 = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing='ij')
        ijk = np.zeros((len(sel), size[0], size[1], 3), dtype=int)
        ijk[..., axis] = planes[sel][:, None, None]
        ijk[..., others[0]] = base[0][sel][:, None, None] + g0[None]
        ijk[..., others[1]] = base[1][sel][:, None, None] + g1[None]
        vals = enhanced[ijk[..., 2], ijk[..., 1], ijk[..., 0]].astype(float)        # (S, W0, W1)
        pts = ijk @ A.T + origin
        rel = pts - p
        along = rel @ u
        dist = np.sqrt(np.maximum(np.sum(rel ** 2, axis=-1) - along ** 2, 0.0))
        inside = dist <= window_m
        ring = np.where(inside, np.nan, vals)
        background = np.nanmedian(ring.reshape(len(sel), -1), axis=1)
        background = np.where(np.isfinite(background), background, 0.0)
        w = np.where(inside, vals - background[:, None, None], 0.0)
        total = w.sum(axis=(1, 2))
        good = total > 0
        cen_idx = np.einsum('sab,sabc->sc', w, ijk.astype(float)) / np.where(good, total, 1.0)[:, None]
        points = cen_idx @ A.T + origin
        rel_c = points - p
        offset = np.linalg.norm(rel_c - (rel_c @ u)[:, None] * u, axis=1)
        norm_signal = total * spacing[others[0]] * spacing[others[1]] * cos_theta
        for n in np.nonzero(good)[0]:
            out.append(_CrossSection(rod_no, int(planes[sel[n]]), axis, points[n], float(norm_signal[n]),
                                     float(offset[n])))
    return out, predicted


# ----------------------------------------------------------------------------- fitting
def _residuals(x, pts_mm, a_mm, b):
    R = Rotation.from_rotvec(x[:3]).as_matrix()
    q = (pts_mm - x[3:]) @ R          # R^T (p - t) for row vectors
    v = q - a_mm
    perp = v - np.sum(v * b, axis=1)[:, None] * b
    return perp.ravel()


def _fit_pose(T0, points, rods, loss_scale_m):
    """Robust rigid fit of scanner points to model rod lines; returns (T, residual
    distances m, covariance of (rotvec rad, translation m))."""
    pts_mm = units.m_to_mm(points)
    a_mm = units.m_to_mm(_MODEL_POINT[rods])
    b = _MODEL_DIR[rods]
    x0 = _pose_to_params(T0)
    res = optimize.least_squares(_residuals, x0, args=(pts_mm, a_mm, b), loss='soft_l1',
                                 f_scale=units.m_to_mm(loss_scale_m), x_scale=np.array([0.01] * 3 + [1.0] * 3),
                                 method='trf')
    T = _params_to_pose(res.x)
    r = _residuals(res.x, pts_mm, a_mm, b).reshape(-1, 3)
    dist_m = units.mm_to_m(np.linalg.norm(r, axis=1))
    cov = None
    dof = 2 * len(points) - 6      # each residual is perpendicular to its rod: 2 dof per point
    if dof > 0:
        sigma2_mm = float(np.sum(np.linalg.norm(r, axis=1) ** 2)) / dof
        jac = _residuals_jac(res.x, pts_mm, a_mm, b)
        try:
            cov_mm = sigma2_mm * np.linalg.inv(jac.T @ jac)
            scale = np.array([1.0] * 3 + [units.mm_to_m(1.0)] * 3)
            cov = cov_mm * np.outer(scale, scale)
        except np.linalg.LinAlgError:
            cov = None
    return T, dist_m, cov


def _residuals_jac(x, pts_mm, a_mm, b):
    jac = np.zeros((pts_mm.size, 6))
    for n in range(6):
        h = 1e-6 if n < 3 else 1e-4
        dx = np.zeros(6)
        dx[n] = h
        jac[:, n] = (_residuals(x + dx, pts_mm, a_mm, b) - _residuals(x - dx, pts_mm, a_mm, b)) / (2 * h)
    return jac


# ----------------------------------------------------------------------------- main entry
_COARSE_SPACING_M = 2.0 * _MM
_COARSE_MIN_VOXELS = 1_000_000


def _coarse_view(volume: Volume):
    """Block-averaged copy on a grid of about 2 mm, or None when the volume is
    already coarse or small (then the full grid is cheap enough)."""
    if volume.data.size < _COARSE_MIN_VOXELS:
        return None
    sp = volume.spacing
    factors_ijk = np.maximum(1, np.rint(_COARSE_SPACING_M / sp)).astype(int)   # nearest to ~2 mm
    if np.all(factors_ijk == 1):
        return None
    fk, fj, fi = factors_ijk[2], factors_ijk[1], factors_ijk[0]
    nk, nj, ni = (d // f for d, f in zip(volume.data.shape, (fk, fj, fi)))
    if min(nk, nj, ni) < 3:
        return None
    # block means one axis at a time (each pass shrinks the array before the next)
    data = volume.data[:nk * fk, :nj * fj, :ni * fi]
    data = data.reshape(nk * fk, nj * fj, ni, fi).mean(axis=3, dtype=np.float32)
    data = data.reshape(nk * fk, nj, fj, ni).mean(axis=2, dtype=np.float32)
    data = data.reshape(nk, fk, nj, ni).mean(axis=1, dtype=np.float32)
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] * factors_ijk[None, :]
    # a coarse voxel's centre is the mean of its fine voxel centres
    affine[:3, 3] = volume.index_to_scanner((factors_ijk - 1) / 2.0)
    return Volume(data, affine, volume.modality, dict(volume.metadata))


def _crop_around_frame(volume: Volume, T_scanner_zframe, margin_m):
    """Sub-volume containing every rod of the frame at the given pose plus a margin."""
    ends = np.concatenate([np.stack([r.start_array, r.end_array]) for r in ZFRAME_RODS])
    idx = volume.scanner_to_index(frames.apply(T_scanner_zframe, ends))
    margin = np.ceil(margin_m / volume.spacing).astype(int)
    shape_ijk = np.array(volume.data.shape[::-1])
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - margin, 0, shape_ijk)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + margin + 1, 0, shape_ijk)
    if np.any(hi - lo < 3):
        return volume
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_scanner(lo.astype(float))
    data = volume.data[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    return Volume(data, affine, volume.modality, dict(volume.metadata))


_DECOY_MIN_RODS = 5
_DECOY_MIN_DISTANCE_M = 20.0 * _MM


def _second_pattern(candidates, ident):
    """(rods matched, distance m) of a second frame-like pattern among the candidates the best pattern did
    not use, or None. Two frames in view make the choice a guess: refuse rather than pick one."""
    count, _, T, assign = ident
    used = set(int(a) for a in assign if a >= 0)
    rest = [c for n, c in enumerate(candidates) if n not in used]
    # pieces of the same rods (split by noise or a crossing) must not count as a second frame
    rest = [c for c in rest if not _on_frame(c, T)]
    if len(rest) < 3:
        return None
    other = _identify(rest)
    if other[2] is None or other[0] < _DECOY_MIN_RODS:
        return None
    distance = float(np.linalg.norm(other[2][:3, 3] - T[:3, 3]))
    return (other[0], distance) if distance >= _DECOY_MIN_DISTANCE_M else None


def _on_frame(candidate, T, tol_m=3.0 * _MM):
    """Whether a line candidate lies along one of the frame's rods at pose ``T``."""
    for p, u in _rod_lines(T):
        if abs(float(candidate.direction @ u)) > np.cos(np.radians(8.0)):
            rel = candidate.centroid - p
            if np.linalg.norm(rel - (rel @ u) * u) < tol_m:
                return True
    return False


# Mirror image of the frame (a left-right flipped image): x -> -x in the frame's own coordinates.
_MIRROR = np.diag([-1.0, 1.0, 1.0])


def diagnose_identification(candidates):
    """Likely cause when the 7-rod pattern is not found although rod-like lines are: '' when none is clear."""
    if len(candidates) < 3:
        return ''
    mirrored = _identify(candidates, model=(_MODEL_POINT @ _MIRROR, _MODEL_DIR @ _MIRROR))
    if mirrored[2] is not None and mirrored[0] >= 6 and mirrored[0] > _identify(candidates)[0]:
        return ('mirrored geometry: the rods match the frame\'s mirror image (the image is flipped: check the '
                'DICOM orientation / patient position)')
    for scale in (0.8, 0.9, 1.1, 1.25):
        scaled = _identify(candidates, dist_tol=4.0 * _MM, model=_scaled_model(scale))
        if scaled[2] is not None and scaled[0] >= 6:
            return (f'scale or spacing: the rods match a frame {abs(scale - 1) * 100:.0f} % '
                    f'{"smaller" if scale < 1 else "larger"} than the real one (check pixel and slice spacing)')
    if len(candidates) >= 7:
        return ('scale or spacing, or mirrored geometry: rod-like lines are there but do not form the frame\'s '
                'pattern (check the pixel and slice spacing and the image orientation)')
    return ''


def _scaled_model(scale):
    """Rod mid-points and directions of the frame scaled by ``scale`` (directions of the diagonals change)."""
    starts = np.array([r.start_array for r in ZFRAME_RODS]) * scale
    ends = np.array([r.end_array for r in ZFRAME_RODS]) * scale
    d = ends - starts
    return 0.5 * (starts + ends), d / np.linalg.norm(d, axis=1)[:, None]


def diagnose_fit(points, rods_idx, T, volume):
    """Likely cause of a poor rod fit, from what explains the residuals: a scale along one image axis
    (pixel or slice spacing), a smooth non-rigid warp (geometric distortion), else ''."""
    if points is None or len(points) < 12:
        return ''
    base = _fit_residual_rms(points, rods_idx, T, None)[0]
    axes = volume.direction
    best = (base, None)
    for axis in range(3):
        r = _fit_residual_rms(points, rods_idx, T, ('axis', axes[:, axis]))[0]
        if r < best[0]:
            best = (r, axis)
    affine = _fit_residual_rms(points, rods_idx, T, ('affine', None))[0]
    uniform = _fit_residual_rms(points, rods_idx, T, ('scale', None))[0]
    if uniform < 0.5 * base and uniform <= 1.3 * affine:
        return ('scale or spacing: the residuals vanish when the image is scaled uniformly (check the pixel '
                'spacing / the reconstruction field of view)')
    if best[1] is not None and best[0] < 0.5 * base and best[0] <= 1.3 * affine:
        name = 'slice' if best[1] == 2 else ('column' if best[1] == 0 else 'row')
        return f'scale or spacing: the residuals vanish with a {name}-spacing correction (check the {name} spacing)'
    if affine < 0.5 * base:
        return ('geometric distortion: the rods fit an affinely warped frame much better than the rigid one '
                '(MR gradient non-linearity or B0 inhomogeneity; put the frame nearer the isocentre or use '
                'distortion-corrected images)')
    return ''


def _fit_residual_rms(points, rods_idx, T, extra):
    """RMS point-to-rod distance (m) after a fit of the pose plus an optional extra deformation of the image:
    ('axis', u) -- a stretch along u; ('affine', None) -- a full linear warp about the frame centre."""
    a = _MODEL_POINT[rods_idx]
    b = _MODEL_DIR[rods_idx]
    centre = T[:3, 3]
    x0 = _pose_to_params(T)
    n_extra = 0 if extra is None else (9 if extra[0] == 'affine' else 1)

    def warp(x):
        if extra is None:
            return points
        rel = points - centre
        if extra[0] == 'axis':
            u = extra[1]
            return points + x[6] * 1e-2 * np.outer(rel @ u, u)
        if extra[0] == 'scale':
            return points + x[6] * 1e-2 * rel
        m = x[6:].reshape(3, 3) * 1e-2
        return points + rel @ m.T

    def res(x):
        r = _residuals(x[:6], units.m_to_mm(warp(x)), units.m_to_mm(a), b)
        # a warp sliding points along their own rods is invisible: keep it near zero (1 % costs 0.03 mm)
        return np.concatenate([r, 0.03 * x[6:]]) if n_extra else r
    sol = optimize.least_squares(res, np.concatenate([x0, np.zeros(n_extra)]), method='trf')
    r = sol.fun[:3 * len(points)].reshape(-1, 3)
    return float(units.mm_to_m(np.sqrt(np.mean(np.sum(r * r, axis=1))))), sol.x


WARP_SIGNIFICANCE = 0.8    # the warp counts when it explains this much: affine RMS < 0.8 x rigid RMS


def local_warp(points, rods_idx, T):
    """Linear warp M (3x3, dimensionless) of the image about the frame centre that the rod points show
    beyond a rigid pose: a scale or spacing error or the local part of a geometric distortion. A target
    at distance r from the frame is then off by about |M r| -- an error the rigid fit cannot see.
    None when the warp does not explain the residuals clearly better than noise would
    (:data:`WARP_SIGNIFICANCE`): then it is noise, not geometry."""
    rigid, _ = _fit_residual_rms(points, rods_idx, T, None)
    affine, x = _fit_residual_rms(points, rods_idx, T, ('affine', None))
    if affine >= WARP_SIGNIFICANCE * rigid:
        return None
    return x[6:].reshape(3, 3) * 1e-2


def detect_rod_candidates(volume: Volume, rod_radius_m: float = ZFRAME_ROD_RADIUS_M):
    """Enhanced image and thin-bright-line candidates (see module doc, steps 1-2)."""
    enhanced = white_tophat(volume, 4.0 * rod_radius_m + 1.0 * _MM)
    noise = robust_noise_sigma(enhanced)
    ref = float(np.percentile(enhanced, 99.9))
    threshold = max(6.0 * noise, 0.15 * ref)
    candidates = find_line_candidates(
        volume, enhanced, threshold, min_length_m=12.0 * _MM, max_radial_rms_m=3.0 * _MM,
        max_length_m=_MAX_ROD_LENGTH_M + 12.0 * _MM, split_radius_m=2.5 * _MM)
    return enhanced, candidates


def register_zframe(volume: Volume, gates: Optional[ZFrameGates] = None,
                    rod_radius_m: float = ZFRAME_ROD_RADIUS_M) -> ZFrameResult:
    """Register the 7-rod Z-frame in ``volume`` (see module doc).

    Returns a :class:`ZFrameResult`; ``accepted`` is False with a clear
    ``reason`` when any gate fails (no transform is given then). Raises
    :class:`ImageError` for unusable input (NaNs, constant data, ...).
    """
    gates = gates or ZFrameGates()
    start = time.perf_counter()
    validate_intensities(volume)
    if volume.data.shape[0] < gates.min_usable_slices:
        return ZFrameResult(False, f'only {volume.data.shape[0]} slice(s) in the volume, '
                                   f'need ≥ {gates.min_usable_slices}', elapsed_s=time.perf_counter() - start)
    # Coarse-to-fine: find and identify the rods on a ~2 mm grid (8x fewer
    # voxels for 1 mm scans), then measure them at full resolution only in a
    # box around the frame. Falls back to the full grid when the coarse pass
    # does not find the pattern.
    work, enhanced, candidates, ident = None, None, [], (-1, np.inf, None, None)
    coarse = _coarse_view(volume)
    if coarse is not None:
        _, candidates = detect_rod_candidates(coarse, rod_radius_m)
        if len(candidates) >= 2:
            ident = _identify(candidates)
        if ident[2] is not None and ident[0] >= 3:
            work = _crop_around_frame(volume, ident[2], margin_m=15.0 * _MM)
            enhanced = white_tophat(work, 4.0 * rod_radius_m + 1.0 * _MM)
    if work is None:
        work = volume
        enhanced, candidates = detect_rod_candidates(volume, rod_radius_m)
        ident = _identify(candidates) if len(candidates) >= 2 else (-1, np.inf, None, None)

    def rejected(reason, **kw):
        return ZFrameResult(False, reason, candidates=len(candidates), elapsed_s=time.perf_counter() - start, **kw)

    if len(candidates) < 2:
        return rejected(f'Z-frame not found: {len(candidates)} rod-like structure(s) detected, need the 7-rod pattern')
    count, _, T0, assign = ident
    if T0 is None or count < 3:
        cause = diagnose_identification(candidates)
        return rejected(f'Z-frame not found: {len(candidates)} rod-like structure(s) detected but no consistent '
                        f'7-rod pattern (best match {max(count, 0)} rods)'
                        + (f'; likely cause: {cause}' if cause else ''))
    second = _second_pattern(candidates, ident)
    if second is not None:
        return rejected(f'two Z-frame-like patterns in the field of view ({count} and {second[0]} rods matched, '
                        f'{units.m_to_mm(second[1]):.0f} mm apart): the frame cannot be told from the other one; '
                        'remove the spare frame or narrow the field of view', T_estimate=None)

    window = rod_radius_m + 2.5 * _MM
    T = T0
    points = rods_idx = None
    for _pass in range(2):
        sections, predicted = _cross_sections(work, enhanced, T, window, rod_radius_m)
        if not sections:
            return rejected('Z-frame not found: no measurable rod cross-sections', T_estimate=T)
        signals = np.array([s.signal for s in sections])
        reference = float(np.median(signals))
        valid = [s for s in sections if s.signal >= 0.4 * reference and s.offset_m <= 2.0 * _MM]
        if len(valid) < 6:
            return rejected(f'Z-frame not found: only {len(valid)} rod cross-sections measured', T_estimate=T)
        points = np.array([s.point for s in valid])
        rods_idx = np.array([s.rod - 1 for s in valid])
        T, dist, cov = _fit_pose(T, points, rods_idx, loss_scale_m=0.3 * _MM)

    # A few isolated bad centroids (an air bubble in a rod, a streak) are
    # dropped; many of them are a real problem and are left for the gates.
    outlier = dist > gates.outlier_m
    n_outliers = int(outlier.sum())
    if 0 < n_outliers <= gates.max_outlier_fraction * len(dist):
        valid = [s for s, bad in zip(valid, outlier) if not bad]
        points, rods_idx = points[~outlier], rods_idx[~outlier]
        T, dist, cov = _fit_pose(T, points, rods_idx, loss_scale_m=0.3 * _MM)
    else:
        n_outliers = 0

    # --- quality gates --------------------------------------------------------------
    per_rod_n = {r: int(np.sum(rods_idx == r - 1)) for r in range(1, 8)}
    rod_rms = {r: (float(np.sqrt(np.mean(dist[rods_idx == r - 1] ** 2))) if per_rod_n[r] else float('nan'))
               for r in range(1, 8)}
    fre = float(np.sqrt(np.mean(dist ** 2)))
    plane_keys = [(s.axis, s.plane) for s in valid]
    slice_rods = {}
    slice_sq = {}
    for key, r, d in zip(plane_keys, rods_idx, dist):
        slice_rods.setdefault(key, set()).add(int(r))
        slice_sq.setdefault(key, []).append(d * d)
    # a slice is usable when it shows enough of the frame to constrain a pose on
    # its own: >= 4 rods including a diagonal (all 7 rarely share a slice once
    # the frame is tilted against the slices)
    usable = sum(1 for rs in slice_rods.values() if len(rs) >= 4 and rs & {1, 3, 5})
    slice_rms = {key[1] if key[0] == 2 else key: float(np.sqrt(np.mean(v))) for key, v in slice_sq.items()}
    warp = local_warp(points, rods_idx, T) if len(points) >= 12 else None
    common = dict(fre_m=fre, rod_rms_m=rod_rms, rod_points=per_rod_n, slices_used=len(slice_rods),
                  outliers_dropped=n_outliers,
                  usable_slices=usable, slice_rms_m=slice_rms, covariance=cov, T_estimate=T, warp=warp)

    def rejected_gate(reason, **kw):
        cause = diagnose_identification(candidates) if count < 7 else ''
        cause = cause or diagnose_fit(points, rods_idx, T, work)
        return rejected(reason + (f'; likely cause: {cause}' if cause else ''), **kw)

    for r in range(1, 8):
        n_pred, n_found = predicted.get(r, 0), per_rod_n[r]
        if n_pred == 0:
            return rejected_gate(f'Z-frame rod {r} is outside the field of view (or not measurable)', **common)
        if n_found < gates.min_found_fraction * n_pred:
            return rejected_gate(f'Z-frame rod {r} not found in {n_pred - n_found} of {n_pred} slices', **common)
        if n_found < gates.min_points_per_rod:
            return rejected_gate(f'Z-frame rod {r} measured in only {n_found} slice(s), '
                                 f'need ≥ {gates.min_points_per_rod}',
                                 **common)
    if usable < gates.min_usable_slices:
        return rejected_gate(f'only {usable} usable slices (≥ 4 rods incl. a diagonal visible), '
                             f'need ≥ {gates.min_usable_slices}',
                             **common)
    for r in range(1, 8):
        if rod_rms[r] > gates.max_rod_rms_m:
            return rejected_gate(f'rod {r} residual {units.m_to_mm(rod_rms[r]):.1f} mm > '
                                 f'{units.m_to_mm(gates.max_rod_rms_m):.1f} mm limit', **common)
    worst_key = max(slice_sq, key=lambda k: np.mean(slice_sq[k]))
    worst = float(np.sqrt(np.mean(slice_sq[worst_key])))
    if worst > gates.max_slice_rms_m:
        return rejected_gate(f'slice {worst_key[1]} inconsistent with the others: residual '
                             f'{units.m_to_mm(worst):.1f} mm > {units.m_to_mm(gates.max_slice_rms_m):.1f} mm limit '
                             f'(motion during the acquisition?)', **common)
    if warp is not None and gates.max_warp > 0 and float(np.linalg.norm(warp, 2)) > gates.max_warp:
        return rejected_gate(f'the image is warped around the frame by {np.linalg.norm(warp, 2) * 100:.1f} % '
                             f'(> {gates.max_warp * 100:.1f} % limit): the frame is not imaged to its true size',
                             **common)
    if fre > gates.max_fre_m:
        return rejected_gate(f'Z-frame FRE {units.m_to_mm(fre):.2f} mm > '
                             f'{units.m_to_mm(gates.max_fre_m):.2f} mm limit',
                             **common)
    return ZFrameResult(True, 'accepted', T_scanner_zframe=T, candidates=len(candidates),
                        elapsed_s=time.perf_counter() - start,
                        **{k: v for k, v in common.items()})
