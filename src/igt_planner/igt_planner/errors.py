"""Exceptions of the planning core.

Every failure the planner can report is a :class:`PlanningError` subclass whose
message names the offending input and why it is unusable, so a ROS node can
forward ``str(exc)`` to the operator unchanged.
"""
from __future__ import annotations


class PlanningError(Exception):
    """Base class: planning could not proceed; the message says why."""


class ConfigError(PlanningError):
    """A planner configuration value is missing, out of range or inconsistent."""


class NonFiniteInput(PlanningError):
    """An input (target, entry, affine, margin) contains NaN or infinity."""


class InvalidLabelMap(PlanningError):
    """The label map array is unusable (wrong dimensionality, dtype, shape)."""


class EmptyLabelMap(InvalidLabelMap):
    """The label map has no voxels, or no voxel inside the body."""


class NoCriticalStructures(InvalidLabelMap):
    """No critical structure is present although the configuration requires one."""


class InvalidAffine(PlanningError):
    """The index-to-scanner affine is malformed (shape, last row, shear)."""


class DegenerateAffine(InvalidAffine):
    """The affine's 3x3 part is singular (a zero or collapsed voxel axis)."""


class InvalidTarget(PlanningError):
    """The target point cannot be planned to."""


class TargetOutsideImage(InvalidTarget):
    """The target lies outside the label map's field of view."""


class TargetInAir(InvalidTarget):
    """The target lies in air (outside the body)."""


class TargetInBone(InvalidTarget):
    """The target lies inside a bone label."""


class TargetInCriticalStructure(InvalidTarget):
    """The target lies inside a critical structure (e.g. a vessel)."""


class InvalidEntryRegion(PlanningError):
    """The entry constraint is unusable (wrong shape, no skin voxel in it, bad points)."""


class AblationError(PlanningError):
    """The ablation request is unusable (power/time outside the table, no tumour)."""


class NoFeasiblePath(PlanningError):
    """Every candidate path was rejected.

    Attributes:
        counts: rejected candidates per reason kind (each counted once, under
            its first failing check).
        best_rejected: the rejected :class:`~igt_planner.planner.NeedlePath`
            that came closest to being feasible, with its full list of reasons.
        n_candidates: number of candidates examined.
        notes: extra explanations (e.g. the target itself violates a margin).
    """

    def __init__(self, message: str, counts: dict, best_rejected=None,
                 n_candidates: int = 0, notes: tuple = ()):
        super().__init__(message)
        self.counts = dict(counts)
        self.best_rejected = best_rejected
        self.n_candidates = int(n_candidates)
        self.notes = tuple(notes)
