"""One hardware backend shared by several threads of one process, and a registry to find it.

The hardware node owns the backend (creates, connects, closes it); the motion
controller, hosted in the same process like ros2_control's controller manager,
streams trajectories to the same backend. Backends are not required to be
thread-safe, and a serial link can only carry one transaction at a time, so
:class:`SharedHardware` puts every call under one lock.

The lock is *fair* (first come, first served) with one priority lane: a safety
command (``set_motion_inhibit(True)``, ``stop()``, ``emergency_stop()``) and the
controller watchdog feed (``heartbeat()``) go ahead of every ordinary request
queued, so they wait behind at most the one transaction already on the line
(and an earlier safety command), never behind a queue of streaming reads and
pushes or state reads.

No rclpy here: this is core code.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence

from igt_robot.hardware.interface import (HardwareError, HardwareInterface, HardwareState, PvtPoint,
                                          StreamStatus)


class FairLock:
    """A re-entrant lock granted in request order (FIFO), with a priority lane.

    A priority request is granted before every ordinary request that is waiting
    (priority requests among themselves in order): it waits for at most the
    current holder. Re-entrant so that a caller can hold
    :meth:`SharedHardware.exclusive` and still call the delegating methods inside it.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque = collections.deque()
        self._urgent: collections.deque = collections.deque()
        self._owner: Optional[int] = None
        self._depth = 0

    def acquire(self, priority: bool = False) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = object()
            queue = self._urgent if priority else self._queue
            queue.append(ticket)
            try:
                while self._owner is not None or not self._is_next(ticket, priority):
                    self._cond.wait()
            except BaseException:
                queue.remove(ticket)
                self._cond.notify_all()
                raise
            queue.popleft()
            self._owner, self._depth = me, 1

    def _is_next(self, ticket, priority: bool) -> bool:
        if priority:
            return self._urgent[0] is ticket
        return not self._urgent and self._queue[0] is ticket

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError('FairLock released by a thread that does not hold it')
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """Hold the lock, granted through the priority lane."""
        self.acquire(priority=True)
        try:
            yield
        finally:
            self.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class SharedHardware(HardwareInterface):
    """:class:`HardwareInterface` over ``backend`` with every call serialised by one fair lock.

    Besides delegating, it remembers the last successful :meth:`read`:
    ``last_state`` (the :class:`HardwareState`) and ``last_read_time`` (host
    ``time.monotonic()`` seconds when that read returned). A reader that does
    not need a fresh transaction (the hardware node publishing joint states
    while the streaming loop reads at 50 Hz) uses the cache instead of adding
    load to the link.

    After :meth:`retire` (the owner released the hardware) every call raises
    :class:`HardwareError` naming why, so a holder of a stale handle fails
    loudly instead of driving a closed backend.
    """

    def __init__(self, backend: HardwareInterface):
        if not isinstance(backend, HardwareInterface):
            raise TypeError(f'SharedHardware needs a HardwareInterface backend, got {type(backend).__name__}')
        self.backend = backend
        self.joint_names = tuple(backend.joint_names)
        self._lock = FairLock()
        self._state_lock = threading.Lock()      # guards the cache only (never held during I/O)
        self._last_state: Optional[HardwareState] = None
        self._last_read_time: Optional[float] = None
        self._last_error: Optional[str] = None
        self._last_error_time: Optional[float] = None
        self._reads = 0
        self._errors = 0
        self._retired: Optional[str] = None

    # ------------------------------------------------------------------ cache
    @property
    def last_state(self) -> Optional[HardwareState]:
        """The state returned by the last successful read() (None before the first)."""
        with self._state_lock:
            return self._last_state

    @property
    def last_read_time(self) -> Optional[float]:
        """``time.monotonic()`` (s) when the last successful read() returned (None before the first)."""
        with self._state_lock:
            return self._last_read_time

    def cached_state(self, max_age: float, now: Optional[float] = None) -> Optional[HardwareState]:
        """The cached state if it is at most ``max_age`` seconds old, else None."""
        now = time.monotonic() if now is None else now
        with self._state_lock:
            if self._last_state is None or now - self._last_read_time > max_age:
                return None
            return self._last_state

    @property
    def last_error(self) -> Optional[str]:
        """Text of the last exception any delegated call raised (None if none yet)."""
        with self._state_lock:
            return self._last_error

    @property
    def last_error_time(self) -> Optional[float]:
        with self._state_lock:
            return self._last_error_time

    @property
    def stats(self) -> dict:
        """``reads`` (successful) and ``errors`` (calls that raised) since construction."""
        with self._state_lock:
            return {'reads': self._reads, 'errors': self._errors}

    @property
    def retired(self) -> Optional[str]:
        """Why this handle was retired, or None while it is live."""
        return self._retired

    def retire(self, reason: str) -> None:
        """Refuse every later call with ``reason`` (the owner has released the hardware)."""
        with self._lock:
            self._retired = str(reason) or 'retired'

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[HardwareInterface]:
        """Hold the lock across several calls (e.g. read-check-write that must not interleave).

        Yields ``self``; keep the block short, every other user waits for it.
        """
        with self._lock:
            yield self

    # ------------------------------------------------------------------ delegation
    def _call(self, name: str, *args, **kwargs):
        with self._lock:
            return self._invoke_locked(name, *args, **kwargs)

    def _call_urgent(self, name: str, *args, **kwargs):
        """Through the lock's priority lane: behind the transaction on the line only."""
        with self._lock.urgent():
            return self._invoke_locked(name, *args, **kwargs)

    def _invoke_locked(self, name: str, *args, **kwargs):
        if self._retired is not None:
            raise HardwareError(f'cannot {name}(): this hardware handle was retired ({self._retired})')
        try:
            return getattr(self.backend, name)(*args, **kwargs)
        except Exception as exc:
            with self._state_lock:
                self._errors += 1
                self._last_error = f'{name}(): {type(exc).__name__}: {exc}'
                self._last_error_time = time.monotonic()
            raise

    def connect(self) -> None:
        self._call('connect')

    def close(self) -> None:
        self._call('close')

    def enable(self) -> None:
        self._call('enable')

    def disable(self) -> None:
        self._call('disable')

    def read(self) -> HardwareState:
        """Read the backend and cache the result (``last_state``, ``last_read_time``)."""
        with self._lock:
            state = self._invoke_locked('read')
            with self._state_lock:
                self._last_state = state
                self._last_read_time = time.monotonic()
                self._reads += 1
            return state

    def write(self, positions: Sequence[float], velocities: Optional[Sequence[float]] = None, **kwargs) -> None:
        """Delegate; backend-specific keywords (e.g. the serial driver's ``velocity_limits``) pass through."""
        self._call('write', positions, velocities, **kwargs)

    def stop(self) -> None:
        self._call_urgent('stop')

    def emergency_stop(self) -> None:
        self._call_urgent('emergency_stop')

    def set_motion_inhibit(self, inhibit: bool) -> None:
        """Asserting is a safety command (priority lane); releasing waits its turn like any request."""
        if inhibit:
            self._call_urgent('set_motion_inhibit', True)
        else:
            self._call('set_motion_inhibit', False)

    def reset_faults(self) -> None:
        self._call('reset_faults')

    def heartbeat(self) -> None:
        """Priority lane: a feed queued behind ordinary traffic would let the controller watchdog trip."""
        self._call_urgent('heartbeat')

    def begin_stream(self, start_positions: Sequence[float]) -> int:
        return self._call('begin_stream', start_positions)

    def push_points(self, stream_id: int, points: Sequence[PvtPoint], final: bool = False) -> StreamStatus:
        return self._call('push_points', stream_id, points, final=final)

    def stream_status(self) -> StreamStatus:
        return self._call('stream_status')

    def __repr__(self) -> str:
        return f'SharedHardware({type(self.backend).__name__}{", retired" if self._retired else ""})'


# ---------------------------------------------------------------------------- registry
# Process-wide: the hardware node registers its SharedHardware under its node name;
# the motion controller (same process) looks it up by that name.

_registry: Dict[str, SharedHardware] = {}
_registry_lock = threading.Lock()


def register(name: str, shared: SharedHardware) -> None:
    """Publish ``shared`` under ``name``. Re-registering the same object is a no-op.

    Raises ValueError if ``name`` already holds a different SharedHardware: two
    owners of one name in a process is a configuration error, never resolved silently.
    """
    if not name:
        raise ValueError('hardware registry name must be a non-empty string')
    if not isinstance(shared, SharedHardware):
        raise TypeError(f'register() needs a SharedHardware, got {type(shared).__name__}')
    with _registry_lock:
        current = _registry.get(name)
        if current is not None and current is not shared:
            raise ValueError(f"hardware '{name}' is already registered in this process ({current!r}); "
                             f'unregister it first')
        _registry[name] = shared


def lookup(name: str) -> Optional[SharedHardware]:
    """The SharedHardware registered under ``name``, or None."""
    with _registry_lock:
        return _registry.get(name)


def unregister(name: str, shared: Optional[SharedHardware] = None) -> bool:
    """Remove ``name``; with ``shared`` given, only if that object is the one registered.

    Returns True if an entry was removed.
    """
    with _registry_lock:
        current = _registry.get(name)
        if current is None or (shared is not None and current is not shared):
            return False
        del _registry[name]
        return True


def registered_names() -> List[str]:
    with _registry_lock:
        return sorted(_registry)
