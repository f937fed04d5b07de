"""HTML procedure report: content extracted from the record, embedded pictures, self-containment."""
import base64
import html.parser
import io
import re

import numpy as np
import pytest

pytest.importorskip('matplotlib', reason='matplotlib not installed')

from igt_robot.record import ProcedureRecord  # noqa: E402
from igt_robot.record.dose import ct_scan, mr_scan  # noqa: E402
from igt_robot.record.report import (PNG_SIGNATURE, ReportError, SliceView, build_report, slice_png,  # noqa: E402
                                     summarise, timeline_png, tip_target_png, write_report)

TARGET = [0.010, 0.020, 0.100]
ENTRY = [0.010, 0.020, 0.020]


class Mono:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_record(directory):
    mono = Mono()
    rec = ProcedureRecord(directory, mono_clock=mono, fsync=False)

    def at(t, kind, payload):
        mono.t = 1000.0 + t
        rec.append(kind, payload)

    at(0, 'workflow', {'command': 'start', 'accepted': True, 'confirmation': False, 'phase': 'PLANNING',
                       'step': 'LOAD_PLANNING_SCAN', 'operator_id': 'dr_a', 'from_step': 'START'})
    at(1, 'scanner', {'phase': 'ACQUIRING', 'protocol_name': 'planning CT'})
    at(6, 'scanner', {'phase': 'IDLE'})
    at(6.5, 'dose', ct_scan('plan-ct', ctdi_vol_mgy=12, dlp_mgy_cm=130, kv=120, mas=200,
                            scan_length_m=0.1, stamp=1.0).to_dict())
    at(8, 'registration', {'method': 'zframe', 'accepted': True, 'fre_m': 0.00042, 'predicted_tre_m': 0.0011})
    at(10, 'plan', {'plan_id': 'p1', 'entry_m': ENTRY, 'target_m': TARGET, 'depth_m': 0.08})
    at(12, 'workflow', {'command': 'confirm_plan', 'accepted': True, 'confirmation': True, 'phase': 'TARGETING',
                        'step': 'ALIGN', 'operator_id': 'dr_a', 'from_step': 'CONFIRM_PLAN'})
    at(13, 'motion', {'moving': True})
    at(20, 'interlock', {'state': 'SCAN_HOLD', 'reason': 'scanner ACQUIRING'})
    at(20, 'motion', {'moving': False})
    at(20, 'scanner', {'phase': 'ACQUIRING', 'protocol_name': 'control scan'})
    at(25, 'scanner', {'phase': 'IDLE'})
    at(25.5, 'dose', mr_scan('ctrl-mr', stamp=25.0).to_dict())
    at(26, 'tip', {'tip_m': [0.011, 0.020, 0.060], 'scan_id': 'ctrl-1'})
    at(27, 'confirmation', {'operator_id': 'dr_b', 'what': 'resume after scan'})
    at(28, 'motion', {'moving': True})
    at(35, 'motion', {'moving': False})
    at(40, 'scanner', {'phase': 'ACQUIRING', 'protocol_name': 'control scan'})
    at(44, 'scanner', {'phase': 'IDLE'})
    at(44.5, 'dose', ct_scan('ctrl-ct', ctdi_vol_mgy=4, dlp_mgy_cm=22, kv=100, mas=50,
                             scan_length_m=0.05, stamp=44.0).to_dict())
    at(45, 'tip', {'tip_m': [0.0112, 0.0205, 0.0985], 'scan_id': 'ctrl-2'})
    entries = rec.read_all()
    rec.close()
    return entries


def test_summary_extracts_every_section(tmp_path):
    s = summarise(make_record(tmp_path))
    np.testing.assert_allclose(s.target_m, TARGET)
    assert s.registration['fre_m'] == 0.00042
    # last tip (11.2, 20.5, 98.5) mm vs target (10, 20, 100) mm
    assert s.tip_error_m == pytest.approx(np.linalg.norm([0.0012, 0.0005, -0.0015]))
    assert s.dose.ct_scan_count == 2 and s.dose.mr_scan_count == 1
    assert s.dose.total_dlp_mgy_cm == pytest.approx(152.0)
    assert s.interlocks == [(20.0, 'SCAN_HOLD', 'scanner ACQUIRING')]
    assert [(who, what) for _, who, what in s.confirmations] == [
        ('dr_a', 'confirm_plan at CONFIRM_PLAN'), ('dr_b', 'resume after scan')]
    assert s.motion_intervals == [(13.0, 20.0), (28.0, 35.0)]
    assert [(a, b) for a, b, _ in s.scan_intervals] == [(1.0, 6.0), (20.0, 25.0), (40.0, 44.0)]
    assert s.scan_intervals[1][2] == 'control scan'
    assert s.workflow_final == 'TARGETING/ALIGN'
    assert s.duration_s == 45.0


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'img':
            self.srcs.append(a.get('src', ''))
        if tag in ('link', 'script') or (tag == 'a' and a.get('href', '').startswith('http')):
            self.links.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_with_all_sections(tmp_path):
    entries = make_record(tmp_path / 'rec')
    slice_ = np.random.default_rng(0).normal(100, 10, (64, 64))
    view = SliceView(slice_, (-0.032, 0.032, -0.032, 0.032), title='control scan 2 (axial)',
                     entry=(0.0, 0.03), target=(0.0, -0.01), needle=[(0.0, 0.03), (0.001, -0.008)],
                     tip=(0.001, -0.008))
    buf = io.BytesIO()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.savefig(buf, format='png')
    path = write_report(tmp_path / 'report.html', entries, [view, slice_, buf.getvalue()], title='Case <42>')
    text = open(path, encoding='utf-8').read()
    parser = _Collector()
    parser.feed(text)
    body = ' '.join(parser.text)
    assert parser.links == []  # no external resources
    # 3 given images + tip plot + timeline, all inline PNG that decode
    assert len(parser.srcs) == 5
    for src in parser.srcs:
        assert src.startswith('data:image/png;base64,')
        assert base64.b64decode(src.split(',', 1)[1]).startswith(PNG_SIGNATURE)
    assert 'Case &lt;42&gt;' in text  # escaped
    assert '(10.0, 20.0, 100.0) mm' in body             # target in mm
    assert 'FRE' in body and '0.42 mm' in body           # registration
    assert '2.0 mm' in body                              # tip-to-target |(1.2, 0.5, -1.5)| = 2.0 mm
    assert '3 (2 CT, 1 MR)' in body and '152.0 mGy·cm' in body
    assert f'{130 * 0.015 + 22 * 0.015:.2f} mSv' in body and 'estimate' in body
    assert 'Interlock activations (1)' in body and 'scanner ACQUIRING' in body
    assert 'Operator confirmations (2)' in body and 'dr_b' in body
    assert 'control scan 2 (axial)' in body


def test_report_shows_missing_data_and_recovery(tmp_path):
    rec = ProcedureRecord(tmp_path, fsync=False)
    rec.append('dose', {'scan_id': 'x', 'modality': 'CT', 'kv': 120})  # incomplete dose payload
    rec.append('registration', {'method': 'zframe', 'accepted': False, 'rejection_reason': 'rod 6 missing'})
    rec.append('record_recovery', {'torn_bytes': 37, 'reason': 'incomplete last line (no newline)'})
    text = build_report(rec.read_all())
    rec.close()
    assert 'none accepted' in text
    assert 'Dose data could not be totalled' in text and 'lacks' in text
    assert 'repaired after a crash: 37 bytes' in text
    assert '<img' not in text  # nothing to draw


def test_figures_are_pngs_and_inputs_are_validated():
    assert slice_png(SliceView(np.zeros((8, 8)), (0, 0.01, 0, 0.01))).startswith(PNG_SIGNATURE)
    assert tip_target_png([[0, 0, 0.05], [0, 0, 0.09]], [0, 0, 0.1], [0, 0, 0]).startswith(PNG_SIGNATURE)
    assert timeline_png([(0, 5)], [(5, 8, 'ctrl')], [5.0]).startswith(PNG_SIGNATURE)
    with pytest.raises(ReportError, match='2-D'):
        slice_png(SliceView(np.zeros((2, 2, 2)), (0, 1, 0, 1)))
    with pytest.raises(ReportError, match='extent_m'):
        slice_png(SliceView(np.zeros((4, 4)), (0, 0, 0, 1)))
    with pytest.raises(ReportError, match='not a PNG'):
        build_report([], [b'GIF89a...'])
    with pytest.raises(ReportError, match='expected SliceView'):
        build_report([], ['picture.png'])
    with pytest.raises(ReportError, match='no tip positions'):
        tip_target_png([], [0, 0, 0])


def test_tip_plot_splits_depth_and_lateral_error():
    # A tip 2 mm short of the target along the path and 1 mm to the side.
    png = tip_target_png([[0.001, 0.0, 0.098]], [0.0, 0.0, 0.1], [0.0, 0.0, 0.0])
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    s = summarise([])
    assert s.entries == 0 and s.dose is None
    assert re.search(r'<h1>Needle placement procedure report</h1>', build_report([]))
