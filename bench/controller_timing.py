#!/usr/bin/env python3
"""Motor-controller timing, measured on the firmware emulator process (its own servo loop, 2 kHz).

1. trigger_input_to_ramp_max: a streamed move is under way; the bench raises the scanner-trigger
   input (the emulator's side channel plays the GPIO) and the emulator records, on the host's
   monotonic clock (shared by all processes), when the first servo tick of the stop ramp ran.
   Latency = that time - the moment the bench raised the input. It includes the side channel's
   socket wake-up, the stand-in for a GPIO interrupt. Target <= 1 ms (the issue's figure).
2. controller_servo_period_error_p99: lateness of each servo tick against its schedule (the
   emulator's servo loop runs on a steady clock, catching up after it was descheduled), over the
   whole bench while the link is busy with streaming. Target <= 0.5 ms.

The emulator stands in for a dedicated motor-controller MCU, which the host's load cannot
starve; the BENCH lines therefore run it with SCHED_FIFO priority (--rt-priority, where the OS
permits it; the bench says when it does not). The same figures at normal priority, sharing the
cores with everything else, follow as comment lines for context.

Usage: python bench/controller_timing.py [--trials 40]
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

from igt_robot.hardware.emulator import EmulatorProcess  # noqa: E402
from igt_robot.hardware.interface import PvtPoint  # noqa: E402
from igt_robot.hardware.serial_driver import SerialHardware  # noqa: E402
from igt_robot.waiting import wait_for  # noqa: E402

MOVE = 0.003          # m of stage_x travel per trial
DURATION = 1.0        # s of a full move (cosine velocity profile, 6 mm/s peak)
SPACING = 0.01        # s between PVT points


def _move(start: np.ndarray, sign: float):
    w = 2 * np.pi / DURATION
    points = []
    for k in range(1, int(round(DURATION / SPACING)) + 1):
        t = k * SPACING
        pos, vel = start.copy(), np.zeros_like(start)
        pos[0] += sign * MOVE / DURATION * (t - np.sin(w * t) / w)
        vel[0] = sign * MOVE / DURATION * (1 - np.cos(w * t))
        points.append(PvtPoint(t, pos, vel))
    return points


def trial(hw, emu, sign: float) -> float:
    """One trigger edge during a streamed move; returns edge -> first ramp tick, ms."""
    start = hw.read().positions
    sid = hw.begin_stream(start)
    points = _move(start, sign)
    hw.push_points(sid, [p for p in points if p.time <= 0.6])
    wait_for(lambda: hw.stream_status().executed_time >= 0.3, 5.0, 'the move to be under way')
    before = emu.state()['ramp_start_wall']
    sent = time.monotonic()
    emu.control('trigger 1')
    ramp = wait_for(lambda: (s := emu.state()['ramp_start_wall']) != before and s, 5.0, 'the stop ramp')
    state = hw.read()
    if state.stream.stop_cause != 'TRIGGER':
        raise RuntimeError(f'stream stopped by {state.stream.stop_cause!r}, not the trigger')
    wait_for(lambda: not hw.read().moving, 5.0, 'the axes to stop')
    emu.control('trigger 0')
    hw.set_motion_inhibit(False)
    return (ramp - sent) * 1e3


def measure(trials: int, *emulator_args: str):
    with EmulatorProcess('--watchdog-ms', '500', *emulator_args) as emu:
        hw = SerialHardware(emu.pty_path, timeout=0.5)   # a loaded machine shows as a long sample, not a crash
        hw.connect()
        try:
            hw.enable()
            emu.control('timing reset')
            latencies = [trial(hw, emu, 1.0 if k % 2 == 0 else -1.0) for k in range(trials)]
            timing = json.loads(emu.control('timing'))
        finally:
            hw.close()
        note = 'real-time priority not applied' in emu.stderr_text()
    return latencies, timing, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trials', type=int, default=40, help='trigger edges to time (>= 20)')
    args = parser.parse_args()
    if args.trials < 20:
        parser.error('--trials must be at least 20')
    latencies, timing, not_rt = measure(args.trials, '--rt-priority', '50')
    if not_rt:
        print('# note: SCHED_FIFO was not permitted; the emulator ran at normal priority', flush=True)
    p50, p99, worst = percentiles(latencies)
    report('trigger_input_to_ramp_max', worst, 'ms', '<=', 1.0)
    info(f'trigger_input_to_ramp_p50 (n={len(latencies)})', p50, 'ms')
    info('trigger_input_to_ramp_p99', p99, 'ms')
    report('controller_servo_period_error_p99', timing['lateness_p99_ms'], 'ms', '<=', 0.5)
    info(f'controller_servo_period_error_max (ticks={timing["ticks"]})', timing['lateness_max_ms'], 'ms')
    info('controller_servo_catch_up_overruns', timing['overruns'], 'count')
    latencies, timing, _ = measure(max(20, args.trials // 2))
    info('trigger_input_to_ramp_max_normal_priority', max(latencies), 'ms')
    info('controller_servo_period_error_p99_normal_priority', timing['lateness_p99_ms'], 'ms')
    return 0


if __name__ == '__main__':
    sys.exit(main())
