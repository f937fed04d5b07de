"""Patient-motion check between the planning scan and a later scan."""
import numpy as np
import pytest

from igt_robot import frames
from igt_robot.imaging import ImageError, check_motion, make_phantom
from igt_robot.imaging.motion_check import crop_around
from igt_robot.imaging.phantom import PhantomSpec, rotation_from_euler_deg

# coarse 2 mm grid: the check is about millimetres of motion, and it keeps the test fast
GRID = dict(spacing_m=(0.002, 0.002, 0.002), shape_kji=(40, 70, 70), center_m=(0.0, -0.06, 0.0))


def scan(seed, T_anatomy=None, modality='CT'):
    spec = PhantomSpec(modality=modality, seed=seed, **GRID)
    if T_anatomy is not None:
        spec.T_anatomy = T_anatomy
    return make_phantom(spec)


@pytest.fixture(scope='module')
def planning():
    return scan(1)


def test_no_motion_not_flagged(planning):
    vol, truth = planning
    later, _ = scan(2)                     # same anatomy, new noise
    result = check_motion(vol, later, truth.target_center_m)
    assert not result.moved
    assert result.displacement_m < 0.2e-3
    assert result.threshold_m == pytest.approx(0.002)


def test_motion_beyond_threshold_flagged(planning):
    vol, truth = planning
    T = frames.make_transform(rotation_from_euler_deg(1.0, -1.5, 2.0), (0.002, 0.0015, -0.001))
    later, moved_truth = scan(3, T)
    true_disp = np.linalg.norm(moved_truth.target_center_m - truth.target_center_m)
    assert true_disp > 0.003
    result = check_motion(vol, later, truth.target_center_m)
    assert result.moved
    assert abs(result.displacement_m - true_disp) < 0.3e-3
    # the reported vector points where the target went
    assert np.linalg.norm(truth.target_center_m + result.displacement_vector_m - moved_truth.target_center_m) < 0.3e-3
    # and the full transform maps the planning target onto its new place
    assert np.linalg.norm(frames.apply(result.T_later_planning, truth.target_center_m)
                          - moved_truth.target_center_m) < 0.3e-3


def test_small_motion_measured_but_not_flagged(planning):
    vol, truth = planning
    T = frames.make_transform(np.eye(3), (0.0, 0.0, 0.001))
    later, _ = scan(4, T)
    result = check_motion(vol, later, truth.target_center_m)
    assert not result.moved
    assert abs(result.displacement_m - 0.001) < 0.2e-3


def test_frame_motion_alone_is_not_patient_motion(planning):
    """The robot's Z-frame moved, the patient did not: nothing to flag."""
    vol, truth = planning
    spec = PhantomSpec(modality='CT', seed=6, **GRID)
    spec.T_scanner_zframe = frames.make_transform(np.eye(3), (0.0, -0.13, 0.004))
    later, _ = make_phantom(spec)
    result = check_motion(vol, later, truth.target_center_m)
    assert not result.moved and result.displacement_m < 0.3e-3


def test_mr_motion_detected():
    plan, truth = scan(1, modality='MR')
    T = frames.make_transform(np.eye(3), (0.0, 0.0025, 0.0))
    later, _ = scan(2, T, modality='MR')
    result = check_motion(plan, later, truth.target_center_m)
    assert result.moved and abs(result.displacement_m - 0.0025) < 0.3e-3


def test_target_outside_scan_and_bad_input(planning):
    vol, _ = planning
    with pytest.raises(ImageError, match='outside the scan'):
        check_motion(vol, vol, (1.0, 1.0, 1.0))
    with pytest.raises(ImageError, match='constant'):
        check_motion(vol, vol.with_data(np.full_like(vol.data, 5.0)), (0.0, -0.06, 0.0))


def test_crop_keeps_geometry(planning):
    vol, truth = planning
    sub = crop_around(vol, truth.target_center_m, 0.01)
    assert sub.data.shape[0] < vol.data.shape[0]
    p = np.array([1.0, 2.0, 3.0])
    assert np.isclose(float(sub.data[3, 2, 1]), float(vol.data[tuple(np.rint(vol.scanner_to_index(
        sub.index_to_scanner(p))).astype(int)[::-1])]))
