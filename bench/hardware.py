#!/usr/bin/env python3
"""Hardware-layer benchmarks.

1. Serial request/response round trip: SerialHardware.read() (one GET_STATUS
   request, STATUS reply, decode, SI conversion) against the firmware emulator
   on a pseudo-terminal, p50/p99 over N requests. Targets: p50 <= 1 ms,
   p99 <= 3 ms. The emulator runs as its own process, as a real controller
   would; a pty has no baud-rate delay, so this measures the software path
   (both codecs, scheduling, the emulator's 1 kHz servo loop sharing its core).
2. MuJoCo real-time factor with a 1 kHz host control loop, via
   igt_robot.hardware.mujoco_backend.measure_real_time_factor(). Target >= 1.

Usage: python bench/hardware.py [--requests 2000] [--rtf-seconds 2]
"""
import argparse
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

from igt_robot.hardware.emulator import EmulatorProcess  # noqa: E402
from igt_robot.hardware.serial_driver import SerialHardware  # noqa: E402


def bench_serial_round_trip(requests: int, warmup: int = 200) -> None:
    with EmulatorProcess() as emu:
        hw = SerialHardware(emu.pty_path)
        hw.connect()
        try:
            hw.enable()                       # realistic: enabled controller, watchdog armed
            for _ in range(warmup):
                hw.read()
            samples = []
            for _ in range(requests):
                t0 = time.perf_counter()
                hw.read()
                samples.append((time.perf_counter() - t0) * 1e3)
            counters = hw.counters
        finally:
            hw.close()
    p50, p99, worst = percentiles(samples)
    report('serial_get_status_rtt_p50', p50, 'ms', '<=', 1.0)
    report('serial_get_status_rtt_p99', p99, 'ms', '<=', 3.0)
    info(f'serial_get_status_rtt_max (n={requests})', worst, 'ms')
    info('serial_link_retries_during_bench', counters['retries'], 'count')


def bench_mujoco_rtf(seconds: float) -> None:
    try:
        from igt_robot.hardware.mujoco_backend import measure_real_time_factor
    except Exception as exc:                  # noqa: BLE001 - any import failure is reported, not hidden
        print(f'mujoco_real_time_factor_1khz: cannot import measure_real_time_factor: '
              f'{type(exc).__name__}: {exc}', file=sys.stderr)
        report('mujoco_real_time_factor_1khz', math.nan, 'x', '>=', 1.0)
        return
    try:
        rtf = float(measure_real_time_factor(seconds=seconds, control_rate_hz=1000.0))
    except Exception as exc:                  # noqa: BLE001
        print(f'mujoco_real_time_factor_1khz: measurement failed: {type(exc).__name__}: {exc}', file=sys.stderr)
        rtf = math.nan
    report('mujoco_real_time_factor_1khz', rtf, 'x', '>=', 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--requests', type=int, default=2000, help='GET_STATUS round trips to time (>= 1000)')
    parser.add_argument('--rtf-seconds', type=float, default=2.0, help='simulated seconds for the MuJoCo RTF')
    args = parser.parse_args()
    if args.requests < 1000:
        parser.error('--requests must be at least 1000 for a meaningful p99')
    bench_serial_round_trip(args.requests)
    bench_mujoco_rtf(args.rtf_seconds)
    return 0


if __name__ == '__main__':
    sys.exit(main())
