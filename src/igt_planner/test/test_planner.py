"""Tests of the needle trajectory planner core (igt_planner, no ROS)."""
import math
from pathlib import Path

import numpy as np
import pytest
from igt_robot.units import mm_to_m
from scipy.spatial import cKDTree

from igt_planner import (ConeReachability, DegenerateAffine, EmptyLabelMap, EntryRegion, InvalidAffine,
                         InvalidEntryRegion, InvalidLabelMap, LabelMap, NeedlePlanner, NoCriticalStructures,
                         NoFeasiblePath, NonFiniteInput, PlannerConfig, RobotReachability, TargetInAir,
                         TargetInBone, TargetInCriticalStructure, TargetOutsideImage, config_from_params,
                         load_planner_config, plan, validate_plan)
from igt_planner import reasons as R
from igt_planner.candidates import SkinNormals
from igt_planner.clearance import build_structure_field, dense_segment_minima, segment_minima
from igt_planner.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
MM = mm_to_m(1.0)   # one millimetre, in metres
TISSUE, VESSEL, RIB, TUMOUR = 1, 2, 3, 4
NAMES = {0: 'air', TISSUE: 'soft tissue', VESSEL: 'vessel', RIB: 'rib', TUMOUR: 'tumour'}
MARGINS = {VESSEL: 3 * MM, RIB: 1 * MM}
ORIGIN = np.array([-0.03, -0.03, -0.02])   # world (x, y, z) of voxel (0, 0, 0), m

# Slab phantom, 1 mm voxels, array (z, y, x) = (40, 60, 60); world = ORIGIN + index * 1 mm.
# Skin: the anterior plane y-index 10 (air above, LPS y grows posterior). Target at index
# (i=30, j=45, k=20). A vessel (radius 2 voxels) runs along z at (i, j) = VESSEL_IJ.
TARGET_IJK = (30, 45, 20)


def world(i, j, k):
    return ORIGIN + np.array([i, j, k], float) * MM


def slab(vessel_ij=(31, 25), rib=True, notch=True, tumour=True, dtype=np.uint8):
    data = np.zeros((40, 60, 60), dtype)
    data[:, 10:, :] = TISSUE
    k, j, i = np.mgrid[:40, :60, :60]
    data[((i - vessel_ij[0]) ** 2 + (j - vessel_ij[1]) ** 2) <= 4] = VESSEL
    if rib:
        data[:, 15:18, 40:52] = RIB          # bone bar under the skin, right side
    if notch:
        data[:, 10:26, 5:9] = 0              # air slot open to the outside, left side
    if tumour:
        data[18:23, 43:48, 28:33] = TUMOUR
    aff = np.eye(4)
    aff[:3, :3] *= MM
    aff[:3, 3] = ORIGIN
    return LabelMap(data, aff, NAMES, MARGINS, bone_labels=[RIB], air_labels=[0], tumour_labels=[TUMOUR])


def wide_cone():
    return ConeReachability((0, 1, 0), math.radians(85), 0.2)


def cfg(**sections):
    return PlannerConfig().replace(**sections)


def skin_entry(i, k=20):
    return world(i, 10, k)


def brute_clearance(lm, label, entry, target, step=0.1 * MM):
    """Reference: exact distance from dense path points to the nearest voxel centre of ``label``."""
    centres = lm.to_world(np.argwhere(lm.data == label).astype(float))
    n = int(np.ceil(np.linalg.norm(target - entry) / step))
    pts = entry + np.linspace(0, 1, n + 1)[:, None] * (target - entry)
    return float(cKDTree(centres).query(pts)[0].min())


# ---------------------------------------------------------------- clearance engine
def test_branch_and_bound_equals_dense_sampling():
    lm = slab()
    field = build_structure_field(lm, VESSEL, 0.02, coarse_step_m=0.5 * MM * 16)
    rng = np.random.default_rng(3)
    a0 = rng.uniform([0, 0, 0], [39, 59, 59], (400, 3))
    a1 = rng.uniform([0, 0, 0], [39, 59, 59], (400, 3))
    lengths = np.linalg.norm(lm.to_world(a1) - lm.to_world(a0), axis=1)
    got, at = segment_minima(field, a0, a1, lengths, 0.5 * MM, 4, chunk_samples=1000)
    ref = dense_segment_minima(field, a0, a1, lengths, 0.5 * MM, 4)
    np.testing.assert_array_equal(got, ref)
    hit = got < 0.02
    assert hit.sum() > 100 and np.all(np.isfinite(at[hit]))
    assert np.all((at[hit] >= 0) & (at[hit] <= lengths[hit] + 1e-9))


def test_clearance_matches_exact_distance_within_half_voxel():
    lm = slab(rib=False, notch=False)
    planner = NeedlePlanner(lm, cfg(needle={'max_depth_m': 0.1}), wide_cone())
    target = world(*TARGET_IJK)
    entries = np.array([skin_entry(i) for i in range(12, 56, 3)])
    batch = planner.evaluate(entries, target, full=True)
    s = planner.field_names.index('vessel')
    for n, e in enumerate(entries):
        ref = min(brute_clearance(lm, VESSEL, e, target), planner.fields[s].cap_m)
        assert abs(batch.clearance[s, n] - ref) <= 0.5 * MM, (n, batch.clearance[s, n], ref)


# ---------------------------------------------------------------- ranking
def test_ranking_by_clearance_only_follows_exact_clearance():
    lm = slab(rib=False, notch=False)
    c = cfg(needle={'max_depth_m': 0.1}, clearance={'cap_m': 0.06, 'saturation_m': 0.05},
            ranking={'weight_clearance': 1.0, 'weight_depth': 0.0, 'weight_skin_angle': 0.0,
                     'weight_joint_margin': 0.0, 'max_ranked': 50})
    target = world(*TARGET_IJK)
    entries = np.array([skin_entry(i) for i in (12, 18, 24, 36, 42, 48, 54)])
    result = NeedlePlanner(lm, c, wide_cone()).plan(target, entries)
    ref = {tuple(np.round(e, 6)): brute_clearance(lm, VESSEL, e, target) for e in entries}
    got = [ref[tuple(np.round(p.entry, 6))] for p in result.ranked]
    assert got == sorted(got, reverse=True)
    assert len(result.ranked) == result.n_feasible
    # The best path is the one farthest from the vessel by exact geometry.
    farthest = max(entries, key=lambda e: ref[tuple(np.round(e, 6))])
    np.testing.assert_allclose(result.best.entry, farthest)
    assert result.best.clearance['vessel'] == pytest.approx(ref[tuple(np.round(farthest, 6))], abs=0.5 * MM)


def test_default_ranking_prefers_the_short_perpendicular_path_when_clearance_is_ample():
    lm = slab(vessel_ij=(8, 50), rib=False, notch=False)   # vessel far to the side
    target = world(*TARGET_IJK)
    entries = np.array([skin_entry(i) for i in (22, 26, 30, 34, 38)] + [skin_entry(30, k=14)])
    result = NeedlePlanner(lm, cfg(), wide_cone()).plan(target, entries)
    np.testing.assert_allclose(result.best.entry, skin_entry(30))
    assert result.best.score_terms['clearance'] == 1.0
    assert result.best.skin_angle < math.radians(3)
    np.testing.assert_allclose(result.best.direction, [0, 1, 0], atol=1e-9)
    assert result.best.depth == pytest.approx(0.035)
    # Symmetric neighbours score equally and follow the best.
    scores = [p.score for p in result.ranked]
    assert scores == sorted(scores, reverse=True)
    assert result.ranked[1].score == pytest.approx(result.ranked[2].score, abs=1e-3)


def test_vessel_over_the_target_forces_the_side_away_from_it():
    lm = slab(vessel_ij=(31, 28), rib=False, notch=False)  # just right of the straight path
    target = world(*TARGET_IJK)
    entries = np.array([skin_entry(i) for i in (18, 22, 26, 30, 34, 38, 42)])
    result = NeedlePlanner(lm, cfg(), wide_cone()).plan(target, entries)
    assert result.best.entry[0] < target[0]          # enters on the side away from the vessel
    assert result.rejected_counts.get(R.CROSSES_STRUCTURE, 0) >= 1
    assert all(p.clearance['vessel'] >= 3 * MM for p in result.ranked)


def test_plan_from_region_uses_only_region_skin_voxels():
    lm = slab(rib=False, notch=False)
    mask = np.zeros(lm.shape, bool)
    mask[:, :, :30] = True
    planner = NeedlePlanner(lm, cfg(), wide_cone(), EntryRegion.from_mask(mask))
    result = planner.plan(world(*TARGET_IJK))
    assert result.n_candidates == 40 * 30        # skin plane voxels with x-index < 30
    for p in result.ranked:
        idx = np.rint(lm.to_array(p.entry)).astype(int)
        assert idx[2] < 30 and idx[1] == 10
    assert result.timings['query_s'] > 0 and 'checks_s' in result.timings


# ---------------------------------------------------------------- rejection reasons
@pytest.fixture(scope='module')
def slab_map():
    return slab()


def kinds_of(path):
    return set(path.reason_kinds)


def test_reason_too_deep(slab_map):
    p = validate_plan(skin_entry(30), world(*TARGET_IJK), slab_map, reachability=wide_cone(),
                      config=cfg(needle={'max_depth_m': 0.03}))
    assert not p.feasible and R.TOO_DEEP in kinds_of(p)
    assert 'needs 35 mm, needle allows 30 mm' in p.reasons


def test_reason_too_shallow(slab_map):
    target = world(*TARGET_IJK)
    p = validate_plan(target - [0, 0.004, 0], target, slab_map, reachability=wide_cone())
    assert R.TOO_SHALLOW in kinds_of(p)
    assert any('only 4 mm from the target' in r for r in p.reasons)
    # That entry is also deep inside the body, far from the skin.
    assert R.OUTSIDE_ENTRY_REGION in kinds_of(p)


def test_reason_outside_entry_region(slab_map):
    mask = np.zeros(slab_map.shape, bool)
    mask[:, :, :25] = True
    p = validate_plan(skin_entry(40), world(*TARGET_IJK), slab_map, EntryRegion.from_mask(mask),
                      reachability=wide_cone())
    assert R.OUTSIDE_ENTRY_REGION in kinds_of(p)
    assert any(r.startswith('entry outside the allowed skin region (16 mm from it') for r in p.reasons)


def test_reason_skin_angle():
    p = validate_plan(skin_entry(2), world(*TARGET_IJK), slab(notch=False), reachability=wide_cone(),
                      config=cfg(skin={'max_angle_rad': math.radians(30)}))
    assert R.SKIN_ANGLE in kinds_of(p)
    text = [r for r in p.reasons if r.startswith('enters the skin')][0]
    expected = math.degrees(math.atan2(28, 35))
    assert abs(math.degrees(p.skin_angle) - expected) < 2.0
    assert text.endswith('limit 30°')


def test_reason_unreachable_from_cone(slab_map):
    p = validate_plan(skin_entry(20), world(*TARGET_IJK), slab_map,
                      reachability=ConeReachability((0, 1, 0), math.radians(10), 0.2))
    assert R.UNREACHABLE in kinds_of(p) and not p.reachable
    beyond = math.degrees(math.atan2(10, 35)) - 10
    assert f'beyond the 10° limit by {beyond:.1f}°' in ' '.join(p.reasons)


def test_reason_too_close_with_distance(slab_map):
    target = world(*TARGET_IJK)
    entry = skin_entry(26)
    p = validate_plan(entry, target, slab_map, reachability=wide_cone())
    ref = brute_clearance(slab_map, VESSEL, entry, target)
    assert 0.6 * MM < ref < 3 * MM                        # the geometry really is "too close"
    assert R.TOO_CLOSE in kinds_of(p) and R.CROSSES_STRUCTURE not in kinds_of(p)
    assert abs(p.clearance['vessel'] - ref) <= 0.5 * MM
    text = [r for r in p.reasons if r.startswith('passes')][0]
    assert "from 'vessel' — margin 3 mm" in text


def test_reason_crosses_structure(slab_map):
    p = validate_plan(skin_entry(31), world(*TARGET_IJK), slab_map, reachability=wide_cone())
    assert R.CROSSES_STRUCTURE in kinds_of(p)
    text = [r for r in p.reasons if r.startswith("crosses 'vessel'")][0]
    assert 'along the path' in text


def test_reason_crosses_bone(slab_map):
    p = validate_plan(skin_entry(46), world(*TARGET_IJK), slab_map, reachability=wide_cone())
    assert R.CROSSES_BONE in kinds_of(p)
    assert any(r.startswith("crosses 'rib' (bone)") for r in p.reasons)


def test_reason_crosses_air(slab_map):
    p = validate_plan(skin_entry(1), world(*TARGET_IJK), slab_map, reachability=wide_cone())
    assert R.CROSSES_AIR in kinds_of(p)
    text = [r for r in p.reasons if r.startswith('leaves the body')][0]
    # The slot (x-index 5..8) is met 5-9 mm along the path (path length per x-step ~1.6 mm).
    along = float(text.split('air) ')[1].split(' mm')[0])
    assert 4 <= along <= 15


def test_feasible_validate_has_no_reasons(slab_map):
    p = validate_plan(skin_entry(20), world(*TARGET_IJK), slab_map, reachability=wide_cone())
    assert p.feasible and p.reasons == [] and p.reason_kinds == []
    assert 0 < p.score <= 1 and p.clearance['vessel'] >= 3 * MM
    assert 'feasible' in p.explain()


def test_all_reason_kinds_are_counted_in_a_plan(slab_map):
    target = world(*TARGET_IJK)
    mask = np.zeros(slab_map.shape, bool)
    mask[:, :, :50] = True
    entries = [skin_entry(58),                       # outside region (8 mm beyond it)
               target - [0, 0.004, 0],               # too shallow (and off region)
               skin_entry(30, k=39) - [0.029, 0, 0],  # fine region but too deep
               skin_entry(1), skin_entry(31), skin_entry(46), skin_entry(26), skin_entry(20)]
    c = cfg(needle={'max_depth_m': 0.047})
    planner = NeedlePlanner(slab_map, c, wide_cone(), EntryRegion.from_mask(mask))
    result = planner.plan(target, np.array(entries))
    assert result.n_feasible == 1
    assert sum(result.rejected_counts.values()) == len(entries) - 1
    assert result.rejected_counts[R.OUTSIDE_ENTRY_REGION] == 2
    for kind in (R.TOO_DEEP, R.CROSSES_AIR, R.CROSSES_STRUCTURE, R.CROSSES_BONE, R.TOO_CLOSE):
        assert result.rejected_counts[kind] == 1, kind
        example = result.rejected_examples[kind]
        assert kind in example.reason_kinds
        # validate_plan on the same entry gives the same explanation.
        again = planner.validate(example.entry, target)
        assert again.reasons == example.reasons


# ---------------------------------------------------------------- batch vs single
def test_batch_matches_per_candidate_validation(slab_map):
    planner = NeedlePlanner(slab_map, cfg(), wide_cone())
    target = world(*TARGET_IJK)
    rng = np.random.default_rng(7)
    entries = np.array([skin_entry(i, k) for i, k in zip(rng.integers(0, 60, 40), rng.integers(5, 35, 40))])
    batch = planner.evaluate(entries, target, full=True)
    for n, e in enumerate(entries):
        single = planner.validate(e, target)
        from_batch = planner.path(batch, n)
        assert single.feasible == from_batch.feasible
        assert single.reasons == from_batch.reasons
        assert single.clearance == from_batch.clearance
        assert single.skin_angle == pytest.approx(from_batch.skin_angle, abs=1e-12)
        if single.feasible:
            assert single.score == pytest.approx(from_batch.score, abs=1e-12)
    # The fast cascade agrees with the full evaluation on feasibility and scores.
    fast = planner.evaluate(entries, target, full=False)
    np.testing.assert_array_equal(fast.feasible, batch.feasible)
    np.testing.assert_allclose(fast.score[fast.feasible], batch.score[batch.feasible])
    assert list(fast.kind[~fast.feasible]) == list(batch.kind[~batch.feasible])


# ---------------------------------------------------------------- no feasible path
def test_no_feasible_path_explains_counts_and_best_rejected(slab_map):
    target = world(*TARGET_IJK)
    entries = np.array([skin_entry(31), skin_entry(46), skin_entry(26)])
    with pytest.raises(NoFeasiblePath) as info:
        plan(target, slab_map, entry_points=entries, reachability=wide_cone())
    err = info.value
    assert err.counts == {R.CROSSES_BONE: 1, R.CROSSES_STRUCTURE: 1, R.TOO_CLOSE: 1}
    assert err.n_candidates == 3
    # The closest to feasible is the "too close" one.
    np.testing.assert_allclose(err.best_rejected.entry, skin_entry(26))
    msg = str(err)
    assert 'no feasible path among 3 candidate entries' in msg
    assert "from 'vessel' — margin 3 mm" in msg


def test_no_feasible_path_notes_target_inside_margin():
    lm = slab(vessel_ij=(30, 48), rib=False, notch=False, tumour=False)  # vessel 1 mm below the target
    target = world(*TARGET_IJK)
    with pytest.raises(NoFeasiblePath) as info:
        plan(target, lm, entry_points=np.array([skin_entry(30), skin_entry(20)]), reachability=wide_cone())
    assert any("the target itself is" in n and "'vessel'" in n for n in info.value.notes)
    assert 'the target itself is' in str(info.value)


# ---------------------------------------------------------------- bad input
def test_target_outside_image(slab_map):
    with pytest.raises(TargetOutsideImage, match='outside the image'):
        validate_plan(skin_entry(20), [0.5, 0.0, 0.0], slab_map)


def test_target_in_bone(slab_map):
    with pytest.raises(TargetInBone, match="bone 'rib'"):
        validate_plan(skin_entry(20), world(45, 16, 20), slab_map)


def test_target_in_air(slab_map):
    with pytest.raises(TargetInAir, match='air'):
        validate_plan(skin_entry(20), world(30, 3, 20), slab_map)


def test_target_in_critical_structure(slab_map):
    with pytest.raises(TargetInCriticalStructure, match="'vessel'"):
        plan(world(31, 25, 20), slab_map, reachability=wide_cone())


def test_nan_target_and_entries(slab_map):
    with pytest.raises(NonFiniteInput, match='target'):
        plan([np.nan, 0, 0], slab_map)
    with pytest.raises(NonFiniteInput, match='entry_points'):
        plan(world(*TARGET_IJK), slab_map, entry_points=np.array([[0.0, np.nan, 0.0]]))


def test_bad_affines():
    data = slab().data
    good = np.eye(4)
    good[:3, :3] *= MM
    nan = good.copy()
    nan[0, 3] = np.nan
    with pytest.raises(NonFiniteInput, match='affine'):
        LabelMap(data, nan, NAMES, MARGINS)
    zero = good.copy()
    zero[:, 1] = 0
    with pytest.raises(DegenerateAffine, match='zero length'):
        LabelMap(data, zero, NAMES, MARGINS)
    collinear = good.copy()
    collinear[:3, 1] = collinear[:3, 0]
    with pytest.raises(DegenerateAffine, match='collinear'):
        LabelMap(data, collinear, NAMES, MARGINS)
    shear = good.copy()
    shear[0, 1] = 0.3 * MM
    with pytest.raises(InvalidAffine, match='not orthogonal'):
        LabelMap(data, shear, NAMES, MARGINS)
    with pytest.raises(InvalidAffine, match='4x4'):
        LabelMap(data, np.eye(3), NAMES, MARGINS)


def test_oblique_affine_gives_the_same_plan():
    """A rotated, anisotropic grid carrying the same anatomy yields the same clearance."""
    lm = slab(rib=False, notch=False)
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])   # 90° about z
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([MM, MM, MM])
    aff[:3, 3] = [0.01, -0.02, 0.005]
    moved = LabelMap(lm.data, aff, NAMES, MARGINS, bone_labels=[RIB])

    def to_new(p):
        return moved.to_world(lm.to_array(p))
    target = world(*TARGET_IJK)
    e = skin_entry(20)
    a = validate_plan(e, target, lm, reachability=wide_cone())
    b = validate_plan(to_new(e), to_new(target), moved,
                      reachability=ConeReachability(rot @ [0, 1, 0], math.radians(85), 0.2))
    assert a.clearance['vessel'] == pytest.approx(b.clearance['vessel'], abs=1e-6)
    assert a.skin_angle == pytest.approx(b.skin_angle, abs=1e-6)


def test_empty_and_invalid_label_maps():
    aff = np.eye(4) * MM
    aff[3, 3] = 1
    with pytest.raises(EmptyLabelMap, match='empty'):
        LabelMap(np.zeros((0, 5, 5), np.uint8), aff, NAMES, MARGINS)
    with pytest.raises(EmptyLabelMap, match='only air'):
        LabelMap(np.zeros((5, 5, 5), np.uint8), aff, NAMES, MARGINS)
    with pytest.raises(InvalidLabelMap, match='integer'):
        LabelMap(np.ones((5, 5, 5), np.float32), aff, NAMES, MARGINS)
    with pytest.raises(InvalidLabelMap, match='3-D'):
        LabelMap(np.ones((5, 5), np.uint8), aff, NAMES, MARGINS)


def test_no_critical_structures_when_required():
    lm = slab(rib=False)
    no_vessel = LabelMap(np.where(lm.data == VESSEL, TISSUE, lm.data).astype(np.uint16), lm.affine, NAMES,
                         MARGINS, bone_labels=[RIB])
    with pytest.raises(NoCriticalStructures, match='absent from the volume'):
        NeedlePlanner(no_vessel)
    # Allowed when the configuration says so: then only the other checks apply.
    result = NeedlePlanner(no_vessel, cfg(require_critical=False), wide_cone()).plan(
        world(*TARGET_IJK), np.array([skin_entry(30)]))
    assert result.best.feasible and result.best.clearance == {}


def test_entry_region_without_skin(slab_map):
    mask = np.zeros(slab_map.shape, bool)
    mask[:, 40:, :] = True                      # deep inside the body only
    with pytest.raises(InvalidEntryRegion, match='no skin voxel'):
        NeedlePlanner(slab_map, entry_region=EntryRegion.from_mask(mask)).plan(world(*TARGET_IJK))
    with pytest.raises(InvalidEntryRegion, match='shape'):
        NeedlePlanner(slab_map, entry_region=EntryRegion.from_mask(np.ones((2, 2, 2), bool))).plan(
            world(*TARGET_IJK))


# ---------------------------------------------------------------- skin normals
def test_skin_normals_are_radial_on_a_sphere():
    n = 48
    spacing = np.array([1.0, 1.5, 2.0]) * MM                    # x, y, z: anisotropic on purpose
    k, j, i = np.mgrid[:n, :n, :n]
    centre_w = (n - 1) / 2 * spacing
    r2 = (i * spacing[0] - centre_w[0]) ** 2 + (j * spacing[1] - centre_w[1]) ** 2 + \
        (k * spacing[2] - centre_w[2]) ** 2
    data = (r2 <= (20 * MM) ** 2).astype(np.uint8)      # fits inside the grid on every axis
    data[r2 <= (5 * MM) ** 2] = 2
    aff = np.diag([*spacing, 1.0])
    lm = LabelMap(data, aff, {1: 'body', 2: 'core'}, {2: 0.001})
    skin = np.argwhere((data > 0) & ~np.pad(data > 0, 1)[2:, 1:-1, 1:-1])   # voxels with air above (in z)
    # Only part of the surface is in the smoothed box: the rest exercises the window fallback.
    normals = SkinNormals(lm, skin[: len(skin) // 2], 2 * MM, 2.5)
    got = normals.normals(skin.astype(float))
    radial = lm.to_world(skin.astype(float)) - centre_w
    radial /= np.linalg.norm(radial, axis=1)[:, None]
    angle = np.degrees(np.arccos(np.clip(np.einsum('ij,ij->i', got, radial), -1, 1)))
    # The sphere is voxelised with 1-2 mm steps: a few degrees of staircase error.
    assert np.median(angle) < 4 and angle.max() < 12
    # Both evaluation paths (smoothed box, window fallback) give the same numbers.
    fallback = SkinNormals(lm, skin[:1], 2 * MM, 2.5).normals(skin[: len(skin) // 2].astype(float))
    np.testing.assert_allclose(fallback, got[: len(skin) // 2], atol=1e-5)


# ---------------------------------------------------------------- reachability adapter
class _IK:
    """Test double of NeedleGuideKinematics with the published API (inverse -> IKSolution-like)."""

    class Model:
        joint_names = ['stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion']
        lower = np.array([-0.04, -0.04, -0.5236, -0.5236, 0.0])
        upper = np.array([0.04, 0.04, 0.5236, 0.5236, 0.15])

    class Solution:
        def __init__(self, joints, reachable, violations):
            self.joints, self.reachable, self.violations = joints, reachable, violations

    model = Model()

    def __init__(self):
        self.calls = []

    def inverse(self, entry_base, target_base):
        self.calls.append((np.array(entry_base), np.array(target_base)))
        if entry_base[0] > 0:   # pretend entries with base x > 0 need too much pitch
            return self.Solution(np.array([0.0, 0.0, 0.5934, 0.0, 0.1]), False,
                                 [('guide_pitch', math.radians(4.0), 'guide_pitch beyond upper limit by 4.0°'),
                                  ('stage_y', 0.005, '')])
        return self.Solution(np.array([0.02, 0.0, 0.0, 0.2618, 0.075]), True, [])


def test_robot_reachability_adapter_words_violations_and_margin():
    ik = _IK()
    T = np.eye(4)
    T[:3, 3] = [0.1, 0.0, 0.0]
    reach = RobotReachability(ik, T)
    bad = reach.check(np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.05, 0.0]))
    np.testing.assert_allclose(ik.calls[-1][0], [0.1, 0.0, 0.0])      # T_base_scanner applied
    assert not bad.reachable
    assert bad.reasons == ['angulation joint guide_pitch beyond upper limit by 4.0°',
                           'stage joint stage_y beyond limit by 5 mm']
    good = reach.check(np.array([-0.2, 0.0, 0.0]), np.array([0.0, 0.05, 0.0]))
    assert good.reachable and good.reasons == []
    # Closest joint to a limit: yaw at 15° of ±30° -> a quarter of the range left; stage_x 0.02 of ±0.04 too.
    assert good.joint_limit_margin == pytest.approx(0.25, abs=1e-3)
    assert good.insertion_depth == pytest.approx(0.075)
    batch = reach.check_many(np.array([[-0.2, 0, 0], [0.0, 0, 0]]), np.array([0.0, 0.05, 0.0]))
    np.testing.assert_array_equal(batch.reachable, [True, False])
    assert batch.reasons_for(0) == [] and 'guide_pitch' in batch.reasons_for(1)[0]
    with pytest.raises(InvalidAffine, match='rigid'):
        RobotReachability(ik, np.diag([2.0, 1, 1, 1]))


def test_real_kinematics_adapter_if_available():
    kin = pytest.importorskip('igt_robot.kinematics', reason='igt_robot.kinematics not written yet')
    robot_model = pytest.importorskip('igt_robot.robot_model', reason='igt_robot.robot_model not available')
    model = robot_model.load_robot_model()
    reach = RobotReachability(kin.NeedleGuideKinematics(model), np.eye(4), model)
    # Straight down under the RCM at the origin (needle along base -z) is reachable.
    r = reach.check(np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, -0.06]))
    assert r.reachable and r.reasons == []
    # stage mid-range (0.5), insertion 60 of 150 mm (0.4 of the range left to the nearer limit).
    assert r.joint_limit_margin == pytest.approx(0.4, abs=1e-6)
    assert r.insertion_depth == pytest.approx(0.06)
    far = reach.check(np.array([0.0, 0.0, 0.0]), np.array([0.2, 0.0, -0.06]))
    assert not far.reachable and any(t.startswith('angulation joint guide_yaw beyond') for t in far.reasons)
    # A line parallel to the RCM plane has no solution: reported, not raised.
    flat = reach.check(np.array([0.0, 0.0, -0.01]), np.array([0.05, 0.0, -0.01]))
    assert not flat.reachable and 'no inverse-kinematics solution' in flat.reasons[0]


def test_label_map_from_sitk_image_uses_lps_metres():
    sitk = pytest.importorskip('SimpleITK', reason='SimpleITK not installed')
    lm = slab(rib=False, notch=False)
    img = sitk.GetImageFromArray(lm.data)
    img.SetSpacing((0.8, 0.9, 2.5))                       # mm
    img.SetOrigin((-100.0, 20.0, 35.0))                   # mm, LPS
    img.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    from_img = LabelMap.from_sitk(img, NAMES, MARGINS)
    for ijk in ((0, 0, 0), (5, 7, 3), (59, 10, 39)):
        mm = np.array(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(from_img.to_world(np.array(ijk[::-1], float)), mm_to_m(mm), atol=1e-12)
    assert from_img.spacing.tolist() == pytest.approx(mm_to_m(np.array([2.5, 0.9, 0.8])).tolist())


# ---------------------------------------------------------------- config
def test_shipped_yaml_matches_defaults():
    assert load_planner_config(REPO / 'config' / 'planner.yaml') == PlannerConfig()


def test_config_errors():
    with pytest.raises(ConfigError, match='step_fraction'):
        cfg(sampling={'step_fraction': 0.8})
    with pytest.raises(ConfigError, match='unknown planner parameter'):
        config_from_params({'needle': {'max_depht_m': 0.1}})
    with pytest.raises(ConfigError, match='long_diameter_m'):
        config_from_params({'ablation.long_diameter_m': [0.01, 0.02]})
    c = config_from_params({'needle.max_depth_m': 0.2, 'ranking': {'max_ranked': 5}})
    assert c.needle.max_depth_m == 0.2 and c.ranking.max_ranked == 5


# ---------------------------------------------------------------- picture
def test_render_plan_slice_writes_a_picture(tmp_path, slab_map):
    import matplotlib.image as mpimg
    from igt_planner import render_plan_slice
    planner = NeedlePlanner(slab_map, cfg(), wide_cone())
    result = planner.plan(world(*TARGET_IJK), np.array([skin_entry(i) for i in (14, 18, 22)]))
    out = render_plan_slice(slab_map, result, tmp_path / 'plan.png', planner=planner, half_width_m=0.03)
    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 300
    # Several distinct colours: structures, path colour map, markers.
    assert len(np.unique(img.reshape(-1, img.shape[-1])[:, :3].round(2), axis=0)) > 20
