"""The needle in tissue: what the robot cannot see without images (ground truth, no rclpy).

Four seeded perturbations, each with its literature range in docs/simulation.md:

* :class:`BevelNeedle` -- a bevel-tip needle bends towards its bevel while it cuts
  (kinematic bicycle/unicycle model: the tip follows an arc of constant curvature
  ``kappa`` in the plane set by the bevel orientation). ``kappa`` comes from the
  tissue stiffness, drawn so the lateral deflection at 100 mm is 1-5 mm. The
  operator can turn the needle about its axis (the robot has no rotation axis):
  the bend plane turns with it from that depth on.
* :class:`TargetPush` -- the lesion is pushed ahead of the advancing tip, along
  the path, up to 1-5 mm when the tip reaches it.
* :class:`Respiration` -- free breathing moves the target superior-inferior by
  5-15 mm (cos^2n cycle); at breath-holds (end-exhale) the position repeats
  only to within 1-3 mm (reproducibility).
* :class:`DistortionField` -- the MR scanner's geometric distortion: a smooth
  third-order field (gradient non-linearity), zero at the isocentre, of given
  magnitude at 100 mm off-centre.

Everything in scanner LPS metres. The needle path is held in the scanner frame
(the robot rides on the abdominal wall with the skin entry); respiration moves
the target relative to it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

REFERENCE_DEPTH_M = 0.100          # deflection and distortion are quoted at 100 mm
DEFLECTION_RANGE_M = (0.001, 0.005)
PUSH_RANGE_M = (0.001, 0.005)
RESPIRATION_AMPLITUDE_RANGE_M = (0.005, 0.015)
BREATH_HOLD_SD_RANGE_M = (0.001, 0.003)
STEP_M = 0.0005                    # integration step along the needle (m)
# Below the abdominal wall the needle is held by the organ it is in and moves with it when the organ moves
# (breathing); above, the wall and the robot on it hold it. The drag ramps in over this tissue depth.
ORGAN_DEPTH_M = 0.030


def organ_hold(tissue_depth: float) -> float:
    """Fraction (0..1) of the organ's motion the needle tip follows at this tissue depth."""
    return float(np.clip(tissue_depth / ORGAN_DEPTH_M, 0.0, 1.0))


def curvature_for_deflection(deflection_m: float, depth_m: float = REFERENCE_DEPTH_M) -> float:
    """Arc curvature (1/m) whose lateral offset at ``depth_m`` is ``deflection_m`` (small-angle: d = k L^2 / 2)."""
    return 2.0 * deflection_m / depth_m ** 2


def _unit(v):
    v = np.asarray(v, float)
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        raise ValueError('zero-length direction')
    return v / n


def perpendicular_basis(u) -> Tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``u`` (and to each other); e1 lies in the plane of u and LPS z
    when possible, so a bevel angle of 0 means 'towards superior' for a needle roughly along AP."""
    u = _unit(u)
    ref = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = _unit(ref - (ref @ u) * u)
    return e1, np.cross(u, e1)


def bend_vector(u, bevel_angle: float) -> np.ndarray:
    """Unit vector, perpendicular to ``u``, towards which a needle with bevel angle ``bevel_angle`` (rad) bends."""
    e1, e2 = perpendicular_basis(u)
    return math.cos(bevel_angle) * e1 + math.sin(bevel_angle) * e2


def arc_points(start, tangent, bend, kappa: float, length: float, step: float = STEP_M):
    """Points (N, 3) of a planar constant-curvature arc from ``start``; also the final tangent and bend vectors."""
    tangent, bend = _unit(tangent), _unit(bend)
    n = max(1, int(math.ceil(length / step)))
    s = np.linspace(0.0, length, n + 1)
    if kappa < 1e-9:
        pts = start + s[:, None] * tangent
        return pts, tangent, bend
    c, si = np.cos(kappa * s), np.sin(kappa * s)
    pts = start + (si / kappa)[:, None] * tangent + ((1.0 - c) / kappa)[:, None] * bend
    t_end = c[-1] * tangent + si[-1] * bend
    b_end = -si[-1] * tangent + c[-1] * bend
    return pts, t_end, b_end


def line_skin_entry(rcm, direction, body_center=(0.0, 0.0), semi_axes=(0.15, 0.10)) -> float:
    """Distance (m) along the line rcm + t * direction at which it enters the elliptic body (axis along z)."""
    a, b = semi_axes
    px, py = rcm[0] - body_center[0], rcm[1] - body_center[1]
    dx, dy = direction[0], direction[1]
    qa = (dx / a) ** 2 + (dy / b) ** 2
    qb = 2.0 * (px * dx / a ** 2 + py * dy / b ** 2)
    qc = (px / a) ** 2 + (py / b) ** 2 - 1.0
    if qc <= 0.0:
        return 0.0                  # the RCM is already inside the body
    disc = qb * qb - 4.0 * qa * qc
    if qa < 1e-12 or disc < 0.0:
        return math.inf
    t = (-qb - math.sqrt(disc)) / (2.0 * qa)
    return t if t >= 0.0 else math.inf


@dataclasses.dataclass
class BevelNeedle:
    """A bevel-tip needle held by the guide: straight from the RCM to the skin, then arcs in tissue.

    ``rotations`` are the operator's turns of the needle about its axis: (tissue depth m, angle rad),
    applied from that depth on. The path is re-traced whenever it is asked for, so retraction and
    re-insertion along the same guide line follow the old track (the needle finds its own channel).
    """

    kappa: float                      # 1/m
    bevel_angle: float                # rad, about the needle axis (see bend_vector)
    rcm: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    skin_distance: float = 0.0        # RCM -> skin along the guide line (m)
    rotations: List[Tuple[float, float]] = dataclasses.field(default_factory=list)
    body_semi_axes: tuple = (0.15, 0.10)
    placed: bool = False

    def set_guide(self, rcm, direction, insertion: float = 0.0, strict: bool = True) -> None:
        """The guide points the needle along ``direction`` through ``rcm`` (scanner). Refused (``strict``) with
        the needle in tissue: turning the guide about the RCM would cut sideways through the tissue; otherwise
        (an image of whatever the robot did) the needle starts a new track."""
        rcm, direction = np.asarray(rcm, float), _unit(direction)
        if self.placed and strict and self.tissue_depth(insertion) > 0.001:
            same = np.linalg.norm(rcm - self.rcm) < 1e-5 and float(direction @ self.direction) > 1.0 - 1e-8
            if not same:
                raise ValueError(f'the guide cannot turn with the needle {self.tissue_depth(insertion) * 1e3:.1f} mm '
                                 'deep in tissue: retract it first')
            return
        if np.linalg.norm(rcm - self.rcm) > 1e-6 or float(direction @ self.direction) < 1.0 - 1e-10:
            # a new track from the skin; the operator's turns stay in the needle's bevel orientation
            self.bevel_angle += sum(angle for _, angle in self.rotations)
            self.rotations = []
        self.placed = True
        self.rcm, self.direction = rcm, direction
        self.skin_distance = line_skin_entry(rcm, direction, semi_axes=self.body_semi_axes)

    def rotate(self, insertion: float, angle: float) -> None:
        """The operator turns the needle by ``angle`` (rad) at the current insertion."""
        self.rotations.append((max(self.tissue_depth(insertion), 0.0), float(angle)))

    def tissue_depth(self, insertion: float) -> float:
        return insertion - self.skin_distance

    def path(self, insertion: float, step: float = STEP_M):
        """Points (N, 3) from the RCM to the tip, the tip's position and its tangent (scanner, m)."""
        pts, tip, tangent, _ = self.trace(insertion, step)
        return pts, tip, tangent

    def trace(self, insertion: float, step: float = STEP_M):
        """As :meth:`path`, plus the unit bend vector at the tip."""
        u = self.direction
        entry = self.rcm + min(self.skin_distance, insertion) * u
        pts = [self.rcm[None, :], entry[None, :]]
        depth = self.tissue_depth(insertion)
        tangent = u
        bend = bend_vector(u, self.bevel_angle)
        if depth <= 0.0:
            return np.concatenate(pts), entry, tangent, bend
        start, done = entry, 0.0
        changes = sorted(self.rotations) + [(math.inf, 0.0)]
        for at, angle in changes:
            length = min(at, depth) - done
            if length > 0.0:
                arc, tangent, bend = arc_points(start, tangent, bend, self.kappa, length, step)
                pts.append(arc[1:])
                start, done = arc[-1], done + length
            if done >= depth:
                break
            # turning the needle about its own axis turns the bend vector about the tangent
            e2 = np.cross(tangent, bend)
            bend = math.cos(angle) * bend + math.sin(angle) * e2
        return np.concatenate(pts), start, tangent, bend

    def tip(self, insertion: float):
        _, tip, tangent = self.path(insertion)
        return tip, tangent


@dataclasses.dataclass
class TargetPush:
    """The lesion moves ahead of the tip along the path: ``push`` at the target's own depth, linear before."""

    push: float                       # m, at the lesion

    def displacement(self, tip_depth_along_path: float, target_depth_along_path: float) -> float:
        if target_depth_along_path <= 0.0 or tip_depth_along_path <= 0.0:
            return 0.0
        return self.push * min(tip_depth_along_path / target_depth_along_path, 1.0)


@dataclasses.dataclass
class Respiration:
    """Superior-inferior target motion: Lujan-type cycle z(t) = A cos^(2n)(pi t / T) (0 = end-exhale);
    breath-holds at end-exhale, each off by a seeded normal error of ``breath_hold_sd`` (SI; 30 % of it AP)."""

    amplitude: float                  # m, peak-to-peak SI while breathing freely
    breath_hold_sd: float             # m, SI reproducibility of end-exhale breath-holds
    period: float = 4.0               # s
    shape: int = 2                    # n in cos^(2n)
    seed: int = 0

    def free_breathing(self, t: float) -> np.ndarray:
        """Offset (LPS, m) at time ``t`` of free breathing (superior is LPS +z; inhale moves the organ inferior)."""
        z = -self.amplitude * math.cos(math.pi * t / self.period) ** (2 * self.shape)
        return np.array([0.0, 0.0, z])

    def breath_hold(self, index: int) -> np.ndarray:
        """Offset (LPS, m) of breath-hold ``index`` (seeded: the same index always gives the same offset)."""
        rng = np.random.default_rng([self.seed, int(index)])
        si, ap = rng.normal(0.0, self.breath_hold_sd), rng.normal(0.0, 0.3 * self.breath_hold_sd)
        return np.array([0.0, ap, si])


@dataclasses.dataclass
class DistortionField:
    """Gradient non-linearity: displacement_i(x) = m a_i (x_i / r0) (|x|/r0)^2 about the isocentre.

    This is the leading (third-order) term of each gradient coil's field error: zero at the isocentre,
    growing with the cube of the distance. ``magnitude`` m is the largest displacement at r0 = 100 mm
    (along the axis whose coefficient is 1).
    """

    magnitude: float                  # m at 100 mm off-centre
    coefficients: tuple = (1.0, -0.6, 0.8)
    isocentre: tuple = (0.0, 0.0, 0.0)
    r0: float = REFERENCE_DEPTH_M

    def displacement(self, points) -> np.ndarray:
        """Where the scanner shows a point minus where it is (LPS, m), for points (N, 3) or (3,)."""
        p = np.asarray(points, float) - np.asarray(self.isocentre, float)
        r2 = np.sum(p * p, axis=-1, keepdims=True) / self.r0 ** 2
        return self.magnitude * np.asarray(self.coefficients) * (p / self.r0) * r2

    def shown_at(self, points) -> np.ndarray:
        """Apparent (image) positions of true points."""
        return np.asarray(points, float) + self.displacement(points)

    def true_at(self, apparent, iterations: int = 3) -> np.ndarray:
        """True positions of points seen at ``apparent`` (fixed-point inverse; the field is small)."""
        apparent = np.asarray(apparent, float)
        x = apparent.copy()
        for _ in range(iterations):
            x = apparent - self.displacement(x)
        return x

    def warp_grid(self, xyz):
        """Image formation: the true positions imaged at the voxel coordinates ``xyz`` (list of 3 arrays)."""
        iso = [np.float32(c) for c in self.isocentre]
        rel = [xyz[n] - iso[n] for n in range(3)]
        r2 = (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) / np.float32(self.r0 ** 2)
        out = []
        for n in range(3):
            shift = np.float32(self.magnitude * self.coefficients[n] / self.r0) * rel[n] * r2
            out.append(xyz[n] - shift)      # first-order inverse: true = shown - D(shown)
        return out


@dataclasses.dataclass
class TissueModel:
    """All four perturbations of one simulated patient (seeded)."""

    needle: BevelNeedle
    push: TargetPush
    respiration: Respiration
    distortion: Optional[DistortionField]
    deflection_at_100mm: float

    def describe(self) -> dict:
        return {'deflection_at_100mm_mm': round(self.deflection_at_100mm * 1e3, 2),
                'bevel_angle_deg': round(math.degrees(self.needle.bevel_angle), 1),
                'target_push_mm': round(self.push.push * 1e3, 2),
                'respiration_amplitude_mm': round(self.respiration.amplitude * 1e3, 1),
                'breath_hold_sd_mm': round(self.respiration.breath_hold_sd * 1e3, 2),
                'distortion_at_100mm_mm': round(self.distortion.magnitude * 1e3, 2) if self.distortion else 0.0}


def make_tissue_model(seed: int, modality: str = 'CT', *, deflection_range=DEFLECTION_RANGE_M,
                      push_range=PUSH_RANGE_M, amplitude_range=RESPIRATION_AMPLITUDE_RANGE_M,
                      breath_hold_sd_range=BREATH_HOLD_SD_RANGE_M, distortion_max_m: float = 0.001,
                      isocentre=(0.0, 0.0, 0.0), body_semi_axes=(0.15, 0.10)) -> TissueModel:
    """Draw a patient's perturbations (uniform in the given ranges). MR gets a distortion field of up to
    ``distortion_max_m`` at 100 mm; CT none (its geometry is exact to well below a voxel)."""
    rng = np.random.default_rng([int(seed), 15])
    deflection = float(rng.uniform(*deflection_range))
    needle = BevelNeedle(kappa=curvature_for_deflection(deflection), bevel_angle=float(rng.uniform(-math.pi, math.pi)),
                         body_semi_axes=tuple(body_semi_axes))
    push = TargetPush(float(rng.uniform(*push_range)))
    resp = Respiration(float(rng.uniform(*amplitude_range)), float(rng.uniform(*breath_hold_sd_range)),
                       seed=int(rng.integers(0, 2 ** 31)))
    distortion = None
    if modality == 'MR' and distortion_max_m > 0.0:
        coeff = rng.uniform(-1.0, 1.0, 3)
        coeff /= np.max(np.abs(coeff))
        distortion = DistortionField(float(rng.uniform(0.0, distortion_max_m)), tuple(float(c) for c in coeff),
                                     tuple(float(c) for c in isocentre))
    return TissueModel(needle, push, resp, distortion, deflection)
