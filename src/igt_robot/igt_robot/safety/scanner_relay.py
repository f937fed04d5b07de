"""The scanner states one process has received, handed to every interlock of that process.

The hardware node and the motion controller it hosts each decide motion permission with their own
:class:`~igt_robot.safety.interlock.Interlock`. Both used to subscribe to ``/scanner/state``; in one
process that is two deliveries of every message, and the motion controller's woke the shared
executor (a walk over every entity of the process, in Python) at the very moment the hardware
node's interlock thread needed the interpreter lock to command the drive. Measured in
``bench/interlock.py``: publication -> scanner callback p90 1.4 ms with both subscriptions, 0.6 ms
with one (docs/safety.md). So the hardware node receives, commands the drive first, then relays
the same sample here; the motion controller's interlock still decides on its own.

Relaying is in-process and synchronous (the receiving thread calls every listener). A listener that
raises is reported through ``on_error`` and does not keep the others, or the caller, from going on.

Process-wide registry by hardware node name, created on first use from either side, so neither
node has to exist first. No rclpy here: this is core code.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Dict, Hashable, List, Optional

from igt_robot.safety.interlock import ScannerPhase


@dataclasses.dataclass(frozen=True)
class ScannerSample:
    """One scanner-state message as received (the arguments of ``Interlock.on_scanner``)."""

    publisher: Hashable          # the publisher's identity on the graph (GID)
    node: str                    # the node owning it ('' while the graph does not name it yet)
    phase: ScannerPhase
    heartbeat: int
    received: float              # time.monotonic() at reception
    stamp_age: Optional[float]   # received minus the message's stamp, when comparable (None: not checked)


Listener = Callable[[ScannerSample], None]


class ScannerRelay:
    """Fan-out of received scanner samples to in-process listeners."""

    def __init__(self, on_error: Optional[Callable[[Listener, BaseException], None]] = None):
        self._listeners: List[Listener] = []
        self._lock = threading.Lock()
        self.on_error = on_error

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener not in self._listeners:
                self._listeners = self._listeners + [listener]

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = [known for known in self._listeners if known != listener]

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def publish(self, sample: ScannerSample) -> None:
        for listener in self._listeners:          # a snapshot: (un)subscribing replaces the list
            try:
                listener(sample)
            except Exception as exc:  # noqa: BLE001 - one listener must not silence the others
                if self.on_error is not None:
                    self.on_error(listener, exc)


_relays: Dict[str, ScannerRelay] = {}
_relays_lock = threading.Lock()


def relay_for(hardware_node: str) -> ScannerRelay:
    """The relay of the hardware node named ``hardware_node`` in this process (created on first use)."""
    if not hardware_node:
        raise ValueError('scanner relay name must be a non-empty string')
    with _relays_lock:
        relay = _relays.get(hardware_node)
        if relay is None:
            relay = _relays[hardware_node] = ScannerRelay()
        return relay
