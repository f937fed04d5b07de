"""CPU priority for the time-critical processes (control, supervision; the firmware emulator in benches).

Two things decide how much CPU a process gets on Linux, and both must be raised:

* the nice value of **every thread** (``setpriority(PRIO_PROCESS, tid)`` acts on one thread; a process
  raised after it started its threads would leave its DDS and interlock threads at the default);
* the nice value of its **autogroup** when the kernel groups by session
  (``/proc/sys/kernel/sched_autogroup_enabled``): the scheduler first shares the CPU fairly between
  sessions, so a process started in a session of its own (``start_new_session``) at nice -10 still
  waited 100 ms out of every 150 ms in the run queue next to two busy loops of another session
  (measured with /proc/<pid>/task/*/schedstat under ``bench/stress.py``). The autogroup is raised only
  when the process leads its session, so nothing else shares the raise.

Negative values need CAP_SYS_NICE (root on the robot's workstation); without it nothing changes and
the caller is told so.
"""
from __future__ import annotations

import os

AUTOGROUP = '/proc/{pid}/autogroup'


def raise_priority(pid: int = 0, nice: int = -10) -> str:
    """Set ``nice`` for every thread of ``pid`` (0: this process) and, if it leads its session, for its
    autogroup. Returns '' on success, else why it could not (the process then runs as it was)."""
    pid = pid or os.getpid()
    problems = []
    for tid in _thread_ids(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as exc:
            problems.append(f'thread {tid}: {exc.strerror}')
            break
    try:
        leads_session = os.getsid(pid) == pid
    except OSError:
        leads_session = False
    if leads_session and os.path.exists(AUTOGROUP.format(pid=pid)):
        try:
            with open(AUTOGROUP.format(pid=pid), 'w') as group:
                group.write(str(int(nice)))
        except OSError as exc:
            problems.append(f'autogroup: {exc.strerror}')
    return '; '.join(problems)


def set_realtime(pid: int = 0, priority: int = 10, skip: tuple = ()) -> str:
    """SCHED_FIFO at ``priority`` (1..99) for every thread of ``pid`` (0: this process) except the thread ids
    in ``skip``. For a process with one short job per event (the scanner-trigger relay): such a thread runs
    the moment it wakes, whatever else the machine does, and gives the CPU back at once. Needs CAP_SYS_NICE
    or an rtprio limit; returns '' on success, else why not (the threads then keep their policy)."""
    if not 1 <= int(priority) <= 99:
        return f'real-time priority must be 1..99, got {priority}'
    for tid in _thread_ids(pid or os.getpid()):
        if tid in skip:
            continue
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(int(priority)))
        except (OSError, AttributeError) as exc:
            return f'thread {tid}: {getattr(exc, "strerror", None) or exc}'
    return ''


def _thread_ids(pid: int) -> list:
    """The thread ids of ``pid`` now (just ``pid`` where /proc cannot be read)."""
    try:
        return [int(t) for t in os.listdir(f'/proc/{pid}/task')]
    except OSError:
        return [pid]
