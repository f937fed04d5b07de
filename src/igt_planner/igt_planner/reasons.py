"""Rejection reasons: machine-readable kinds and clinician-readable wording.

Kinds are plain strings (stable keys of ``PlanResult.rejected_counts``). The
sentences use millimetres and degrees because they are shown to people; the
conversion goes through :mod:`igt_robot.units`, the one place where mm meet m.
Checks run in the order below; a rejected candidate is counted under the
first check it fails.
"""
from __future__ import annotations

import math

from igt_robot.units import m_to_mm

OUTSIDE_ENTRY_REGION = 'outside_entry_region'   # explicit entry not on the allowed skin region
TOO_SHALLOW = 'too_shallow'                     # entry too close to the target
TOO_DEEP = 'too_deep'                           # longer than the usable needle
SKIN_ANGLE = 'skin_angle'                       # too oblique to the skin (or skin orientation undefined)
UNREACHABLE = 'unreachable'                     # robot / guide cannot reach (joint limits, workspace)
CROSSES_BONE = 'crosses_bone'                   # passes through a bone label
CROSSES_STRUCTURE = 'crosses_structure'         # passes through a critical structure
TOO_CLOSE = 'too_close'                         # closer to a critical structure than its margin
CROSSES_AIR = 'crosses_air'                     # leaves the body between entry and target

KINDS = (OUTSIDE_ENTRY_REGION, TOO_SHALLOW, TOO_DEEP, SKIN_ANGLE, UNREACHABLE,
         CROSSES_BONE, CROSSES_STRUCTURE, TOO_CLOSE, CROSSES_AIR)

DESCRIPTIONS = {
    OUTSIDE_ENTRY_REGION: 'entry outside the allowed skin region',
    TOO_SHALLOW: 'entry too close to the target',
    TOO_DEEP: 'longer than the needle allows',
    SKIN_ANGLE: 'too oblique to the skin',
    UNREACHABLE: 'not reachable by the robot',
    CROSSES_BONE: 'crosses bone',
    CROSSES_STRUCTURE: 'crosses a critical structure',
    TOO_CLOSE: 'closer to a critical structure than its margin',
    CROSSES_AIR: 'leaves the body (passes through air)',
}

# 1 mL = 1 cm^3 = 1e-6 m^3 (display unit for volumes only).
_ML_PER_M3 = 1e6


def _num(value: float, decimals: int = 1) -> str:
    """Round and drop a trailing '.0' (5 -> '5', 2.14 -> '2.1'); small values keep 2 decimals."""
    v = float(value)
    if 0 < abs(v) < 1:
        decimals = max(decimals, 2)
    v = round(v, decimals)
    if v == 0:
        v = 0.0  # no '-0'
    return f'{v:.{decimals}f}'.rstrip('0').rstrip('.') if abs(v) < 1e5 else f'{v:.0f}'


def _mm_below(value_m: float, limit_m: float) -> str:
    """mm string of a value that is visibly below ``limit_m`` (never '2 mm ... margin 2 mm')."""
    v, lim = m_to_mm(float(value_m)), m_to_mm(float(limit_m))
    for decimals in (1, 2, 3):
        factor = 10 ** decimals
        text = _num(math.floor(v * factor) / factor, decimals)
        if float(text) < round(lim, 3):
            return f'{text} mm'
    return f'{_num(v, 3)} mm'


def _num_positive(value: float) -> str:
    """Like _num, but a positive amount too small to show reads '< 0.01' (never 'by 0')."""
    text = _num(value)
    return '< 0.01' if value > 0 and float(text) == 0 else text


def format_mm(value_m: float) -> str:
    """A length in metres as a millimetre string, e.g. 0.0021 -> '2.1 mm'."""
    return f'{_num_positive(m_to_mm(float(value_m)))} mm'


def format_angle(value_rad: float) -> str:
    """An angle in radians as degrees, e.g. '4°'."""
    return f'{_num_positive(math.degrees(float(value_rad)))}°'


def format_clearance(value_m: float, cap_m: float) -> str:
    """A clearance; values at the cap are lower bounds ('≥ 30 mm')."""
    return f'≥ {format_mm(cap_m)}' if value_m >= cap_m else format_mm(value_m)


def format_volume(value_m3: float) -> str:
    """A volume in m^3 as millilitres, e.g. '0.35 mL'."""
    ml = float(value_m3) * _ML_PER_M3
    text = _num(ml, 2)
    return f'{"< 0.01" if ml > 0 and float(text) == 0 else text} mL'


def outside_region(distance_m: float, tolerance_m: float, what: str = 'the allowed skin region') -> str:
    return (f'entry outside {what} ({format_mm(distance_m)} from it, tolerance {format_mm(tolerance_m)})')


def too_shallow(depth_m: float, min_depth_m: float) -> str:
    return f'entry only {format_mm(depth_m)} from the target, at least {format_mm(min_depth_m)} needed'


def too_deep(depth_m: float, max_depth_m: float) -> str:
    return f'needs {format_mm(depth_m)}, needle allows {format_mm(max_depth_m)}'


def skin_angle(angle_rad: float, max_rad: float) -> str:
    if not math.isfinite(angle_rad):
        return 'skin orientation undefined at the entry (entry not on the skin surface?)'
    return (f'enters the skin {format_angle(angle_rad)} from its normal, limit {format_angle(max_rad)}')


def crosses(name: str, is_bone: bool, at_m: float) -> str:
    where = f' at {format_mm(at_m)} along the path' if math.isfinite(at_m) else ''
    return f"crosses '{name}' (bone){where}" if is_bone else f"crosses '{name}'{where}"


def too_close(name: str, clearance_m: float, margin_m: float, at_m: float) -> str:
    where = f', {format_mm(at_m)} along the path' if math.isfinite(at_m) else ''
    return f"passes {_mm_below(clearance_m, margin_m)} from '{name}' — margin {format_mm(margin_m)}{where}"


def crosses_air(at_m: float) -> str:
    return f'leaves the body (passes through air) {format_mm(at_m)} along the path'
