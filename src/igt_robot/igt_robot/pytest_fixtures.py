"""pytest fixtures of the suite (both packages' conftest.py import them).

Test-suite wide isolation: a private ROS graph, logs in the build tree, nothing left behind.

Set before anything imports rclpy: a per-run ROS_DOMAIN_ID, localhost-only
discovery and ROS_LOG_DIR under build/. At the end of the session, Fast DDS
shared-memory files left by processes that tests killed on purpose are removed,
and any child process still alive is reported and killed.
"""
import os
import pathlib
import signal
import time

import pytest

from igt_robot import paths, testing

REPO = paths.repo_root()
RUN_DIR = REPO / 'build' / 'test_runs' / time.strftime('%Y%m%d-%H%M%S')
_DOMAIN_GIVEN = int(os.environ['ROS_DOMAIN_ID']) if os.environ.get('ROS_DOMAIN_ID', '').strip() else None
# Checked and claimed: a domain another process on this machine uses would mix its nodes into every test.
RUN_ENV = testing.isolated_ros_env(RUN_DIR / 'ros_log', domain_id=testing.pick_domain_id(_DOMAIN_GIVEN))
if _DOMAIN_GIVEN is not None and int(RUN_ENV['ROS_DOMAIN_ID']) != _DOMAIN_GIVEN:
    print(f'[conftest] ROS_DOMAIN_ID={_DOMAIN_GIVEN} is in use by another process on this machine: '
          f'this run uses {RUN_ENV["ROS_DOMAIN_ID"]}', flush=True)
# Every process this run starts inherits the marker, also those a killed parent left to init.
RUN_ENV[testing.RUN_MARKER_ENV] = f'{os.getpid()}-{RUN_DIR.name}'
os.environ[testing.RUN_MARKER_ENV] = RUN_ENV[testing.RUN_MARKER_ENV]
testing.apply_env(RUN_ENV)
os.environ.setdefault('MUJOCO_GL', 'egl')

# This process hosts several DDS participants at once (each test graph is an rclpy context of its own, beside the
# nodes a test makes). Fast DDS's intraprocess shortcut between participants of one process can deadlock when one
# destroys an endpoint while another's event thread delivers to it (eProsima/Fast-DDS#6193): a full run hung in a
# graph's teardown, the main thread in ~DataWriterImpl waiting for the event thread, which was in
# WriterProxy::perform_initial_ack_nack waiting for the writer's mutex. With the shortcut off, the participants of
# this process talk through shared memory as separate processes do. Only this process: the stack's processes
# host one participant each and keep their defaults.
FASTDDS_PROFILE = RUN_DIR / 'fastdds_no_intraprocess.xml'
if 'FASTDDS_DEFAULT_PROFILES_FILE' not in os.environ:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    FASTDDS_PROFILE.write_text('<?xml version="1.0" encoding="UTF-8" ?>\n'
                               '<dds xmlns="http://www.eprosima.com">\n'
                               '  <library_settings>\n'
                               '    <intraprocess_delivery>OFF</intraprocess_delivery>\n'
                               '  </library_settings>\n'
                               '</dds>\n')
    os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(FASTDDS_PROFILE)
SHM_AT_START = testing.fastdds_shm_entries()


def _child_pids():
    me = str(os.getpid())
    pids = []
    for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            pids.append(int(stat.parent.name))
    return pids


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pytest_sessionfinish(session, exitstatus):
    stray = _child_pids()
    _kill_all(stray)
    if stray:
        print(f'\n[conftest] killed {len(stray)} stray child process(es): {stray}')
    removed = testing.remove_stale_fastdds_shm(SHM_AT_START, ignore_pids=[os.getpid()])
    if removed:
        print(f'\n[conftest] removed {len(removed)} stale Fast DDS shm file(s) left by this run')


LEFT_BEHIND_GRACE_S = 10.0   # a process told to stop may still be shutting down when its test ends


@pytest.fixture(scope='module', autouse=True)
def no_process_left_behind():
    """After each test module: no process of this run may still be alive (it would join the next
    module's ROS graph). Leftovers are killed and reported as an error of the module that left them."""
    yield
    marker = os.environ[testing.RUN_MARKER_ENV]
    mine = [os.getpid()]
    try:
        testing.wait_for(lambda: not testing.processes_of_run(marker, mine), LEFT_BEHIND_GRACE_S,
                         'the processes of this module to end', poll=0.2)
        return
    except testing.ConditionTimeout:
        left = testing.processes_of_run(marker, mine)
    _kill_all(left)
    if left:
        pytest.fail(f'processes left behind (now killed): {left}', pytrace=False)


@pytest.fixture(scope='session')
def ros_env():
    """Environment (dict) for child processes on this run's isolated graph."""
    return dict(RUN_ENV)


@pytest.fixture
def run_dir(request):
    """A per-test folder under build/test_runs for logs and artefacts."""
    path = RUN_DIR / request.node.name.replace('/', '_').replace('[', '_').replace(']', '')
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def graph():
    """An in-process rclpy graph (own context, executor spinning in a thread)."""
    g = testing.SpinningGraph()
    try:
        yield g
    finally:
        g.close()
    if g.spin_error is not None:    # every node of the graph stopped there: what the test saw after is void
        pytest.fail(f'a callback raised and ended the graph\'s spinning: {g.spin_error!r}', pytrace=False)


@pytest.fixture
def processes(ros_env, run_dir):
    """Factory starting OS processes on the isolated graph; all stopped and reaped at teardown."""
    started = []

    def start(module_or_script, *args, name=None, env=None):
        name = name or pathlib.Path(module_or_script).stem.split('.')[-1]
        proc = testing.python_process(module_or_script, args, env or ros_env, run_dir / f'{name}.log', name=name)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()
