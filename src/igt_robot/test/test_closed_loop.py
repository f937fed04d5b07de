"""Closed-loop step decisions (procedure/closed_loop.py) and the core procedure loop."""
import math

import numpy as np
import pytest

from igt_robot.procedure import closed_loop
from igt_robot.simulation.tissue import BevelNeedle, curvature_for_deflection

RCM = np.array([0.0, -0.12, 0.0])
U = np.array([0.0, 1.0, 0.0])


def _needle(deflection, bevel=0.0):
    needle = BevelNeedle(kappa=curvature_for_deflection(deflection), bevel_angle=bevel)
    needle.set_guide(RCM, U)
    return needle


def test_bent_needle_is_turned_by_the_operator_and_the_error_shown():
    truth = _needle(0.004)
    target = RCM + (truth.skin_distance + 0.09) * U
    insertion = truth.skin_distance + 0.035
    tip, _ = truth.tip(insertion)
    stack = _needle(0.003, bevel=math.radians(5.0))          # hub read a little off, average tissue
    est = closed_loop.fit_needle_model(stack, insertion, tip, prior_kappa=0.6)
    decision = closed_loop.decide(rcm=RCM, direction=U, skin_distance=truth.skin_distance, insertion=insertion,
                                  tips=[tip], target=target, push_rate=0.0, next_scheduled=insertion + 0.03,
                                  max_insertion=0.15, prior_kappa=0.6, uncertainty_kappa=0.15, estimate=est,
                                  allow_realign=False)
    assert decision.action == 'rotate'
    assert decision.alternatives['continue'] > 2e-3 > decision.expected_error_m
    assert 'expected error' in decision.describe()
    # carry it out on the true needle: the tip ends near the target
    truth.rotate(insertion, decision.rotation_rad)
    end, _ = truth.tip(decision.final_insertion)
    assert np.linalg.norm(end - target) < 1.5e-3


def test_straight_needle_continues_with_the_depth_of_the_pushed_target():
    truth = _needle(0.0001)
    insertion = truth.skin_distance + 0.04
    tip, _ = truth.tip(insertion)
    target = RCM + (truth.skin_distance + 0.08) * U
    decision = closed_loop.decide(rcm=RCM, direction=U, skin_distance=truth.skin_distance, insertion=insertion,
                                  tips=[tip], target=target, push_rate=0.05, next_scheduled=insertion + 0.02,
                                  max_insertion=0.15, prior_kappa=0.0, uncertainty_kappa=0.1, allow_realign=False,
                                  last_step=True)
    assert decision.action == 'continue'
    # 40 mm to go, 5 % push: the target will be ~2 mm further
    assert decision.final_insertion == pytest.approx(truth.skin_distance + 0.08 + 0.002, abs=0.5e-3)
    assert decision.next_insertion == decision.final_insertion


def test_error_budget_sums_in_quadrature():
    budget = closed_loop.error_budget(tre_m=0.0003, robot_m=0.0004, deflection_m=0.0, target_motion_m=0.0,
                                      final_error_m=0.0006)
    assert budget['open_loop_rss_mm'] == pytest.approx(0.5)
    assert budget['measured_final_error_mm'] == pytest.approx(0.6)


def test_core_procedure_loop_closes_the_loop():
    from igt_robot.simulation.procedure_loop import run_case
    case = run_case(15005, 'CT')
    assert not case.failure, case.failure
    assert case.closed_loop.tip_error_m < case.open_loop.tip_error_m
    assert case.closed_loop.tip_error_m < 2e-3
    assert case.closed_loop.control_scans >= 1 and case.closed_loop.dlp_mgy_cm > 0
    assert set(case.closed_loop.budget) >= {'registration_mm', 'robot_mm', 'deflection_mm', 'target_motion_mm'}


def test_realignment_pre_compensates_the_bend():
    truth = _needle(0.004, bevel=1.0)
    target = RCM + (truth.skin_distance + 0.09) * U
    insertion = truth.skin_distance + 0.06
    stack = _needle(0.003, bevel=1.0)
    est = closed_loop.fit_needle_model(stack, insertion, truth.tip(insertion)[0])
    decision = closed_loop.decide(rcm=RCM, direction=U, skin_distance=truth.skin_distance, insertion=insertion,
                                  tips=[truth.tip(insertion)[0]], target=target, push_rate=0.0,
                                  next_scheduled=insertion + 0.03, max_insertion=0.15, prior_kappa=0.6,
                                  uncertainty_kappa=0.05, estimate=est)
    assert 'realign' in decision.alternatives
    new_u, _, depth = closed_loop._realign(RCM, U, truth.skin_distance, est, target, 0.0)
    with pytest.raises(ValueError, match='retract'):
        truth.set_guide(RCM, new_u, insertion=insertion)       # not with the needle in tissue
    truth.set_guide(RCM, new_u, insertion=truth.skin_distance - 0.002)
    assert np.linalg.norm(truth.tip(truth.skin_distance + depth)[0] - target) < 0.3e-3
