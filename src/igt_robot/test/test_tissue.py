"""The needle in tissue (simulation/tissue.py) and its images: deflection, push, breath-holds, distortion."""
import math

import numpy as np
import pytest

from igt_robot import frames
from igt_robot.imaging.needle import locate_needle
from igt_robot.imaging.phantom import make_phantom
from igt_robot.imaging.target import find_target
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.robot_model import load_robot_model
from igt_robot.simulation.scenario import make_scenario
from igt_robot.simulation.tissue import (BevelNeedle, DistortionField, Respiration, TargetPush,
                                         curvature_for_deflection, make_tissue_model)


def test_bevel_needle_deflects_towards_its_bevel_by_the_set_amount():
    needle = BevelNeedle(kappa=curvature_for_deflection(0.003), bevel_angle=0.0)
    needle.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])
    skin = needle.skin_distance
    assert skin == pytest.approx(0.02, abs=1e-6)          # RCM 20 mm above the skin at y = -0.10
    tip, tangent = needle.tip(skin + 0.1)
    lateral = tip - np.array([0.0, -0.12 + skin + 0.1, 0.0])
    assert np.linalg.norm(lateral) == pytest.approx(0.003, rel=0.02)
    assert lateral[2] > 0.0029                            # bevel angle 0: towards LPS +z for a needle along y
    needle.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])  # same line: same track
    opposite = BevelNeedle(kappa=needle.kappa, bevel_angle=math.pi)
    opposite.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])
    assert opposite.tip(skin + 0.1)[0][2] < -0.0029


def test_operator_turn_halfway_cancels_most_of_the_bend():
    base = BevelNeedle(kappa=curvature_for_deflection(0.004), bevel_angle=0.3)
    base.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])
    turned = BevelNeedle(kappa=base.kappa, bevel_angle=0.3)
    turned.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])
    depth = 0.1
    turned.rotate(base.skin_distance + (1 - 1 / math.sqrt(2)) * depth, math.pi)
    straight = np.array([0.0, -0.12 + base.skin_distance + depth, 0.0])
    assert np.linalg.norm(turned.tip(base.skin_distance + depth)[0] - straight) < 0.2 * np.linalg.norm(
        base.tip(base.skin_distance + depth)[0] - straight)


def test_guide_refuses_to_turn_with_the_needle_in_tissue():
    needle = BevelNeedle(kappa=0.5, bevel_angle=0.0)
    needle.set_guide([0.0, -0.12, 0.0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match='retract'):
        needle.set_guide([0.0, -0.12, 0.0], [0.1, 1.0, 0.0], insertion=0.06)
    needle.set_guide([0.0, -0.12, 0.0], [0.1, 1.0, 0.0], insertion=0.01)   # retracted: allowed


def test_push_respiration_and_distortion_ranges():
    assert TargetPush(0.003).displacement(0.05, 0.1) == pytest.approx(0.0015)
    assert TargetPush(0.003).displacement(0.2, 0.1) == pytest.approx(0.003)
    resp = Respiration(0.01, 0.002, seed=3)
    assert np.allclose(resp.breath_hold(4), resp.breath_hold(4))            # seeded
    sis = np.array([resp.breath_hold(n)[2] for n in range(400)])
    assert np.std(sis) == pytest.approx(0.002, rel=0.15)
    assert resp.free_breathing(0.0)[2] == pytest.approx(-0.01)              # full inhale
    field = DistortionField(0.001, (1.0, -0.6, 0.8))
    assert np.linalg.norm(field.displacement([0.1, 0.0, 0.0])) == pytest.approx(0.001)
    assert np.linalg.norm(field.displacement([0.05, 0.0, 0.0])) == pytest.approx(0.000125)
    p = np.array([0.07, -0.03, 0.04])
    assert np.allclose(field.true_at(field.shown_at(p)), p, atol=1e-7)
    for seed in range(20):
        model = make_tissue_model(seed, 'MR')
        assert 0.001 <= model.deflection_at_100mm <= 0.005 and 0.001 <= model.push.push <= 0.005
        assert 0.005 <= model.respiration.amplitude <= 0.015 and 0.001 <= model.respiration.breath_hold_sd <= 0.003
        assert model.distortion.magnitude <= 0.001
    assert make_tissue_model(0, 'CT').distortion is None


@pytest.mark.parametrize('modality', ['CT', 'MR'])
def test_control_scan_shows_the_bent_needle_and_the_moved_target(modality):
    model = load_robot_model()
    kin = NeedleGuideKinematics(model)
    scenario = make_scenario(4, 0.07, modality, T_base_zframe=model.T_base_zframe, tissue=True,
                             deflection_range=(0.004, 0.004))
    T_base_scanner = frames.invert(scenario.T_scanner_base)
    target_base = frames.apply(T_base_scanner, scenario.target)
    d = np.array([0.08, 1.0, 0.05])
    d /= np.linalg.norm(d)
    ik = kin.inverse(frames.apply(T_base_scanner, scenario.target - 0.06 * d), target_base)
    scenario.breath_hold = 3
    vol, truth = make_phantom(scenario.phantom_spec(model.T_base_zframe, ik.joints, kin))
    straight_tip = frames.apply(scenario.T_scanner_base, kin.forward(ik.joints)[:3, 3])
    assert np.linalg.norm(truth.needle_tip_m - straight_tip) > 0.0015               # it bent
    assert np.linalg.norm(truth.target_center_m - scenario.target) > 0.0005          # the target moved
    rcm, direction = scenario.needle_line(ik.joints, kin)
    found = locate_needle(vol, straight_tip, direction, max_offset_m=0.012)
    assert np.linalg.norm(found.tip - truth.needle_tip_m) < 0.8e-3
    target = find_target(vol, scenario.target, scenario.target_radius)
    assert np.linalg.norm(target - truth.target_center_m) < 0.6e-3
