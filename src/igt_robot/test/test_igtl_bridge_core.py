"""OpenIGTLink bridge core: a real pyigtl client talks to the bridge over loopback."""
import socket
import struct
import threading
import time

import numpy as np
import pytest

pyigtl = pytest.importorskip('pyigtl', reason='pyigtl not installed')

from igt_robot import frames, units  # noqa: E402
from igt_robot.igtl import BridgeConfig, BridgeConfigError, BridgeCore, StatusCode, StatusMessage  # noqa: E402
from igt_robot.igtl.server import HEADER, StreamReader  # noqa: E402
from pyigtl.messages import CRC64  # noqa: E402

TIMEOUT = 5.0


def wait_for(condition, timeout=TIMEOUT, what='condition'):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f'timed out waiting for {what}')


class Recorder:
    """Callbacks that remember what they got; command answers are scripted."""

    def __init__(self):
        self.targets, self.entries, self.commands, self.images, self.calibrations = [], [], [], [], []
        self.statuses, self.events = [], []
        self.command_answer = {}
        self.lock = threading.Lock()

    def on_target(self, p):
        self.targets.append(p)

    def on_entry(self, p):
        self.entries.append(p)

    def on_command(self, name, arg):
        self.commands.append((name, arg))
        return self.command_answer.get(name, (True, f'{name} done'))

    def on_image(self, image):
        self.images.append(image)

    def on_calibration(self, T):
        self.calibrations.append(T)

    def on_status(self, *args):
        self.statuses.append(args)

    def on_event(self, kind, details):
        with self.lock:
            self.events.append((kind, details))


@pytest.fixture
def link():
    rec = Recorder()
    core = BridgeCore(BridgeConfig(port=0, max_image_bytes=20_000), on_target=rec.on_target, on_entry=rec.on_entry,
                      on_command=rec.on_command, on_image=rec.on_image, on_calibration=rec.on_calibration,
                      on_status=rec.on_status, on_event=rec.on_event)
    port = core.start()
    client = pyigtl.OpenIGTLinkClient('127.0.0.1', port)
    try:
        wait_for(lambda: core.connected and client.is_connected(), what='connection')
        yield core, client, rec
    finally:
        client.stop()
        core.stop()


def send(client, message):
    assert client.send_message(message, wait=False)


def reply(client, device):
    msg = client.wait_for_message(device, timeout=TIMEOUT)
    assert msg is not None, f'no reply named {device}'
    return msg


def test_binds_loopback_by_default():
    core = BridgeCore(BridgeConfig(port=0))
    try:
        core.start()
        assert core._server.host == '127.0.0.1'
    finally:
        core.stop()
    assert core.port is None


def test_target_point_arrives_in_lps_metres(link):
    core, client, rec = link
    send(client, pyigtl.PointMessage(positions=[12.5, -30.0, 85.0], names=['T1'], device_name='TARGET'))
    st = reply(client, 'TARGET')
    assert isinstance(st, StatusMessage) and st.code == StatusCode.OK
    assert len(rec.targets) == 1
    # RAS (12.5, -30, 85) mm -> LPS (-12.5, 30, 85) mm -> metres
    np.testing.assert_allclose(rec.targets[0], [-0.0125, 0.030, 0.085], atol=1e-7)
    np.testing.assert_allclose(core.target_lps_m, rec.targets[0])
    assert ('target', {'target_lps_m': rec.targets[0].tolist(), 'device': 'TARGET', 'source': 'POINT'}) in rec.events


def test_entry_as_transform_uses_translation(link):
    core, client, rec = link
    M = np.eye(4)
    M[:3, 3] = [-40.0, 10.0, -5.0]
    send(client, pyigtl.TransformMessage(M, device_name='ENTRY'))
    assert reply(client, 'ENTRY').code == StatusCode.OK
    np.testing.assert_allclose(rec.entries[0], units.mm_to_m(frames.ras_to_lps([-40.0, 10.0, -5.0])), atol=1e-7)


def test_commands_are_acknowledged_with_echo_and_status(link):
    core, client, rec = link
    send(client, pyigtl.StringMessage('START_UP', device_name='CMD_0001'))
    assert reply(client, 'ACK_0001').string == 'START_UP'
    st = reply(client, 'START_UP')
    assert st.code == StatusCode.OK and st.status_string == 'START_UP done'

    send(client, pyigtl.StringMessage('move_to_target: fast', device_name='CMD_0002'))
    assert reply(client, 'ACK_0002').string == 'move_to_target: fast'
    assert reply(client, 'MOVE_TO_TARGET').code == StatusCode.OK

    send(client, pyigtl.StringMessage('', device_name='CMD_STOP'))  # name in the device, no text
    assert reply(client, 'ACK_STOP').string == 'STOP'
    assert reply(client, 'STOP').code == StatusCode.OK
    assert rec.commands == [('START_UP', ''), ('MOVE_TO_TARGET', 'fast'), ('STOP', '')]


def test_command_refused_by_handler_reports_reason(link):
    core, client, rec = link
    rec.command_answer['MOVE_TO_TARGET'] = (False, 'motion refused: scanner ACQUIRING')
    send(client, pyigtl.StringMessage('MOVE_TO_TARGET', device_name='CMD_0010'))
    assert reply(client, 'ACK_0010').string == 'MOVE_TO_TARGET'
    st = reply(client, 'MOVE_TO_TARGET')
    assert st.code == StatusCode.NOT_READY
    assert st.error_name == 'REFUSED' and st.status_string == 'motion refused: scanner ACQUIRING'


def test_unknown_command_refused_and_link_still_works(link):
    core, client, rec = link
    send(client, pyigtl.PointMessage(positions=[1.0, 2.0, 3.0], device_name='TARGET'))
    assert reply(client, 'TARGET').code == StatusCode.OK
    send(client, pyigtl.StringMessage('SELF_DESTRUCT', device_name='CMD_0003'))
    st = reply(client, 'CMD_0003')
    assert st.code == StatusCode.ILLEGAL_INSTRUCTION
    assert "unknown command 'SELF_DESTRUCT'" in st.status_string
    assert client.wait_for_message('ACK_0003', timeout=0.2) is None  # no echo for a refused command
    assert rec.commands == []
    # The link and the bridge state survive the refusal.
    assert core.connected
    np.testing.assert_allclose(core.target_lps_m, [-0.001, -0.002, 0.003], atol=1e-7)
    send(client, pyigtl.StringMessage('TARGETING', device_name='CMD_0004'))
    assert reply(client, 'TARGETING').code == StatusCode.OK
    assert core.counters['refused'] == 1


@pytest.mark.parametrize('message,device,code,fragment', [
    (lambda: pyigtl.TransformMessage(np.full((4, 4), np.nan), device_name='TARGET'), 'TARGET', StatusCode.INVALID,
     'NaN'),
    (lambda: pyigtl.PointMessage(positions=[[1, 2, 3], [4, 5, 6]], device_name='TARGET'), 'TARGET',
     StatusCode.INVALID, 'exactly one point'),
    (lambda: pyigtl.PointMessage(positions=[1e5, 0, 0], device_name='TARGET'), 'TARGET', StatusCode.INVALID,
     'wrong unit'),
    (lambda: pyigtl.PointMessage(positions=[1, 2, 3], device_name='SEED'), 'SEED', StatusCode.NOT_FOUND,
     'not handled'),
    (lambda: pyigtl.StringMessage('hello', device_name='CHAT'), 'CHAT', StatusCode.NOT_FOUND, 'not handled'),
    (lambda: pyigtl.StringMessage('STOP', device_name='CMD_bad-id'), 'CMD_bad-id', StatusCode.INVALID, 'CMD_<id>'),
    (lambda: pyigtl.TransformMessage(np.diag([2.0, 1.0, 1.0, 1.0]), device_name='CLB_0001'), 'CLB_0001',
     StatusCode.INVALID, 'not a rigid transform'),
    (lambda: pyigtl.PositionMessage(positions=[0, 0, 0], quaternions=[0, 0, 0, 1], device_name='TARGET'),
     'TARGET', StatusCode.ILLEGAL_INSTRUCTION, 'POSITION is not supported'),
])
def test_malformed_content_is_refused_without_losing_state(link, message, device, code, fragment):
    core, client, rec = link
    send(client, pyigtl.PointMessage(positions=[5.0, 5.0, 5.0], device_name='TARGET'))
    assert reply(client, 'TARGET').code == StatusCode.OK
    before = core.target_lps_m.copy()
    send(client, message())
    st = reply(client, device)
    assert st.code == code and fragment in st.status_string
    np.testing.assert_allclose(core.target_lps_m, before)  # state untouched
    assert len(rec.targets) == 1 and rec.calibrations == []
    send(client, pyigtl.StringMessage('PLANNING', device_name='CMD_0100'))
    assert reply(client, 'PLANNING').code == StatusCode.OK  # link alive


def test_pose_is_sent_back_as_transform_in_ras_mm(link):
    core, client, rec = link
    angle = 0.3
    T = np.eye(4)
    T[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    T[:3, 3] = [0.010, -0.025, 0.120]  # scanner LPS, m
    assert core.send_current_position(T)
    msg = reply(client, 'CURRENT_POSITION')
    expected = frames.lps_to_ras(T)
    expected[:3, 3] = units.m_to_mm(expected[:3, 3])
    np.testing.assert_allclose(msg.matrix, expected, atol=1e-4)
    np.testing.assert_allclose(msg.matrix[:3, 3], [-10.0, 25.0, 120.0], atol=1e-4)

    assert core.send_plan([0.01, 0.02, 0.03], [0.015, 0.025, 0.09])
    plan = reply(client, 'PLAN')
    assert plan.names == ['ENTRY', 'TARGET']
    np.testing.assert_allclose(plan.positions, [[-10, -20, 30], [-15, -25, 90]], atol=1e-3)

    with pytest.raises(ValueError, match='finite 4x4'):
        core.send_current_position(np.full((4, 4), np.nan))


def test_nothing_is_queued_without_a_client():
    core = BridgeCore(BridgeConfig(port=0))
    core.start()
    try:
        assert not core.connected
        assert core.send_current_position(np.eye(4)) is False
        assert core.send_status('X') is False
    finally:
        core.stop()


def test_calibration_and_brp_target(link):
    core, client, rec = link
    R = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = [20.0, -10.0, 50.0]
    send(client, pyigtl.TransformMessage(M, device_name='CLB_0007'))
    ack = reply(client, 'ACK_0007')
    np.testing.assert_allclose(ack.matrix, M, atol=1e-5)
    assert reply(client, 'CALIBRATION').code == StatusCode.OK
    T = rec.calibrations[0]
    np.testing.assert_allclose(T[:3, :3], np.diag([-1, -1, 1]) @ R)
    np.testing.assert_allclose(T[:3, 3], [-0.020, 0.010, 0.050])

    M2 = np.eye(4)
    M2[:3, 3] = [1.0, 2.0, 3.0]
    send(client, pyigtl.TransformMessage(M2, device_name='TGT_0008'))
    reply(client, 'ACK_0008')
    assert reply(client, 'TARGET').code == StatusCode.OK
    np.testing.assert_allclose(rec.targets[-1], [-0.001, -0.002, 0.003], atol=1e-7)


def test_image_is_converted_to_lps_metres(link):
    core, client, rec = link
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (k, j, i)
    ijk_to_ras = np.diag([0.5, 0.6, 2.0, 1.0])
    ijk_to_ras[:3, 3] = [-100.0, 50.0, 20.0]
    send(client, pyigtl.ImageMessage(voxels, ijk_to_world_matrix=ijk_to_ras, world_coordinate_system='ras',
                                     device_name='CONTROL_SCAN'))
    assert reply(client, 'CONTROL_SCAN').code == StatusCode.OK
    img = rec.images[0]
    np.testing.assert_array_equal(img.voxels, voxels)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    expected[:3, :] /= 1000.0
    np.testing.assert_allclose(img.ijk_to_lps_m, expected, atol=1e-7)


def test_oversized_image_is_drained_and_refused(link):
    core, client, rec = link
    big = np.zeros((8, 64, 64), dtype=np.uint8)  # 32 KiB > 20 000-byte limit of the fixture
    send(client, pyigtl.ImageMessage(big, device_name='HUGE'))
    st = reply(client, 'HUGE')
    assert st.code == StatusCode.OVERFLOW and 'exceeds the limit of 20000 bytes' in st.status_string
    assert rec.images == []
    # The stream stayed in sync: the next message is read correctly.
    send(client, pyigtl.PointMessage(positions=[1, 1, 1], device_name='ENTRY'))
    assert reply(client, 'ENTRY').code == StatusCode.OK
    assert core.connected


def test_status_from_client_is_passed_on_not_answered(link):
    core, client, rec = link
    send(client, StatusMessage(code=StatusCode.OK, error_name='OK', status_string='slicer ready', device_name='S'))
    wait_for(lambda: rec.statuses, what='status callback')
    assert rec.statuses == [('S', 1, 'OK', 'slicer ready')]
    assert client.wait_for_message('S', timeout=0.2) is None


# --------------------------------------------------------------------------- raw-socket framing

def _frame(mtype, device, body, crc=None):
    return HEADER.pack(1, mtype.encode(), device.encode(), 0, 0, len(body),
                       CRC64(body) if crc is None else crc) + body


def _read_status(sock, timeout=TIMEOUT):
    sock.settimeout(timeout)
    data = b''
    while len(data) < HEADER.size:
        data += sock.recv(HEADER.size - len(data))
    fields = HEADER.unpack(data)
    body = b''
    while len(body) < fields[5]:
        body += sock.recv(fields[5] - len(body))
    msg = StatusMessage()
    msg.unpack({'header_version': 1, 'message_type': 'STATUS',
                'device_name': fields[2].rstrip(b'\0').decode(), 'timestamp': 0, 'body_size': fields[5]}, body)
    return msg


@pytest.fixture
def raw_link():
    rec = Recorder()
    core = BridgeCore(BridgeConfig(port=0), on_target=rec.on_target, on_command=rec.on_command)
    port = core.start()
    sock = socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT)
    try:
        wait_for(lambda: core.connected, what='connection')
        yield core, sock, rec
    finally:
        sock.close()
        core.stop()


def test_bad_crc_truncated_body_and_unknown_type_keep_the_connection(raw_link):
    core, sock, rec = raw_link
    good = pyigtl.PointMessage(positions=[1, 2, 3], device_name='TARGET').pack()
    body = good[HEADER.size:]
    sock.sendall(_frame('POINT', 'TARGET', body, crc=CRC64(body) ^ 1))
    st = _read_status(sock)
    assert st.device_name == 'TARGET' and st.code == StatusCode.CHECKSUM_ERROR
    sock.sendall(_frame('TRANSFORM', 'TARGET', b'\0' * 40))  # 40 bytes instead of 48
    st = _read_status(sock)
    assert st.code == StatusCode.INVALID and 'malformed TRANSFORM' in st.status_string
    sock.sendall(_frame('FOOBAR', 'X', b'abc'))
    st = _read_status(sock)
    assert st.code == StatusCode.ILLEGAL_INSTRUCTION and 'FOOBAR' in st.status_string
    assert rec.targets == []
    # Split a valid message across two sends: the partial header must not be lost.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(good[:30])
    sock.sendall(good[30:])
    st = _read_status(sock)
    assert st.device_name == 'TARGET' and st.code == StatusCode.OK
    np.testing.assert_allclose(rec.targets[0], [-0.001, -0.002, 0.003], atol=1e-7)


def test_unreadable_header_closes_only_that_connection(raw_link):
    core, sock, rec = raw_link
    sock.sendall(b'\xff' * HEADER.size)  # framing lost: nothing after this can be trusted
    last = _read_status(sock)  # the reason comes first, then the close
    assert last.device_name == 'CONNECTION' and 'framing lost' in last.status_string
    assert sock.recv(100) == b''  # server closed the connection
    wait_for(lambda: not core.connected, what='disconnect')
    client = pyigtl.OpenIGTLinkClient('127.0.0.1', core.port)  # a new client is served
    try:
        wait_for(lambda: core.connected, what='reconnection')
        send(client, pyigtl.StringMessage('STOP', device_name='CMD_1'))
        assert reply(client, 'STOP').code == StatusCode.OK
    finally:
        client.stop()


def test_stream_reader_handles_byte_by_byte_input():
    reader = StreamReader(lambda t: 1000)
    data = pyigtl.StringMessage('EMERGENCY', device_name='CMD_9').pack() * 2
    out = []
    for b in data:
        out.extend(reader.feed(bytes([b])))
    assert [o[0] for o in out] == ['message', 'message']
    assert out[0][1]['device_name'] == 'CMD_9' and out[0][1]['message_type'] == 'STRING'


def test_handle_message_without_sockets_and_config_validation():
    core = BridgeCore(on_command=lambda n, a: (True, ''))
    replies = core.handle_message(pyigtl.StringMessage('emergency', device_name='CMD_42'))
    assert [r.device_name for r in replies] == ['ACK_42', 'EMERGENCY']
    assert replies[1].code == StatusCode.OK
    no_handler = BridgeCore()
    replies = no_handler.handle_message(pyigtl.StringMessage('STOP', device_name='CMD_1'))
    assert replies[1].code == StatusCode.NOT_READY and 'no command handler' in replies[1].status_string
    bad = BridgeCore(on_command=lambda n, a: 'yes')  # wrong return type -> refused, not crashed
    replies = bad.handle_message(pyigtl.StringMessage('STOP', device_name='CMD_1'))
    assert replies[0].code == StatusCode.UNKNOWN_ERROR
    with pytest.raises(BridgeConfigError, match='port'):
        BridgeConfig(port=70000)
    with pytest.raises(BridgeConfigError, match='max_image_bytes'):
        BridgeConfig(max_image_bytes=0)
    with pytest.raises(BridgeConfigError, match='host'):
        BridgeConfig(host='')


# --------------------------------------------------------------------------- issue 11: attacks on the link

from igt_robot.igtl import messages as codec  # noqa: E402
from igt_robot.igtl.messages import GetStatusMessage  # noqa: E402


def _read_message(sock, timeout=TIMEOUT):
    """The next message on a raw socket, decoded with the bridge's own codec (header v1 or v2)."""
    sock.settimeout(timeout)

    def exactly(n):
        data = b''
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError('closed by the server')
            data += chunk
        return data
    version, mtype, device, sec, frac, size, crc = HEADER.unpack(exactly(HEADER.size))
    body = exactly(size)
    fields = {'header_version': version, 'message_type': mtype.rstrip(b'\0').decode(),
              'device_name': device.rstrip(b'\0').decode(), 'timestamp': sec, 'body_size': size}
    return codec.decode(fields, body)


def _until(sock, device, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = _read_message(sock, timeout)
        if msg.device_name == device:
            return msg
    raise AssertionError(f'no message named {device}')


def _closed(sock, timeout=TIMEOUT):
    """Read until the server closes; the messages received meanwhile."""
    got = []
    try:
        while True:
            got.append(_read_message(sock, timeout))
    except ConnectionError:
        return got


def _connect(port):
    sock = socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _target(x=1.0, version=1, device='TARGET', **metadata):
    msg = pyigtl.PointMessage(positions=[x, 2.0, 3.0], device_name=device)
    msg.metadata = metadata
    return codec.encode(msg, version, metadata, message_id=77)


@pytest.fixture
def make_core():
    cores = []

    def make(**config):
        rec = Recorder()
        provider = config.pop('status_provider', None)
        core = BridgeCore(BridgeConfig(port=0, **config), on_target=rec.on_target, on_command=rec.on_command,
                          on_event=rec.on_event, status_provider=provider)
        core.start()
        cores.append(core)
        return core, rec
    yield make
    for core in cores:
        core.stop()


def test_slow_client_is_closed_and_never_blocks_another(make_core):
    core, rec = make_core(message_timeout_s=0.5)
    slow = _connect(core.port)
    good = _target()
    slow.sendall(good[:10])
    slicer = _connect(core.port)  # served while the slow one dribbles
    for i in range(4):
        slow.sendall(good[10 + i:11 + i])  # 1 byte per 0.2 s: progress, but far too slow
        slicer.sendall(_target(x=float(i)))
        assert _until(slicer, 'TARGET').code == StatusCode.OK
        time.sleep(0.2)
    last = _closed(slow)
    assert last and last[-1].device_name == 'CONNECTION' and last[-1].code == StatusCode.TIME_OUT
    assert 'slow or stalled' in last[-1].status_string
    slicer.sendall(_target(x=9.0))
    assert _until(slicer, 'TARGET').code == StatusCode.OK
    slow.close()
    slicer.close()


def test_idle_client_is_closed_for_a_newcomer_when_the_slots_are_full(make_core):
    core, rec = make_core(max_clients=2, idle_timeout_s=0.3)
    idle = _connect(core.port)  # says nothing, ever
    slicer = _connect(core.port)
    slicer.sendall(_target())
    assert _until(slicer, 'TARGET').code == StatusCode.OK
    wait_for(lambda: len(core.clients()) == 2, what='two clients')
    time.sleep(0.4)  # both idle now; the one that never sent a valid message goes first
    newcomer = _connect(core.port)
    last = _closed(idle)
    assert last[-1].code == StatusCode.TIME_OUT and 'closed for a new client' in last[-1].status_string
    newcomer.sendall(_target(x=5.0))
    assert _until(newcomer, 'TARGET').code == StatusCode.OK
    slicer.sendall(_target(x=6.0))
    assert _until(slicer, 'TARGET').code == StatusCode.OK  # Slicer kept its slot
    for s in (idle, slicer, newcomer):
        s.close()


def test_fifty_clients_are_all_served(make_core):
    core, rec = make_core()  # default limits
    socks = [_connect(core.port) for _ in range(50)]
    try:
        for i, s in enumerate(socks):
            s.sendall(_target(x=float(i)))
        for s in socks:
            assert _until(s, 'TARGET').code == StatusCode.OK
        assert len(rec.targets) == 50
    finally:
        for s in socks:
            s.close()


def test_a_client_beyond_the_limit_is_told_busy(make_core):
    core, rec = make_core(max_clients=1)
    first = _connect(core.port)
    first.sendall(_target())
    _until(first, 'TARGET')
    second = _connect(core.port)
    last = _closed(second)
    assert last[-1].code == StatusCode.BUSY and 'the limit' in last[-1].status_string
    first.close()
    second.close()


def test_non_ascii_device_name_is_refused_and_the_link_stays(raw_link):
    core, sock, rec = raw_link
    body = pyigtl.PointMessage(positions=[1, 2, 3], device_name='X').pack()[HEADER.size:]
    sock.sendall(HEADER.pack(1, b'POINT', 'TÄRGET'.encode('utf-8'), 0, 0, len(body), CRC64(body)) + body)
    st = _read_status(sock)
    assert st.code == StatusCode.INVALID and 'not printable ASCII' in st.status_string
    assert rec.targets == []
    sock.sendall(_target())
    assert _read_status(sock).code == StatusCode.OK and len(rec.targets) == 1


def test_string_whose_length_field_exceeds_its_body_is_refused(raw_link):
    core, sock, rec = raw_link
    text = b'EMERGENCY'
    body = struct.pack('> H H', 3, len(text) + 20) + text  # claims 29 bytes, holds 9
    sock.sendall(_frame('STRING', 'CMD_1', body))
    st = _read_status(sock)
    assert st.device_name == 'CMD_1' and st.code == StatusCode.INVALID and 'length field' in st.status_string
    assert rec.commands == []  # not executed truncated
    body = struct.pack('> H H', 3, len(text)) + text
    sock.sendall(_frame('STRING', 'CMD_2', body))
    assert _until(sock, 'EMERGENCY').code == StatusCode.OK


def test_v2_metadata_sizes_that_lie_are_refused(raw_link):
    core, sock, rec = raw_link
    data = bytearray(_target(version=2, note='x'))
    body = bytearray(data[HEADER.size:])
    body[4:8] = struct.pack('> I', 1000)  # metadata body size beyond the body
    sock.sendall(HEADER.pack(2, b'POINT', b'TARGET', 0, 0, len(body), CRC64(bytes(body))) + bytes(body))
    st = _until(sock, 'TARGET')
    assert st.code == StatusCode.INVALID and 'exceed the body' in st.status_string
    assert rec.targets == []


def test_rate_flood_is_one_record_event_and_emergency_still_passes(make_core):
    core, rec = make_core(rate_limit_hz=20.0, rate_burst=20, refusal_report_interval_s=60.0)
    sock = _connect(core.port)
    flood = pyigtl.PointMessage(positions=[1, 2, 3], device_name='SEED').pack()  # refused: not handled
    sock.sendall(flood * 300)
    sock.sendall(pyigtl.StringMessage('EMERGENCY', device_name='CMD_9').pack())
    assert _until(sock, 'EMERGENCY').code == StatusCode.OK  # stopping is never rate limited
    assert ('EMERGENCY', '') in rec.commands
    sock.close()
    wait_for(lambda: [e for e in rec.events if e[0] == 'refused'], what='the refusal digest')
    time.sleep(0.2)
    refused = [d for k, d in rec.events if k == 'refused']
    assert len(refused) == 1, refused
    digest = refused[0]
    assert digest['count'] == 300 and digest['codes'].get('BUSY', 0) >= 250
    assert digest['codes'].get('NOT_FOUND', 0) >= 1 and len(digest['examples']) <= 3
    assert core.counters['refused'] == 300


def test_get_status_is_answered_with_the_real_status(make_core):
    core, rec = make_core(status_provider=lambda: (StatusCode.PANIC_MODE, 'ESTOP', 'ESTOP: motion not permitted'))
    sock = _connect(core.port)
    sock.sendall(GetStatusMessage(device_name='SAFETY').pack())
    st = _until(sock, 'SAFETY')
    assert isinstance(st, StatusMessage)
    assert (st.code, st.error_name, st.status_string) == (StatusCode.PANIC_MODE, 'ESTOP', 'ESTOP: motion not permitted')
    sock.close()


def test_v2_client_gets_v2_headers_with_metadata_and_v1_client_v1(make_core):
    core, rec = make_core()
    v2, v1 = _connect(core.port), _connect(core.port)
    v2.sendall(_target(version=2, origin='scanner_bridge'))
    reply2 = _until(v2, 'TARGET')
    assert reply2.header_version == 2 and reply2.metadata.get('in_reply_to') == '77'
    v1.sendall(_target(version=1))
    reply1 = _until(v1, 'TARGET')
    assert reply1.header_version == 1 and reply1.metadata == {}
    assert core.send_current_position(np.eye(4))
    pose2, pose1 = _until(v2, 'CURRENT_POSITION'), _until(v1, 'CURRENT_POSITION')
    assert pose2.header_version == 2 and pose2.metadata['coordinate_system'] == 'RAS'
    assert pose2.metadata['length_unit'] == 'mm'
    assert pose1.header_version == 1 and pose1.metadata == {}
    np.testing.assert_allclose(pose1.matrix, pose2.matrix)
    v1.close()
    v2.close()


def test_non_loopback_bind_needs_an_allow_list_and_a_secret():
    with pytest.raises(BridgeConfigError, match='allowed_clients'):
        BridgeConfig(host='0.0.0.0')
    with pytest.raises(BridgeConfigError, match='shared_secret'):
        BridgeConfig(host='0.0.0.0', allowed_clients=('10.1.2.0/24',))
    with pytest.raises(BridgeConfigError, match='allowed_clients'):
        BridgeConfig(host='0.0.0.0', allowed_clients=('not-an-address',), shared_secret='s' * 32)
    config = BridgeConfig(host='0.0.0.0', allowed_clients=('10.1.2.0/24',), shared_secret='s' * 32)
    assert not config.loopback_only and BridgeConfig(host='::1').loopback_only


def test_shared_secret_is_required_before_anything_else(make_core):
    secret = 'correct horse battery staple'
    core, rec = make_core(shared_secret=secret)
    stranger = _connect(core.port)
    stranger.sendall(pyigtl.StringMessage('EMERGENCY', device_name='CMD_1').pack())
    assert _closed(stranger)[-1].code == StatusCode.ACCESS_DENIED
    wrong = _connect(core.port)
    wrong.sendall(pyigtl.StringMessage('guess', device_name='AUTH').pack())
    assert 'wrong shared secret' in _closed(wrong)[-1].status_string
    assert rec.commands == []
    slicer = _connect(core.port)
    assert core.send_status('X') is False  # nobody authenticated yet: nothing is sent
    slicer.sendall(pyigtl.StringMessage(secret, device_name='AUTH').pack())
    assert _until(slicer, 'AUTH').code == StatusCode.OK
    slicer.sendall(_target())
    assert _until(slicer, 'TARGET').code == StatusCode.OK
    for s in (stranger, wrong, slicer):
        s.close()


def test_allow_list_refuses_other_addresses_and_a_flood_is_one_record(make_core):
    core, rec = make_core(allowed_clients=('10.9.8.0/24',), refusal_report_interval_s=2.0)
    for _ in range(20):
        sock = _connect(core.port)
        sock.settimeout(TIMEOUT)
        assert sock.recv(100) == b''  # closed at once, nothing said
        sock.close()
    wait_for(lambda: [d for k, d in rec.events if k == 'refused'], what='the refusal digest')
    refused = [d for k, d in rec.events if k == 'refused']
    assert len(refused) == 1 and refused[0]['count'] == 20 and refused[0]['codes'] == {'ACCESS_DENIED': 20}
    assert 'allow-list' in refused[0]['examples'][0]['reason']
    assert not [d for k, d in rec.events if k == 'connection']  # no event per attempt


def test_single_peer_server_keeps_its_peer_and_turns_others_away():
    """As the scanner interface uses it: one peer, never evicted however silent; others told BUSY."""
    from igt_robot.igtl.server import IgtlServer, ServerSettings
    connections, turned_away = [], []
    server = IgtlServer('127.0.0.1', 0, on_message=lambda m: [StatusMessage(device_name='ACK')],
                        on_refused=lambda *a: (), limit_for=lambda t: 1 << 16,
                        settings=ServerSettings(max_clients=1, idle_timeout_s=0.0),
                        on_connection=lambda *a: connections.append(a), on_turned_away=lambda *a: turned_away.append(a))
    server.start()
    try:
        scanner = _connect(server.port)
        wait_for(lambda: server.connected, what='the scanner connection')
        time.sleep(0.2)  # silent
        intruder = _connect(server.port)
        assert _closed(intruder)[-1].code == StatusCode.BUSY
        wait_for(lambda: turned_away, what='the turned-away report')
        assert [c[0] for c in connections] == [True]  # the peer's link was never reported down
        scanner.sendall(pyigtl.StringMessage('ACQUIRING', device_name='SCANNER').pack())
        assert _until(scanner, 'ACK').code == StatusCode.OK
        scanner.close()
        intruder.close()
    finally:
        server.stop()
