"""Small adapter helpers shared by the rclpy nodes (no safety or robot logic here).

* time:        :func:`stamp_now`, :func:`stamp_from_monotonic`, :func:`monotonic_from_stamp`
  (the cores run on ``time.monotonic()``; messages carry ROS time).
* scanner:     :func:`phase_to_msg` / :func:`phase_from_msg` between ``ScannerPhase`` and
  ``ScannerState.PHASE_*`` (an unknown number maps to UNKNOWN: fail-safe).
* events:      :func:`make_event` builds a ``ProcedureEvent`` (published on /procedure/events, QoS EVENTS).
* heartbeat:   :class:`HeartbeatPublisher` publishes ``std_msgs/Header`` on /heartbeat
  (frame_id = node name, stamp = now) at a fixed period.
* faults:      :class:`FaultReporter` publishes ``SafetyFault`` on /safety/faults for the supervisor.
* diagnostics: :func:`diagnostic_status`, :func:`diagnostic_array`.
* steady time: :func:`create_steady_timer` (safety timers must not pause on a ROS-time step).
* identity:    :class:`PublisherNames` names the node behind a message's publisher GID (graph
  introspection), for the interlock's per-publisher authority.
* entry point: :func:`run_node` is the body of every node module's ``main()``.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Mapping, Optional, Sequence

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time as RclpyTime
from std_msgs.msg import Header

from igt_robot.process_exit import arm_exit_deadline
from igt_robot.record import procedure_id
from igt_robot.safety import operator_session
from igt_robot.scanner.phases import ScannerPhase
from igt_robot_msgs.msg import ProcedureEvent, SafetyFault, ScannerState

from . import qos, spinning, topics

HEARTBEAT_TOPIC = topics.HEARTBEAT
FAULTS_TOPIC = topics.SAFETY_FAULTS
EVENTS_TOPIC = topics.PROCEDURE_EVENTS
DIAGNOSTICS_TOPIC = topics.DIAGNOSTICS
DIAGNOSTICS_QOS = 10          # RELIABLE depth 10 (contracts.md)

# ------------------------------------------------------------------------- time


def stamp_now(node) -> Time:
    """The node clock's current time as a ``builtin_interfaces/Time``."""
    return node.get_clock().now().to_msg()


def _time_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def stamp_from_monotonic(node, t_monotonic: float) -> Time:
    """The ROS time of an instant given on ``time.monotonic()`` (e.g. a fault's ``since``)."""
    age_ns = int((time.monotonic() - float(t_monotonic)) * 1e9)
    return RclpyTime(nanoseconds=max(0, node.get_clock().now().nanoseconds - age_ns)).to_msg()


def monotonic_from_stamp(node, stamp: Time) -> Optional[float]:
    """A message stamp (ROS time) as ``time.monotonic()`` seconds; None for an unset (zero) stamp."""
    ns = _time_ns(stamp)
    if ns == 0:
        return None
    age_s = (node.get_clock().now().nanoseconds - ns) * 1e-9
    return time.monotonic() - age_s


def stamp_age(node, stamp: Time, now: float) -> Optional[float]:
    """``now`` (``time.monotonic()``) minus a message stamp, s; None for an unset stamp (not checked)."""
    stamp_time = monotonic_from_stamp(node, stamp)
    return None if stamp_time is None else now - stamp_time


# ------------------------------------------------------------------ steady time

def steady_clock() -> Clock:
    """A steady clock for timers: never jumps, never pauses (unlike ROS time, ros2/rclpy#1490)."""
    return Clock(clock_type=ClockType.STEADY_TIME)


class LeanQosEvents:
    """Node mixin (before ``Node`` / ``LifecycleNode`` in the bases): publishers and subscriptions created
    without rclpy's default QoS-event handlers, unless the caller passes ``event_callbacks``.

    rclpy gives every publisher and subscription two event waitables (incompatible QoS, incompatible type)
    whose only action is a log line, and its executor walks every waitable in Python at every wake-up: in
    the control process they were most of the executor's share of the interpreter lock, which the scanner
    -> inhibit path and the serial transactions wait behind. Without them (bench/interlock.py, quiet
    machine): interlock latency p99 10.7 -> 3.9 ms, max 22.6 -> 12.8 ms; stream loop period error p99
    halved. Used by the nodes of the control and supervision processes; what they lose is that log line
    (docs/safety.md). Subscriptions with callbacks of their own (the permission's liveliness) keep them.
    """

    def create_publisher(self, *args, event_callbacks=None, **kwargs):
        if event_callbacks is None:
            event_callbacks = PublisherEventCallbacks(use_default_callbacks=False)
        return super().create_publisher(*args, event_callbacks=event_callbacks, **kwargs)

    def create_subscription(self, *args, event_callbacks=None, **kwargs):
        if event_callbacks is None:
            event_callbacks = SubscriptionEventCallbacks(use_default_callbacks=False)
        return super().create_subscription(*args, event_callbacks=event_callbacks, **kwargs)


def create_steady_timer(node, period: float, callback, callback_group=None):
    """``node.create_timer`` on a steady clock: every safety-relevant timer uses this."""
    return node.create_timer(float(period), callback, callback_group=callback_group, clock=steady_clock())


# --------------------------------------------------------------------- identity

def operator_secret(node) -> str:
    """The operator's session secret from the file named by ``node.p['operator_session_file']`` (empty = the
    default per-user file); '' when it cannot be read, which every check_token then refuses (logged)."""
    try:
        return operator_session.read_session(node.p['operator_session_file'] or None)
    except operator_session.OperatorSessionError as exc:
        node.get_logger().error(str(exc), throttle_duration_sec=5.0)
        return ''


def gid_key(gid) -> bytes:
    """A publisher GID as bytes, from a MessageInfo's ``publisher_gid`` dict or a ``TopicEndpointInfo``
    ``endpoint_gid`` list (16 significant bytes either way)."""
    if isinstance(gid, dict):
        gid = gid.get('data', b'')
    return bytes(gid or b'')[:16]


_UNKNOWN_NODE = '_NODE_NAME_UNKNOWN_'    # what the graph lists for a node it has not heard of yet


class PublisherNames:
    """Which node owns the publisher that sent a message (graph introspection, cached by GID).

    ``lookup(message_info)`` -> (gid key, '/ns/node' or '' when the graph does not list it yet).
    ``publishers()`` -> {gid key: node} of the topic now.
    """

    def __init__(self, node, topic: str):
        self._node = node
        self.topic = topic
        self._names = {}

    def publishers(self) -> dict:
        names = {}
        for info in self._node.get_publishers_info_by_topic(self.topic):
            if not info.node_name or _UNKNOWN_NODE in info.node_name:
                # The endpoint is discovered before its participant's node list: not named yet ('').
                names[gid_key(info.endpoint_gid)] = ''
                continue
            ns = (info.node_namespace or '/').rstrip('/')
            names[gid_key(info.endpoint_gid)] = f'{ns}/{info.node_name}'
        self._names = {k: v for k, v in names.items() if v}
        return names

    def lookup(self, message_info) -> tuple:
        key = gid_key((message_info or {}).get('publisher_gid'))
        name = self._names.get(key)
        if name is None:
            name = self.publishers().get(key, '')
        return key, name


_INTERLOCK_CONFIGS = {}


def register_interlock_config(hardware_node: str, config) -> None:
    """The hardware node's interlock configuration, for the motion controller driving it in the same
    process: both decide by the same rule with the same values."""
    _INTERLOCK_CONFIGS[hardware_node] = config


def interlock_config(hardware_node: str):
    """The configuration registered by ``hardware_node`` in this process (None: none)."""
    return _INTERLOCK_CONFIGS.get(hardware_node)


# ---------------------------------------------------------------------- scanner

_PHASE_TO_MSG = {
    ScannerPhase.UNKNOWN: ScannerState.PHASE_UNKNOWN,
    ScannerPhase.IDLE: ScannerState.PHASE_IDLE,
    ScannerPhase.PREPARING: ScannerState.PHASE_PREPARING,
    ScannerPhase.ACQUIRING: ScannerState.PHASE_ACQUIRING,
}
_MSG_TO_PHASE = {v: k for k, v in _PHASE_TO_MSG.items()}


def phase_to_msg(phase) -> int:
    """``ScannerPhase`` (or its name) -> ``ScannerState.PHASE_*``."""
    return _PHASE_TO_MSG[ScannerPhase(phase)]


def phase_from_msg(value: int) -> ScannerPhase:
    """``ScannerState.PHASE_*`` -> ``ScannerPhase``; any other number is UNKNOWN (imaging, fail-safe)."""
    return _MSG_TO_PHASE.get(int(value), ScannerPhase.UNKNOWN)


def is_valid_phase_number(value: int) -> bool:
    return int(value) in _MSG_TO_PHASE


# ----------------------------------------------------------------------- events

def key_values(values: Optional[Mapping[str, object]]) -> list:
    """A mapping as ``diagnostic_msgs/KeyValue`` list (values as text; floats with repr precision)."""
    return [KeyValue(key=str(k), value=str(v)) for k, v in (values or {}).items()]


def make_event(node, kind: str, description: str, severity: int = ProcedureEvent.INFO,
               values: Optional[Mapping[str, object]] = None, phase: str = '') -> ProcedureEvent:
    """A ``ProcedureEvent`` from ``node`` (source = node name, stamp = now).

    Put units in the value keys (``depth_m``, ``duration_s``). ``procedure_id`` is this process's
    (igt_robot.record.procedure_id: the launcher's IGT_PROCEDURE_ID).
    """
    event = ProcedureEvent(phase=phase, severity=int(severity), source=node.get_name(), kind=kind,
                           description=description, values=key_values(values),
                           procedure_id=procedure_id.current())
    event.header.stamp = stamp_now(node)
    return event


def create_event_publisher(node):
    """Publisher for /procedure/events with the EVENTS QoS."""
    return node.create_publisher(ProcedureEvent, EVENTS_TOPIC, qos.EVENTS)


# -------------------------------------------------------------------- heartbeat

class HeartbeatPublisher:
    """Publishes ``std_msgs/Header`` on /heartbeat every ``period`` s (frame_id = node name).

    The timer runs in the node's default callback group unless ``callback_group``
    is given, so a node whose callbacks are wedged stops beating (that is the
    point). ``beat()`` sends one at once (e.g. from a control loop). ``alive``,
    when given, is asked before each timed beat: a node whose real work runs in
    another thread (a control loop) beats only while that work makes progress.
    """

    def __init__(self, node, period: float = 0.05, callback_group=None, alive=None):
        if not period > 0.0:
            raise ValueError(f'heartbeat period must be > 0 s, got {period!r}')
        self._node = node
        self._alive = alive
        self._pub = node.create_publisher(Header, HEARTBEAT_TOPIC, qos.COMMANDS)
        self._timer = create_steady_timer(node, period, self._on_timer, callback_group=callback_group)
        self.count = 0

    def _on_timer(self) -> None:
        if self._alive is None or self._alive():
            self.beat()

    def beat(self) -> None:
        self._pub.publish(Header(stamp=stamp_now(self._node), frame_id=self._node.get_name()))
        self.count += 1

    def stop(self) -> None:
        """Stop beating (the supervisor then raises HEARTBEAT_LOST for this node if it is required)."""
        self._timer.cancel()


# ----------------------------------------------------------------------- faults

class FaultReporter:
    """Reports faults to the safety supervisor on /safety/faults.

    Protocol the supervisor implements:

    * ``report(code, detail)``: a one-off event (e.g. a tracking error). It is
      latched; the operator can acknowledge it at once.
    * ``report(code, detail, active=True)``: a condition that persists (the
      supervisor refuses an acknowledge) until ``clear(code)`` is sent.
    """

    def __init__(self, node):
        self._node = node
        self._pub = node.create_publisher(SafetyFault, FAULTS_TOPIC, qos.COMMANDS)

    def report(self, code: str, detail: str, active: bool = False) -> SafetyFault:
        msg = SafetyFault(code=str(code), detail=str(detail), since=stamp_now(self._node), latched=True,
                          cause_active=bool(active))
        self._pub.publish(msg)
        return msg

    def clear(self, code: str, detail: str = 'cause cleared') -> SafetyFault:
        """The cause of a fault reported with ``active=True`` has gone (it stays latched)."""
        return self.report(code, detail, active=False)

    @property
    def publisher(self):
        return self._pub


# ------------------------------------------------------------------ diagnostics

def diagnostic_status(node, name: str, level: int, message: str,
                      values: Optional[Mapping[str, object]] = None) -> DiagnosticStatus:
    """One ``DiagnosticStatus`` (level: DiagnosticStatus.OK/WARN/ERROR/STALE; hardware_id = node name)."""
    level = level if isinstance(level, bytes) else bytes([int(level)])
    return DiagnosticStatus(level=level, name=f'{node.get_name()}: {name}', message=message,
                            hardware_id=node.get_name(), values=key_values(values))


def diagnostic_array(node, statuses: Sequence[DiagnosticStatus]) -> DiagnosticArray:
    array = DiagnosticArray(status=list(statuses))
    array.header.stamp = stamp_now(node)
    return array


def create_diagnostics_publisher(node):
    return node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, DIAGNOSTICS_QOS)


# ------------------------------------------------------------------ entry point

def make_executor(kind: str = 'multi', threads: Optional[int] = None, context=None):
    """'multi': rclpy's MultiThreadedExecutor; 'events': rclpy.experimental.EventsExecutor (one thread,
    callbacks dispatched from middleware events: the lean control process, docs/safety.md)."""
    if kind == 'events':
        from rclpy.experimental import EventsExecutor
        return EventsExecutor(context=context)
    if kind != 'multi':
        raise ValueError(f"executor must be 'multi' or 'events', got {kind!r}")
    return MultiThreadedExecutor(num_threads=threads, context=context)


def run_node(node_factory, args=None, threads: Optional[int] = None, executor_kind: str = 'multi') -> int:
    """Init rclpy, build the node(s), spin them until SIGINT/SIGTERM, shut down.

    ``node_factory()`` builds one node or a list of nodes sharing the process
    (they read ``--ros-args`` from the global context). ``executor_kind``: see
    :func:`make_executor`. Returns the process exit code: 0 on a signal-initiated shutdown.
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    executor = make_executor(executor_kind, threads)
    nodes = []

    def on_signal(*_):
        stop.set()
        executor.wake()  # leave spin_once promptly

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        built = node_factory()
        nodes = list(built) if isinstance(built, (list, tuple)) else [built]
        for node in nodes:
            executor.add_node(node)
        spinning.settle_for_spinning()
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        arm_exit_deadline()     # the process ends even if a callback never returns
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        spinning.shutdown_executor(executor, timeout_sec=2.0)   # callbacks finish before the nodes go
        for node in reversed(nodes):
            spinning.destroy_node_and_actions(node)
        rclpy.try_shutdown()
    return 0
