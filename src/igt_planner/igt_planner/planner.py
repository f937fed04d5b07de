"""Straight-needle trajectory planning on a label map.

Pipeline (per target; see docs/planning.md):

1. Check the inputs (target inside the image, not in air/bone/critical
   structure; finite entries) -- :class:`~igt_planner.errors.PlanningError`
   subclasses otherwise.
2. Candidate entries: the skin voxels of the allowed entry region, or the
   given points (then checked against that region / the skin).
3. Cheap checks on all candidates, in order: entry region, depth (needle
   length), angle to the skin normal, robot reachability.
4. Clearance of the survivors: exact minimum, along each path, of the
   distance to every critical structure (cached capped EDTs, trilinear
   samples at <= half-voxel steps, evaluated by branch and bound -- see
   :mod:`igt_planner.clearance`), then the air-crossing check.
5. Rank the feasible paths by the weighted score of :mod:`igt_planner.ranking`.

A candidate is counted, in ``rejected_counts``, under the first check it fails.
All points are scanner LPS metres.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Optional

import numpy as np

from . import reasons as R
from .candidates import EntryRegion, SkinIndex, SkinNormals, check_points, flat_to_array, thin
from .clearance import StructureField, build_air_field, build_structure_field, segment_minima
from .config import PlannerConfig
from .errors import (InvalidEntryRegion, InvalidTarget, NoCriticalStructures, NoFeasiblePath, NonFiniteInput,
                     TargetInAir, TargetInBone, TargetInCriticalStructure, TargetOutsideImage)
from .labelmap import LabelMap
from .ranking import rank_order, score, score_terms
from .reachability import BatchReach, ConeReachability, Reachability

# Check stages in the order they run; a candidate's failing stage decides its kind.
STAGES = ('region', 'depth', 'skin', 'reach', 'clearance', 'air')


@dataclasses.dataclass
class NeedlePath:
    """One straight path, feasible or not (scanner LPS, SI units).

    ``clearance`` maps structure name -> minimum distance (m) from the path to
    that structure; values equal to the field's cap mean "at least this".
    ``reasons`` is empty for a feasible path.
    """

    entry: np.ndarray
    target: np.ndarray
    direction: np.ndarray          # unit vector entry -> target
    depth: float                   # m, entry to target
    clearance: dict                # name -> m
    min_clearance: float           # m, smallest of ``clearance`` (cap when there is no structure)
    clearance_slack: float         # m, smallest (clearance - margin)
    score: float                   # [0, 1], NaN when infeasible
    reachable: bool
    joints: Optional[np.ndarray]
    reasons: list
    reason_kinds: list
    skin_angle: float              # rad between the needle and the inward skin normal
    joint_limit_margin: float
    feasible: bool
    score_terms: dict = dataclasses.field(default_factory=dict)
    clearance_cap: dict = dataclasses.field(default_factory=dict)  # name -> cap (m): clearance == cap means >= cap

    def clearance_text(self) -> str:
        """Per-structure clearances for display ('aorta ≥ 30 mm, rib 8 mm')."""
        return ', '.join(f'{name} {R.format_clearance(c, self.clearance_cap.get(name, float("inf")))}'
                         for name, c in self.clearance.items())

    def explain(self) -> str:
        """One line for the operator."""
        if self.feasible:
            closest = min(self.clearance, key=self.clearance.get) if self.clearance else None
            near = (f"closest structure '{closest}' at "
                    f"{R.format_clearance(self.clearance[closest], self.clearance_cap.get(closest, float('inf')))}"
                    if closest else 'no critical structure')
            return (f'feasible: depth {R.format_mm(self.depth)}, {near}, skin angle '
                    f'{R.format_angle(self.skin_angle)}, score {self.score:.3f}')
        return 'rejected: ' + '; '.join(self.reasons)


@dataclasses.dataclass
class PlanResult:
    """Outcome of :meth:`NeedlePlanner.plan`.

    ``ranked`` holds the best ``ranking.max_ranked`` feasible paths (best
    first, ``best`` is ``ranked[0]``); ``rejected_counts`` counts rejected
    candidates per reason kind (each under its first failing check);
    ``rejected_examples`` gives, per kind, the rejected path that came closest
    to being feasible with its full reasons; ``timings`` in seconds.
    """

    best: NeedlePath
    ranked: list
    rejected_counts: dict
    rejected_examples: dict
    timings: dict
    n_candidates: int
    n_feasible: int
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CandidateBatch:
    """Per-candidate arrays of one evaluation (NaN = not evaluated)."""

    entries: np.ndarray             # (N, 3) m
    target: np.ndarray              # (3,)
    depth: np.ndarray
    direction: np.ndarray           # (N, 3)
    region_distance: np.ndarray     # m, NaN when the entry came from the region itself
    skin_angle: np.ndarray          # rad
    skin_done: np.ndarray
    reach_done: np.ndarray
    reachable: np.ndarray
    joint_limit_margin: np.ndarray
    joints: Optional[np.ndarray]
    reach: Optional[BatchReach]
    reach_row: np.ndarray           # row in ``reach`` per candidate (-1 if not checked)
    clearance: np.ndarray           # (S, N) m
    clearance_at: np.ndarray        # (S, N) m along the path of the minimum
    clearance_done: np.ndarray
    air_min: np.ndarray
    air_at: np.ndarray
    air_done: np.ndarray
    kind: np.ndarray                # first failing kind ('' when feasible)
    stage: np.ndarray               # index into STAGES of the first failure (len(STAGES) if feasible)
    feasible: np.ndarray
    slack: np.ndarray
    score: np.ndarray

    @property
    def n(self) -> int:
        return self.entries.shape[0]


class NeedlePlanner:
    """Plans needle paths on one label map; caches the per-map precomputation.

    Args:
        labelmap: the segmented volume with label roles.
        config: planner parameters (defaults: ``PlannerConfig()``).
        reachability: robot reachability; default a :class:`ConeReachability`
            from ``config.reach``.
        entry_region: allowed skin region; ``None`` allows the whole skin.

    The distance fields (one capped EDT per critical label, plus the air
    field) and the skin voxels are built on first use (or by
    :meth:`precompute`) and reused by every plan/validate call.
    """

    def __init__(self, labelmap: LabelMap, config: Optional[PlannerConfig] = None,
                 reachability: Optional[Reachability] = None, entry_region: Optional[EntryRegion] = None):
        self.labelmap = labelmap
        self.config = config or PlannerConfig()
        if reachability is None:
            q = self.config.reach
            reachability = ConeReachability(q.cone_axis, q.cone_half_angle_rad, q.cone_max_depth_m)
        self.reachability = reachability
        self.entry_region = entry_region
        if self.config.require_critical and not labelmap.critical_labels:
            declared = sorted(set(labelmap.margins_m) | labelmap.bone_labels)
            raise NoCriticalStructures(
                'no critical structure in the label map: ' +
                (f'labels {declared} are declared critical but absent from the volume' if declared
                 else 'no label has a safety margin or is declared bone') +
                ' (set require_critical false to plan without clearance checks)')
        # Dense sampling step: <= half of the smallest voxel spacing.
        self.fine_step = self.config.sampling.step_fraction * float(labelmap.spacing.min())
        # Bisection depth: the coarse step is the fine step times the power of two nearest the configured one.
        ratio = self.config.sampling.coarse_step_m / self.fine_step
        self.levels = int(np.clip(np.floor(np.log2(max(ratio, 1.0)) + 0.5), 0, 10))
        # Closer than half the smallest voxel means the path passes through the structure.
        self.cross_threshold = 0.5 * float(labelmap.spacing.min())
        self.fields: Optional[list] = None
        self.air_field: Optional[StructureField] = None
        self.skin: Optional[SkinIndex] = None
        self.normals: Optional[SkinNormals] = None
        self.precompute_timings: dict = {}

    # ------------------------------------------------------------------ setup
    def precompute(self) -> dict:
        """Build (once) the skin index, one capped EDT per critical label and the air field.

        Returns the build times in seconds (empty dict when already cached).
        """
        if self.fields is not None:
            return {}
        t = {}
        t0 = time.perf_counter()
        self.skin = SkinIndex(self.labelmap, self.entry_region)
        t['skin_s'] = time.perf_counter() - t0
        t1 = time.perf_counter()
        k = self.config.skin
        self.normals = SkinNormals(self.labelmap, flat_to_array(self.labelmap, self.skin.allowed_flat),
                                   k.normal_sigma_m, k.normal_truncate)
        t['skin_normals_s'] = time.perf_counter() - t1
        c = self.config.clearance
        coarse = self.fine_step * (1 << self.levels)
        fields = []
        # Bones first: a bone crossing is the most severe finding, and paths
        # that cross stop being sampled against the remaining structures.
        labels = sorted(self.labelmap.critical_labels,
                        key=lambda label: (label not in self.labelmap.bone_labels, label))
        for label in labels:
            cap = max(c.cap_m, self.labelmap.margin(label) + c.saturation_m)
            f = build_structure_field(self.labelmap, label, cap, coarse)
            t[f'edt_{f.name}_s'] = f.build_seconds
            fields.append(f)
        # Only "is any sample in air" matters: report up to twice the threshold.
        self.air_field = build_air_field(self.labelmap, 2 * self.cross_threshold, coarse)
        t['edt_air_s'] = self.air_field.build_seconds
        self.fields = fields
        t['total_s'] = time.perf_counter() - t0
        self.precompute_timings = t
        return t

    @property
    def field_names(self) -> list:
        self.precompute()
        return [f.name for f in self.fields]

    # ------------------------------------------------------------------ checks
    def check_target(self, target) -> np.ndarray:
        """Validate a target (scanner LPS m); return it as a (3,) array or raise InvalidTarget."""
        p = np.asarray(target, dtype=float)
        if p.shape != (3,):
            raise InvalidTarget(f'target must be a 3-vector (scanner LPS, m), got shape {p.shape}')
        if not np.all(np.isfinite(p)):
            raise NonFiniteInput(f'target contains NaN or infinite coordinates: {p.tolist()}')
        lm = self.labelmap
        a = lm.to_array(p)
        if not lm.inside(a)[0]:
            lo, hi = lm.extent_world()
            raise TargetOutsideImage(
                f'target ({", ".join(R.format_mm(v) for v in p)}) is outside the image, which spans '
                f'({", ".join(R.format_mm(v) for v in lo)}) to ({", ".join(R.format_mm(v) for v in hi)})')
        label = int(lm.label_at(p)[0])
        if label in lm.air_labels:
            raise TargetInAir(f"target lies in air (label {label} '{lm.name(label)}'), outside the body")
        if label in lm.bone_labels:
            raise TargetInBone(f"target lies inside bone '{lm.name(label)}' (label {label})")
        if label in lm.margins_m:
            raise TargetInCriticalStructure(f"target lies inside the critical structure '{lm.name(label)}' "
                                            f"(label {label})")
        return p

    def target_notes(self, target: np.ndarray) -> list:
        """Explanations when the target itself is inside a structure's margin (every path then fails)."""
        self.precompute()
        a = self.labelmap.to_array(target)[None, :]
        notes = []
        for f in self.fields:
            d = float(f.sample(a)[0])
            if d < f.margin_m:
                notes.append(f"the target itself is {R.format_mm(d)} from '{f.name}' (margin "
                             f"{R.format_mm(f.margin_m)}): every path ends inside that margin")
        return notes

    # ------------------------------------------------------------------ core
    def evaluate(self, entries, target, full: bool = False, check_region: bool = True) -> CandidateBatch:
        """Run the checks on (N, 3) entries to one target (inputs must be valid).

        ``full=False``: each check runs only on the survivors of the previous
        ones (fast; what :meth:`plan` does). ``full=True``: every check runs on
        every candidate (complete reasons; what :meth:`validate` does).
        ``check_region=False`` skips the entry-region check (entries taken
        from the region itself).
        """
        self.precompute()
        cfg = self.config
        lm = self.labelmap
        e = np.asarray(entries, float).reshape(-1, 3)
        t = np.asarray(target, float)
        n = e.shape[0]
        S = len(self.fields)
        v = t - e
        depth = np.linalg.norm(v, axis=1)
        with np.errstate(invalid='ignore', divide='ignore'):
            direction = v / depth[:, None]
        b = CandidateBatch(
            entries=e, target=t, depth=depth, direction=direction,
            region_distance=np.full(n, np.nan), skin_angle=np.full(n, np.nan), skin_done=np.zeros(n, bool),
            reach_done=np.zeros(n, bool), reachable=np.zeros(n, bool), joint_limit_margin=np.full(n, np.nan),
            joints=None, reach=None, reach_row=np.full(n, -1), clearance=np.full((S, n), np.nan),
            clearance_at=np.full((S, n), np.nan), clearance_done=np.zeros(n, bool), air_min=np.full(n, np.nan),
            air_at=np.full(n, np.nan), air_done=np.zeros(n, bool), kind=np.full(n, '', dtype=object),
            stage=np.full(n, len(STAGES)), feasible=np.zeros(n, bool), slack=np.full(n, np.nan),
            score=np.full(n, np.nan))
        alive = np.ones(n, bool)

        def fail(stage: int, kind, rows_mask):
            """Record the first failure of rows (kind: str or per-row object array)."""
            first = rows_mask & (b.stage == len(STAGES))
            b.stage[first] = stage
            b.kind[first] = kind[first] if isinstance(kind, np.ndarray) else kind
            if not full:
                alive[rows_mask] = False

        # 0. entry region (explicit entries only)
        if check_region:
            b.region_distance[:] = self.skin.distance_to_allowed(e)
            fail(0, R.OUTSIDE_ENTRY_REGION, b.region_distance > cfg.entry.tolerance_m)
        # 1. depth
        fail(1, R.TOO_SHALLOW, depth < cfg.needle.min_depth_m)
        fail(1, R.TOO_DEEP, depth > cfg.needle.max_depth_m)
        # 2. skin angle
        rows = np.flatnonzero(alive)
        if rows.size:
            normals = self.normals.normals(lm.to_array(e[rows]))
            cosang = np.einsum('ij,ij->i', direction[rows], -normals)
            b.skin_angle[rows] = np.arccos(np.clip(cosang, -1.0, 1.0))  # NaN stays NaN (undefined)
            b.skin_done[rows] = True
            bad = np.zeros(n, bool)
            bad[rows] = ~(b.skin_angle[rows] <= cfg.skin.max_angle_rad)
            fail(2, R.SKIN_ANGLE, bad)
        # 3. reachability
        rows = np.flatnonzero(alive)
        if rows.size:
            reach = self.reachability.check_many(e[rows], t)
            b.reach = reach
            b.reach_row[rows] = np.arange(rows.size)
            b.reach_done[rows] = True
            b.reachable[rows] = reach.reachable
            b.joint_limit_margin[rows] = reach.joint_limit_margin
            if reach.joints is not None:
                b.joints = np.full((n, reach.joints.shape[1]), np.nan)
                b.joints[rows] = reach.joints
            bad = np.zeros(n, bool)
            bad[rows] = ~reach.reachable
            fail(3, R.UNREACHABLE, bad)
        # 4. clearance to every critical structure (bones first: see precompute)
        rows = np.flatnonzero(alive)
        smp = cfg.sampling
        if rows.size:
            a0_all = lm.to_array(e)
            a1_one = lm.to_array(t)
            kind = np.full(n, '', dtype=object)
            todo = rows
            for s, f in enumerate(self.fields):
                if todo.size == 0:
                    break
                a0 = a0_all[todo]
                # Once a sample is inside the structure the path is rejected
                # whatever the exact minimum: stop refining that path there.
                c, at = segment_minima(f, a0, np.broadcast_to(a1_one, a0.shape), depth[todo], self.fine_step,
                                       self.levels, stop_below=self.cross_threshold,
                                       chunk_samples=smp.chunk_samples)
                b.clearance[s, todo] = c
                b.clearance_at[s, todo] = at
                k = np.where(c < self.cross_threshold, R.CROSSES_BONE if f.is_bone else R.CROSSES_STRUCTURE,
                             np.where(c < f.margin_m, R.TOO_CLOSE, '')).astype(object)
                cur = kind[todo]
                worse = _more_severe(k, cur)  # keep the worst finding: bone > structure > margin
                cur[worse] = k[worse]
                kind[todo] = cur
                if not full:
                    # A crossing is the most severe finding left (bones come first), so later
                    # structures cannot change how this path is counted.
                    todo = todo[c >= self.cross_threshold]
            b.clearance_done[rows] = True
            if S:
                margins = np.array([f.margin_m for f in self.fields])[:, None]
                with np.errstate(invalid='ignore'):
                    b.slack[rows] = np.fmin.reduce(b.clearance[:, rows] - margins, axis=0)
            else:
                b.slack[rows] = cfg.clearance.cap_m
            fail(4, kind, kind != '')
        # 5. air between the skin and the target
        rows = np.flatnonzero(alive)
        if rows.size:
            skip = np.minimum(cfg.clearance.air_skip_m, depth[rows])
            start = e[rows] + direction[rows] * skip[:, None]
            a0 = lm.to_array(start)
            a1 = np.broadcast_to(lm.to_array(t), a0.shape)
            thr = self.cross_threshold
            m, at = segment_minima(self.air_field, a0, a1, depth[rows] - skip, self.fine_step,
                                   self.levels, stop_below=thr, chunk_samples=smp.chunk_samples)
            b.air_min[rows] = m
            b.air_at[rows] = at + skip
            b.air_done[rows] = True
            bad = np.zeros(n, bool)
            bad[rows] = m < thr
            fail(5, R.CROSSES_AIR, bad)

        b.feasible = b.stage == len(STAGES)
        ok = np.flatnonzero(b.feasible)
        if ok.size:
            b.score[ok] = score(b.slack[ok], depth[ok], b.skin_angle[ok], b.joint_limit_margin[ok], cfg)
        return b

    def reasons(self, b: CandidateBatch, i: int) -> list:
        """(kind, sentence) pairs for every failed check that was evaluated on candidate ``i``."""
        cfg = self.config
        out = []
        if np.isfinite(b.region_distance[i]) and b.region_distance[i] > cfg.entry.tolerance_m:
            out.append((R.OUTSIDE_ENTRY_REGION,
                        R.outside_region(b.region_distance[i], cfg.entry.tolerance_m, self.skin.describes)))
        if b.depth[i] < cfg.needle.min_depth_m:
            out.append((R.TOO_SHALLOW, R.too_shallow(b.depth[i], cfg.needle.min_depth_m)))
        if b.depth[i] > cfg.needle.max_depth_m:
            out.append((R.TOO_DEEP, R.too_deep(b.depth[i], cfg.needle.max_depth_m)))
        if b.skin_done[i] and not (b.skin_angle[i] <= cfg.skin.max_angle_rad):
            out.append((R.SKIN_ANGLE, R.skin_angle(b.skin_angle[i], cfg.skin.max_angle_rad)))
        if b.reach_done[i] and not b.reachable[i]:
            for text in b.reach.reasons_for(int(b.reach_row[i])):
                out.append((R.UNREACHABLE, text))
        if b.clearance_done[i]:
            found = []
            for s, f in enumerate(self.fields):
                c, at = b.clearance[s, i], b.clearance_at[s, i]
                if c < self.cross_threshold:
                    found.append((0 if f.is_bone else 1, c, (R.CROSSES_BONE if f.is_bone else R.CROSSES_STRUCTURE,
                                                             R.crosses(f.name, f.is_bone, at))))
                elif c < f.margin_m:
                    found.append((2, c - f.margin_m, (R.TOO_CLOSE, R.too_close(f.name, c, f.margin_m, at))))
            out.extend(x[2] for x in sorted(found, key=lambda x: (x[0], x[1])))
        if b.air_done[i] and b.air_min[i] < self.cross_threshold:
            out.append((R.CROSSES_AIR, R.crosses_air(b.air_at[i])))
        return out

    def path(self, b: CandidateBatch, i: int) -> NeedlePath:
        """Build the :class:`NeedlePath` of candidate ``i``."""
        pairs = self.reasons(b, i)
        clearance = {f.name: float(b.clearance[s, i]) for s, f in enumerate(self.fields)
                     if np.isfinite(b.clearance[s, i])}
        cap = self.config.clearance.cap_m
        terms = {}
        if b.feasible[i]:
            terms = {k: float(v[0]) for k, v in score_terms(
                [b.slack[i]], [b.depth[i]], [b.skin_angle[i]], [b.joint_limit_margin[i]], self.config).items()}
        return NeedlePath(
            entry=b.entries[i].copy(), target=b.target.copy(), direction=b.direction[i].copy(),
            depth=float(b.depth[i]), clearance=clearance,
            min_clearance=min(clearance.values()) if clearance else (cap if b.clearance_done[i] else float('nan')),
            clearance_slack=float(b.slack[i]), score=float(b.score[i]), reachable=bool(b.reachable[i]),
            joints=None if b.joints is None or not b.reach_done[i] else b.joints[i].copy(),
            reasons=[p[1] for p in pairs], reason_kinds=[p[0] for p in pairs],
            skin_angle=float(b.skin_angle[i]), joint_limit_margin=float(b.joint_limit_margin[i]),
            feasible=bool(b.feasible[i]), score_terms=terms,
            clearance_cap={f.name: f.cap_m for f in self.fields})

    # ------------------------------------------------------------------ API
    def validate(self, entry, target) -> NeedlePath:
        """Run every check on one given path (e.g. from the operator) and explain the result."""
        t = self.check_target(target)
        e = check_points(entry, 'entry')
        if e.shape[0] != 1:
            raise InvalidEntryRegion(f'validate takes one entry point, got {e.shape[0]}')
        b = self.evaluate(e, t, full=True, check_region=True)
        return self.path(b, 0)

    def plan(self, target, entry_points=None) -> PlanResult:
        """Plan to ``target`` from the allowed skin region (or from ``entry_points``).

        Raises a :class:`~igt_planner.errors.PlanningError` subclass on bad
        input and :class:`NoFeasiblePath` when every candidate is rejected.
        """
        t_start = time.perf_counter()
        pre = self.precompute()
        timings = {'precompute_s': pre.get('total_s', 0.0)}
        t_query = time.perf_counter()
        t = self.check_target(target)
        lm, cfg = self.labelmap, self.config
        stats = {'precompute_cached': not pre}
        if entry_points is None:
            arr = flat_to_array(lm, self.skin.allowed_flat).astype(float)
            entries = lm.to_world(arr)
            stats['n_region_voxels'] = int(entries.shape[0])
            # Thin only among entries that pass the depth check, so the
            # candidate budget is spent where the needle can reach.
            d = np.linalg.norm(entries - t, axis=1)
            ok_depth = (d >= cfg.needle.min_depth_m) & (d <= cfg.needle.max_depth_m)
            keep_ok = np.flatnonzero(ok_depth)[thin(int(ok_depth.sum()), cfg.entry.max_candidates, cfg.entry.seed)]
            stats['n_thinned'] = int(ok_depth.sum() - keep_ok.size)
            entries = np.concatenate([entries[~ok_depth], entries[keep_ok]])
            check_region = False
        else:
            entries = check_points(entry_points, 'entry_points')
            check_region = True
        timings['candidates_s'] = time.perf_counter() - t_query
        t0 = time.perf_counter()
        b = self.evaluate(entries, t, full=False, check_region=check_region)
        timings['checks_s'] = time.perf_counter() - t0
        stats['n_clearance_evaluated'] = int(b.clearance_done.sum())
        t0 = time.perf_counter()
        ok = np.flatnonzero(b.feasible)
        order = ok[rank_order(b.score[ok])]
        ranked = [self.path(b, int(i)) for i in order[:cfg.ranking.max_ranked]]
        counts = collections.Counter(k for k in b.kind[~b.feasible])
        rejected_counts = {k: counts[k] for k in R.KINDS if counts.get(k)}
        examples = self._examples(b)
        timings['rank_s'] = time.perf_counter() - t0
        timings['query_s'] = time.perf_counter() - t_query
        timings['total_s'] = time.perf_counter() - t_start
        if not ranked:
            best = self._best_rejected(b)
            raise NoFeasiblePath(self._no_path_message(b.n, rejected_counts, best, t), rejected_counts,
                                 best_rejected=best, n_candidates=b.n, notes=tuple(self.target_notes(t)))
        return PlanResult(best=ranked[0], ranked=ranked, rejected_counts=rejected_counts,
                          rejected_examples=examples, timings=timings, n_candidates=b.n, n_feasible=int(ok.size),
                          stats=stats)

    # ------------------------------------------------------------------ helpers
    def _closeness(self, b: CandidateBatch, rows: np.ndarray) -> np.ndarray:
        """How near each rejected row came to feasibility within its failing stage (higher = nearer)."""
        cfg = self.config
        out = np.zeros(rows.size)
        st = b.stage[rows]
        out = np.where(st == 0, -b.region_distance[rows], out)
        out = np.where(st == 1, -np.abs(b.depth[rows] - np.clip(b.depth[rows], cfg.needle.min_depth_m,
                                                                cfg.needle.max_depth_m)), out)
        out = np.where(st == 2, -np.nan_to_num(b.skin_angle[rows], nan=np.pi), out)
        out = np.where(st == 3, np.nan_to_num(b.joint_limit_margin[rows], nan=-np.inf), out)
        # Within the clearance check a crossing is worse than a margin violation
        # whatever the numbers (slack is bounded by the cap, far below 10 m).
        severity = {R.CROSSES_BONE: 3.0, R.CROSSES_STRUCTURE: 2.0, R.TOO_CLOSE: 1.0}
        sev = np.array([severity.get(k, 0.0) for k in b.kind[rows]])
        out = np.where(st == 4, np.nan_to_num(b.slack[rows], nan=-1.0) - 10.0 * sev, out)
        return out

    def _revalidate(self, b: CandidateBatch, i: int) -> NeedlePath:
        """Candidate ``i`` with every check run (complete reasons)."""
        full = self.evaluate(b.entries[i:i + 1], b.target, full=True,
                             check_region=bool(np.isfinite(b.region_distance[i])))
        return self.path(full, 0)

    def _examples(self, b: CandidateBatch) -> dict:
        """Per kind, the nearest-to-feasible rejected candidate, fully re-validated."""
        rej = np.flatnonzero(~b.feasible)
        if rej.size == 0:
            return {}
        close = self._closeness(b, rej)
        out = {}
        for kind in R.KINDS:
            sel = b.kind[rej] == kind
            if np.any(sel):
                out[kind] = self._revalidate(b, int(rej[sel][np.argmax(close[sel])]))
        return out

    def _best_rejected(self, b: CandidateBatch) -> Optional[NeedlePath]:
        """The rejected candidate that got furthest through the checks (then nearest to passing)."""
        rej = np.flatnonzero(~b.feasible)
        if rej.size == 0:
            return None
        order = np.lexsort((self._closeness(b, rej), b.stage[rej]))
        return self._revalidate(b, int(rej[order[-1]]))

    def _no_path_message(self, n, counts, best, target) -> str:
        parts = [f'{c} {R.DESCRIPTIONS[k]}' for k, c in sorted(counts.items(), key=lambda kv: -kv[1])]
        msg = f'no feasible path among {n} candidate entries: ' + ', '.join(parts)
        if best is not None:
            msg += '. Closest candidate (entry ' + ', '.join(R.format_mm(x) for x in best.entry) + \
                   '): ' + '; '.join(best.reasons)
        notes = self.target_notes(target)
        if notes:
            msg += '. Note: ' + '; '.join(notes)
        return msg


_SEVERITY = {R.CROSSES_BONE: 3, R.CROSSES_STRUCTURE: 2, R.TOO_CLOSE: 1, '': 0}


def _more_severe(new: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Element-wise: is ``new`` a more severe clearance kind than ``cur``? (vectorised)"""
    def codes(a):
        out = np.zeros(a.size, np.int8)
        for k, v in _SEVERITY.items():
            if v:
                out[a == k] = v
        return out
    return codes(new) > codes(cur)


def plan(target, labelmap: LabelMap, entry_region: Optional[EntryRegion] = None, entry_points=None,
         reachability: Optional[Reachability] = None, config: Optional[PlannerConfig] = None) -> PlanResult:
    """One-shot planning (no cache kept between calls); see :meth:`NeedlePlanner.plan`."""
    return NeedlePlanner(labelmap, config, reachability, entry_region).plan(target, entry_points)


def validate_plan(entry, target, labelmap: LabelMap, entry_region: Optional[EntryRegion] = None,
                  reachability: Optional[Reachability] = None,
                  config: Optional[PlannerConfig] = None) -> NeedlePath:
    """Check one given path with the planner's checks and explanations; see :meth:`NeedlePlanner.validate`."""
    return NeedlePlanner(labelmap, config, reachability, entry_region).validate(entry, target)
