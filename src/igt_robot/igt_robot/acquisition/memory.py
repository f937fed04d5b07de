"""The image travels once: volumes already in memory, found by the folder they were stored in.

A received series is written to disk (the record keeps it) *and* held in memory.
The procedure node puts the volume here under its folder before it asks for a
registration; the registration node, in the same process (the in-process bringup
and ``make demo``), takes it from here instead of reading and decoding the files
again. In another process the lookup misses and the folder is read: same result,
one more read. Bounded: the oldest entries go first.
"""
from __future__ import annotations

import collections
import pathlib
import threading
from typing import Optional

MAX_ENTRIES = 4

_lock = threading.Lock()
_volumes: 'collections.OrderedDict[str, object]' = collections.OrderedDict()


def _key(path) -> str:
    return str(pathlib.Path(path).expanduser().resolve())


def put(path, volume) -> None:
    with _lock:
        key = _key(path)
        _volumes.pop(key, None)
        _volumes[key] = volume
        while len(_volumes) > MAX_ENTRIES:
            _volumes.popitem(last=False)


def get(path) -> Optional[object]:
    with _lock:
        return _volumes.get(_key(path))


def clear() -> None:
    with _lock:
        _volumes.clear()
