"""Images from the scanner: series assembly, dose from the images, and a real DICOM link.

Core tests drive :mod:`igt_robot.acquisition` directly; network tests send with
pynetdicom's Storage SCU (what ``storescu`` does) and through a private Orthanc
(skipped with the reason where Orthanc is absent). Bad input is refused with a
reason, and whatever was accepted is kept.
"""
import datetime
import pathlib
import shutil
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from igt_robot.acquisition import AcquisitionError, ScanRequest, Series, match_series
from igt_robot.acquisition.assembler import SeriesAssembler, build_series
from igt_robot.acquisition.dicom_receiver import (STATUS_NOT_MATCHING_SOP_CLASS, STATUS_OUT_OF_RESOURCES,
                                                  STATUS_SUCCESS, DicomReceiver, part10_header)
from igt_robot.acquisition.dose import DoseReportError, read_rdsr, series_dose
from igt_robot.acquisition.folder import WatchedFolder
from igt_robot.imaging.io import write_dicom_series
from igt_robot.imaging.volume import Volume, make_affine
from igt_robot.record.dose import SOURCE_IMAGE_HEADER, SOURCE_RDSR, DoseFactors, DoseValueError
from igt_robot.simulation.dicom_peer import OrthancPeer, PeerError, orthanc_available, store_files
from igt_robot.simulation.rdsr import DoseEvent, make_rdsr, write_rdsr
from igt_robot.waiting import wait_for

SLICES = 12


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def ct_volume(seed=0, shape=(SLICES, 24, 20)):
    rng = np.random.default_rng(seed)
    data = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    affine = make_affine(np.eye(3), (0.001, 0.0012, 0.002), (-0.01, 0.02, -0.05))
    return Volume(data, affine, 'CT', {})


def write_ct(folder, *, seed=0, description='igt_robot control', protocol='control scan', modality='CT',
             ctdi=4.0, kv=100.0, mas=60, announce=True, event_uid=None, study_uid=None):
    volume = ct_volume(seed)
    attributes = {'ProtocolName': protocol, 'CTDIvol': float(ctdi), 'KVP': f'{kv:g}', 'Exposure': int(mas),
                  'IrradiationEventUID': event_uid or generate_uid()}
    if announce:
        attributes['ImagesInAcquisition'] = SLICES
    if modality != 'CT':
        attributes = {'ProtocolName': protocol, 'ImagesInAcquisition': SLICES}
    paths = write_dicom_series(volume, folder, modality=modality, series_description=description,
                               study_instance_uid=study_uid, extra_attributes=attributes)
    return volume, paths


def dose_event(uid, protocol='control scan', ctdi=4.0, dlp=60.6, kv=100.0, mas=60.0):
    return DoseEvent(uid, protocol, ctdi, dlp, kv, mas, 303.0, datetime.datetime(2026, 1, 1, 12))


def read(paths):
    return [pydicom.dcmread(str(p)) for p in paths]


# ---------------------------------------------------------------- dose figures: one type, one validator
def test_dose_factors_validate_once_for_every_user():
    assert not DoseFactors().reported
    with pytest.raises(DoseValueError, match='ctdi_vol_mgy must be finite'):
        DoseFactors(ctdi_vol_mgy=float('nan'))
    with pytest.raises(DoseValueError, match='implausibly large'):
        DoseFactors(dlp_mgy_cm=1e9)
    with pytest.raises(DoseValueError, match='kv = 10 outside'):
        DoseFactors(kv=10.0)
    assert DoseFactors(ctdi_vol_mgy=4.0).with_dlp(0.15).dlp_mgy_cm == pytest.approx(60.0)
    with pytest.raises(DoseValueError, match='mas must be > 0'):
        DoseFactors(ctdi_vol_mgy=4.0, kv=100.0).require_complete()
    from igt_robot.scanner import ScanEvent
    with pytest.raises(ValueError, match='kv = 10 outside'):
        ScanEvent(start=0.0, duration=1.0, is_ct=True, kv=10.0)


# ---------------------------------------------------------------- Radiation Dose SR
def test_rdsr_written_with_the_tid_10011_tree_reads_back_per_event():
    events = [dose_event(generate_uid(), 'planning scan', 12.0, 240.0, 120.0, 200.0), dose_event(generate_uid())]
    ds = make_rdsr(events, study_instance_uid=generate_uid())
    assert ds.ConceptNameCodeSequence[0].CodeValue == '113701'
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == '10011'
    codes = [item.ConceptNameCodeSequence[0].CodeValue for item in ds.ContentSequence]
    assert codes == ['121058', '113811', '113819', '113819']    # procedure reported, accumulated, 2 events
    accumulated = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
                   for i in ds.ContentSequence[1].ContentSequence}
    assert accumulated == {'113812': 2.0, '113813': pytest.approx(300.6)}
    read_back = read_rdsr(ds)
    assert [(e.irradiation_event_uid, e.ctdi_vol_mgy, e.dlp_mgy_cm, e.kv) for e in read_back] == \
        [(e.irradiation_event_uid, e.ctdi_vol_mgy, e.dlp_mgy_cm, e.kv) for e in events]
    assert read_back[0].protocol == 'planning scan' and read_back[1].mas == pytest.approx(60.0)


def test_a_dose_report_without_events_or_figures_is_refused_with_the_reason():
    ds = make_rdsr([dose_event(generate_uid())], study_instance_uid=generate_uid())
    ds.ContentSequence = ds.ContentSequence[:2]
    with pytest.raises(DoseReportError, match='no CT irradiation event'):
        read_rdsr(ds)
    ds = make_rdsr([dose_event(generate_uid())], study_instance_uid=generate_uid())
    dose_container = ds.ContentSequence[2].ContentSequence[-1]
    dose_container.ContentSequence = dose_container.ContentSequence[:1]      # DLP removed
    with pytest.raises(DoseReportError, match='lacks Mean CTDIvol or DLP'):
        read_rdsr(ds)


def test_series_dose_comes_from_its_sr_event_else_from_its_headers(tmp_path):
    event_uid = generate_uid()
    _, paths = write_ct(tmp_path / 'a', ctdi=4.0, kv=100.0, mas=60, event_uid=event_uid)
    assembler = SeriesAssembler()
    for ds in read(paths):
        assert assembler.add(ds, 'SIM_CT').accepted
    (pending,), _ = assembler.poll()
    series = build_series(pending, 's1', 'dicom')
    assert series.usable and series.irradiation_event_uids == (event_uid,)
    factors, source, _ = series_dose(series, [])
    assert source == SOURCE_IMAGE_HEADER
    assert (factors.ctdi_vol_mgy, factors.kv, factors.mas) == (4.0, 100.0, 60.0)
    assert factors.dlp_mgy_cm == pytest.approx(4.0 * SLICES * 0.2)        # CTDIvol × imaged length (cm)
    sr = read_rdsr(make_rdsr([dose_event(event_uid, dlp=55.5), dose_event(generate_uid(), dlp=999.0)],
                             study_instance_uid=generate_uid()))
    factors, source, _ = series_dose(series, sr)
    assert source == SOURCE_RDSR and factors.dlp_mgy_cm == 55.5 and factors.ctdi_vol_mgy == 4.0


# ---------------------------------------------------------------- assembling series
def test_interleaved_series_stay_apart_and_two_matching_ones_are_not_guessed(tmp_path):
    a_volume, a_paths = write_ct(tmp_path / 'a', seed=1, description='control A')
    b_volume, b_paths = write_ct(tmp_path / 'b', seed=2, description='control B')
    assembler = SeriesAssembler()
    for da, db in zip(read(a_paths), read(b_paths)):
        assembler.add(da, 'SIM_CT')
        assembler.add(db, 'SIM_CT')
    complete, _ = assembler.poll()
    series = {s.series_description: s for s in (build_series(p, p.uid, 'dicom') for p in complete)}
    np.testing.assert_allclose(series['control A'].volume.data, a_volume.data)
    np.testing.assert_allclose(series['control B'].volume.data, b_volume.data)
    request = ScanRequest('control', 'CT', requested_at=0.0, keywords=('control',))
    with pytest.raises(AcquisitionError, match='2 series match the control scan request'):
        match_series(request, list(series.values()))


def test_a_series_is_matched_by_time_modality_and_protocol():
    def series(**kw):
        base = dict(scan_id='x', series_instance_uid=generate_uid(), modality='CT', protocol_name='control scan',
                    first_received=100.0, volume=object())
        base.update(kw)
        return Series(**base)
    request = ScanRequest('control', 'CT', requested_at=100.0, keywords=('control',))
    old, mr, other, good = (series(first_received=50.0), series(modality='MR'),
                            series(protocol_name='planning scan'), series())
    found, reasons = match_series(request, [old, mr, other, good])
    assert found is good
    assert 'before the scan was requested' in reasons[0] and 'modality MR' in reasons[1]
    assert 'names none of control' in reasons[2]


def test_refusals_name_the_problem(tmp_path):
    _, paths = write_ct(tmp_path / 'a')
    assembler = SeriesAssembler(modalities=('CT',), max_instance_bytes=100_000)
    ds = read(paths)[0]
    assert not assembler.check(ds, size_bytes=200_000).accepted
    assert 'exceeds the limit' in assembler.check(ds, size_bytes=200_000).reason
    wrong = read(paths)[0]
    wrong.Modality = 'US'
    assert 'does not match the SOP class' in assembler.check(wrong).reason
    _, mr_paths = write_ct(tmp_path / 'mr', modality='MR')
    assert 'not used by this procedure' in assembler.check(read(mr_paths)[0]).reason
    other = read(paths)[0]
    other.SOPClassUID = '1.2.840.10008.5.1.4.1.1.104.1'          # Encapsulated PDF
    assert 'is not CT or MR Image Storage' in assembler.check(other).reason
    bare = read(paths)[0]
    del bare.ImagePositionPatient
    assert 'lacks ImagePositionPatient' in assembler.check(bare).reason
    assert assembler.pending_count() == 0


def test_missing_slices_refuse_the_series_with_the_reason(tmp_path):
    _, paths = write_ct(tmp_path / 'a', announce=False)
    clock = FakeClock()
    assembler = SeriesAssembler(quiet_period_s=2.0, clock=clock)
    for ds in read(paths[:5] + paths[7:]):
        assembler.add(ds, 'SIM_CT')
    assert assembler.poll() == ([], [])
    clock.t += 2.5                                     # nothing more came: complete by the quiet period
    (pending,), _ = assembler.poll()
    series = build_series(pending, 's', 'dicom')
    assert not series.usable and '2 missing slice(s)' in series.refused


def test_a_series_cut_short_is_reported_kept_and_completed_by_a_resend(tmp_path):
    _, paths = write_ct(tmp_path / 'a')
    clock = FakeClock()
    assembler = SeriesAssembler(quiet_period_s=2.0, clock=clock)
    for ds in read(paths[:4]):
        assembler.add(ds, 'SIM_CT')
    clock.t += 3.0
    complete, incomplete = assembler.poll()
    assert complete == [] and 'incomplete: 4 of 12 instances' in incomplete[0][1]
    assert assembler.poll() == ([], [])                # reported once
    for ds in read(paths):                             # the sender resends the whole series
        assembler.add(ds, 'SIM_CT')
    (pending,), _ = assembler.poll()
    assert len(pending.instances) == SLICES and build_series(pending, 's', 'dicom').usable


# ---------------------------------------------------------------- the network (pynetdicom Storage SCU)
@pytest.fixture
def receiver(tmp_path):
    events = []
    rx = DicomReceiver(tmp_path / 'rx', port=0, allowed_calling_aets=['SIM_CT'], modalities=('CT',),
                       quiet_period_s=1.0, max_instance_bytes=200_000,
                       on_event=lambda kind, text, values: events.append((kind, text)))
    rx.start()
    rx.events = events
    yield rx
    rx.stop()


def stored_files(rx):
    return sorted(p for p in rx.storage_dir.rglob('*.dcm'))


def test_storescu_series_and_dose_report_arrive_in_memory_and_on_disk(receiver, tmp_path):
    requested = time.monotonic()
    event_uid = generate_uid()
    volume, paths = write_ct(tmp_path / 'a', event_uid=event_uid)
    report = write_rdsr(tmp_path / 'sr.dcm', [dose_event(event_uid)], study_instance_uid=generate_uid())
    statuses = store_files(paths + [report], '127.0.0.1', receiver.port, calling_ae='SIM_CT')
    assert statuses == [STATUS_SUCCESS] * (SLICES + 1)
    series = receiver.wait_for_series(ScanRequest('control', 'CT', requested, ('control',)), 10)
    np.testing.assert_allclose(series.volume.data, volume.data)
    np.testing.assert_allclose(series.volume.affine, volume.affine, atol=1e-9)
    assert series.calling_ae == 'SIM_CT' and len(stored_files(receiver)) == SLICES + 1
    factors, source, _ = series_dose(series, receiver.rdsr_events())
    assert source == SOURCE_RDSR and factors.dlp_mgy_cm == pytest.approx(60.6)


def test_an_unknown_calling_ae_title_is_rejected_with_the_reason(receiver, tmp_path):
    _, paths = write_ct(tmp_path / 'a')
    with pytest.raises(PeerError, match='not established'):
        store_files(paths, '127.0.0.1', receiver.port, calling_ae='INTRUDER')
    wait_for(lambda: receiver.refusals, 5, 'the rejection to be recorded')
    assert "'INTRUDER' rejected" in receiver.refusals[0]
    assert stored_files(receiver) == [] and receiver.inbox.all() == []


def test_wrong_modality_oversized_and_non_image_instances_are_refused(receiver, tmp_path):
    big = ct_volume()
    big.data = np.zeros((2, 400, 400), np.float32)     # 320 kB per slice > the receiver's 200 kB limit
    big_paths = write_dicom_series(big, tmp_path / 'big', extra_attributes={'ImagesInAcquisition': 2})
    assert store_files(big_paths[:1], '127.0.0.1', receiver.port, calling_ae='SIM_CT') == [STATUS_OUT_OF_RESOURCES]
    _, ct_paths = write_ct(tmp_path / 'ct')
    bad = read(ct_paths)[0]
    bad.Modality = 'US'
    bad_path = tmp_path / 'bad.dcm'
    bad.save_as(str(bad_path))
    assert store_files([bad_path], '127.0.0.1', receiver.port, calling_ae='SIM_CT') == \
        [STATUS_NOT_MATCHING_SOP_CLASS]
    reasons = ' | '.join(receiver.refusals)
    assert 'exceeds the limit' in reasons and 'Modality US does not match' in reasons
    assert stored_files(receiver) == [] and not list(receiver.storage_dir.rglob('*.part'))   # nothing staged


def test_mr_for_a_ct_procedure_and_a_pdf_are_refused(receiver, tmp_path):
    _, mr_paths = write_ct(tmp_path / 'mr', modality='MR')
    assert store_files(mr_paths[:1], '127.0.0.1', receiver.port, calling_ae='SIM_CT') == \
        [STATUS_NOT_MATCHING_SOP_CLASS]
    assert 'modality MR is not used by this procedure' in receiver.refusals[-1]
    pdf = read(mr_paths)[0]
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.104.1'  # Encapsulated PDF
    pdf_path = tmp_path / 'report.dcm'
    pdf.save_as(str(pdf_path))
    # The receiver offers no presentation context for it: the association (or the send) is refused.
    with pytest.raises((PeerError, ValueError), match='not established|presentation context'):
        store_files([pdf_path], '127.0.0.1', receiver.port, calling_ae='SIM_CT')
    assert stored_files(receiver) == []


def test_a_connection_dropped_mid_series_loses_nothing(receiver, tmp_path):
    requested = time.monotonic()
    _, paths = write_ct(tmp_path / 'a')
    store_files(paths, '127.0.0.1', receiver.port, calling_ae='SIM_CT', abort_after=5)
    wait_for(lambda: any(kind == 'dicom_series_incomplete' for kind, _ in receiver.events), 10,
             'the incomplete series to be reported')
    assert len(stored_files(receiver)) == 5 and receiver.inbox.all() == []
    store_files(paths[5:], '127.0.0.1', receiver.port, calling_ae='SIM_CT')     # the rest, resent
    series = receiver.wait_for_series(ScanRequest('control', 'CT', requested, ('control',)), 10)
    assert series.usable and series.instance_count == SLICES


def test_each_instance_is_on_disk_under_its_final_name_before_its_success(receiver, tmp_path, monkeypatch):
    """Nothing acknowledged is lost: the C-STORE success of an instance follows the fdatasync of its file and
    the fsync of the folder holding its final name (checked from the sender's side, instance by instance)."""
    import igt_robot.acquisition.dicom_receiver as rx_module
    flushed_files, flushed_folders = [], []
    real_fdatasync, real_fsync_dir = rx_module.os.fdatasync, rx_module.fsync_dir

    def fdatasync(fd):
        real_fdatasync(fd)
        flushed_files.append(pathlib.Path(f'/proc/self/fd/{fd}').resolve().name)

    def fsync_dir(folder):
        real_fsync_dir(folder)
        flushed_folders.append(sorted(p.name for p in pathlib.Path(folder).iterdir()))
    monkeypatch.setattr(rx_module.os, 'fdatasync', fdatasync)
    monkeypatch.setattr(rx_module, 'fsync_dir', fsync_dir)
    _, paths = write_ct(tmp_path / 'a')
    datasets = read(paths)
    for n, path in enumerate(paths):           # one association per instance: check after each success
        assert store_files([path], '127.0.0.1', receiver.port, calling_ae='SIM_CT') == [STATUS_SUCCESS]
        final = f'{datasets[n].SOPInstanceUID}.dcm'
        assert flushed_files[-1].startswith(final) and flushed_files[-1].endswith('.part')   # data, then rename
        assert final in flushed_folders[-1] and not any(f.endswith('.part') for f in flushed_folders[-1])
    assert len(flushed_files) == SLICES and len(stored_files(receiver)) == SLICES
    for path, stored in zip(sorted(paths, key=lambda p: str(pydicom.dcmread(p).SOPInstanceUID)),
                            sorted(stored_files(receiver))):
        original, received = pydicom.dcmread(path), pydicom.dcmread(stored)
        assert received.SOPInstanceUID == original.SOPInstanceUID and received.PixelData == original.PixelData
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def receive_ct_series(tmp_path):
    """A receiver (any calling AE title) started, sent one CT series in one association, stopped: (rx, paths)."""
    rx = DicomReceiver(tmp_path / 'rx', port=0, modalities=('CT',), on_event=lambda kind, text, values: None)
    rx.start()
    try:
        _, paths = write_ct(tmp_path / 'a')
        assert store_files(paths, '127.0.0.1', rx.port) == [STATUS_SUCCESS] * SLICES
    finally:
        rx.stop()
    return rx, paths


def test_the_handler_stages_the_instance_itself_when_it_was_not_staged_as_it_arrived(tmp_path, monkeypatch):
    """The flush normally starts as the last fragment arrives; without that (or for another message) the handler
    stages the bytes pynetdicom assembled: the same files, nothing left staged."""
    monkeypatch.setattr(DicomReceiver, '_stage_early', lambda self, assoc, arriving: None)
    rx, paths = receive_ct_series(tmp_path)
    stored = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in stored_files(rx)}
    for original in read(paths):
        received = stored[original.SOPInstanceUID]
        assert received.PixelData == original.PixelData and received.file_meta.TransferSyntaxUID == \
            original.file_meta.TransferSyntaxUID
    assert not list(rx.storage_dir.rglob('*.part'))


def test_an_association_polls_fast_while_instances_arrive_and_at_its_own_pace_when_quiet(tmp_path, monkeypatch):
    """pynetdicom's reader sleeps 1 ms whenever it finds nothing to do, also before it sends each answer: while a
    series arrives the receiver shortens that, and gives it back once the association has gone quiet."""
    import types
    from igt_robot.acquisition import dicom_receiver
    seen = []
    on_store = DicomReceiver._on_store

    def recording(self, event):
        seen.append(event.assoc.dul._run_loop_delay)
        return on_store(self, event)
    monkeypatch.setattr(DicomReceiver, '_on_store', recording)
    rx, _ = receive_ct_series(tmp_path)
    assert seen == [dicom_receiver.FAST_POLL_S] * SLICES

    # The hand-back, on an association that stays open (a stand-in: only its reader's delay matters here).
    assoc = type('Association', (), {})()
    assoc.dul = types.SimpleNamespace(_run_loop_delay=0.001)
    p_data = types.SimpleNamespace(presentation_data_value_items=[
        types.SimpleNamespace(presentation_data_value=b'\x01' + b'\x00' * 8, presentation_context_id=1)])
    rx._on_pdu(types.SimpleNamespace(assoc=assoc, pdu=p_data))
    assert assoc.dul._run_loop_delay == dicom_receiver.FAST_POLL_S
    arrived = time.monotonic()
    rx.relax_quiet_associations(arrived + dicom_receiver.FAST_POLL_QUIET_S / 2)
    assert assoc.dul._run_loop_delay == dicom_receiver.FAST_POLL_S
    rx.relax_quiet_associations(arrived + dicom_receiver.FAST_POLL_QUIET_S * 2)
    assert assoc.dul._run_loop_delay == 0.001


@pytest.mark.skipif(not hasattr(__import__('socket'), 'TCP_QUICKACK'), reason='TCP_QUICKACK is Linux-only')
def test_the_receiver_reads_whole_pdus_and_acknowledges_every_read_at_once():
    """A sender with Nagle's algorithm on (Orthanc) waits for the ACK of an instance's body before it sends the
    tail: each read asks the kernel to acknowledge at once, not after its delayed-ACK timer (40 ms)."""
    import socket
    import threading
    import types

    from igt_robot.acquisition import dicom_receiver
    calls = []

    class Recording:
        def __init__(self, sock):
            self.sock = sock

        def recv(self, n):
            chunk = self.sock.recv(n)
            calls.append(('recv', len(chunk)))
            return chunk

        def setsockopt(self, level, option, value):
            calls.append(('setsockopt', level, option, value))
            self.sock.setsockopt(level, option, value)
    payload = bytes(range(256)) * 12289          # ~3 MB: several reads
    with socket.create_server(('127.0.0.1', 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiving, _ = server.accept()
        writer = threading.Thread(target=lambda: (sender.sendall(payload), sender.close()))
        writer.start()
        with receiving:
            got = dicom_receiver._recv_exactly(types.SimpleNamespace(socket=Recording(receiving)), len(payload) + 10)
        writer.join()
    assert bytes(got) == payload                 # fewer than asked for: the peer closed
    reads = [n for n, call in enumerate(calls) if call[0] == 'recv']
    assert len(reads) >= 2
    for n in reads:
        assert calls[n + 1] == ('setsockopt', socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


@pytest.mark.parametrize('instance_uid', ['1.2.3.4', '1.2.826.0.1.3680043.8.498.12345678901234567890123'])
@pytest.mark.parametrize('transfer_syntax', ['1.2.840.10008.1.2.1', '1.2.840.10008.1.2', '1.2.840.10008.1.2.4.90'])
def test_the_part10_header_is_what_pydicom_writes_for_pynetdicoms_file_meta(instance_uid, transfer_syntax):
    import io

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta
    meta = create_file_meta(sop_class_uid='1.2.840.10008.5.1.4.1.1.2', sop_instance_uid=instance_uid,
                            transfer_syntax=transfer_syntax)
    expected = io.BytesIO()
    expected.write(b'\x00' * 128 + b'DICM')
    write_file_meta_info(expected, meta)
    assert part10_header('1.2.840.10008.5.1.4.1.1.2', instance_uid, transfer_syntax) == expected.getvalue()


def test_a_full_disk_refuses_the_instance_and_leaves_no_partial_file(receiver, tmp_path, monkeypatch):
    import errno

    import igt_robot.acquisition.dicom_receiver as rx_module

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(rx_module.os, 'fdatasync', no_space)
    _, paths = write_ct(tmp_path / 'a')
    assert store_files(paths[:2], '127.0.0.1', receiver.port, calling_ae='SIM_CT') == \
        [STATUS_OUT_OF_RESOURCES] * 2
    assert 'No space left on device' in receiver.refusals[-1]
    assert list(receiver.storage_dir.rglob('*')) == [p for p in receiver.storage_dir.rglob('*') if p.is_dir()]
    assert receiver.assembler.pending_count() == 0      # refused instances are not part of any series


@pytest.mark.parametrize('allocated,stored,signed', [(16, 16, 0), (16, 12, 0), (16, 12, 1), (16, 16, 1),
                                                     (8, 8, 0), (8, 6, 1), (32, 20, 0)])
def test_received_slices_decode_exactly_as_pydicom_decodes_them(tmp_path, allocated, stored, signed):
    from igt_robot.imaging.io import decode_slice
    _, paths = write_ct(tmp_path / 'a')
    ds = read(paths)[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, stored, stored - 1, signed
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
    count = int(ds.Rows) * int(ds.Columns)
    ds.PixelData = np.random.default_rng(3).integers(0, 256, count * allocated // 8, dtype=np.uint8).tobytes()
    expected = ds.pixel_array.astype(np.float64) * 0.5 - 1024         # pydicom's general decoder
    np.testing.assert_array_equal(decode_slice(ds), expected.astype(np.float32))
    ds.PixelData = ds.PixelData[:-2]            # short pixel data: pydicom's decoder says why
    with pytest.raises(Exception, match='pixel data'):
        decode_slice(ds)


# ---------------------------------------------------------------- a watched folder
def test_a_watched_folder_takes_settled_files_once(tmp_path):
    volume, paths = write_ct(tmp_path / 'export_src')
    watched = WatchedFolder(tmp_path / 'export', settle_s=0.0, quiet_period_s=1.0)
    watched.folder.mkdir()
    (watched.folder / 'notes.txt').write_text('not DICOM')
    for p in paths:
        shutil.copy(p, watched.folder / p.name)
    watched.scan_once()          # first sight of each file: not yet settled
    watched.scan_once()
    (series,) = watched.inbox.all()
    np.testing.assert_allclose(series.volume.data, volume.data)
    watched.scan_once()
    assert len(watched.inbox.all()) == 1 and sorted(pathlib.Path(p).name for p in paths) == \
        sorted(p.name for p in watched.folder.glob('*.dcm'))      # nothing moved or deleted


# ---------------------------------------------------------------- a real DICOM peer: Orthanc
@pytest.mark.skipif(bool(orthanc_available()), reason=orthanc_available() or 'Orthanc present')
def test_orthanc_forwards_a_series_and_its_dose_report_by_c_store(receiver, tmp_path):
    requested = time.monotonic()
    event_uid = generate_uid()
    study = generate_uid()
    volume, paths = write_ct(tmp_path / 'a', event_uid=event_uid, study_uid=study)
    report = write_rdsr(tmp_path / 'sr.dcm', [dose_event(event_uid, dlp=61.25)], study_instance_uid=study)
    with OrthancPeer(tmp_path / 'orthanc', {'stack': ('IGT_ROBOT', receiver.port)}) as orthanc:
        reply = orthanc.upload_and_send('stack', paths + [report])
        assert reply['FailedInstancesCount'] == 0 and reply['InstancesCount'] == SLICES + 1
        series = receiver.wait_for_series(ScanRequest('control', 'CT', requested, ('control',)), 20)
        np.testing.assert_allclose(series.volume.data, volume.data)
        factors, source, _ = series_dose(series, receiver.rdsr_events())
        assert source == SOURCE_RDSR and factors.dlp_mgy_cm == 61.25
        orthanc.aet = 'WRONG_AE'


def test_orthanc_absent_is_a_reason_not_a_crash(monkeypatch):
    import igt_robot.simulation.dicom_peer as peer
    monkeypatch.setattr(peer.shutil, 'which', lambda name: None)
    monkeypatch.setattr(peer.os.path, 'exists', lambda path: False)
    assert 'not installed' in peer.orthanc_available()
    with pytest.raises(PeerError, match='not installed'):
        peer.OrthancPeer('/nonexistent', {})


# ---------------------------------------------------------------- OpenIGTLink IMAGE (Slicer, a scanner bridge)
def test_an_igtl_image_becomes_a_series_in_lps_and_is_kept_on_disk(tmp_path):
    import socket

    from igt_robot.acquisition.igtl_image import IgtlImageSource
    from igt_robot.imaging.io import igtl_image_from_volume, read_nifti
    refused = []
    source = IgtlImageSource(tmp_path / 'igtl', port=0, modality='CT', max_image_bytes=200_000,
                             on_event=lambda kind, text, values: refused.append(text) if 'refused' in kind else None)
    source.start()
    try:
        requested = time.monotonic()
        volume = ct_volume()
        with socket.create_connection(('127.0.0.1', source.port)) as link:
            link.sendall(igtl_image_from_volume(volume, device_name='control scan').pack())        # RAS on the wire
            big = ct_volume(shape=(4, 200, 200))
            link.sendall(igtl_image_from_volume(big, device_name='too big').pack())
            series = source.wait_for_series(ScanRequest('control', 'CT', requested, ('control',)), 10)
            wait_for(lambda: refused, 10, 'the oversized image to be refused')
    finally:
        source.stop()
    np.testing.assert_allclose(series.volume.data, volume.data)
    np.testing.assert_allclose(series.volume.affine, volume.affine, atol=1e-9)       # LPS metres in the core
    np.testing.assert_allclose(read_nifti(series.dicom_dir, 'CT').data, volume.data)
    assert 'too big' in refused[0]
