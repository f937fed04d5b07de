"""URDF parsing, joint limits and limit messages (igt_robot.robot_model)."""
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from igt_robot import robot_model
from igt_robot.robot_model import (JOINT_NAMES, URDFError, default_urdf_path, format_joint_quantity,
                                   load_robot_model, parse_robot_model)

REPO_URDF = Path(__file__).resolve().parents[3] / 'urdf' / 'igt_robot.urdf'


@pytest.fixture(scope='module')
def model():
    return load_robot_model()


@pytest.fixture(scope='module')
def urdf_text():
    return REPO_URDF.read_text()


def test_default_path_is_the_repository_urdf():
    assert default_urdf_path().resolve() == REPO_URDF.resolve()


def test_joints_limits_and_zframe_match_the_contract(model):
    assert model.joint_names == JOINT_NAMES == (
        'stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
    assert model.joint_types == ('prismatic', 'prismatic', 'revolute', 'revolute', 'prismatic')
    np.testing.assert_allclose(model.lower, [-0.04, -0.04, -0.5236, -0.5236, 0.0])
    np.testing.assert_allclose(model.upper, [0.04, 0.04, 0.5236, 0.5236, 0.150])
    np.testing.assert_allclose(model.velocity, [0.010, 0.010, 0.20, 0.20, 0.005])
    assert np.all(model.effort > 0)
    # The Z-frame sits 80 mm along base y and 30 mm above the RCM plane, turned -90 deg about x so that
    # its rods (its z axis) run along the base's y axis: parallel to the scanner bore when the robot is
    # mounted with base y along the patient's long axis.
    expected = np.eye(4)
    expected[:3, :3] = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
    expected[:3, 3] = [0.0, 0.080, 0.030]
    np.testing.assert_allclose(model.T_base_zframe, expected, atol=1e-12)
    assert model.chain[0].parent == 'base_link' and model.chain[-1].child == 'needle_tip'


def test_arrays_are_read_only(model):
    with pytest.raises(ValueError):
        model.upper[0] = 1.0
    with pytest.raises(ValueError):
        model.T_base_zframe[0, 3] = 1.0


def test_limit_violation_messages_name_joint_side_and_amount(model):
    q = np.array([-0.0425, 0.0, model.upper[2] + math.radians(4.0), 0.0, 0.16])
    violations = model.limit_violations(q)
    assert [v.joint for v in violations] == ['stage_x', 'guide_pitch', 'needle_insertion']
    assert [v.reason for v in violations] == [
        'stage_x beyond lower limit by 2.5 mm',
        'guide_pitch beyond upper limit by 4.0°',
        'needle_insertion beyond upper limit by 10.0 mm',
    ]
    assert violations[1].amount == pytest.approx(math.radians(4.0))
    assert model.limit_violations(0.5 * (model.lower + model.upper)) == []
    # Exactly on a limit is inside.
    assert model.limit_violations(model.upper) == []


def test_format_joint_quantity():
    assert format_joint_quantity('revolute', math.radians(12.3)) == '12.3°'
    assert format_joint_quantity('revolute', math.radians(0.01)) == '0.01°'
    assert format_joint_quantity('prismatic', 0.0025) == '2.5 mm'
    assert format_joint_quantity('prismatic', 2e-6) == '0.002 mm'
    with pytest.raises(ValueError):
        format_joint_quantity('continuous', 1.0)


def test_clip_and_margin(model):
    q = np.array([0.1, -0.1, 1.0, -1.0, -0.5])
    np.testing.assert_array_equal(model.clip_to_limits(q), [0.04, -0.04, 0.5236, -0.5236, 0.0])
    centre = 0.5 * (model.lower + model.upper)
    assert model.joint_limit_margin(centre) == pytest.approx(0.5)
    assert model.joint_limit_margin(model.lower) == pytest.approx(0.0)
    assert model.joint_limit_margin(q) < 0
    assert model.within_limits(centre) and not model.within_limits(q)


@pytest.mark.parametrize('bad', [np.zeros(4), np.zeros((5, 1)), [0, 0, float('nan'), 0, 0], [0, 0, 0, float('inf'), 0]])
def test_bad_joint_vectors_are_rejected(model, bad):
    with pytest.raises(ValueError):
        model.limit_violations(bad)


def test_joint_index(model):
    assert model.joint_index('guide_yaw') == 3
    with pytest.raises(KeyError, match='unknown joint'):
        model.joint_index('elbow')


# ---------------------------------------------------------------- malformed URDFs

def _edit_joint(text, joint, fn):
    root = ET.fromstring(text)
    for el in root.findall('joint'):
        if el.get('name') == joint:
            fn(el)
    return ET.tostring(root, encoding='unicode')


def test_missing_limit_is_reported(urdf_text):
    text = _edit_joint(urdf_text, 'guide_yaw', lambda el: el.remove(el.find('limit')))
    with pytest.raises(URDFError, match="guide_yaw.*limit"):
        parse_robot_model(text)


def test_inverted_limits_are_reported(urdf_text):
    def invert(el):
        el.find('limit').set('lower', '0.3')
        el.find('limit').set('upper', '-0.3')
    with pytest.raises(URDFError, match='guide_pitch.*lower limit'):
        parse_robot_model(_edit_joint(urdf_text, 'guide_pitch', invert))


def test_renamed_joint_breaks_the_contract_order(urdf_text):
    text = _edit_joint(urdf_text, 'stage_y', lambda el: el.set('name', 'stage_b'))
    with pytest.raises(URDFError, match='contract joint order'):
        parse_robot_model(text)


def test_unsupported_joint_type(urdf_text):
    text = _edit_joint(urdf_text, 'stage_x', lambda el: el.set('type', 'floating'))
    with pytest.raises(URDFError, match="type 'floating'"):
        parse_robot_model(text)


def test_not_xml_and_missing_file(tmp_path):
    with pytest.raises(URDFError, match='not well-formed'):
        parse_robot_model('<robot><link name="a"></robot>')
    with pytest.raises(FileNotFoundError):
        load_robot_model(tmp_path / 'nope.urdf')


def test_default_path_search_reports_locations(monkeypatch, tmp_path):
    fake_module = tmp_path / 'a' / 'b' / 'robot_model.py'
    monkeypatch.setattr(robot_model, '__file__', str(fake_module))
    monkeypatch.setattr(robot_model.sys, 'prefix', str(tmp_path / 'prefix'))
    with pytest.raises(FileNotFoundError, match='looked in'):
        default_urdf_path()
    installed = tmp_path / 'prefix' / 'share' / 'igt_robot' / 'urdf' / 'igt_robot.urdf'
    installed.parent.mkdir(parents=True)
    installed.write_text(REPO_URDF.read_text())
    assert default_urdf_path() == installed


# ---------------------------------------------------------------- URDF content beyond the chain

def test_every_moving_link_has_inertial_visual_and_collision(urdf_text):
    root = ET.fromstring(urdf_text)
    links = {el.get('name'): el for el in root.findall('link')}
    for name in ('stage_x_link', 'stage_y_link', 'pitch_link', 'yaw_link', 'needle_link'):
        link = links[name]
        mass = float(link.find('inertial/mass').get('value'))
        assert 0.005 < mass < 1.0, name
        inertia = link.find('inertial/inertia')
        assert all(float(inertia.get(k)) > 0 for k in ('ixx', 'iyy', 'izz')), name
        assert link.findall('visual') and link.findall('collision'), name
    # primitives only
    assert root.find('.//mesh') is None


def test_gazebo_and_ros2_control_tags(urdf_text):
    root = ET.fromstring(urdf_text)
    plugins = [p.get('filename') for p in root.findall('gazebo/plugin')]
    assert 'gz_ros2_control-system' in plugins
    control = root.find('ros2_control')
    joints = [j.get('name') for j in control.findall('joint')]
    assert tuple(joints) == JOINT_NAMES
    for j in control.findall('joint'):
        assert j.find('command_interface').get('name') == 'position'
    compiler = root.find('mujoco/compiler')
    assert compiler.get('fusestatic') == 'false' and compiler.get('discardvisual') == 'false'
