"""scanner_trigger: the scanner's state, straight to the motor controller's trigger port, from a lean process.

Why a process of its own. The hardware node commands the drive's inhibit from its scanner callback, but it
shares its process (and the interpreter lock) with the serial status reads, the state publications, the
executor and the trajectory streaming. Measured in one bench/interlock.py run (docs/safety.md): a process
that only waits for /scanner/state received the scan start p50 0.57 / p99 1.39 / max 3.0 ms after its
publication under SCHED_FIFO, while the hardware node's inhibit reached the drive p50 1.0 / p99 3.2 / max
5.4 ms after it. So this node does one thing: it turns the scanner state into the level of the controller's
second scanner-trigger input (docs/serial_protocol.md §9), which stops the axes in the controller's next
servo tick and latches the inhibit there. The hardware node's own interlock stays as it is: it still
decides permission, supervisor, faults and staleness, and still commands MOTION_INHIBIT; the trigger port
is a second, faster path for the one event whose latency counts.

Decisions (``Interlock.trigger_level``, the same authority and staleness rule as the hardware node): imaging
from any publisher, or a stale or absent configured source, raises the level; only the configured source's
fresh IDLE lowers it. The level is sent at once on every change (in the scanner callback, no executor on the
way: ``DirectSubscription``) and re-sent by a steady-clock thread at ``check_rate`` at least every third of the
controller's watchdog period: once the port has heard from us, our silence reads as imaging there.

Lowering the level does not resume anything: the controller keeps its inhibit latched until the hardware
node releases it, which needs the supervisor's permission (docs/safety.md).

Parameters: see ``PARAMS``; configured in config/robot.yaml (section ``scanner_trigger``).
"""
from __future__ import annotations

import collections
import math
import threading
import time

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.node import Node

from igt_robot import cpu_priority
from igt_robot.hardware.interface import HardwareError
from igt_robot.hardware.serial_driver import TriggerLink
from igt_robot.nodes import common, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.nodes.spinning import DirectSubscription, SteadyPeriodicThread
from igt_robot.safety.interlock import Interlock, InterlockConfig
from igt_robot_msgs.msg import ScannerState

NODE_NAME = 'scanner_trigger'

PARAMS = [
    Param('trigger_port', '', "serial device of the motor controller's trigger port (docs/serial_protocol.md §9; "
          'the emulator prints it as TRIGGER_PTY); required'),
    Param('scanner_source', '/scanner_interface', 'the only node whose /scanner/state may lower the level '
          '(fully qualified name)'),
    Param('scanner_period', 0.1, "the scanner source's /scanner/state period, s", 0.005, 1.0),
    Param('scanner_timeout', 0.28, 'a fresh IDLE is believed this long, s; scanner_timeout + 1/check_rate must '
          'not exceed 3 scanner periods (docs/safety.md)', 0.005, 3.0),
    Param('check_rate', 100.0, 'rate of the staleness check, which also re-sends the level, Hz', 100.0, 2000.0),
    Param('graph_check_period', 0.5, 'period of the check for foreign publishers on /scanner/state, s', 0.05, 5.0),
    Param('reconnect_period', 1.0, 'seconds between attempts to open the trigger port while it is closed',
          0.1, 10.0),
    Param('realtime_priority', 0, 'SCHED_FIFO priority of this process\'s threads (0: normal scheduling; needs '
          'CAP_SYS_NICE or an rtprio limit, else a warning and normal scheduling)', 0, 99),
    Param('diagnostics_period', 1.0, 'period of /diagnostics, s', 0.1, 10.0),
]


class _ScannerNode(common.LeanQosEvents, Node):
    """The scanner subscription's node: served by its own thread, never by an executor."""


class ScannerTriggerNode(common.LeanQosEvents, Node):
    """See the module docstring."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self.p = declare(self, PARAMS, read_only=True)
        if not self.p['trigger_port']:
            raise ValueError("parameter 'trigger_port' is empty: name the motor controller's trigger port "
                             '(docs/serial_protocol.md §9)')
        self.config = InterlockConfig(scanner_source=self.p['scanner_source'],
                                      scanner_period=self.p['scanner_period'],
                                      scanner_timeout=self.p['scanner_timeout'],
                                      check_period=1.0 / self.p['check_rate'])
        self.interlock = Interlock(self.config)
        self.link = TriggerLink(self.p['trigger_port'])
        self._lock = threading.Lock()            # one decision and its frame at a time, in order
        self.level = None                        # the level the controller acknowledged last (None: unknown)
        self.reason = 'not connected'
        self._sent_time = -math.inf
        self._keepalive = 0.05
        self._next_connect = -math.inf
        self._next_graph_check = -math.inf
        self._next_diagnostics = -math.inf
        self._shut_down = False
        self._ever_connected = False
        self.sent = 0
        self.failures = 0
        self.changes = collections.deque(maxlen=100)     # (monotonic, level, reason)
        self._names = common.PublisherNames(self, topics.SCANNER_STATE)
        self.diagnostics_pub = common.create_diagnostics_publisher(self)
        self._connect(time.monotonic())
        self._scanner_node = _ScannerNode(f'{NODE_NAME}_scanner', namespace=self.get_namespace(),
                                          context=self.context, start_parameter_services=False)
        self._subscription = DirectSubscription(self._scanner_node, ScannerState, topics.SCANNER_STATE,
                                                qos.SCANNER_STATE, self._on_scanner, name='scanner-trigger',
                                                on_error=self._on_error)
        self._check = SteadyPeriodicThread(1.0 / self.p['check_rate'], self._tick, 'scanner-trigger-check',
                                           on_error=self._on_error)
        if self.p['realtime_priority']:
            # Every thread of the process, the main thread too (the executor's threads it makes later inherit
            # it): a real-time thread that needs the interpreter lock while a normal-priority thread of this
            # process holds it waits until the load lets that thread run (the check ran 24 ms late under
            # bench/stress.py load when the executor's threads were left at normal priority).
            why = cpu_priority.set_realtime(0, self.p['realtime_priority'])
            if why:
                self.get_logger().warning(f"real-time priority {self.p['realtime_priority']} not applied ({why}); "
                                          'normal scheduling')

    # ------------------------------------------------------------------ inputs
    def _on_scanner(self, msg: ScannerState, info) -> None:
        now = time.monotonic()
        phase = common.phase_from_msg(msg.phase)
        stamp_age = common.stamp_age(self, msg.header.stamp, now)
        publisher, name = self._names.lookup(info)
        with self._lock:
            findings = self.interlock.on_scanner(publisher, name, phase, msg.heartbeat, now, stamp_age=stamp_age)
            self._apply(now, keepalive=False)
        self._report(findings)

    def _tick(self) -> None:
        now = time.monotonic()
        if not self.link.connected and now >= self._next_connect:
            self._connect(now)
        findings = []
        if now >= self._next_graph_check:
            self._next_graph_check = now + self.p['graph_check_period']
            publishers = self._names.publishers()
            with self._lock:
                findings = self.interlock.on_graph(publishers)
        with self._lock:
            self._apply(now, keepalive=True)
        self._report(findings)
        if now >= self._next_diagnostics:
            self._next_diagnostics = now + self.p['diagnostics_period']
            self.publish_diagnostics()

    def _on_error(self, exc: BaseException) -> None:
        self.get_logger().error(f'scanner trigger: {type(exc).__name__}: {exc}', throttle_duration_sec=1.0)

    # ------------------------------------------------------------------ output
    def _connect(self, now: float) -> None:
        self._next_connect = now + self.p['reconnect_period']
        try:
            self.link.connect()
        except HardwareError as exc:
            self.reason = f'trigger port not open: {exc}'
            if self._ever_connected:
                self.get_logger().error(self.reason, throttle_duration_sec=5.0)
            else:   # at start-up the controller (or the simulation offering the port) may come up after us
                self.get_logger().info(f'waiting for the trigger port ({exc})', throttle_duration_sec=5.0)
            return
        self._ever_connected = True
        # Re-send well inside the port's silence limit (the watchdog period): a third of it, at most 50 ms.
        self._keepalive = min(0.05, self.link.watchdog_ms / 3000.0) if self.link.watchdog_ms else 0.05
        self.level = None
        self.get_logger().info(f"trigger port {self.p['trigger_port']} open: {self.link.device_name}, protocol "
                               f"{'.'.join(map(str, self.link.protocol_version))}, silence limit "
                               f'{self.link.watchdog_ms} ms')

    def _apply(self, now: float, keepalive: bool) -> None:
        """Send the level the interlock gives now if it changed, or if a keepalive is due (lock held)."""
        if not self.link.connected:
            return
        imaging, reason = self.interlock.trigger_level(now)
        if imaging == self.level and (not keepalive or now - self._sent_time < self._keepalive):
            return
        try:
            self.link.set_level(imaging)
        except HardwareError as exc:
            self.failures += 1
            self.level = None
            self.reason = f'trigger port failed: {exc}'
            self.get_logger().error(self.reason, throttle_duration_sec=1.0)
            self.link.close()
            return
        self.sent += 1
        self._sent_time = now
        if imaging != self.level:
            self.changes.append((now, imaging, reason))
            self.get_logger().info(f"trigger level {'IMAGING' if imaging else 'idle'}: {reason}")
        self.level, self.reason = imaging, reason

    def _report(self, findings) -> None:
        for finding in findings:
            log = self.get_logger().warning if finding.active else self.get_logger().info
            log(f'{finding.code}: {finding.detail}')

    def publish_diagnostics(self) -> None:
        connected = self.link.connected
        sending = connected and self.level is not None
        link = self.link.counters
        level = DiagnosticStatus.OK if sending else DiagnosticStatus.ERROR
        text = f"level {'IMAGING' if self.level else 'idle'}: {self.reason}" if sending else self.reason
        self.diagnostics_pub.publish(common.diagnostic_array(self, [common.diagnostic_status(
            self, 'scanner trigger', level, text,
            {'port': self.p['trigger_port'], 'connected': connected, 'level': self.level, 'frames_sent': self.sent,
             'failures': self.failures, 'scanner_messages': self._subscription.messages,
             'check_late_max_s': round(self._check.late_max, 6),
             **{key: link[key] for key in ('reply_time_max_s', 'retries', 'timeouts')}})]))

    def shutdown(self) -> None:
        """Stop both threads, then release the port (its silence then reads as imaging in the controller).
        Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        self._check.stop()
        self._subscription.stop()
        with self._lock:
            self.link.close()
        self._scanner_node.destroy_node()

    def on_bringup_shutdown(self) -> None:
        self.shutdown()

    def helper_nodes(self) -> list:
        """The rclpy nodes this node creates besides itself (its endpoints belong to this node's SROS2 profile:
        tools/sros2_policy.py)."""
        return [self._scanner_node]

    def destroy_node(self):
        self.shutdown()
        return super().destroy_node()


def main(args=None) -> int:
    """Console script ``scanner_trigger``."""
    return common.run_node(ScannerTriggerNode, args=args, threads=1)


if __name__ == '__main__':
    raise SystemExit(main())
