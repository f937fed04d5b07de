"""The simulated patient and robot mounting: the ground truth of a simulated procedure.

A :class:`Scenario` fixes what the stack must discover from images:

* ``T_scanner_base`` -- where the robot really sits in the scanner (nominal
  mounting on the patient's abdomen, perturbed by a random few degrees and
  millimetres). The stack never reads it: registration estimates it from the
  Z-frame in the planning scan.
* the target lesion and the critical structures around it (a vessel and a bone
  laid out so the straight path from above is blocked and the planner must
  find another one).

Nominal mounting (patient supine, robot on the abdomen): base x = patient left
(LPS +x), base y = superior (LPS +z), base z = anterior (LPS -y), so the needle
(-z of the base at zero angulation) points posterior, into the patient. The
Z-frame's rods (its z axis) then run along the bore (LPS z).

Everything here is scanner LPS metres. No rclpy.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from igt_robot import frames
from igt_robot.imaging.phantom import PhantomSpec, Tube, random_rotation
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.simulation.tissue import TissueModel, make_tissue_model, organ_hold

# R_scanner_base of the nominal mounting: Rx(+90 deg).
R_SCANNER_BASE_NOMINAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
# The Z-frame's nominal place in the scanner: on the midline, 40 mm anterior of the skin.
ZFRAME_NOMINAL_SCANNER = np.array([0.0, -0.140, 0.0])
BODY_SEMI_AXES = (0.15, 0.10)          # LPS x, y of the abdomen's elliptic cross-section (m)
SKIN_Y = -BODY_SEMI_AXES[1]            # anterior skin on the midline (LPS y, m)


@dataclasses.dataclass
class Scenario:
    """Ground truth of one simulated procedure (scanner LPS, m)."""

    T_scanner_base: np.ndarray          # the robot's true mounting
    target: np.ndarray                  # centre of the target lesion
    target_radius: float
    vessels: list                       # [Tube]
    bones: list                         # [Tube]
    modality: str = 'CT'
    fov_center: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    fov_size: tuple = (0.12, 0.15, 0.20)        # LPS x, y, z extent of the scans (m)
    spacing: tuple = (0.001, 0.001, 0.0015)     # i, j, k voxel size (m): 1 mm in-plane, 1.5 mm slices
    seed: int = 0
    # the needle in tissue (deflection, target push, respiration, MR distortion); None = a rigid world
    tissue: Optional[TissueModel] = None
    breath_hold: int = 0                        # index of the current breath-hold (respiration)
    reference_breath_hold: int = 1              # the planning scan's: the needle model's organ position

    def organ_shift(self) -> np.ndarray:
        """Breathing offset of the organ now against the planning scan's breath-hold (LPS, m)."""
        if self.tissue is None:
            return np.zeros(3)
        resp = self.tissue.respiration
        return resp.breath_hold(self.breath_hold) - resp.breath_hold(self.reference_breath_hold)

    def needle_line(self, joints, kinematics):
        """The guide's RCM and needle direction in the scanner (true mounting) for measured joints."""
        q = np.asarray(joints, dtype=float)
        T_base_tip = kinematics.forward(q)
        direction = T_base_tip[:3, 2]
        rcm = T_base_tip[:3, 3] - q[-1] * direction
        return frames.apply(self.T_scanner_base, rcm), frames.rotate(self.T_scanner_base, direction)

    def needle_state(self, joints, kinematics):
        """(centre line from RCM to tip, tip, tip tangent) of the needle now (scanner, m)."""
        rcm, direction = self.needle_line(joints, kinematics)
        if self.tissue is None:
            tip = rcm + float(joints[-1]) * direction
            return np.stack([rcm, tip]), tip, direction
        needle = self.tissue.needle
        if np.linalg.norm(rcm - needle.rcm) > 1e-6 or float(direction @ needle.direction) < 1.0 - 1e-10:
            deep = needle.tissue_depth(float(joints[-1])) > 0.001
            moved = np.linalg.norm(rcm - needle.rcm) > 2e-4 or float(direction @ needle.direction) < np.cos(
                np.radians(0.2))
            if not deep or moved or not needle.placed:
                needle.set_guide(rcm, direction, float(joints[-1]), strict=False)
        path, tip, tangent = needle.path(float(joints[-1]))
        # the part in the organ follows its breathing (pivoting about the skin entry): lateral part only,
        # the organ slides along the shaft
        depth = needle.tissue_depth(float(joints[-1]))
        shift = self.organ_shift()
        shift = shift - (shift @ needle.direction) * needle.direction
        if depth > 0.0 and np.any(shift):
            entry = needle.rcm + needle.skin_distance * needle.direction
            s = np.clip((path - entry) @ needle.direction, 0.0, None) / depth
            path = path + (organ_hold(depth) * s)[:, None] * shift
            tip = path[-1]
        return path, tip, tangent

    def target_now(self, joints=None, kinematics=None) -> np.ndarray:
        """Where the lesion is now: at rest, plus this breath-hold's offset, plus the push of the needle."""
        if self.tissue is None:
            return self.target.copy()
        target = self.target + self.tissue.respiration.breath_hold(self.breath_hold)
        if joints is not None and kinematics is not None and float(joints[-1]) > 0.0:
            _, tip, tangent = self.needle_state(joints, kinematics)
            entry = self.tissue.needle.rcm + self.tissue.needle.skin_distance * self.tissue.needle.direction
            along = self.tissue.needle.direction
            target = target + self.tissue.push.displacement(float((tip - entry) @ along),
                                                            float((target - entry) @ along)) * tangent
        return target

    def zframe_pose(self, T_base_zframe: np.ndarray) -> np.ndarray:
        return self.T_scanner_base @ T_base_zframe

    def phantom_spec(self, T_base_zframe: np.ndarray, joints: Optional[np.ndarray] = None,
                     kinematics: Optional[NeedleGuideKinematics] = None, scan_index: int = 0) -> PhantomSpec:
        """What the scanner sees: the frame, the anatomy and, when ``joints`` is given, the needle.

        The needle is drawn where the robot really holds it: forward kinematics of
        the measured joints, through the *true* mounting.
        """
        shape = tuple(int(round(size / step)) for size, step in
                      zip(self.fov_size[::-1], self.spacing[::-1]))   # (k, j, i)
        target = self.target_now(joints, kinematics) if kinematics is not None else self.target_now()
        # respiration and push move the lesion (the rest of the drawn anatomy stays: it only gives context)
        spec = PhantomSpec(
            modality=self.modality, shape_kji=shape, spacing_m=self.spacing, center_m=tuple(self.fov_center),
            T_scanner_zframe=self.zframe_pose(T_base_zframe), body_semi_axes_m=BODY_SEMI_AXES,
            target_center_m=tuple(target), target_radius_m=self.target_radius,
            vessels=list(self.vessels), bones=list(self.bones), seed=self.seed * 1000 + scan_index,
            distortion=self.tissue.distortion if self.tissue is not None else None)
        if joints is not None and kinematics is not None and joints[-1] > 0.002 and self.tissue is not None:
            path, tip, tangent = self.needle_state(joints, kinematics)
            spec.needle_path_m, spec.needle_tip_m, spec.needle_direction = path, tuple(tip), tuple(tangent)
        elif joints is not None and kinematics is not None and joints[-1] > 0.002:
            T_base_tip = kinematics.forward(np.asarray(joints, dtype=float))
            spec.needle_tip_m = tuple(frames.apply(self.T_scanner_base, T_base_tip[:3, 3]))
            spec.needle_direction = tuple(frames.rotate(self.T_scanner_base, T_base_tip[:3, 2]))
        return spec


def make_scenario(seed: int = 0, target_depth: Optional[float] = None, modality: str = 'CT',
                  mount_rotation_deg: float = 4.0, mount_shift: float = 0.008, T_base_zframe=None,
                  tissue: bool = False, **tissue_options) -> Scenario:
    """A random but reachable scenario.

    ``tissue``: add the needle-tissue perturbations (:func:`make_tissue_model`, seeded by ``seed``;
    ``tissue_options`` go to it). MR distortion is centred on the field of view (the isocentre).

    ``target_depth``: depth of the target below the skin along the body's AP
    axis (m; default random in [0.04, 0.09]). The robot's mounting is the nominal
    one perturbed by up to ``mount_rotation_deg`` and ``mount_shift``.
    """
    if modality not in ('CT', 'MR'):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    rng = np.random.default_rng(seed)
    if T_base_zframe is None:
        from igt_robot.robot_model import load_robot_model
        T_base_zframe = load_robot_model().T_base_zframe
    T_scanner_zframe_nominal = frames.make_transform(np.eye(3), ZFRAME_NOMINAL_SCANNER)
    T_scanner_base_nominal = T_scanner_zframe_nominal @ frames.invert(T_base_zframe)
    assert np.allclose(T_scanner_base_nominal[:3, :3], R_SCANNER_BASE_NOMINAL, atol=1e-9), \
        'the URDF Z-frame mounting no longer matches the nominal robot mounting'
    perturb = frames.make_transform(random_rotation(rng, mount_rotation_deg),
                                    rng.uniform(-mount_shift, mount_shift, 3))
    # Perturb about the RCM so the robot stays on the abdomen.
    T_scanner_base = T_scanner_base_nominal @ perturb
    depth = float(rng.uniform(0.04, 0.09) if target_depth is None else target_depth)
    if not 0.02 <= depth <= 0.13:
        raise ValueError(f'target depth {depth:.3f} m outside the simulated range [0.02, 0.13] m')
    # Below the robot's workspace centre, a little off-axis so the approach is oblique.
    rcm_scanner = T_scanner_base[:3, 3]
    target = np.array([rcm_scanner[0] + rng.uniform(-0.015, 0.015), SKIN_Y + depth,
                       rcm_scanner[2] + rng.uniform(-0.015, 0.015)])
    radius = 0.008
    # A vessel straight below the robot's home line, between skin and target: the vertical path is
    # blocked and the planner must go around it. A bone on one side bounds the other approaches.
    side = rng.choice([-1.0, 1.0])
    vessel_y = SKIN_Y + 0.45 * depth
    vessels = [Tube((target[0] + 0.002, vessel_y, target[2] - 0.08), (target[0] + 0.002, vessel_y, target[2] + 0.08),
                    0.003)]
    bones = [Tube((target[0] + side * 0.035, target[1] + 0.01, target[2] - 0.08),
                  (target[0] + side * 0.035, target[1] + 0.01, target[2] + 0.08), 0.007)]
    zframe = T_scanner_base @ T_base_zframe
    lo = np.minimum(zframe[:3, 3] - 0.04, target - 0.03)
    hi = np.maximum(zframe[:3, 3] + 0.04, target + 0.03)
    hi[1] = max(hi[1], target[1] + 0.02)
    center = (lo + hi) / 2.0
    size = tuple(float(s) for s in np.maximum(hi - lo, [0.10, 0.10, 0.10]))
    model = make_tissue_model(seed, modality, isocentre=tuple(center), body_semi_axes=BODY_SEMI_AXES,
                              **tissue_options) if tissue else None
    return Scenario(T_scanner_base=T_scanner_base, target=target, target_radius=radius, vessels=vessels,
                    bones=bones, modality=modality, fov_center=center, fov_size=size, seed=seed, tissue=model)
