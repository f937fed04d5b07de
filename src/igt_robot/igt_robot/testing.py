"""Helpers for tests and benchmarks that run a real, isolated ROS 2 graph.

Isolation: every run gets its own ``ROS_DOMAIN_ID``, discovery limited to
localhost (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) and ``ROS_LOG_DIR``
inside the build tree. Processes started here are put in their own process
group and always reaped; Fast DDS shared-memory files left by processes that
were killed on purpose (SIGKILL tests) are removed by
:func:`remove_stale_fastdds_shm`.

Waiting is on conditions (:func:`wait_for`), never on fixed sleeps.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
from typing import Iterable, Optional

from igt_robot import ros_domain
from igt_robot.waiting import ConditionTimeout, wait_for  # noqa: F401  (re-exported for tests)

# The shared-memory helpers live in a non-test module (the launchers use them); re-exported for tests.
from igt_robot.fastdds_shm import (FASTDDS_SHM_PREFIXES, SHM_DIR, fastdds_shm_entries,  # noqa: E402,F401
                                   remove_dead_fastdds_shm, remove_stale_fastdds_shm)


# Claims on the domains this process picked (igt_robot.ros_domain): held until the process exits.
_DOMAIN_CLAIMS = []


def pick_domain_id(preferred: Optional[int] = None) -> int:
    """A domain id (10..99) nothing else on this machine uses, claimed for this process's lifetime.

    ``preferred`` (e.g. the ROS_DOMAIN_ID that `make` picked) is kept when it is still free."""
    domain, claim = ros_domain.claim_free_domain(preferred)
    _DOMAIN_CLAIMS.append(claim)
    return domain


def isolated_ros_env(log_dir: os.PathLike, domain_id: Optional[int] = None, base: Optional[dict] = None) -> dict:
    """Environment for a process that must stay on an isolated, loopback-only ROS graph."""
    env = dict(os.environ if base is None else base)
    env['ROS_DOMAIN_ID'] = str(pick_domain_id() if domain_id is None else domain_id)
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env.pop('ROS_STATIC_PEERS', None)
    env['ROS_LOG_DIR'] = str(log_dir)
    env['PYTHONUNBUFFERED'] = '1'
    env.setdefault('RCUTILS_COLORIZED_OUTPUT', '0')
    pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
    return env


def apply_env(env: dict) -> None:
    """Make ``env``'s ROS isolation variables current for this process (before rclpy.init)."""
    for key in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'ROS_LOG_DIR'):
        os.environ[key] = env[key]
    os.environ.pop('ROS_STATIC_PEERS', None)


# Set in the environment of a test run (igt_robot.pytest_fixtures); every process the run starts inherits
# it, so a process a killed parent left behind is still found as this run's (:func:`processes_of_run`).
RUN_MARKER_ENV = 'IGT_TEST_RUN'


def processes_of_run(marker: str, exclude: Iterable[int] = ()) -> dict:
    """pid -> command line of every live process whose environment carries ``RUN_MARKER_ENV=marker``."""
    wanted = f'{RUN_MARKER_ENV}={marker}'.encode()
    skip = {int(pid) for pid in exclude}
    found = {}
    for environ in pathlib.Path('/proc').glob('[0-9]*/environ'):
        pid = int(environ.parent.name)
        if pid in skip:
            continue
        try:
            if wanted not in environ.read_bytes().split(b'\0'):
                continue
            found[pid] = (environ.parent / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except OSError:     # gone meanwhile, a zombie, or not ours to read
            continue
    return found


class ManagedProcess:
    """A child process in its own process group, with output captured to a file."""

    def __init__(self, argv: list, env: dict, log_path: os.PathLike, name: str = ''):
        self.name = name or pathlib.Path(argv[0]).name
        self.log_path = pathlib.Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors='replace')

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (used by fault-injection tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """SIGINT, then SIGTERM, then SIGKILL the process group; always reap. Returns the exit code."""
        for sig, grace in ((signal.SIGINT, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            if self.proc.poll() is not None:
                break
            self.kill(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        # Children that outlived the leader in the same group.
        self.kill(signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def python_process(module_or_script: str, args: Iterable[str], env: dict, log_path: os.PathLike,
                   name: str = '') -> ManagedProcess:
    """Start ``python -m module`` (or a script path) with this interpreter."""
    if module_or_script.endswith('.py'):
        argv = [sys.executable, module_or_script, *args]
    else:
        argv = [sys.executable, '-m', module_or_script, *args]
    return ManagedProcess(argv, env, log_path, name=name or module_or_script)


class SpinningGraph:
    """rclpy in this process: own Context, a multi-threaded executor spinning in a thread.

    Usage::

        with SpinningGraph() as graph:
            node = graph.add(rclpy.create_node('probe', context=graph.context))
    """

    def __init__(self, threads: int = 4):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self._nodes = []
        from igt_robot.nodes.spinning import BackgroundSpinner, shorten_gil_switch_interval
        # The nodes hosted here get the interpreter settings an entry point gives them (at CPython's 5 ms
        # default a test process's probes and nodes wait for each other's threads far longer than in use).
        shorten_gil_switch_interval()
        self._spinner = BackgroundSpinner(self.executor, name='spinning-graph')

    def add(self, node):
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def create_node(self, name: str, **kwargs):
        return self.add(self._rclpy.create_node(name, context=self.context, **kwargs))

    @property
    def spin_error(self):
        """The exception a callback raised, which ended the spinning (None while all is well)."""
        return self._spinner.error

    def close(self):
        self._spinner.stop(timeout_sec=2.0)   # callbacks finish before the nodes are destroyed
        from igt_robot.nodes.spinning import destroy_node_and_actions
        for node in reversed(self._nodes):
            destroy_node_and_actions(node)
        self._nodes.clear()
        with contextlib.suppress(Exception):
            self._rclpy.shutdown(context=self.context)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
