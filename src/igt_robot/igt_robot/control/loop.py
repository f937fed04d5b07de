"""Fixed-rate loop helper with absolute deadlines and period statistics.

The loop calls ``step(now)`` every ``1/rate_hz`` seconds on an absolute grid:
``deadline += period`` after each cycle, so sleep inaccuracies never accumulate
(no drift). It drives the trajectory streamer at 50-100 Hz: the motor
controller servos and stops by itself, so this loop only has to keep the
controller's buffer ahead, and an OS sleep's overshoot (tens to hundreds of
microseconds) is irrelevant at that rate: no busy spin, no real-time priority.

Overruns: a cycle whose step ends after the next deadline is an overrun. If the
next deadline is still less than one period away, the next step runs
immediately (catching up keeps the grid); if whole periods were missed, those
slots are skipped and the loop resyncs to the next grid point in the future,
never running a burst of back-to-back catch-up steps.

The clock and sleep functions are injectable so tests can run the scheduling
logic on a simulated clock. Times are seconds from ``time.monotonic``.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Callable, Optional

import numpy as np

StepFn = Callable[[float], Optional[bool]]


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """Period statistics. Period error = actual time between step starts - nominal period.

    Percentiles are of |period error| over the last ``window`` cycles; ``max``
    covers the whole run. All times in seconds.
    """

    cycles: int
    overruns: int
    skipped_cycles: int
    rate_hz: float
    period_error_p50: float
    period_error_p99: float
    period_error_max: float
    mean_period: float
    max_step_duration: float


class FixedRateLoop:
    """Run ``step(now)`` at ``rate_hz`` on absolute deadlines.

    ``step`` returns None/True to continue or False to stop the loop. An
    exception in ``step`` stops the loop; it is re-raised by :meth:`run` and
    kept in :attr:`error` when running in a thread (the caller's heartbeat then
    stops, which the safety supervisor turns into a fault).
    """

    def __init__(self, step: StepFn, rate_hz: float = 50.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 stats_window: int = 3000, name: str = 'control_loop'):
        if not callable(step):
            raise TypeError('step must be callable as step(now)')
        rate = float(rate_hz)
        if not (math.isfinite(rate) and 0.0 < rate <= 1000.0):
            raise ValueError(f'rate_hz must be in (0, 1000], got {rate_hz!r}')
        if int(stats_window) < 1:
            raise ValueError('stats_window must be >= 1')
        self._step = step
        self.rate_hz = rate
        self.period = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self.name = name
        self._errors = np.zeros(int(stats_window))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self._reset_stats()

    def _reset_stats(self):
        self._cycles = 0
        self._overruns = 0
        self._skipped = 0
        self._n_err = 0
        self._max_err = 0.0
        self._max_step = 0.0
        self._first_start: Optional[float] = None
        self._last_start: Optional[float] = None

    # ---------------------------------------------------------------- running
    def run(self, max_cycles: Optional[int] = None) -> LoopStats:
        """Run in the calling thread until ``step`` returns False, :meth:`stop` is
        called, or ``max_cycles`` steps have run. Returns the final statistics."""
        self._stop.clear()
        deadline = self._clock()
        period = self.period
        while not self._stop.is_set():
            if max_cycles is not None and self._cycles >= max_cycles:
                break
            self._wait_until(deadline)
            start = self._clock()
            keep_going = self._step(start)
            end = self._clock()
            self._record(start, end)
            if keep_going is False:
                break
            deadline += period
            late = end - deadline
            if late > 0.0:
                # The step ran past the next deadline (overrun).
                missed = 0
                if late >= period:
                    # Whole slots lost: skip them and resync to the next grid
                    # point in the future instead of bursting catch-up steps.
                    missed = math.floor(late / period) + 1
                    deadline += missed * period
                with self._lock:
                    self._overruns += 1
                    self._skipped += missed
        return self.stats()

    def start(self, max_cycles: Optional[int] = None) -> None:
        """Run in a background daemon thread (the thread owns the loop)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f'{self.name} is already running')
        self.error = None

        def target():
            try:
                self.run(max_cycles)
            except BaseException as exc:  # noqa: BLE001 -- kept for the owner to inspect
                self.error = exc

        self._thread = threading.Thread(target=target, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = 1.0) -> bool:
        """Ask the loop to stop and wait for the thread; True if it has ended."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the background thread to end by itself; True if it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def cycles(self) -> int:
        return self._cycles

    # -------------------------------------------------------------- internals
    def _wait_until(self, deadline: float) -> None:
        remaining = deadline - self._clock()
        if remaining > 0.0:
            self._sleep(remaining)

    def _record(self, start: float, end: float) -> None:
        with self._lock:
            if self._last_start is not None:
                err = abs((start - self._last_start) - self.period)
                self._errors[self._n_err % self._errors.size] = err
                self._n_err += 1
                self._max_err = max(self._max_err, err)
            else:
                self._first_start = start
            self._last_start = start
            self._cycles += 1
            self._max_step = max(self._max_step, end - start)

    def reset_period_stats(self) -> None:
        """Start a new period-error window (a measurement phase); cycle and overrun counts go on."""
        with self._lock:
            self._n_err = 0
            self._max_err = 0.0
            self._max_step = 0.0
            self._last_start = None     # the next period starts at the next cycle
            self._first_start = None

    def stats(self) -> LoopStats:
        """A consistent snapshot (safe to call from another thread)."""
        with self._lock:
            n = min(self._n_err, self._errors.size)
            errs = self._errors[:n].copy()
            cycles = self._cycles
            n_periods = self._n_err
            mean = ((self._last_start - self._first_start) / n_periods) if n_periods else 0.0
            return LoopStats(
                cycles=cycles, overruns=self._overruns, skipped_cycles=self._skipped,
                rate_hz=self.rate_hz,
                period_error_p50=float(np.percentile(errs, 50)) if n else 0.0,
                period_error_p99=float(np.percentile(errs, 99)) if n else 0.0,
                period_error_max=self._max_err, mean_period=mean,
                max_step_duration=self._max_step)
