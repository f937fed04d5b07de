"""A process that has begun to shut down ends within a bounded time, and says where it was stuck.

A node process whose parent is gone, or that was told to stop, must not live on: a stray supervisor or
scanner interface left on the ROS graph is a second publisher of the safety topics for whatever runs there
next. Shutdown is normally quick, but one callback that never returns keeps the executor's worker thread,
and with it the interpreter's exit (which joins those workers), waiting for ever. So once shutdown begins
a deadline is armed: when it passes, every thread's stack goes to stderr (the process log) and the process
exits with a non-zero code. The robot does not depend on it: the motor controller's watchdog stops the
axes when the host goes quiet.
"""
import faulthandler
import sys

SHUTDOWN_DEADLINE_S = 8.0   # normal shutdown takes < 1 s; the executor alone is given 3 s to finish callbacks


def arm_exit_deadline(seconds: float = SHUTDOWN_DEADLINE_S) -> None:
    """After ``seconds``, dump every thread's stack to stderr and exit (code 1) if still running."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)
