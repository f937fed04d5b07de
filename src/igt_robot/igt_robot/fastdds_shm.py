"""Fast DDS shared-memory files in /dev/shm: find them, remove those of dead processes.

Fast DDS (the RMW of the PyPI wheels) creates ``/dev/shm/fastdds_*`` segments, port queues and their
``*_el`` lock files; a process that is killed leaves them behind (11 MB after a few killed runs). The
stack's own launchers (``igt_robot.demo``, ``igt_robot.bringup``) remove at start the files of dead
processes: :func:`remove_dead_fastdds_shm` takes only files owned by this user, older than a grace period
(a starting process may not have mapped its new segment yet) and mapped by no live process.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import time
from typing import Iterable, List

SHM_DIR = pathlib.Path('/dev/shm')
FASTDDS_SHM_PREFIXES = ('fastrtps_', 'fastdds_', 'sem.fastrtps_', 'sem.fastdds_')


def fastdds_shm_entries() -> set:
    """Names of Fast DDS shared-memory files currently in /dev/shm."""
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(FASTDDS_SHM_PREFIXES)}


def mapped_shm_names(ignore_pids: Iterable[int] = ()) -> set:
    """/dev/shm files mapped by any live process but ``ignore_pids`` (those are in use and must stay)."""
    names = set()
    ignored = {str(pid) for pid in ignore_pids}
    for maps in pathlib.Path('/proc').glob('[0-9]*/maps'):
        if maps.parent.name in ignored:
            continue
        with contextlib.suppress(OSError):
            for line in maps.read_text().splitlines():
                if '/dev/shm/' in line:
                    names.add(line.rsplit('/dev/shm/', 1)[1].split(' ')[0])
    return names


def _unlink_unmapped(candidates: Iterable[str], in_use: set) -> List[str]:
    removed = []
    for name in sorted(candidates):
        base = name[:-3] if name.endswith('_el') else name   # a lock file goes with its segment
        if base in in_use or name in in_use:
            continue
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()
            removed.append(name)
    return removed


def remove_stale_fastdds_shm(created_after: Iterable[str] = (), ignore_pids: Iterable[int] = ()) -> List[str]:
    """Remove Fast DDS shm files that appeared since ``created_after`` and no live process maps.

    Only files not present in the ``created_after`` snapshot are considered, so another program's
    segments are never touched. ``ignore_pids`` are processes about to exit (the caller itself on its
    way out): unlinking a name they still map is harmless, the mapping lives on until they exit.
    """
    return _unlink_unmapped(fastdds_shm_entries() - set(created_after), mapped_shm_names(ignore_pids))


def remove_dead_fastdds_shm(min_age_s: float = 10.0) -> List[str]:
    """At start: remove this user's Fast DDS shm files older than ``min_age_s`` that no live process maps."""
    uid, now = os.getuid(), time.time()
    candidates = []
    for name in fastdds_shm_entries():
        with contextlib.suppress(OSError):
            st = (SHM_DIR / name).stat()
            if st.st_uid == uid and now - st.st_mtime >= min_age_s:
                candidates.append(name)
    if not candidates:
        return []
    return _unlink_unmapped(candidates, mapped_shm_names())
