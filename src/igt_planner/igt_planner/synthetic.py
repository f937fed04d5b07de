"""Synthetic abdomen label maps for tests, benchmarks and documentation.

A simplified upper abdomen (scanner LPS, metres, origin at the volume centre,
patient supine): elliptic body, liver with a spherical tumour, aorta, inferior
vena cava, an oblique portal-vein branch near the tumour, right kidney, the
spine and a set of ribs over the liver. The allowed entry region is the
patient's right anterolateral skin around the tumour level. Shapes are
painted in their own bounding boxes so CT-sized volumes stay cheap to build.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .candidates import EntryRegion
from .labelmap import LabelMap

AIR, TISSUE, LIVER, TUMOUR, AORTA, IVC, PORTAL_VEIN, SPINE, RIB, KIDNEY = range(10)

NAMES = {AIR: 'air', TISSUE: 'soft tissue', LIVER: 'liver', TUMOUR: 'tumour', AORTA: 'aorta',
         IVC: 'inferior vena cava', PORTAL_VEIN: 'portal vein', SPINE: 'spine', RIB: 'rib', KIDNEY: 'right kidney'}
MARGINS_M = {AORTA: 0.005, IVC: 0.005, PORTAL_VEIN: 0.005, KIDNEY: 0.003, SPINE: 0.003, RIB: 0.002}
BONES = (SPINE, RIB)


@dataclasses.dataclass
class SyntheticCase:
    """A phantom with its planning inputs."""

    labelmap: LabelMap
    target: np.ndarray          # tumour centre, scanner LPS m
    entry_region: EntryRegion
    tumour_radius_m: float


class _Painter:
    """Paints shapes given in world metres into a (z, y, x) label volume with a diagonal affine."""

    def __init__(self, size_xyz, spacing_xyz):
        self.n = np.array(size_xyz[::-1], int)              # (nz, ny, nx)
        self.s = np.array(spacing_xyz[::-1], float)         # (sz, sy, sx)
        self.origin = -0.5 * (self.n - 1) * self.s          # world of voxel (0, 0, 0), array order
        self.data = np.zeros(tuple(self.n), np.uint8)

    def axis(self, a, lo=0, hi=None):
        hi = self.n[a] if hi is None else hi
        return self.origin[a] + np.arange(lo, hi) * self.s[a]

    def box(self, lo_w, hi_w):
        """Array slices covering the world box [lo_w, hi_w] ((z, y, x) order)."""
        lo = np.clip(np.floor((np.asarray(lo_w) - self.origin) / self.s).astype(int), 0, self.n)
        hi = np.clip(np.ceil((np.asarray(hi_w) - self.origin) / self.s).astype(int) + 1, 0, self.n)
        return lo, hi

    def grid(self, lo, hi):
        z = self.axis(0, lo[0], hi[0])[:, None, None]
        y = self.axis(1, lo[1], hi[1])[None, :, None]
        x = self.axis(2, lo[2], hi[2])[None, None, :]
        return z, y, x

    def paint(self, lo, hi, mask, label, only=None):
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        view = self.data[sl]
        m = np.broadcast_to(mask, view.shape)
        if only is not None:
            m = m & np.isin(view, only)
        view[m] = label

    def ellipsoid(self, c, r, label, only=None):
        """c, r: world (x, y, z) centre and semi-axes (m)."""
        cz = np.array([c[2], c[1], c[0]])
        rz = np.array([r[2], r[1], r[0]])
        lo, hi = self.box(cz - rz, cz + rz)
        if np.any(hi <= lo):
            return
        z, y, x = self.grid(lo, hi)
        mask = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        self.paint(lo, hi, mask, label, only)

    def tube(self, p0, p1, radius, label, only=None):
        """Cylinder of ``radius`` around the segment p0-p1 (world x, y, z, m)."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        lo_w = np.minimum(p0, p1) - radius
        hi_w = np.maximum(p0, p1) + radius
        lo, hi = self.box(lo_w[::-1], hi_w[::-1])
        z, y, x = self.grid(lo, hi)
        d = p1 - p0
        L2 = float(d @ d)
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / L2, 0.0, 1.0)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        self.paint(lo, hi, dist2 <= radius ** 2, label, only)

    def column(self, mask2d, label, z_lo=None, z_hi=None, only=None):
        """A z-invariant (y, x) mask painted over the slices z in [z_lo, z_hi] (world m)."""
        zw = self.axis(0)
        zsel = np.ones(zw.size, bool)
        if z_lo is not None:
            zsel &= zw >= z_lo
        if z_hi is not None:
            zsel &= zw <= z_hi
        for k in np.flatnonzero(zsel):
            sl = self.data[k]
            m = mask2d if only is None else mask2d & np.isin(sl, only)
            sl[m] = label

    def affine(self):
        """Index (i, j, k) -> LPS world (diagonal spacing, centred)."""
        a = np.eye(4)
        a[0, 0], a[1, 1], a[2, 2] = self.s[2], self.s[1], self.s[0]
        a[:3, 3] = self.origin[::-1]
        return a


def make_abdomen(size_xyz=(128, 128, 128), spacing_xyz=(0.002, 0.002, 0.002)) -> SyntheticCase:
    """Build the phantom on a grid of ``size_xyz`` voxels of ``spacing_xyz`` metres (x, y, z order)."""
    p = _Painter(size_xyz, spacing_xyz)
    fov_x = size_xyz[0] * spacing_xyz[0]
    A, B = 0.45 * fov_x, 0.34 * fov_x            # body semi-axes (x: left, y: posterior)
    y2 = p.axis(1)[:, None]
    x2 = p.axis(2)[None, :]
    rho = (x2 / A) ** 2 + (y2 / B) ** 2          # elliptic "radius"^2 of each (y, x) pixel
    p.column(rho <= 1.0, TISSUE)

    p.ellipsoid((-0.45 * A, -0.05 * B, 0.02), (0.45 * A, 0.62 * B, 0.09), LIVER, only=[TISSUE])
    p.ellipsoid((-0.45 * A, 0.50 * B, -0.07), (0.18 * A, 0.22 * B, 0.05), KIDNEY, only=[TISSUE, LIVER])
    tumour_c = np.array([-0.5 * A, -0.1 * B, 0.0])
    tumour_r = 0.1 * A
    p.ellipsoid(tumour_c, (tumour_r,) * 3, TUMOUR, only=[LIVER, TISSUE])
    p.tube((-0.15 * A, 0.05 * B, -0.03), (-0.65 * A, 0.10 * B, 0.03), 0.06 * B, PORTAL_VEIN,
           only=[TISSUE, LIVER])
    p.column((x2 - 0.14 * A) ** 2 + (y2 - 0.22 * B) ** 2 <= (0.10 * B) ** 2, AORTA)
    p.column((x2 + 0.14 * A) ** 2 + (y2 - 0.20 * B) ** 2 <= (0.10 * B) ** 2, IVC)
    vertebra = ((x2 / (0.17 * B)) ** 2 + ((y2 - 0.55 * B) / (0.17 * B)) ** 2 <= 1.0) | \
               ((np.abs(x2) <= 0.05 * A) & (y2 >= 0.70 * B) & (y2 <= 0.92 * B))
    p.column(vertebra, SPINE)
    # Ribs: bands of an elliptic shell under the skin, leaving the anterior
    # midline (cartilage) open; intercostal spaces straddle the tumour level.
    shell = (rho >= 0.84 ** 2) & (rho <= 0.93 ** 2) & ~((np.abs(x2) < 0.3 * A) & (y2 < 0))
    half_band = 0.0045
    for zc in np.arange(-0.036, p.axis(0)[-1] + 0.024, 0.024):
        p.column(shell, RIB, zc - half_band, zc + half_band, only=[TISSUE, LIVER])

    lm = LabelMap(p.data, p.affine(), NAMES, MARGINS_M, bone_labels=BONES, air_labels=(AIR,),
                  tumour_labels=(TUMOUR,))
    zw = p.axis(0)[:, None, None]
    region = (x2[None] < -0.15 * A) & (y2[None] < 0.35 * B) & (np.abs(zw) < 0.07)
    region = np.broadcast_to(region, p.data.shape).copy()
    return SyntheticCase(lm, tumour_c, EntryRegion.from_mask(region, 'right anterolateral skin'), tumour_r)
