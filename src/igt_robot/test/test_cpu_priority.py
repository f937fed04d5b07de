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
