"""registration_node on a real DDS graph: DICOM/NIfTI/fiducial registrations against phantom truth,
latched publication of accepted results only, refusal of every kind of bad input, the service's own
callback group, parameters, and one service call across OS processes.

Phantom scans are rendered once per module (``scenes``) and written with write_dicom_series /
write_nifti; the expected transform is T_base_scanner = T_base_zframe · inv(T_scanner_zframe_true)
with T_base_zframe from the robot model (URDF).
"""
import dataclasses
import pathlib
import re
import threading

import numpy as np
import pydicom
import pytest
import rclpy
import yaml
from rcl_interfaces.srv import GetParameters

from igt_robot import frames, testing, units
from igt_robot.imaging import DEFAULT_FIDUCIALS_ZFRAME, Volume, make_phantom, write_dicom_series, write_nifti
from igt_robot.imaging import image_input
from igt_robot.imaging.phantom import registration_case
from igt_robot.nodes import msg_convert, qos, registration_node
from igt_robot.nodes.registration_node import (PARAMS, RegistrationNode, load_volume, parse_marker_positions,
                                               resolve_image_path)
from igt_robot.robot_model import load_robot_model
from igt_robot_msgs.msg import ProcedureEvent, RegistrationResult
from igt_robot_msgs.srv import RegisterImage

REPO = pathlib.Path(__file__).resolve().parents[3]
CONFIG = REPO / 'config' / 'registration.yaml'
T_BASE_ZFRAME = load_robot_model().T_base_zframe
MAX_ERR_M = units.mm_to_m(0.5)
MAX_ERR_RAD = np.radians(0.5)


# ----------------------------------------------------------------------------------- data

@dataclasses.dataclass
class Scene:
    path: pathlib.Path          # DICOM folder or NIfTI file
    volume: Volume
    T_scanner_zframe: np.ndarray
    target: np.ndarray

    @property
    def T_base_scanner(self):
        return T_BASE_ZFRAME @ frames.invert(self.T_scanner_zframe)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp('registration_scans')
    out = {}
    # CT, 0.8 x 0.8 x 3 mm oblique slices, DICOM
    vol, truth = make_phantom(registration_case(np.random.default_rng(1), 'CT', 3.0))
    write_dicom_series(vol, root / 'ct_dicom')
    out['ct'] = Scene(root / 'ct_dicom', vol, truth.T_scanner_zframe, truth.target_center_m)
    # MR, NIfTI (RAS on disk; no modality in the file)
    vol, truth = make_phantom(registration_case(np.random.default_rng(2), 'MR', 3.0))
    (root / 'mr').mkdir()
    write_nifti(vol, root / 'mr' / 'scan.nii.gz')
    out['mr'] = Scene(root / 'mr' / 'scan.nii.gz', vol, truth.T_scanner_zframe, truth.target_center_m)
    # CT with the five point fiducials on the frame block, DICOM
    spec = registration_case(np.random.default_rng(1), 'CT', 3.0, fiducials_zframe=DEFAULT_FIDUCIALS_ZFRAME)
    spec.shape_kji = (spec.shape_kji[0] + 8, spec.shape_kji[1] + 16, spec.shape_kji[2] + 16)   # room for markers
    vol, truth = make_phantom(spec)
    write_dicom_series(vol, root / 'fid_dicom')
    out['fid'] = Scene(root / 'fid_dicom', vol, truth.T_scanner_zframe, truth.target_center_m)
    out['root'] = root
    return out


def transform_error(T_est, T_true):
    """(rotation angle rad, translation distance m) between two 4x4 transforms."""
    angle = frames.rotation_angle(T_est[:3, :3].T @ T_true[:3, :3])
    return angle, float(np.linalg.norm(T_est[:3, 3] - T_true[:3, 3]))


# ----------------------------------------------------------------------------------- probe

class Probe:
    """Registration client + /registration/result and /procedure/events collector.

    The client and subscriptions are created before the node joins the spinning executor.
    """

    def __init__(self, graph, name='registration_probe', params_client=False):
        self.node = rclpy.create_node(name, context=graph.context)
        self.params_client = (self.node.create_client(GetParameters, '/registration_node/get_parameters')
                              if params_client else None)
        self.lock = threading.Lock()
        self.results, self.events = [], []
        self.node.create_subscription(RegistrationResult, '/registration/result', self._keep(self.results),
                                      qos.LATCHED)
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self._keep(self.events), qos.EVENTS)
        self.client = self.node.create_client(RegisterImage, '/registration/register')
        graph.add(self.node)

    def _keep(self, store):
        def callback(msg):
            with self.lock:
                store.append(msg)
        return callback

    def call_async(self, image_path, method='', target=None):
        assert self.client.wait_for_service(timeout_sec=20.0), '/registration/register not available'
        request = RegisterImage.Request(image_path=str(image_path), method=method)
        if target is not None:
            request.has_target = True
            request.target_scanner.x, request.target_scanner.y, request.target_scanner.z = (float(v) for v in target)
        return self.client.call_async(request)

    def call(self, image_path, method='', target=None, timeout=60.0):
        future = self.call_async(image_path, method, target)
        return testing.wait_for(lambda: future.done() and future.result(), timeout, f'reply for {image_path}')

    def registration_events(self):
        with self.lock:
            return [e for e in self.events if e.source == 'registration_node']

    def wait_events(self, n, timeout=20.0):
        testing.wait_for(lambda: len(self.registration_events()) >= n, timeout, f'{n} registration event(s)')
        return self.registration_events()


def start_node(graph, *params):
    args = ['--ros-args', '--params-file', str(CONFIG)]
    for p in params:
        args += ['-p', p]
    return graph.add(RegistrationNode(context=graph.context, cli_args=args))


def assert_matches_truth(result, scene):
    T = msg_convert.transform_matrix(result.transform.transform)
    angle, dist = transform_error(T, scene.T_base_scanner)
    assert angle < MAX_ERR_RAD, f'rotation error {np.degrees(angle):.3f} deg'
    assert dist < MAX_ERR_M, f'translation error {units.m_to_mm(dist):.3f} mm'
    # and where it matters: the target mapped into base_link
    mapped = frames.apply(T, scene.target)
    assert np.linalg.norm(mapped - frames.apply(scene.T_base_scanner, scene.target)) < MAX_ERR_M


# ----------------------------------------------------------------------------------- tests

def test_node_takes_the_zframe_mounting_from_the_robot_model(graph):
    node = start_node(graph)
    expected = frames.make_transform(frames.rotation_from_quaternion_xyzw([-np.sqrt(0.5), 0.0, 0.0, np.sqrt(0.5)]),
                                     [0.0, 0.080, 0.030])       # rpy (-pi/2, 0, 0), contracts.md
    np.testing.assert_allclose(T_BASE_ZFRAME, expected, atol=1e-12)
    np.testing.assert_allclose(node.T_base_zframe, T_BASE_ZFRAME, atol=0.0)


def test_zframe_from_dicom_is_accepted_published_latched_and_matches_truth(graph, scenes):
    scene = scenes['ct']
    probe = Probe(graph)
    node = start_node(graph)
    reply = probe.call(scene.path, '', scene.target)          # empty method -> default (zframe)
    assert reply.success, reply.message
    r = reply.result
    assert 'accepted' in reply.message and 'FRE' in reply.message
    assert r.accepted and r.rejection_reason == '' and r.method == 'zframe'
    assert r.header.frame_id == 'base_link'
    assert r.transform.header.frame_id == 'base_link' and r.transform.child_frame_id == 'scanner'
    assert_matches_truth(r, scene)
    assert 0.0 < r.fre < units.mm_to_m(0.5)
    assert 0.0 < r.predicted_tre < units.mm_to_m(1.5)
    assert msg_convert.point_list(r.target_scanner) == pytest.approx(list(scene.target))
    assert r.slices_used >= 3 and r.fiducial_count >= 7 * 3
    assert len(r.residuals) == 7 and all(0.0 < v < units.mm_to_m(0.5) for v in r.residuals)
    assert r.image_source == str(scene.path.resolve())

    testing.wait_for(lambda: probe.results, 20, 'the accepted result on /registration/result')
    assert probe.results[0] == r
    (event,) = probe.wait_events(1)
    assert event.kind == 'registration_accepted' and event.severity == ProcedureEvent.INFO
    values = msg_convert.key_values_dict(event.values)
    assert float(values['fre_m']) == pytest.approx(r.fre) and float(values['tre_m']) == pytest.approx(r.predicted_tre)
    assert values['reason'] == '' and values['method'] == 'zframe'

    # LATCHED: a subscriber that joins afterwards still gets the active registration.
    late = Probe(graph, 'late_subscriber')
    testing.wait_for(lambda: late.results, 20, 'the latched result for a late subscriber')
    assert late.results[0] == r
    assert node.active == r and 'active zframe registration' in node.describe_state()

    if registration_node.TFMessage is None:
        # tf2_msgs is not installed here: the node runs without /tf_static
        assert node.tf_pub is None
    else:
        from tf2_msgs.msg import TFMessage
        tf_probe = rclpy.create_node('tf_probe', context=graph.context)
        got = []
        tf_probe.create_subscription(TFMessage, '/tf_static', got.append, qos.LATCHED)
        graph.add(tf_probe)
        testing.wait_for(lambda: got, 20, '/tf_static')
        assert got[0].transforms[0] == r.transform


def test_nifti_input_with_relative_path_under_image_root(graph, scenes):
    scene, root = scenes['mr'], scenes['root']
    probe = Probe(graph)
    start_node(graph, f'image_root:={root}')
    # relative to image_root, with a '..' that stays inside it
    reply = probe.call('mr/../mr/scan.nii.gz', 'zframe', scene.target)
    assert reply.success, reply.message
    assert reply.result.image_source == str(scene.path.resolve())
    assert_matches_truth(reply.result, scene)
    # '..' that leaves image_root: refused before anything is read
    refused = probe.call('mr/../../elsewhere.nii.gz', 'zframe')
    assert not refused.success and 'outside image_root' in refused.message
    # absolute path outside image_root
    refused = probe.call('/etc/hostname')
    assert not refused.success and 'outside image_root' in refused.message
    testing.wait_for(lambda: probe.results, 20, 'the accepted NIfTI result')
    events = probe.wait_events(3)
    assert [e.kind for e in events] == ['registration_accepted', 'registration_rejected', 'registration_rejected']
    with probe.lock:
        assert len(probe.results) == 1


def test_fiducials_method_and_marker_model_parameter(graph, scenes):
    scene = scenes['fid']
    probe = Probe(graph)
    start_node(graph)
    reply = probe.call(scene.path, 'fiducials', scene.target)
    assert reply.success, reply.message
    r = reply.result
    assert r.method == 'fiducials' and r.fiducial_count == 5 and r.slices_used == 0 and len(r.residuals) == 5
    assert 0.0 < r.predicted_tre < units.mm_to_m(1.5)
    assert_matches_truth(r, scene)


def test_custom_marker_model(graph, scenes):
    """fiducials.model = custom: only the four markers listed are matched (the fifth is ignored)."""
    scene = scenes['fid']
    custom = [float(v) for v in DEFAULT_FIDUCIALS_ZFRAME[:4].ravel()]
    probe = Probe(graph)
    start_node(graph, 'fiducials.model:=custom', f'fiducials.custom_positions_m:={custom}')
    reply = probe.call(scene.path, 'fiducials')
    assert reply.success, reply.message
    assert reply.result.fiducial_count == 4
    assert reply.result.predicted_tre == 0.0          # no target in the request
    assert_matches_truth(reply.result, scene)


def test_bad_custom_marker_model_stops_the_node_at_start(graph):
    with pytest.raises(ValueError, match='collinear'):
        start_node(graph, 'fiducials.model:=custom',
                   'fiducials.custom_positions_m:=[0.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.02, 0.0, 0.0]')


def test_bad_custom_marker_models_refused():
    with pytest.raises(ValueError, match='collinear'):
        parse_marker_positions([0, 0, 0, 0.01, 0, 0, 0.02, 0, 0, 0.03, 0, 0])
    with pytest.raises(ValueError, match='3 values per marker'):
        parse_marker_positions([0.0, 0.01, 0.02, 0.03])
    with pytest.raises(ValueError, match='not millimetres'):
        parse_marker_positions([-48.0, -42.0, -23.0, 51.0, -40.0, -13.0, 49.0, 23.0, 30.0])


def _write_bad_inputs(scenes, root: pathlib.Path):
    """(image_path, method, target, expected text in the message) for every kind of bad input."""
    ct = scenes['ct']
    small = Volume(ct.volume.data[:8], ct.volume.affine, 'CT')      # 8 slices: quick to write and read
    cases = []

    def case(path, expected, method='', target=None):
        cases.append((str(path), method, target, expected))

    case('', 'image_path is empty')
    case(root / 'no_such_scan', 'does not exist')
    (root / 'empty_dir').mkdir()
    case(root / 'empty_dir', 'is empty')
    (root / 'notes').mkdir()
    (root / 'notes' / 'readme.txt').write_text('not an image')
    case(root / 'notes', 'no DICOM images')
    (root / 'nifti_dir').mkdir()
    write_nifti(small, root / 'nifti_dir' / 'scan.nii')
    case(root / 'nifti_dir', 'not a DICOM series folder')
    case(root / 'notes' / 'readme.txt', 'unsupported image file')
    (root / 'corrupt.nii.gz').write_bytes(b'\x1f\x8b' + bytes(range(256)) * 4)
    case(root / 'corrupt.nii.gz', 'cannot read NIfTI file')
    (root / 'zero.nii').write_bytes(b'')
    case(root / 'zero.nii', 'empty (0 bytes)')
    # DICOM: one slice alone, a missing slice, a slice with another pixel spacing, two series, zero spacing
    paths = write_dicom_series(small, root / 'single')
    case(paths[3], 'single DICOM file')
    paths = write_dicom_series(small, root / 'gap')
    paths[4].unlink()
    case(root / 'gap', 'missing slice')
    paths = write_dicom_series(small, root / 'mixed_spacing')
    ds = pydicom.dcmread(str(paths[2]))
    ds.PixelSpacing = ['0.5', '0.5']
    ds.save_as(str(paths[2]))
    case(root / 'mixed_spacing', 'inconsistent series')
    write_dicom_series(small, root / 'two_series' / 'a')
    write_dicom_series(small, root / 'two_series' / 'b')
    case(root / 'two_series', 'holds 2 series')
    for path in write_dicom_series(small, root / 'zero_spacing'):
        ds = pydicom.dcmread(str(path))
        ds.PixelSpacing = ['0', '0']
        ds.save_as(str(path))
    case(root / 'zero_spacing', 'zero or negative pixel spacing')
    write_dicom_series(Volume(ct.volume.data[:2], ct.volume.affine, 'CT'), root / 'two_slices')
    case(root / 'two_slices', 'need at least 3')
    # voxel values: NaN, wrong intensity range (HU x 100: a missing rescale)
    nan_data = small.data.copy()
    nan_data[4, 10:20, 10:20] = np.nan
    write_nifti(small.with_data(nan_data), root / 'nan.nii.gz')
    case(root / 'nan.nii.gz', 'NaN')
    write_nifti(small.with_data(small.data * 100.0), root / 'x100.nii.gz')
    case(root / 'x100.nii.gz', 'Hounsfield range')
    # the frame: absent, partly outside the field of view
    spec = registration_case(np.random.default_rng(1), 'CT', 3.0)
    no_frame, _ = make_phantom(dataclasses.replace(spec, T_scanner_zframe=None))
    write_nifti(no_frame, root / 'no_frame.nii.gz')
    case(root / 'no_frame.nii.gz', 'Z-frame not found')
    ni = ct.volume.data.shape[2]
    write_nifti(Volume(ct.volume.data[:, :, :ni // 2 + 10], ct.volume.affine, 'CT'), root / 'cut.nii.gz')
    case(root / 'cut.nii.gz', 'outside the field of view')
    # the request: unknown method, non-finite target, a target too far for the TRE limit
    case(ct.path, "unknown registration method 'icp'", method='icp')
    case(ct.path, 'target_scanner must be 3 finite', target=(0.0, float('nan'), 0.0))
    # 100 m away: the rotation uncertainty times that lever arm exceeds the 1.5 mm limit
    case(ct.path, 'predicted TRE at the target', target=ct.T_scanner_zframe[:3, 3] + [0.0, 100.0, 0.0])
    return cases


def test_bad_inputs_are_refused_and_never_published(graph, scenes, tmp_path):
    cases = _write_bad_inputs(scenes, tmp_path)
    probe = Probe(graph)
    node = start_node(graph)
    for path, method, target, expected in cases:
        reply = probe.call(path, method, target)
        assert not reply.success, (path, reply.message)
        assert expected in reply.message, (path, expected, reply.message)
        r = reply.result
        assert not r.accepted and r.rejection_reason and r.rejection_reason in reply.message
        assert msg_convert.transform_matrix(r.transform.transform) == pytest.approx(np.eye(4))
    events = probe.wait_events(len(cases))
    assert [e.kind for e in events] == ['registration_rejected'] * len(cases)
    assert all(e.severity == ProcedureEvent.WARN and 'no registration is active' in e.description for e in events)
    for event, (_, _, _, expected) in zip(events, cases):
        assert expected in msg_convert.key_values_dict(event.values)['reason']
    assert node.active is None and node.accepted_count == 0

    # A good registration now: it is the FIRST thing the subscriber ever receives (DDS keeps one
    # writer's order, so a rejected result published earlier would have arrived before it).
    good = probe.call(scenes['ct'].path)
    assert good.success, good.message
    testing.wait_for(lambda: probe.results, 20, 'the accepted result')
    assert probe.results == [good.result]
    # A rejected attempt afterwards leaves it active, and says so.
    bad = probe.call(tmp_path / 'no_frame.nii.gz')
    assert not bad.success
    last = probe.wait_events(len(cases) + 2)[-1]
    assert last.kind == 'registration_rejected' and 'previous registration stays active' in last.description
    late = Probe(graph, 'late_subscriber')
    testing.wait_for(lambda: late.results, 20, 'the latched result for a late subscriber')
    assert late.results == [good.result] and node.active == good.result


def test_registration_runs_in_its_own_group_and_does_not_block_other_callbacks(graph, scenes, monkeypatch):
    """While a registration is in progress (held inside the image loading), the node still answers
    its parameter service (default callback group); a second registration waits its turn."""
    entered, release = threading.Event(), threading.Event()
    real_load = registration_node.load_volume
    inside = []

    def held_load(path, modality='auto'):
        inside.append(path)
        assert len(inside) - len(done) == 1, 'two registrations ran at once'
        entered.set()
        release.wait(30.0)
        return real_load(path, modality)

    done = []
    monkeypatch.setattr(registration_node, 'load_volume', held_load)
    probe = Probe(graph, params_client=True)
    params_client = probe.params_client
    node = start_node(graph)
    assert node.service.callback_group is node.service_group is not node.default_callback_group

    first = probe.call_async(scenes['ct'].path)
    second = probe.call_async(scenes['ct'].path)
    assert entered.wait(20.0), 'the first registration did not start'
    assert params_client.wait_for_service(timeout_sec=20.0)
    answer = params_client.call_async(GetParameters.Request(names=['default_method']))
    testing.wait_for(answer.done, 20, 'the parameter service while a registration is running')
    assert answer.result().values[0].string_value == 'zframe'
    assert not first.done() and not second.done() and len(inside) == 1
    done.append(1)
    release.set()
    testing.wait_for(lambda: first.done() and second.done(), 60, 'both registrations')
    assert first.result().success and second.result().success and node.attempts == 2


def test_resolve_image_path(tmp_path):
    root = tmp_path / 'images'
    (root / 'a').mkdir(parents=True)
    (root / 'a' / 'scan.nii').write_bytes(b'x')
    assert resolve_image_path('a/../a/scan.nii', str(root)) == (root / 'a' / 'scan.nii').resolve()
    assert resolve_image_path(str(root / 'a' / '..' / 'a' / 'scan.nii')) == (root / 'a' / 'scan.nii').resolve()
    (tmp_path / 'secret.nii').write_bytes(b'x')
    (root / 'link.nii').symlink_to(tmp_path / 'secret.nii')     # a symlink cannot lead outside either
    with pytest.raises(ValueError, match='outside image_root'):
        resolve_image_path('link.nii', str(root))
    with pytest.raises(ValueError, match='outside image_root'):
        resolve_image_path('../secret.nii', str(root))
    with pytest.raises(ValueError, match='empty'):
        resolve_image_path('   ', str(root))
    with pytest.raises(ValueError, match='does not exist'):
        resolve_image_path('a/missing.nii', str(root))


def test_folder_with_too_many_files_is_refused_without_crawling(tmp_path, monkeypatch):
    monkeypatch.setattr(image_input, 'MAX_FOLDER_FILES', 3)
    for n in range(5):
        (tmp_path / f'f{n}.dcm').write_bytes(b'x')
    with pytest.raises(ValueError, match='holds more than 3 files'):
        load_volume(tmp_path)


def test_nifti_modality_is_guessed_from_intensities(scenes, tmp_path):
    assert load_volume(scenes['mr'].path).modality == 'MR'
    write_nifti(Volume(scenes['ct'].volume.data[:8], scenes['ct'].volume.affine, 'CT'), tmp_path / 'ct.nii.gz')
    assert load_volume(tmp_path / 'ct.nii.gz').modality == 'CT'
    assert load_volume(tmp_path / 'ct.nii.gz', 'MR').modality == 'MR'


def test_config_file_lists_every_parameter_with_its_default():
    section = yaml.safe_load(CONFIG.read_text())['registration_node']['ros__parameters']

    def flat(d, prefix=''):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f'{prefix}{key}.')
            else:
                yield f'{prefix}{key}', value
    values = dict(flat(section))
    assert set(values) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert p.description
        assert values[p.name] == pytest.approx(p.default), p.name
    # every line that sets a value is directly preceded by its comment
    lines = CONFIG.read_text().splitlines()
    setters = [n for n, line in enumerate(lines) if re.match(r'^\s+[a-z_]+:\s*\S', line)]
    assert len(setters) == len(PARAMS)
    for n in setters:
        assert lines[n - 1].strip().startswith('#'), f'no comment above: {lines[n]}'


def test_service_call_across_processes(graph, processes, scenes):
    scene = scenes['ct']
    probe = Probe(graph, 'cross_process_probe')
    proc = processes('igt_robot.nodes.registration_node', '--ros-args', '--params-file', str(CONFIG),
                     name='registration_node')
    testing.wait_for(lambda: probe.client.service_is_ready() or not proc.alive(), 30, 'the node process')
    assert proc.alive(), proc.output()
    reply = probe.call(scene.path, 'zframe', scene.target)
    assert reply.success, reply.message
    assert_matches_truth(reply.result, scene)
    testing.wait_for(lambda: probe.results, 20, 'the result from the other process')
    assert probe.results[0] == reply.result
    refused = probe.call(scene.path.parent / 'missing')
    assert not refused.success and 'does not exist' in refused.message
    events = probe.wait_events(2)
    assert [e.kind for e in events] == ['registration_accepted', 'registration_rejected']
    assert proc.stop() == 0, proc.output()
