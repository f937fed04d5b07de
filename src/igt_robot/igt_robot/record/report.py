"""Self-contained HTML procedure report built from the procedure record.

Everything is in one file: CSS inline, pictures rendered with matplotlib's Agg
canvas (no pyplot, no global backend change) and embedded as base64 PNG.

Inputs are the record entries (:class:`igt_robot.record.store.RecordEntry`, see
docs/record.md for the payload of each kind) and optional images:

* :class:`SliceView` -- a 2-D slice with the plan and the needle drawn on it;
* a 2-D numpy array -- shown as is (pixel axes);
* PNG bytes -- embedded unchanged.

Coordinates in the core are metres (scanner LPS); the report *displays*
millimetres, converted with :mod:`igt_robot.units` at this human boundary.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import units
from .dose import DoseLedger, DoseTotals, DoseValueError
from .store import RecordEntry

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
IMAGING_PHASES = frozenset({'PREPARING', 'ACQUIRING'})


class ReportError(ValueError):
    """Bad input to the report (wrong array shape, non-PNG bytes, ...)."""


# ============================================================================ data
@dataclasses.dataclass(frozen=True)
class SliceView:
    """A 2-D image slice with overlays, all in the slice's own 2-D coordinates (metres).

    ``extent_m`` = (left, right, bottom, top) of the image as in matplotlib's imshow;
    with ``origin='upper'`` row 0 of ``pixels`` is drawn at ``top``. Points are (u, v)
    pairs in the same coordinates: ``entry``/``target`` (plan), ``needle`` (polyline of
    the needle, e.g. [rcm, tip]) and ``tip``.
    """

    pixels: np.ndarray
    extent_m: Tuple[float, float, float, float]
    title: str = ''
    entry: Optional[Sequence[float]] = None
    target: Optional[Sequence[float]] = None
    needle: Optional[Sequence[Sequence[float]]] = None
    tip: Optional[Sequence[float]] = None
    origin: str = 'upper'
    axis_labels: Tuple[str, str] = ('u (mm)', 'v (mm)')


@dataclasses.dataclass
class ProcedureSummary:
    """What the report shows, extracted from the record. Lengths in m (scanner LPS), times in s
    since the first entry (host monotonic clock)."""

    entries: int = 0
    last_seq: int = 0
    first_wall: str = ''
    last_wall: str = ''
    duration_s: float = 0.0
    plan: Optional[Dict[str, Any]] = None
    target_m: Optional[np.ndarray] = None
    entry_m: Optional[np.ndarray] = None
    registration: Optional[Dict[str, Any]] = None
    tips: List[Tuple[float, np.ndarray, str]] = dataclasses.field(default_factory=list)  # (t, tip_m, scan)
    tip_error_m: Optional[float] = None
    dose: Optional[DoseTotals] = None
    dose_problems: List[str] = dataclasses.field(default_factory=list)
    interlocks: List[Tuple[float, str, str]] = dataclasses.field(default_factory=list)    # (t, state, reason)
    confirmations: List[Tuple[float, str, str]] = dataclasses.field(default_factory=list)  # (t, who, what)
    motion_intervals: List[Tuple[float, float]] = dataclasses.field(default_factory=list)
    scan_intervals: List[Tuple[float, float, str]] = dataclasses.field(default_factory=list)
    recoveries: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    workflow_final: str = ''
    abnormal_ends: List[Dict[str, Any]] = dataclasses.field(default_factory=list)   # ended_abnormally payloads
    record_gaps: List[Dict[str, Any]] = dataclasses.field(default_factory=list)     # record_gap payloads
    foreign: List[Dict[str, Any]] = dataclasses.field(default_factory=list)         # ignored other procedures


def _vec3(value, what: str) -> Optional[np.ndarray]:
    if value is None:
        return None
    v = np.asarray(value, dtype=float).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ReportError(f'{what} must be 3 finite numbers, got {value!r}')
    return v


def _intervals(changes: List[Tuple[float, bool, str]], t_end: float) -> List[Tuple[float, float, str]]:
    """(t, on, label) changes -> closed intervals; an interval still open ends at t_end."""
    out, start, label = [], None, ''
    for t, on, lab in changes:
        if on and start is None:
            start, label = t, lab
        elif not on and start is not None:
            out.append((start, t, label))
            start = None
    if start is not None:
        out.append((start, max(t_end, start), label))
    return out


def summarise(entries: Sequence[RecordEntry]) -> ProcedureSummary:
    """Extract the report's content from record entries (order of ``seq``)."""
    s = ProcedureSummary()
    if not entries:
        return s
    entries = sorted(entries, key=lambda e: e.seq)
    t0 = entries[0].mono
    s.entries, s.last_seq = len(entries), entries[-1].seq
    s.first_wall, s.last_wall = entries[0].wall, entries[-1].wall
    s.duration_s = max(0.0, entries[-1].mono - t0)
    motion_changes, scan_changes, dose_payloads = [], [], []
    for e in entries:
        t, p = e.mono - t0, e.payload
        if e.kind == 'plan':
            s.plan = p
            s.target_m = _vec3(p.get('target_m'), 'plan target_m')
            s.entry_m = _vec3(p.get('entry_m'), 'plan entry_m')
        elif e.kind == 'registration':
            if p.get('accepted', True):
                s.registration = p
        elif e.kind == 'tip':
            tip = _vec3(p.get('tip_m'), 'tip tip_m')
            s.tips.append((t, tip, str(p.get('scan_id', ''))))
            target = _vec3(p.get('target_m'), 'tip target_m')
            if target is not None:
                s.target_m = target
            s.tip_error_m = float(p['error_m']) if p.get('error_m') is not None else (
                float(np.linalg.norm(tip - s.target_m)) if s.target_m is not None else None)
        elif e.kind == 'dose':
            dose_payloads.append(p)
        elif e.kind == 'interlock':
            s.interlocks.append((t, str(p.get('state', '')), str(p.get('reason', ''))))
        elif e.kind == 'confirmation':
            s.confirmations.append((t, str(p.get('operator_id', '')), str(p.get('what', p.get('step', '')))))
        elif e.kind == 'workflow':
            if p.get('confirmation') and p.get('accepted'):
                s.confirmations.append((t, str(p.get('operator_id', '')),
                                        f'{p.get("command", "")} at {p.get("from_step", "")}'))
            if p.get('accepted'):
                s.workflow_final = f'{p.get("phase", "")}/{p.get("step", "")}'
        elif e.kind == 'motion':
            motion_changes.append((t, bool(p.get('moving')), ''))
        elif e.kind == 'scanner':
            phase = str(p.get('phase', '')).upper()
            scan_changes.append((t, phase in IMAGING_PHASES, str(p.get('protocol_name', ''))))
        elif e.kind == 'record_recovery':
            s.recoveries.append(p)
        elif e.kind == 'ended_abnormally':
            s.abnormal_ends.append(p)
        elif e.kind == 'record_gap':
            s.record_gaps.append(p)
        elif e.kind == 'foreign_procedure':
            s.foreign.extend(p.get('ignored', []))
    s.motion_intervals = [(a, b) for a, b, _ in _intervals(motion_changes, s.duration_s)]
    s.scan_intervals = _intervals(scan_changes, s.duration_s)
    try:
        s.dose = DoseLedger.from_payloads(dose_payloads).totals()
    except DoseValueError as exc:
        # The report must still be produced; the dose problem is shown, not hidden.
        s.dose_problems.append(str(exc))
    return s


# ============================================================================ figures
def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', bbox_inches='tight')
    return buf.getvalue()


def _mm(v):
    return units.m_to_mm(np.asarray(v, dtype=float))


def slice_png(view: SliceView) -> bytes:
    """Render a :class:`SliceView`: grey image, plan line entry->target, needle, tip. Axes in mm."""
    pixels = np.asarray(view.pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ReportError(f'slice must be a non-empty 2-D array, got shape {pixels.shape}')
    extent = np.asarray(view.extent_m, dtype=float)
    if extent.shape != (4,) or not np.all(np.isfinite(extent)) or extent[0] == extent[1] or extent[2] == extent[3]:
        raise ReportError(f'extent_m must be 4 finite numbers (left, right, bottom, top), got {view.extent_m!r}')
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    finite = pixels[np.isfinite(pixels)] if np.issubdtype(pixels.dtype, np.floating) else pixels.ravel()
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    ax.imshow(pixels, cmap='gray', extent=_mm(extent), origin=view.origin, vmin=lo, vmax=hi if hi > lo else lo + 1)
    if view.entry is not None and view.target is not None:
        e, t = _mm(view.entry), _mm(view.target)
        ax.plot([e[0], t[0]], [e[1], t[1]], '--', color='lime', lw=1.5, label='plan')
        ax.plot(*e, 'o', color='lime', ms=6, label='entry')
    if view.target is not None:
        t = _mm(view.target)
        ax.plot(*t, 'x', color='red', ms=10, mew=2, label='target')
    if view.needle is not None:
        n = _mm(view.needle).reshape(-1, 2)
        ax.plot(n[:, 0], n[:, 1], '-', color='yellow', lw=2, label='needle')
    if view.tip is not None:
        ax.plot(*_mm(view.tip), 'o', mfc='none', mec='orange', ms=9, mew=2, label='tip')
    ax.set_xlabel(view.axis_labels[0])
    ax.set_ylabel(view.axis_labels[1])
    if view.title:
        ax.set_title(view.title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc='lower right', fontsize=8, framealpha=0.6)
    return _png(fig)


def array_png(pixels: np.ndarray, title: str = '') -> bytes:
    """A plain 2-D array as a grey image with pixel axes."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ReportError(f'image array must be 2-D, got shape {pixels.shape}')
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(pixels, cmap='gray')
    ax.set_title(title)
    return _png(fig)


def tip_target_png(tips_m: Sequence[Sequence[float]], target_m: Sequence[float],
                   entry_m: Optional[Sequence[float]] = None, labels: Optional[Sequence[str]] = None) -> bytes:
    """Tip-to-target distance per control scan and, with an entry point, the error split into
    depth (along the planned path) and lateral components. Inputs scanner LPS metres."""
    tips = np.asarray(tips_m, dtype=float).reshape(-1, 3)
    target = np.asarray(target_m, dtype=float).reshape(3)
    if tips.shape[0] == 0:
        raise ReportError('no tip positions to plot')
    err = tips - target
    dist_mm = _mm(np.linalg.norm(err, axis=1))
    labels = list(labels) if labels else [str(i + 1) for i in range(len(tips))]
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(range(1, len(tips) + 1), dist_mm, 'o-', color='tab:blue')
    ax.set_xticks(range(1, len(tips) + 1))
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_xlabel('control scan')
    ax.set_ylabel('tip to target (mm)')
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = fig.add_subplot(1, 2, 2)
    if entry_m is not None:
        d = target - np.asarray(entry_m, dtype=float).reshape(3)
        d /= np.linalg.norm(d)
        depth = err @ d                                   # + = beyond the target
        lateral = np.linalg.norm(err - np.outer(depth, d), axis=1)
        ax2.plot(_mm(depth), _mm(lateral), 'o-', color='tab:orange')
        for i, lab in enumerate(labels):
            ax2.annotate(lab, (_mm(depth[i]), _mm(lateral[i])), fontsize=7, xytext=(3, 3),
                         textcoords='offset points')
        ax2.axvline(0.0, color='red', lw=1)
        ax2.set_xlabel('depth error along path (mm, + = beyond target)')
        ax2.set_ylabel('lateral error (mm)')
        ax2.set_ylim(bottom=0)
    else:
        ax2.plot(_mm(err[:, 0]), _mm(err[:, 1]), 'o-', color='tab:orange')
        ax2.plot(0, 0, 'x', color='red', ms=10, mew=2)
        ax2.set_xlabel('L error (mm)')
        ax2.set_ylabel('P error (mm)')
        ax2.set_aspect('equal', adjustable='datalim')
    ax2.grid(alpha=0.3)
    return _png(fig)


def timeline_png(motion_intervals: Sequence[Tuple[float, float]], scan_intervals: Sequence[Tuple[float, ...]],
                 interlock_times: Sequence[float] = (), duration_s: Optional[float] = None) -> bytes:
    """Motion and scanning as bars over time (s since start); interlocks as red marks.
    Overlap of the two rows would be a safety finding and is drawn hatched."""
    fig = _figure(9.0, 2.4)
    ax = fig.add_subplot(1, 1, 1)
    motion = [(a, max(b - a, 1e-3)) for a, b in motion_intervals]
    scans = [(iv[0], max(iv[1] - iv[0], 1e-3)) for iv in scan_intervals]
    ax.broken_barh(motion, (10, 8), facecolors='tab:green', label='motion')
    ax.broken_barh(scans, (0, 8), facecolors='tab:blue', label='scanning')
    overlaps = []
    for a, b in motion_intervals:
        for iv in scan_intervals:
            lo, hi = max(a, iv[0]), min(b, iv[1])
            if hi > lo:
                overlaps.append((lo, hi - lo))
    if overlaps:
        ax.broken_barh(overlaps, (0, 18), facecolors='none', edgecolors='red', hatch='///', label='overlap')
    for i, t in enumerate(interlock_times):
        ax.axvline(t, color='red', lw=1.2, label='interlock' if i == 0 else None)
    end = duration_s if duration_s else max([b for _, b in motion_intervals] + [iv[1] for iv in scan_intervals]
                                            + list(interlock_times) + [1.0])
    ax.set_xlim(0, end * 1.02)
    ax.set_ylim(-2, 20)
    ax.set_yticks([4, 14])
    ax.set_yticklabels(['scanning', 'motion'])
    ax.set_xlabel('time since start of record (s)')
    ax.grid(axis='x', alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc='upper right', fontsize=7, ncol=4)
    return _png(fig)


# ============================================================================ HTML
_CSS = '''
body{font-family:DejaVu Sans,Arial,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em;border-bottom:2px solid #446}h2{font-size:1.15em;margin-top:1.6em;color:#335}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#eef}.warn{color:#a00;font-weight:bold}.note{color:#555;font-size:.85em}
img{max-width:100%;border:1px solid #ccc;margin:.3em 0}
'''


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt_mm(value_m, digits=1) -> str:
    return '—' if value_m is None else f'{units.m_to_mm(float(value_m)):.{digits}f} mm'


def _fmt_point(p) -> str:
    return '—' if p is None else '(' + ', '.join(f'{v:.1f}' for v in _mm(p)) + ') mm'


def _table(rows: Iterable[Tuple[str, str]]) -> str:
    return '<table>' + ''.join(f'<tr><th>{_e(k)}</th><td>{v}</td></tr>' for k, v in rows) + '</table>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"/>'


ImageInput = Union[SliceView, np.ndarray, bytes]


def render_image(item: ImageInput, index: int) -> Tuple[str, bytes]:
    """(caption, PNG bytes) for one image input."""
    if isinstance(item, SliceView):
        return item.title or f'slice {index + 1}', slice_png(item)
    if isinstance(item, (bytes, bytearray)):
        if not bytes(item).startswith(PNG_SIGNATURE):
            raise ReportError(f'image {index + 1}: bytes are not a PNG file')
        return f'image {index + 1}', bytes(item)
    if isinstance(item, np.ndarray):
        return f'image {index + 1}', array_png(item, f'image {index + 1}')
    raise ReportError(f'image {index + 1}: expected SliceView, 2-D numpy array or PNG bytes, '
                      f'got {type(item).__name__}')


def error_budget_section(budget: dict) -> str:
    """HTML of a procedure's error budget (mm values keyed '<source>_mm', from
    igt_robot.procedure.closed_loop.error_budget)."""
    names = {'registration_mm': 'Registration (predicted TRE at the target)', 'robot_mm': 'Robot',
             'deflection_mm': 'Needle deflection (tip off the planned line)',
             'target_motion_mm': 'Target motion (breathing, push)', 'open_loop_rss_mm': 'Open-loop total (RSS)',
             'closed_loop_expected_mm': 'Expected with closed loop', 'measured_final_error_mm': 'Measured at the end'}
    rows = [(names.get(k, k), f'{float(v):.2f} mm') for k, v in budget.items() if v is not None]
    return ('<h2>Error budget</h2>' + _table(rows) + '<p class="note">Each source on its own at the target; the '
            'control scans correct deflection and target motion during the insertion.</p>')


def last_error_budget(entries: Sequence[RecordEntry]) -> Optional[dict]:
    """The last 'error_budget' event's values (mm) in the record, or None."""
    budget = None
    for e in sorted(entries, key=lambda e: e.seq):
        if e.kind == 'event' and e.payload.get('kind') == 'error_budget':
            try:
                budget = {k: float(v) for k, v in (e.payload.get('values') or {}).items()}
            except (TypeError, ValueError):
                continue
    return budget


def build_report(entries: Sequence[RecordEntry], images: Sequence[ImageInput] = (), *,
                 title: str = 'Needle placement procedure report', generated_at: Optional[str] = None,
                 error_budget: Optional[dict] = None) -> str:
    """The complete HTML document (a string) for the given record entries and images."""
    s = summarise(entries)
    generated_at = generated_at or datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
             f'<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>',
             f'<p class="note">Generated {_e(generated_at)} from {s.entries} record entries '
             f'(sequence 1–{s.last_seq}), {_e(s.first_wall)} → {_e(s.last_wall)}, '
             f'duration {s.duration_s:.0f} s. Coordinates: scanner LPS, millimetres.</p>']

    # --- summary
    reg = s.registration or {}
    plan = s.plan or {}
    plan_depth = f', depth {_fmt_mm(plan.get("depth_m"))}' if plan.get('depth_m') is not None else ''
    rows = [('Target', _fmt_point(s.target_m)), ('Entry', _fmt_point(s.entry_m)),
            ('Plan', _e(plan.get('plan_id', '—')) + plan_depth),
            ('Registration', _e(reg.get('method', '—')) if reg else '<span class="warn">none accepted</span>'),
            ('FRE', _fmt_mm(reg.get('fre_m'), 2)), ('Predicted TRE', _fmt_mm(reg.get('predicted_tre_m'), 2)),
            ('Tip-to-target error', _fmt_mm(s.tip_error_m)),
            ('Control scans with tip', str(len(s.tips))),
            ('Workflow state at end', _e(s.workflow_final or '—'))]
    for end in s.abnormal_ends:
        parts.append(_abnormal_end_html(end))
    parts.append('<h2>Summary</h2>' + _table(rows))
    error_budget = error_budget or last_error_budget(entries)
    if error_budget:
        parts.append(error_budget_section(error_budget))

    # --- dose
    parts.append('<h2>Scans and dose</h2>')
    if s.dose is not None:
        d = s.dose
        parts.append(_table([
            ('Scans', f'{d.scan_count} ({d.ct_scan_count} CT, {d.mr_scan_count} MR)'),
            ('Total DLP', f'{d.total_dlp_mgy_cm:.1f} mGy·cm'),
            ('Max CTDIvol', f'{d.max_ctdi_vol_mgy:.1f} mGy'),
            ('Effective dose (estimate)', f'{d.effective_dose_msv:.2f} mSv'),
        ]))
        parts.append('<p class="note">Effective dose is an estimate, E ≈ k·DLP with adult body-region '
                     'conversion coefficients k; it is not a patient-specific organ dose.</p>')
    for problem in s.dose_problems:
        parts.append(f'<p class="warn">Dose data could not be totalled: {_e(problem)}</p>')

    # --- safety and confirmations
    parts.append(f'<h2>Interlock activations ({len(s.interlocks)})</h2>')
    if s.interlocks:
        parts.append('<table><tr><th>t (s)</th><th>state</th><th>reason</th></tr>' + ''.join(
            f'<tr><td>{t:.1f}</td><td>{_e(st)}</td><td>{_e(r)}</td></tr>' for t, st, r in s.interlocks) + '</table>')
    parts.append(f'<h2>Operator confirmations ({len(s.confirmations)})</h2>')
    if s.confirmations:
        parts.append('<table><tr><th>t (s)</th><th>operator</th><th>confirmed</th></tr>' + ''.join(
            f'<tr><td>{t:.1f}</td><td>{_e(who)}</td><td>{_e(what)}</td></tr>' for t, who, what in s.confirmations)
            + '</table>')

    # --- figures
    figures: List[Tuple[str, bytes]] = []
    for i, item in enumerate(images):
        figures.append(render_image(item, i))
    if s.tips and s.target_m is not None:
        figures.append(('Tip vs target', tip_target_png([t for _, t, _ in s.tips], s.target_m, s.entry_m,
                                                        [lab or str(i + 1) for i, (_, _, lab) in enumerate(s.tips)])))
    if s.motion_intervals or s.scan_intervals or s.interlocks:
        figures.append(('Timeline: motion vs scanning', timeline_png(
            s.motion_intervals, s.scan_intervals, [t for t, _, _ in s.interlocks], s.duration_s)))
    if figures:
        parts.append('<h2>Figures</h2>')
        for caption, png in figures:
            parts.append(f'<figure>{_img(png, caption)}<figcaption>{_e(caption)}</figcaption></figure>')

    # --- integrity
    if s.recoveries or s.record_gaps or s.foreign:
        parts.append('<h2>Record integrity</h2>')
        for g in s.record_gaps:
            parts.append(f'<p class="warn">{int(g.get("lost_entries", 0))} record entries were lost '
                         f'({_e(g.get("cause", ""))}); motion was halted (RECORD_FAILED) until the record '
                         'was writable again.</p>')
        if s.foreign:
            parts.append('<p class="note">Messages of other procedures on the same ROS domain were ignored: '
                         + _e(', '.join(f'{f.get("messages", 0)} {f.get("what", "")}(s) of {f.get("procedure_id", "")}'
                                        f' from {f.get("source", "")}' for f in s.foreign)) + '.</p>')
        for r in s.recoveries:
            parts.append(f'<p class="warn">The record was repaired after a crash: {int(r.get("torn_bytes", 0))} '
                         f'bytes of an unfinished entry were set aside ({_e(r.get("reason", ""))}).</p>')
    parts.append('</body></html>')
    return '\n'.join(parts)


def _abnormal_end_html(end: Dict[str, Any]) -> str:
    """The banner of a record whose recorder never closed it: what was known last and what was lost."""
    depth = end.get('last_insertion_depth_m')
    rows = [('Last record entry', f'{_e(end.get("last_entry_wall", ""))} (seq {int(end.get("last_seq", 0))}, '
                                  f'{_e(end.get("last_entry_kind", ""))})'),
            ('Last known needle depth', _fmt_mm(depth) if depth is not None else '—'),
            ('Last scan', _e(end.get('last_scan') or '—')),
            ('Dose so far', f'{int(end.get("ct_scan_count", 0))} CT scans, '
                            f'{float(end.get("total_dlp_mgy_cm", 0.0)):.1f} mGy·cm'),
            ('Workflow state', _e(end.get('workflow') or '—')),
            ('Found by', _e(end.get('detected_by', '')))]
    lost = [f'Procedure record: {_e(end.get("record_loss", ""))}.']
    if end.get('torn_tail_bytes'):
        lost.append(f'An unfinished last line ({int(end["torn_tail_bytes"])} bytes) was set aside.')
    for m in end.get('mcap', []):
        name = _e(str(m.get('path', '')).rsplit('/', 1)[-1])
        if m.get('missing'):
            lost.append(f'MCAP {name}: missing.')
        elif m.get('finalised'):
            lost.append(f'MCAP {name}: complete.')
        else:
            lost.append(f'MCAP {name}: not finalised; {int(m.get("messages", 0))} messages readable up to '
                        f'{_e(m.get("last_log_time") or "its start")}; what came after (at most the flush period, '
                        f'{float(end.get("mcap_flush_period_s", 0.0)):g} s, before the end) was lost.')
    return ('<div class="warn"><h2>Ended abnormally</h2><p>The recorder never closed this record (the process '
            'was killed or the machine stopped). What the record knew last:</p>' + _table(rows)
            + '<p>What was lost: ' + ' '.join(lost) + '</p></div>')


def write_report(path, entries: Sequence[RecordEntry], images: Sequence[ImageInput] = (), **kwargs) -> str:
    """Write :func:`build_report` to ``path`` (UTF-8) atomically; return the path."""
    import os
    text = build_report(entries, images, **kwargs)
    path = os.fspath(path)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
