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


def test_real_time_scheduling_for_every_thread_but_the_ones_skipped():
    """The scanner_trigger relay: its waiting threads run the moment they wake; the thread that later makes the
    executor's threads keeps normal scheduling (skip), so they do too."""
    child = subprocess.Popen([sys.executable, '-c', CHILD], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b'ready'
        testing.wait_for(lambda: len(os.listdir(f'/proc/{child.pid}/task')) >= 2, 10, 'the child thread')
        why = cpu_priority.set_realtime(child.pid, 5, skip=(child.pid,))
        if why:                              # no CAP_SYS_NICE / rtprio limit: the reason, nothing changed
            assert 'thread' in why
            pytest.skip(f'real-time scheduling not permitted here: {why}')
        tids = [int(t) for t in os.listdir(f'/proc/{child.pid}/task')]
        assert {_policy_of(t) for t in tids if t != child.pid} == {os.SCHED_FIFO}
        assert _policy_of(child.pid) == os.SCHED_OTHER
        assert os.sched_getparam([t for t in tids if t != child.pid][0]).sched_priority == 5
    finally:
        child.kill()
        child.wait()


def test_a_real_time_priority_out_of_range_is_refused_with_the_range():
    assert '1..99' in cpu_priority.set_realtime(0, 0)
    assert '1..99' in cpu_priority.set_realtime(0, 100)
