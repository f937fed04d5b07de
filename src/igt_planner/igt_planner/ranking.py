"""Score of feasible paths (higher is better, in [0, 1]).

score = sum_i w_i * term_i / sum_i w_i with, each in [0, 1]:

* clearance   = clip(slack / saturation, 0, 1), slack = min over critical
  structures of (clearance - margin): room left beyond the margins.
  Extra room past ``clearance.saturation_m`` earns nothing more.
* depth       = 1 - clip(depth / needle.max_depth_m, 0, 1): shorter is better
  (less tissue traversed, smaller effect of needle deflection).
* skin_angle  = 1 - clip(angle / skin.max_angle_rad, 0, 1): perpendicular
  entry slips less on the skin.
* joint_margin= clip(2 * joint_limit_margin, 0, 1) (the margin is 0.5 with
  every joint mid-range): away from joint limits leaves room for motion
  compensation and re-targeting.
"""
from __future__ import annotations

import numpy as np

from .config import PlannerConfig

TERMS = ('clearance', 'depth', 'skin_angle', 'joint_margin')


def score_terms(slack_m, depth_m, skin_angle_rad, joint_margin, cfg: PlannerConfig) -> dict:
    """Each term in [0, 1] (arrays of the same length as the inputs)."""
    slack = np.asarray(slack_m, float)
    return {
        'clearance': np.clip(slack / cfg.clearance.saturation_m, 0.0, 1.0),
        'depth': 1.0 - np.clip(np.asarray(depth_m, float) / cfg.needle.max_depth_m, 0.0, 1.0),
        'skin_angle': 1.0 - np.clip(np.nan_to_num(np.asarray(skin_angle_rad, float), nan=np.pi)
                                    / cfg.skin.max_angle_rad, 0.0, 1.0),
        'joint_margin': np.clip(2.0 * np.nan_to_num(np.asarray(joint_margin, float), nan=0.0), 0.0, 1.0),
    }


def weights(cfg: PlannerConfig) -> dict:
    r = cfg.ranking
    return {'clearance': r.weight_clearance, 'depth': r.weight_depth,
            'skin_angle': r.weight_skin_angle, 'joint_margin': r.weight_joint_margin}


def score(slack_m, depth_m, skin_angle_rad, joint_margin, cfg: PlannerConfig) -> np.ndarray:
    """Weighted score in [0, 1] per path."""
    terms = score_terms(slack_m, depth_m, skin_angle_rad, joint_margin, cfg)
    w = weights(cfg)
    total = sum(w.values())
    return sum(w[k] * terms[k] for k in TERMS) / total


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices by decreasing score; ties keep the candidate order (deterministic)."""
    s = np.asarray(scores, float)
    return np.lexsort((np.arange(s.size), -s))
