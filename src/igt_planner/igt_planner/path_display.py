"""How a plan is shown and explained (no ROS): clearance along the path, its colours, the rejection summary.

* :func:`path_slack` -- points along a path and, at each, the clearance beyond the nearest margin;
* :func:`clearance_colour` -- red inside a margin, orange at it, green with room to spare;
* :func:`rejection_summary` -- one line per kind of rejected candidate, with an example sentence.

planner_node turns these into rviz markers and replies.
"""
from __future__ import annotations

import numpy as np

from igt_planner import reasons as R
from igt_planner.planner import NeedlePlanner


def clearance_colour(slack_m: float, saturation_m: float) -> tuple:
    """(r, g, b) of a path point whose clearance exceeds the nearest margin by ``slack_m`` (m).

    Inside a margin (slack < 0, or NaN) pure red; at the margin orange (1, 0.5, 0);
    green (0, 1, 0) from ``saturation_m`` beyond; linear in between (green rises,
    red falls monotonically with the clearance).
    """
    if not slack_m >= 0.0:
        return (1.0, 0.0, 0.0)
    t = min(float(slack_m) / float(saturation_m), 1.0)
    return (1.0 - t, 0.5 + 0.5 * t, 0.0)


def path_slack(planner: NeedlePlanner, entry, target, segments: int) -> tuple:
    """(points (segments+1, 3) scanner LPS, slack (m) at each): distance minus margin to the nearest structure."""
    s = np.linspace(0.0, 1.0, int(segments) + 1)[:, None]
    points = np.asarray(entry, float) + s * (np.asarray(target, float) - np.asarray(entry, float))
    slack = np.full(points.shape[0], np.inf)
    planner.precompute()
    coords = planner.labelmap.to_array(points)
    for f in planner.fields:
        slack = np.minimum(slack, f.sample(coords) - f.margin_m)
    return points, slack


def rejection_summary(counts: dict, n_candidates: int, examples: dict) -> list:
    """One line per rejection kind, most frequent first: count, meaning and an example sentence."""
    lines = []
    for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], R.KINDS.index(kv[0]))):
        line = f'{count} of {n_candidates} candidates: {R.DESCRIPTIONS.get(kind, kind)}'
        example = examples.get(kind)
        if example is not None and example.reasons:
            sentences = [s for k, s in zip(example.reason_kinds, example.reasons) if k == kind] or example.reasons
            line += f'; e.g. {sentences[0]}'
        lines.append(line)
    return lines
