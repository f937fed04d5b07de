"""Simulated scanner: CT-like and MR-like volumes with known ground truth.

:func:`make_phantom` renders a body (elliptic cylinder with a fat layer), a
target lesion, vessels, bone, the 7-rod Z-frame at a given pose, optional
spherical point fiducials and optionally an inserted needle, on an arbitrary
(oblique, anisotropic) grid. All geometry is given in the scanner frame
(LPS, metres); anatomy can additionally be moved by ``T_anatomy`` (patient
motion between scans).

Image formation, chosen to be fast and to keep the ground truth exact:

* every object is an analytic shape whose *signed distance* is evaluated at
  the voxel centres inside the object's bounding box only (vectorised);
* in-plane partial volume: a soft edge ``0.5 erfc(d / (sqrt(2) sigma))``;
* slice thickness: thick slices are super-sampled along the slice normal
  and averaged (a slab profile), so oblique rods get the right smear;
* then a Gaussian point-spread blur, then noise (Gaussian in CT, Rician in MR).

Shapes are symmetric about their axes/centres, so centroids of their images are
unbiased -- the truth returned is the geometric truth.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage, special

from igt_robot import frames, units
from igt_robot.imaging.volume import Volume, affine_centered
from igt_robot.imaging.zframe_model import ZFRAME_ROD_RADIUS_M, rod_segments_in

LABELS = {'target': 1, 'vessel': 2, 'bone': 3, 'body': 4}

# Tissue intensities. CT in HU; MR relative to the rod gel (1.0), scaled by
# PhantomSpec.mr_scale (MR units are arbitrary).
CT_VALUES = {'air': -1000.0, 'fat': -100.0, 'tissue': 40.0, 'target': 90.0, 'vessel': 200.0,
             'bone': 1200.0, 'rod': 1800.0, 'fiducial': 1500.0, 'needle': 8000.0}
MR_VALUES = {'air': 0.0, 'fat': 0.85, 'tissue': 0.45, 'target': 0.65, 'vessel': 0.8,
             'bone': 0.08, 'rod': 1.0, 'fiducial': 1.0, 'needle': 0.0}
CT_NOISE_HU = 15.0
# Reconstructed CT values are stored in 12 bits: metal saturates at the top.
CT_STORED_RANGE_HU = (-1024.0, 3071.0)
MR_NOISE_REL = 0.02
# MR susceptibility artefact: the signal void is wider than the needle itself.
MR_NEEDLE_VOID_RADIUS_M = units.mm_to_m(1.5)
CT_STREAK_AMPLITUDE_HU = 150.0
CT_STREAK_DECAY_M = units.mm_to_m(15.0)


@dataclasses.dataclass
class Tube:
    """Straight tube from ``p0`` to ``p1`` (scanner, m) with ``radius`` (m)."""

    p0: Sequence[float]
    p1: Sequence[float]
    radius: float


def nominal_T_scanner_zframe(center_m=(0.0, -0.140, 0.0)):
    """Frame axes parallel to the scanner's (rods along the slice direction S)."""
    return frames.make_transform(np.eye(3), center_m)


def rotation_from_euler_deg(rx, ry, rz):
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees (test/bench helper)."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


@dataclasses.dataclass
class PhantomSpec:
    """What to render. Lengths in metres, positions in scanner LPS.

    ``spacing_m`` and ``direction`` are per index axis (i, j, k); ``direction``
    columns are the scanner directions of i, j, k (oblique when not identity).
    """

    modality: str = 'CT'
    shape_kji: tuple = (72, 150, 112)
    spacing_m: tuple = (0.001, 0.001, 0.001)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    center_m: tuple = (0.0, -0.105, 0.0)
    # Z-frame (None: no frame in the image)
    T_scanner_zframe: Optional[np.ndarray] = dataclasses.field(default_factory=nominal_T_scanner_zframe)
    rod_radius_m: float = ZFRAME_ROD_RADIUS_M
    # anatomy (all moved together by T_anatomy)
    include_body: bool = True
    body_center_m: tuple = (0.0, 0.0, 0.0)
    body_semi_axes_m: tuple = (0.15, 0.10)     # LPS x and y; the body's axis is scanner z
    fat_thickness_m: float = 0.012
    target_center_m: Optional[tuple] = (0.0, -0.060, 0.0)
    target_radius_m: float = 0.008
    vessels: list = dataclasses.field(default_factory=lambda: [
        Tube((0.022, -0.050, -0.2), (0.022, -0.050, 0.2), 0.003),
        Tube((-0.06, -0.035, -0.03), (0.06, -0.040, 0.04), 0.0025)])
    # a long bone along z plus two rib-like bones across it: the ribs give the
    # anatomy structure along z (an otherwise z-invariant body cannot show
    # motion along its axis)
    bones: list = dataclasses.field(default_factory=lambda: [
        Tube((-0.035, -0.045, -0.2), (-0.035, -0.045, 0.2), 0.008),
        Tube((-0.12, -0.078, 0.028), (0.12, -0.066, 0.034), 0.004),
        Tube((-0.12, -0.068, -0.032), (0.12, -0.080, -0.026), 0.004)])
    T_anatomy: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))
    # point fiducials (scanner, m), None for none
    fiducials_m: Optional[np.ndarray] = None
    fiducial_radius_m: float = 0.003
    # needle: tip position and insertion direction (unit, pointing to the tip)
    needle_tip_m: Optional[tuple] = None
    needle_direction: Optional[tuple] = None
    needle_length_m: float = 0.12
    needle_radius_m: float = 0.0006
    # a bent needle: its centre line (N, 3) from the hub side to the tip (scanner, m); overrides the straight
    # needle drawn from needle_tip_m / needle_direction (which stay the truth of tip and tip direction)
    needle_path_m: Optional[np.ndarray] = None
    # more frame-like objects in view (a spare Z-frame on the table): their T_scanner_zframe
    extra_zframes: list = dataclasses.field(default_factory=list)
    # scanner geometric distortion (an object with warp_grid(xyz) -> true xyz, e.g.
    # igt_robot.simulation.tissue.DistortionField); every drawn object but the body outline is distorted
    distortion: Optional[object] = None
    # image formation
    noise: Optional[float] = None          # CT: HU; MR: fraction of rod signal; None -> default
    psf_sigma_m: Optional[float] = None    # None -> half the in-plane spacing
    mr_scale: float = 1000.0
    mr_bias_fraction: float = 0.0          # MR receive-coil inhomogeneity: +/- this fraction across the FOV
    seed: Optional[int] = 0


@dataclasses.dataclass
class PhantomTruth:
    """Ground truth of a rendered phantom (scanner LPS, metres)."""

    T_scanner_zframe: Optional[np.ndarray]
    target_center_m: Optional[np.ndarray]
    target_radius_m: float
    fiducials_m: Optional[np.ndarray]
    needle_tip_m: Optional[np.ndarray]
    needle_direction: Optional[np.ndarray]
    vessels: list
    bones: list
    label_volume: Volume
    labels: dict


def _soft_inside(signed_distance, sigma):
    """Partial-volume occupancy of a blurred edge (signed distance < 0 inside)."""
    return (0.5 * special.erfc(signed_distance / (np.sqrt(2.0) * sigma))).astype(np.float32)


def _soft_inside_banded(signed_distance, sigma):
    """Same as :func:`_soft_inside` for large grids: the error function is only
    evaluated in the band where the edge is not already 0 or 1."""
    occ = (signed_distance <= 0).astype(np.float32)
    band = np.abs(signed_distance) < 5.0 * sigma
    occ[band] = _soft_inside(signed_distance[band], sigma)
    return occ


class _Grid:
    """Index/scanner bookkeeping of the output grid, with bounding-box blocks."""

    def __init__(self, affine, shape_kji, distortion=None):
        self.affine = affine
        self.shape = shape_kji
        self.inv = np.linalg.inv(affine)
        self.distortion = distortion

    def block(self, lo_scanner, hi_scanner, margin_m):
        """Index slices (k, j, i) covering the scanner box [lo, hi] + margin, or None."""
        lo = np.asarray(lo_scanner, float) - margin_m
        hi = np.asarray(hi_scanner, float) + margin_m
        if self.distortion is not None:     # the object is drawn where the scanner shows it
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            shown = self.distortion.shown_at(corners)
            lo, hi = np.minimum(lo, shown.min(axis=0)), np.maximum(hi, shown.max(axis=0))
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = frames.apply(self.inv, corners)
        lo_i = np.floor(ijk.min(axis=0)).astype(int) - 1
        hi_i = np.ceil(ijk.max(axis=0)).astype(int) + 2
        upper = np.array(self.shape[::-1])
        lo_i = np.clip(lo_i, 0, upper)
        hi_i = np.clip(hi_i, 0, upper)
        if np.any(hi_i <= lo_i):
            return None
        return (slice(lo_i[2], hi_i[2]), slice(lo_i[1], hi_i[1]), slice(lo_i[0], hi_i[0]))

    def points(self, block, dk=0.0):
        """Scanner coordinates (3 arrays broadcast to the block) of voxel centres
        shifted by ``dk`` index steps along k (slab super-sampling)."""
        sk, sj, si = block
        k = np.arange(sk.start, sk.stop, dtype=np.float64)[:, None, None] + dk
        j = np.arange(sj.start, sj.stop, dtype=np.float64)[None, :, None]
        i = np.arange(si.start, si.stop, dtype=np.float64)[None, None, :]
        a = self.affine
        xyz = [(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3]).astype(np.float32) for r in range(3)]
        if self.distortion is not None:
            xyz = [np.broadcast_to(c, np.broadcast_shapes(*(x.shape for x in xyz))) for c in xyz]
            xyz = self.distortion.warp_grid(xyz)
        return xyz

    def full(self):
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))


def _tube_distances(xyz, p0, p1):
    """Radial distance to the tube axis and axial coordinate (m) from p0."""
    p0 = np.asarray(p0, float)
    axis = np.asarray(p1, float) - p0
    length = float(np.linalg.norm(axis))
    u = axis / length
    rel = [xyz[n] - np.float32(p0[n]) for n in range(3)]
    axial = rel[0] * np.float32(u[0]) + rel[1] * np.float32(u[1]) + rel[2] * np.float32(u[2])
    r2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - axial ** 2
    radial = np.sqrt(np.maximum(r2, 0.0))
    return radial, axial, length


def _tube_occupancy(xyz, p0, p1, radius, sigma, flat_ends=True):
    radial, axial, length = _tube_distances(xyz, p0, p1)
    if flat_ends:
        occ = _soft_inside(radial - radius, sigma)
        occ *= _soft_inside(-axial, sigma)
        occ *= _soft_inside(axial - length, sigma)
        return occ
    # capsule: distance to the segment
    t = np.clip(axial, 0.0, length)
    d = np.sqrt(np.maximum(radial ** 2 + (axial - t) ** 2, 0.0))
    return _soft_inside(d - radius, sigma)


def _sphere_occupancy(xyz, center, radius, sigma):
    d = np.sqrt((xyz[0] - center[0]) ** 2 + (xyz[1] - center[1]) ** 2 + (xyz[2] - center[2]) ** 2)
    return _soft_inside(d - radius, sigma)


def _slab_offsets(spacing_m):
    """Sub-sample offsets (index units along k) modelling the slice profile."""
    ratio = spacing_m[2] / min(spacing_m[0], spacing_m[1])
    n = int(np.ceil(ratio)) if ratio > 1.25 else 1
    return (np.arange(n) + 0.5) / n - 0.5


class _Renderer:
    def __init__(self, spec: PhantomSpec):
        self.spec = spec
        self.affine = affine_centered(spec.shape_kji, spec.spacing_m, spec.direction, spec.center_m)
        self.grid = _Grid(self.affine, spec.shape_kji, spec.distortion)
        in_plane = min(spec.spacing_m[0], spec.spacing_m[1])
        # in-plane pixel integration ~ a box of one pixel: std = pixel / sqrt(12)
        self.edge_sigma = 0.3 * in_plane
        self.offsets = _slab_offsets(spec.spacing_m)
        self.values = CT_VALUES if spec.modality == 'CT' else MR_VALUES
        self.image = np.full(spec.shape_kji, self.values['air'], dtype=np.float32)

    def composite(self, block, occupancy, value):
        """Layer an object over what is already rendered (partial volume aware)."""
        region = self.image[block]
        region += occupancy * (np.float32(value) - region)

    def slab_average(self, block, occupancy_fn):
        acc = None
        for dk in self.offsets:
            occ = occupancy_fn(self.grid.points(block, dk))
            acc = occ if acc is None else acc + occ
        return acc / np.float32(len(self.offsets))

    def tube(self, p0, p1, radius, value, flat_ends=True):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        margin = radius + 4 * self.edge_sigma + float(max(self.spec.spacing_m))
        block = self.grid.block(np.minimum(p0, p1), np.maximum(p0, p1), margin)
        if block is None:
            return
        occ = self.slab_average(block, lambda xyz: _tube_occupancy(xyz, p0, p1, radius, self.edge_sigma,
                                                                   flat_ends))
        self.composite(block, occ, value)

    def sphere(self, center, radius, value):
        center = np.asarray(center, float)
        margin = radius + 4 * self.edge_sigma + float(max(self.spec.spacing_m))
        block = self.grid.block(center, center, margin)
        if block is None:
            return
        occ = self.slab_average(block, lambda xyz: _sphere_occupancy(xyz, center, radius, self.edge_sigma))
        self.composite(block, occ, value)


def _anatomy_point(spec, p):
    return frames.apply(spec.T_anatomy, np.asarray(p, float))


def _body_signed_distance(xyz_body, semi_axes):
    """Approximate signed distance (m) to an elliptic cylinder whose axis is z."""
    a, b = semi_axes
    x, y = xyz_body[0], xyz_body[1]
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    grad = np.sqrt((x / a ** 2) ** 2 + (y / b ** 2) ** 2) / np.maximum(rho, 1e-9)
    return (rho - 1.0) / np.maximum(grad, 1e-9)


def _body_xy(spec, affine, shape_kji):
    """Body-frame x and y (m) of every voxel centre (anatomy motion undone, body
    centred). Built from index ramps with broadcasting: the body is invariant
    along its own z, so z is never needed."""
    m = frames.invert(spec.T_anatomy) @ affine
    c = np.asarray(spec.body_center_m, float)
    nk, nj, ni = shape_kji
    k = np.arange(nk, dtype=np.float32)[:, None, None]
    j = np.arange(nj, dtype=np.float32)[None, :, None]
    i = np.arange(ni, dtype=np.float32)[None, None, :]
    out = []
    for r in range(2):
        plane = np.float32(m[r, 0]) * i + np.float32(m[r, 1]) * j + np.float32(m[r, 3] - c[r])
        out.append(plane + np.float32(m[r, 2]) * k)
    return out


def _needle_geometry(spec):
    tip = np.asarray(spec.needle_tip_m, float)
    direction = np.asarray(spec.needle_direction, float)
    direction = direction / np.linalg.norm(direction)
    hub = tip - spec.needle_length_m * direction
    return tip, direction, hub


def _polyline_segments(path, length_m, max_segment_m=0.005):
    """Segments (about ``max_segment_m`` long) of the last ``length_m`` of a centre line (hub side first)."""
    pts = np.asarray(path, float)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    start = max(0.0, s[-1] - length_m)
    n = max(1, int(np.ceil((s[-1] - start) / max_segment_m)))
    knots = np.linspace(start, s[-1], n + 1)
    xyz = np.stack([np.interp(knots, s, pts[:, c]) for c in range(3)], axis=1)
    return list(zip(xyz[:-1], xyz[1:]))


def _render_ct_streaks(renderer, tip, direction, hub):
    """Metal streaks: an angular +/- pattern around the needle, decaying with distance."""
    spec = renderer.spec
    reach = 3.0 * CT_STREAK_DECAY_M
    block = renderer.grid.block(np.minimum(tip, hub), np.maximum(tip, hub), reach)
    if block is None:
        return
    xyz = renderer.grid.points(block)
    radial, axial, length = _tube_distances(xyz, hub, tip)
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(direction, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(direction, e1)
    rel = [xyz[n] - np.float32(hub[n]) for n in range(3)]
    c1 = sum(rel[n] * np.float32(e1[n]) for n in range(3))
    c2 = sum(rel[n] * np.float32(e2[n]) for n in range(3))
    phi = np.arctan2(c2, c1)
    along = ((axial >= 0.0) & (axial <= length)).astype(np.float32)
    outside = (radial > 2.0 * spec.needle_radius_m).astype(np.float32)
    streak = (CT_STREAK_AMPLITUDE_HU * np.cos(8.0 * phi) * np.exp(-radial / CT_STREAK_DECAY_M)
              * along * outside).astype(np.float32)
    renderer.image[block] += streak


def _bias_field(shape_kji, fraction, rng):
    """Smooth multiplicative field (linear ramp in a random direction plus a
    gentle bowl), 1 +/- ``fraction`` over the grid: receive-coil shading."""
    nk, nj, ni = shape_kji
    k = np.linspace(-1.0, 1.0, nk, dtype=np.float32)[:, None, None]
    j = np.linspace(-1.0, 1.0, nj, dtype=np.float32)[None, :, None]
    i = np.linspace(-1.0, 1.0, ni, dtype=np.float32)[None, None, :]
    g = rng.normal(size=3)
    g /= np.linalg.norm(g)
    ramp = np.float32(g[0]) * i + np.float32(g[1]) * j + np.float32(g[2]) * k
    bowl = (i ** 2 + j ** 2 + k ** 2) / np.float32(3.0)
    return (1.0 + np.float32(0.7 * fraction) * ramp - np.float32(0.3 * fraction) * bowl).astype(np.float32)


def _label_map(spec, renderer, body_inside):
    grid = renderer.grid
    labels = np.zeros(spec.shape_kji, dtype=np.uint8)
    if body_inside is not None:
        labels[body_inside] = LABELS['body']

    def paint_tube(tube, label, flat):
        p0, p1 = _anatomy_point(spec, tube.p0), _anatomy_point(spec, tube.p1)
        sub = grid.block(np.minimum(p0, p1), np.maximum(p0, p1), tube.radius + max(spec.spacing_m))
        if sub is None:
            return
        pts = grid.points(sub)
        radial, axial, length = _tube_distances(pts, p0, p1)
        if flat:
            inside = (radial <= tube.radius) & (axial >= 0) & (axial <= length)
        else:
            t = np.clip(axial, 0.0, length)
            inside = np.sqrt(radial ** 2 + (axial - t) ** 2) <= tube.radius
        labels[sub][inside] = label

    for bone in spec.bones:
        paint_tube(bone, LABELS['bone'], True)
    for vessel in spec.vessels:
        paint_tube(vessel, LABELS['vessel'], False)
    if spec.target_center_m is not None:
        c = _anatomy_point(spec, spec.target_center_m)
        sub = grid.block(c, c, spec.target_radius_m + max(spec.spacing_m))
        if sub is not None:
            pts = grid.points(sub)
            d = np.sqrt((pts[0] - c[0]) ** 2 + (pts[1] - c[1]) ** 2 + (pts[2] - c[2]) ** 2)
            labels[sub][d <= spec.target_radius_m] = LABELS['target']
    return labels


def make_phantom(spec: Optional[PhantomSpec] = None):
    """Render ``spec`` -> ``(volume, truth)``.

    ``volume`` is a :class:`Volume` (CT in HU, MR in arbitrary units scaled by
    ``spec.mr_scale``); ``truth`` is a :class:`PhantomTruth` holding the exact
    geometry and a label map (``truth.label_volume``, uint8, same grid, names in
    ``truth.labels``: 1 target, 2 vessel, 3 bone, 4 body).
    """
    spec = spec or PhantomSpec()
    if spec.modality not in ('CT', 'MR'):
        raise ValueError(f"phantom modality must be 'CT' or 'MR', got {spec.modality!r}")
    r = _Renderer(spec)
    v = r.values
    rng = np.random.default_rng(spec.seed)

    # 1. body with a fat layer (smooth, no slab super-sampling needed)
    body_inside = None
    if spec.include_body:
        body_xy = _body_xy(spec, r.affine, spec.shape_kji)
        d_outer = _body_signed_distance(body_xy, spec.body_semi_axes_m)
        body_inside = d_outer <= 0.0
        r.image += _soft_inside_banded(d_outer, r.edge_sigma) * np.float32(v['fat'] - v['air'])
        del d_outer
        inner_axes = tuple(a - spec.fat_thickness_m for a in spec.body_semi_axes_m)
        d_inner = _body_signed_distance(body_xy, inner_axes)
        r.image += _soft_inside_banded(d_inner, r.edge_sigma) * np.float32(v['tissue'] - v['fat'])
        del body_xy, d_inner
    # 2. anatomy inside the body
    for bone in spec.bones:
        r.tube(_anatomy_point(spec, bone.p0), _anatomy_point(spec, bone.p1), bone.radius, v['bone'])
    for vessel in spec.vessels:
        r.tube(_anatomy_point(spec, vessel.p0), _anatomy_point(spec, vessel.p1), vessel.radius, v['vessel'],
               flat_ends=False)
    if spec.target_center_m is not None:
        r.sphere(_anatomy_point(spec, spec.target_center_m), spec.target_radius_m, v['target'])
    # 3. Z-frame rods and point fiducials
    for T_frame in ([spec.T_scanner_zframe] if spec.T_scanner_zframe is not None else []) + list(spec.extra_zframes):
        for p0, p1 in rod_segments_in(np.asarray(T_frame, float)):
            r.tube(p0, p1, spec.rod_radius_m, v['rod'])
    fiducials = None
    if spec.fiducials_m is not None:
        fiducials = np.atleast_2d(np.asarray(spec.fiducials_m, float))
        for c in fiducials:
            r.sphere(c, spec.fiducial_radius_m, v['fiducial'])
    # 4. needle
    tip = direction = None
    if spec.needle_tip_m is not None:
        if spec.needle_direction is None:
            raise ValueError('needle_direction is required with needle_tip_m')
        tip, direction, hub = _needle_geometry(spec)
        radius = spec.needle_radius_m if spec.modality == 'CT' else max(spec.needle_radius_m, MR_NEEDLE_VOID_RADIUS_M)
        if spec.needle_path_m is None:
            r.tube(hub, tip, radius, v['needle'])
        else:
            segments = _polyline_segments(spec.needle_path_m, spec.needle_length_m)
            for n, (p0, p1) in enumerate(segments):
                # rounded joints, a flat (cut) tip as the straight needle has
                r.tube(p0, p1, radius, v['needle'], flat_ends=n == len(segments) - 1)
            hub = np.asarray(spec.needle_path_m, float)[0]
    # 5. point-spread blur, streaks, noise
    in_plane = min(spec.spacing_m[0], spec.spacing_m[1])
    psf = spec.psf_sigma_m if spec.psf_sigma_m is not None else 0.5 * in_plane
    if psf > 0:
        sigma_kji = [psf / spec.spacing_m[2], psf / spec.spacing_m[1], psf / spec.spacing_m[0]]
        r.image = ndimage.gaussian_filter(r.image, sigma_kji, mode='nearest', truncate=3.0)
    if tip is not None and spec.modality == 'CT':
        _render_ct_streaks(r, tip, direction, hub)
    if spec.modality == 'CT':
        noise = CT_NOISE_HU if spec.noise is None else spec.noise
        if noise > 0:
            r.image += rng.normal(0.0, noise, size=r.image.shape).astype(np.float32)
        data = np.clip(r.image, *CT_STORED_RANGE_HU)
    else:
        noise = MR_NOISE_REL if spec.noise is None else spec.noise
        if spec.mr_bias_fraction > 0:
            r.image *= _bias_field(spec.shape_kji, spec.mr_bias_fraction, rng)
        real = r.image + rng.normal(0.0, noise, size=r.image.shape).astype(np.float32)
        imag = rng.normal(0.0, noise, size=r.image.shape).astype(np.float32)
        data = np.sqrt(real ** 2 + imag ** 2) * np.float32(spec.mr_scale)   # Rician magnitude

    volume = Volume(data.astype(np.float32), r.affine.copy(), spec.modality,
                    {'source': 'igt_robot.imaging.phantom'})
    label_volume = Volume(_label_map(spec, r, body_inside), r.affine.copy(), 'LABEL', {'labels': dict(LABELS)})
    truth = PhantomTruth(
        T_scanner_zframe=None if spec.T_scanner_zframe is None else np.asarray(spec.T_scanner_zframe, float),
        target_center_m=None if spec.target_center_m is None else _anatomy_point(spec, spec.target_center_m),
        target_radius_m=spec.target_radius_m,
        fiducials_m=fiducials,
        needle_tip_m=tip, needle_direction=direction,
        vessels=[Tube(_anatomy_point(spec, t.p0), _anatomy_point(spec, t.p1), t.radius) for t in spec.vessels],
        bones=[Tube(_anatomy_point(spec, t.p0), _anatomy_point(spec, t.p1), t.radius) for t in spec.bones],
        label_volume=label_volume, labels=dict(LABELS))
    return volume, truth


def random_rotation(rng, max_angle_deg):
    """Rotation about a uniformly random axis by an angle uniform in [0, max]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(0.0, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


# Nominal Z-frame centre for the simulated procedure (scanner LPS, m): anterior
# to the patient, who lies supine with the body below it along +y (posterior).
NOMINAL_ZFRAME_CENTER_M = (0.0, -0.150, 0.0)
TARGET_DEPTH_FROM_ZFRAME_M = 0.080


def registration_case(rng, modality='CT', slice_mm=1.0, max_rotation_deg=15.0, max_shift_m=0.020,
                      max_oblique_deg=20.0, in_plane_mm=None, fiducials_zframe=None, **overrides):
    """A randomised, physically sensible registration scene (for tests and bench).

    The Z-frame gets a random pose (rotation <= ``max_rotation_deg`` about a
    random axis, shift <= ``max_shift_m`` per axis around
    :data:`NOMINAL_ZFRAME_CENTER_M`); the body surface is placed 6 mm below the
    frame's lowest point (the robot sits on the patient); the target lies
    80 mm from the frame centre inside the body; slices are oblique (random
    tilt <= ``max_oblique_deg``) and the field of view covers frame + target.
    MR scans get a random intensity scale and +/-20 % coil shading.
    ``fiducials_zframe`` (N, 3, zframe frame) adds point markers that move
    with the frame. Returns a :class:`PhantomSpec`.
    """
    R = random_rotation(rng, max_rotation_deg)
    centre = np.asarray(NOMINAL_ZFRAME_CENTER_M) + rng.uniform(-max_shift_m, max_shift_m, 3)
    T = frames.make_transform(R, centre)
    ends = rod_segments_in(T).reshape(-1, 3)
    skin_y = float(ends[:, 1].max()) + ZFRAME_ROD_RADIUS_M + 0.006
    semi_axes = (0.15, 0.10)
    target = centre + np.array([0.0, TARGET_DEPTH_FROM_ZFRAME_M, 0.0])
    if in_plane_mm is None:
        in_plane_mm = 1.0 if slice_mm <= 1.0 else 0.8
    spacing = (units.mm_to_m(in_plane_mm), units.mm_to_m(in_plane_mm), units.mm_to_m(slice_mm))
    # FOV: frame (bounding radius ~52 mm incl. rods) + target, with a margin
    y_lo, y_hi = centre[1] - 0.058, target[1] + 0.020
    half_xz = 0.058
    fov_center = np.array([centre[0], 0.5 * (y_lo + y_hi), centre[2]])
    extent = np.array([2 * half_xz, y_hi - y_lo, 2 * half_xz])      # LPS x, y, z
    direction = random_rotation(rng, max_oblique_deg)
    # grid extent along each (tilted) axis that still covers the LPS box
    cover = np.abs(direction.T) @ extent
    shape_kji = tuple(int(np.ceil(cover[a] / spacing[a])) + 1 for a in (2, 1, 0))
    fiducials = None
    if fiducials_zframe is not None:
        fiducials = frames.apply(T, np.asarray(fiducials_zframe, float))
    spec = PhantomSpec(
        modality=modality, shape_kji=shape_kji, spacing_m=spacing, direction=direction, center_m=tuple(fov_center),
        T_scanner_zframe=T, body_center_m=(centre[0], skin_y + semi_axes[1], 0.0), body_semi_axes_m=semi_axes,
        target_center_m=tuple(target),
        vessels=[Tube(target + [0.022, 0.01, -0.2], target + [0.022, 0.01, 0.2], 0.003)],
        bones=[Tube(target + [-0.035, 0.045, -0.2], target + [-0.035, 0.045, 0.2], 0.008)],
        fiducials_m=fiducials, seed=int(rng.integers(0, 2 ** 31)),
        mr_scale=float(rng.uniform(300.0, 3000.0)), mr_bias_fraction=0.2 if modality == 'MR' else 0.0)
    return dataclasses.replace(spec, **overrides) if overrides else spec
