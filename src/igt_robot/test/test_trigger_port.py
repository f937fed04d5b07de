"""The controller's trigger port (docs/serial_protocol.md §9): a second scanner-trigger input that a lean
host process drives, which cannot move anything, and whose silence reads as imaging."""
import pytest

from igt_robot.hardware import interface
from igt_robot.hardware import protocol as P
from igt_robot.hardware.axis_model import default_axis_configs
from igt_robot.hardware.controller_core import AxisLimits, ControllerCore, Refusal
from igt_robot.hardware.emulator import EmulatorProcess, Firmware
from igt_robot.hardware.port_session import TriggerPortSession
from igt_robot.hardware.serial_driver import CommandRefused, SerialHardware, TriggerLink
from igt_robot.testing import wait_for

AXES = (AxisLimits(-0.04, 0.04, 0.010, 0.02, 1e-6, 'stage_x'),)
MsgType, NakReason = P.MsgType, P.NakReason


def core_with_armed_port(timeout=0.1) -> ControllerCore:
    core = ControllerCore(AXES, watchdog_timeout=timeout)
    core.trigger_port_seen()
    return core


def ticks(core, seconds, host=True):
    for _ in range(int(round(seconds / core.servo_period))):
        if host:
            core.host_seen()
        core.step()


# ------------------------------------------------------------------ the core
def test_the_trigger_is_the_or_of_the_wired_input_and_the_port_and_the_host_releases_only_when_both_fell():
    core = ControllerCore(AXES)
    core.set_trigger(True, source='PORT')
    assert core.trigger and core.trigger_latch and core.trigger_edges == 1
    core.set_trigger(True, source='WIRED')
    assert core.trigger_edges == 1                       # still one imaging period, not a new edge
    core.set_trigger(False, source='PORT')
    assert core.trigger                                  # the cable still says imaging
    with pytest.raises(Refusal) as refused:
        core.set_inhibit(False)
    assert refused.value.reason == 'TRIGGER_ACTIVE'
    core.set_trigger(False, source='WIRED')
    assert not core.trigger and core.inhibited           # latched: nothing resumes by itself
    core.set_inhibit(False)
    assert not core.inhibited
    with pytest.raises(ValueError, match='WIRED, PORT'):
        core.set_trigger(True, source='CABLE')


def test_a_port_that_never_spoke_is_not_armed_and_its_silence_changes_nothing():
    core = ControllerCore(AXES, watchdog_timeout=0.1)
    core.enable()
    ticks(core, 0.5)
    assert not core.trigger and not core.trigger_port_armed and core.trigger_port_timeouts == 0


def test_an_armed_port_that_falls_silent_reads_as_imaging_and_latches_a_fault_the_operator_resets():
    core = core_with_armed_port(timeout=0.1)
    core.enable()
    ticks(core, 0.09)
    assert not core.trigger and not core.faults          # within the timeout
    ticks(core, 0.02)
    assert core.trigger and core.trigger_inputs['PORT'] and core.trigger_port_silent
    assert core.faults == ['TRIGGER_PORT']
    ticks(core, 0.3)
    assert core.trigger_port_timeouts == 1 and core.trigger_edges == 1 and not core.enabled
    core.trigger_port_seen()                             # the relay is back: speaking alone lowers nothing
    assert core.trigger and not core.trigger_port_silent
    core.set_trigger(False, source='PORT')
    assert not core.trigger and core.trigger_latch       # the host still has to release
    assert core.faults == ['TRIGGER_PORT']               # and the operator to acknowledge
    core.reset_faults()
    assert not core.faults and core.trigger_port_armed   # a relay that speaks stays armed
    core.set_inhibit(False)
    core.enable()
    assert not core.inhibited


def test_reset_faults_disarms_a_silent_port_so_the_operator_is_never_stuck_behind_a_dead_relay():
    core = core_with_armed_port(timeout=0.1)
    ticks(core, 0.2)
    assert core.trigger and core.trigger_port_silent and core.faults == ['TRIGGER_PORT']
    core.reset_faults()
    assert not core.trigger and not core.trigger_port_armed and not core.faults
    core.set_inhibit(False)
    ticks(core, 0.5)
    assert not core.inhibited and core.trigger_port_timeouts == 1   # disarmed: silence means nothing now


def test_reset_faults_leaves_a_speaking_port_as_it_is():
    core = core_with_armed_port(timeout=0.1)
    core.set_trigger(True, source='PORT')
    core.reset_faults()
    assert core.trigger and core.trigger_port_armed


# ------------------------------------------------------------------ the two ports' sessions
def firmware() -> Firmware:
    axes, _ = default_axis_configs(None, use_robot_model=False)
    return Firmware(axes, watchdog_ms=100)


def exchange(session, msg_type, seq, payload=b'') -> P.Frame:
    replies = session.receive(P.encode_frame(msg_type, seq, payload))
    assert len(replies) == 1
    return P.FrameDecoder().feed(replies[0])[0]


def nak_reason(frame) -> int:
    assert frame.type == MsgType.NAK, frame
    return P.decode_nak(frame.payload).reason


def hello(session):
    reply = exchange(session, MsgType.HELLO, 0, P.encode_hello(P.PROTOCOL_VERSION))
    assert reply.type == MsgType.HELLO_REPLY


def test_the_trigger_port_takes_the_level_and_nothing_that_moves_the_robot():
    fw = firmware()
    port = fw.trigger_port
    assert isinstance(port, TriggerPortSession)
    assert nak_reason(exchange(port, MsgType.TRIGGER_LEVEL, 1, b'\x01')) == NakReason.HANDSHAKE_REQUIRED
    hello(port)
    assert P.decode_hello_reply(exchange(port, MsgType.HELLO, 0, P.encode_hello(P.PROTOCOL_VERSION)).payload) \
        .n_axes == len(fw.axes)
    seq = 1
    for msg_type, payload in ((MsgType.ENABLE, b''), (MsgType.MOTION_INHIBIT, b'\x00'), (MsgType.RESET_FAULTS, b''),
                              (MsgType.GET_STATUS, b''), (MsgType.STOP, b'')):
        assert nak_reason(exchange(port, msg_type, seq, payload)) == NakReason.WRONG_PORT, msg_type
        seq += 1
    assert not fw.enabled
    assert exchange(port, MsgType.TRIGGER_LEVEL, seq, b'\x01').type == MsgType.ACK
    assert fw.core.trigger_inputs == {'WIRED': False, 'PORT': True} and fw.inhibited
    assert nak_reason(exchange(port, MsgType.TRIGGER_LEVEL, seq + 1, b'\x02')) == NakReason.BAD_VALUE


def test_the_main_port_refuses_the_trigger_level():
    fw = firmware()
    hello(fw)
    assert nak_reason(exchange(fw, MsgType.TRIGGER_LEVEL, 1, b'\x00')) == NakReason.WRONG_PORT


def test_a_replayed_idle_level_cannot_lower_the_trigger():
    fw = firmware()
    port = fw.trigger_port
    hello(port)
    idle = P.encode_frame(MsgType.TRIGGER_LEVEL, 1, b'\x00')
    port.receive(idle)
    exchange(port, MsgType.TRIGGER_LEVEL, 2, b'\x01')
    replies = port.receive(idle)                          # an old "idle" frame played again
    assert nak_reason(P.FrameDecoder().feed(replies[0])[0]) == NakReason.REPLAY
    assert fw.core.trigger


def test_each_port_has_its_own_sequence_and_handshake():
    fw = firmware()
    hello(fw)
    assert exchange(fw, MsgType.HEARTBEAT, 5).type == MsgType.ACK
    assert not fw.trigger_port.handshake_done             # the main port's HELLO does not open the trigger port
    hello(fw.trigger_port)
    assert exchange(fw.trigger_port, MsgType.TRIGGER_LEVEL, 1, b'\x00').type == MsgType.ACK   # seq 1 < 5: own count


# ------------------------------------------------------------------ over the emulator's two ptys
def test_the_relay_stops_the_drive_through_the_trigger_port_and_its_death_keeps_it_stopped():
    # A watchdog long enough that the steps between two of the relay's frames never reach it on a loaded machine.
    with EmulatorProcess('--watchdog-ms', '1000') as emu:
        hw = SerialHardware(emu.pty_path)
        link = TriggerLink(emu.trigger_pty_path)
        try:
            hw.connect()
            link.connect()
            assert link.device_name == hw.device_name and link.watchdog_ms == 1000
            link.set_level(False)
            hw.set_motion_inhibit(False)
            hw.enable()
            assert not hw.read().motion_inhibited
            link.set_level(True)                          # the scan starts
            state = hw.read()
            assert state.motion_inhibited and state.scanner_trigger and state.inhibit_cause
            with pytest.raises(CommandRefused) as refused:
                hw.set_motion_inhibit(False)
            assert refused.value.code == 'TRIGGER_ACTIVE'
            link.set_level(False)                         # the scan ended: the host releases
            hw.set_motion_inhibit(False)
            assert not hw.read().motion_inhibited
            link.close()                                  # the relay dies without a word
            state = wait_for(lambda: (s := hw.read()).motion_inhibited and s, 5.0,
                             'the silent trigger port to read as imaging')
            truth = emu.state()
            assert truth['trigger_port']['silent'] and truth['trigger_port']['timeouts'] == 1
            assert 'TRIGGER_PORT' in wait_for(lambda: hw.read().faults, 5.0, 'the TRIGGER_PORT fault')
            with pytest.raises(CommandRefused):
                hw.set_motion_inhibit(False)
            hw.reset_faults()                             # the operator's acknowledge: the dead relay is disarmed
            hw.set_motion_inhibit(False)
            hw.enable()
            state = hw.read()
            assert not state.motion_inhibited and not state.faults and state.enabled
            spare = TriggerLink(emu.trigger_pty_path)
            spare.connect()
            with pytest.raises(CommandRefused) as wrong:
                spare.transact(MsgType.ENABLE)
            assert wrong.value.code == 'WRONG_PORT'
            spare.close()
        finally:
            link.close()
            hw.close()


# ------------------------------------------------------------------ the MuJoCo backend's simulated controller
def test_the_simulated_controller_offers_the_same_trigger_port(tmp_path):
    """MujocoHardware models the same controller: its trigger port is a pty behind ``trigger_port_link``."""
    from igt_robot.hardware.mujoco_backend import MujocoHardware
    link_path = str(tmp_path / 'trigger_port')
    sim = MujocoHardware(realtime=False, trigger_port_link=link_path)
    sim.connect()
    link = TriggerLink(link_path)
    try:
        link.connect()
        assert link.watchdog_ms == 300 and link.device_name == 'igt-mujoco-controller'
        link.set_level(False)
        sim.set_motion_inhibit(False)
        sim.enable()
        assert not sim.read().motion_inhibited
        link.set_level(True)
        state = sim.read()
        assert state.scanner_trigger and state.motion_inhibited
        with pytest.raises(interface.CommandRefused) as refused:
            sim.set_motion_inhibit(False)
        assert refused.value.code == 'TRIGGER_ACTIVE'
        link.set_level(False)
        sim.set_motion_inhibit(False)
        assert not sim.read().motion_inhibited
        sim.advance(0.5)                               # simulated time passes without a word from the relay
        state = sim.read()
        assert state.motion_inhibited and 'TRIGGER_PORT' in state.faults and sim.core.trigger_port_silent
    finally:
        link.close()
        sim.close()
    assert not (tmp_path / 'trigger_port').exists()    # the link goes with the backend
