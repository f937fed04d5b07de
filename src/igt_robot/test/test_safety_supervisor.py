"""Safety supervisor state machine: every stop cause, latching, explicit resume, reasons, events."""
import math

import numpy as np
import pytest

from igt_robot.safety import (EventKind, FaultCode, SafetyConfig, SafetyConfigError, SafetyState,
                              SafetySupervisor)

NAMES = ('stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion')
LOWER = [-0.04, -0.04, -0.5236, -0.5236, 0.0]
UPPER = [0.04, 0.04, 0.5236, 0.5236, 0.150]
HOME = np.zeros(5)


def needle_tip(q):
    """Needle tip in base_link per docs/contracts.md (test-local; the node passes the kinematics)."""
    x, y, pitch, yaw, ins = q
    d = np.array([-math.sin(yaw), math.cos(yaw) * math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    return np.array([x, y, 0.0]) + ins * d


def make(auto_resume=False, **overrides):
    cfg = dict(heartbeat_timeouts={'motion_controller': 0.3, 'hardware_node': 0.5},
               scanner_timeout=1.5, auto_resume_after_scan=auto_resume,
               joint_names=NAMES, joint_lower=LOWER, joint_upper=UPPER, joint_limit_tolerance=1e-3,
               joint_units=('m', 'm', 'rad', 'rad', 'm'),
               workspace_lower=[-0.05, -0.05, -0.13], workspace_upper=[0.05, 0.05, 0.001],
               max_insertion_depth=0.12)
    cfg.update(overrides)
    return SafetySupervisor(SafetyConfig(**cfg), needle_tip_fn=needle_tip)


class Feed:
    """Keeps every periodic input alive up to a time, like the node would."""

    def __init__(self, sup):
        self.sup = sup
        self.seq = 0
        self.phase = 'IDLE'
        self.protocol = ''

    def inputs(self, now, q=HOME, scanner=True):
        evs = []
        evs += self.sup.heartbeat('motion_controller', now)
        evs += self.sup.heartbeat('hardware_node', now)
        if scanner:
            self.seq += 1
            evs += self.sup.update_scanner(self.phase, now, self.seq, now, protocol=self.protocol)
        evs += self.sup.set_estop(False, now)
        evs += self.sup.check_limits(q, now)
        evs += self.sup.tick(now)
        return evs


def ready(auto_resume=False, **kw):
    sup = make(auto_resume, **kw)
    feed = Feed(sup)
    feed.inputs(0.0)
    assert sup.state is SafetyState.HOLD
    assert sup.resume(0.01).accepted
    assert sup.state is SafetyState.READY and sup.motion_permitted
    return sup, feed


def transitions(events):
    return [(e.from_state, e.to_state) for e in events if e.kind is EventKind.TRANSITION]


def test_init_waits_for_every_required_input_then_holds_for_resume():
    sup = make()
    assert sup.state is SafetyState.INIT and not sup.motion_permitted
    reason = sup.status().reason
    for item in ('heartbeat motion_controller', 'heartbeat hardware_node', 'scanner state',
                 'e-stop state', 'joint states'):
        assert item in reason
    sup.heartbeat('motion_controller', 0.0)
    sup.heartbeat('hardware_node', 0.0)
    sup.update_scanner('IDLE', 0.0, 1, 0.0)
    sup.set_estop(False, 0.0)
    assert sup.state is SafetyState.INIT and sup.status().reason.endswith('joint states')
    assert not sup.resume(0.0).accepted                        # no resume out of INIT
    events = sup.check_limits(HOME, 0.05)
    assert transitions(events) == [(SafetyState.INIT, SafetyState.HOLD)]   # never straight to READY
    assert events[-1].stamp == 0.05
    assert sup.status().awaiting_resume
    result = sup.resume(0.1)
    assert result.accepted
    assert transitions(result.events) == [(SafetyState.HOLD, SafetyState.READY)]
    assert sup.status().motion_permitted and sup.status().reason == 'Motion permitted'


@pytest.mark.parametrize('phase', ['PREPARING', 'ACQUIRING', 'UNKNOWN'])
def test_imaging_phases_hold_motion_and_need_explicit_resume(phase):
    sup, feed = ready()
    feed.phase, feed.protocol = phase, 'control scan'
    events = feed.inputs(1.0)
    assert transitions(events) == [(SafetyState.READY, SafetyState.SCAN_HOLD)]
    st = sup.status()
    assert st.state is SafetyState.SCAN_HOLD and not st.motion_permitted and not st.latched
    assert st.reason == f"Motion halted: scanner {phase} (protocol 'control scan')"
    refused = sup.resume(1.1)
    assert not refused.accepted and 'SCAN_HOLD' in refused.message and phase in refused.message
    feed.phase, feed.protocol = 'IDLE', ''
    feed.inputs(2.0)
    assert sup.state is SafetyState.HOLD                       # scan over, but no implicit resume
    assert 'after scan' in sup.status().reason
    assert sup.resume(2.1).accepted and sup.state is SafetyState.READY


def test_auto_resume_policy_resumes_only_a_scan_only_hold():
    sup, feed = ready(auto_resume=True)
    feed.phase = 'ACQUIRING'
    feed.inputs(1.0)
    assert sup.state is SafetyState.SCAN_HOLD
    feed.phase = 'IDLE'
    events = feed.inputs(2.0)
    assert transitions(events) == [(SafetyState.SCAN_HOLD, SafetyState.READY)]
    assert 'auto-resume' in [e for e in events if e.kind is EventKind.TRANSITION][0].cause
    # A hold that was pending before the scan still needs the operator.
    sup.request_hold('check needle', 3.0)
    assert sup.state is SafetyState.HOLD
    feed.phase = 'ACQUIRING'
    feed.inputs(4.0)
    feed.phase = 'IDLE'
    feed.inputs(5.0)
    assert sup.state is SafetyState.HOLD


def test_scanner_silence_latches_fault_until_link_back_and_acknowledged():
    sup, feed = ready()
    # Everything else alive, scanner silent.
    for t in np.arange(0.1, 1.5, 0.1):
        feed.inputs(t, scanner=False)
    assert sup.state is SafetyState.READY                      # 1.4 s of silence < 1.5 s timeout
    feed.inputs(1.6, scanner=False)
    assert sup.state is SafetyState.READY                      # first tick past the timeout: suspected
    events = feed.inputs(1.62, scanner=False)                  # the next tick confirms it
    assert sup.state is SafetyState.FAULT
    assert any(e.kind is EventKind.FAULT_RAISED and e.code == 'SCANNER_SILENT' for e in events)
    st = sup.status()
    assert st.scanner_phase == 'UNKNOWN' and st.latched
    assert st.reason.startswith('Fault SCANNER_SILENT: no scanner state for 1.6')
    assert not sup.acknowledge(1.7).accepted                   # cause still present
    feed.inputs(1.8)                                           # scanner back, IDLE
    assert sup.state is SafetyState.FAULT                      # still latched
    assert sup.acknowledge(1.9).accepted
    assert sup.state is SafetyState.HOLD
    assert sup.resume(2.0).accepted


def test_messages_queued_during_a_stall_are_judged_before_silence_is_declared():
    # A stalled host runs the due tick before the messages that queued meanwhile: the first tick past a
    # timeout only suspects; what arrives before the next tick clears it; a second tick confirms.
    sup, feed = ready()
    sup.tick(2.0)                                              # 2 s stall: every input past its timeout
    assert sup.state is SafetyState.READY and sup.motion_permitted
    feed.inputs(2.01)                                          # the queued messages, then the next tick
    assert sup.state is SafetyState.READY and not sup.status().faults
    sup.tick(4.0)
    events = sup.tick(4.02)                                    # nothing arrived between two ticks: silent
    assert sup.state is SafetyState.FAULT
    codes = {e.code for e in events if e.kind is EventKind.FAULT_RAISED}
    assert codes == {'SCANNER_SILENT', 'HEARTBEAT_LOST'}


def test_repeated_scanner_heartbeat_does_not_count_as_alive():
    sup, feed = ready()
    for t in np.arange(0.1, 2.0, 0.1):
        feed.inputs(t, scanner=False)
        sup.update_scanner('IDLE', t, 7, t)                    # same counter every time: stuck publisher
    assert sup.state is SafetyState.FAULT
    assert sup.status().faults[0].code == 'SCANNER_SILENT'


def test_stale_scanner_stamp_holds_without_fault():
    sup, feed = ready()
    feed.inputs(0.5)
    for t in (1.0, 1.6, 2.5):
        sup.update_scanner('IDLE', 0.5, t, t)                  # live link, but an old stamped state
    assert sup.state is SafetyState.SCAN_HOLD
    assert not sup.status().faults
    assert 'stale' in sup.status().reason


def test_heartbeat_loss_faults_with_operator_readable_reason():
    sup, feed = ready()
    sup.heartbeat('motion_controller', 0.01)
    sup.heartbeat('hardware_node', 0.3)
    sup.update_scanner('IDLE', 0.3, 99, 0.3)
    sup.tick(0.305)
    assert sup.state is SafetyState.READY                      # 0.295 s < 0.3 s
    sup.tick(0.36)
    assert sup.state is SafetyState.READY                      # suspected at the first tick past it
    events = sup.tick(0.38)
    assert sup.state is SafetyState.FAULT
    assert sup.status().reason.startswith('Fault HEARTBEAT_LOST: motion_controller silent for 0.37 s')
    tr = [e for e in events if e.kind is EventKind.TRANSITION][0]
    assert (tr.from_state, tr.to_state, tr.stamp) == (SafetyState.READY, SafetyState.FAULT, 0.38)
    fault = sup.status().faults[0]
    assert (fault.code, fault.source, fault.since, fault.condition_active) == \
        ('HEARTBEAT_LOST', 'motion_controller', 0.38, True)
    ack = sup.acknowledge(0.4)
    assert not ack.accepted and 'cause still present' in ack.message
    sup.heartbeat('motion_controller', 0.45)
    assert sup.state is SafetyState.FAULT                      # the heartbeat returning does not unlatch
    assert sup.acknowledge(0.5).accepted
    assert sup.state is SafetyState.HOLD
    assert sup.resume(0.5).accepted and sup.state is SafetyState.READY


def test_estop_latches_until_released_and_reset():
    sup, feed = ready()
    events = sup.set_estop(True, 1.0)
    assert transitions(events) == [(SafetyState.READY, SafetyState.ESTOP)]
    assert sup.status().reason == 'Motion halted: emergency stop pressed'
    refused = sup.reset(1.1)
    assert not refused.accepted and 'release it first' in refused.message
    sup.set_estop(False, 1.2)
    assert sup.state is SafetyState.ESTOP                      # released but not reset
    assert 'reset required' in sup.status().reason
    assert not sup.resume(1.3).accepted
    sup.acknowledge(1.3)
    assert sup.state is SafetyState.ESTOP                      # acknowledge is not reset
    ok = sup.reset(1.4)
    assert ok.accepted and transitions(ok.events) == [(SafetyState.ESTOP, SafetyState.HOLD)]
    assert sup.resume(1.5).accepted and sup.state is SafetyState.READY


def test_estop_outranks_faults_and_reset_also_acknowledges():
    sup, feed = ready()
    sup.report_fault(FaultCode.TRACKING_ERROR, 'stage_x off by 2 mm', 1.0)
    sup.set_estop(True, 1.1)
    assert sup.state is SafetyState.ESTOP
    sup.set_estop(False, 1.2)
    res = sup.reset(1.3)
    assert res.accepted and 'TRACKING_ERROR' in res.message
    assert sup.state is SafetyState.HOLD and not sup.status().faults


def test_joint_limit_with_tolerance():
    sup, feed = ready()
    inside_tol = np.array([0.0405, 0, 0, 0, 0])                # 0.5 mm beyond, tolerance 1 mm
    feed.inputs(0.1, q=inside_tol)
    assert sup.state is SafetyState.READY
    beyond = np.array([0.0412, 0, 0, 0, 0])
    feed.inputs(0.2, q=beyond)
    assert sup.state is SafetyState.FAULT
    assert sup.status().reason.startswith('Fault JOINT_LIMIT: stage_x = 0.0412 m beyond upper limit 0.0400 m')
    assert not sup.acknowledge(0.3).accepted
    feed.inputs(0.4, q=HOME)
    assert sup.acknowledge(0.5).accepted and sup.state is SafetyState.HOLD
    feed.inputs(0.6, q=np.array([0, 0, -0.53, 0, 0]))
    assert 'guide_pitch' in sup.status().reason and 'lower limit' in sup.status().reason


def test_workspace_box_and_insertion_depth():
    sup, feed = ready()
    # Insertion 0.125 m: inside the joint limit (0.150) but deeper than the allowed 0.12 m.
    feed.inputs(0.1, q=np.array([0, 0, 0, 0, 0.125]))
    codes = {f.code for f in sup.status().faults}
    assert 'INSERTION_LIMIT' in codes and 'JOINT_LIMIT' not in codes
    feed.inputs(0.2, q=HOME)
    sup.acknowledge(0.3)
    sup.resume(0.3)
    assert sup.state is SafetyState.READY
    # Angled needle: tip z = -0.1*cos(0.5) ... inside z, but x = -0.1*sin(0.5) = -0.048 plus stage -0.03.
    feed.inputs(0.4, q=np.array([-0.03, 0, 0, 0.5, 0.1]))
    faults = sup.status().faults
    assert [f.code for f in faults] == ['WORKSPACE_LIMIT']
    assert 'along x' in faults[0].detail and 'base_link' in faults[0].detail
    feed.inputs(0.5, q=HOME)
    sup.acknowledge(0.6)
    sup.resume(0.6)
    # A tighter per-procedure depth takes effect at the next check.
    sup.set_max_insertion_depth(0.05, 0.7)
    feed.inputs(0.8, q=np.array([0, 0, 0, 0, 0.06]))
    assert sup.status().faults[0].code == 'INSERTION_LIMIT'
    with pytest.raises(ValueError, match='finite'):
        sup.set_max_insertion_depth(float('nan'), 0.9)


def test_nan_joint_state_is_a_fault():
    sup, feed = ready()
    feed.inputs(0.1, q=np.array([0, float('nan'), 0, 0, 0]))
    assert sup.state is SafetyState.FAULT
    assert 'stage_y' in sup.status().faults[0].detail
    with pytest.raises(ValueError, match='expected 5'):
        sup.check_limits([0, 0, 0], 0.2)


def test_one_shot_and_persistent_faults():
    sup, feed = ready()
    sup.report_fault('tracking_error', 'stage_x error 2.1 mm', 1.0)
    st = sup.status()
    assert st.state is SafetyState.FAULT and st.faults[0].code == 'TRACKING_ERROR'
    assert 'acknowledge to continue' in st.reason
    assert sup.acknowledge(1.1, code='TRACKING_ERROR').accepted
    assert sup.state is SafetyState.HOLD                       # never READY without resume
    sup.resume(1.2)
    feed.inputs(1.9)
    # Controller-latched faults mirror the hardware list.
    sup.sync_hardware_faults(['WATCHDOG'], 2.0)
    assert sup.state is SafetyState.FAULT
    assert not sup.acknowledge(2.1).accepted
    sup.sync_hardware_faults(['WATCHDOG'], 2.2)                # still reported: no duplicate fault
    assert len(sup.status().faults) == 1
    sup.sync_hardware_faults([], 2.3)
    feed.inputs(2.3)
    assert sup.acknowledge(2.4).accepted and sup.state is SafetyState.HOLD


def test_fault_during_scan_then_scan_hold_after_acknowledge():
    sup, feed = ready()
    feed.phase = 'ACQUIRING'
    feed.inputs(1.0)
    sup.report_fault('HARDWARE_FAULT', 'overcurrent stage_y', 1.1)
    assert sup.state is SafetyState.FAULT
    sup.acknowledge(1.2)
    assert sup.state is SafetyState.SCAN_HOLD
    feed.phase = 'IDLE'
    feed.inputs(1.3)
    assert sup.state is SafetyState.HOLD


def test_scan_sequences_never_resume_implicitly():
    """Random scanner phases, stale stamps and silences: after leaving READY, no READY without resume."""
    rng = np.random.default_rng(3)
    for trial in range(30):
        sup, feed = ready()
        t, left_ready = 0.0, False
        for _ in range(100):
            t += float(rng.uniform(0.01, 0.2))
            feed.phase = str(rng.choice(['IDLE', 'IDLE', 'PREPARING', 'ACQUIRING', 'UNKNOWN']))
            if rng.random() < 0.1:
                sup.update_scanner(feed.phase, t - 5.0, rng.integers(1 << 30), t)   # stale stamp
                feed.inputs(t, scanner=False)
            else:
                feed.inputs(t)
            if sup.state is not SafetyState.READY:
                left_ready = True
            assert not (left_ready and sup.state is SafetyState.READY), f'trial {trial}'
        assert left_ready


def test_motion_is_never_resumed_implicitly_random_inputs():
    """Whatever happens, once motion stopped only resume() brings READY back."""
    rng = np.random.default_rng(42)
    for trial in range(30):
        sup, feed = ready()
        t = 1.0
        left_ready = False
        for _ in range(200):
            t += float(rng.uniform(0.01, 0.5))
            r = rng.integers(0, 9)
            if r == 0:
                feed.phase = str(rng.choice(['IDLE', 'PREPARING', 'ACQUIRING', 'UNKNOWN']))
            elif r == 1:
                sup.set_estop(bool(rng.integers(0, 2)), t)
            elif r == 2:
                sup.report_fault('TRACKING_ERROR', 'x', t)
            elif r == 3:
                sup.acknowledge(t)
            elif r == 4:
                sup.reset(t)
            elif r == 5:
                sup.tick(t)                                    # may time heartbeats out
                continue
            elif r == 6:
                sup.request_hold('pause', t)
            q = HOME if rng.random() < 0.8 else np.array([0.05, 0, 0, 0, 0])
            feed.inputs(t, q=q)
            if sup.state is not SafetyState.READY:
                left_ready = True
            else:
                assert not left_ready, f'trial {trial}: READY again without resume'
        assert left_ready


def test_events_record_every_transition_in_history():
    sup, feed = ready()
    feed.phase = 'ACQUIRING'
    feed.inputs(1.0)
    sup.set_estop(True, 1.1)
    hist = [e for e in sup.history() if e.kind is EventKind.TRANSITION]
    pairs = [(e.from_state, e.to_state) for e in hist]
    assert pairs == [(SafetyState.INIT, SafetyState.HOLD), (SafetyState.HOLD, SafetyState.READY),
                     (SafetyState.READY, SafetyState.SCAN_HOLD), (SafetyState.SCAN_HOLD, SafetyState.ESTOP)]
    assert [e.stamp for e in hist] == [0.0, 0.01, 1.0, 1.1]
    assert all(e.cause for e in hist)
    cmds = [e for e in sup.history() if e.kind is EventKind.COMMAND]
    assert cmds and cmds[0].cause.startswith('accepted: resumed')


def test_time_never_runs_backwards_inside_the_supervisor():
    sup, feed = ready()
    sup.tick(0.5)
    sup.tick(0.5)
    assert sup.state is SafetyState.FAULT                      # heartbeats timed out at 0.5 s (two ticks)
    sup.heartbeat('motion_controller', 0.1)                    # stale caller time clamps to 0.5
    assert sup.status().stamp == 0.5
    with pytest.raises(ValueError, match='finite'):
        sup.tick(float('nan'))


def test_configuration_errors_are_explicit():
    with pytest.raises(SafetyConfigError, match='needle_tip_fn'):
        SafetySupervisor(SafetyConfig(workspace_lower=[-1, -1, -1], workspace_upper=[1, 1, 1]))
    with pytest.raises(SafetyConfigError, match='heartbeat_timeouts\\[node\\]'):
        SafetyConfig(heartbeat_timeouts={'node': 0})
    with pytest.raises(SafetyConfigError, match='scanner_timeout'):
        SafetyConfig(scanner_timeout=float('inf'))
    with pytest.raises(SafetyConfigError, match='unknown safety config keys'):
        SafetyConfig.from_dict({'scanner_timout': 1.0})
    with pytest.raises(SafetyConfigError, match='insertion_joint'):
        SafetyConfig(joint_names=('a',), joint_lower=[0], joint_upper=[1], max_insertion_depth=0.1)
    cfg = SafetyConfig.from_dict({'heartbeat_timeouts': {'a': 0.2}, 'scanner_required': False,
                                  'require_estop_input': False, 'require_joint_state': False})
    sup = SafetySupervisor(cfg)
    with pytest.raises(KeyError, match='unconfigured source'):
        sup.heartbeat('b', 0.0)
    sup.heartbeat('a', 0.0)
    assert sup.state is SafetyState.HOLD                       # only the heartbeat was required
