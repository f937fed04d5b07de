"""Point-fiducial registration: spherical markers -> rigid transform.

Pipeline (scanner LPS metres throughout):

1. **Detect** bright spheres: white top-hat, connected components re-segmented
   at half their own peak, gated by volume (0.3x..3x the nominal sphere) and
   by extent (a sphere is compact; rods and needles are long), then a
   sub-voxel background-subtracted intensity centroid in a spherical window.
2. **Correspond** detections with the model marker set by *all triplets*:
   every model triangle is compared with every ordered detected triangle of
   matching side lengths; each match gives a rigid pose, all model markers are
   projected with it and paired with the nearest detection within tolerance;
   the pose with the most pairs (then lowest RMS) wins. The default marker set
   has all-distinct inter-marker distances, so the answer is unique.
3. **Fit** with Arun/Horn SVD least squares (reflection guarded).
4. **Reject outliers**: leave-one-out residual of each pair against a
   threshold; drop the worst and repeat, keeping >= 3 non-collinear markers.
5. **Report** FRE and the predicted TRE at a target with the
   Fitzpatrick-West-Maurer (1998) formula using the configuration's principal
   axes.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import numpy as np
from scipy import ndimage

from igt_robot import frames, units
from igt_robot.imaging.rods import robust_noise_sigma, white_tophat
from igt_robot.imaging.volume import Volume, validate_intensities

_MM = units.mm_to_m(1.0)

# Default marker set on the robot's fiducial block, in the zframe frame (m).
# Chosen with all ten inter-marker distances distinct (>= 3.8 mm apart) so the
# triplet correspondence is unambiguous, spread in 3-D (not coplanar) so the
# TRE formula's principal axes are well conditioned, >= 19 mm from every
# Z-frame rod (separate blobs) and at y <= +23 mm (on the robot side, away from
# the patient-facing +y face).
DEFAULT_FIDUCIALS_ZFRAME = np.array([
    [-0.048, -0.042, -0.023],
    [0.051, -0.040, -0.013],
    [0.049, 0.023, 0.030],
    [-0.052, 0.017, 0.008],
    [0.004, -0.051, 0.041],
])
DEFAULT_MARKER_RADIUS_M = units.mm_to_m(3.0)


@dataclasses.dataclass
class FiducialResult:
    """Outcome of :func:`register_fiducials`.

    ``T_scanner_model`` maps model-frame points to scanner LPS (m); it is set
    only when ``accepted``. ``pairs`` are (model index, detection index).
    """

    accepted: bool
    reason: str
    T_scanner_model: Optional[np.ndarray] = None
    fre_m: float = float('nan')
    tre_predicted_m: float = float('nan')
    pairs: list = dataclasses.field(default_factory=list)
    outliers: list = dataclasses.field(default_factory=list)
    detected_m: Optional[np.ndarray] = None
    residuals_m: Optional[np.ndarray] = None
    fle_m: float = float('nan')
    T_estimate: Optional[np.ndarray] = None

    @property
    def fiducial_count(self):
        return len(self.pairs)


# ----------------------------------------------------------------------------- geometry
def rigid_fit(model_points, observed_points, weights=None):
    """Least-squares rigid transform ``T`` with ``observed ~ T @ model`` (Arun/Horn
    SVD). A reflection (det = -1) is never returned: the smallest singular
    direction is flipped instead. Needs >= 3 non-collinear points."""
    P = np.asarray(model_points, float)
    Q = np.asarray(observed_points, float)
    if P.shape != Q.shape or P.ndim != 2 or P.shape[1] != 3 or len(P) < 3:
        raise ValueError('rigid_fit needs two (N>=3, 3) arrays of equal shape')
    w = np.ones(len(P)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    pc = w @ P
    qc = w @ Q
    H = (P - pc).T @ (w[:, None] * (Q - qc))
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0])
    R = Vt.T @ D @ U.T
    return frames.make_transform(R, qc - R @ pc)


def is_collinear(points, tol_m=1.0 * _MM):
    """True when points (N, 3) do not span a plane (second singular value small)."""
    pts = np.asarray(points, float)
    if len(pts) < 3:
        return True
    s = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    return bool(s[1] / np.sqrt(len(pts)) < tol_m)


def predicted_tre(fiducials, target, fle_rms_m):
    """Fitzpatrick-West-Maurer expected RMS TRE (m) at ``target``.

    TRE^2 = FLE^2 / N * (1 + 1/3 * sum_k d_k^2 / f_k^2), with d_k the distance
    of the target from principal axis k of the fiducial configuration and f_k
    the RMS distance of the fiducials from that axis. All points in one frame.
    """
    F = np.asarray(fiducials, float)
    n = len(F)
    c = F.mean(axis=0)
    X = F - c
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    r = np.asarray(target, float) - c
    ratio = 0.0
    for k in range(3):
        axis = Vt[k]
        d2 = float(r @ r - (r @ axis) ** 2)
        f2 = float(np.mean(np.sum(X ** 2, axis=1) - (X @ axis) ** 2))
        ratio += d2 / max(f2, 1e-12)
    return float(np.sqrt(fle_rms_m ** 2 / n * (1.0 + ratio / 3.0)))


# ----------------------------------------------------------------------------- detection
def detect_spherical_markers(volume: Volume, radius_m: float = DEFAULT_MARKER_RADIUS_M):
    """Sub-voxel centres (N, 3, scanner m) of bright spherical markers of about
    ``radius_m``. Long or oversized bright structures (rods, needle, bone) are
    rejected by the size and extent gates."""
    enhanced = white_tophat(volume, 2.0 * radius_m + 4.0 * _MM)
    noise = robust_noise_sigma(enhanced)
    ref = float(np.percentile(enhanced, 99.95))
    threshold = max(6.0 * noise, 0.15 * ref)
    labels, count = ndimage.label(enhanced > threshold, structure=np.ones((3, 3, 3), bool))
    voxel_volume = float(np.prod(volume.spacing))
    sphere_volume = 4.0 / 3.0 * np.pi * radius_m ** 3
    max_extent = 2.0 * radius_m + 2.0 * float(volume.spacing.max()) + 2.0 * _MM
    centres = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == lab
        values = enhanced[sl][comp]
        peak = float(values.max())
        core = values >= 0.5 * peak
        core_volume = np.count_nonzero(core) * voxel_volume
        if not (0.3 * sphere_volume <= core_volume <= 3.0 * sphere_volume):
            continue
        kk, jj, ii = np.nonzero(comp)
        idx = np.stack([ii + sl[2].start, jj + sl[1].start, kk + sl[0].start], axis=1)[core].astype(float)
        pts = volume.index_to_scanner(idx)
        if np.max(np.ptp(pts @ _principal_axes(pts).T, axis=0)) > max_extent:
            continue
        centre = (values[core][:, None] * pts).sum(axis=0) / values[core].sum()
        for _ in range(2):   # re-centre the window on the refined centroid
            centre = _window_centroid(volume, enhanced, centre, radius_m + 2.5 * _MM)
            if centre is None:
                break
        if centre is not None:
            centres.append(centre)
    return np.array(centres).reshape(-1, 3)


def _principal_axes(pts):
    if len(pts) < 2:
        return np.eye(3)
    _, _, Vt = np.linalg.svd(pts - pts.mean(axis=0), full_matrices=False)
    if Vt.shape[0] < 3:
        return np.eye(3)
    return Vt


def _window_centroid(volume, enhanced, centre, window_m):
    """Background-subtracted intensity centroid inside a sphere of ``window_m``;
    None when the window leaves the grid (a cut marker would bias the centre)."""
    c_idx = volume.scanner_to_index(centre)
    half = np.ceil(window_m / volume.spacing).astype(int) + 1
    lo = np.floor(c_idx).astype(int) - half
    hi = np.ceil(c_idx).astype(int) + half + 1
    if np.any(lo < 0) or np.any(hi > np.array(volume.data.shape[::-1])):
        return None
    ii, jj, kk = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]),
                             indexing='ij')
    idx = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    vals = enhanced[idx[:, 2], idx[:, 1], idx[:, 0]].astype(float)
    pts = volume.index_to_scanner(idx.astype(float))
    d = np.linalg.norm(pts - centre, axis=1)
    inside = d <= window_m
    background = float(np.median(vals[~inside])) if np.any(~inside) else 0.0
    w = vals[inside] - background
    if w.sum() <= 0:
        return None
    return (w[:, None] * pts[inside]).sum(axis=0) / w.sum()


# ----------------------------------------------------------------------------- correspondence
def match_fiducials(model_points, detected_points, tol_m=2.0 * _MM):
    """All-triplets correspondence. Returns (pairs [(model i, detected j)], T)
    with ``detected ~ T @ model``, or ([], None) when nothing matches."""
    P = np.asarray(model_points, float)
    D = np.asarray(detected_points, float)
    if len(P) < 3 or len(D) < 3:
        return [], None
    dP = np.linalg.norm(P[:, None] - P[None], axis=2)
    dD = np.linalg.norm(D[:, None] - D[None], axis=2)
    best = ([], None, np.inf)
    for i, j, k in itertools.combinations(range(len(P)), 3):
        if is_collinear(P[[i, j, k]]):
            continue
        for a, b, c in itertools.permutations(range(len(D)), 3):
            if (abs(dD[a, b] - dP[i, j]) > tol_m or abs(dD[b, c] - dP[j, k]) > tol_m
                    or abs(dD[a, c] - dP[i, k]) > tol_m):
                continue
            T = rigid_fit(P[[i, j, k]], D[[a, b, c]])
            proj = frames.apply(T, P)
            dist = np.linalg.norm(proj[:, None] - D[None], axis=2)
            pairs = []
            used = set()
            for m in np.argsort(dist.min(axis=1)):
                n = int(np.argmin(dist[m]))
                if dist[m, n] <= tol_m and n not in used:
                    pairs.append((int(m), n))
                    used.add(n)
            if len(pairs) < 3:
                continue
            pairs.sort()
            T = rigid_fit(P[[p for p, _ in pairs]], D[[q for _, q in pairs]])
            res = np.linalg.norm(frames.apply(T, P[[p for p, _ in pairs]]) - D[[q for _, q in pairs]], axis=1)
            rms = float(np.sqrt(np.mean(res ** 2)))
            if len(pairs) > len(best[0]) or (len(pairs) == len(best[0]) and rms < best[2]):
                best = (pairs, T, rms)
    return best[0], best[1]


def _leave_one_out(P, D):
    """Residual (m) of each pair when it is left out of the fit."""
    out = np.zeros(len(P))
    for n in range(len(P)):
        keep = np.arange(len(P)) != n
        T = rigid_fit(P[keep], D[keep])
        out[n] = np.linalg.norm(frames.apply(T, P[n]) - D[n])
    return out


# ----------------------------------------------------------------------------- main entry
def register_fiducials(volume: Volume, model_points=DEFAULT_FIDUCIALS_ZFRAME, *,
                       marker_radius_m: float = DEFAULT_MARKER_RADIUS_M, target_scanner=None,
                       match_tol_m: float = 2.0 * _MM, outlier_threshold_m: float = 1.5 * _MM,
                       max_fre_m: float = 1.0 * _MM, min_fiducials: int = 3,
                       fle_floor_m: Optional[float] = None) -> FiducialResult:
    """Register spherical markers whose model positions (``model_points``, N x 3, m,
    model frame) are known. Returns a :class:`FiducialResult` (``T_scanner_model``
    only when accepted). Raises :class:`ImageError` for unusable input.

    The FLE used for the TRE prediction is the FRE-based estimate
    ``FRE * sqrt(N / (N - 2))``, floored at ``fle_floor_m`` (default: a quarter
    of the mean voxel spacing) because few markers make the FRE an
    underestimate.
    """
    validate_intensities(volume)
    P_all = np.asarray(model_points, float)
    detected = detect_spherical_markers(volume, marker_radius_m)
    if len(detected) < min_fiducials:
        return FiducialResult(False, f'only {len(detected)} fiducial marker(s) detected, need ≥ {min_fiducials}',
                              detected_m=detected)
    pairs, T = match_fiducials(P_all, detected, match_tol_m)
    if T is None or len(pairs) < min_fiducials:
        return FiducialResult(False, f'{len(detected)} marker(s) detected but no ≥ {min_fiducials} match the '
                                     f'model marker set (tolerance {units.m_to_mm(match_tol_m):.1f} mm)',
                              detected_m=detected)
    outliers = []
    while True:
        P = P_all[[p for p, _ in pairs]]
        D = detected[[q for _, q in pairs]]
        if len(pairs) <= min_fiducials:
            break
        loo = _leave_one_out(P, D)
        worst = int(np.argmax(loo))
        if loo[worst] <= outlier_threshold_m:
            break
        candidate = [pr for n, pr in enumerate(pairs) if n != worst]
        if is_collinear(P_all[[p for p, _ in candidate]]):
            break
        outliers.append((pairs[worst], float(loo[worst])))
        pairs = candidate
    P = P_all[[p for p, _ in pairs]]
    D = detected[[q for _, q in pairs]]
    T = rigid_fit(P, D)
    residuals = np.linalg.norm(frames.apply(T, P) - D, axis=1)
    fre = float(np.sqrt(np.mean(residuals ** 2)))
    n = len(pairs)
    floor = fle_floor_m if fle_floor_m is not None else 0.25 * float(np.mean(volume.spacing))
    fle = max(fre * np.sqrt(n / (n - 2)) if n > 2 else 0.0, floor)
    tre = predicted_tre(frames.apply(T, P), target_scanner, fle) if target_scanner is not None else float('nan')
    common = dict(fre_m=fre, tre_predicted_m=tre, pairs=pairs, outliers=outliers, detected_m=detected,
                  residuals_m=residuals, fle_m=fle, T_estimate=T)
    if is_collinear(P):
        return FiducialResult(False, f'the {n} matched fiducials are (nearly) collinear', **common)
    if fre > max_fre_m:
        return FiducialResult(False, f'fiducial FRE {units.m_to_mm(fre):.2f} mm > '
                                     f'{units.m_to_mm(max_fre_m):.2f} mm limit', **common)
    return FiducialResult(True, 'accepted', T_scanner_model=T, **common)
