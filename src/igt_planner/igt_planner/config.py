"""Planner configuration (SI units throughout: m, rad, s, W).

The same values live in ``config/planner.yaml`` as ROS 2 parameters of
``planner_node`` (nested YAML = dotted parameter names, e.g.
``needle.max_depth_m``). :func:`load_planner_config` reads that file;
``PlannerConfig()`` gives the identical built-in defaults.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    """Needle limits, independent of the robot (skin-to-tip distances)."""

    max_depth_m: float = 0.12   # usable needle length from the skin entry to the tip
    min_depth_m: float = 0.01   # shorter paths are refused (direction ill-defined, no purchase in tissue)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How clearance is sampled along each straight path."""

    step_fraction: float = 0.5      # fine sample step as a fraction of the smallest voxel spacing (<= 0.5)
    # First-pass step (rounded to fine step * 2**k), then bisection down to the fine step.
    coarse_step_m: float = 0.016
    chunk_samples: int = 2_000_000  # bound on samples interpolated in one call (memory)


@dataclasses.dataclass(frozen=True)
class ClearanceConfig:
    """Clearance fields and the air-crossing check."""

    cap_m: float = 0.03          # distances are computed exactly up to this value; larger ones read as "at least cap"
    saturation_m: float = 0.015  # clearance beyond the margin earns no extra score past this
    air_skip_m: float = 0.003    # length after the entry where touching air is expected (skin) and not reported


@dataclasses.dataclass(frozen=True)
class SkinConfig:
    """Skin-entry angle check."""

    max_angle_rad: float = math.radians(60.0)  # largest angle between the needle and the inward skin normal
    normal_sigma_m: float = 0.002              # Gaussian smoothing of the body mask before its gradient is taken
    normal_truncate: float = 2.5               # kernel half-width in sigmas


@dataclasses.dataclass(frozen=True)
class EntryConfig:
    """Candidate entries."""

    tolerance_m: float = 0.003   # an explicit entry may lie this far from the allowed skin region
    max_candidates: int = 20000  # entries kept (uniform random subset, fixed seed) after the depth check
    seed: int = 0                # seed of that subset, for reproducible plans


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Weights of the path score (each term is normalised to [0, 1], 1 = best)."""

    weight_clearance: float = 0.5     # clearance beyond the margin, saturating at clearance.saturation_m
    weight_depth: float = 0.2         # shorter insertion is better (relative to needle.max_depth_m)
    weight_skin_angle: float = 0.15   # closer to the skin normal is better (relative to skin.max_angle_rad)
    weight_joint_margin: float = 0.15  # farther from the robot's joint limits is better
    max_ranked: int = 20              # feasible paths returned in PlanResult.ranked


@dataclasses.dataclass(frozen=True)
class ReachConfig:
    """Cone reachability used when no robot reachability is supplied."""

    # Needle direction at the cone centre, scanner LPS (default posterior: supine patient, guide above).
    cone_axis: tuple = (0.0, 1.0, 0.0)
    cone_half_angle_rad: float = math.radians(45.0)
    cone_max_depth_m: float = 0.15               # guide's insertion range


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """Ablation-zone table (microwave-like) and tip search.

    ``long_diameter_m`` / ``short_diameter_m`` are row-major tables with one row
    per power and one column per time (ROS parameters cannot be 2-D).
    """

    power_w: tuple = (30.0, 60.0, 100.0)
    time_s: tuple = (120.0, 300.0, 600.0)
    long_diameter_m: tuple = (0.020, 0.028, 0.035,
                              0.027, 0.037, 0.045,
                              0.033, 0.045, 0.055)
    short_diameter_m: tuple = (0.014, 0.020, 0.025,
                               0.019, 0.027, 0.034,
                               0.024, 0.034, 0.042)
    tip_protrusion_m: float = 0.005  # the zone reaches this far beyond the needle tip
    tumour_margin_m: float = 0.005   # ablative margin added around the tumour
    offset_min_m: float = -0.015     # tip offsets searched along the needle, around the zone-centred tip
    offset_max_m: float = 0.015
    offset_step_m: float = 0.001
    supersample: int = 2             # sub-voxel points per axis for coverage/volume estimates

    def tables(self):
        """(power_w (P,), time_s (T,), long (P,T), short (P,T)) as arrays."""
        p = np.asarray(self.power_w, float)
        t = np.asarray(self.time_s, float)
        return (p, t, np.asarray(self.long_diameter_m, float).reshape(p.size, t.size),
                np.asarray(self.short_diameter_m, float).reshape(p.size, t.size))


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """All planner parameters; see docs/planning.md for their meaning."""

    needle: NeedleConfig = NeedleConfig()
    sampling: SamplingConfig = SamplingConfig()
    clearance: ClearanceConfig = ClearanceConfig()
    skin: SkinConfig = SkinConfig()
    entry: EntryConfig = EntryConfig()
    ranking: RankingConfig = RankingConfig()
    reach: ReachConfig = ReachConfig()
    ablation: AblationConfig = AblationConfig()
    require_critical: bool = True  # refuse to plan on a map with no critical structure present

    def __post_init__(self):
        validate_config(self)

    def replace(self, **sections) -> 'PlannerConfig':
        """Copy with some fields replaced; ``section={'field': value}`` dicts are merged."""
        kwargs = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
                kwargs[name] = dataclasses.replace(current, **value)
            else:
                kwargs[name] = value
        return dataclasses.replace(self, **kwargs)


def _check(cond: bool, message: str):
    if not cond:
        raise ConfigError(message)


def validate_config(cfg: PlannerConfig) -> None:
    """Raise :class:`ConfigError` naming the first inconsistent value."""
    def finite(name, v):
        _check(isinstance(v, (int, float)) and math.isfinite(v), f'{name} must be a finite number, got {v!r}')

    n = cfg.needle
    finite('needle.max_depth_m', n.max_depth_m)
    finite('needle.min_depth_m', n.min_depth_m)
    _check(0.0 <= n.min_depth_m < n.max_depth_m,
           f'need 0 <= needle.min_depth_m < needle.max_depth_m, got {n.min_depth_m}, {n.max_depth_m}')
    s = cfg.sampling
    finite('sampling.step_fraction', s.step_fraction)
    _check(0.0 < s.step_fraction <= 0.5, f'sampling.step_fraction must be in (0, 0.5] (half-voxel steps at most), '
                                         f'got {s.step_fraction}')
    finite('sampling.coarse_step_m', s.coarse_step_m)
    _check(s.coarse_step_m > 0, f'sampling.coarse_step_m must be > 0, got {s.coarse_step_m}')
    _check(isinstance(s.chunk_samples, int) and s.chunk_samples >= 1000,
           f'sampling.chunk_samples must be an integer >= 1000, got {s.chunk_samples!r}')
    c = cfg.clearance
    for name in ('cap_m', 'saturation_m', 'air_skip_m'):
        finite(f'clearance.{name}', getattr(c, name))
    _check(c.cap_m > 0 and c.saturation_m > 0 and c.air_skip_m >= 0,
           'clearance.cap_m and clearance.saturation_m must be > 0, clearance.air_skip_m >= 0')
    k = cfg.skin
    finite('skin.max_angle_rad', k.max_angle_rad)
    _check(0.0 < k.max_angle_rad <= math.pi / 2, f'skin.max_angle_rad must be in (0, pi/2], got {k.max_angle_rad}')
    _check(k.normal_sigma_m > 0 and k.normal_truncate >= 1.0, 'skin.normal_sigma_m must be > 0, normal_truncate >= 1')
    e = cfg.entry
    finite('entry.tolerance_m', e.tolerance_m)
    _check(e.tolerance_m >= 0, 'entry.tolerance_m must be >= 0')
    _check(isinstance(e.max_candidates, int) and e.max_candidates >= 1, 'entry.max_candidates must be an integer >= 1')
    r = cfg.ranking
    weights = (r.weight_clearance, r.weight_depth, r.weight_skin_angle, r.weight_joint_margin)
    for w in weights:
        finite('ranking.weight_*', w)
    _check(min(weights) >= 0 and sum(weights) > 0, f'ranking weights must be >= 0 and not all zero, got {weights}')
    _check(isinstance(r.max_ranked, int) and r.max_ranked >= 1, 'ranking.max_ranked must be an integer >= 1')
    q = cfg.reach
    axis = np.asarray(q.cone_axis, float)
    _check(axis.shape == (3,) and np.all(np.isfinite(axis)) and np.linalg.norm(axis) > 1e-9,
           f'reach.cone_axis must be a non-zero 3-vector, got {q.cone_axis!r}')
    _check(0 < q.cone_half_angle_rad <= math.pi and q.cone_max_depth_m > 0,
           'reach.cone_half_angle_rad must be in (0, pi] and reach.cone_max_depth_m > 0')
    a = cfg.ablation
    p, t = np.asarray(a.power_w, float), np.asarray(a.time_s, float)
    _check(p.ndim == 1 and t.ndim == 1 and p.size >= 1 and t.size >= 1, 'ablation.power_w and time_s must be lists')
    _check(bool(np.all(np.diff(p) > 0)) and bool(np.all(np.diff(t) > 0)),
           'ablation.power_w and ablation.time_s must be strictly increasing')
    for name in ('long_diameter_m', 'short_diameter_m'):
        v = np.asarray(getattr(a, name), float)
        _check(v.size == p.size * t.size, f'ablation.{name} needs {p.size}x{t.size}={p.size * t.size} values '
                                          f'(row-major, one row per power), got {v.size}')
        _check(bool(np.all(np.isfinite(v))) and bool(np.all(v > 0)), f'ablation.{name} values must be > 0')
    _check(a.tumour_margin_m >= 0 and a.tip_protrusion_m >= 0, 'ablation margins must be >= 0')
    _check(a.offset_min_m <= a.offset_max_m and a.offset_step_m > 0,
           'need ablation.offset_min_m <= offset_max_m and offset_step_m > 0')
    _check(isinstance(a.supersample, int) and 1 <= a.supersample <= 4, 'ablation.supersample must be 1..4')


_SECTIONS = {f.name: f.type for f in dataclasses.fields(PlannerConfig)}


def config_from_params(params: Mapping[str, Any]) -> PlannerConfig:
    """Build a config from ROS parameters (nested dicts or dotted names).

    Unknown names raise :class:`ConfigError` (a typo must not silently fall
    back to a default).
    """
    flat: dict = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f'{prefix}.{key}' if prefix else str(key)
            if isinstance(value, Mapping):
                walk(name, value)
            else:
                flat[name] = value

    walk('', params)
    sections: dict = {}
    top: dict = {}
    defaults = PlannerConfig()
    for name, value in flat.items():
        parts = name.split('.')
        if len(parts) == 1:
            if not hasattr(defaults, parts[0]) or dataclasses.is_dataclass(getattr(defaults, parts[0])):
                raise ConfigError(f'unknown planner parameter {name!r}')
            top[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f'unknown planner parameter {name!r}')
        section = getattr(defaults, parts[0])
        if parts[1] not in {f.name for f in dataclasses.fields(section)}:
            raise ConfigError(f'unknown planner parameter {name!r}')
        default = getattr(section, parts[1])
        if isinstance(default, tuple):
            value = tuple(float(v) for v in value)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            if float(value) != int(value):
                raise ConfigError(f'planner parameter {name!r} must be an integer, got {value!r}')
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        sections.setdefault(parts[0], {})[parts[1]] = value
    return defaults.replace(**sections, **top)


def load_planner_config(path: Optional[str | Path] = None, node_name: str = 'planner_node') -> PlannerConfig:
    """Read a ROS 2 parameter YAML (``planner_node: ros__parameters: {...}``).

    ``path=None`` returns the built-in defaults (identical to the shipped
    ``config/planner.yaml``).
    """
    if path is None:
        return PlannerConfig()
    import yaml  # only needed when a file is read

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f'cannot read planner config {path}: {exc}') from exc
    if not isinstance(doc, Mapping):
        raise ConfigError(f'{path}: expected a mapping at the top level')
    node = doc.get(node_name, doc.get('/**'))
    if not isinstance(node, Mapping) or not isinstance(node.get('ros__parameters'), Mapping):
        raise ConfigError(f'{path}: expected "{node_name}: ros__parameters: {{...}}"')
    return config_from_params(node['ros__parameters'])
