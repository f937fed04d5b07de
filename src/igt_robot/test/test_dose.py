"""Dose accounting (CT figures, totals, effective-dose estimate) and the MCAP log."""
import math

import pytest

from igt_robot.record import dose
from igt_robot.record.dose import DoseLedger, DoseValueError, ct_scan, mr_scan

CT = dict(ctdi_vol_mgy=12.0, dlp_mgy_cm=130.0, kv=120, mas=200, scan_length_m=0.10)


def test_totals_and_effective_dose_estimate():
    ledger = DoseLedger()
    t1 = ledger.add_ct('planning', **CT, body_region='abdomen', protocol_name='planning CT')
    assert t1.ct_scan_count == 1 and t1.total_dlp_mgy_cm == pytest.approx(130.0)
    ledger.add_mr('mr1', protocol_name='bSSFP')
    ledger.add_ct('ctrl1', ctdi_vol_mgy=4.0, dlp_mgy_cm=22.0, kv=100, mas=50, scan_length_m=0.05,
                  body_region='chest')
    totals = ledger.totals()
    assert totals.ct_scan_count == 2
    assert totals.mr_scan_count == 1
    assert totals.scan_count == 3
    assert totals.total_dlp_mgy_cm == pytest.approx(152.0)
    assert totals.max_ctdi_vol_mgy == pytest.approx(12.0)
    # E = sum k(region) * DLP with abdomen 0.015 and chest 0.014 mSv/(mGy cm)
    assert totals.effective_dose_msv == pytest.approx(130.0 * 0.015 + 22.0 * 0.014)
    assert totals.per_region_dlp_mgy_cm == {'abdomen': pytest.approx(130.0), 'chest': pytest.approx(22.0)}


def test_mr_scans_count_but_carry_no_dose():
    ledger = DoseLedger()
    for i in range(3):
        ledger.add_mr(f'mr{i}')
    t = ledger.totals()
    assert (t.scan_count, t.ct_scan_count, t.mr_scan_count) == (3, 0, 3)
    assert t.total_dlp_mgy_cm == 0.0 and t.effective_dose_msv == 0.0
    assert not mr_scan('x').is_ionising


def test_dose_record_fields_count_up_to_the_scan():
    ledger = DoseLedger()
    ledger.add_ct('a', **CT)
    ledger.add_mr('m')
    ledger.add_ct('b', **dict(CT, dlp_mgy_cm=120.0))
    scans = ledger.scans
    first = ledger.dose_record_fields(scans[0])
    last = ledger.dose_record_fields(scans[2])
    assert first['scan_count'] == 1 and first['total_dlp_mgy_cm'] == pytest.approx(130.0)
    assert last['scan_count'] == 2 and last['total_dlp_mgy_cm'] == pytest.approx(250.0)
    assert set(last) == {'scan_id', 'protocol_name', 'ctdi_vol_mgy', 'dlp_mgy_cm', 'kv', 'mas', 'scan_count',
                         'total_dlp_mgy_cm', 'source', 'series_instance_uid'}


@pytest.mark.parametrize('field,value,match', [
    ('ctdi_vol_mgy', -1.0, 'ctdi_vol_mgy must be >= 0'),
    ('ctdi_vol_mgy', float('nan'), 'ctdi_vol_mgy must be finite'),
    ('dlp_mgy_cm', float('inf'), 'dlp_mgy_cm must be finite'),
    ('dlp_mgy_cm', -5.0, 'dlp_mgy_cm must be >= 0'),
    ('kv', 12000.0, 'kv = 12000 is implausibly large'),
    ('kv', 10.0, 'kv must be >= 40'),
    ('mas', 0.0, 'mas must be > 0'),
    ('scan_length_m', 0.0, 'scan_length_m must be > 0'),
    ('scan_length_m', 10.0, 'scan_length_m = 10 is implausibly large'),
    ('ctdi_vol_mgy', 'abc', 'ctdi_vol_mgy must be a number'),
    ('ctdi_vol_mgy', None, 'ctdi_vol_mgy must be a number'),
])
def test_invalid_ct_figures_are_refused_with_the_field_named(field, value, match):
    args = dict(CT)
    args[field] = value
    with pytest.raises(DoseValueError, match=match):
        ct_scan('s1', **args)


def test_unknown_region_and_empty_id_are_refused():
    with pytest.raises(DoseValueError, match="unknown body region 'knee'"):
        ct_scan('s', **CT, body_region='knee')
    with pytest.raises(DoseValueError, match='scan_id'):
        ct_scan('  ', **CT)


def test_duplicate_scan_is_not_counted_twice():
    ledger = DoseLedger()
    ledger.add_ct('s1', **CT)
    with pytest.raises(DoseValueError, match='already in the ledger'):
        ledger.add_ct('s1', **CT)
    assert ledger.totals().ct_scan_count == 1


def test_inconsistent_dlp_is_flagged_not_refused():
    ok = ct_scan('ok', **CT)  # 12 mGy * 10 cm = 120 -> 130 is plausible over-ranging
    assert ok.warnings == ()
    odd = ct_scan('odd', **dict(CT, dlp_mgy_cm=1300.0))
    assert len(odd.warnings) == 1 and 'DLP' in odd.warnings[0]


def test_round_trip_through_record_payload():
    scans = [ct_scan('a', **CT, stamp=1.0), mr_scan('b', stamp=2.0)]
    rebuilt = DoseLedger.from_payloads(s.to_dict() for s in scans)
    assert rebuilt.scans == scans
    with pytest.raises(DoseValueError, match='lacks'):
        dose.scan_from_dict({'scan_id': 'x', 'modality': 'CT', 'kv': 120})
    with pytest.raises(DoseValueError, match='modality'):
        dose.scan_from_dict({'scan_id': 'x', 'modality': 'PET'})


def test_k_factor_table_is_documented_values():
    assert dose.k_factor('abdomen') == pytest.approx(0.015)
    assert dose.k_factor('Chest') == pytest.approx(0.014)
    assert dose.k_factor('head') == pytest.approx(0.0021)
    assert all(0 < k < 0.1 and math.isfinite(k) for k in dose.K_FACTORS_MSV_PER_MGY_CM.values())


# ---------------------------------------------------------------------------- MCAP

mcap_reader = pytest.importorskip('mcap_ros2.reader', reason='mcap_ros2 not installed')
from igt_robot.record.mcap_log import McapLog, McapLogError, MessageDefinitions  # noqa: E402


def _stamp(ns):
    return {'sec': ns // 1_000_000_000, 'nanosec': ns % 1_000_000_000}


def test_schema_text_has_dependencies_in_ros2_format():
    defs = MessageDefinitions()
    text = defs.schema_text('igt_robot_msgs/msg/ProcedureEvent')
    assert text.startswith('# One event of the procedure record')
    assert '\n' + '=' * 80 + '\nMSG: std_msgs/Header\n' in text
    assert 'MSG: builtin_interfaces/Time\n' in text
    assert 'MSG: diagnostic_msgs/KeyValue\n' in text
    assert defs.dependencies('igt_robot_msgs/msg/SafetyStatus') == [
        'std_msgs/Header', 'builtin_interfaces/Time', 'igt_robot_msgs/SafetyFault']


def test_mcap_round_trip(tmp_path):
    path = tmp_path / 'procedure.mcap'
    t0 = 1_700_000_000_000_000_000
    event = {'header': {'stamp': _stamp(t0), 'frame_id': ''}, 'phase': 'PLANNING', 'severity': 1,
             'source': 'procedure_node', 'kind': 'plan_confirmed', 'description': 'plan p1 confirmed',
             'values': [{'key': 'depth_m', 'value': '0.085'}, {'key': 'operator', 'value': 'dr_a'}]}
    dose_msg = {'header': {'stamp': _stamp(t0 + 5), 'frame_id': ''}, 'scan_id': 'ctrl1',
                'protocol_name': 'control scan', 'ctdi_vol_mgy': 4.5, 'dlp_mgy_cm': 22.5, 'kv': 100.0,
                'mas': 50.0, 'scan_count': 2, 'total_dlp_mgy_cm': 152.5}
    joints = {'header': {'stamp': _stamp(t0 + 7), 'frame_id': 'base_link'},
              'name': ['stage_x', 'stage_y', 'guide_pitch', 'guide_yaw', 'needle_insertion'],
              'position': [0.01, -0.02, 0.1, -0.05, 0.03], 'velocity': [0.0] * 5, 'effort': []}
    with McapLog(path) as log:
        log.write('/procedure/events', 'igt_robot_msgs/msg/ProcedureEvent', event, t0)
        log.write('/procedure/dose', 'igt_robot_msgs/msg/DoseRecord', dose_msg, t0 + 5)
        log.write('/joint_states', 'sensor_msgs/msg/JointState', joints, t0 + 7)
        log.write('/joint_states', 'sensor_msgs/msg/JointState', dict(joints, position=[0.0] * 5), t0 + 9)
        assert log.message_count == 4

    got = list(mcap_reader.read_ros2_messages(str(path)))
    assert [m.channel.topic for m in got] == ['/procedure/events', '/procedure/dose', '/joint_states',
                                              '/joint_states']
    assert [m.log_time_ns for m in got] == [t0, t0 + 5, t0 + 7, t0 + 9]
    assert got[0].schema.name == 'igt_robot_msgs/msg/ProcedureEvent'
    assert got[0].schema.encoding == 'ros2msg' and got[0].channel.message_encoding == 'cdr'
    ev = got[0].ros_msg
    assert (ev.phase, ev.severity, ev.kind, ev.description) == ('PLANNING', 1, 'plan_confirmed', 'plan p1 confirmed')
    assert [(kv.key, kv.value) for kv in ev.values] == [('depth_m', '0.085'), ('operator', 'dr_a')]
    assert (ev.header.stamp.sec, ev.header.stamp.nanosec) == (t0 // 10**9, 0)
    d = got[1].ros_msg
    for key in ('scan_id', 'protocol_name', 'ctdi_vol_mgy', 'dlp_mgy_cm', 'kv', 'mas', 'scan_count',
                'total_dlp_mgy_cm'):
        assert getattr(d, key) == dose_msg[key], key
    js = got[2].ros_msg
    assert list(js.name) == joints['name']
    assert list(js.position) == pytest.approx(joints['position'])
    assert js.header.frame_id == 'base_link'
    assert list(got[3].ros_msg.position) == [0.0] * 5


def test_mcap_refuses_typos_bad_topics_and_type_changes(tmp_path):
    with McapLog(tmp_path / 'x.mcap') as log:
        with pytest.raises(McapLogError, match="unknown field 'ctdi'"):
            log.write('/procedure/dose', 'igt_robot_msgs/msg/DoseRecord', {'ctdi': 1.0}, 0)
        with pytest.raises(McapLogError, match="header.stamp: unknown field 'secs'"):
            log.write('/procedure/dose', 'igt_robot_msgs/msg/DoseRecord', {'header': {'stamp': {'secs': 1}}}, 0)
        with pytest.raises(McapLogError, match='absolute ROS name'):
            log.write('procedure', 'igt_robot_msgs/msg/DoseRecord', {}, 0)
        with pytest.raises(McapLogError, match='log_time_ns'):
            log.write('/a', 'igt_robot_msgs/msg/DoseRecord', {}, 1.5)
        with pytest.raises(McapLogError, match='no igt_robot_msgs/msg/Nope.msg'):
            log.write('/a', 'igt_robot_msgs/msg/Nope', {}, 0)
        log.write('/a', 'igt_robot_msgs/msg/DoseRecord', {'scan_id': 's'}, 0)
        with pytest.raises(McapLogError, match='already carries'):
            log.write('/a', 'sensor_msgs/msg/JointState', {}, 1)
        with pytest.raises(McapLogError, match='cannot encode'):
            log.write('/b', 'igt_robot_msgs/msg/DoseRecord', {'kv': 'high'}, 2)
