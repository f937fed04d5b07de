#!/usr/bin/env python3
"""The floor for every latency figure: plain DDS between two processes on loopback.

A peer process echoes /floor/ping (std_msgs/Header, stamped with the sender's
CLOCK_MONOTONIC, which is system-wide) to /floor/pong and writes into the echo
the one-way latency it measured. Reported: round trip and one-way p50/p99/max
over N messages, RELIABLE QoS as the interlock path uses. Later benchmarks
(bench/interlock.py) call :func:`measure_dds_floor` in the same run to compare.
"""
import argparse
import pathlib
import random
import sys
import tempfile
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_report import info, percentiles, report  # noqa: E402

from igt_robot import testing  # noqa: E402

QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def _stamp(msg: Header, ns: int) -> None:
    msg.stamp.sec, msg.stamp.nanosec = divmod(ns, 1_000_000_000)


def _ns(msg: Header) -> int:
    return msg.stamp.sec * 1_000_000_000 + msg.stamp.nanosec


def run_peer() -> int:
    rclpy.init()
    node = rclpy.create_node('floor_peer')
    pong = node.create_publisher(Header, '/floor/pong', QOS)

    def echo(msg):
        one_way_ns = time.monotonic_ns() - _ns(msg)
        msg.frame_id = str(one_way_ns)
        pong.publish(msg)
    node.create_subscription(Header, '/floor/ping', echo, QOS)
    print('READY', flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def measure_dds_floor(count: int = 1000, env: dict = None, log_dir: pathlib.Path = None, gap_s=None):
    """Round-trip and one-way latencies (seconds) of ``count`` pings to a peer process.

    ``gap_s``: (low, high) -- each ping waits a uniform random time in that range after the previous
    pong, as events that arrive at an idle receiver do (its threads asleep); None: back to back.
    """
    log_dir = pathlib.Path(log_dir or tempfile.mkdtemp(prefix='ros_floor_'))
    env = env or testing.isolated_ros_env(log_dir / 'ros_log')
    testing.apply_env(env)
    peer = testing.python_process(__file__, ['--peer'], env, log_dir / 'floor_peer.log', name='floor_peer')
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('floor_probe', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    received = {}
    ping = node.create_publisher(Header, '/floor/ping', QOS)

    def on_pong(msg):
        received[int(msg.stamp.nanosec + msg.stamp.sec * 1_000_000_000)] = (time.monotonic_ns(), int(msg.frame_id))
    node.create_subscription(Header, '/floor/pong', on_pong, QOS)
    try:
        testing.wait_for(lambda: ping.get_subscription_count() > 0 and node.count_publishers('/floor/pong') > 0,
                         30, 'the floor peer', on_poll=lambda: executor.spin_once(timeout_sec=0.01))
        rtt, one_way = [], []
        rng = random.Random(count)
        for i in range(count + 20):  # the first 20 warm the path up and are not counted
            if gap_s is not None:
                time.sleep(rng.uniform(*gap_s))
            msg = Header()
            sent = time.monotonic_ns()
            _stamp(msg, sent)
            ping.publish(msg)
            testing.wait_for(lambda: sent in received, 5, f'pong {i}',
                             on_poll=lambda: executor.spin_once(timeout_sec=0.001))
            back, peer_one_way = received.pop(sent)
            if i >= 20:
                rtt.append((back - sent) / 1e9)
                one_way.append(peer_one_way / 1e9)
        return rtt, one_way
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        peer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--peer', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--count', type=int, default=2000)
    args = parser.parse_args()
    if args.peer:
        return run_peer()
    rtt, one_way = measure_dds_floor(args.count)
    p50, p99, mx = percentiles(rtt)
    o50, o99, omx = percentiles(one_way)
    # Targets: what loopback DDS (shared-memory transport) gives on an idle 2-core machine.
    report('dds_round_trip_p50', p50 * 1e3, 'ms', '<=', 1.0)
    report('dds_round_trip_p99', p99 * 1e3, 'ms', '<=', 2.0)
    report('dds_round_trip_max', mx * 1e3, 'ms', '<=', 10.0)
    report('dds_one_way_p50', o50 * 1e3, 'ms', '<=', 0.5)
    report('dds_one_way_p99', o99 * 1e3, 'ms', '<=', 1.0)
    report('dds_one_way_max', omx * 1e3, 'ms', '<=', 5.0)
    info('samples', len(rtt), 'messages')
    return 0


if __name__ == '__main__':
    sys.exit(main())
