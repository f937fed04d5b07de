"""The record is required, one procedure is one record, abnormal ends are recognisable (docs/record.md).

Disk-full tests use a REAL full filesystem: a small tmpfs mounted for the test (needs root / CAP_SYS_ADMIN;
skipped with the reason elsewhere, where test_store_enospc_injected covers the same write path with an
injected OSError(ENOSPC)).
"""
import contextlib
import errno
import os
import subprocess
import uuid

import pytest
from diagnostic_msgs.msg import KeyValue

from igt_robot import testing
from igt_robot.nodes import qos
from igt_robot.nodes.recorder_node import RECORD_FAILED, RecorderNode
from igt_robot.procedure.peer_watch import HeartbeatWatch
from igt_robot.record import ProcedureRecord, read_entries
from igt_robot.record.mcap_log import McapLog, mcap_file_status
from igt_robot.record.recovery import close_all_unfinished
from igt_robot.record.store import (KIND_ABNORMAL_END, KIND_SESSION_START, check_free_space, find_unfinished_records,
                                    session_open)
from igt_robot_msgs.msg import DoseRecord, ProcedureEvent, SafetyFault


@contextlib.contextmanager
def small_tmpfs(path, size='512k'):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip() or "not root"}): the injected-ENOSPC '
                    'test covers the write path')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)


def fill(folder, name='filler'):
    """Fill the filesystem of ``folder`` completely; returns the filler path."""
    filler = folder / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b'\0' * 4096)
    finally:
        os.close(fd)
    return filler


# ------------------------------------------------------------------ store on a full filesystem
def test_store_on_full_tmpfs_raises_enospc_and_stays_valid(tmp_path):
    with small_tmpfs(tmp_path / 'fs') as fs:
        record = ProcedureRecord(fs / 'rec')
        assert record.append('event', {'n': 1}) == 1
        fill(fs)
        with pytest.raises(OSError) as info:
            for i in range(100):
                record.append('event', {'n': i, 'pad': 'x' * 2000})
        assert info.value.errno == errno.ENOSPC
        (fs / 'filler').unlink()
        seq = record.append('event', {'n': 'after'})
        record.close()
        got = read_entries(str(fs / 'rec'))
        assert [e.seq for e in got] == list(range(1, seq + 1))   # no torn line, no gap in the file
        assert check_free_space(fs, 100 * 2**20) is not None
        assert 'MiB free' in check_free_space(fs, 100 * 2**20)


def test_store_enospc_injected(tmp_path, monkeypatch):
    record = ProcedureRecord(tmp_path / 'rec')
    record.append('event', {'n': 1})
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', failing_fsync)
    with pytest.raises(OSError):
        record.append('event', {'n': 2})
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert record.append('event', {'n': 3}) == 2    # the failed entry was removed again
    record.close()


# ------------------------------------------------------------------ abnormal ends
def _killed_record(folder, mcap_path):
    """A record as a killed recorder leaves it: session started, never closed; MCAP flushed, never finished."""
    log = McapLog(mcap_path, chunk_size=1 << 20)
    log.write('/procedure/events', 'igt_robot_msgs/msg/ProcedureEvent',
              {'kind': 'k', 'description': 'd', 'source': 's', 'values': []}, 1_000_000_000)
    log.flush()
    log.write('/procedure/events', 'igt_robot_msgs/msg/ProcedureEvent',
              {'kind': 'lost', 'description': 'not flushed', 'source': 's', 'values': []}, 2_000_000_000)
    log._file.flush()   # what a kill leaves: written bytes, no chunk end, no footer
    with ProcedureRecord(folder) as record:
        record.append(KIND_SESSION_START, {'procedure_id': 'p1', 'mcap': str(mcap_path)})
        record.append('dose', {'scan_id': 's1', 'modality': 'CT', 'dlp_mgy_cm': 120.5})
        record.append('event', {'kind': 'scan_acquired', 'values': {'scan_id': 'scan02_control'}})
        record.append('motion', {'moving': True, 'insertion_depth_m': 0.010})
        record.append('position', {'insertion_depth_m': 0.0205})
    return log


def test_unfinished_record_is_closed_with_a_report(tmp_path):
    root = tmp_path / 'records'
    folder = root / 'p1'
    folder.mkdir(parents=True)
    _killed_record(folder, folder / 'session_000.mcap')
    status = mcap_file_status(folder / 'session_000.mcap')
    assert not status['finalised'] and status['messages'] == 1
    assert session_open(read_entries(str(folder)))
    assert find_unfinished_records(root) == [str(folder)]

    closed = close_all_unfinished(str(root), detected_by='test', flush_period_s=2.0)
    assert len(closed) == 1 and 'error' not in closed[0]
    last = read_entries(str(folder))[-1]
    assert last.kind == KIND_ABNORMAL_END
    assert last.payload['last_insertion_depth_m'] == pytest.approx(0.0205)
    assert last.payload['last_scan'] == 'scan02_control'
    assert last.payload['total_dlp_mgy_cm'] == pytest.approx(120.5)
    html = (folder / 'report.html').read_text()
    assert 'Ended abnormally' in html and '20.5 mm' in html and 'not finalised' in html
    assert find_unfinished_records(root) == []    # closed once, never again


def test_live_record_is_not_closed(tmp_path):
    root = tmp_path / 'records'
    with ProcedureRecord(root / 'live') as record:
        record.append(KIND_SESSION_START, {'procedure_id': 'live'})
        assert find_unfinished_records(root) == []   # its recorder holds the lock: alive


def test_heartbeat_watch():
    watch = HeartbeatWatch(['a', 'b'], timeout=1.0)
    assert watch.tick(0.0) is None                 # never seen: nothing to lose
    watch.beat('a', 0.0)
    watch.beat('b', 0.0)
    assert watch.tick(0.9) is None
    watch.beat('a', 1.0)
    assert watch.tick(1.05) is None                # one node silent: the supervisor's matter, process alive
    assert watch.tick(2.05) is None                # all silent at one tick: suspected, not yet lost
    change = watch.tick(2.15)                      # ... and at the next, nothing having arrived in between
    assert change.lost and 'a (' in change.reason and 'b (' in change.reason
    assert watch.tick(2.2) is None                 # reported once
    watch.beat('b', 2.3)
    assert watch.tick(2.3).lost is False


def test_heartbeat_watch_judges_heartbeats_queued_during_a_stall_before_declaring_a_loss():
    """After this process stalled, the first tick sees old heartbeats while newer ones wait in the queue: they
    are taken before the next tick, and no loss is declared."""
    watch = HeartbeatWatch(['a', 'b'], timeout=1.0)
    watch.beat('a', 0.0)
    watch.beat('b', 0.0)
    assert watch.tick(1.5) is None                 # the stall's first tick: both look silent
    watch.beat('a', 1.52)                          # the queued heartbeats are taken
    watch.beat('b', 1.52)
    assert watch.tick(1.6) is None
    assert watch.lost_reason is None
    assert watch.tick(2.6) is None and watch.tick(2.7).lost   # a real silence is still declared


# ------------------------------------------------------------------ the recorder node
def _fault_listener(graph):
    faults = []
    node = graph.create_node(f'fault_probe_{uuid.uuid4().hex[:6]}')
    node.create_subscription(SafetyFault, '/safety/faults', faults.append, qos.COMMANDS)
    return faults


def _recorder(graph, record_dir, *params):
    args = ['--ros-args', '-p', f'record_dir:={record_dir}', '-p', 'procedure_id:=this_proc',
            '-p', 'diagnostics_period_s:=0.2', '-p', 'mcap_enabled:=false', '-p', 'close_unfinished_records:=false']
    for p in params:
        args += ['-p', p]
    return graph.add(RecorderNode(context=graph.context, cli_args=args))


def _event(kind, procedure_id, n=0):
    msg = ProcedureEvent(kind=kind, description=f'{kind} {n}', source='probe', procedure_id=procedure_id,
                         values=[KeyValue(key='n', value=str(n))])
    msg.header.stamp.sec = 100 + n
    return msg


def test_recorder_on_full_disk_raises_record_failed_until_writable(tmp_path):
    with small_tmpfs(tmp_path / 'fs', '1m') as fs, testing.SpinningGraph() as graph:
        faults = _fault_listener(graph)
        recorder = _recorder(graph, fs / 'rec', 'min_free_mib:=0', 'reserve_free_mib:=0')
        pub = graph.create_node('event_probe').create_publisher(ProcedureEvent, '/procedure/events', qos.EVENTS)
        testing.wait_for(lambda: pub.get_subscription_count() > 0, 10, 'recorder subscription')
        filler = fill(fs)
        for n in range(20):
            pub.publish(_event('step', 'this_proc', n))
        testing.wait_for(lambda: any(f.code == RECORD_FAILED and f.cause_active for f in faults), 10,
                         'RECORD_FAILED on /safety/faults')
        fault = next(f for f in faults if f.code == RECORD_FAILED)
        assert 'ENOSPC' in fault.detail and str(fs) in fault.detail
        assert recorder.record_failed
        filler.unlink()
        testing.wait_for(lambda: any(f.code == RECORD_FAILED and not f.cause_active for f in faults), 10,
                         'RECORD_FAILED cleared once the record is writable')
        gaps = [e for e in read_entries(str(fs / 'rec')) if e.kind == 'record_gap']
        assert gaps and gaps[0].payload['lost_entries'] >= 1 and 'ENOSPC' in gaps[0].payload['cause']
        recorder.finalize()


def test_recorder_preflight_free_space(tmp_path):
    with small_tmpfs(tmp_path / 'fs', '1m') as fs, testing.SpinningGraph() as graph:
        faults = _fault_listener(graph)
        recorder = _recorder(graph, fs / 'rec', 'min_free_mib:=100')
        testing.wait_for(lambda: any(f.code == RECORD_FAILED and f.cause_active for f in faults), 10,
                         'RECORD_FAILED for too little free space')
        assert 'MiB free' in faults[-1].detail and 'needs 100 MiB' in faults[-1].detail
        recorder.finalize()


def test_recorder_reserve_catches_a_filling_disk_before_writes_fail(tmp_path):
    with small_tmpfs(tmp_path / 'fs', '4m') as fs, testing.SpinningGraph() as graph:
        faults = _fault_listener(graph)
        recorder = _recorder(graph, fs / 'rec', 'min_free_mib:=1', 'reserve_free_mib:=1')
        pub = graph.create_node('event_probe').create_publisher(ProcedureEvent, '/procedure/events', qos.EVENTS)
        testing.wait_for(lambda: pub.get_subscription_count() > 0, 10, 'recorder subscription')
        assert recorder.record_failed is None
        fill(fs)
        pub.publish(_event('step', 'this_proc', 1))    # fits in the file's last block: the write succeeds
        testing.wait_for(lambda: any(f.code == RECORD_FAILED and f.cause_active for f in faults), 10,
                         'RECORD_FAILED for a full disk')
        assert 'MiB free' in next(f for f in faults if f.code == RECORD_FAILED).detail
        recorder.finalize()


def test_other_procedure_is_ignored_and_reported_once(tmp_path):
    with testing.SpinningGraph() as graph:
        recorder = _recorder(graph, tmp_path / 'rec', 'foreign_report_period_s:=0.5', 'min_free_mib:=0')
        probe = graph.create_node('foreign_probe')
        events = probe.create_publisher(ProcedureEvent, '/procedure/events', qos.EVENTS)
        doses = probe.create_publisher(DoseRecord, '/scanner/dose', qos.EVENTS)
        testing.wait_for(lambda: events.get_subscription_count() > 0 and doses.get_subscription_count() > 0, 10,
                         'recorder subscriptions')
        for n in range(5):
            events.publish(_event('orphan_step', 'orphan_proc', n))
        for n in range(2):
            doses.publish(DoseRecord(scan_id=f'orphan-{n}', procedure_id='orphan_proc', ctdi_vol_mgy=10.0,
                                     dlp_mgy_cm=300.0, kv=120.0, mas=100.0, scan_count=n + 1,
                                     total_dlp_mgy_cm=300.0 * (n + 1)))
        events.publish(_event('mine', 'this_proc', 1))
        testing.wait_for(lambda: any(e.kind == 'foreign_procedure' for e in read_entries(str(tmp_path / 'rec'))),
                         10, 'one foreign_procedure entry')
        testing.wait_for(lambda: any(e.kind == 'event' and e.payload['kind'] == 'mine'
                                     for e in read_entries(str(tmp_path / 'rec'))), 10, 'own event recorded')
        got = read_entries(str(tmp_path / 'rec'))
        assert not [e for e in got if e.kind == 'event' and e.payload['kind'] == 'orphan_step']
        assert not [e for e in got if e.kind in ('dose', 'dose_unverified')]
        ignored = [i for e in got if e.kind == 'foreign_procedure' for i in e.payload['ignored']]
        assert sum(i['messages'] for i in ignored if i['what'] == 'event') == 5
        assert sum(i['messages'] for i in ignored if i['what'] == 'dose') == 2
        assert len([e for e in got if e.kind == 'foreign_procedure']) <= 2   # aggregated, not one per message
        assert recorder.ledger.totals().ct_scan_count == 0
        recorder.finalize()


# ------------------------------------------------------------------ supervisor: heartbeats required for motion
def test_motion_heartbeats_hold_motion_only():
    from igt_robot.safety import SafetyConfig, SafetyState, SafetySupervisor
    config = SafetyConfig(heartbeat_timeouts={'hw': 1.0, 'recorder_node': 1.0}, motion_heartbeats=('recorder_node',),
                          scanner_required=False, require_estop_input=False, require_joint_state=False)
    sup = SafetySupervisor(config, now=0.0)
    sup.heartbeat('hw', 0.0)
    assert sup.state is SafetyState.HOLD                 # INIT does not wait for a motion-only heartbeat
    sup.resume(0.1)                                       # accepted, but READY needs the recorder's heartbeat
    assert sup.state is SafetyState.HOLD and 'recorder_node' in sup.reason
    sup.heartbeat('recorder_node', 0.2)
    assert sup.resume(0.2).accepted and sup.state is SafetyState.READY
    sup.heartbeat('hw', 1.0)
    sup.tick(1.1)
    assert sup.state is SafetyState.READY
    sup.heartbeat('hw', 1.5)
    sup.tick(1.25)                                        # recorder silent while READY: suspected ...
    sup.tick(1.27)                                        # ... and confirmed at the next tick: motion stops
    assert sup.state is SafetyState.HOLD and not sup.motion_permitted
    assert 'no heartbeat from recorder_node' in sup.reason
    assert not sup.status().faults                        # a hold, not a fault
    sup.heartbeat('recorder_node', 1.6)
    sup.tick(1.6)
    assert sup.state is SafetyState.HOLD                  # never resumed implicitly
    assert sup.resume(1.7).accepted and sup.state is SafetyState.READY
