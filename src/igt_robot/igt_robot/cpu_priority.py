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

Benches also raise the kernel's unbound workqueue workers, which carry a pty's bytes to the firmware
emulator (``UnboundKernelWorkers``).

Negative values need CAP_SYS_NICE (root on the robot's workstation); without it nothing changes and
the caller is told so.
"""
from __future__ import annotations

import os
import threading

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


def set_realtime(pid: int = 0, priority: int = 10) -> str:
    """SCHED_FIFO at ``priority`` (1..99) for every thread of ``pid`` (0: this process); threads it starts
    later inherit it. For a process with one short job per event (the scanner-trigger relay): such a thread
    runs the moment it wakes, whatever else the machine does, and gives the CPU back at once. Every thread,
    because a real-time thread waiting for the interpreter lock held by a normal-priority thread of its
    process waits as long as the load keeps that thread off the CPU. Needs CAP_SYS_NICE or an rtprio limit;
    returns '' on success, else why not (the threads then keep their policy)."""
    if not 1 <= int(priority) <= 99:
        return f'real-time priority must be 1..99, got {priority}'
    for tid in _thread_ids(pid or os.getpid()):
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


UNBOUND_WORKER_PREFIX = 'kworker/u'


class UnboundKernelWorkers:
    """SCHED_FIFO at ``priority`` for the kernel's unbound workqueue workers while started; SCHED_OTHER again
    (their nice value unchanged) once stopped. For benches whose firmware emulator stands in for a
    microcontroller behind a pty.

    Why: a pty hands the bytes written on one side to the other in a kernel worker (the tty layer's
    flip-buffer work on the unbound workqueue), which runs at normal priority. Under bench/stress.py load the
    scanner_trigger relay's frame was written 0.2 ms after the scan start at worst, and then waited up to
    10 ms for that worker before the real-time emulator could read it (p99 5.0 ms of a 9.0 ms total); with
    the workers at SCHED_FIFO 1 the same stage took at most 0.28 ms. A real controller's UART has no such
    stage: a USB-serial or native UART write is submitted from the writer's own context and received by the
    microcontroller's interrupt. Priority 1 puts the workers above every normal task and below every
    real-time thread of the stack.

    The kernel starts and retires such workers as it needs: ``refresh()`` (called every ``refresh_s`` by
    the thread ``start()`` runs) raises the ones that appeared meanwhile. Only workers found at SCHED_OTHER
    are changed, and only those are put back. Needs CAP_SYS_NICE.
    """

    def __init__(self, priority: int = 1, refresh_s: float = 0.5, proc: str = '/proc',
                 get_policy=os.sched_getscheduler, set_policy=os.sched_setscheduler):
        self.priority = int(priority)
        self.refresh_s = refresh_s
        self._proc = proc
        self._get_policy = get_policy
        self._set_policy = set_policy
        self._raised = set()              # pids this object set to SCHED_FIFO
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def workers(self) -> list:
        """Pids of the unbound workqueue workers now (their names start with ``kworker/u``)."""
        found = []
        for entry in os.listdir(self._proc):
            if not entry.isdigit():
                continue
            try:
                with open(os.path.join(self._proc, entry, 'comm')) as comm:
                    name = comm.read()
            except OSError:
                continue              # gone meanwhile
            if name.startswith(UNBOUND_WORKER_PREFIX):
                found.append(int(entry))
        return found

    def refresh(self) -> str:
        """Raise the workers at SCHED_OTHER not raised yet. '' on success, else why not."""
        with self._lock:
            for pid in self.workers():
                if pid in self._raised:
                    continue
                try:
                    if self._get_policy(pid) != os.SCHED_OTHER:
                        continue      # someone else's choice (or a worker already real-time): left alone
                    self._set_policy(pid, os.SCHED_FIFO, os.sched_param(self.priority))
                except ProcessLookupError:
                    continue
                except OSError as exc:
                    return f'kernel worker {pid}: {exc.strerror}'
                self._raised.add(pid)
            return ''

    def start(self) -> str:
        """Raise the workers now and keep raising new ones until ``stop()``. '' on success, else why not
        (then nothing was started and nothing stays changed)."""
        why = self.refresh()
        if why:
            self.stop()
            return why
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='kernel-worker-priority', daemon=True)
        self._thread.start()
        return ''

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def stop(self) -> None:
        """Stop refreshing and put every worker this object raised back to SCHED_OTHER. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        with self._lock:
            for pid in sorted(self._raised):
                try:
                    self._set_policy(pid, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass              # gone: nothing to put back
            self._raised.clear()
