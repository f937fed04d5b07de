"""What the label values of a segmentation mean, and the label map built from an image (no ROS).

* :class:`LabelRoles` -- the ``labels.*`` parameters checked and grouped by role (air, tissue,
  entry region, tumour, critical structure with its margin, bone);
* :func:`labelmap_from_volume` -- a :class:`LabelMap` from an igt_robot Volume, refusing what is not
  a segmentation (NaN, fractional or negative values, undescribed labels);
* :func:`surface_points` -- the surface of a set of labels, for the rviz picture.

planner_node calls these; they are unit-tested without a ROS graph.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from igt_planner import reasons as R
from igt_planner.errors import InvalidLabelMap, NonFiniteInput
from igt_planner.labelmap import LabelMap

ROLES = ('air', 'tissue', 'entry', 'tumour', 'critical', 'bone')


@dataclasses.dataclass(frozen=True)
class LabelRoles:
    """What each label value means (from the ``labels.*`` parameters)."""

    names: dict                  # value -> name
    margins_m: dict              # critical and bone values -> margin (m)
    bone: frozenset
    air: frozenset
    tumour: frozenset
    entry: frozenset             # empty = the whole skin is allowed

    @classmethod
    def from_params(cls, values: Sequence[int], names: Sequence[str], roles: Sequence[str],
                    margins_m: Sequence[float]) -> 'LabelRoles':
        """Check the parallel lists; raise ValueError naming the first problem."""
        values, names, roles, margins = list(values), list(names), list(roles), list(margins_m)
        if not (len(values) == len(names) == len(roles) == len(margins)):
            raise ValueError(f'labels.values/names/roles/margins_m must have equal lengths, got '
                             f'{len(values)}/{len(names)}/{len(roles)}/{len(margins)}')
        if len(set(values)) != len(values) or any(int(v) < 0 for v in values):
            raise ValueError(f'labels.values must be distinct non-negative integers, got {values}')
        if len(set(names)) != len(names) or not all(str(n).strip() for n in names):
            raise ValueError(f'labels.names must be distinct and non-empty, got {names}')
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ValueError(f'labels.roles {bad} unknown; each must be one of {", ".join(ROLES)}')
        for v, m in zip(values, margins):
            if not (math.isfinite(float(m)) and float(m) >= 0.0):
                raise ValueError(f'labels.margins_m of label {v} must be finite and >= 0 m, got {m}')
        if 'air' not in roles:
            raise ValueError('labels.roles names no air label: the skin (body next to air) would be undefined')
        by_role = {r: frozenset(int(v) for v, rr in zip(values, roles) if rr == r) for r in ROLES}
        margins_by_value = {int(v): float(m) for v, m, r in zip(values, margins, roles) if r in ('critical', 'bone')}
        return cls(names={int(v): str(n) for v, n in zip(values, names)}, margins_m=margins_by_value,
                   bone=by_role['bone'], air=by_role['air'], tumour=by_role['tumour'], entry=by_role['entry'])

    def describe(self) -> str:
        def one(v):
            name = self.names[v]
            if v in self.bone:
                return f'{v} {name} (bone, margin {R.format_mm(self.margins_m[v])})'
            if v in self.margins_m:
                return f'{v} {name} (critical, margin {R.format_mm(self.margins_m[v])})'
            role = ('air' if v in self.air else 'tumour' if v in self.tumour else
                    'entry region' if v in self.entry else 'tissue')
            return f'{v} {name} ({role})'
        return ', '.join(one(v) for v in sorted(self.names))


def labelmap_from_volume(volume, roles: LabelRoles, refuse_unknown: bool = True, source: str = '') -> LabelMap:
    """A :class:`LabelMap` from an ``igt_robot`` Volume (data [k, j, i], affine index -> scanner LPS m).

    Float files holding whole numbers (segmentations saved as float) are accepted;
    NaN/inf or fractional values are refused, as are (with ``refuse_unknown``)
    label values the roles do not describe.
    """
    data = np.asarray(volume.data)
    where = f' {source}' if source else ''
    if data.dtype.kind == 'f':
        finite = np.isfinite(data)
        if not finite.all():
            raise NonFiniteInput(f'label map{where} contains NaN or infinite values in '
                                 f'{int(data.size - finite.sum())} voxels')
        fractional = data != np.round(data)
        if np.any(fractional):
            raise InvalidLabelMap(f'label map{where} holds non-integer values (e.g. {float(data[fractional][0]):g}): '
                                  'not a segmentation')
        if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int32).max):
            raise InvalidLabelMap(f'label map{where} holds values outside 0..{np.iinfo(np.int32).max}')
        data = data.astype(np.int32)
    elif data.dtype.kind in 'iu' and data.size and data.min() < 0:
        raise InvalidLabelMap(f'label map{where} holds negative labels')
    if refuse_unknown and data.size and data.dtype.kind in 'iu':
        present = np.flatnonzero(np.bincount(data.ravel().astype(np.int64)))
        unknown = sorted(set(int(v) for v in present) - set(roles.names))
        if unknown:
            raise InvalidLabelMap(f'label map{where} holds label values {unknown} not described by labels.values '
                                  f'{sorted(roles.names)} (an unknown label may be a critical structure; '
                                  'describe it or set labels.refuse_unknown false)')
    return LabelMap(data, volume.affine, roles.names, roles.margins_m, bone_labels=roles.bone,
                    air_labels=roles.air, tumour_labels=roles.tumour)


def surface_points(labelmap: LabelMap, labels, max_points: int) -> np.ndarray:
    """(N, 3) scanner LPS centres of the surface voxels of ``labels`` (decimated evenly to ``max_points``)."""
    mask = np.isin(labelmap.data, list(labels))
    if not mask.any():
        return np.empty((0, 3))
    surface = mask & ~ndimage.binary_erosion(mask, border_value=0)
    flat = np.flatnonzero(surface)
    if flat.size > max_points:
        # An even stride over the flat order keeps the spread of the surface (deterministic).
        flat = flat[np.linspace(0, flat.size - 1, max_points).astype(np.intp)]
    coords = np.stack(np.unravel_index(flat, labelmap.shape), axis=1).astype(float)
    return labelmap.to_world(coords)
