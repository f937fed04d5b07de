"""Hardware node (lifecycle): owns the hardware backend, publishes its state, enforces the interlock.

Lifecycle (managed node, as ros2_control hardware components):

* configure  -- build the backend from parameters (``create_backend``), connect
  (the serial driver checks protocol/firmware versions and axis configuration),
  assert the motion-inhibit, read once, and register a
  :class:`~igt_robot.hardware.shared.SharedHardware` under the node name for the
  motion controller in the same process. Any failure: FAILURE, one log line
  saying what and why, the backend closed again (nothing half-open).
* activate   -- enable the axes. The motion-inhibit stays ASSERTED until a fresh
  IDLE scanner state and ``motion_permitted = true`` have both been seen.
* deactivate -- stop, assert the inhibit, disable.
* cleanup / shutdown -- close the backend, unregister and retire the handle.
* error      -- emergency stop (latched in the drive), then close.

Interlock (defence in depth, docs/safety.md): the decision is the core's
:class:`~igt_robot.safety.interlock.Interlock`; this node feeds it and commands the
drive. The inhibit is asserted in the /scanner/state or /safety/motion_permitted
*callback itself* (one DDS hop from the event to the command on the serial
line); a >= 100 Hz steady-clock timer asserts it when the scanner state goes stale
(the core's one staleness rule). Each message's publisher is named from its GID
(graph introspection): only ``scanner_source`` may say IDLE and only
``supervisor_node``'s permission counts; any other publisher on those topics is
reported on /safety/faults naming its node (the supervisor latches it) and keeps
the inhibit asserted while it is on the graph. ``/hardware_node/reset_faults``
(AcknowledgeFaults, operator secret required) sends RESET_FAULTS for the
operator's acknowledge. Every parameter is read-only (start-up values).

Publishing while configured (inactive or active): /joint_states, /robot/state
at ``publish_rate`` and /diagnostics at ``diagnostics_rate`` (diagnostics also
while unconfigured: the last configure failure is shown there). When the
motion controller's loop is reading the hardware (cached state fresher than two
publish periods) the node publishes the cached state instead of adding
transactions to the link. /heartbeat only while active. New hardware faults go
to /safety/faults (``cause_active`` until the drive no longer reports them).

Nothing here computes what a core module could: kinematics, the interlock
decision and phase decoding are imported.
"""
from __future__ import annotations

import collections
import functools
import math
import sys
import threading
import time
from typing import Optional, Tuple

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from geometry_msgs.msg import Pose
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool

from igt_robot import frames
from igt_robot.hardware import create_backend, import_backend
from igt_robot.hardware import shared as shared_hardware
from igt_robot.hardware.interface import HardwareError, HardwareFault, HardwareState
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import common, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.nodes.spinning import (INTERLOCK_GIL_SWITCH_INTERVAL_S, DirectSubscription, SteadyPeriodicThread,
                                      shorten_gil_switch_interval)
from igt_robot.robot_model import load_robot_model
from igt_robot.safety import operator_session, scanner_relay
from igt_robot.safety.scanner_relay import ScannerSample
from igt_robot.safety.interlock import Interlock, InterlockConfig, InterlockConfigError
from igt_robot_msgs.msg import ProcedureEvent, RobotState, ScannerState
from igt_robot_msgs.srv import AcknowledgeFaults

NODE_NAME = 'hardware_node'
LINK_FAULT = 'HARDWARE_LINK'          # the controller stopped answering or the port vanished
ESTOP_FAULT = 'HARDWARE_ESTOP'        # e-stop latched in the drive
JOINT_STATE_QOS = 10                  # RELIABLE, KEEP_LAST 10: what robot_state_publisher expects

PARAMS = [
    Param('autostart', True, 'configure and activate at start-up (bringup and the console script)'),
    Param('backend', 'mujoco', "hardware backend: 'mujoco' (simulation) or 'serial' (motor controller or "
                               'firmware emulator); checked at configure'),
    Param('serial_port', '/dev/ttyUSB0', 'serial device of the motor controller (backend serial)'),
    Param('serial_connect_timeout', 0.0, 'retry opening serial_port for this long before configure fails, s '
          '(the port may appear after the node starts: an emulator, a USB adapter)', 0.0, 120.0),
    Param('baudrate', 1000000, 'serial line rate, bit/s (ignored by pseudo-terminals)', 9600, 12000000),
    Param('serial_timeout', 0.05, 'reply timeout per attempt, s (backend serial)', 0.001, 1.0),
    Param('serial_retries', 2, 'retransmissions after a failed attempt (backend serial)', 0, 10),
    Param('encoder_counts_per_m', 1.0e6, 'encoder resolution of the prismatic axes, counts/m; serial: '
          'configure fails if the controller reports another value; mujoco: simulated quantisation', 1.0, 1.0e10),
    Param('encoder_counts_per_rad', 1.0e5, 'encoder resolution of the revolute axes, counts/rad (as above)',
          1.0, 1.0e10),
    Param('mujoco_realtime', True, 'mujoco: the physics follows the wall clock (false: only advance())'),
    Param('mujoco_timestep', 0.001, 'mujoco: physics step, s', 1.0e-5, 0.01),
    Param('mujoco_noise_std_m', 0.0, 'mujoco: encoder noise std of prismatic axes, m', 0.0, 0.001),
    Param('mujoco_noise_std_rad', 0.0, 'mujoco: encoder noise std of revolute axes, rad', 0.0, 0.01),
    Param('mujoco_backlash_m', 0.0, 'mujoco: lost motion of prismatic axes, m', 0.0, 0.001),
    Param('mujoco_backlash_rad', 0.0, 'mujoco: lost motion of revolute axes, rad', 0.0, 0.01),
    Param('mujoco_seed', -1, 'mujoco: seed of the encoder noise; -1 = not reproducible', -1, 2147483647),
    Param('mujoco_trigger_port_link', '', "mujoco: offer the simulated controller's trigger port (docs/"
          "serial_protocol.md §9) as a pty linked at this path, for scanner_trigger; '' = none"),
    Param('publish_rate', 25.0, '/joint_states and /robot/state rate, Hz', 1.0, 500.0),
    Param('diagnostics_rate', 2.0, '/diagnostics rate, Hz (also published at once on a new fault)', 0.1, 50.0),
    Param('heartbeat_rate', 10.0, '/heartbeat rate while active, Hz', 1.0, 100.0),
    Param('hardware_heartbeat_rate', 20.0, 'rate of heartbeat() to the controller watchdog, Hz; configure '
          'fails unless it beats at least twice per watchdog period', 1.0, 500.0),
    Param('scanner_source', '/scanner_interface', 'the only node whose /scanner/state may say IDLE '
          '(fully qualified name); any other publisher there is a fault'),
    Param('supervisor_node', '/safety_supervisor', 'the only node whose /safety/motion_permitted counts'),
    Param('scanner_period', 0.1, "the scanner source's /scanner/state period, s (its publish_rate_hz)",
          0.005, 1.0),
    Param('scanner_timeout', 0.28, 'a scanner state is believed this long after a fresh message, s; '
          'scanner_timeout + 1/interlock_rate must not exceed 3 scanner periods (docs/safety.md)', 0.005, 3.0),
    Param('interlock_rate', 100.0, 'rate of the staleness check that asserts the inhibit, Hz', 100.0, 2000.0),
    Param('graph_check_period', 0.5, 'period of the check for foreign publishers on the safety topics, s',
          0.05, 5.0),
    Param('operator_session_file', '', 'operator session file (empty: the per-user default); a drive-fault '
          'reset needs its secret'),
]


def _guarded(interlock: bool = False):
    """Keep a callback's unexpected exception from killing the executor's spin: log it and,
    for an interlock callback, fall back to asserting the inhibit (fail-safe)."""
    def wrap(method):
        @functools.wraps(method)
        def wrapper(self, *args):
            try:
                return method(self, *args)
            except Exception as exc:  # noqa: BLE001 - logged; the node must keep running
                self.get_logger().error(f'{method.__name__} failed: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=1.0)
                if interlock:
                    self._fail_safe_inhibit(f'{method.__name__} failed')
        return wrapper
    return wrap


class _InterlockNode(common.LeanQosEvents, Node):
    """The hardware node's second node: the scanner subscription alone, in its own executor."""


class ConfigureError(Exception):
    """A configure step failed; the message is the operator-readable reason."""


class HardwareNode(common.LeanQosEvents, LifecycleNode):
    """Lifecycle node owning the hardware backend (see the module docstring)."""

    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS, read_only=True)
        import_backend(self.p['backend'])   # before anything spins (see import_backend)
        self.interlock_config = self._interlock_config()
        common.register_interlock_config(self.get_name(), self.interlock_config)
        self.model = load_robot_model()
        self.kinematics = NeedleGuideKinematics(self.model)
        self.joint_names = tuple(self.model.joint_names)
        self._insertion_index = self.model.joint_index('needle_insertion')

        # Hardware (set between configure and cleanup).
        self.shared: Optional[shared_hardware.SharedHardware] = None
        self.backend_name = ''
        self.firmware_version = ''
        self.last_failure = ''              # why the last transition failed (shown in diagnostics)
        self._active = False
        self._hw_timers = []
        self._own_read_time = -math.inf     # last_read_time of this node's own read
        self.own_reads = 0                  # reads issued by this node (not the control loop)
        self._link_error: Optional[str] = None
        self._link_error_time = -math.inf
        self._last_published: Optional[HardwareState] = None
        self._active_faults = {}            # code -> detail, as reported on /safety/faults
        self._fault_lock = threading.Lock()

        # Interlock inputs and output.
        self._interlock_lock = threading.RLock()
        self.interlock = Interlock(self.interlock_config)
        self.interlock.set_active(False)
        self._scanner_heartbeat = None      # counter of the last scanner message (any publisher)
        self._scanner_arrival: Optional[float] = None
        self.scanner_gap_max = (0.0, 0.0)   # (s) longest arrival gap and the stamp age of the message ending it
        self._permission: Optional[bool] = None
        self._unnamed_permission = None     # (publisher gid, permitted) received before the graph named it
        self._scanner_names = common.PublisherNames(self, topics.SCANNER_STATE)
        self._permission_names = common.PublisherNames(self, topics.SAFETY_MOTION_PERMITTED)
        self._inhibit_commanded: Optional[bool] = None   # None: unknown (command failed / not sent)
        self._inhibit_command_time = -math.inf
        self._last_resync = -math.inf
        self.interlock_reason = 'not configured'
        self.interlock_changes = collections.deque(maxlen=100)  # (monotonic, inhibit, reason, source)

        self._interlock_group = MutuallyExclusiveCallbackGroup()
        self._state_group = MutuallyExclusiveCallbackGroup()
        # Own group: sharing one with the (blocking) state reads starved it under rclpy's executor.
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()

        self.joint_state_pub = self.create_publisher(JointState, topics.JOINT_STATES, JOINT_STATE_QOS)
        self.robot_state_pub = self.create_publisher(RobotState, topics.ROBOT_STATE, qos.STATE_STREAM)
        self.diagnostics_pub = common.create_diagnostics_publisher(self)
        self.events_pub = common.create_event_publisher(self)
        self.faults = common.FaultReporter(self)
        # Beats come from our own activity-gated timer (in the state group, so a
        # wedged hardware read also stops the heartbeat); the helper's own timer is not used.
        self.heartbeat = common.HeartbeatPublisher(self, 1.0 / self.p['heartbeat_rate'],
                                                   callback_group=self._state_group)
        self.heartbeat.stop()

        # The scanner -> drive path runs on a thread of its own, with no executor at all (DirectSubscription):
        # in the shared executor (motion controller, state reads, diagnostics, graph checks) the scanner
        # callback started p50 2.7 ms / max 360 ms after the publication on a quiet machine (rclpy's Python
        # dispatch over every entity of the process), and an executor of its own still ran ~0.2 ms of Python
        # per message before the callback. See docs/safety.md.
        self.scanner_relay = scanner_relay.relay_for(self.get_name())
        self.scanner_relay.on_error = self._on_relay_error
        self._fast_node = _InterlockNode(f'{self.get_name()}_interlock', namespace=self.get_namespace(),
                                         context=self.context, start_parameter_services=False)
        self._scanner_subscription = DirectSubscription(
            self._fast_node, ScannerState, topics.SCANNER_STATE, qos.SCANNER_STATE, self._on_scanner,
            name='hardware-interlock-scanner', on_error=self._on_scanner_error)
        self._feed_thread: Optional[SteadyPeriodicThread] = None
        self._staleness_thread: Optional[SteadyPeriodicThread] = None
        self._last_feed: Optional[float] = None     # monotonic start of the last controller heartbeat
        self.feed_gap_max = 0.0                      # s, longest interval between two feeds (host stall)
        self.create_subscription(Bool, topics.SAFETY_MOTION_PERMITTED, self._on_permitted, qos.SAFETY_LATCHED,
                                 callback_group=self._interlock_group,
                                 event_callbacks=SubscriptionEventCallbacks(liveliness=self._on_supervisor_liveliness))
        # Drive-fault reset: the supervisor forwards the operator's acknowledge (with the operator's secret).
        self.create_service(AcknowledgeFaults, f'/{NODE_NAME}/reset_faults', self._on_reset_faults,
                            callback_group=self._interlock_group)
        self.create_timer(1.0 / self.p['diagnostics_rate'], self.publish_diagnostics,
                          callback_group=self._diagnostics_group)
        common.create_steady_timer(self, self.p['graph_check_period'], self._check_graph,
                                   callback_group=self._interlock_group)

    # ================================================================ lifecycle
    def lifecycle_state(self) -> str:
        """Current lifecycle state label ('unconfigured', 'inactive', 'active', 'finalized', ...)."""
        return self._state_machine.current_state[1]

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.p = {p.name: self.get_parameter(p.name).value for p in PARAMS}
        backend = None
        try:
            backend = self._make_backend()
            self._connect(backend)
            shared = shared_hardware.SharedHardware(backend)
            # Safe default before anything else: inhibit asserted (the gate releases it later).
            shared.set_motion_inhibit(True)
            first = shared.read()
            self._check_watchdog(backend)
            shared_hardware.register(self.get_name(), shared)
        except Exception as exc:  # noqa: BLE001 - whatever failed, close what was opened and say why
            reason = str(exc) if isinstance(exc, ConfigureError) else f'{type(exc).__name__}: {exc}'
            self.last_failure = f'configure failed: {reason}'
            self.get_logger().error(self.last_failure)
            if backend is not None:
                try:
                    backend.close()
                except Exception as close_exc:  # noqa: BLE001 - report, the failure above is the news
                    self.get_logger().warning(f'closing the backend after the failure: {close_exc}')
            return TransitionCallbackReturn.FAILURE
        with self._interlock_lock:
            # The interlock keeps what it heard before this configure: the permission is a latched topic
            # whose last value stays current (a fresh Interlock here lost one that arrived while the node
            # was configuring, and kept the inhibit asserted until the supervisor changed its mind). The
            # drive's inputs are the new connection's: cleared, re-read by the state timer.
            self.interlock.set_active(False)
            self.interlock.on_drive()
            self._inhibit_commanded, self._inhibit_command_time = True, time.monotonic()
            self.interlock_reason = 'hardware node not active'
            self.shared = shared
        with self._fault_lock:
            self._link_error, self._link_error_time = None, -math.inf
            stale = list(self._active_faults)
            self._active_faults = {}
        for code in stale:
            # Reported against the previous connection: the fresh one reports afresh what is still there.
            self.faults.clear(code, f'{code}: hardware reconfigured')
        self.firmware_version = first.firmware_version
        self._last_published = None
        self.last_failure = ''
        self._own_read_time = -math.inf
        steady = common.create_steady_timer
        # The threads below and a simulated controller's catch-up stepping each wait for the interpreter lock
        # many times a second, the scanner -> drive interlock thread first of all: this process must hand it
        # over quickly, whoever hosts the node.
        shorten_gil_switch_interval(INTERLOCK_GIL_SWITCH_INTERVAL_S)
        self._hw_timers = [
            steady(self, 1.0 / self.p['publish_rate'], self._publish_state, callback_group=self._state_group),
            steady(self, 1.0 / self.p['heartbeat_rate'], self._beat, callback_group=self._state_group),
        ]
        # The staleness check is a thread of its own on CLOCK_MONOTONIC, outside every executor: as a 100 Hz
        # timer in the shared executor its wake-ups were most of the Python dispatch the scanner callback waits
        # behind (the GIL; docs/safety.md), and in the interlock executor it sometimes did not run for a second.
        self._staleness_thread = SteadyPeriodicThread(1.0 / self.p['interlock_rate'], self._interlock_tick,
                                                      name='hardware-staleness-check')
        self._last_feed = None
        # The watchdog feed is a thread of its own too: in the shared executor it waited behind its dispatch
        # (WATCHDOG trips at load 1), and as a timer in the interlock executor a scanner message arriving during
        # a feed (a serial transaction, waiting behind the one on the line) waited for it (docs/safety.md).
        self._feed_thread = SteadyPeriodicThread(1.0 / self.p['hardware_heartbeat_rate'], self._feed_watchdog,
                                                 name='hardware-watchdog-feed')
        # A configure from outside the executor (bringup's autostart) must not leave the new timers (state
        # publication, heartbeat) out of a wait already under way: they would start up to one wait timeout late.
        executor = self.executor
        if executor is not None:
            executor.wake()
        self.get_logger().info(f"configured: backend '{self.backend_name}', firmware '{self.firmware_version}', "
                               f"registered as hardware '{self.get_name()}'; motion inhibit asserted")
        return TransitionCallbackReturn.SUCCESS

    def _make_backend(self):
        kind = str(self.p['backend']).strip().lower()
        cpm, cpr = self.p['encoder_counts_per_m'], self.p['encoder_counts_per_rad']
        if kind == 'serial':
            port = self.p['serial_port']
            counts = [cpm if t == 'prismatic' else cpr for t in self.model.joint_types]
            backend = create_backend('serial', port=port, baudrate=self.p['baudrate'],
                                     timeout=self.p['serial_timeout'], retries=self.p['serial_retries'],
                                     counts_per_unit=counts, lower=list(self.model.lower),
                                     upper=list(self.model.upper))
        elif kind == 'mujoco':
            seed = self.p['mujoco_seed']
            backend = create_backend(
                'mujoco', realtime=self.p['mujoco_realtime'], timestep=self.p['mujoco_timestep'],
                counts_per_unit={'prismatic': cpm, 'revolute': cpr},
                noise_std={'prismatic': self.p['mujoco_noise_std_m'], 'revolute': self.p['mujoco_noise_std_rad']},
                backlash={'prismatic': self.p['mujoco_backlash_m'], 'revolute': self.p['mujoco_backlash_rad']},
                seed=None if seed < 0 else seed, trigger_port_link=self.p['mujoco_trigger_port_link'] or None)
        else:
            try:
                create_backend(kind)            # the factory's own message lists the valid names
            except ValueError as exc:
                raise ConfigureError(f"parameter 'backend': {exc}") from None
            raise ConfigureError(f"parameter 'backend' = {kind!r} is not supported by the hardware node")
        if tuple(backend.joint_names) != self.joint_names:
            raise ConfigureError(f'backend joint order {tuple(backend.joint_names)} differs from the URDF '
                                 f'{self.joint_names}')
        self.backend_name = kind
        return backend

    def _connect(self, backend) -> None:
        where = f" on {self.p['serial_port']}" if self.backend_name == 'serial' else ''
        patience = self.p['serial_connect_timeout'] if self.backend_name == 'serial' else 0.0
        deadline = time.monotonic() + patience
        while True:
            try:
                backend.connect()
                return
            except HardwareError as exc:
                if time.monotonic() >= deadline:
                    waited = f' (retried for {patience:g} s)' if patience > 0 else ''
                    raise ConfigureError(f"cannot connect the '{self.backend_name}' backend{where}{waited}: "
                                         f'{exc}') from None
            time.sleep(0.2)   # retry interval while the port is not there yet, not a wait for an outcome

    def _check_watchdog(self, backend) -> None:
        watchdog_ms = getattr(backend, 'watchdog_ms', 0) or 0
        if watchdog_ms > 0 and 1.0 / self.p['hardware_heartbeat_rate'] > 0.5 * watchdog_ms / 1000.0:
            raise ConfigureError(
                f"hardware_heartbeat_rate {self.p['hardware_heartbeat_rate']:g} Hz is too slow for the controller "
                f'watchdog of {watchdog_ms} ms: it must beat at least twice per watchdog period '
                f'(>= {2000.0 / watchdog_ms:g} Hz)')

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        shared = self.shared
        try:
            with self._interlock_lock:
                # Inhibit first (safe default); the gate releases it once both inputs say so.
                shared.set_motion_inhibit(True)
                self._inhibit_commanded, self._inhibit_command_time = True, time.monotonic()
                hw = shared.read()
                if hw.estopped or hw.faults:
                    latched = ', '.join(hw.faults) or 'e-stop'
                    raise ConfigureError(f'the drive reports latched {latched}; clear the cause and reset the '
                                         f'faults (operator acknowledge) before activating')
                shared.enable()
                shared.heartbeat()              # the watchdog counts from here: the feed timer follows
                self._active = True
                self.interlock.set_active(True)
        except (ConfigureError, HardwareError) as exc:
            self.last_failure = f'activate failed: {exc}'
            self.get_logger().error(self.last_failure)
            return TransitionCallbackReturn.FAILURE
        self.last_failure = ''
        self._update_interlock('activate')
        self.get_logger().info(f'active: axes enabled, motion inhibit {self._inhibit_text()}')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._interlock_lock:
            self._active = False
            self.interlock.set_active(False)
            self._safe_stop(disable=True)
        self.get_logger().info('inactive: axes stopped and disabled, motion inhibit asserted')
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_hardware('cleaned up')
        self.get_logger().info('unconfigured: backend closed')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._interlock_lock:
            was_active, self._active = self._active, False
            self.interlock.set_active(False)
            if self.shared is not None:
                self._safe_stop(disable=was_active)
        had_hardware = self.shared is not None
        self._release_hardware('shut down')
        if had_hardware:
            self.get_logger().info('shut down: axes stopped, motion inhibit asserted, backend closed')
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f'error during a transition from {state.label}: emergency stop')
        with self._interlock_lock:
            self._active = False
            self.interlock.set_active(False)
            if self.shared is not None:
                try:
                    self.shared.emergency_stop()
                except HardwareError as exc:
                    self.get_logger().error(f'emergency stop not confirmed by the hardware: {exc}')
        self._release_hardware('released after an error')
        return TransitionCallbackReturn.SUCCESS

    def _safe_stop(self, disable: bool) -> None:
        """Stop, inhibit, (disable): each step tried even if an earlier one failed."""
        shared = self.shared
        if shared is None:
            return
        steps = [('stop', shared.stop), ('assert the motion inhibit', lambda: shared.set_motion_inhibit(True))]
        if disable:
            steps.append(('disable', shared.disable))
        for what, call in steps:
            try:
                call()
                if what == 'assert the motion inhibit':
                    self._inhibit_commanded, self._inhibit_command_time = True, time.monotonic()
            except HardwareError as exc:
                self.get_logger().error(f'could not {what}: {exc}')
        self.interlock_reason = 'hardware node not active'

    def _release_hardware(self, why: str) -> None:
        for timer in self._hw_timers:
            self.destroy_timer(timer)
        self._hw_timers = []
        if self._staleness_thread is not None:
            self._staleness_thread.stop()       # before the interlock lock below: a tick may be waiting for it
            self._staleness_thread = None
        if self._feed_thread is not None:
            self._feed_thread.stop()
            self._feed_thread = None
        with self._interlock_lock:
            shared, self.shared = self.shared, None
            self._active = False
            self.interlock.set_active(False)
            self._inhibit_commanded = None
            self.interlock_reason = 'not configured'
        if shared is None:
            return
        shared_hardware.unregister(self.get_name(), shared)
        try:
            shared.close()
        except HardwareError as exc:
            self.get_logger().error(f'closing the backend: {exc}')
        shared.retire(f"hardware node '{self.get_name()}' {why}")

    # ================================================================ interlock
    def _interlock_config(self) -> InterlockConfig:
        try:
            return InterlockConfig(scanner_source=self.p['scanner_source'], supervisor=self.p['supervisor_node'],
                                   scanner_period=self.p['scanner_period'],
                                   scanner_timeout=self.p['scanner_timeout'],
                                   check_period=1.0 / self.p['interlock_rate'])
        except InterlockConfigError as exc:
            raise ValueError(f'interlock parameters: {exc}') from None

    @_guarded(interlock=True)
    def _on_scanner(self, msg: ScannerState, info) -> None:
        """Decide and command in this callback: one hop from the scanner message to the inhibit frame."""
        now = time.monotonic()
        phase = common.phase_from_msg(msg.phase)
        publisher, name = self._scanner_names.lookup(info)
        stamp_age = common.stamp_age(self, msg.header.stamp, now)
        self._note_scanner_gap(now, stamp_age)
        with self._interlock_lock:
            self._scanner_heartbeat = msg.heartbeat
            findings = self.interlock.on_scanner(publisher, name, phase, msg.heartbeat, now, stamp_age=stamp_age)
        self._update_interlock('scanner')
        # The drive has been commanded; now the other interlocks of this process (the motion controller's).
        self.scanner_relay.publish(ScannerSample(publisher, name, phase, int(msg.heartbeat), now, stamp_age))
        self._report(findings)

    def _on_scanner_error(self, exc: BaseException) -> None:
        """Beyond what ``_guarded`` catches (it failed itself): reported, and the inhibit asserted."""
        self.get_logger().error(f'scanner subscription failed: {type(exc).__name__}: {exc}',
                                throttle_duration_sec=1.0)
        self._fail_safe_inhibit('the scanner subscription failed')

    def _on_relay_error(self, listener, exc: BaseException) -> None:
        self.get_logger().error(f'scanner relay listener {getattr(listener, "__qualname__", listener)} failed: '
                                f'{type(exc).__name__}: {exc}', throttle_duration_sec=1.0)

    def _note_scanner_gap(self, now: float, stamp_age: Optional[float]) -> None:
        """Track the longest gap between scanner messages and say who was late: a message ending a long gap
        with a fresh stamp was published late (the source's host stalled); an old stamp means the
        delivery or this node was late."""
        last, self._scanner_arrival = self._scanner_arrival, now
        if last is None:
            return
        gap = now - last
        if gap > self.scanner_gap_max[0]:
            self.scanner_gap_max = (gap, stamp_age if stamp_age is not None else math.nan)
            if gap > self.interlock_config.scanner_timeout:
                self.get_logger().warning(
                    f'scanner state gap {gap * 1e3:.0f} ms (limit {self.interlock_config.scanner_timeout * 1e3:.0f} '
                    f'ms); the message ending it was {stamp_age * 1e3 if stamp_age is not None else math.nan:.0f} '
                    f'ms old on arrival')

    @_guarded(interlock=True)
    def _on_permitted(self, msg: Bool, info) -> None:
        publisher, name = self._permission_names.lookup(info)
        with self._interlock_lock:
            findings = self.interlock.on_permission(publisher, name, bool(msg.data), time.monotonic())
            # A latched permission can arrive before the graph names its publisher; the supervisor does not
            # repeat it, so it is decided again once the graph check can name the publisher.
            self._unnamed_permission = None if name else (publisher, bool(msg.data))
            if not findings and name:
                self._permission = bool(msg.data)
        self._update_interlock('permission')
        self._report(findings)

    @_guarded(interlock=True)
    def _on_supervisor_liveliness(self, info) -> None:
        with self._interlock_lock:
            self.interlock.on_supervisor_liveliness(info.alive_count > 0)
        self._update_interlock('supervisor liveliness')

    def _staleness_late_max(self) -> float:
        thread = self._staleness_thread
        return thread.late_max if thread is not None else 0.0

    @_guarded(interlock=True)
    def _interlock_tick(self) -> None:
        self._update_interlock('staleness timer')

    @_guarded(interlock=True)
    def _check_graph(self) -> None:
        """Foreign publishers that are on the graph but silent are named too (and leave again)."""
        scanner = self._scanner_names.publishers()
        permission = self._permission_names.publishers()
        with self._interlock_lock:
            findings = self.interlock.on_graph(scanner, permission)
            pending = self._unnamed_permission
            if pending is not None and permission.get(pending[0]):
                self._unnamed_permission = None
                more = self.interlock.on_permission(pending[0], permission[pending[0]], pending[1], time.monotonic())
                findings = list(findings) + list(more)
                if not more:
                    self._permission = pending[1]
        if findings or pending is not None:
            self._update_interlock('graph')
        self._report(findings)

    def _report(self, findings) -> None:
        """Foreign publishers go to the supervisor as faults naming the node (it latches them)."""
        for finding in findings:
            if finding.active:
                self.get_logger().error(finding.detail)
            self.faults.report(finding.code, finding.detail, active=finding.active)
            self.events_pub.publish(common.make_event(
                self, 'foreign_publisher', finding.detail,
                ProcedureEvent.ERROR if finding.active else ProcedureEvent.INFO,
                values={'code': finding.code, 'node': finding.node, 'present': finding.active}, phase='CONTROL'))

    def _on_reset_faults(self, req, resp):
        """RESET_FAULTS to the drive for the operator's acknowledge (forwarded by the supervisor with the
        operator's secret). The drive refuses while a cause persists (e.g. the e-stop button still pressed);
        the faults it still reports after the reset are the ones whose cause has not gone."""
        ok, why = operator_session.check_token(common.operator_secret(self), req.operator_token)
        shared = self.shared
        if not ok:
            resp.success, resp.message = False, f'drive fault reset refused: {why}'
        elif shared is None:
            resp.success, resp.message = False, 'drive fault reset refused: hardware not configured'
        elif self._link_error is not None:
            resp.success, resp.message = False, f'drive fault reset refused: link failure ({self._link_error})'
        else:
            try:
                with self._interlock_lock:
                    before = shared.read()
                    if before.faults or before.estopped:
                        shared.reset_faults()
                    state = shared.read()
                    if self._active and not state.enabled and not (state.faults or state.estopped):
                        shared.enable()            # a watchdog trip or e-stop de-energised the axes
                        state = shared.read()
                self._sync_faults(state, shared.last_read_time)
                remaining = sorted(state.faults) + (['e-stop'] if state.estopped else [])
                resp.success = not remaining
                resp.message = ('drive faults reset' if not remaining else
                                f"drive still reports {', '.join(remaining)} (cause present)")
            except HardwareError as exc:
                resp.success, resp.message = False, f'drive fault reset failed: {exc}'
        level = ProcedureEvent.INFO if resp.success else ProcedureEvent.WARN
        self.events_pub.publish(common.make_event(self, 'drive_fault_reset', resp.message, level,
                                                  values={'operator_id': req.operator_id}, phase='CONTROL'))
        if resp.success:        # two call sites: rclpy refuses a change of severity at one
            self.get_logger().info(resp.message)
        else:
            self.get_logger().warning(resp.message)
        self._update_interlock('fault reset')
        return resp

    def _update_interlock(self, source: str) -> None:
        """Decide and, if needed, command the hardware inhibit (in the calling thread, at once)."""
        with self._interlock_lock:
            shared = self.shared
            if shared is None:
                return
            now = time.monotonic()
            inhibit, reason = self.interlock.decide(now)
            if reason == 'not active':
                reason = 'hardware node not active'
            self.interlock_reason = reason
            if self._inhibit_commanded is inhibit and not self._hardware_disagrees(shared, now):
                return
            try:
                shared.set_motion_inhibit(inhibit)
            except HardwareError as exc:
                self._inhibit_commanded = None      # unknown: retried on the next evaluation
                if not inhibit and getattr(exc, 'code', '') == 'TRIGGER_ACTIVE':
                    # The controller's scanner trigger (cable or trigger-port relay) has not fallen yet: the scan
                    # ended here first. Expected, retried at the next check; nothing is wrong.
                    self.get_logger().info('motion inhibit release waits for the scanner trigger to fall',
                                           throttle_duration_sec=5.0)
                    return
                self.get_logger().error(f"could not {'assert' if inhibit else 'release'} the motion inhibit "
                                        f'({reason}): {exc}', throttle_duration_sec=1.0)
                self._check_link(exc, shared)
                return
            changed = self._inhibit_commanded is not inhibit
            self._inhibit_commanded, self._inhibit_command_time = inhibit, time.monotonic()
            if changed:
                self.interlock_changes.append((now, inhibit, reason, source))
        if changed:
            text = f"motion inhibit {'ASSERTED' if inhibit else 'released'}: {reason} (from {source})"
            # Two call sites: rclpy refuses a change of severity at one logging call site.
            if inhibit:
                self.get_logger().warning(text)
            else:
                self.get_logger().info(text)
            self.events_pub.publish(common.make_event(
                self, 'interlock', text, ProcedureEvent.WARN if inhibit else ProcedureEvent.INFO,
                values={'inhibit': inhibit, 'reason': reason, 'source': source}, phase='CONTROL'))

    def _fail_safe_inhibit(self, why: str) -> None:
        shared = self.shared
        if shared is None:
            return
        try:
            shared.set_motion_inhibit(True)
        except HardwareError as exc:
            self.get_logger().error(f'fail-safe inhibit after {why} not confirmed: {exc}',
                                    throttle_duration_sec=1.0)
            self._inhibit_commanded = None
            return
        self._inhibit_commanded, self._inhibit_command_time = True, time.monotonic()

    def _hardware_disagrees(self, shared, now: float) -> bool:
        """The drive reports another inhibit level than we commanded (read after the command), e.g.
        after a controller power cycle. Resynchronised at most every 0.1 s."""
        state, read_time = shared.last_state, shared.last_read_time
        if state is None or read_time is None or read_time <= self._inhibit_command_time:
            return False
        if self._inhibit_commanded is None or state.motion_inhibited == self._inhibit_commanded:
            return False
        if now - self._last_resync < 0.1:
            return False
        self._last_resync = now
        return True

    def _inhibit_text(self) -> str:
        if self._inhibit_commanded is None:
            return 'UNKNOWN'
        return 'asserted' if self._inhibit_commanded else 'released'

    # ================================================================ periodic work
    @_guarded()
    def _feed_watchdog(self) -> None:
        shared = self.shared
        if shared is None:
            return
        now = time.monotonic()
        if self._last_feed is not None:
            gap = now - self._last_feed
            if gap > self.feed_gap_max:
                self.feed_gap_max = gap
                watchdog_ms = getattr(shared.backend, 'watchdog_ms', 0) or 0
                if watchdog_ms and gap > 0.75 * watchdog_ms / 1000.0:     # a new maximum only: rare
                    self.get_logger().warning(f'controller watchdog feed gap {gap * 1e3:.1f} ms (watchdog '
                                              f'{watchdog_ms} ms): the host stalled')
        self._last_feed = now
        try:
            shared.heartbeat()
        except HardwareError as exc:
            if shared is self.shared:
                self.get_logger().error(f'controller heartbeat failed: {exc}', throttle_duration_sec=1.0)
            self._check_link(exc, shared)

    @_guarded()
    def _beat(self) -> None:
        if self._active:
            self.heartbeat.beat()

    def _current_state(self, shared) -> Tuple[Optional[HardwareState], float]:
        """(state, read time): the control loop's cached reading if fresh, else our own read."""
        period = 1.0 / self.p['publish_rate']
        read_time = shared.last_read_time
        state = shared.last_state
        if (state is not None and read_time is not None and read_time > self._own_read_time
                and time.monotonic() - read_time <= 2.0 * period):
            return state, read_time
        state = shared.read()
        self.own_reads += 1
        self._own_read_time = read_time = shared.last_read_time
        return state, read_time

    @_guarded()
    def _publish_state(self) -> None:
        shared = self.shared
        if shared is None:
            return
        try:
            state, read_time = self._current_state(shared)
        except HardwareError as exc:
            if shared is not self.shared:
                return                               # released (cleanup) while this callback ran
            if isinstance(exc, HardwareFault):       # refused, not unanswered: keep the last state
                self.get_logger().error(f'hardware read refused: {exc}', throttle_duration_sec=1.0)
            else:
                self._check_link(exc, shared)
            self._publish_robot_state(self._last_published, shared.last_read_time)
            return
        self._last_published = state
        self._sync_faults(state, read_time)
        stamp = common.stamp_from_monotonic(self, read_time)
        js = JointState(name=list(self.joint_names), position=[float(v) for v in state.positions],
                        velocity=[float(v) for v in state.velocities])
        js.header.stamp = stamp
        self.joint_state_pub.publish(js)
        self._publish_robot_state(state, read_time)

    def _publish_robot_state(self, state: Optional[HardwareState], read_time: Optional[float]) -> None:
        if state is None:
            return
        msg = RobotState(joint_names=list(self.joint_names), position=[float(v) for v in state.positions],
                         velocity=[float(v) for v in state.velocities], enabled=bool(state.enabled),
                         motion_inhibited=bool(state.motion_inhibited), estopped=bool(state.estopped),
                         moving=bool(state.moving), backend=self.backend_name, faults=sorted(self.active_faults()))
        msg.header.frame_id = frames.BASE_FRAME
        msg.header.stamp = common.stamp_from_monotonic(self, read_time if read_time is not None else time.monotonic())
        if self._link_error is not None:
            # Last known values, flagged: nothing about this state is current.
            msg.enabled = msg.moving = False
        if state.stream is not None:    # the controller's trajectory buffer (motion_controller streams into it)
            msg.buffer_lookahead = float(state.stream.lookahead)
            msg.buffer_underruns = int(state.stream.underruns) & 0xFFFFFFFF
        try:
            tip = self.kinematics.forward(state.positions)
        except ValueError as exc:
            self.get_logger().error(f'no needle tip pose: {exc}', throttle_duration_sec=1.0)
        else:
            msg.needle_tip = _pose(tip)
            msg.insertion_depth = float(state.positions[self._insertion_index])
        self.robot_state_pub.publish(msg)

    def _check_link(self, exc: HardwareError, shared) -> None:
        """A call failed: unanswered (timeout, port lost) is a link failure; a refusal (NAK) is not,
        nor is a call on a handle released meanwhile (cleanup while a callback was running)."""
        if shared is self.shared and not isinstance(exc, HardwareFault):
            self._on_link_error(str(exc))

    def _on_link_error(self, text: str) -> None:
        """Raise HARDWARE_LINK once; it clears (cause gone) at the next successful read."""
        with self._fault_lock:
            first = self._link_error is None
            self._link_error, self._link_error_time = text, time.monotonic()
            if first:
                self.get_logger().error(f'hardware link failure: {text}')
                self._set_fault(LINK_FAULT, f'{self.backend_name} hardware not answering: {text}')
        if first:
            self.publish_diagnostics()

    def _sync_faults(self, state: HardwareState, read_time: float) -> None:
        """After a successful read: report newly latched drive faults (cause active), clear the
        ones that went away, and clear a link failure (the hardware answers again)."""
        with self._interlock_lock:         # never inside _fault_lock (lock order: interlock, then faults)
            self.interlock.on_drive(faults=state.faults, estopped=state.estopped)
        with self._fault_lock:
            new = self._sync_faults_locked(state, read_time)
        if new:
            self.publish_diagnostics()

    def _sync_faults_locked(self, state: HardwareState, read_time: float) -> bool:
        if self._link_error is not None:
            if read_time <= self._link_error_time:
                return False                       # a reading from before the failure proves nothing
            self.get_logger().info('hardware answering again')
            self._link_error = None
        current = {code: f'motor controller reports {code}' for code in state.faults}
        if state.estopped:
            current[ESTOP_FAULT] = 'e-stop latched in the motor controller'
        new = False
        for code, detail in current.items():
            if code not in self._active_faults:
                self._set_fault(code, detail)
                new = True
        for code in [c for c in self._active_faults if c not in current and c != LINK_FAULT]:
            del self._active_faults[code]
            self.faults.clear(code, f'{code} no longer reported by the motor controller')
        if LINK_FAULT in self._active_faults and self._link_error is None:
            del self._active_faults[LINK_FAULT]
            self.faults.clear(LINK_FAULT, 'hardware answering again')
        return new

    def active_faults(self) -> dict:
        """Fault code -> detail of the faults currently reported as active (a copy)."""
        with self._fault_lock:
            return dict(self._active_faults)

    def _set_fault(self, code: str, detail: str) -> None:
        self._active_faults[code] = detail
        self.get_logger().error(f'hardware fault {code}: {detail}')
        self.faults.report(code, detail, active=True)

    # ================================================================ diagnostics
    @_guarded()
    def publish_diagnostics(self) -> None:
        shared = self.shared
        values = {'lifecycle_state': self.lifecycle_state(), 'backend': self.backend_name or str(self.p['backend'])}
        if shared is None:
            level = DiagnosticStatus.ERROR if self.last_failure else DiagnosticStatus.WARN
            message = self.last_failure or 'not configured'
        else:
            state = self._last_published or shared.last_state
            read_time = shared.last_read_time
            faults = self.active_faults()
            values.update(firmware_version=self.firmware_version,
                          read_age_s=f'{time.monotonic() - read_time:.4f}' if read_time is not None else 'inf',
                          own_reads=self.own_reads, motion_inhibit=self._inhibit_text(),
                          watchdog_feed_gap_max_s=f'{self.feed_gap_max:.4f}',
                          scanner_gap_max_s=f'{self.scanner_gap_max[0]:.4f}',
                          scanner_gap_max_stamp_age_s=f'{self.scanner_gap_max[1]:.4f}',
                          staleness_check_late_max_s=f'{self._staleness_late_max():.4f}',
                          interlock_reason=self.interlock_reason, faults=','.join(sorted(faults)),
                          **{f'shared_{k}': v for k, v in shared.stats.items()})
            if state is not None:
                values.update({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in state.counters.items()})
                values.update(enabled=state.enabled, estopped=state.estopped, moving=state.moving)
            if self._link_error is not None:
                level, message = DiagnosticStatus.ERROR, f'link failure: {self._link_error}'
            elif faults:
                level = DiagnosticStatus.ERROR
                message = 'faults: ' + '; '.join(f'{c} ({d})' for c, d in sorted(faults.items()))
            elif not self._active:
                level, message = DiagnosticStatus.WARN, f'{self.lifecycle_state()}: axes not enabled'
            else:
                level = DiagnosticStatus.OK
                message = f'active, motion inhibit {self._inhibit_text()}: {self.interlock_reason}'
        status = common.diagnostic_status(self, 'hardware', level, message, values)
        self.diagnostics_pub.publish(common.diagnostic_array(self, [status]))

    # ================================================================ bringup API
    def autostart_lifecycle(self) -> bool:
        """Configure and activate when parameter ``autostart`` is true. Returns True if active afterwards."""
        if not self.p['autostart']:
            return False
        if self.lifecycle_state() == 'unconfigured' and self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        if self.lifecycle_state() == 'inactive':
            self.trigger_activate()
        return self.lifecycle_state() == 'active'

    def describe_state(self) -> str:
        """One line for the operator / bringup summary."""
        state = self.lifecycle_state()
        if self.shared is None:
            return f'{state}' + (f' ({self.last_failure})' if self.last_failure else '')
        hw = self._last_published or self.shared.last_state
        flags = []
        if hw is not None:
            flags.append('enabled' if hw.enabled else 'disabled')
        flags.append(f'inhibit {self._inhibit_text()} ({self.interlock_reason})')
        if self._link_error:
            flags.append(f'LINK FAILURE: {self._link_error}')
        flags.append('faults: ' + (', '.join(sorted(self.active_faults())) or 'none'))
        return (f"{state}; backend {self.backend_name} (firmware {self.firmware_version or '?'}); "
                + '; '.join(flags) + f'; {self.shared.stats["reads"]} reads')

    def on_bringup_shutdown(self) -> None:
        """Stop and close the hardware (bringup calls this before destroying the nodes)."""
        if self.lifecycle_state() in ('unconfigured', 'inactive', 'active'):
            self.trigger_shutdown()

    def helper_nodes(self) -> list:
        """The rclpy nodes this node creates besides itself (its endpoints belong to this node's SROS2 profile:
        tools/sros2_policy.py)."""
        return [self._fast_node]

    def destroy_node(self):
        if self.shared is not None:
            self.on_bringup_shutdown()
        self._scanner_subscription.stop()
        self._fast_node.destroy_node()
        return super().destroy_node()


def _pose(transform: np.ndarray) -> Pose:
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in transform[:3, 3])
    q = frames.quaternion_xyzw(transform[:3, :3])
    pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in q)
    return pose


def main(args=None) -> int:
    """Console script ``hardware_node``: spin until SIGINT/SIGTERM, then stop and close the hardware."""
    def make():
        node = HardwareNode()
        autostart_when_spinning(node)
        return node
    return common.run_node(make, args=args, threads=4)


def autostart_when_spinning(node: 'HardwareNode') -> None:
    """Configure and activate once the executor spins: enabling the axes before anything can feed the
    controller's watchdog (the heartbeat timer) would let the watchdog trip at start-up."""
    def once():
        timer.cancel()
        node.autostart_lifecycle()
    timer = node.create_timer(0.01, once)


if __name__ == '__main__':
    sys.exit(main())
