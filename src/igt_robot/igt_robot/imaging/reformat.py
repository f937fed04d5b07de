"""Oblique reformats: sample a volume on a plane, for pictures of the needle along its path.

The plane is given by a centre and two orthonormal in-plane axes in scanner LPS
(metres); the result is a 2-D array whose (u, v) coordinates are metres along
those axes from the centre, with points projected into the same coordinates.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from igt_robot import frames


def plane_axes(direction, up=(0.0, 0.0, 1.0)):
    """Orthonormal (u, v) with u along ``direction`` and v the part of ``up`` orthogonal to it."""
    u = np.asarray(direction, dtype=float)
    u = u / np.linalg.norm(u)
    up = np.asarray(up, dtype=float)
    v = up - u * (up @ u)
    if np.linalg.norm(v) < 1e-6:          # direction along ``up``: any perpendicular will do
        v = np.cross(u, [1.0, 0.0, 0.0])
    return u, v / np.linalg.norm(v)


def oblique_slice(volume, center, u, v, half_size=0.06, step=0.0005, order=1):
    """Sample ``volume`` on the plane centre + a*u + b*v, |a|, |b| <= half_size (m).

    Returns ``(pixels, extent)`` with rows along -v (row 0 at +half_size, as
    matplotlib's origin='upper' draws) and columns along +u; ``extent`` is
    (left, right, bottom, top) in metres.
    """
    n = int(round(2 * half_size / step)) + 1
    a = np.linspace(-half_size, half_size, n)
    grid_u, grid_v = np.meshgrid(a, a[::-1])
    points = (np.asarray(center, dtype=float) + grid_u[..., None] * np.asarray(u) + grid_v[..., None] * np.asarray(v))
    index = frames.apply(np.linalg.inv(volume.affine), points.reshape(-1, 3))   # (i, j, k)
    coords = index[:, ::-1].T                                                    # data is [k, j, i]
    pixels = ndimage.map_coordinates(np.asarray(volume.data, dtype=np.float32), coords, order=order,
                                     mode='constant', cval=float(np.min(volume.data))).reshape(n, n)
    return pixels, (-half_size, half_size, -half_size, half_size)


def project(point, center, u, v):
    """(a, b) coordinates of a scanner point in the plane (centre, u, v)."""
    d = np.asarray(point, dtype=float) - np.asarray(center, dtype=float)
    return float(d @ u), float(d @ v)
