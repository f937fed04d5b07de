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

from igt_robot import frames, testing
from igt_robot.acquisition import memory as image_memory
from igt_robot.imaging.io import write_dicom_series
from igt_robot.imaging.phantom import PhantomSpec, make_phantom, registration_case, rotation_from_euler_deg
from igt_robot.nodes import qos
from igt_robot.nodes.procedure_node import ProcedureNode
from igt_robot.nodes.registration_node import RegistrationNode
from igt_robot.simulation.dicom_peer import store_files
from igt_robot.simulation.rdsr import write_rdsr
from igt_robot.workflow import Step
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


def awaiting_the_planning_scan(graph, tmp_path):
    """A node whose load_planning_scan (in a thread) waits for a series that does not come: (node, outcome, thread);
    ``outcome['r']`` is the step's result once the thread has ended."""
    node = procedure_node(graph, tmp_path, scan_wait_timeout=600.0)
    node.command('start', '', 'op')
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=node.command('load_planning_scan', '', 'op')))
    worker.start()
    testing.wait_for(lambda: node._scan_wait.is_set(), 10, 'the scan to be awaited')
    return node, outcome, worker


def test_stop_withdraws_a_scan_request(graph, tmp_path):
    node, outcome, worker = awaiting_the_planning_scan(graph, tmp_path)
    assert 'scan request withdrawn' in node.command('stop', '', 'op').message
    worker.join(10)
    assert not outcome['r'].accepted and 'withdrawn' in outcome['r'].message


def test_abort_takes_effect_while_a_scan_request_is_pending(graph, tmp_path):
    node, outcome, worker = awaiting_the_planning_scan(graph, tmp_path)
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


# ---------------------------------------------------------------- the target motion check on a control scan
READY = {'state': 'READY', 'motion_permitted': True}
GRID = dict(spacing_m=(0.002, 0.002, 0.002), shape_kji=(40, 70, 70), center_m=(0.0, -0.06, 0.0))  # coarse: fast


def at_control_scan(node):
    """The node's workflow after one insertion step (the steps before are not what is tested here)."""
    for name, arg, safety in (('start', '', None), ('load_planning_scan', 'CT-1', None), ('register', 'z', None),
                              ('plan', 'p1', None), ('confirm_plan', '', None), ('align', '', READY),
                              ('motion_done', '', None), ('confirm_alignment', '', None),
                              ('insert_step', '', READY), ('motion_done', '', None)):
        assert node.workflow.command(name, arg, safety, operator_id='op').accepted, name
    assert node.workflow.step is Step.CONTROL_SCAN


def control_scan_of(graph, tmp_path, T_anatomy, **params):
    """Run control_scan on a node whose planning scan is a phantom; the control scan arrives over DICOM with
    the phantom's anatomy moved by ``T_anatomy``. Returns (node, probe, outcome)."""
    probe = Probe(graph)
    node = procedure_node(graph, tmp_path, dose_report_wait_s=0.0, **params)
    planning, truth = make_phantom(PhantomSpec(modality='CT', seed=1, **GRID))
    node.state.planning_volume, node.target = planning, truth.target_center_m.copy()
    at_control_scan(node)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(r=node.command('control_scan', '', 'op')))
    worker.start()
    testing.wait_for(lambda: node._scan_wait.is_set(), 10, 'the control scan to be awaited')
    spec = PhantomSpec(modality='CT', seed=2, **GRID)
    spec.T_anatomy = T_anatomy
    later, _ = make_phantom(spec)
    paths = write_dicom_series(later, tmp_path / 'control', series_description='igt_robot control',
                               extra_attributes={'ProtocolName': 'control scan', 'ImagesInAcquisition': 40,
                                                 'CTDIvol': 4.0, 'KVP': '100', 'Exposure': 60})
    store_files(paths, '127.0.0.1', node.source.port, calling_ae='SIM_CT')
    worker.join(120)
    assert not worker.is_alive()
    return node, probe, outcome['r']


def test_a_control_scan_showing_the_target_moved_holds_the_workflow_for_the_operator(graph, tmp_path):
    moved = frames.make_transform(rotation_from_euler_deg(1.0, -1.5, 2.0), (0.002, 0.0015, -0.001))
    node, probe, outcome = control_scan_of(graph, tmp_path, moved, motion_tolerance_m=0.002)
    assert outcome.accepted and 'HELD: target moved' in outcome.message, outcome.message
    checked = testing.wait_for(lambda: [e for e in probe.events if e.kind == 'motion_checked'], 10, 'the check')
    values = {kv.key: kv.value for kv in checked[0].values}
    assert values['moved'] == 'true' and float(values['displacement_m']) > 0.002
    assert 'target_moved' in probe.kinds()
    # Nothing advances on the stale plan until the operator decides; the decision is recorded.
    refused = node.command('confirm_next', '', 'op')
    assert not refused.accepted and 'accept_motion' in refused.message
    assert not node.command('done', '', 'op').accepted
    assert node.command('accept_motion', 'margin is enough', 'op').accepted
    assert node.command('confirm_next', '', 'op').accepted


def test_a_control_scan_without_motion_does_not_hold(graph, tmp_path):
    node, probe, outcome = control_scan_of(graph, tmp_path, np.eye(4))
    assert outcome.accepted and 'HELD' not in outcome.message, outcome.message
    checked = testing.wait_for(lambda: [e for e in probe.events if e.kind == 'motion_checked'], 10, 'the check')
    assert {kv.key: kv.value for kv in checked[0].values}['moved'] == 'false'
    assert not node.workflow.context.motion_hold
    assert node.command('confirm_next', '', 'op').accepted


# ---------------------------------------------------------------- abort during a motion
class MotionUnderWay:
    """A motion step holding the command lock until its goal is cancelled (what _run_action does)."""

    def __init__(self, node):
        self.node, self.cancelled = node, threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._step)

    def cancel_goal_async(self):
        self.cancelled.set()

    def _step(self):
        with self.node.lock:
            self.node._active_goal = self
            self.started.set()
            self.cancelled.wait(30)
            self.node._active_goal = None


def test_abort_during_a_motion_cancels_it_at_once_and_is_recorded(graph, tmp_path):
    probe = Probe(graph)
    node = procedure_node(graph, tmp_path)
    assert node.command('start', '', 'op').accepted
    motion = MotionUnderWay(node)
    motion.thread.start()
    motion.started.wait(10)
    aborted = node.command('abort', 'patient coughs', 'op')
    assert motion.cancelled.is_set()
    assert aborted.accepted and aborted.step == 'ABORTED', aborted.message
    assert 'motion cancel requested' in aborted.message
    motion.thread.join(10)
    testing.wait_for(lambda: 'workflow_confirmation' in probe.kinds(), 10, 'the abort in the record')
