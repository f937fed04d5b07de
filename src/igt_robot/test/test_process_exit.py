"""A process that has begun to shut down ends within its deadline even when a thread never returns."""
import subprocess
import sys

HANGING_SHUTDOWN = '''
import threading
from igt_robot.process_exit import arm_exit_deadline
stuck = threading.Thread(target=threading.Event().wait, name='stuck-callback')   # not a daemon: exit joins it
stuck.start()
arm_exit_deadline(0.5)
print('shutting down', flush=True)
'''


def test_a_hung_shutdown_exits_non_zero_with_every_threads_stack():
    done = subprocess.run([sys.executable, '-c', HANGING_SHUTDOWN], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == 'shutting down'
    assert done.returncode != 0
    assert 'Timeout' in done.stderr and 'wait' in done.stderr, done.stderr


def test_a_quick_shutdown_is_not_affected():
    done = subprocess.run([sys.executable, '-c', 'from igt_robot.process_exit import arm_exit_deadline; '
                           'arm_exit_deadline(5.0); print("bye")'], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, 'bye', '')
