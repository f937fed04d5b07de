"""Point-fiducial registration: rigid fit, TRE prediction, correspondence, detection, outliers."""
import itertools

import numpy as np
import pytest

from igt_robot import frames
from igt_robot.imaging import (DEFAULT_FIDUCIALS_ZFRAME, ImageError, make_phantom, predicted_tre,
                               register_fiducials, register_image, rigid_fit)
from igt_robot.imaging.fiducials import detect_spherical_markers, is_collinear, match_fiducials
from igt_robot.imaging.phantom import random_rotation, registration_case
from igt_robot.robot_model import load_robot_model

# The Z-frame mounting on the robot comes from the URDF only (contracts.md), never a copy of its numbers.
T_BASE_ZFRAME = load_robot_model().T_base_zframe


def random_transform(rng, max_deg=30.0, max_shift=0.05):
    return frames.make_transform(random_rotation(rng, max_deg), rng.uniform(-max_shift, max_shift, 3))


def test_rigid_fit_exact_and_no_reflection():
    rng = np.random.default_rng(0)
    T = random_transform(rng)
    P = DEFAULT_FIDUCIALS_ZFRAME
    assert np.allclose(rigid_fit(P, frames.apply(T, P)), T, atol=1e-12)
    # a mirrored point set: the best *proper* rotation is returned, never det = -1
    mirrored = P * np.array([-1.0, 1.0, 1.0])
    R = rigid_fit(P, mirrored)[:3, :3]
    assert np.isclose(np.linalg.det(R), 1.0)
    with pytest.raises(ValueError):
        rigid_fit(P[:2], P[:2])


def test_collinearity():
    line = np.array([[0, 0, 0], [0.01, 0, 0], [0.03, 0, 0], [0.05, 0.0001, 0]])
    assert is_collinear(line)
    assert not is_collinear(DEFAULT_FIDUCIALS_ZFRAME)


def test_predicted_tre_matches_monte_carlo():
    """The Fitzpatrick-West-Maurer prediction agrees with simulation (isotropic FLE)."""
    rng = np.random.default_rng(1)
    P = DEFAULT_FIDUCIALS_ZFRAME
    target = np.array([0.0, 0.080, 0.0])
    fle = 0.5e-3                                       # RMS over 3-D
    errors = []
    for _ in range(4000):
        noisy = P + rng.normal(0.0, fle / np.sqrt(3.0), P.shape)
        T = rigid_fit(P, noisy)
        errors.append(np.sum((frames.apply(T, target) - target) ** 2))
    simulated = np.sqrt(np.mean(errors))
    assert predicted_tre(P, target, fle) == pytest.approx(simulated, rel=0.1)
    # farther targets are predicted worse
    assert predicted_tre(P, 2 * target, fle) > predicted_tre(P, target, fle)


def test_match_fiducials_permuted_with_spurious_and_missing():
    rng = np.random.default_rng(2)
    T = random_transform(rng)
    P = DEFAULT_FIDUCIALS_ZFRAME
    observed = frames.apply(T, P) + rng.normal(0, 0.1e-3, P.shape)
    order = rng.permutation(len(P))
    detected = np.vstack([observed[order][1:], [[0.3, 0.2, 0.1]]])   # one missing, one spurious
    pairs, T_est = match_fiducials(P, detected)
    assert len(pairs) == len(P) - 1
    for m, d in pairs:
        assert order[d + 1] == m
    assert np.linalg.norm(T_est[:3, 3] - T[:3, 3]) < 0.5e-3


def test_default_marker_set_is_unambiguous():
    d = sorted(np.linalg.norm(a - b) for a, b in itertools.combinations(DEFAULT_FIDUCIALS_ZFRAME, 2))
    assert np.min(np.diff(d)) > 3e-3


@pytest.mark.parametrize('modality, slice_mm, seed', [('CT', 1.0, 1), ('MR', 3.0, 2)])
def test_register_fiducials_on_phantom(modality, slice_mm, seed):
    spec = registration_case(np.random.default_rng(seed), modality, slice_mm,
                             fiducials_zframe=DEFAULT_FIDUCIALS_ZFRAME)
    spec.shape_kji = (spec.shape_kji[0] + 8, spec.shape_kji[1] + 16, spec.shape_kji[2] + 16)   # room for markers
    vol, truth = make_phantom(spec)
    detected = detect_spherical_markers(vol)
    assert len(detected) == len(DEFAULT_FIDUCIALS_ZFRAME)      # rods, needle-free body ignored
    for p in truth.fiducials_m:
        assert np.min(np.linalg.norm(detected - p, axis=1)) < 0.2e-3
    result = register_fiducials(vol, target_scanner=truth.target_center_m)
    assert result.accepted, result.reason
    assert result.fiducial_count == 5 and not result.outliers
    T_true = truth.T_scanner_zframe     # the markers are defined in the zframe frame
    target = truth.target_center_m
    err = np.linalg.norm(frames.apply(result.T_scanner_model, frames.apply(frames.invert(T_true), target)) - target)
    assert err < 0.3e-3
    assert 0.0 < result.fre_m < 0.3e-3
    assert 0.0 < result.tre_predicted_m < 1.0e-3

    outcome = register_image(vol, 'fiducials', T_BASE_ZFRAME, target_scanner=target)
    assert outcome.accepted and outcome.fiducial_count == 5
    expected = T_BASE_ZFRAME @ frames.invert(T_true)
    assert np.linalg.norm(frames.apply(outcome.T_base_scanner, target) - frames.apply(expected, target)) < 0.3e-3


def test_outlier_marker_is_rejected():
    rng = np.random.default_rng(4)
    spec = registration_case(rng, 'CT', 1.0, fiducials_zframe=DEFAULT_FIDUCIALS_ZFRAME)
    spec.shape_kji = (spec.shape_kji[0] + 8, spec.shape_kji[1] + 16, spec.shape_kji[2] + 16)
    displaced = np.array(spec.fiducials_m, float)
    displaced[2] += [0.004, -0.002, 0.0]          # a marker knocked 4.5 mm off its seat
    spec.fiducials_m = displaced
    vol, truth = make_phantom(spec)
    result = register_fiducials(vol, target_scanner=truth.target_center_m, match_tol_m=5e-3)
    assert result.accepted, result.reason
    assert [pair[0] for pair, _ in result.outliers] == [2]
    assert result.fiducial_count == 4
    target = truth.target_center_m
    T_true = truth.T_scanner_zframe
    err = np.linalg.norm(frames.apply(result.T_scanner_model, frames.apply(frames.invert(T_true), target)) - target)
    assert err < 0.3e-3


def test_too_few_markers_rejected():
    spec = registration_case(np.random.default_rng(6), 'CT', 3.0, fiducials_zframe=DEFAULT_FIDUCIALS_ZFRAME[:2])
    vol, _ = make_phantom(spec)
    result = register_fiducials(vol)
    assert not result.accepted and result.T_scanner_model is None
    assert result.reason.startswith('only ') and 'need ≥ 3' in result.reason
    outcome = register_image(vol, 'fiducials', T_BASE_ZFRAME)
    assert not outcome.accepted and outcome.T_base_scanner is None


def test_markers_that_do_not_match_model_rejected():
    """Three markers in the wrong arrangement: detected but no model triangle fits."""
    spec = registration_case(np.random.default_rng(7), 'CT', 3.0,
                             fiducials_zframe=np.array([[-0.05, -0.04, 0.0], [0.05, -0.04, 0.0], [0.0, -0.045, 0.03]]))
    vol, _ = make_phantom(spec)
    result = register_fiducials(vol)
    assert not result.accepted and 'match the model' in result.reason


def test_predicted_tre_gate_rejects_far_target():
    spec = registration_case(np.random.default_rng(1), 'CT', 3.0, fiducials_zframe=DEFAULT_FIDUCIALS_ZFRAME)
    spec.shape_kji = (spec.shape_kji[0] + 8, spec.shape_kji[1] + 16, spec.shape_kji[2] + 16)
    vol, truth = make_phantom(spec)
    far = truth.T_scanner_zframe[:3, 3] + np.array([0.0, 5.0, 0.0])        # 5 m away: huge lever arm
    outcome = register_image(vol, 'fiducials', T_BASE_ZFRAME, target_scanner=far)
    assert not outcome.accepted and 'predicted TRE' in outcome.reason and outcome.T_base_scanner is None


def test_fiducials_bad_volume():
    spec = registration_case(np.random.default_rng(6), 'CT', 3.0)
    vol, _ = make_phantom(spec)
    with pytest.raises(ImageError, match='constant'):
        register_fiducials(vol.with_data(np.full_like(vol.data, 3.0)))
