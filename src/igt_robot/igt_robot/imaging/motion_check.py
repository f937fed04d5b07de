"""Patient-motion check: rigid image-to-image registration of a later scan to the
planning scan, reported as the displacement of the planned target.

SimpleITK ``ImageRegistrationMethod`` with a Euler3D transform, Mattes mutual
information (works across CT/MR contrast changes and intensity rescaling),
regular-step gradient descent and a 3-level pyramid. ITK works in mm; inputs and
outputs here are scanner LPS metres, converted through :mod:`igt_robot.units`.

The resulting transform maps planning-scan points to later-scan points
(ITK's fixed->moving convention with the planning scan as the fixed image):
the anatomy that was at ``target`` during planning is now at ``T(target)``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import ndimage

from igt_robot import frames, units
from igt_robot.imaging.errors import ImageError
from igt_robot.imaging.needle import body_mask, body_threshold
from igt_robot.imaging.volume import Volume, validate_intensities

DEFAULT_MOTION_THRESHOLD_M = units.mm_to_m(2.0)


@dataclasses.dataclass
class MotionCheckResult:
    """``T_later_planning`` maps planning-scan scanner points (m) to where the same
    anatomy is in the later scan; ``displacement_m`` is |T(target) - target|."""

    displacement_m: float
    displacement_vector_m: np.ndarray
    moved: bool
    threshold_m: float
    T_later_planning: np.ndarray
    rotation_deg: float
    metric: float
    iterations: int
    stop_condition: str


def crop_around(volume: Volume, center_m, half_size_m):
    """Sub-volume covering a cube of half-size ``half_size_m`` around a scanner
    point (clipped to the grid). Raises ImageError when the point is far outside."""
    c_idx = volume.scanner_to_index(np.asarray(center_m, float))
    half = np.ceil(half_size_m / volume.spacing).astype(int)
    shape_ijk = np.array(volume.data.shape[::-1])
    lo = np.clip(np.floor(c_idx).astype(int) - half, 0, shape_ijk)
    hi = np.clip(np.ceil(c_idx).astype(int) + half + 1, 0, shape_ijk)
    if np.any(hi - lo < 4):
        raise ImageError(f'target {np.round(units.m_to_mm(center_m), 1).tolist()} mm is outside the scan')
    data = volume.data[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_scanner(lo.astype(float))
    return Volume(np.ascontiguousarray(data), affine, volume.modality, dict(volume.metadata))


ANATOMY_MARGIN_M = units.mm_to_m(20.0)


def anatomy_mask(volume: Volume, margin_m: float = ANATOMY_MARGIN_M):
    """Where the metric may sample: the body plus ``margin_m`` of air around it
    (a mask edge cutting through the skin's intensity edge biases the result by
    a few tenths of a mm), minus anything bright outside the body (Z-frame
    rods, robot parts), which does not move with the patient."""
    body = body_mask(volume)
    if not body.any():
        return body
    sp = volume.spacing
    near = ndimage.distance_transform_edt(~body, sampling=(sp[2], sp[1], sp[0])) <= margin_m
    smoothed = ndimage.uniform_filter(volume.data.astype(np.float32), size=3)
    # "outside" keeps a 2-voxel gap to the body: the body mask's opening shaves
    # the skin rim, which must not count as foreign
    outside = ~ndimage.binary_dilation(body, iterations=2)
    foreign = ndimage.binary_dilation((smoothed > body_threshold(volume, smoothed)) & outside, iterations=2)
    return near & ~foreign


def check_motion(planning: Volume, later: Volume, target_scanner, *,
                 threshold_m: float = DEFAULT_MOTION_THRESHOLD_M, roi_half_size_m: float = 0.06,
                 max_motion_m: float = 0.02, mask: Optional[Volume] = None, use_body_mask: bool = True,
                 sampling_fraction: float = 0.2, seed: int = 1,
                 pyramid_shrink_factors=(4, 2), pyramid_smoothing_mm=(2.0, 1.0)) -> MotionCheckResult:
    """Register ``later`` to ``planning`` (rigid) and report the target displacement.

    Only a cube of half-size ``roi_half_size_m`` around the target is used from
    the planning scan (and that plus ``max_motion_m`` from the later scan):
    what matters is the anatomy around the target, and parts that did not move
    with the patient (robot, Z-frame, table) must not pull the answer. ``mask``
    (optional binary volume on the planning grid) restricts the metric further;
    without one, :func:`anatomy_mask` is used when ``use_body_mask`` (body plus
    a 20 mm margin, minus bright things outside the body such as the Z-frame).
    ``moved`` is True when the displacement exceeds ``threshold_m`` (default 2 mm).

    The pyramid stops at half resolution by default: the check decides about
    millimetres, and the full-resolution level tripled its time (2.6 s against
    0.8 s for a 1 x 1 x 1.5 mm CT around the target) for no gain in accuracy
    (errors 0.06-0.12 mm either way, on simulated motion of 2-3 mm).
    """
    import SimpleITK as sitk
    validate_intensities(planning)
    validate_intensities(later)
    target = np.asarray(target_scanner, float).reshape(3)
    fixed_volume = crop_around(planning, target, roi_half_size_m)
    moving_volume = crop_around(later, target, roi_half_size_m + max_motion_m)
    fixed = sitk.Cast(fixed_volume.to_sitk(), sitk.sitkFloat32)
    moving = sitk.Cast(moving_volume.to_sitk(), sitk.sitkFloat32)

    # Both scans live in the same scanner frame, so the prior is "no motion":
    # start from identity, rotating about the target (where the answer must be
    # best conditioned; rotation and translation decouple there).
    centre_mm = tuple(float(c) for c in units.m_to_mm(target))
    euler = sitk.Euler3DTransform()
    euler.SetCenter(centre_mm)

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    if sampling_fraction < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling_fraction, seed)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    if mask is not None:
        if mask.data.shape != planning.data.shape:
            raise ImageError('motion-check mask must be on the planning grid')
        cropped = crop_around(mask.with_data((mask.data > 0).astype(np.uint8)), target, roi_half_size_m)
        reg.SetMetricFixedMask(sitk.Cast(cropped.to_sitk(), sitk.sitkUInt8))
    elif use_body_mask:
        anatomy = anatomy_mask(fixed_volume)
        if anatomy.any():
            reg.SetMetricFixedMask(sitk.Cast(fixed_volume.with_data(anatomy.astype(np.uint8)).to_sitk(),
                                             sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(pyramid_shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(pyramid_smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(euler, inPlace=False)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise ImageError(f'motion-check registration failed: {exc}') from exc
    moved_target = units.mm_to_m(np.array(result.TransformPoint(centre_mm)))
    # the full rigid transform, for callers that want to re-map a plan
    final = _as_euler(result)
    R = np.array(final.GetMatrix()).reshape(3, 3)
    t_mm = np.array(final.GetTranslation()) + np.array(final.GetCenter()) - R @ np.array(final.GetCenter())
    T = frames.make_transform(R, units.mm_to_m(t_mm))
    vector = moved_target - target
    displacement = float(np.linalg.norm(vector))
    return MotionCheckResult(
        displacement_m=displacement, displacement_vector_m=vector, moved=displacement > threshold_m,
        threshold_m=threshold_m, T_later_planning=T, rotation_deg=float(np.degrees(frames.rotation_angle(R))),
        metric=float(reg.GetMetricValue()), iterations=int(reg.GetOptimizerIteration()),
        stop_condition=reg.GetOptimizerStopConditionDescription())


def _as_euler(transform):
    """The Euler3D transform inside a registration result (possibly a composite)."""
    import SimpleITK as sitk
    while transform.GetName() == 'CompositeTransform':
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise ImageError('unexpected composite transform from the motion-check registration')
        transform = composite.GetNthTransform(0)
    return sitk.Euler3DTransform(transform)
