"""Liveness of the control process as the workflow side sees it (pure; no rclpy, no clock).

The procedure node feeds every /heartbeat (frame_id = node name) and ticks with its monotonic time.
The control process counts as lost when every watched node that has been seen is silent for longer
than ``timeout`` (the supervisor's heartbeat timeout) at two consecutive ticks with no heartbeat
arriving in between (the supervisor's rule, ``safety/supervisor.py``: after a stall of this process
its executor runs the due tick before the heartbeats that queued meanwhile; the first tick would
judge messages that are already there). Detection bound: timeout + two tick periods. A dead
process silences all of them at once, while one silent node in a live process is the supervisor's
HEARTBEAT_LOST fault (shown in its status), not a lost process. The workflow then ends waiting goals
and refuses steps with the reason, and reports the loss once (and the return once).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional, Tuple

CONTROL_NODES = ('hardware_node', 'scanner_interface', 'safety_supervisor', 'motion_controller')


@dataclasses.dataclass(frozen=True)
class LivenessChange:
    lost: bool          # True: lost now; False: back
    reason: str


class HeartbeatWatch:
    def __init__(self, names: Iterable[str] = CONTROL_NODES, timeout: float = 1.0):
        if not timeout > 0.0:
            raise ValueError(f'heartbeat timeout must be > 0 s, got {timeout!r}')
        self.timeout = float(timeout)
        self._last: Dict[str, Optional[float]] = {str(n): None for n in names}
        self.lost_reason: Optional[str] = None
        self._suspected = False              # the last tick saw every seen node silent
        self._beats_since_tick = 0

    def beat(self, name: str, now: float) -> None:
        if name in self._last:
            self._last[name] = now
            self._beats_since_tick += 1

    def silent(self, now: float) -> Tuple[Tuple[str, float], ...]:
        return tuple((n, now - t) for n, t in self._last.items() if t is not None and now - t > self.timeout)

    def tick(self, now: float) -> Optional[LivenessChange]:
        """The change since the last tick (lost / back), or None."""
        seen = sum(1 for t in self._last.values() if t is not None)
        silent = self.silent(now)
        if len(silent) < seen or not seen:
            silent = ()
        confirmed = bool(silent) and self._suspected and self._beats_since_tick == 0
        self._suspected, self._beats_since_tick = bool(silent), 0
        if confirmed and self.lost_reason is None:
            names = ', '.join(f'{n} ({s:.1f} s)' for n, s in silent)
            self.lost_reason = f'control process lost: no heartbeat from {names} (timeout {self.timeout:g} s)'
            return LivenessChange(True, self.lost_reason)
        if not silent and self.lost_reason is not None:
            self.lost_reason = None
            return LivenessChange(False, 'control process heartbeats are back')
        return None
