"""Ablation-zone model and tip placement along a planned path.

Model: the ablation zone is an ellipsoid of revolution whose long axis lies
along the needle. Its long and short diameters come from a power x time table
(``config.ablation``; bilinear interpolation inside the table, no
extrapolation). The zone reaches ``tip_protrusion_m`` beyond the needle tip,
so its centre sits ``long/2 - tip_protrusion_m`` behind the tip.

Coverage is the fraction of the tumour grown by the ablative margin
(``tumour_margin_m``, by exact EDT) that lies in the zone, estimated with
``supersample**3`` points per voxel. Critical structures touched are reported
with the volume (m^3) of them inside the zone. :func:`plan_ablation` moves the
tip along the path (offsets relative to the target) and keeps the position
with the highest coverage whose zone touches no critical structure and whose
needle path (entry to the new tip) passes every planner check. The search is
centred on the tip position that puts the zone centre on the target.
All points are scanner LPS metres.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import numpy as np
from scipy import ndimage

from . import reasons as R
from .config import AblationConfig
from .errors import AblationError, PlanningError


def zone_size(power_w: float, time_s: float, cfg: AblationConfig) -> tuple:
    """(long, short) zone diameters (m) for a power (W) and time (s), bilinear in the table."""
    p, t, long_tab, short_tab = cfg.tables()
    for name, v, axis, unit in (('power', power_w, p, 'W'), ('time', time_s, t, 's')):
        if not np.isfinite(v):
            raise AblationError(f'ablation {name} is not finite')
        if v < axis[0] - 1e-9 or v > axis[-1] + 1e-9:
            raise AblationError(f'ablation {name} {v:g} {unit} is outside the table range '
                                f'[{axis[0]:g}, {axis[-1]:g}] {unit}: no extrapolation')

    def interp(tab):
        # Interpolate along time for every power, then along power.
        along_t = np.array([np.interp(time_s, t, row) for row in tab])
        return float(np.interp(power_w, p, along_t))

    return interp(long_tab), interp(short_tab)


@dataclasses.dataclass(frozen=True)
class AblationZone:
    """Ellipsoid of revolution: ``centre`` (m), unit ``axis`` (needle direction), diameters (m)."""

    centre: np.ndarray
    axis: np.ndarray
    long_diameter_m: float
    short_diameter_m: float

    @classmethod
    def at_tip(cls, tip, direction, long_m: float, short_m: float, protrusion_m: float) -> 'AblationZone':
        d = np.asarray(direction, float)
        d = d / np.linalg.norm(d)
        centre = np.asarray(tip, float) + (protrusion_m - 0.5 * long_m) * d
        return cls(centre, d, float(long_m), float(short_m))

    @property
    def volume_m3(self) -> float:
        return float(4.0 / 3.0 * np.pi * (self.long_diameter_m / 2) * (self.short_diameter_m / 2) ** 2)

    def contains(self, points) -> np.ndarray:
        """True for (N, 3) points inside the ellipsoid."""
        v = np.atleast_2d(np.asarray(points, float)) - self.centre
        along = v @ self.axis
        across2 = np.einsum('ij,ij->i', v, v) - along ** 2
        a, b = 0.5 * self.long_diameter_m, 0.5 * self.short_diameter_m
        return (along / a) ** 2 + across2 / b ** 2 <= 1.0


@dataclasses.dataclass
class ZoneReport:
    coverage: float          # fraction of tumour + margin inside the zone
    touched: dict            # structure name -> volume inside the zone (m^3), only non-zero ones


@dataclasses.dataclass
class AblationPlan:
    """Chosen tip position and what its zone does."""

    power_w: float
    time_s: float
    zone: AblationZone
    tip: np.ndarray
    tip_offset_m: float          # along the needle from the target (+ = deeper)
    coverage: float
    touched: dict                # name -> m^3
    safe: bool                   # no critical structure touched and the path is feasible
    reasons: list                # why it is not safe (empty when safe)
    notes: list
    offsets_m: np.ndarray        # every offset tried
    coverage_by_offset: np.ndarray
    touched_by_offset: np.ndarray  # total critical volume touched (m^3)
    path_ok_by_offset: np.ndarray


def _subvoxel_offsets(k: int) -> np.ndarray:
    """(k^3, 3) offsets in voxel units of sub-voxel points (centres of a k x k x k split)."""
    g = (np.arange(k) + 0.5) / k - 0.5
    return np.stack(np.meshgrid(g, g, g, indexing='ij'), axis=-1).reshape(-1, 3)


def _points_of(labelmap, mask_coords: np.ndarray, k: int) -> np.ndarray:
    """World sub-voxel points of the voxels at integer array coords (N, 3) -> (N * k^3, 3)."""
    sub = (mask_coords[:, None, :] + _subvoxel_offsets(k)[None, :, :]).reshape(-1, 3)
    return labelmap.to_world(sub)


def tumour_region_coords(labelmap, tumour_labels: Iterable[int], margin_m: float) -> np.ndarray:
    """Integer array coords (N, 3) of voxels within ``margin_m`` of the tumour (exact EDT)."""
    labels = list(tumour_labels)
    mask = np.isin(labelmap.data, labels)
    if not np.any(mask):
        names = ', '.join(f"'{labelmap.name(label)}'" for label in labels) or 'none given'
        raise AblationError(f'no tumour voxel in the label map (tumour labels: {names})')
    nz = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    pad = np.ceil(margin_m / labelmap.spacing).astype(int) + 1
    lo = np.maximum([n[0] for n in nz] - pad, 0)
    hi = np.minimum([n[-1] for n in nz] + pad, np.asarray(labelmap.shape) - 1)
    sub = mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]
    dist = ndimage.distance_transform_edt(~sub, sampling=labelmap.spacing)
    return np.argwhere(dist <= margin_m + 1e-12) + lo


def _critical_points(labelmap, lo_w: np.ndarray, hi_w: np.ndarray, k: int):
    """Sub-voxel points and labels of critical voxels inside the world box [lo_w, hi_w]."""
    corners = np.array([[x, y, z] for x in (lo_w[0], hi_w[0]) for y in (lo_w[1], hi_w[1])
                        for z in (lo_w[2], hi_w[2])])
    a = labelmap.to_array(corners)
    lo = np.clip(np.floor(a.min(axis=0)).astype(int) - 1, 0, np.asarray(labelmap.shape) - 1)
    hi = np.clip(np.ceil(a.max(axis=0)).astype(int) + 1, 0, np.asarray(labelmap.shape) - 1)
    sub = labelmap.data[tuple(slice(x, y + 1) for x, y in zip(lo, hi))]
    critical = list(set(labelmap.margins_m) | labelmap.bone_labels)
    coords = np.argwhere(np.isin(sub, critical))
    labels = sub[tuple(coords.T)] if coords.size else np.empty(0, int)
    coords = coords + lo
    pts = _points_of(labelmap, coords, k) if coords.size else np.empty((0, 3))
    return pts, np.repeat(labels, k ** 3)


def evaluate_zone(labelmap, zone: AblationZone, tumour_labels: Optional[Iterable[int]] = None,
                  margin_m: float = 0.005, supersample: int = 2) -> ZoneReport:
    """Coverage of tumour + margin and critical volumes touched by one zone."""
    labels = labelmap.tumour_labels if tumour_labels is None else tumour_labels
    region = _points_of(labelmap, tumour_region_coords(labelmap, labels, margin_m), supersample)
    r = 0.5 * max(zone.long_diameter_m, zone.short_diameter_m)
    crit_pts, crit_lab = _critical_points(labelmap, zone.centre - r, zone.centre + r, supersample)
    return _report(labelmap, zone, region, crit_pts, crit_lab, supersample)


def _report(labelmap, zone, region_pts, crit_pts, crit_lab, k) -> ZoneReport:
    coverage = float(np.mean(zone.contains(region_pts)))
    touched = {}
    if crit_pts.shape[0]:
        inside = zone.contains(crit_pts)
        sub_volume = labelmap.voxel_volume / k ** 3
        for label in np.unique(crit_lab[inside]):
            touched[labelmap.name(int(label))] = float(np.count_nonzero(crit_lab[inside] == label) * sub_volume)
    return ZoneReport(coverage, touched)


def plan_ablation(planner, path, power_w: float, time_s: float,
                  tumour_labels: Optional[Iterable[int]] = None) -> AblationPlan:
    """Choose the tip position along ``path`` (a NeedlePath) for a power/time setting.

    Offsets from ``config.ablation.offset_min_m`` to ``offset_max_m`` (step
    ``offset_step_m``) move the tip along the needle around the position that
    centres the zone on the target; results report the tip offset relative to
    the target (+ = deeper).
    Each candidate tip is checked with :meth:`NeedlePlanner.validate` (depth,
    reach and clearance of the longer/shorter path) and its zone with
    :func:`evaluate_zone`. The safe offset with the highest coverage wins (ties:
    the one closest to the target). When no offset is safe the result has
    ``safe=False`` and says why; it is never silently empty.
    """
    cfg = planner.config.ablation
    lm = planner.labelmap
    labels = lm.tumour_labels if tumour_labels is None else list(tumour_labels)
    long_m, short_m = zone_size(power_w, time_s, cfg)
    d = np.asarray(path.direction, float)
    # Search around the tip position that centres the zone on the target.
    centred = 0.5 * long_m - cfg.tip_protrusion_m
    offsets = np.round(centred + np.arange(cfg.offset_min_m, cfg.offset_max_m + 0.5 * cfg.offset_step_m,
                                           cfg.offset_step_m), 9)
    region = _points_of(lm, tumour_region_coords(lm, labels, cfg.tumour_margin_m), cfg.supersample)
    tips = path.target[None, :] + offsets[:, None] * d
    zones = [AblationZone.at_tip(tp, d, long_m, short_m, cfg.tip_protrusion_m) for tp in tips]
    r = 0.5 * max(long_m, short_m)
    centres = np.array([z.centre for z in zones])
    crit_pts, crit_lab = _critical_points(lm, centres.min(axis=0) - r, centres.max(axis=0) + r, cfg.supersample)
    reports = [_report(lm, z, region, crit_pts, crit_lab, cfg.supersample) for z in zones]
    path_ok = np.zeros(offsets.size, bool)
    path_reasons = []
    for i, tp in enumerate(tips):
        try:
            check = planner.validate(path.entry, tp)
            path_ok[i] = check.feasible
            path_reasons.append(check.reasons)
        except PlanningError as exc:  # e.g. the tip would sit in bone or outside the image
            path_reasons.append([str(exc)])
    coverage = np.array([rep.coverage for rep in reports])
    touched_total = np.array([sum(rep.touched.values()) for rep in reports])
    safe = path_ok & (touched_total == 0)
    if np.any(safe):
        cand = np.flatnonzero(safe)
    else:
        # Nothing is safe: show the least harmful option (feasible path first, least touched volume).
        key = np.lexsort((np.abs(offsets), -coverage, touched_total, ~path_ok))
        cand = key[:1]
    best_cov = coverage[cand].max()
    ties = cand[np.isclose(coverage[cand], best_cov, rtol=0, atol=1e-12)]
    i = int(ties[np.argmin(np.abs(offsets[ties]))])
    reasons = []
    if not path_ok[i]:
        reasons += [f'needle path to the tip: {x}' for x in path_reasons[i]]
    for name, vol in sorted(reports[i].touched.items()):
        reasons.append(f"ablation zone touches '{name}' ({R.format_volume(vol)})")
    notes = [f'zone {R.format_mm(long_m)} x {R.format_mm(short_m)} covers {100 * coverage[i]:.1f}% of the tumour '
             f'+ {R.format_mm(cfg.tumour_margin_m)} margin, tip {R.format_mm(offsets[i])} beyond the target']
    if coverage[i] < 1.0:
        notes.append('incomplete coverage: consider a larger setting or an additional ablation')
    return AblationPlan(power_w=float(power_w), time_s=float(time_s), zone=zones[i], tip=tips[i],
                        tip_offset_m=float(offsets[i]), coverage=float(coverage[i]), touched=reports[i].touched,
                        safe=bool(safe[i]), reasons=reasons, notes=notes, offsets_m=offsets,
                        coverage_by_offset=coverage, touched_by_offset=touched_total, path_ok_by_offset=path_ok)
