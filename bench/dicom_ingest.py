"""DICOM ingest benchmark: a 512×512×100 CT from a real DICOM peer to a registration result.

Figures (BENCH lines):

* ``series_received_to_registration_s`` -- from the last instance of a
  512×512×100 CT (with the Z-frame) arriving at the stack's receiver to the
  registration result, the series travelling in memory (assembly, checks,
  Z-frame registration by the same core call the registration node makes);
* ``dicom_instances_per_s`` -- instances received per second over that series
  (first to last instance at the receiver), sent by C-STORE from Orthanc in ONE
  association, as a scanner or a PACS forwards a series (pynetdicom's Storage SCU
  in a separate process where Orthanc is absent). Every instance is on disk
  (fdatasync, rename, folder fsync) before its success is answered. For context
  (``#`` lines): the same series from pynetdicom's Storage SCU (a Python sender,
  itself slower than the receiver) and the machine's load average;
* ``dose_fields_matched_fraction`` -- CTDIvol, DLP and kV of every irradiation
  event of the Radiation Dose SR sent, against the dose the stack derived for the
  matching series;
* ``procedure_via_dicom_completed`` -- the whole simulated procedure with every
  image by C-STORE through Orthanc (``python -m igt_robot.demo --via-dicom``).

Run:  python bench/dicom_ingest.py [--skip-procedure]
On a loaded shared machine the figures are indicative only.
"""
import argparse
import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'src' / 'igt_robot'))
sys.path.insert(0, str(HERE))

from bench_report import info, report  # noqa: E402
from igt_robot.acquisition import ScanRequest  # noqa: E402
from igt_robot.acquisition.dicom_receiver import DicomReceiver  # noqa: E402
from igt_robot.acquisition.dose import series_dose  # noqa: E402
from igt_robot.imaging import register_image  # noqa: E402
from igt_robot.imaging.io import write_dicom_series  # noqa: E402
from igt_robot.imaging.phantom import make_phantom  # noqa: E402
from igt_robot.robot_model import load_robot_model  # noqa: E402
from igt_robot.simulation.dicom_peer import OrthancPeer, orthanc_available  # noqa: E402
from igt_robot.simulation.rdsr import DoseEvent, write_rdsr  # noqa: E402
from igt_robot.simulation.scenario import make_scenario  # noqa: E402

SHAPE = (100, 512, 512)          # slices, rows, columns


def render_series(folder: pathlib.Path, study_uid: str, protocol: str, ctdi: float, kv: float, mas: float):
    """A 512×512×100 CT of the simulated patient with the Z-frame; its files and its dose event."""
    import datetime

    from pydicom.uid import generate_uid
    model = load_robot_model()
    scenario = make_scenario(7, T_base_zframe=model.T_base_zframe)
    spec = scenario.phantom_spec(model.T_base_zframe)
    fov = scenario.fov_size
    spec = dataclasses.replace(spec, shape_kji=SHAPE, spacing_m=(fov[0] / SHAPE[2], fov[1] / SHAPE[1], 0.002))
    volume, _ = make_phantom(spec)
    length_m = SHAPE[0] * 0.002
    event_uid = generate_uid()
    dlp = ctdi * length_m * 100.0
    paths = write_dicom_series(volume, folder, series_description=f'igt_robot {protocol}',
                               study_instance_uid=study_uid,
                               extra_attributes={'ProtocolName': f'{protocol} scan', 'ImagesInAcquisition': SHAPE[0],
                                                 'CTDIvol': ctdi, 'KVP': f'{kv:g}', 'Exposure': int(mas),
                                                 'IrradiationEventUID': event_uid})
    event = DoseEvent(event_uid, f'{protocol} scan', ctdi, round(dlp * 1.07, 2), kv, mas, length_m * 1000.0,
                      datetime.datetime.now())            # the SR's DLP includes over-ranging (7 %)
    return paths, event, model, scenario


def send(paths, receiver_port: int, workdir: pathlib.Path, sender: str) -> str:
    """C-STORE from a separate process in one association: Orthanc, or pynetdicom's Storage SCU."""
    if sender == 'orthanc':
        with OrthancPeer(workdir / 'orthanc', {'stack': ('IGT_ROBOT', receiver_port)}) as orthanc:
            ids = orthanc.upload(paths)
            os.sync()       # Orthanc's own copy (~50 MB) goes to the disk now, not under the receiver's flushes:
            orthanc.send('stack', ids)      # in a suite the scanner or the PACS writes to a disk of its own
        return 'Orthanc, one association'
    code = ('import sys; from igt_robot.simulation.dicom_peer import store_files; '
            'store_files(sys.argv[2:], "127.0.0.1", int(sys.argv[1]))')
    subprocess.run([sys.executable, '-c', code, str(receiver_port)] + [str(p) for p in paths], check=True,
                   env=dict(os.environ, PYTHONPATH=str(HERE.parent / 'src' / 'igt_robot')))
    return 'pynetdicom Storage SCU, one association'


def receive(paths, workdir: pathlib.Path, sender: str, then=lambda series: None):
    """Send ``paths`` to a fresh receiver and, as soon as the series is complete, run ``then(series)`` (as the
    procedure would, while the sender still sends the dose report and closes); (the series, the receiver's dose
    events, who sent, what ``then`` returned)."""
    receiver = DicomReceiver(workdir / f'received_{sender}', port=0, modalities=('CT',), quiet_period_s=5.0,
                             on_event=lambda kind, text, values: None)
    receiver.start()
    outcome = {}

    def sending():
        try:
            outcome['sender'] = send(paths, receiver.port, workdir, sender)
        except Exception as exc:  # noqa: BLE001 -- reported by the main thread
            outcome['error'] = exc
    thread = threading.Thread(target=sending, name='sender')
    try:
        requested = time.monotonic()
        thread.start()
        series = receiver.wait_for_series(ScanRequest('planning', 'CT', requested, ('planning',)), 120)
        result = then(series)
        thread.join()
        if 'error' in outcome:
            raise outcome['error']
        return series, receiver.rdsr_events(), outcome['sender'], result
    finally:
        thread.join()
        receiver.stop()


def instances_per_s(series) -> float:
    span = series.last_received - series.first_received
    return (series.instance_count - 1) / span if span > 0 else float('nan')


def bench_ingest() -> None:
    from pydicom.uid import generate_uid
    with tempfile.TemporaryDirectory(prefix='dicom_ingest_') as tmp:
        workdir = pathlib.Path(tmp)
        study = generate_uid()
        print('# rendering a 512x512x100 CT with the Z-frame ...', flush=True)
        paths, event, model, scenario = render_series(workdir / 'scan', study, 'planning', 12.0, 120.0, 200.0)
        report_path = write_rdsr(workdir / 'dose_report.dcm', [event], study_instance_uid=study)
        info('load_average_1min_before', os.getloadavg()[0], '(2 cores)')
        main_sender = 'storescu' if orthanc_available() else 'orthanc'

        def register(series):
            outcome = register_image(series.volume, 'zframe', model.T_base_zframe, scenario.target)
            return outcome, time.monotonic()
        series, dose_events, sender, (outcome, done) = receive(paths + [report_path], workdir, main_sender,
                                                               register)
        factors, source, _ = series_dose(series, dose_events)
        if main_sender == 'orthanc':
            scu_series, *_ = receive(paths, workdir, 'storescu')
            info('dicom_instances_per_s_from_pynetdicom_scu', instances_per_s(scu_series), 'instances/s')
        info('load_average_1min_after', os.getloadavg()[0], '(2 cores)')
    info('sent_by', 0, sender)
    info('registration_accepted', float(outcome.accepted), 'bool')
    info('series_assembly', series.completed_at - series.last_received, 's')
    info('registration', done - series.completed_at, 's')
    report('series_received_to_registration_s', done - series.last_received, 's', '<=', 3.0)
    report('dicom_instances_per_s', instances_per_s(series), 'instances/s', '>=', 200.0)
    expected = {'ctdi_vol_mgy': event.ctdi_vol_mgy, 'dlp_mgy_cm': event.dlp_mgy_cm, 'kv': event.kv}
    matched = [factors is not None and source == 'RDSR' and
               abs(getattr(factors, name) - value) <= 1e-6 * max(1.0, abs(value))
               for name, value in expected.items()]
    report('dose_fields_matched_fraction', float(np.mean(matched)), 'fraction', '>=', 1.0)


def bench_procedure() -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, '-m', 'igt_robot.demo', '--via-dicom'], capture_output=True, text=True,
                            timeout=1800, env=dict(os.environ, PYTHONPATH=str(HERE.parent / 'src' / 'igt_robot')
                                                   + os.pathsep + os.environ.get('PYTHONPATH', '')))
    tail = [line for line in result.stdout.splitlines() if line.startswith(('[demo]', '[procedure] summary'))]
    for line in tail[-3:]:
        print(f'# {line}', flush=True)
    info('procedure_via_dicom_wall', time.monotonic() - started, 's')
    report('procedure_via_dicom_completed', float(result.returncode == 0), 'bool', '>=', 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--skip-procedure', action='store_true', help='only the ingest figures (a few seconds)')
    args = parser.parse_args()
    bench_ingest()
    if not args.skip_procedure:
        bench_procedure()
    return 0


if __name__ == '__main__':
    sys.exit(main())
