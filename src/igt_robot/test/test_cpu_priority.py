"""cpu_priority: every thread and the session's autogroup get the raised priority (the scheduler's
autogroups made a per-process nice ineffective across sessions)."""
import os
import subprocess
import sys

import pytest

from igt_robot import cpu_priority, testing

CHILD = 'import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n' \
        'print("ready", flush=True)\ntime.sleep(30)\n'


def _nice_of(pid, tid):
    return int(open(f'/proc/{pid}/task/{tid}/stat').read().rsplit(')', 1)[1].split()[16])


@pytest.mark.skipif(not os.path.exists('/proc/self/autogroup'), reason='kernel without scheduler autogroups')
@pytest.mark.skipif(os.geteuid() != 0, reason='raising a priority needs CAP_SYS_NICE (root)')
def test_every_thread_and_the_session_autogroup_are_raised():
    child = subprocess.Popen([sys.executable, '-c', CHILD], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == b'ready'
        testing.wait_for(lambda: len(os.listdir(f'/proc/{child.pid}/task')) >= 2, 10, 'the child thread')
        tids = os.listdir(f'/proc/{child.pid}/task')
        assert cpu_priority.raise_priority(child.pid, -5) == ''
        assert {_nice_of(child.pid, tid) for tid in tids} == {-5}
        assert open(f'/proc/{child.pid}/autogroup').read().split()[-1] == '-5'
    finally:
        child.kill()
        child.wait()


def test_a_process_sharing_its_session_leaves_the_autogroup_alone():
    before = open('/proc/self/autogroup').read() if os.path.exists('/proc/self/autogroup') else None
    child = subprocess.Popen([sys.executable, '-c', CHILD], stdout=subprocess.PIPE)   # this session
    try:
        assert child.stdout.readline().strip() == b'ready'
        cpu_priority.raise_priority(child.pid, 0)
        if before is not None:
            assert open('/proc/self/autogroup').read() == before
    finally:
        child.kill()
        child.wait()


def _policy_of(tid):
    return os.sched_getscheduler(int(tid))


def test_real_time_scheduling_for_every_thread_the_main_thread_too():
    """The scanner_trigger relay: its waiting threads run the moment they wake, and none of its threads is left
    at normal priority to hold the interpreter lock they need (the main thread too: the executor's threads it
    makes later inherit its policy)."""
    child = subprocess.Popen([sys.executable, '-c', CHILD], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b'ready'
        testing.wait_for(lambda: len(os.listdir(f'/proc/{child.pid}/task')) >= 2, 10, 'the child thread')
        why = cpu_priority.set_realtime(child.pid, 5)
        if why:                              # no CAP_SYS_NICE / rtprio limit: the reason, nothing changed
            assert 'thread' in why
            pytest.skip(f'real-time scheduling not permitted here: {why}')
        tids = [int(t) for t in os.listdir(f'/proc/{child.pid}/task')]
        assert len(tids) >= 2 and {_policy_of(t) for t in tids} == {os.SCHED_FIFO}
        assert {os.sched_getparam(t).sched_priority for t in tids} == {5}
    finally:
        child.kill()
        child.wait()


def test_a_real_time_priority_out_of_range_is_refused_with_the_range():
    assert '1..99' in cpu_priority.set_realtime(0, 0)
    assert '1..99' in cpu_priority.set_realtime(0, 100)


class _FakeScheduler:
    """os.sched_getscheduler / sched_setscheduler over a dict of pid -> policy."""

    def __init__(self, policies, refuse=()):
        self.policies = dict(policies)
        self.refuse = set(refuse)

    def get(self, pid):
        if pid not in self.policies:
            raise ProcessLookupError(pid)
        return self.policies[pid]

    def set(self, pid, policy, param):
        if pid in self.refuse:
            raise PermissionError(1, 'Operation not permitted')
        if pid not in self.policies:
            raise ProcessLookupError(pid)
        self.policies[pid] = policy


def _fake_proc(root, tasks):
    for pid, name in tasks.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / 'comm').write_text(name + '\n')
    (root / 'self').mkdir()


def test_unbound_kernel_workers_are_raised_then_put_back(tmp_path):
    """The pty's flip-buffer work runs in the unbound workers: they, and only they, go real-time while a
    bench runs, the ones the kernel adds meanwhile too; a worker another tool made real-time is left alone."""
    _fake_proc(tmp_path, {11: 'kworker/u8:1-events_unbound', 12: 'kworker/0:1-events', 13: 'python3',
                          14: 'kworker/u8:2', 15: 'kworker/u8:3'})
    scheduler = _FakeScheduler({11: os.SCHED_OTHER, 12: os.SCHED_OTHER, 13: os.SCHED_OTHER, 14: os.SCHED_OTHER,
                                15: os.SCHED_RR})
    workers = cpu_priority.UnboundKernelWorkers(proc=str(tmp_path), get_policy=scheduler.get,
                                                set_policy=scheduler.set, refresh_s=60.0)
    assert sorted(workers.workers()) == [11, 14, 15]
    assert workers.start() == ''
    assert scheduler.policies == {11: os.SCHED_FIFO, 12: os.SCHED_OTHER, 13: os.SCHED_OTHER, 14: os.SCHED_FIFO,
                                  15: os.SCHED_RR}
    (tmp_path / '16').mkdir()                        # a worker the kernel started meanwhile
    (tmp_path / '16' / 'comm').write_text('kworker/u8:4\n')
    scheduler.policies[16] = os.SCHED_OTHER
    assert workers.refresh() == ''
    assert scheduler.policies[16] == os.SCHED_FIFO
    del scheduler.policies[14]                       # retired by the kernel meanwhile
    workers.stop()
    assert scheduler.policies == {11: os.SCHED_OTHER, 12: os.SCHED_OTHER, 13: os.SCHED_OTHER, 15: os.SCHED_RR,
                                  16: os.SCHED_OTHER}
    workers.stop()                                   # idempotent


def test_unbound_kernel_workers_refused_leave_nothing_changed(tmp_path):
    _fake_proc(tmp_path, {21: 'kworker/u8:1', 22: 'kworker/u8:2'})
    scheduler = _FakeScheduler({21: os.SCHED_OTHER, 22: os.SCHED_OTHER}, refuse={22})
    workers = cpu_priority.UnboundKernelWorkers(proc=str(tmp_path), get_policy=scheduler.get,
                                                set_policy=scheduler.set)
    why = workers.start()
    assert 'kernel worker 22' in why and 'not permitted' in why
    assert scheduler.policies == {21: os.SCHED_OTHER, 22: os.SCHED_OTHER}
