"""Spinning an executor in a thread, and shutting it down without callbacks failing on destroyed handles.

rclpy's ``Executor.shutdown()`` destroys the executor's guard condition without waiting for the
callbacks still running in a ``MultiThreadedExecutor``'s thread pool (its wait is skipped once the
shutdown flag is set). Each callback in flight then fails when it signals that guard condition
(``InvalidHandle: cannot use Destroyable because destruction was requested``); the failure stays
in its task, and garbage collection prints "The following exception was never retrieved: ..." at
every shutdown. The order here avoids it:

1. stop spinning (no new callbacks are dispatched) and join the spinning thread;
2. let the thread pool finish the callbacks in flight (bounded by ``timeout_sec``);
3. shut the executor down (its guard condition goes);
4. only then may the caller destroy the nodes.
"""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from typing import Optional

from rclpy.executors import ExternalShutdownException


def shutdown_executor(executor, timeout_sec: float = 3.0) -> None:
    """Steps 2-3 for an executor nobody spins any more: drain its thread pool, then shut it down."""
    pool = getattr(executor, '_executor', None)   # MultiThreadedExecutor's ThreadPoolExecutor
    if pool is not None:
        pool.shutdown(wait=False)
        deadline = time.monotonic() + timeout_sec
        for thread in list(getattr(pool, '_threads', ())):
            thread.join(max(0.0, deadline - time.monotonic()))
    executor.shutdown(timeout_sec=timeout_sec)


def destroy_node_and_actions(node) -> None:
    """Step 4: destroy ``node`` with its action servers and clients.

    rclpy's ``Node.destroy_node`` leaves the node's waitables alone, and an action server or client keeps the
    node's handle, and with it the context's DDS participant, alive until garbage collection gets to it. That
    participant still announces the action: a stack brought up again in the same process then saw two servers,
    and when the old one went away part by part, ``wait_for_server`` said "not available" for 20 s (full test
    runs, test_motion_controller_node). So they go first, explicitly; each failure is contained.
    """
    for waitable in list(getattr(node, 'waitables', ())):
        destroy = getattr(waitable, 'destroy', None)
        if callable(destroy):
            with contextlib.suppress(Exception):
                destroy()
    with contextlib.suppress(Exception):
        node.destroy_node()


GIL_SWITCH_INTERVAL_S = 0.0005    # CPython's default is 5 ms
# The process that hosts the scanner -> drive interlock thread: its wake-up waits for the lock at every step
# (wait, take, callback, serial write) while the stream loop and the executor threads hold it. Quiet machine,
# bench/interlock.py, 1000 scanner events per run: at 0.5 ms p99 3.9 ms / max 12.7 ms, at 0.1 ms p99 2.3 ms /
# max 4.8 ms (docs/safety.md has the runs and the cost).
INTERLOCK_GIL_SWITCH_INTERVAL_S = 0.0001


def shorten_gil_switch_interval(interval_s: float = GIL_SWITCH_INTERVAL_S) -> None:
    """Make a thread holding the interpreter lock hand it over within ``interval_s`` (0.5 ms, not CPython's
    5 ms) when another asks.

    Process-wide, and only ever shortened (a process that chose a shorter one keeps it). Every node whose
    threads have deadlines calls it when it starts them, so it holds however the node is hosted (its own
    console script, bringup, a test graph). Why it matters here, measured:

    * MuJoCo's bindings release the lock inside every ``mj_step``, and the simulated controller is caught
      up one physics step (1 ms) at a time, so each step asks for the lock back. With one busy Python
      thread in the process, 100 steps took 339 ms at 5 ms and 0.4 ms at 0.5 ms; in a test process
      (default interval, the test graph's executor busy) single steps waited up to 0.5 s while the
      backend lock was held, and the hardware node's other threads waited behind it.
    * The streaming cycle's period error p99 was 86 ms at 5 ms and 8 ms at 1 ms (safety stack in one
      process, shared 2-core machine); scanner state publication gaps under the stress load were worst
      171 ms at 5 ms and 130 ms at 0.5 ms.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), interval_s))


def settle_for_spinning() -> None:
    """Process-wide settings for a process whose threads have deadlines; called by an entry point after
    its nodes are built and before it spins.

    * Collect once, then freeze everything allocated so far out of later collections: a full collection
      walks every live object, and a control process holds hundreds of thousands from its imports
      (rclpy, numpy, MuJoCo); full collections of 100-224 ms were measured under the stress load, each
      stopping every thread of the process. Frozen objects are still freed by reference counting.
    * The short interpreter-lock switch interval (:func:`shorten_gil_switch_interval`).
    """
    gc.collect()
    gc.freeze()
    shorten_gil_switch_interval()


class BackgroundSpinner:
    """Spins ``executor`` in a daemon thread until :meth:`stop`, which shuts it down in order."""

    def __init__(self, executor, name: str = 'executor', poll_sec: float = 0.1):
        self.executor = executor
        self._poll = poll_sec
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.executor.context.ok():
                self.executor.spin_once(timeout_sec=self._poll)
        except (ExternalShutdownException, KeyboardInterrupt):
            pass
        except Exception as exc:  # noqa: BLE001 - a callback's exception ends the spinning, as executor.spin() does
            self.error = exc

    def stop(self, timeout_sec: float = 3.0) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.executor.wake()
        self._thread.join(timeout_sec)
        shutdown_executor(self.executor, timeout_sec)


class SteadyPeriodicThread:
    """Calls ``callback()`` every ``period`` s of CLOCK_MONOTONIC in a thread of its own, outside any executor.

    For a publication the safety chain times (the scanner state heartbeat): an rclpy timer fires only
    when its executor gets round to it, and a loaded process's executor does so late (its other timers,
    subscriptions and Python dispatch come first). Deadlines advance by whole periods (no drift); after a
    stall longer than a period the next call is made at once and the schedule restarts from there (no
    burst of catch-up calls). An exception from ``callback`` goes to ``on_error`` and the thread goes on.
    """

    def __init__(self, period: float, callback, name: str, on_error=None):
        if not (period > 0.0):
            raise ValueError(f'period must be > 0 s, got {period!r}')
        self.period = float(period)
        self._callback = callback
        self._on_error = on_error or (lambda exc: None)
        self._stop = threading.Event()
        self.late_max = 0.0             # s, worst lateness of a call against its deadline
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.period
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            late = time.monotonic() - deadline
            self.late_max = max(self.late_max, late)
            try:
                self._callback()
            except Exception as exc:  # noqa: BLE001 - reported; the heartbeat must go on
                self._on_error(exc)
            deadline += self.period
            if late > self.period:
                deadline = time.monotonic() + self.period

    def stop(self, timeout_sec: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_sec)


class DirectSubscription:
    """One subscription served by a thread of its own, without an executor: wait, take, call.

    For the one message whose latency the safety chain counts (the scanner state that asserts the drive's
    inhibit). An rclpy executor runs ~0.2 ms of Python between the message's arrival and its callback
    (rebuilding its wait set, callback groups, a task per message); in a process whose other threads also
    run Python, each of those steps can wait for the interpreter lock. Here the thread waits in C with
    the lock released, takes the message and calls ``callback(msg, info)`` (``info`` as rclpy passes it:
    timestamps and the publisher's gid). ``node`` must not be spun by any executor, or both would take
    messages. A callback's exception goes to ``on_error`` and the next message is served.
    """

    def __init__(self, node, msg_type, topic: str, qos, callback, name: str, on_error=None,
                 poll_sec: float = 0.1):
        from rclpy.guard_condition import GuardCondition
        self.node = node
        self._callback = callback
        self._on_error = on_error or (lambda exc: None)
        self._poll_ns = int(poll_sec * 1e9)
        self._stop = threading.Event()
        self.subscription = node.create_subscription(msg_type, topic, _never_called, qos)
        self._wake = GuardCondition(None, None, context=node.context)
        node.context.on_shutdown(self.wake)
        self.messages = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with contextlib.suppress(Exception):     # already destroyed: nothing waits on it
            self._wake.trigger()

    def _run(self) -> None:
        from rclpy.exceptions import InvalidHandle
        from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
        sub = self.subscription
        try:
            wait_set = _rclpy.WaitSet(1, 1, 0, 0, 0, 0, self.node.context.handle)
            while not self._stop.is_set() and self.node.context.ok():
                with sub.handle, self._wake.handle:      # neither is destroyed while waited on
                    wait_set.clear_entities()
                    wait_set.add_subscription(sub.handle)
                    wait_set.add_guard_condition(self._wake.handle)
                    wait_set.wait(self._poll_ns)         # the interpreter lock is released while waiting
                    if sub.handle.pointer not in wait_set.get_ready_entities('subscription'):
                        continue
                    taken = sub.handle.take_message(sub.msg_type, sub.raw)
                if taken is None:
                    continue
                self.messages += 1
                try:
                    self._callback(*taken)
                except Exception as exc:  # noqa: BLE001 - reported; the next message is served
                    self._on_error(exc)
        except (InvalidHandle, RuntimeError):
            pass                # the node or the context went away under us: nothing more to serve

    def stop(self, timeout_sec: float = 2.0) -> None:
        """Stop serving and join the thread; the subscription goes with its node."""
        self._stop.set()
        self.wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_sec)
        with contextlib.suppress(Exception):
            self._wake.destroy()


def _never_called(*_args) -> None:
    """The callback rclpy requires of a subscription that :class:`DirectSubscription` serves itself."""
