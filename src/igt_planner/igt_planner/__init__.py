"""igt_planner: straight-needle trajectory planning on segmented images (no ROS).

Public API (scanner frame = LPS, metres, everywhere):

* :class:`LabelMap` -- label volume + affine + label roles (names, margins, bones, air, tumour).
* :class:`EntryRegion` -- allowed skin-entry mask or labels.
* :class:`NeedlePlanner` -- ``plan(target, entry_points=None) -> PlanResult``,
  ``validate(entry, target) -> NeedlePath``; caches distance fields per map.
* :func:`plan`, :func:`validate_plan` -- one-shot versions.
* :class:`ConeReachability`, :class:`RobotReachability` -- reachability models.
* :func:`plan_ablation`, :func:`zone_size`, :func:`evaluate_zone` -- ablation zone.
* :func:`render_plan_slice` -- PNG of a plan.
* :class:`PlannerConfig`, :func:`load_planner_config` -- parameters.
* Errors: :class:`PlanningError` and subclasses (see :mod:`igt_planner.errors`).
"""
from .ablation import AblationPlan, AblationZone, evaluate_zone, plan_ablation, zone_size
from .candidates import EntryRegion
from .config import PlannerConfig, config_from_params, load_planner_config
from .errors import (AblationError, ConfigError, DegenerateAffine, EmptyLabelMap, InvalidAffine,
                     InvalidEntryRegion, InvalidLabelMap, InvalidTarget, NoCriticalStructures, NoFeasiblePath,
                     NonFiniteInput, PlanningError, TargetInAir, TargetInBone, TargetInCriticalStructure,
                     TargetOutsideImage)
from .labelmap import LabelMap
from .planner import NeedlePath, NeedlePlanner, PlanResult, plan, validate_plan
from .reachability import BatchReach, ConeReachability, Reachability, ReachResult, RobotReachability


def render_plan_slice(labelmap, plan, path_png, **kwargs):
    """See :func:`igt_planner.render.render_plan_slice` (matplotlib imported on use)."""
    from .render import render_plan_slice as _render
    return _render(labelmap, plan, path_png, **kwargs)


__all__ = [
    'AblationError', 'AblationPlan', 'AblationZone', 'BatchReach', 'ConeReachability', 'ConfigError',
    'DegenerateAffine', 'EmptyLabelMap', 'EntryRegion', 'InvalidAffine', 'InvalidEntryRegion', 'InvalidLabelMap',
    'InvalidTarget', 'LabelMap', 'NeedlePath', 'NeedlePlanner', 'NoCriticalStructures', 'NoFeasiblePath',
    'NonFiniteInput', 'PlanResult', 'PlannerConfig', 'PlanningError', 'ReachResult', 'Reachability',
    'RobotReachability', 'TargetInAir', 'TargetInBone', 'TargetInCriticalStructure', 'TargetOutsideImage',
    'config_from_params', 'evaluate_zone', 'load_planner_config', 'plan', 'plan_ablation', 'render_plan_slice',
    'validate_plan', 'zone_size',
]
