"""SharedHardware: delegation under one fair lock, the state cache, retirement, and the process registry."""
import threading
import time

import numpy as np
import pytest

from igt_robot import testing
from igt_robot.hardware import shared as shared_hardware
from igt_robot.hardware.interface import HardwareError, HardwareInterface, HardwareState
from igt_robot.hardware.shared import FairLock, SharedHardware

JOINTS = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')


class RecordingBackend(HardwareInterface):
    """Test double: records calls, detects overlapping calls, can block or fail on demand."""

    joint_names = JOINTS

    def __init__(self, io_time: float = 0.0):
        self.calls = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.io_time = io_time            # simulated transaction time on the link, s
        self.fail_next_read = None
        self.read_count = 0
        self._count_lock = threading.Lock()

    def _enter(self, name, *args, **kwargs):
        with self._count_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.calls.append((name, args, kwargs))
        if self.io_time:
            time.sleep(self.io_time)      # the link is busy for this long (not a wait for an outcome)
        with self._count_lock:
            self.in_flight -= 1

    def connect(self):
        self._enter('connect')

    def close(self):
        self._enter('close')

    def enable(self):
        self._enter('enable')

    def disable(self):
        self._enter('disable')

    def read(self):
        self._enter('read')
        if self.fail_next_read is not None:
            exc, self.fail_next_read = self.fail_next_read, None
            raise exc
        self.read_count += 1
        return HardwareState(stamp=time.monotonic(), positions=np.full(5, float(self.read_count)),
                             velocities=np.zeros(5))

    def write(self, positions, velocities=None, **kwargs):
        self._enter('write', list(positions), velocities, **kwargs)

    def stop(self):
        self._enter('stop')

    def emergency_stop(self):
        self._enter('emergency_stop')

    def set_motion_inhibit(self, inhibit):
        self._enter('set_motion_inhibit', inhibit)

    def reset_faults(self):
        self._enter('reset_faults')

    def heartbeat(self):
        self._enter('heartbeat')


@pytest.fixture(autouse=True)
def clean_registry():
    yield
    for name in shared_hardware.registered_names():
        shared_hardware.unregister(name)


def test_is_a_hardware_interface_and_delegates_every_call():
    backend = RecordingBackend()
    hw = SharedHardware(backend)
    assert isinstance(hw, HardwareInterface)
    assert hw.joint_names == JOINTS
    hw.connect()
    hw.enable()
    hw.write([0.01, 0, 0, 0, 0], [0.001, 0, 0, 0, 0], velocity_limits=[0.005] * 5)
    hw.set_motion_inhibit(1)
    hw.stop()
    hw.emergency_stop()
    hw.reset_faults()
    hw.heartbeat()
    hw.disable()
    hw.close()
    names = [c[0] for c in backend.calls]
    assert names == ['connect', 'enable', 'write', 'set_motion_inhibit', 'stop', 'emergency_stop',
                     'reset_faults', 'heartbeat', 'disable', 'close']
    write = backend.calls[2]
    assert write[1] == ([0.01, 0, 0, 0, 0], [0.001, 0, 0, 0, 0])
    assert write[2] == {'velocity_limits': [0.005] * 5}        # backend-specific keyword passes through
    assert backend.calls[3][1] == (True,)                       # normalised to bool


def test_read_caches_the_last_state_and_a_failed_read_keeps_it():
    backend = RecordingBackend()
    hw = SharedHardware(backend)
    assert hw.last_state is None and hw.last_read_time is None
    assert hw.cached_state(max_age=10.0) is None
    before = time.monotonic()
    state = hw.read()
    assert hw.last_state is state
    assert before <= hw.last_read_time <= time.monotonic()
    assert hw.cached_state(max_age=10.0) is state
    assert hw.cached_state(max_age=0.5, now=hw.last_read_time + 1.0) is None   # too old for this reader
    backend.fail_next_read = HardwareError('port lost: /dev/ttyX')
    with pytest.raises(HardwareError, match='port lost'):
        hw.read()
    assert hw.last_state is state                              # the failure did not overwrite the cache
    assert 'port lost' in hw.last_error and hw.last_error.startswith('read()')
    assert hw.stats == {'reads': 1, 'errors': 1}


def test_calls_from_many_threads_never_overlap():
    backend = RecordingBackend(io_time=0.0002)
    hw = SharedHardware(backend)
    errors = []

    def hammer(call):
        try:
            for _ in range(100):
                call()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in
               (hw.read, lambda: hw.write([0.0] * 5), hw.heartbeat, lambda: hw.set_motion_inhibit(True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(backend.calls) == 400
    assert backend.max_in_flight == 1


def test_fair_lock_serves_a_waiting_safety_command_before_the_loop_reacquires():
    """A control loop that releases and immediately re-acquires must not overtake a queued caller."""
    backend = RecordingBackend()
    hw = SharedHardware(backend)
    order = []
    release_loop = threading.Event()

    def loop():
        with hw.exclusive():
            order.append('loop cycle 1')
            release_loop.wait(10)
        with hw.exclusive():               # re-acquire at once, as a 1 kHz loop does
            order.append('loop cycle 2')

    def inhibit():
        hw.set_motion_inhibit(True)
        order.append('inhibit')

    loop_thread = threading.Thread(target=loop)
    loop_thread.start()
    testing.wait_for(lambda: order == ['loop cycle 1'], 5, 'the loop to hold the lock')
    inhibit_thread = threading.Thread(target=inhibit)
    inhibit_thread.start()
    testing.wait_for(lambda: len(hw._lock._urgent) == 1, 5, 'the inhibit call to queue')
    release_loop.set()
    loop_thread.join(5)
    inhibit_thread.join(5)
    assert order == ['loop cycle 1', 'inhibit', 'loop cycle 2']


def test_safety_commands_and_the_watchdog_feed_go_ahead_of_queued_ordinary_requests():
    """Inhibit, stop, e-stop and the watchdog feed wait behind the transaction on the line only.

    Never behind a queue of streaming/state requests; releasing the inhibit is ordinary and keeps its place.
    """
    hw = SharedHardware(RecordingBackend())
    order = []
    release_holder = threading.Event()

    def holder():
        with hw.exclusive():
            order.append('on the line')
            release_holder.wait(10)

    def call(label, fn):
        fn()
        order.append(label)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    testing.wait_for(lambda: order == ['on the line'], 5, 'the holder to take the lock')
    queued = [('read 1', hw.read), ('release inhibit', lambda: hw.set_motion_inhibit(False)), ('read 2', hw.read),
              ('inhibit', lambda: hw.set_motion_inhibit(True)), ('stop', hw.stop), ('heartbeat', hw.heartbeat),
              ('estop', hw.emergency_stop)]
    for label, fn in queued:
        thread = threading.Thread(target=call, args=(label, fn))
        thread.start()
        threads.append(thread)
        testing.wait_for(lambda: (len(hw._lock._queue) + len(hw._lock._urgent)) == len(threads) - 1,
                         5, f'{label} to queue')
    release_holder.set()
    for thread in threads:
        thread.join(5)
    assert order == ['on the line', 'inhibit', 'stop', 'heartbeat', 'estop', 'read 1', 'release inhibit', 'read 2']


def test_fair_lock_is_reentrant_and_checks_the_owner():
    lock = FairLock()
    with lock:
        with lock:
            pass
        refused = []

        def foreign_release():
            try:
                lock.release()
            except RuntimeError as exc:
                refused.append(str(exc))
        holder = threading.Thread(target=foreign_release)
        holder.start()
        holder.join(5)
        assert refused and 'does not hold it' in refused[0]
    acquired = threading.Event()

    def other():
        with lock:
            acquired.set()
    t = threading.Thread(target=other)
    t.start()
    assert acquired.wait(5)                 # fully released after the nested exit
    t.join(5)


def test_retired_handle_refuses_every_call_with_the_reason():
    backend = RecordingBackend()
    hw = SharedHardware(backend)
    hw.read()
    hw.retire("hardware node 'hardware_node' cleaned up")
    assert hw.retired == "hardware node 'hardware_node' cleaned up"
    for call in (hw.read, hw.stop, lambda: hw.write([0.0] * 5), lambda: hw.set_motion_inhibit(True)):
        with pytest.raises(HardwareError, match='retired .*cleaned up'):
            call()
    assert [c[0] for c in backend.calls] == ['read']            # nothing reached the backend


def test_rejects_a_backend_that_is_not_a_hardware_interface():
    with pytest.raises(TypeError, match='HardwareInterface'):
        SharedHardware(object())


def test_registry_register_lookup_unregister():
    a, b = SharedHardware(RecordingBackend()), SharedHardware(RecordingBackend())
    assert shared_hardware.lookup('hw_a') is None
    shared_hardware.register('hw_a', a)
    shared_hardware.register('hw_a', a)                          # same object again: no-op
    assert shared_hardware.lookup('hw_a') is a
    with pytest.raises(ValueError, match="'hw_a' is already registered"):
        shared_hardware.register('hw_a', b)
    assert shared_hardware.lookup('hw_a') is a
    assert not shared_hardware.unregister('hw_a', b)             # not b's entry: left alone
    assert shared_hardware.lookup('hw_a') is a
    assert shared_hardware.unregister('hw_a', a)
    assert shared_hardware.lookup('hw_a') is None
    assert not shared_hardware.unregister('hw_a')
    with pytest.raises(ValueError, match='non-empty'):
        shared_hardware.register('', a)
    with pytest.raises(TypeError, match='SharedHardware'):
        shared_hardware.register('raw', RecordingBackend())


def test_with_the_mujoco_backend_a_loop_and_a_reader_share_it():
    """Real backend: a control-loop thread writes setpoints while another thread reads the cache."""
    from igt_robot.hardware.mujoco_backend import MujocoHardware
    backend = MujocoHardware(realtime=False)
    hw = SharedHardware(backend)
    hw.connect()
    hw.enable()
    target = np.array([0.001, -0.001, 0.01, -0.01, 0.0005])
    stop = threading.Event()

    def control_loop():
        while not stop.is_set():
            with hw.exclusive():
                backend.advance(0.002)
                hw.write(target)
                hw.read()

    thread = threading.Thread(target=control_loop)
    thread.start()
    try:
        reached = testing.wait_for(
            lambda: hw.last_state is not None and np.allclose(hw.last_state.positions, target, atol=2e-5),
            30, 'the simulated axes to reach the target')
        assert reached
    finally:
        stop.set()
        thread.join(10)
    assert hw.stats['errors'] == 0
    hw.close()
