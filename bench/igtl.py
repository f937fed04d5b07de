"""OpenIGTLink bridge: round-trip latency, throughput and concurrent clients (loopback only).

What is measured (igt_robot.igtl.BridgeCore on 127.0.0.1, a free port, the real selector server and
codec, in its own process as in the stack; clients are raw sockets speaking header v1 in this process so
the client side costs little):

* igtl_round_trip_p99  one client, TRANSFORM ``TARGET`` (RAS mm) -> STATUS ``TARGET`` reply, one message
                       in flight, paced at 200 Hz (under the default rate limit of 500 messages/s).
* igtl_messages_per_s  ROUND TRIPS per second (TRANSFORM in, STATUS out, each decoded, checked,
                       converted to LPS m, passed to the target callback and answered) completed by
                       CLIENTS concurrent clients, each keeping WINDOW messages in flight. The per-client
                       rate limit is raised for this phase: it is a policy cap (500/s per client by
                       default), not the bridge's capacity, which is what this figure is about.
* igtl_clients_served  of CLIENTS concurrent clients, how many got every reply (all must).

Bounded: fixed message counts and a wall-clock deadline per phase. Numbers on a shared 2-core machine
are indicative.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import threading
import time

import numpy as np
import pyigtl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import info, percentiles, report  # noqa: E402

from igt_robot.igtl import BridgeConfig, BridgeCore  # noqa: E402
from igt_robot.igtl import messages as codec  # noqa: E402

ROUND_TRIPS = 1000        # latency phase
PACE_S = 0.005            # 200 Hz
CLIENTS = 8
PER_CLIENT = 2000         # throughput phase, round trips per client
WINDOW = 8
PHASE_DEADLINE_S = 60.0


def _transform_bytes(x_mm: float) -> bytes:
    M = np.eye(4)
    M[:3, 3] = [x_mm, -20.0, 35.0]
    return codec.encode(pyigtl.TransformMessage(M, device_name='TARGET'), 1)


class RawClient:
    """Blocking loopback client that counts STATUS TARGET replies."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def read_reply(self) -> tuple:
        """(message type, device, code) of the next message."""
        while True:
            if len(self.buf) >= codec.HEADER_SIZE:
                _, mtype, device, _, _, size, _ = codec.HEADER.unpack_from(self.buf)
                if len(self.buf) >= codec.HEADER_SIZE + size:
                    body = bytes(self.buf[codec.HEADER_SIZE:codec.HEADER_SIZE + size])
                    del self.buf[:codec.HEADER_SIZE + size]
                    code = int.from_bytes(body[:2], 'big') if mtype.startswith(b'STATUS') else -1
                    return mtype.rstrip(b'\0'), device.rstrip(b'\0'), code
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError('closed by the bridge')
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def latency_phase(port: int) -> list:
    client = RawClient(port)
    message = _transform_bytes(10.0)
    samples = []
    deadline = time.monotonic() + PHASE_DEADLINE_S
    try:
        for _ in range(ROUND_TRIPS):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            client.sock.sendall(message)
            while True:
                mtype, device, code = client.read_reply()
                if mtype == b'STATUS' and device == b'TARGET':
                    break
            samples.append(time.perf_counter() - t0)
            if code != 1:
                raise RuntimeError(f'TARGET refused with code {code}')
            time.sleep(PACE_S)
    finally:
        client.close()
    return samples


def throughput_phase(port: int):
    done = [0] * CLIENTS
    errors = []
    start = threading.Barrier(CLIENTS + 1)
    deadline = time.monotonic() + PHASE_DEADLINE_S

    def run(i: int) -> None:
        try:
            client = RawClient(port)
        except OSError as exc:
            errors.append(f'client {i}: {exc}')
            start.wait()
            return
        message = _transform_bytes(float(i))
        try:
            start.wait()
            sent = 0
            while done[i] < PER_CLIENT and time.monotonic() < deadline:
                while sent < PER_CLIENT and sent - done[i] < WINDOW:
                    client.sock.sendall(message)
                    sent += 1
                mtype, device, code = client.read_reply()
                if mtype == b'STATUS' and device == b'TARGET':
                    if code != 1:
                        errors.append(f'client {i}: TARGET refused with code {code}')
                        return
                    done[i] += 1
        except (OSError, ConnectionError) as exc:
            errors.append(f'client {i}: {exc}')
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(PHASE_DEADLINE_S + 5.0)
    elapsed = time.perf_counter() - t0
    return done, elapsed, errors


def _serve(config_kwargs: dict, port_queue, stop_event) -> None:
    """Child process: a BridgeCore accepting every target, until told to stop."""
    core = BridgeCore(BridgeConfig(port=0, **config_kwargs), on_target=lambda p: None)
    port_queue.put(core.start())
    try:
        stop_event.wait(PHASE_DEADLINE_S * 3)
    finally:
        core.stop()


class BridgeProcess:
    """The bridge in its own process (bounded: it stops itself after 3 phase deadlines)."""

    def __init__(self, **config_kwargs):
        ctx = multiprocessing.get_context('spawn')
        self._stop = ctx.Event()
        ports = ctx.Queue()
        self._process = ctx.Process(target=_serve, args=(config_kwargs, ports, self._stop), daemon=True)
        self._process.start()
        self.port = ports.get(timeout=60.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)


def main() -> int:
    with BridgeProcess() as bridge:
        samples = latency_phase(bridge.port)
    p50, p99, worst = percentiles(samples) if samples else (float('nan'),) * 3
    info('igtl_round_trip_p50', p50 * 1e3, 'ms')
    info('igtl_round_trip_max', worst * 1e3, 'ms')
    info('igtl_round_trip_samples', len(samples), 'round trips')

    with BridgeProcess(max_clients=CLIENTS, rate_limit_hz=1e6, rate_burst=1_000_000) as bridge:
        done, elapsed, errors = throughput_phase(bridge.port)
    for e in errors[:5]:
        print(f'# error: {e}')
    rate = sum(done) / elapsed if elapsed > 0 else float('nan')
    served = sum(1 for d in done if d == PER_CLIENT)
    info('igtl_round_trips_completed', sum(done), f'of {CLIENTS * PER_CLIENT} in {elapsed:.2f} s')
    ok = report('igtl_round_trip_p99', p99 * 1e3, 'ms', '<=', 5.0)
    ok &= report('igtl_messages_per_s', rate, 'round_trips/s', '>=', 1000.0)
    ok &= report('igtl_clients_served', served, 'clients', '>=', 4)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
