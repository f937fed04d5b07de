"""Durable append-only procedure record: commit semantics, crash recovery, validation."""
import json
import os
import pathlib
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from igt_robot.record import store
from igt_robot.record.store import (ProcedureRecord, RecordCorruptError, RecordLockedError, RecordPayloadError,
                                    read_entries)

SRC = str(pathlib.Path(__file__).resolve().parents[3] / 'src' / 'igt_robot')

# Appends as fast as possible; prints "<seq> <i>" for every *returned* (committed) append.
# Every 4th payload is large so that a SIGKILL can land in the middle of a write.
CHILD = r'''
import os, sys
sys.path.insert(0, sys.argv[2])
from igt_robot.record.store import ProcedureRecord
rec = ProcedureRecord(sys.argv[1])
rec_info = rec.recovery
print('OPEN', rec.last_seq, 'recovered' if rec_info else 'clean', flush=True)
blob = 'x' * 400000
i = 0
while True:
    i += 1
    seq = rec.append('event', {'i': i, 'pid': os.getpid(), 'blob': blob if i % 4 == 0 else ''})
    sys.stdout.write(f'{seq} {i}\n')
    sys.stdout.flush()
'''


def _read_lines_until(proc, count, timeout_s):
    """Read complete stdout lines until ``count`` commit lines arrived (or deadline)."""
    fd = proc.stdout.fileno()
    buf = b''
    lines = []
    deadline = time.monotonic() + timeout_s
    while sum(1 for ln in lines if not ln.startswith('OPEN')) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *complete, buf = buf.split(b'\n')
        lines.extend(c.decode() for c in complete)
    return lines, buf


def test_sigkill_at_random_moment_loses_no_committed_append(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    directory = tmp_path / 'proc'
    committed = {}  # seq -> (i, pid)
    torn_seen = []
    for round_index in range(3):
        target = rng.randint(5, 120)
        proc = subprocess.Popen([sys.executable, '-c', CHILD, str(directory), SRC],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            lines, _ = _read_lines_until(proc, target, timeout_s=30.0)
            os.kill(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, f'seed {seed}: child ended by itself: {proc.stderr}'
        text = '\n'.join(lines) + '\n' + rest.decode(errors='replace')
        complete = text.split('\n')[:-1] if not text.endswith('\n') else text.split('\n')
        for line in complete:
            if not line or line.startswith('OPEN'):
                continue
            parts = line.split()
            if len(parts) != 2:
                continue  # a line cut by the kill is not a claim of commit
            committed[int(parts[0])] = (int(parts[1]), proc.pid)
        assert len(committed) >= target, f'seed {seed}: child printed too little'

        with ProcedureRecord(directory) as rec:
            entries = rec.read_all()
            by_seq = {e.seq: e for e in entries}
            # Sequence numbers are contiguous from 1: recovery never leaves a gap.
            assert [e.seq for e in entries] == list(range(1, len(entries) + 1)), f'seed {seed}'
            for seq, (i, pid) in committed.items():
                assert seq in by_seq, f'seed {seed}: committed seq {seq} lost (round {round_index})'
                payload = by_seq[seq].payload
                if by_seq[seq].kind == 'event' and payload.get('pid') == pid:
                    assert payload['i'] == i
                    assert payload['blob'] == ('x' * 400000 if i % 4 == 0 else '')
            if rec.recovery is not None:  # a kill mid-write: the torn bytes were kept, not lost
                assert os.path.getsize(rec.torn_path) >= rec.recovery.torn_bytes > 0
                torn_seen.append(rec.recovery.torn_bytes)


def _write_entries(directory, n):
    with ProcedureRecord(directory) as rec:
        for i in range(n):
            rec.append('event', {'i': i, 'text': f'entry {i}'})


def test_torn_last_line_is_truncated_kept_and_reported(tmp_path):
    _write_entries(tmp_path, 5)
    path = tmp_path / store.EVENTS_FILE
    good_size = path.stat().st_size
    half_line = store.encode_line(6, '2025-01-01T00:00:00.000000Z', 1.0, 'event', {'i': 5})[:37]
    with open(path, 'ab') as f:
        f.write(half_line)

    with ProcedureRecord(tmp_path) as rec:
        assert rec.recovery is not None
        assert rec.recovery.truncated_at == good_size
        assert rec.recovery.torn_bytes == len(half_line)
        assert rec.recovery.last_seq == 5
        assert 'incomplete' in rec.recovery.reason
        assert (tmp_path / (store.EVENTS_FILE + '.torn')).read_bytes() == half_line
        entries = rec.read_all()
        # The repair itself is on the record, and the sequence continues.
        assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
        assert entries[-1].kind == store.KIND_RECOVERY
        assert entries[-1].payload['torn_bytes'] == len(half_line)
        assert rec.append('event', {'after': True}) == 7
    assert [e.seq for e in read_entries(str(tmp_path))] == list(range(1, 8))


def test_torn_line_with_newline_and_bad_crc_is_a_torn_tail(tmp_path):
    _write_entries(tmp_path, 3)
    path = tmp_path / store.EVENTS_FILE
    line = bytearray(store.encode_line(4, '2025-01-01T00:00:00.000000Z', 1.0, 'event', {'i': 3}))
    line[10] ^= 0x01  # one flipped bit: CRC must catch it
    zero_block = b'\x00' * 512  # filesystems can expose zero-filled blocks after power loss
    with open(path, 'ab') as f:
        f.write(bytes(line) + zero_block)
    with ProcedureRecord(tmp_path) as rec:
        assert rec.recovery is not None
        assert 'CRC' in rec.recovery.reason or 'JSON' in rec.recovery.reason
        assert rec.recovery.torn_bytes == len(line) + len(zero_block)
        assert [e.seq for e in rec.read_all()][:3] == [1, 2, 3]
        assert rec.append('event', {}) == 5  # 4 = recovery entry


def test_corruption_in_the_middle_is_refused_not_truncated(tmp_path):
    _write_entries(tmp_path, 4)
    path = tmp_path / store.EVENTS_FILE
    lines = path.read_bytes().split(b'\n')
    lines[1] = lines[1].replace(b'entry 1', b'entry X')  # CRC now wrong, valid lines follow
    path.write_bytes(b'\n'.join(lines))
    size = path.stat().st_size
    with pytest.raises(RecordCorruptError, match='line 2'):
        ProcedureRecord(tmp_path)
    assert path.stat().st_size == size  # nothing was truncated
    with pytest.raises(RecordCorruptError):
        read_entries(str(tmp_path))


def test_line_format_and_fields(tmp_path):
    walls = iter([1_700_000_000.25, 1_700_000_001.5])
    monos = iter([10.0, 11.5])
    with ProcedureRecord(tmp_path, wall_clock=lambda: next(walls), mono_clock=lambda: next(monos)) as rec:
        assert rec.append('plan', {'target_m': [0.01, -0.02, 0.1], 'plan_id': 'p1'}) == 1
        assert rec.append('dose', {'dlp_mgy_cm': 123.4}) == 2
        summary = rec.summary()
    raw = (tmp_path / store.EVENTS_FILE).read_bytes().split(b'\n')
    assert raw[-1] == b'' and len(raw) == 3
    first = json.loads(raw[0])
    assert first['seq'] == 1 and first['kind'] == 'plan' and first['mono'] == 10.0
    assert first['wall'] == '2023-11-14T22:13:20.250000Z'
    assert first['payload']['target_m'] == [0.01, -0.02, 0.1]
    assert len(first['crc']) == 8
    assert summary['entries'] == 2 and summary['last_seq'] == 2
    assert summary['kinds'] == {'dose': 1, 'plan': 1}
    assert summary['first_wall'].startswith('2023-11-14T22:13:20')
    assert summary['recovered'] is None


def test_numpy_values_are_stored_as_plain_json(tmp_path):
    np = pytest.importorskip('numpy')
    with ProcedureRecord(tmp_path) as rec:
        rec.append('tip', {'tip_m': np.array([0.1, 0.2, 0.3]), 'error_m': np.float64(0.002), 'n': np.int64(3)})
        entry = rec.read_all()[0]
    assert entry.payload == {'tip_m': [0.1, 0.2, 0.3], 'error_m': 0.002, 'n': 3}


@pytest.mark.parametrize('kind,payload,match', [
    ('event', {'fre_m': float('nan')}, r'payload\.fre_m is NaN'),
    ('event', {'nested': {'v': [1.0, float('inf')]}}, r'payload\.nested\.v\[1\]'),
    ('event', ['not', 'a', 'dict'], 'mapping'),
    ('event', {'obj': object()}, 'not JSON-serialisable'),
    ('Event', {}, 'lower-case'),
    ('', {}, 'lower-case'),
])
def test_bad_payloads_are_refused_and_nothing_is_written(tmp_path, kind, payload, match):
    with ProcedureRecord(tmp_path) as rec:
        with pytest.raises(RecordPayloadError, match=match):
            rec.append(kind, payload)
        assert rec.last_seq == 0
    assert (tmp_path / store.EVENTS_FILE).read_bytes() == b''


def test_second_writer_is_refused(tmp_path):
    with ProcedureRecord(tmp_path):
        with pytest.raises(RecordLockedError):
            ProcedureRecord(tmp_path)
    with ProcedureRecord(tmp_path) as again:  # lock released on close
        assert again.last_seq == 0


def test_closed_record_refuses_append(tmp_path):
    rec = ProcedureRecord(tmp_path)
    rec.close()
    with pytest.raises(store.RecordClosedError):
        rec.append('event', {})


def test_concurrent_appends_are_serialised(tmp_path):
    threads_n, per_thread = 4, 50
    with ProcedureRecord(tmp_path, fsync=False) as rec:
        got = [[] for _ in range(threads_n)]

        def worker(k):
            for i in range(per_thread):
                got[k].append(rec.append('event', {'thread': k, 'i': i}))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        entries = rec.read_all()
    all_seqs = sorted(s for g in got for s in g)
    assert all_seqs == list(range(1, threads_n * per_thread + 1))
    # Each thread saw its own appends in increasing order, and each payload matches its seq.
    by_seq = {e.seq: e.payload for e in entries}
    for k in range(threads_n):
        assert got[k] == sorted(got[k])
        assert [by_seq[s]['i'] for s in got[k]] == list(range(per_thread))
        assert all(by_seq[s]['thread'] == k for s in got[k])


def test_reopen_continues_sequence(tmp_path):
    _write_entries(tmp_path, 3)
    with ProcedureRecord(tmp_path) as rec:
        assert rec.recovery is None
        assert rec.last_seq == 3
        assert rec.append('confirmation', {'step': 'CONFIRM_PLAN'}) == 4
        assert rec.summary()['kinds'] == {'confirmation': 1, 'event': 3}
