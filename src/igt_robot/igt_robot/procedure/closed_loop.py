"""Closed loop in the control phase: from a control scan's tip and target to the next step (no rclpy).

After every control scan the needle tip and the target are found in the image. This
module decides what the next step should be and what error to expect at its end, so
the operator sees it before confirming:

* ``continue``   -- advance along the current track (depth re-planned to the target's
  new position, including the push the needle still causes);
* ``rotate``     -- the operator turns the needle about its axis by a given angle
  before advancing: a bevel-tip needle bends towards its bevel, so turning it
  steers the rest of the path. The robot has no needle-rotation axis: the
  rotation is the operator's, by hand, read off the hub mark;
* ``realign``    -- retract the needle to the skin, turn the guide about the remote
  centre of motion (pitch/yaw only; the RCM stays on the skin entry) to an aim
  that pre-compensates the measured bending, and insert again;
* ``done``       -- the tip is at the target within tolerance.

The needle is modelled as in :mod:`igt_robot.simulation.tissue` (constant curvature
towards the bevel); the curvature and the bend direction are estimated from how far
the measured tip lies off the guide line. Everything in scanner LPS metres.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from igt_robot.simulation.tissue import arc_points

TOLERANCE_M = 0.0005           # a predicted error under this needs no steering
TIP_DETECTION_SD_M = 0.0003    # tip localisation in a control scan (measured on the simulated scans)
MIN_DEPTH_FOR_BEND_M = 0.012   # shallower than this, the bend cannot be told from detection noise
OPERATOR_ROTATION_SD_RAD = math.radians(10.0)
ROTATION_GRID = np.radians(np.arange(15.0, 360.0, 15.0))
STEERING_GAIN_M = 0.00015      # steer (turn, re-align) only when it is expected to gain more than this


@dataclasses.dataclass
class NeedleEstimate:
    """What the control scans say about the needle: curvature (1/m) and the unit bend vector at the tip."""

    kappa: float
    bend: np.ndarray
    tangent: np.ndarray
    tissue_depth: float
    known: bool                 # False when the needle is still too shallow to tell


@dataclasses.dataclass
class Decision:
    """The next step proposed to the operator (scanner LPS, m)."""

    action: str                          # continue | rotate | realign | done
    expected_error_m: float              # predicted tip-to-target error at the end of the insertion
    next_insertion: float                # insertion (m) to go to with the next step
    final_insertion: float               # predicted insertion at which the tip reaches the target
    rotation_rad: float = 0.0            # operator's turn of the needle before the step ('rotate')
    retract_to: Optional[float] = None   # 'realign': insertion to retract to first
    new_direction: Optional[np.ndarray] = None   # 'realign': guide direction through the RCM
    alternatives: dict = dataclasses.field(default_factory=dict)   # action -> expected error (m)
    predicted_target: Optional[np.ndarray] = None
    estimate: Optional[NeedleEstimate] = None

    def bend_at_skin(self):
        """(kappa, bend vector at the skin) of the needle estimate, to carry over to a new track."""
        est = self.estimate
        if est is None or not est.known:
            return None
        c, si = math.cos(est.kappa * est.tissue_depth), math.sin(est.kappa * est.tissue_depth)
        return est.kappa, c * est.bend + si * est.tangent

    def describe(self) -> str:
        alt = ', '.join(f'{k} {v * 1e3:.1f} mm' for k, v in sorted(self.alternatives.items()))
        retract = 0.0 if self.retract_to is None else self.retract_to * 1e3
        what = {'continue': 'advance',
                'rotate': f'operator turns the needle {math.degrees(self.rotation_rad):.0f} deg, then advance',
                'realign': f'retract to {retract:.0f} mm, re-align the guide about the RCM, re-insert',
                'done': 'tip at target'}[self.action]
        return (f'{what} to {self.next_insertion * 1e3:.1f} mm; expected error at the end '
                f'{self.expected_error_m * 1e3:.1f} mm (options: {alt})')


def estimate_needle(rcm, direction, skin_distance, tips, prior_kappa: float,
                    known_bend=None) -> NeedleEstimate:
    """Curvature and bend from the measured tips' offsets from the guide line, all on the current track.

    Lateral offset at tissue depth s: A s + C s^2 (vectors perpendicular to the guide): A is a small
    error of the guide line itself (registration, robot), C the bend (kappa = 2 |C|). With one tip the
    line is taken as exact (the bend dominates: 1-5 mm at 100 mm against a few tenths of a millimetre).
    ``tips``: measured tip positions (scanner, m), the last one is the current tip. ``known_bend``:
    (kappa, unit bend vector at the skin) learnt on an earlier track of this needle in this tissue, used
    while the current track is too shallow to show its own bend.
    """
    u = np.asarray(direction, float)
    rel = np.atleast_2d(np.asarray(tips, float)) - np.asarray(rcm, float)
    along = rel @ u
    lateral = rel - along[:, None] * u
    depth = along - skin_distance
    use = depth >= MIN_DEPTH_FOR_BEND_M
    current_depth = float(max(depth[-1], 0.0))
    if not use[-1] or float(np.linalg.norm(lateral[-1])) < 2.0 * TIP_DETECTION_SD_M:
        if known_bend is not None:
            kappa, b0 = known_bend
            b0 = np.asarray(b0, float) - (np.asarray(b0, float) @ u) * u
            b0 /= np.linalg.norm(b0)
            c, si = math.cos(kappa * current_depth), math.sin(kappa * current_depth)
            return NeedleEstimate(kappa, -si * u + c * b0, c * u + si * b0, current_depth, True)
        return NeedleEstimate(prior_kappa, _any_perpendicular(u), u, current_depth, False)
    s, lat = depth[use], lateral[use]
    if len(s) >= 2 and float(s.max() - s.min()) > 0.01:
        design = np.stack([s, s * s], axis=1)
        coef, *_ = np.linalg.lstsq(design, lat, rcond=None)
        a_vec, c_vec = coef[0], coef[1]
    else:
        a_vec, c_vec = np.zeros(3), lat[-1] / s[-1] ** 2
    kappa = 2.0 * float(np.linalg.norm(c_vec))
    if kappa < 1e-6:
        return NeedleEstimate(0.0, _any_perpendicular(u), u, current_depth, True)
    b0 = c_vec / np.linalg.norm(c_vec)
    tangent = u + a_vec + kappa * current_depth * b0
    tangent /= np.linalg.norm(tangent)
    bend = b0 - (b0 @ tangent) * tangent
    bend /= np.linalg.norm(bend)
    return NeedleEstimate(kappa, bend, tangent, current_depth, True)


def _any_perpendicular(u):
    helper = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e = np.cross(u, helper)
    return e / np.linalg.norm(e)


def _rotated(bend, tangent, angle):
    return math.cos(angle) * bend + math.sin(angle) * np.cross(tangent, bend)


def _closest_on_arc(start, tangent, bend, kappa, target, max_length):
    """(distance, length along the arc) of the arc's closest approach to ``target`` within ``max_length``."""
    if max_length <= 0.0:
        return float(np.linalg.norm(target - start)), 0.0
    pts, _, _ = arc_points(start, tangent, bend, kappa, max_length, step=0.0002)
    d = np.linalg.norm(pts - target, axis=1)
    n = int(np.argmin(d))
    return float(d[n]), max_length * n / (len(pts) - 1)


def predicted_target(target_seen, tangent, push_rate: float, remaining: float) -> np.ndarray:
    """The target pushed further along the path while the tip covers ``remaining`` more metres."""
    return np.asarray(target_seen, float) + push_rate * max(remaining, 0.0) * np.asarray(tangent, float)


def decide(*, rcm, direction, skin_distance: float, insertion: float, tips, target, push_rate: float,
           next_scheduled: float, max_insertion: float, prior_kappa: float, uncertainty_kappa: float,
           tolerance: float = TOLERANCE_M, allow_realign: bool = True, last_step: bool = False,
           known_bend=None, estimate: Optional[NeedleEstimate] = None) -> Decision:
    """The next step after a control scan.

    ``tips`` (the tips measured on this track, last = now) and ``target`` come from the images;
    ``rcm``/``direction``/``skin_distance`` describe the guide line as planned (scanner); ``insertion`` is
    the current insertion (m, from the encoder);
    ``push_rate`` the target's displacement per metre of tip advance seen so far; ``next_scheduled`` the
    insertion of the next planned step. Returns the option with the smallest expected error, preferring
    the simpler one (continue, then rotate, then realign) unless the more complex one gains > 0.3 mm.
    ``estimate``: the caller's own needle estimate (e.g. :func:`fit_needle_model`), else one from ``tips``.
    """
    tips = np.atleast_2d(np.asarray(tips, float))
    tip, target, u = tips[-1], np.asarray(target, float), np.asarray(direction, float)
    est = estimate if estimate is not None else estimate_needle(rcm, u, skin_distance, tips, prior_kappa,
                                                                known_bend)
    to_target = float((target - tip) @ est.tangent)
    remaining = max(0.0, min(max_insertion - insertion, to_target + 0.01))
    aim = predicted_target(target, est.tangent, push_rate, to_target)
    # the remaining uncertainty of a prediction over the rest of the path
    spread = math.hypot(TIP_DETECTION_SD_M, 0.5 * uncertainty_kappa * to_target ** 2)
    options = {}

    def finish(length):
        return min(insertion + length, max_insertion)

    if abs(to_target) <= tolerance and float(np.linalg.norm(target - tip)) <= tolerance:
        return Decision('done', float(np.linalg.norm(target - tip)), insertion, insertion, alternatives={},
                        predicted_target=aim, estimate=est)
    # continue along the arc
    kappa = est.kappa if est.known else 0.0    # bend direction unknown yet: straight is the unbiased guess
    err, length = _closest_on_arc(tip, est.tangent, est.bend, kappa, aim, remaining)
    options['continue'] = (math.hypot(err, spread), Decision('continue', 0.0, 0.0, finish(length)))
    # operator rotation (needs a known bend direction to be meaningful)
    if est.known and to_target > 0.005:
        best = None
        for angle in ROTATION_GRID:
            bend = _rotated(est.bend, est.tangent, angle)
            e, l_ = _closest_on_arc(tip, est.tangent, bend, est.kappa, aim, remaining)
            # the operator's turn is not exact: add its effect on the lateral end point
            e = math.hypot(e, 0.5 * est.kappa * l_ ** 2 * OPERATOR_ROTATION_SD_RAD)
            if best is None or e < best[0]:
                best = (e, angle, l_)
        options['rotate'] = (math.hypot(best[0], spread),
                             Decision('rotate', 0.0, 0.0, finish(best[2]), rotation_rad=float(best[1])))
    # retract, re-aim about the RCM with the bend pre-compensated, re-insert
    if allow_realign and est.known:
        new_u, reach_err, full = _realign(np.asarray(rcm, float), u, skin_distance, est, target, push_rate)
        retract_to = max(0.0, skin_distance - 0.002)
        options['realign'] = (math.hypot(reach_err, TIP_DETECTION_SD_M, 0.5 * uncertainty_kappa * full ** 2),
                              Decision('realign', 0.0, 0.0, skin_distance + full, retract_to=retract_to,
                                       new_direction=new_u))
    order = ['continue', 'rotate', 'realign']
    chosen = 'continue'
    for name in order[1:]:
        if name in options and options[name][0] < options[chosen][0] - STEERING_GAIN_M \
                and options[chosen][0] > tolerance:
            chosen = name
    expected, decision = options[chosen]
    final = decision.final_insertion
    if chosen == 'realign':
        next_insertion = final if last_step else min(max(next_scheduled, skin_distance + 0.005), final)
    else:
        next_insertion = final if (last_step or final <= next_scheduled + 0.002) else min(next_scheduled, final)
    return dataclasses.replace(decision, expected_error_m=float(expected), next_insertion=float(next_insertion),
                               alternatives={k: float(v[0]) for k, v in options.items()},
                               predicted_target=aim, estimate=est)


def _realign(rcm, u, skin_distance, est: NeedleEstimate, target, push_rate, iterations: int = 4):
    """A guide direction through ``rcm`` whose bent path (curvature and bevel as measured) ends on the
    target; returns (direction, predicted miss, tissue depth to go)."""
    entry = rcm + skin_distance * u
    # the bevel keeps its orientation relative to the guide: bend vector at entry, from the estimate
    bend0 = est.bend * math.cos(est.kappa * est.tissue_depth) + est.tangent * math.sin(est.kappa * est.tissue_depth)
    bend0 -= (bend0 @ u) * u
    bend0 /= np.linalg.norm(bend0)
    aim_point = np.asarray(target, float)
    new_u = u
    depth = 0.0
    miss = math.inf
    for _ in range(iterations):
        new_u = aim_point - rcm
        new_u /= np.linalg.norm(new_u)
        b = bend0 - (bend0 @ new_u) * new_u
        b /= np.linalg.norm(b)
        new_entry = rcm + skin_distance * new_u
        depth_target = float((target - new_entry) @ new_u)
        pushed = target + push_rate * depth_target * new_u
        miss, depth = _closest_on_arc(new_entry, new_u, b, est.kappa, pushed, depth_target + 0.01)
        pts, _, _ = arc_points(new_entry, new_u, b, est.kappa, depth)
        aim_point = aim_point + (pushed - pts[-1]) - ((pushed - pts[-1]) @ new_u) * new_u
    _ = entry
    return new_u, miss, depth


def error_budget(*, tre_m: float, robot_m: float, deflection_m: float, target_motion_m: float,
                 final_error_m: float, closed_loop_error_m: Optional[float] = None) -> dict:
    """The error budget of one procedure (mm): each source's contribution at the target, the open-loop
    root-sum-square of those and the tip-to-target error actually measured at the end."""
    terms = {'registration_mm': tre_m, 'robot_mm': robot_m, 'deflection_mm': deflection_m,
             'target_motion_mm': target_motion_m}
    out = {k: round(v * 1e3, 3) for k, v in terms.items()}
    out['open_loop_rss_mm'] = round(math.sqrt(sum(v * v for v in terms.values())) * 1e3, 3)
    out['measured_final_error_mm'] = round(final_error_m * 1e3, 3)
    if closed_loop_error_m is not None:
        out['closed_loop_expected_mm'] = round(closed_loop_error_m * 1e3, 3)
    return out


PRIOR_KAPPA_SD = 0.3           # 1/m: spread of tissue curvatures (1-5 mm at 100 mm is 0.2-1.0 /m)


def fit_needle_model(model, insertion: float, tip, kappa_range=(0.05, 2.5), prior_kappa: Optional[float] = None,
                     prior_sd: float = PRIOR_KAPPA_SD) -> NeedleEstimate:
    """The stack's own needle model (a :class:`~igt_robot.simulation.tissue.BevelNeedle` on the planned guide
    line, with the bevel orientation the operator read off the hub and the turns asked of the operator) with
    its curvature fitted to the measured tip (1-D search). Sets ``model.kappa``; returns the estimate at the
    tip. Too shallow to tell: the model's current curvature, ``known`` still True (the hub says the bend)."""
    tip = np.asarray(tip, float)
    depth = model.tissue_depth(insertion)
    if depth >= MIN_DEPTH_FOR_BEND_M:
        grid = np.linspace(kappa_range[0], kappa_range[1], 50)
        costs = []
        for k in grid:
            model.kappa = float(k)
            costs.append(float(np.linalg.norm(model.trace(insertion, step=0.001)[1] - tip)))
        n = int(np.argmin(costs))
        lo, hi = grid[max(n - 1, 0)], grid[min(n + 1, len(grid) - 1)]
        fine = np.linspace(lo, hi, 15)
        costs = []
        for k in fine:
            model.kappa = float(k)
            costs.append(float(np.linalg.norm(model.trace(insertion, step=0.001)[1] - tip)))
        measured = float(fine[int(np.argmin(costs))])
        if prior_kappa is None:
            model.kappa = measured
        else:
            # shallow tips say little about the curvature (offset ~ kappa s^2 / 2): weigh against the prior
            measured_sd = 2.0 * TIP_DETECTION_SD_M / depth ** 2
            w = prior_sd ** -2 / (prior_sd ** -2 + measured_sd ** -2)
            model.kappa = w * prior_kappa + (1.0 - w) * measured
    _, _, tangent, bend = model.trace(insertion, step=0.001)
    return NeedleEstimate(model.kappa, bend, tangent, max(depth, 0.0), True)


def procedure_budget(*, predicted_tre_m: float, robot_m: float, tip, entry, direction, target_planned,
                     target_now, expected_m: Optional[float] = None) -> dict:
    """The error budget of a procedure from what the images show (scanner, m): the tip's distance from the
    planned line is the deflection, the target's displacement since planning its motion."""
    tip, entry, u = np.asarray(tip, float), np.asarray(entry, float), np.asarray(direction, float)
    rel = tip - entry
    deflection = float(np.linalg.norm(rel - (rel @ u) * u))
    motion = float(np.linalg.norm(np.asarray(target_now, float) - np.asarray(target_planned, float)))
    return error_budget(tre_m=predicted_tre_m, robot_m=robot_m, deflection_m=deflection, target_motion_m=motion,
                        final_error_m=float(np.linalg.norm(tip - np.asarray(target_now, float))),
                        closed_loop_error_m=expected_m)
