"""Picture of a plan: two oblique slices through the target containing the needle.

Both planes contain the planned needle, so the whole path is visible: one is
as close to axial as possible (it is the axial plane when the needle lies in
one), the other holds the head-foot axis. Structures are drawn from the label map (nearest-neighbour
resampling), the path is coloured by its clearance to the nearest critical
structure, and the entry and target are marked. Display units are mm relative
to the target (converted with :mod:`igt_robot.units`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from igt_robot.units import m_to_mm

# Colours per structure role (RGB 0-1).
_ROLE_COLOURS = {
    'air': (0.0, 0.0, 0.0),
    'tissue': (0.35, 0.35, 0.35),
    'bone': (0.95, 0.93, 0.80),
    'tumour': (0.20, 0.80, 0.25),
}
_CRITICAL_PALETTE = [(0.85, 0.15, 0.15), (0.20, 0.35, 0.90), (0.70, 0.25, 0.75), (0.95, 0.55, 0.10),
                     (0.10, 0.70, 0.75), (0.75, 0.55, 0.35), (0.95, 0.40, 0.60)]


def _unit(v):
    return v / np.linalg.norm(v)


def _plane_axes(direction: np.ndarray, view: str):
    """Display axes (u: to the right, v: downward) of a plane holding ``direction``.

    ``view='axial'``: the plane nearest to axial (u toward patient left, v toward
    posterior). ``view='across'``: the plane holding the needle and the
    superior axis (v toward inferior, u along the needle's remaining direction),
    which shows what lies above and below the path (e.g. ribs).
    """
    d = _unit(np.asarray(direction, float))
    x_axis, y_axis, s_axis = np.eye(3)
    if view == 'axial':
        normal = s_axis - (s_axis @ d) * d
        if np.linalg.norm(normal) < 1e-6:               # needle along S: fall back to a coronal plane
            normal = y_axis - (y_axis @ d) * d
        normal = _unit(normal)
        u = x_axis - (x_axis @ normal) * normal
        u = _unit(u if np.linalg.norm(u) > 1e-6 else np.cross(normal, d))
        v = np.cross(normal, u)
        if v @ y_axis < 0:
            v = -v
        return u, v
    normal = np.cross(d, s_axis)
    if np.linalg.norm(normal) < 1e-6:                   # needle along S: any plane holding it
        normal = np.cross(d, x_axis)
    normal = _unit(normal)
    v = -(s_axis - (s_axis @ normal) * normal)
    v = _unit(v)
    u = _unit(np.cross(normal, v))
    if u @ d < 0:
        u = -u
    return u, v


def _colour_table(labelmap):
    """Label -> RGB, plus legend entries (name, colour)."""
    n = int(labelmap.data.max()) + 1
    table = np.tile(np.array(_ROLE_COLOURS['tissue']), (n, 1))
    legend = []
    crit = sorted(set(labelmap.margins_m) - labelmap.bone_labels)
    for lab in range(n):
        if lab in labelmap.air_labels:
            table[lab] = _ROLE_COLOURS['air']
        elif lab in labelmap.bone_labels:
            # Shades of bone colour so different bones stay distinguishable.
            shade = 1.0 - 0.12 * (sorted(labelmap.bone_labels).index(lab) % 3)
            table[lab] = np.array(_ROLE_COLOURS['bone']) * shade
        elif lab in labelmap.tumour_labels:
            table[lab] = _ROLE_COLOURS['tumour']
        elif lab in crit:
            table[lab] = _CRITICAL_PALETTE[crit.index(lab) % len(_CRITICAL_PALETTE)]
        else:
            # Non-critical organs: shades of grey so they stay distinguishable but quiet.
            g = 0.30 + 0.12 * ((lab * 7) % 5) / 4
            table[lab] = (g, g, g)
    for lab in range(n):
        if labelmap.present(lab) and lab not in labelmap.air_labels:
            legend.append((labelmap.name(lab), tuple(table[lab])))
    return table, legend


def _slice(labelmap, centre, u, v, half_width_m):
    """Nearest-neighbour labels on a square grid (rows along v, columns along u) and an inside mask."""
    res = float(labelmap.spacing.min())
    n = int(np.ceil(2 * half_width_m / res)) + 1
    s = np.linspace(-half_width_m, half_width_m, n)
    uu, vv = np.meshgrid(s, s)
    world = centre + uu[..., None] * u + vv[..., None] * v
    arr = labelmap.to_array(world.reshape(-1, 3))
    labels = ndimage.map_coordinates(labelmap.data, arr.T, order=0, mode='constant', cval=0).reshape(n, n)
    return labels, labelmap.inside(arr).reshape(n, n)


def render_plan_slice(labelmap, plan, path_png, planner=None, half_width_m: float = 0.09,
                      title: Optional[str] = None, alternatives: int = 0) -> Path:
    """Render the plan on two slices through its target that contain the needle; write a PNG.

    Left: the plane nearest to axial. Right: the plane holding the needle and
    the head-foot axis. Structures are coloured by role (critical structures
    in colour, bones pale, tumour green), the path by its clearance to the
    nearest critical structure, with the entry and target marked.

    Args:
        labelmap: the :class:`~igt_planner.labelmap.LabelMap`.
        plan: a :class:`~igt_planner.planner.PlanResult` (its best path is
            drawn) or a :class:`~igt_planner.planner.NeedlePath`.
        path_png: output file.
        planner: a :class:`~igt_planner.planner.NeedlePlanner` on the same map
            whose cached distance fields colour the path; built when omitted.
        half_width_m: half the side of each shown square (m).
        title: figure title (default: depth, closest structure, skin angle).
        alternatives: also draw this many next-ranked paths (projected, dashed).
    Returns the written path.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch

    from .planner import NeedlePlanner

    path = getattr(plan, 'best', plan)
    ranked = list(getattr(plan, 'ranked', []))[1:1 + alternatives]
    if planner is None:
        from .config import PlannerConfig
        planner = NeedlePlanner(labelmap, PlannerConfig(require_critical=False))
    planner.precompute()
    target = np.asarray(path.target, float)
    entry = np.asarray(path.entry, float)
    needle = target - entry if np.linalg.norm(target - entry) > 0 else np.array([0.0, 1.0, 0.0])
    table, legend = _colour_table(labelmap)
    cap = planner.config.clearance.cap_m

    # Clearance to the nearest critical structure along the path (m), capped.
    k = np.linspace(0.0, 1.0, 200)
    pts = entry + k[:, None] * (target - entry)
    if planner.fields:
        clear = np.minimum(np.min([f.sample(labelmap.to_array(pts)) for f in planner.fields], axis=0), cap)
    else:
        clear = np.full(k.size, cap)

    fig, axes = plt.subplots(1, 2, figsize=(13.5, 6.4), dpi=100)
    ext = m_to_mm(half_width_m)
    lc = None
    for ax, view in zip(axes, ('axial', 'across')):
        u, v = _plane_axes(needle, view)
        labels, inside = _slice(labelmap, target, u, v, half_width_m)
        img = table[np.clip(labels, 0, table.shape[0] - 1)]
        img[~inside] = 0.0
        ax.imshow(img, origin='upper', extent=(-ext, ext, ext, -ext), interpolation='nearest')
        for alt in ranked:
            ends = np.array([alt.entry, alt.target]) - target
            ax.plot(m_to_mm(ends @ u), m_to_mm(ends @ v), color='white', lw=0.8, alpha=0.6, ls='--')
        pu, pv = m_to_mm((pts - target) @ u), m_to_mm((pts - target) @ v)
        segs = np.stack([np.c_[pu[:-1], pv[:-1]], np.c_[pu[1:], pv[1:]]], axis=1)
        lc = LineCollection(segs, cmap='RdYlGn', linewidths=3.0)
        lc.set_array(m_to_mm(0.5 * (clear[:-1] + clear[1:])))
        lc.set_clim(0.0, m_to_mm(cap))
        ax.add_collection(lc)
        ax.plot(pu[0], pv[0], marker='v', ms=11, color='cyan', mec='black', ls='none', label='entry')
        ax.plot(0, 0, marker='*', ms=15, color='yellow', mec='black', ls='none', label='target')
        ax.set_xlim(-ext, ext)
        ax.set_ylim(ext, -ext)
        if view == 'axial':
            ax.set_xlabel('mm toward patient left (in the needle plane)')
            ax.set_ylabel('mm toward posterior')
            ax.set_title('plane nearest to axial', fontsize=10)
        else:
            ax.set_xlabel('mm across, along the needle direction')
            ax.set_ylabel('mm toward inferior')
            ax.set_title('plane of the needle and the head-foot axis', fontsize=10)
    handles = [Patch(color=c, label=name) for name, c in legend] + axes[0].get_legend_handles_labels()[0]
    axes[0].legend(handles=handles, loc='lower left', fontsize=7, framealpha=0.85)
    cb = fig.colorbar(lc, ax=list(axes), fraction=0.025, pad=0.02)
    cb.set_label('clearance to nearest critical structure (mm)')
    if title is None:
        title = (f'planned path: depth {m_to_mm(path.depth):.0f} mm, closest structure '
                 f'{m_to_mm(path.min_clearance):.1f} mm, skin angle {np.degrees(path.skin_angle):.0f}°')
    fig.suptitle(title, fontsize=11)
    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
