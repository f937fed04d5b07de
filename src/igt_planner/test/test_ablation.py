"""Tests of the ablation-zone model (igt_planner.ablation)."""
import math

import numpy as np
import pytest
from igt_robot.units import mm_to_m

from igt_planner import (AblationError, AblationZone, ConeReachability, LabelMap, NeedlePlanner, PlannerConfig,
                         evaluate_zone, plan_ablation, zone_size)
from igt_planner.config import AblationConfig

MM = mm_to_m(1.0)   # one millimetre, in metres
TISSUE, TUMOUR, VESSEL = 1, 2, 3
NAMES = {0: 'air', TISSUE: 'soft tissue', TUMOUR: 'tumour', VESSEL: 'vessel'}


def lens_volume(R, r, d):
    """Volume of the intersection of two spheres (radii R, r, centres d apart)."""
    if d >= R + r:
        return 0.0
    if d <= abs(R - r):
        return 4 / 3 * math.pi * min(R, r) ** 3
    return math.pi * (R + r - d) ** 2 * (d * d + 2 * d * r - 3 * r * r + 2 * d * R + 6 * r * R - 3 * R * R) / (12 * d)


def sphere_map(radius_m=8 * MM, spacing=0.5 * MM, n=64, cube=None):
    """Tumour sphere centred in an all-tissue cube; optional critical cube (lo, hi index corners)."""
    idx = np.arange(n) * spacing
    c = (n - 1) / 2 * spacing
    z, y, x = np.meshgrid(idx, idx, idx, indexing='ij')
    data = np.full((n, n, n), TISSUE, np.uint8)
    data[(x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= radius_m ** 2] = TUMOUR
    if cube is not None:
        (k0, j0, i0), (k1, j1, i1) = cube
        data[k0:k1, j0:j1, i0:i1] = VESSEL
    aff = np.diag([spacing, spacing, spacing, 1.0])
    lm = LabelMap(data, aff, NAMES, {VESSEL: 0.003}, air_labels=[0], tumour_labels=[TUMOUR])
    return lm, np.array([c, c, c])


def test_zone_size_interpolates_the_table_and_refuses_extrapolation():
    cfg = AblationConfig()
    p, t, long_tab, short_tab = cfg.tables()
    assert zone_size(p[1], t[2], cfg) == (pytest.approx(long_tab[1, 2]), pytest.approx(short_tab[1, 2]))
    mid = zone_size(0.5 * (p[0] + p[1]), t[1], cfg)
    assert mid[0] == pytest.approx(0.5 * (long_tab[0, 1] + long_tab[1, 1]))
    both = zone_size(0.5 * (p[1] + p[2]), 0.5 * (t[0] + t[1]), cfg)
    assert both[1] == pytest.approx(short_tab[1:3, 0:2].mean())   # bilinear midpoint = corner mean
    # Monotone in power and time, long >= short for the shipped table.
    assert np.all(np.diff(long_tab, axis=0) > 0) and np.all(np.diff(long_tab, axis=1) > 0)
    assert np.all(long_tab >= short_tab)
    with pytest.raises(AblationError, match='power 120 W is outside the table range'):
        zone_size(120.0, 300.0, cfg)
    with pytest.raises(AblationError, match='time 60 s is outside'):
        zone_size(60.0, 60.0, cfg)
    with pytest.raises(AblationError, match='not finite'):
        zone_size(float('nan'), 300.0, cfg)


def test_zone_geometry():
    d = np.array([0.0, 1.0, 0.0])
    zone = AblationZone.at_tip(np.zeros(3), d, 0.04, 0.02, 0.005)
    np.testing.assert_allclose(zone.centre, [0.0, -0.015, 0.0])     # 20 mm - 5 mm behind the tip
    inside = zone.centre + np.array([[0, 0.0199, 0], [0, -0.0199, 0], [0.0099, 0, 0], [0, 0, -0.0099]])
    outside = zone.centre + np.array([[0, 0.0201, 0], [0.0101, 0, 0], [0.008, 0.015, 0]])
    assert zone.contains(inside).all() and not zone.contains(outside).any()
    assert zone.volume_m3 == pytest.approx(4 / 3 * math.pi * 0.02 * 0.01 ** 2)


@pytest.mark.parametrize('offset_mm,margin_mm', [(5.0, 0.0), (0.0, 0.0), (9.0, 3.0), (14.0, 0.0)])
def test_coverage_of_a_sphere_matches_the_analytic_lens(offset_mm, margin_mm):
    lm, c = sphere_map()
    r_zone = 7 * MM
    zone = AblationZone(c + np.array([offset_mm * MM, 0, 0]), np.array([1.0, 0, 0]), 2 * r_zone, 2 * r_zone)
    report = evaluate_zone(lm, zone, margin_m=margin_mm * MM, supersample=2)
    R = 8 * MM + margin_mm * MM
    expected = lens_volume(R, r_zone, offset_mm * MM) / (4 / 3 * math.pi * R ** 3)
    assert report.coverage == pytest.approx(expected, abs=0.02)
    assert report.touched == {}


def test_full_coverage_and_touched_volume():
    # A 4 x 4 x 4 mm critical cube (8 voxels of 0.5 mm a side) next to the tumour.
    lm, c = sphere_map(cube=((30, 30, 54), (38, 38, 62)))
    zone = AblationZone(c, np.array([0.0, 0, 1.0]), 0.04, 0.04)       # 20 mm radius sphere: holds everything
    report = evaluate_zone(lm, zone, margin_m=5 * MM)
    assert report.coverage == 1.0
    assert report.touched['vessel'] == pytest.approx((4 * MM) ** 3, rel=1e-9)
    small = AblationZone(c, np.array([0.0, 0, 1.0]), 0.02, 0.02)      # 10 mm radius: cube starts 11.25 mm away
    assert evaluate_zone(lm, small, margin_m=0.0).touched == {}


def test_no_tumour_is_an_error():
    lm, c = sphere_map()
    zone = AblationZone(c, np.array([1.0, 0, 0]), 0.02, 0.02)
    with pytest.raises(AblationError, match='no tumour voxel'):
        evaluate_zone(lm, zone, tumour_labels=[VESSEL])


def needle_case(vessel_y_mm, vessel_z_mm=30):
    """1 mm slab: skin at y-index 5, tumour (r = 8 mm) at index (30, 40, 30), a vessel tube along x."""
    n = 64
    data = np.zeros((n, 72, n), np.uint8)
    data[:, 5:, :] = TISSUE
    k, j, i = np.mgrid[:n, :72, :n]
    data[(i - 30) ** 2 + (j - 40) ** 2 + (k - 30) ** 2 <= 64] = TUMOUR
    data[((j - vessel_y_mm) ** 2 + (k - vessel_z_mm) ** 2) <= 4] = VESSEL
    aff = np.diag([MM, MM, MM, 1.0])
    lm = LabelMap(data, aff, NAMES, {VESSEL: 0.003}, tumour_labels=[TUMOUR])
    cfg = PlannerConfig().replace(ablation={'offset_min_m': -0.01, 'offset_max_m': 0.02})
    planner = NeedlePlanner(lm, cfg, ConeReachability((0, 1, 0), math.radians(60), 0.2))
    path = planner.validate(np.array([0.030, 0.005, 0.030]), np.array([0.030, 0.040, 0.030]))
    assert path.feasible
    return planner, path


def test_tip_search_stops_short_of_the_vessel_beyond_the_tumour():
    planner, path = needle_case(vessel_y_mm=57)   # 17 mm beyond the target, along the needle
    result = plan_ablation(planner, path, 60.0, 300.0)
    assert result.safe and result.touched == {} and result.reasons == []
    unconstrained = int(np.argmax(result.coverage_by_offset))
    # Without the vessel the tip would go deeper; there the zone touches it.
    assert result.offsets_m[unconstrained] > result.tip_offset_m
    assert result.touched_by_offset[unconstrained] > 0
    safe = result.path_ok_by_offset & (result.touched_by_offset == 0)
    assert result.coverage == pytest.approx(result.coverage_by_offset[safe].max())
    np.testing.assert_allclose(result.tip, path.target + result.tip_offset_m * path.direction)
    assert 0 < result.coverage < 1


def test_tip_search_reports_when_nothing_is_safe():
    planner, path = needle_case(vessel_y_mm=30, vessel_z_mm=40)   # beside the tumour, 10 mm off the needle
    result = plan_ablation(planner, path, 100.0, 600.0)
    assert not result.safe
    assert any("ablation zone touches 'vessel'" in r and 'mL' in r for r in result.reasons)
    assert result.touched['vessel'] > 0
