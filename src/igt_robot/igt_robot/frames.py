"""Frame names and rigid-transform helpers shared by the whole stack.

Conventions (see docs/frames.md):

* ``scanner``   -- the scanner's patient coordinate system, **LPS** (DICOM),
                   metres in ROS and in the core.
* ``base_link`` -- the robot base (REP-103: x forward, y left, z up); the needle
                   points along -z of the guide at zero angulation.
* ``zframe``    -- the fiducial Z-frame, rigidly mounted on the base.
* ``needle_tip``-- the needle tip.

A transform named ``T_a_b`` maps coordinates expressed in frame ``b`` into
frame ``a``: ``p_a = T_a_b @ p_b``. 3D Slicer works in **RAS**; convert with
:func:`lps_to_ras` at the OpenIGTLink boundary only.
"""
import numpy as np
from transforms3d.quaternions import mat2quat, quat2mat

SCANNER_FRAME = 'scanner'
BASE_FRAME = 'base_link'
ZFRAME_FRAME = 'zframe'
NEEDLE_TIP_FRAME = 'needle_tip'

# LPS <-> RAS: flip the first two axes. The matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_transform(rotation=None, translation=None):
    """Build a 4x4 homogeneous transform from a 3x3 rotation and a 3-vector."""
    t = np.eye(4)
    if rotation is not None:
        t[:3, :3] = np.asarray(rotation, dtype=float)
    if translation is not None:
        t[:3, 3] = np.asarray(translation, dtype=float)
    return t


def invert(transform):
    """Inverse of a rigid 4x4 transform (exact, no general matrix inverse)."""
    r = transform[:3, :3]
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ transform[:3, 3]
    return out


def apply(transform, points):
    """Apply a 4x4 transform to one point (3,) or many points (N, 3)."""
    pts = np.asarray(points, dtype=float)
    return pts @ transform[:3, :3].T + transform[:3, 3]


def rotate(transform, vectors):
    """Apply only the rotation part of a transform to direction vectors."""
    return np.asarray(vectors, dtype=float) @ transform[:3, :3].T


def lps_to_ras(transform_or_points):
    """Convert a 4x4 transform whose *target* frame is LPS, or LPS points, to RAS."""
    a = np.asarray(transform_or_points, dtype=float)
    if a.shape == (4, 4):
        return LPS_TO_RAS @ a
    return a * np.array([-1.0, -1.0, 1.0])


ras_to_lps = lps_to_ras  # the flip is an involution


def quaternion_xyzw(rotation):
    """3x3 rotation -> quaternion in ROS order (x, y, z, w)."""
    w, x, y, z = mat2quat(np.asarray(rotation, dtype=float))
    return np.array([x, y, z, w])


def rotation_from_quaternion_xyzw(q):
    """Quaternion in ROS order (x, y, z, w) -> 3x3 rotation."""
    x, y, z, w = q
    return quat2mat([w, x, y, z])


def rotation_angle(rotation):
    """Angle (rad) of a 3x3 rotation; used for rotation-error metrics."""
    c = (np.trace(rotation) - 1.0) / 2.0
    return float(np.arccos(np.clip(c, -1.0, 1.0)))
