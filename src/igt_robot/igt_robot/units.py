"""The one place where millimetres meet metres.

ROS interfaces and the functional core use SI units (m, rad, s). DICOM, NIfTI,
OpenIGTLink and 3D Slicer use millimetres. Every boundary that talks to those
ecosystems converts here, so the factor exists exactly once in the code base.
"""
import numpy as np

MM_PER_M = 1000.0


def mm_to_m(value):
    """Convert a scalar or array from millimetres to metres."""
    return np.asarray(value, dtype=float) / MM_PER_M if not np.isscalar(value) else float(value) / MM_PER_M


def m_to_mm(value):
    """Convert a scalar or array from metres to millimetres."""
    return np.asarray(value, dtype=float) * MM_PER_M if not np.isscalar(value) else float(value) * MM_PER_M


def transform_mm_to_m(matrix_mm):
    """4x4 homogeneous transform with translation in mm -> same transform in m."""
    out = np.array(matrix_mm, dtype=float, copy=True)
    out[:3, 3] /= MM_PER_M
    return out


def transform_m_to_mm(matrix_m):
    """4x4 homogeneous transform with translation in m -> same transform in mm."""
    out = np.array(matrix_m, dtype=float, copy=True)
    out[:3, 3] *= MM_PER_M
    return out
