"""The scanner's side of a DICOM link, for the simulation, the tests and the benchmark (no rclpy).

* :func:`store_files` -- a Storage SCU (pynetdicom, what ``storescu`` does): sends
  files to an SCP in one association.
* :class:`OrthancPeer` -- a private Orthanc instance (the Debian ``orthanc``
  package) standing in for the scanner's or the PACS's DICOM node: its own
  configuration, storage folder and ports on 127.0.0.1, one modality entry for
  the stack's receiver. Series are loaded through its REST API and sent with
  C-STORE (``/modalities/<name>/store``), as a PACS forwards them.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from typing import Iterable, List, Optional, Sequence

ORTHANC_BINARY = '/usr/sbin/Orthanc'


class PeerError(RuntimeError):
    """The DICOM peer could not do what was asked; the message says why."""


def store_files(paths: Sequence, host: str, port: int, *, called_ae: str = 'IGT_ROBOT',
                calling_ae: str = 'SIM_CT', abort_after: Optional[int] = None) -> List[int]:
    """C-STORE ``paths`` in one association; the status of each (``abort_after``: drop the
    connection after that many instances, as a cable pulled mid-series)."""
    import pydicom
    from pynetdicom import AE

    from igt_robot.acquisition.dicom_receiver import set_no_delay
    datasets = [pydicom.dcmread(str(p)) for p in paths]
    ae = AE(ae_title=calling_ae)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}))
    assoc = ae.associate(host, int(port), ae_title=called_ae)
    if not assoc.is_established:
        raise PeerError(f'association {calling_ae} -> {called_ae}@{host}:{port} not established '
                        f'(rejected or no SCP)')
    set_no_delay(assoc)
    statuses = []
    try:
        for n, ds in enumerate(datasets):
            if abort_after is not None and n >= abort_after:
                assoc.abort()
                return statuses
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if 'Status' in status else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _lower_priority() -> None:
    """The stand-in for the scanner's DICOM node runs on another machine in a real suite; on one shared machine
    it must not take the CPU from the robot's control process."""
    try:
        os.nice(10)
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def orthanc_available() -> str:
    """'' when Orthanc can be started here, else why not (a test skips with this reason)."""
    binary = shutil.which('Orthanc') or (ORTHANC_BINARY if os.path.exists(ORTHANC_BINARY) else None)
    if binary is None:
        return 'Orthanc is not installed (Debian package orthanc; .ci/run installs it)'
    return ''


class OrthancPeer:
    """A private Orthanc: ``with OrthancPeer(folder, receivers={'stack': ('IGT_ROBOT', port)}) as orthanc``."""

    def __init__(self, folder, receivers: dict, aet: str = 'SIM_CT', startup_timeout: float = 30.0):
        problem = orthanc_available()
        if problem:
            raise PeerError(problem)
        self.folder = pathlib.Path(folder)
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f'http://127.0.0.1:{self.http_port}'
        self.receivers = dict(receivers)
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None

    @classmethod
    def attach(cls, url: str) -> 'OrthancPeer':
        """A handle on an Orthanc already running at ``url`` (REST only; not started or stopped here)."""
        peer = cls.__new__(cls)
        peer.url, peer.process, peer.receivers = url.rstrip('/'), None, {}
        return peer

    def __enter__(self) -> 'OrthancPeer':
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            'Name': 'igt_robot-peer', 'StorageDirectory': str(self.folder / 'storage'),
            'IndexDirectory': str(self.folder / 'storage'), 'StorageCompression': False,
            'HttpPort': self.http_port, 'RemoteAccessAllowed': False, 'AuthenticationEnabled': False,
            'DicomServerEnabled': True, 'DicomAet': self.aet, 'DicomPort': self.dicom_port,
            'DicomCheckCalledAet': True, 'DicomAssociationCloseDelay': 0, 'DicomScuTimeout': 30,
            'DicomModalities': {name: [ae, '127.0.0.1', int(port)] for name, (ae, port) in self.receivers.items()},
            'Plugins': [], 'ConcurrentJobs': 1, 'HttpThreadsCount': 4, 'SaveJobs': False,
            'StableAge': 1, 'DicomAlwaysAllowStore': False, 'DicomAlwaysAllowEcho': True,
            'MaximumPduLength': 131072,     # Orthanc's largest: fewer P-DATA PDUs per slice for the receiver
        }
        path = self.folder / 'orthanc.json'
        path.write_text(json.dumps(config, indent=2))
        self.log = open(self.folder / 'orthanc.log', 'wb')
        self.process = subprocess.Popen([shutil.which('Orthanc') or ORTHANC_BINARY, str(path)], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_lower_priority)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                self.log.close()
                raise PeerError(f'Orthanc exited with {self.process.returncode} at start; see '
                                f'{self.folder / "orthanc.log"}')
            try:
                self.get('/system')
                return
            except (OSError, PeerError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(f'Orthanc did not answer on {self.url} within {self.startup_timeout:g} s')
                time.sleep(0.1)     # poll interval while Orthanc starts

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self.log.close()

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, body: bytes = None, content_type='application/json'):
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={'Content-Type': content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                data = reply.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f'Orthanc {method} {path}: HTTP {exc.code} {exc.read()[:300]!r}') from exc
        return json.loads(data) if data else None

    def get(self, path: str):
        return self._request('GET', path)

    def upload(self, paths: Iterable) -> List[str]:
        """Load files into Orthanc in one POST /instances (a ZIP archive); the Orthanc ids of the instances."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
            for n, p in enumerate(paths):
                archive.write(str(p), f'{n:05d}.dcm')
        reply = self._request('POST', '/instances', buffer.getvalue(), 'application/zip')
        replies = reply if isinstance(reply, list) else [reply]
        failed = [r for r in replies if r.get('Status') not in ('Success', 'AlreadyStored')]
        if failed:
            raise PeerError(f'Orthanc refused {len(failed)} file(s): {failed[0]}')
        return [r['ID'] for r in replies]

    def send(self, receiver: str, instance_ids: Sequence[str]) -> dict:
        """C-STORE the instances to the modality ``receiver`` (synchronously); Orthanc's answer."""
        body = json.dumps({'Resources': list(instance_ids), 'Synchronous': True}).encode()
        return self._request('POST', f'/modalities/{receiver}/store', body)

    def upload_and_send(self, receiver: str, paths: Iterable) -> dict:
        return self.send(receiver, self.upload(paths))
