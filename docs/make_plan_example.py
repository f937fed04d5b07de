"""Generate docs/img/plan_example.png and the example output quoted in docs/planning.md.

Run from the repository root:
    PYTHONPATH=src/igt_robot:src/igt_planner python docs/make_plan_example.py
"""
from pathlib import Path

from igt_planner import NeedlePlanner, plan_ablation, render_plan_slice
from igt_planner.reasons import format_mm
from igt_planner.synthetic import make_abdomen

OUT = Path(__file__).resolve().parent / 'img' / 'plan_example.png'


def main():
    # Synthetic upper abdomen, 1 x 1 x 2 mm voxels; target = tumour centre in the right liver lobe.
    case = make_abdomen((256, 256, 128), (0.001, 0.001, 0.002))
    planner = NeedlePlanner(case.labelmap, entry_region=case.entry_region)   # default config, cone reachability
    result = planner.plan(case.target)
    best = result.best
    print(f'target (LPS): {", ".join(format_mm(v) for v in case.target)}')
    print(f'{result.n_candidates} candidates, {result.n_feasible} feasible; rejected: {result.rejected_counts}')
    print(f'best: entry ({", ".join(format_mm(v) for v in best.entry)}), {best.explain()}')
    print('clearance: ' + best.clearance_text())
    for kind, path in result.rejected_examples.items():
        print(f'example {kind}: {"; ".join(path.reasons)}')
    for power_w, time_s in ((60.0, 300.0), (100.0, 600.0)):
        ablation = plan_ablation(planner, best, power_w, time_s)
        print(f'ablation {power_w:g} W / {time_s:g} s: tip {format_mm(ablation.tip_offset_m)} beyond the target, '
              f'coverage {100 * ablation.coverage:.1f}%, safe {ablation.safe}; '
              + '; '.join(ablation.notes + ablation.reasons))
    render_plan_slice(case.labelmap, result, OUT, planner=planner, alternatives=3)
    print(f'wrote {OUT}')


if __name__ == '__main__':
    main()
