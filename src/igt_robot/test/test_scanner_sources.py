"""Scanner-state sources (pure logic): IGTL texts, modem trigger, simulated schedule, staleness."""
import math
import types

import pytest

from igt_robot.scanner import (ModemTriggerInterpreter, ScanEvent, ScannerPhase, SimulatedScannerSchedule,
                               StalenessGuard, is_imaging, parse_phase, phase_from_igtl_status,
                               phase_from_igtl_text)


def test_only_idle_is_not_imaging():
    assert not is_imaging(ScannerPhase.IDLE)
    for p in (ScannerPhase.PREPARING, ScannerPhase.ACQUIRING, ScannerPhase.UNKNOWN):
        assert is_imaging(p)
    assert parse_phase(' acquiring ') is ScannerPhase.ACQUIRING
    with pytest.raises(ValueError, match='unknown scanner phase'):
        parse_phase('SCANNING')


@pytest.mark.parametrize('text,phase,protocol', [
    ('START_SEQUENCE', ScannerPhase.ACQUIRING, ''),
    ('start_sequence', ScannerPhase.ACQUIRING, ''),
    ('  Start_Sequence:control scan ', ScannerPhase.ACQUIRING, 'control scan'),
    ('START_SEQUENCE t2_tse_tra', ScannerPhase.ACQUIRING, 't2_tse_tra'),
    ('STOP_SEQUENCE', ScannerPhase.IDLE, ''),
    ('stop_sequence\n', ScannerPhase.IDLE, ''),
    ('PREPARE', ScannerPhase.PREPARING, ''),
    ('prepare = planning', ScannerPhase.PREPARING, 'planning'),
    ('HELLO', ScannerPhase.UNKNOWN, ''),
    ('', ScannerPhase.UNKNOWN, ''),
    (None, ScannerPhase.UNKNOWN, ''),
    ('STOP_SEQUENCEX', ScannerPhase.UNKNOWN, ''),
    ('123', ScannerPhase.UNKNOWN, ''),
])
def test_igtl_text_mapping(text, phase, protocol):
    decoded = phase_from_igtl_text(text)
    assert decoded.phase is phase
    assert decoded.protocol == protocol


def test_igtl_status_mapping():
    assert phase_from_igtl_status(1, 'START_SEQUENCE', '').phase is ScannerPhase.ACQUIRING
    assert phase_from_igtl_status(1, '', 'stop_sequence').phase is ScannerPhase.IDLE
    # status string wins over error name
    d = phase_from_igtl_status(1, 'STOP_SEQUENCE', 'PREPARE:localizer')
    assert d.phase is ScannerPhase.PREPARING and d.protocol == 'localizer'
    # a non-OK status code is never trusted, whatever the text
    assert phase_from_igtl_status(2, 'STOP_SEQUENCE', 'STOP_SEQUENCE').phase is ScannerPhase.UNKNOWN
    assert phase_from_igtl_status(1, 'garbage', 'more garbage').phase is ScannerPhase.UNKNOWN


def test_modem_trigger_line_and_polarity():
    active_high = ModemTriggerInterpreter(line='dsr', active_high=True, release_debounce_s=0.0)
    assert active_high.update({'CTS': False, 'DSR': True}, 0.0) is ScannerPhase.ACQUIRING
    assert active_high.update({'CTS': True, 'DSR': False}, 0.1) is ScannerPhase.IDLE
    active_low = ModemTriggerInterpreter(line='RI', active_high=False, release_debounce_s=0.0)
    port = types.SimpleNamespace(cts=False, dsr=False, cd=False, ri=False)   # pyserial-style object
    assert active_low.update(port, 0.0) is ScannerPhase.ACQUIRING
    port.ri = True
    assert active_low.update(port, 0.1) is ScannerPhase.IDLE
    with pytest.raises(ValueError, match='not one of CTS, DSR, CD, RI'):
        ModemTriggerInterpreter(line='DTR')
    with pytest.raises(KeyError, match='no CD line'):
        ModemTriggerInterpreter(line='CD').update({'CTS': True}, 0.0)


def test_modem_trigger_debounce_is_fail_safe():
    trig = ModemTriggerInterpreter(line='CTS', active_high=True, assert_debounce_s=0.0, release_debounce_s=0.05)
    assert trig.phase is ScannerPhase.UNKNOWN                       # before any reading
    # First reading idle: not trusted until stable for the release debounce.
    assert trig.update({'CTS': False}, 0.00) is ScannerPhase.ACQUIRING
    assert trig.update({'CTS': False}, 0.04) is ScannerPhase.ACQUIRING
    assert trig.update({'CTS': False}, 0.05) is ScannerPhase.IDLE
    # Assertion takes effect immediately.
    assert trig.update({'CTS': True}, 1.000) is ScannerPhase.ACQUIRING
    # A release glitch shorter than the debounce does not release.
    assert trig.update({'CTS': False}, 1.010) is ScannerPhase.ACQUIRING
    assert trig.update({'CTS': True}, 1.020) is ScannerPhase.ACQUIRING
    assert trig.update({'CTS': False}, 1.030) is ScannerPhase.ACQUIRING
    assert trig.update({'CTS': False}, 1.070) is ScannerPhase.ACQUIRING   # 40 ms stable: not yet
    assert trig.update({'CTS': False}, 1.080) is ScannerPhase.IDLE        # 50 ms stable
    # A read error makes the state unknown until the next good reading.
    assert trig.report_read_error() is ScannerPhase.UNKNOWN
    assert trig.update({'CTS': False}, 1.2) is ScannerPhase.IDLE


def test_modem_trigger_assert_debounce_filters_glitches_when_configured():
    trig = ModemTriggerInterpreter(line='CD', assert_debounce_s=0.02, release_debounce_s=0.0)
    assert trig.update({'cd': False}, 0.0) is ScannerPhase.IDLE
    assert trig.update({'cd': True}, 0.10) is ScannerPhase.IDLE
    assert trig.update({'cd': True}, 0.119) is ScannerPhase.IDLE
    assert trig.update({'cd': True}, 0.120) is ScannerPhase.ACQUIRING


def schedule():
    return SimulatedScannerSchedule([
        ScanEvent(start=30.0, duration=5.0, protocol='control scan', is_ct=True,
                  ctdi_vol_mgy=12.0, dlp_mgy_cm=240.0, kv=120, mas=100, prepare_s=2.0),
        ScanEvent(start=10.0, duration=4.0, protocol='t2 localizer', prepare_s=1.0),
    ])


def test_simulated_schedule_phase_at_time():
    s = schedule()
    assert [e.protocol for e in s.events] == ['t2 localizer', 'control scan']   # sorted
    assert s.state_at(0.0).phase is ScannerPhase.IDLE
    assert s.state_at(0.0).time_to_next_s == pytest.approx(9.0)
    assert s.state_at(8.999).phase is ScannerPhase.IDLE
    assert s.state_at(9.0).phase is ScannerPhase.PREPARING
    st = s.state_at(10.0)
    assert st.phase is ScannerPhase.ACQUIRING and st.protocol == 't2 localizer' and not st.is_ct
    assert s.state_at(13.999).phase is ScannerPhase.ACQUIRING
    assert s.state_at(14.0).phase is ScannerPhase.IDLE                          # end is exclusive
    assert s.state_at(28.5).phase is ScannerPhase.PREPARING
    ct = s.state_at(31.0)
    assert ct.phase is ScannerPhase.ACQUIRING and ct.is_ct
    assert (ct.ctdi_vol_mgy, ct.dlp_mgy_cm, ct.kv, ct.mas) == (12.0, 240.0, 120, 100)
    assert ct.event_index == 1
    assert s.state_at(100.0).phase is ScannerPhase.IDLE
    assert math.isinf(s.state_at(100.0).time_to_next_s)
    assert s.cumulative_dlp_mgy_cm(29.0) == 0.0
    assert s.cumulative_dlp_mgy_cm(32.5) == pytest.approx(120.0)
    assert s.cumulative_dlp_mgy_cm(100.0) == pytest.approx(240.0)
    assert s.next_event_after(15.0).protocol == 'control scan'


def test_simulated_schedule_validation():
    with pytest.raises(ValueError, match='overlap'):
        SimulatedScannerSchedule([ScanEvent(0, 5), ScanEvent(6, 1, prepare_s=2)])
    with pytest.raises(ValueError, match='duration'):
        ScanEvent(0, 0)
    with pytest.raises(ValueError, match='non-CT'):
        ScanEvent(0, 1, is_ct=False, ctdi_vol_mgy=3.0)
    with pytest.raises(ValueError, match='finite'):
        ScanEvent(float('nan'), 1)
    with pytest.raises(ValueError, match='unknown ScanEvent keys'):
        ScanEvent.from_dict({'start': 0, 'duration': 1, 'dose': 3})
    s = SimulatedScannerSchedule([{'start': 1, 'duration': 2, 'protocol': 'p'}])
    assert s.state_at(2.0).protocol == 'p'


def test_staleness_rule():
    g = StalenessGuard(timeout=0.5)
    assert g.phase(0.0) is ScannerPhase.UNKNOWN                     # nothing yet
    g.update('IDLE', 1.0)
    assert g.phase(1.5) is ScannerPhase.IDLE                        # exactly at the timeout: fresh
    assert g.phase(1.5001) is ScannerPhase.UNKNOWN                  # stale
    assert g.last_phase is ScannerPhase.IDLE
    g.update(ScannerPhase.ACQUIRING, 2.0)
    assert g.phase(2.1) is ScannerPhase.ACQUIRING
    assert g.age(2.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        StalenessGuard(0.0)
