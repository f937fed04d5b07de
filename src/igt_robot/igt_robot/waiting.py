"""Waiting on a condition with a deadline (used by tests, benchmarks and the simulated procedure).

Waiting is on conditions, never on a fixed sleep: the predicate is polled until
it returns something truthy, which is returned.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


class ConditionTimeout(AssertionError):
    """A waited-for condition did not become true in time."""


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = 'condition',
             poll: float = 0.002, on_poll: Optional[Callable[[], None]] = None):
    """Poll ``predicate`` until it returns a truthy value; return that value.

    ``on_poll`` runs between polls (e.g. to spin a node once). Raises
    :class:`ConditionTimeout` naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ConditionTimeout(f'timed out after {timeout:.1f} s waiting for {what}')
        if on_poll is not None:
            on_poll()
        else:
            time.sleep(poll)  # a poll interval, not a wait for an outcome
