#!/usr/bin/env python3
"""Randomised simulated procedures, image-based registration in the loop.

Each run is the whole `make demo` procedure (planning CT, Z-frame registration,
planning, alignment, stepwise insertion with control scans and one unexpected
scan, confirmation scan, tip found in the image) on a new random patient and
robot mounting, target depth drawn from 40-120 mm, oblique approaches chosen by
the planner. Reported: tip-to-target error (from the confirmation image) mean /
p95 / max, wall time, scans and dose per procedure.

    python bench/procedure.py [--runs 20]
"""
import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, report  # noqa: E402

from igt_robot import testing  # noqa: E402
from igt_robot.demo import ProcedureFailed, run_simulated_procedure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--seed', type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    rng = np.random.default_rng(args.seed)
    shm_before = testing.fastdds_shm_entries()
    errors, walls, scans, dlp, failures = [], [], [], [], []
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for run in range(args.runs):
        depth = float(rng.uniform(0.04, 0.12))
        seed = int(rng.integers(0, 1_000_000))
        testing.apply_env(testing.isolated_ros_env(pathlib.Path('build') / 'bench_procedure' / 'ros_log'))
        started = time.monotonic()
        try:
            summary = run_simulated_procedure(seed=seed, depth=depth, steps=3, quiet_nodes=True,
                                              procedure_id=f'bench-{stamp}-{run:02d}',
                                              extra_overrides={'procedure_node': {'scan_duration': 0.3}})
        except ProcedureFailed as failure:
            failures.append(f'run {run} (seed {seed}, depth {depth * 1e3:.0f} mm): {failure}')
            print(f'# run {run}: FAILED {failure}', flush=True)
            continue
        errors.append(summary['tip_to_target_mm'])
        walls.append(time.monotonic() - started)
        scans.append(summary['scans'])
        dlp.append(summary['total_dlp_mgy_cm'])
        print(f'# run {run}: depth {depth * 1e3:.0f} mm, tip error {summary["tip_to_target_mm"]:.2f} mm, '
              f'{summary["scans"]} scans, DLP {summary["total_dlp_mgy_cm"]:.0f} mGy*cm, {walls[-1]:.0f} s',
              flush=True)
    done = len(errors)
    report('procedure_completed_fraction', done / max(args.runs, 1), 'ratio', '>=', 1.0)
    if done:
        e = np.asarray(errors)
        report('tip_to_target_error_mean', float(e.mean()), 'mm', '<=', 0.7)
        report('tip_to_target_error_p95', float(np.percentile(e, 95)), 'mm', '<=', 1.2)
        info('tip_to_target_error_max', float(e.max()), 'mm')
        info('procedure_wall_time_mean', float(np.mean(walls)), 's')
        info('scans_per_procedure_mean', float(np.mean(scans)), 'scans')
        info('dlp_per_procedure_mean', float(np.mean(dlp)), 'mGy*cm')
    for failure in failures:
        print(f'# failed: {failure}', flush=True)
    testing.remove_stale_fastdds_shm(shm_before, ignore_pids=[os.getpid()])
    return 0


if __name__ == '__main__':
    sys.exit(main())
