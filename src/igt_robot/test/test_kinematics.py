"""Forward/inverse kinematics and Jacobian of the needle guide (igt_robot.kinematics)."""
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from igt_robot.kinematics import NeedleGuideKinematics, analytic_direction
from igt_robot.robot_model import default_urdf_path, load_robot_model, parse_robot_model


def _mujoco():
    return pytest.importorskip('mujoco', reason='MuJoCo is needed for the FK cross-check')


@pytest.fixture(scope='module')
def model():
    return load_robot_model()


@pytest.fixture(scope='module')
def kin(model):
    return NeedleGuideKinematics(model)


def random_configs(model, n, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(model.lower, model.upper, size=(n, model.n_joints))


def test_home_configuration(kin):
    t = kin.forward(np.zeros(5))
    np.testing.assert_allclose(t[:3, 3], [0, 0, 0], atol=1e-15)
    np.testing.assert_allclose(kin.needle_direction(np.zeros(5)), [0, 0, -1], atol=1e-15)
    np.testing.assert_allclose(t[:3, :3] @ t[:3, :3].T, np.eye(3), atol=1e-12)


def test_forward_matches_contract_formula(kin, model):
    for q in random_configs(model, 200, seed=1):
        d = np.array([-math.sin(q[3]), math.cos(q[3]) * math.sin(q[2]), -math.cos(q[3]) * math.cos(q[2])])
        t = kin.forward(q)
        np.testing.assert_allclose(t[:3, 2], d, atol=1e-12)
        np.testing.assert_allclose(t[:3, 3], [q[0], q[1], 0] + q[4] * d, atol=1e-12)
        np.testing.assert_allclose(kin.rcm(q), [q[0], q[1], 0.0], atol=1e-12)


def test_forward_agrees_with_mujoco_on_1000_configurations(kin, model):
    mujoco = _mujoco()
    mj_model = mujoco.MjModel.from_xml_string(default_urdf_path().read_text())
    data = mujoco.MjData(mj_model)
    tip = mj_model.body('needle_tip').id
    qadr = [mj_model.joint(name).qposadr[0] for name in model.joint_names]
    worst_pos = worst_axis = 0.0
    for q in random_configs(model, 1000, seed=2):
        data.qpos[qadr] = q
        mujoco.mj_kinematics(mj_model, data)
        t = kin.forward(q)
        worst_pos = max(worst_pos, np.max(np.abs(data.xpos[tip] - t[:3, 3])))
        rotation = data.xmat[tip].reshape(3, 3)
        worst_axis = max(worst_axis, np.max(np.abs(rotation - t[:3, :3])))
    assert worst_pos <= 1e-9
    assert worst_axis <= 1e-9


def test_zframe_in_mujoco_matches_model(model):
    mujoco = _mujoco()
    mj_model = mujoco.MjModel.from_xml_string(default_urdf_path().read_text())
    data = mujoco.MjData(mj_model)
    mujoco.mj_kinematics(mj_model, data)
    np.testing.assert_allclose(data.xpos[mj_model.body('zframe').id], model.T_base_zframe[:3, 3], atol=1e-12)


def test_inverse_round_trip(kin, model):
    rng = np.random.default_rng(3)
    for q in random_configs(model, 500, seed=4):
        t = kin.forward(q)
        tip, d = t[:3, 3], t[:3, 2]
        entry = tip - rng.uniform(0.01, 0.2) * d    # any other point on the needle line
        sol = kin.inverse(entry, tip)
        assert sol.reachable, sol.message
        assert sol.violations == ()
        np.testing.assert_allclose(sol.joints, q, atol=1e-9)
        np.testing.assert_allclose(sol.rcm, [q[0], q[1], 0.0], atol=1e-12)
        np.testing.assert_allclose(sol.direction, d, atol=1e-12)


def test_inverse_on_the_limits_is_reachable(kin, model):
    for q in (model.lower, model.upper):
        q = np.array(q)
        q[4] = 0.1
        t = kin.forward(q)
        sol = kin.inverse(t[:3, 3] - 0.05 * t[:3, 2], t[:3, 3])
        assert sol.reachable, sol.message
        assert np.all(sol.joints >= model.lower) and np.all(sol.joints <= model.upper)


def _line_through(rcm, pitch, yaw, depth):
    """Entry and target on the line through ``rcm`` with direction d(pitch, yaw)."""
    d = analytic_direction(pitch, yaw)
    rcm = np.asarray(rcm, dtype=float)
    return rcm + 0.02 * d, rcm + depth * d


@pytest.mark.parametrize('rcm, pitch, yaw, depth, joint, side, amount', [
    ((0, 0, 0), math.radians(35), 0.0, 0.08, 'guide_pitch', 'upper', math.radians(35) - 0.5236),
    ((0, 0, 0), math.radians(-40), 0.0, 0.08, 'guide_pitch', 'lower', math.radians(40) - 0.5236),
    ((0, 0, 0), 0.0, math.radians(33), 0.08, 'guide_yaw', 'upper', math.radians(33) - 0.5236),
    ((0.05, 0, 0), 0.0, 0.0, 0.08, 'stage_x', 'upper', 0.01),
    ((0, -0.046, 0), 0.0, 0.0, 0.08, 'stage_y', 'lower', 0.006),
    ((0, 0, 0), 0.2, 0.1, 0.17, 'needle_insertion', 'upper', 0.02),
])
def test_each_unreachable_reason(kin, rcm, pitch, yaw, depth, joint, side, amount):
    entry, target = _line_through(rcm, pitch, yaw, depth)
    sol = kin.inverse(entry, target)
    assert not sol.reachable
    assert [v.joint for v in sol.violations] == [joint]
    violation = sol.violations[0]
    assert violation.amount == pytest.approx(amount, abs=1e-9)
    assert f'{joint} beyond {side} limit by' in violation.reason
    assert violation.reason in sol.message


def test_target_above_the_rcm_plane_needs_negative_insertion(kin):
    # Needle pointing down but the target 10 mm above the RCM plane: it lies behind the RCM.
    sol = kin.inverse([0.0, 0.0, 0.03], [0.0, 0.0, 0.01])
    assert not sol.reachable
    assert [v.joint for v in sol.violations] == ['needle_insertion']
    assert sol.violations[0].amount == pytest.approx(0.01)
    assert 'needle_insertion beyond lower limit by 10.0 mm' == sol.violations[0].reason


def test_upward_line_breaks_the_angle_limits(kin):
    sol = kin.inverse([0.0, 0.0, -0.05], [0.0, 0.01, 0.05])
    assert not sol.reachable
    assert 'guide_pitch' in [v.joint for v in sol.violations]


def test_several_violations_are_all_reported(kin):
    entry, target = _line_through((0.06, 0.0, 0.0), math.radians(40), math.radians(-35), 0.2)
    sol = kin.inverse(entry, target)
    assert {v.joint for v in sol.violations} == {'stage_x', 'guide_pitch', 'guide_yaw', 'needle_insertion'}


@pytest.mark.parametrize('entry, target, message', [
    ([0, 0, float('nan')], [0, 0, -0.1], 'entry point is not finite'),
    ([0, 0, 0.01], [0, float('inf'), -0.1], 'target point is not finite'),
    ([0, 0], [0, 0, -0.1], 'entry point must be a 3-vector'),
    ([0.01, 0.02, -0.03], [0.01, 0.02, -0.03], 'coincide'),
    ([0.0, 0.0, -0.03], [0.05, 0.01, -0.03], 'parallel'),
])
def test_invalid_inverse_input(kin, entry, target, message):
    with pytest.raises(ValueError, match=message):
        kin.inverse(entry, target)


@pytest.mark.parametrize('q', [[0, 0, 0, 0], [0, 0, float('nan'), 0, 0]])
def test_invalid_joint_input(kin, q):
    with pytest.raises(ValueError):
        kin.forward(q)
    with pytest.raises(ValueError):
        kin.jacobian(q)


def _rotation_log(r):
    """Axis-angle vector of a small rotation matrix."""
    angle = math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))
    if angle < 1e-12:
        return np.zeros(3)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return angle / (2 * math.sin(angle)) * w


def test_jacobian_matches_finite_differences(kin, model):
    h = 1e-6
    for q in random_configs(model, 50, seed=5):
        jac = kin.jacobian(q)
        assert jac.shape == (6, 5)
        t0 = kin.forward(q)
        for i in range(5):
            dq = np.zeros(5)
            dq[i] = h
            tp, tm = kin.forward(q + dq), kin.forward(q - dq)
            np.testing.assert_allclose(jac[:3, i], (tp[:3, 3] - tm[:3, 3]) / (2 * h), atol=1e-8)
            omega = (_rotation_log(tp[:3, :3] @ t0[:3, :3].T) - _rotation_log(tm[:3, :3] @ t0[:3, :3].T)) / (2 * h)
            np.testing.assert_allclose(jac[3:, i], omega, atol=1e-7)


def test_jacobian_structure(kin):
    jac = kin.jacobian(np.array([0.01, 0.02, 0.1, -0.2, 0.05]))
    # The stage translates, the needle slides along d; none of them rotate the tip.
    np.testing.assert_allclose(jac[3:, [0, 1, 4]], 0.0, atol=1e-15)
    np.testing.assert_allclose(jac[:3, 0], [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(jac[:3, 4], kin.needle_direction(np.array([0.01, 0.02, 0.1, -0.2, 0.05])))


def test_joint_limit_margin(kin, model):
    assert kin.joint_limit_margin(0.5 * (model.lower + model.upper)) == pytest.approx(0.5)
    q = np.array([0.0, 0.0, 0.0, 0.0, 0.15])
    assert kin.joint_limit_margin(q) == pytest.approx(0.0)
    q[2] = 0.6
    assert kin.joint_limit_margin(q) < 0


def test_urdf_that_is_not_an_rcm_guide_is_rejected():
    root = ET.fromstring(default_urdf_path().read_text())
    for el in root.findall('joint'):
        if el.get('name') == 'guide_yaw':
            el.find('axis').set('xyz', '0 0 1')       # yaw about z: not the contract's structure
    with pytest.raises(ValueError, match='not the RCM needle guide'):
        NeedleGuideKinematics(parse_robot_model(ET.tostring(root, encoding='unicode')))
