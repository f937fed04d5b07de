#!/usr/bin/env python3
"""Needle placement accuracy with the needle in tissue: open loop against closed loop.

Each run is one simulated patient with every perturbation of igt_robot.simulation.tissue
(bevel-tip deflection 1-5 mm at 100 mm, target push 1-5 mm, breath-hold reproducibility
1-3 mm of a 5-15 mm breathing motion, MR distortion up to 1 mm at 100 mm for the MR runs)
and a small robot calibration error, registered from its own planning scan. It is placed
twice from the same start: open loop (the planned depth, no correction) and closed loop
(after each control scan the tip and the target are found in the image and the next step
is re-planned: depth, operator's turn of the needle). Runs in the core, without ROS
(igt_robot.simulation.procedure_loop). Reported: true tip-to-target error at the end,
open and closed loop side by side, control scans and DLP per procedure (CT).

    python bench/accuracy.py [--runs 30] [--mr-every 4] [--realign 1]
"""
import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, report  # noqa: E402

from igt_robot.simulation.procedure_loop import run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=30)
    parser.add_argument('--seed', type=int, default=15000)
    parser.add_argument('--mr-every', type=int, default=4, help='every n-th run is MR (with distortion); 0 = none')
    parser.add_argument('--realign', type=int, default=0,
                        help='re-alignments (retract, re-aim about the RCM, re-insert) allowed per procedure')
    args = parser.parse_args()
    started = time.monotonic()
    open_err, closed_err, dlp, scans, failures, budgets = [], [], [], [], [], []
    for run in range(args.runs):
        seed = args.seed + run
        modality = 'MR' if args.mr_every and run % args.mr_every == args.mr_every - 1 else 'CT'
        t0 = time.monotonic()
        case = run_case(seed, modality, max_realignments=args.realign)
        if case.failure:
            failures.append(f'run {run} ({modality}, seed {seed}): {case.failure}')
            print(f'# run {run}: {modality} FAILED {case.failure}', flush=True)
            continue
        o, c = case.open_loop, case.closed_loop
        open_err.append(o.tip_error_m * 1e3)
        closed_err.append(c.tip_error_m * 1e3)
        scans.append(c.control_scans)
        if modality == 'CT':
            dlp.append(c.dlp_mgy_cm)
        budgets.append(c.budget)
        print(f'# run {run}: {modality} depth {case.depth * 1e3:.0f} mm  open {o.tip_error_m * 1e3:.2f} mm  '
              f'closed {c.tip_error_m * 1e3:.2f} mm (measured {c.measured_error_m * 1e3:.2f}, expected '
              f'{c.expected_errors_m[-1] * 1e3 if c.expected_errors_m else float("nan"):.2f})  '
              f'{c.control_scans} control scans {c.actions}  DLP {c.dlp_mgy_cm:.0f} mGy*cm  '
              f'budget {c.budget}  {time.monotonic() - t0:.0f} s', flush=True)
    done = len(closed_err)
    report('accuracy_completed_fraction', done / max(args.runs, 1), 'ratio', '>=', 1.0)
    if done:
        o, c = np.asarray(open_err), np.asarray(closed_err)
        info('tip_error_mean_open_loop', float(o.mean()), 'mm')
        info('tip_error_p95_open_loop', float(np.percentile(o, 95)), 'mm')
        report('tip_error_mean_closed_loop', float(c.mean()), 'mm', '<=', 1.0)
        report('tip_error_p95_closed_loop', float(np.percentile(c, 95)), 'mm', '<=', 2.0)
        info('tip_error_max_closed_loop', float(c.max()), 'mm')
        info('control_scans_per_procedure_mean', float(np.mean(scans)), 'scans')
        if dlp:
            info('dlp_per_procedure_mean_ct', float(np.mean(dlp)), 'mGy*cm')
            info('dlp_per_procedure_max_ct', float(np.max(dlp)), 'mGy*cm')
        for key in ('registration_mm', 'robot_mm', 'deflection_mm', 'target_motion_mm'):
            info(f'budget_{key[:-3]}_mean', float(np.mean([b[key] for b in budgets])), 'mm')
    for failure in failures:
        print(f'# failed: {failure}', flush=True)
    info('wall_time', time.monotonic() - started, 's')
    return 0


if __name__ == '__main__':
    sys.exit(main())
