#!/usr/bin/env python3
"""Hardware-layer benchmarks.

1. Serial request/response round trip: SerialHardware.read() (one GET_STATUS
   request, STATUS reply, decode, SI conversion) against the firmware emulator
   on a pseudo-terminal, p50/p99 over N requests. Targets: p50 <= 1 ms,
   p99 <= 3 ms. The emulator runs as its own process, as a real controller
   would; a pty has no baud-rate delay, so this measures the software path
   (both codecs, scheduling, the emulator's 1 kHz servo loop sharing its core).
2. Serial PUSH_POINTS round trip (protocol 2): a frame of 5 PVT points to a
   running stream, STREAM_STATUS back, p99. Target <= 3 ms (a 50 Hz host keeping
   100 ms buffered spends a few frames per cycle on it).
3. MuJoCo real-time factor with a 1 kHz host control loop, via
   igt_robot.hardware.mujoco_backend.measure_real_time_factor(). Target >= 1.
4. MuJoCo catch-up factor while the simulated controller plays a stream: simulated
   seconds per wall second of physics + controller stepping. The realtime backend
   replays a host stall at its next call, so this must stay well above 1 (target
   >= 2) for a stall to be replayed faster than it lasted.

Usage: python bench/hardware.py [--requests 2000] [--rtf-seconds 2]
"""
import argparse
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

from igt_robot.hardware.emulator import EmulatorProcess  # noqa: E402
from igt_robot.hardware.interface import PvtPoint  # noqa: E402
from igt_robot.hardware.serial_driver import CommandRefused, SerialHardware  # noqa: E402


def _slow_points(start: np.ndarray, duration: float, spacing: float = 0.01):
    """A slow move of stage_x (cosine velocity profile, 1 mm/s peak) as PVT points, at rest at the end."""
    points = []
    n = int(round(duration / spacing))
    for k in range(1, n + 1):
        t = k * spacing
        pos, vel = start.copy(), np.zeros_like(start)
        w = 2 * math.pi / duration
        pos[0] += 0.0005 * (t - math.sin(w * t) / w)
        vel[0] = 0.0005 * (1 - math.cos(w * t))
        points.append(PvtPoint(t, pos, vel))
    return points


def bench_serial_round_trip(requests: int, warmup: int = 200) -> None:
    with EmulatorProcess() as emu:
        hw = SerialHardware(emu.pty_path, timeout=0.5)   # a loaded machine shows as a long sample, not a crash
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


def bench_serial_push_points(frames: int) -> None:
    with EmulatorProcess('--watchdog-ms', '500') as emu:
        hw = SerialHardware(emu.pty_path, timeout=0.5)   # a loaded machine shows as a long sample, not a crash
        hw.connect()
        try:
            hw.enable()
            spacing = 0.005                   # 5 points = 25 ms of trajectory per frame
            points = _slow_points(hw.read().positions, duration=frames * 5 * spacing + 0.2, spacing=spacing)
            sid = hw.begin_stream(hw.read().positions)
            hw.push_points(sid, points[:40])  # 200 ms: the stream starts
            samples, pushed = [], 40
            while pushed + 5 <= len(points) and len(samples) < frames:
                status = hw.stream_status()
                if status.stop_cause:
                    break                     # the bench host was starved past its buffer
                if status.buffered_until - status.executed_time > 0.4:
                    continue                  # keep ~400 ms (80 of 128 slots) ahead on a busy machine
                t0 = time.perf_counter()
                try:
                    hw.push_points(sid, points[pushed:pushed + 5])
                except CommandRefused as exc:
                    print(f'# push refused: {exc}', flush=True)
                    break
                samples.append((time.perf_counter() - t0) * 1e3)
                pushed += 5
            underruns = hw.read().stream.underruns
        finally:
            hw.close()
    p50, p99, worst = percentiles(samples)
    report('serial_push_points_rtt_p99', p99, 'ms', '<=', 3.0)
    info(f'serial_push_points_rtt_p50 (n={len(samples)})', p50, 'ms')
    info('serial_push_points_rtt_max', worst, 'ms')
    info('serial_stream_underruns_during_bench', underruns, 'count')


def bench_mujoco_catch_up(seconds: float) -> None:
    try:
        from igt_robot.hardware.mujoco_backend import MujocoHardware
    except Exception as exc:                  # noqa: BLE001 - any import failure is reported, not hidden
        print(f'mujoco_streaming_catch_up_factor: cannot import MujocoHardware: {type(exc).__name__}: {exc}',
              file=sys.stderr)
        report('mujoco_streaming_catch_up_factor', math.nan, 'x', '>=', 2.0)
        return
    hw = MujocoHardware(realtime=False)
    hw.connect()
    try:
        hw.enable()
        points = _slow_points(hw.read().positions, duration=seconds + 0.5)
        sid = hw.begin_stream(hw.read().positions)
        hw.push_points(sid, [p for p in points if p.time <= 0.9])
        pushed = len([p for p in points if p.time <= 0.9])
        wall = 0.0
        while hw.sim_time < seconds:
            batch = [p for p in points[pushed:] if p.time <= hw.stream_status().executed_time + 0.9]
            if batch:
                hw.push_points(sid, batch, final=pushed + len(batch) == len(points))
                pushed += len(batch)
            t0 = time.perf_counter()
            hw.advance(0.25)                  # a 250 ms host stall, replayed in one go
            wall += time.perf_counter() - t0
        factor = hw.sim_time / wall
        underruns = hw.read().stream.underruns
    finally:
        hw.close()
    report('mujoco_streaming_catch_up_factor', factor, 'x', '>=', 2.0)
    info('mujoco_stream_underruns_during_bench', underruns, 'count')


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
    bench_serial_push_points(max(200, args.requests // 10))
    bench_mujoco_rtf(args.rtf_seconds)
    bench_mujoco_catch_up(args.rtf_seconds)
    return 0


if __name__ == '__main__':
    sys.exit(main())
