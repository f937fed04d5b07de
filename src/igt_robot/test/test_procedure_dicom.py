"""The procedure node with a scanner it does not control: scans requested from the operator, received over
DICOM, matched to the request, dose recorded from the images; the registration node takes the volume from
memory instead of re-reading it."""
import threading
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid
from rclpy.parameter import Parameter
from test_dicom_acquisition import dose_event, write_ct

from igt_robot import testing
from igt_robot.acquisition import memory as image_memory
from igt_robot.imaging.io import write_dicom_series
from igt_robot.imaging.phantom import make_phantom, registration_case
from igt_robot.nodes import qos
from igt_robot.nodes.procedure_node import ProcedureNode
from igt_robot.nodes.registration_node import RegistrationNode
from igt_robot.simulation.dicom_peer import store_files
from igt_robot.simulation.rdsr import write_rdsr
from igt_robot_msgs.msg import DoseRecord, ProcedureEvent


@pytest.fixture
def graph():
    with testing.SpinningGraph() as g:
        yield g


def procedure_node(graph, tmp_path, **params):
    values = dict(procedure_id='dicom-test', record_dir=str(tmp_path / 'record'), acquisition='dicom',
                  dicom_port=0, dicom_allowed_calling_aets='SIM_CT', series_quiet_period_s=1.0,
                  scan_wait_timeout=30.0, dose_report_wait_s=5.0)
    values.update(params)
    node = ProcedureNode(context=graph.context,
                         parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    return graph.add(node)


class Probe:
    def __init__(self, graph):
        self.node = graph.create_node('probe')
        self.doses, self.events = [], []
        self.node.create_subscription(DoseRecord, '/scanner/dose', self.doses.append, qos.EVENTS)
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self.events.append, qos.EVENTS)

    def kinds(self):
        return [e.kind for e in self.events]


def test_the_operator_is_asked_and_the_matching_series_with_its_dose_report_is_used(graph, tmp_path):
    probe = Probe(graph)
    node = procedure_node(graph, tmp_path)
    assert node.scanner is None and node.target is None       # no simulation behind a real scanner
    assert node.command('start', '', 'op').accepted
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=node.command('load_planning_scan', '', 'op')))
    worker.start()
    testing.wait_for(lambda: 'scan_requested' in probe.kinds(), 10, 'the operator to be asked for the scan')
    prompt = next(e for e in probe.events if e.kind == 'scan_requested').description
    assert 'acquire the planning scan now' in prompt
    # A series for something else arrives first: reported, not used.
    _, other = write_ct(tmp_path / 'other', description='igt_robot control', protocol='control scan', seed=3)
    store_files(other, '127.0.0.1', node.source.port, calling_ae='SIM_CT')
    testing.wait_for(lambda: 'series_not_used' in probe.kinds(), 10, 'the other series to be reported')
    event_uid, study = generate_uid(), generate_uid()
    volume, paths = write_ct(tmp_path / 'plan', description='igt_robot planning', protocol='planning scan',
                             ctdi=12.0, kv=120.0, mas=200, event_uid=event_uid, study_uid=study)
    sr_event = dose_event(event_uid, 'planning scan', 12.0, 31.5, 120.0, 200.0)
    report = write_rdsr(tmp_path / 'sr.dcm', [sr_event], study_instance_uid=study)
    store_files(paths + [report], '127.0.0.1', node.source.port, calling_ae='SIM_CT')
    worker.join(30)
    assert outcome['r'].accepted, outcome['r'].message
    np.testing.assert_allclose(node.state.planning_volume.data, volume.data)
    dose = testing.wait_for(lambda: probe.doses and probe.doses[-1], 10, 'the dose record')
    assert (dose.source, dose.procedure_id, dose.dlp_mgy_cm, dose.ctdi_vol_mgy, dose.kv) == \
        (DoseRecord.SOURCE_RDSR, 'dicom-test', 31.5, 12.0, 120.0)
    assert dose.series_instance_uid == node.state.planning_scan.series_instance_uid


def test_a_requested_scan_that_never_arrives_fails_the_step_with_the_reason(graph, tmp_path):
    node = procedure_node(graph, tmp_path, scan_wait_timeout=1.0)
    node.command('start', '', 'op')
    outcome = node.command('load_planning_scan', '', 'op')
    assert not outcome.accepted and 'no CT series for the planning scan arrived within 1 s' in outcome.message
    assert outcome.step == 'LOAD_PLANNING_SCAN'


def test_stop_withdraws_a_scan_request(graph, tmp_path):
    node = procedure_node(graph, tmp_path, scan_wait_timeout=600.0)
    node.command('start', '', 'op')
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=node.command('load_planning_scan', '', 'op')))
    worker.start()
    testing.wait_for(lambda: node._scan_wait.is_set(), 10, 'the scan to be awaited')
    assert 'scan request withdrawn' in node.command('stop', '', 'op').message
    worker.join(10)
    assert not outcome['r'].accepted and 'withdrawn' in outcome['r'].message


def test_abort_takes_effect_while_a_scan_request_is_pending(graph, tmp_path):
    node = procedure_node(graph, tmp_path, scan_wait_timeout=600.0)
    node.command('start', '', 'op')
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=node.command('load_planning_scan', '', 'op')))
    worker.start()
    testing.wait_for(lambda: node._scan_wait.is_set(), 10, 'the scan to be awaited')
    aborted = node.command('abort', 'patient moved', 'op')
    assert aborted.accepted and aborted.step == 'ABORTED', aborted.message
    assert 'scan request withdrawn' in aborted.message
    worker.join(10)
    assert not outcome['r'].accepted and 'withdrawn' in outcome['r'].message


def test_manual_dose_entry_is_recorded_and_flagged(graph, tmp_path):
    probe = Probe(graph)
    node = procedure_node(graph, tmp_path)
    assert not node.command('enter_dose', 'scan01 12 abc 120 200', 'op').accepted
    assert node.command('enter_dose', 'scan01 12 240 120 200', 'op').accepted
    dose = testing.wait_for(lambda: probe.doses and probe.doses[-1], 10, 'the dose record')
    assert dose.source == DoseRecord.SOURCE_MANUAL and dose.dlp_mgy_cm == 240.0


def test_the_registration_node_takes_the_volume_from_memory(graph, tmp_path):
    node = graph.add(RegistrationNode(context=graph.context))
    volume, truth = make_phantom(registration_case(np.random.default_rng(1), 'CT', 3.0))
    folder = tmp_path / 'series'
    write_dicom_series(volume, folder)
    for path in folder.glob('*.dcm'):
        path.write_bytes(b'overwritten: reading the disk would fail')
    reply = node.register(str(folder), 'zframe', tuple(truth.target_center_m))
    assert not reply.success                       # the disk copy is unusable ...
    image_memory.put(folder, volume)
    try:
        started = time.monotonic()
        reply = node.register(str(folder), 'zframe', tuple(truth.target_center_m))
    finally:
        image_memory.clear()
    assert reply.success, reply.message            # ... the in-memory volume is what was registered
    assert time.monotonic() - started < 60
