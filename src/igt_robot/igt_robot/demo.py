"""`make demo`: the whole needle placement in simulation, headless, in one process.

Brings the stack up in-process (igt_robot.bringup: the same nodes and config/*.yaml
that `ros2 launch igt_robot sim.launch.py` starts) with the MuJoCo robot, runs the
procedure node in demo mode and prints progress and a summary. The record, the
MCAP log, the scans and the HTML report go to build/records/<procedure id>/.
Exit code 0 only when the procedure completed.
"""
from __future__ import annotations

import argparse
import sys
import time

from igt_robot import paths
from igt_robot.bringup import PROFILES, Bringup, available_nodes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seed', type=int, default=7, help='simulated patient and robot mounting')
    parser.add_argument('--modality', choices=('CT', 'MR'), default='CT')
    parser.add_argument('--depth', type=float, default=0.0, help='target depth below the skin, m (0 = random)')
    parser.add_argument('--steps', type=int, default=3, help='insertion steps (each followed by a control scan)')
    parser.add_argument('--timeout', type=float, default=900.0, help='give up after this many seconds')
    args = parser.parse_args(argv)
    procedure_id = time.strftime('demo-%Y%m%d-%H%M%S')
    record_dir = paths.repo_root() / 'build' / 'records' / procedure_id
    shared = {'procedure_id': procedure_id, 'record_dir': str(record_dir)}
    overrides = {
        'recorder_node': dict(shared),
        'procedure_node': dict(shared, demo=True, scenario_seed=args.seed, modality=args.modality,
                               target_depth=args.depth, insertion_steps=args.steps),
        'hardware_node': {'backend': 'mujoco'},
        'igtl_bridge': {'port': 0},
        'scanner_interface': {'igtl_port': 0},
    }
    names = available_nodes(PROFILES['sim'])
    print(f'[demo] starting {len(names)} nodes in one process: {", ".join(names)}', flush=True)
    with Bringup(names, overrides=overrides) as bringup:
        procedure = bringup.nodes['procedure_node']
        finished = procedure.demo_done.wait(args.timeout)
        for name, node in bringup.nodes.items():
            describe = getattr(node, 'describe_state', None)
            if callable(describe):
                print(f'[demo] {name}: {describe()}', flush=True)
    if not finished:
        print(f'[demo] FAILED: the procedure did not finish within {args.timeout:g} s', flush=True)
        return 1
    if procedure.demo_error:
        print(f'[demo] FAILED: {procedure.demo_error}', flush=True)
        return 1
    summary = procedure.demo_summary
    print(f'[demo] done: tip {summary["tip_to_target_mm"]:.2f} mm from target; report {summary["report"]}',
          flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
