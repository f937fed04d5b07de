"""scanner_interface on a real DDS graph: service validation, OpenIGTLink (server and client role),
modem-line trigger, simulated schedule, source combination, dose records and scan events.

The trigger source is tested with an injected fake serial object: a pseudo-terminal does not
emulate the modem-status lines (the ioctl fails), which is itself tested as the UNKNOWN path.
"""
import os
import pathlib
import pty
import socket
import tempfile
import threading

import pytest
import pyigtl

from igt_robot import testing
from igt_robot.igtl.messages import StatusCode, StatusMessage
from igt_robot.nodes.scanner_interface_node import ScannerInterfaceNode
from igt_robot_msgs.msg import DoseRecord, ProcedureEvent, ScannerState
from igt_robot_msgs.srv import SetScannerState
from igt_robot.nodes import qos
from igt_robot.safety import operator_session

SESSION = pathlib.Path(tempfile.mkdtemp(prefix='igt_session_')) / 'operator_session'
TOKEN = operator_session.issue_session(SESSION)

UNKNOWN, IDLE, PREPARING, ACQUIRING = (ScannerState.PHASE_UNKNOWN, ScannerState.PHASE_IDLE,
                                       ScannerState.PHASE_PREPARING, ScannerState.PHASE_ACQUIRING)


class Probe:
    """Collects /scanner/state, /scanner/dose and /procedure/events; calls /scanner/set_state."""

    def __init__(self, graph):
        self.node = graph.create_node('scanner_probe')
        self.lock = threading.Lock()
        self.states, self.doses, self.events = [], [], []
        self.node.create_subscription(ScannerState, '/scanner/state', self._keep(self.states), qos.SCANNER_STATE)
        self.node.create_subscription(DoseRecord, '/scanner/dose', self._keep(self.doses), qos.EVENTS)
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self._keep(self.events), qos.EVENTS)
        self.client = self.node.create_client(SetScannerState, '/scanner/set_state')

    def _keep(self, store):
        def callback(msg):
            with self.lock:
                store.append(msg)
        return callback

    def last(self):
        with self.lock:
            return self.states[-1] if self.states else None

    def wait_phase(self, phase, what='', timeout=10.0, **fields):
        def match():
            msg = self.last()
            return msg is not None and msg.phase == phase and all(getattr(msg, k) == v for k, v in fields.items())
        testing.wait_for(match, timeout, what or f'/scanner/state phase {phase} {fields}')
        return self.last()

    def set_state(self, phase, token=None, **fields):
        """Call /scanner/set_state as the operator (``token`` None: the operator's secret)."""
        assert self.client.wait_for_service(timeout_sec=10.0)
        fields['operator_token'] = TOKEN if token is None else token
        future = self.client.call_async(SetScannerState.Request(phase=phase, **fields))
        return testing.wait_for(lambda: future.done() and future.result(), 10, 'set_state response')

    def kinds(self):
        with self.lock:
            return [e.kind for e in self.events if e.source == 'scanner_interface']


def start(graph, *params, **kwargs):
    args = ['--ros-args', '-p', f'operator_session_file:={SESSION}']
    for p in params:
        args += ['-p', p]
    return graph.add(ScannerInterfaceNode(context=graph.context, cli_args=args, **kwargs))


def test_service_sets_the_phase_and_refuses_bad_requests(graph):
    probe = Probe(graph)
    start(graph, 'sources:=[service]')
    probe.wait_phase(UNKNOWN, 'UNKNOWN before anyone set the phase (fail-safe default)')

    ok = probe.set_state(ACQUIRING, protocol_name='control scan')
    assert ok.accepted, ok.message
    msg = probe.wait_phase(ACQUIRING, protocol_name='control scan', source='service')
    assert not msg.is_ionising

    for request, expected in [
            (dict(phase=77), 'unknown phase 77'),
            (dict(phase=ACQUIRING, is_ionising=True, ctdi_vol_mgy=-1.0), 'ctdi_vol_mgy must be finite and >= 0'),
            (dict(phase=ACQUIRING, is_ionising=True, dlp_mgy_cm=float('nan')), 'dlp_mgy_cm must be finite'),
            (dict(phase=ACQUIRING, is_ionising=True, kv=20.0), 'kv = 20'),
            (dict(phase=ACQUIRING, is_ionising=True, mas=1e9), 'implausibly large'),
            (dict(phase=ACQUIRING, ctdi_vol_mgy=5.0), 'non-ionising')]:
        answer = probe.set_state(**request)
        assert not answer.accepted and expected in answer.message, (request, answer.message)

    # Refused requests changed nothing: the state keeps streaming as before, counter still rising.
    before = probe.last().heartbeat
    testing.wait_for(lambda: probe.last().heartbeat >= before + 3, 10, 'more periodic messages')
    assert probe.last().phase == ACQUIRING and probe.last().protocol_name == 'control scan'
    assert probe.set_state(IDLE).accepted
    probe.wait_phase(IDLE, protocol_name='')


def test_heartbeat_counter_increments_with_every_message(graph):
    probe = Probe(graph)
    start(graph, 'sources:=[service]', 'service_initial_phase:=IDLE')
    testing.wait_for(lambda: len(probe.states) >= 8, 10, 'eight periodic /scanner/state messages')
    with probe.lock:
        counters = [m.heartbeat for m in probe.states]
    assert all(b == a + 1 for a, b in zip(counters, counters[1:])), counters
    assert {m.phase for m in probe.states} == {IDLE}


def test_ionising_scans_give_dose_records_with_running_totals(graph):
    probe = Probe(graph)
    start(graph, 'sources:=[service]', 'service_initial_phase:=IDLE')
    probe.wait_phase(IDLE)
    ct = dict(is_ionising=True, kv=120.0, mas=100.0)
    assert probe.set_state(ACQUIRING, protocol_name='planning CT', ctdi_vol_mgy=8.0, dlp_mgy_cm=120.0, **ct).accepted
    probe.wait_phase(ACQUIRING, is_ionising=True)
    assert probe.set_state(IDLE).accepted
    assert probe.set_state(ACQUIRING, protocol_name='MR localiser').accepted    # not ionising: no record
    probe.wait_phase(ACQUIRING, protocol_name='MR localiser')
    assert probe.set_state(IDLE).accepted
    assert probe.set_state(ACQUIRING, protocol_name='control CT', ctdi_vol_mgy=5.0, dlp_mgy_cm=50.0, **ct).accepted
    # Same scan again (repeated request while acquiring): counted once.
    assert probe.set_state(ACQUIRING, protocol_name='control CT', ctdi_vol_mgy=5.0, dlp_mgy_cm=50.0, **ct).accepted
    assert probe.set_state(IDLE).accepted
    probe.wait_phase(IDLE)

    testing.wait_for(lambda: len(probe.doses) >= 2, 10, 'two dose records')
    testing.wait_for(lambda: probe.kinds().count('scan_ended') >= 3, 10, 'three scan_ended events')
    first, second = probe.doses
    assert (first.protocol_name, first.scan_count, first.dlp_mgy_cm) == ('planning CT', 1, 120.0)
    assert first.total_dlp_mgy_cm == pytest.approx(120.0) and first.kv == 120.0 and first.ctdi_vol_mgy == 8.0
    assert (second.protocol_name, second.scan_count) == ('control CT', 2)
    assert second.total_dlp_mgy_cm == pytest.approx(170.0)
    assert first.scan_id != second.scan_id
    assert probe.kinds().count('scan_started') == 3
    assert len(probe.doses) == 2


def test_an_ionising_scan_without_dose_figures_gets_no_dose_record_here(graph):
    """The scanner-state source knows the tube is on, not the dose: a zero record here was the scan's second
    (unverified) entry beside the one from its images (RDSR / headers, procedure node)."""
    probe = Probe(graph)
    start(graph, 'sources:=[service]', 'service_initial_phase:=IDLE')
    probe.wait_phase(IDLE)
    assert probe.set_state(ACQUIRING, protocol_name='control scan', is_ionising=True).accepted
    probe.wait_phase(ACQUIRING, is_ionising=True)
    assert probe.set_state(IDLE).accepted
    testing.wait_for(lambda: 'scan_ended' in probe.kinds(), 10, 'the scan_ended event')
    with probe.lock:
        note = next(e for e in probe.events if e.kind == 'dose_not_reported')
    assert 'from its images' in note.description
    assert not probe.doses
    # With figures (the simulated scanner through the service): one record naming its source.
    assert probe.set_state(ACQUIRING, protocol_name='planning CT', is_ionising=True, ctdi_vol_mgy=8.0,
                           dlp_mgy_cm=120.0, kv=120.0, mas=100.0).accepted
    dose = testing.wait_for(lambda: probe.doses and probe.doses[0], 10, 'the dose record')
    assert (dose.source, dose.scan_count, dose.dlp_mgy_cm) == (DoseRecord.SOURCE_MANUAL, 1, 120.0)


def test_igtl_server_start_and_stop_sequence_from_a_pyigtl_peer(graph):
    probe = Probe(graph)
    node = start(graph, 'sources:=[igtl]', 'igtl_mode:=server', 'igtl_port:=0', 'igtl_device:=SCANNER')
    probe.wait_phase(UNKNOWN, 'UNKNOWN while no bridge is connected')
    peer = pyigtl.OpenIGTLinkClient(host='127.0.0.1', port=node.igtl_port)
    try:
        testing.wait_for(lambda: node.igtl_connected, 10, 'the pyigtl peer to connect')
        peer.send_message(pyigtl.StringMessage('START_SEQUENCE:control scan', device_name='SCANNER'))
        probe.wait_phase(ACQUIRING, protocol_name='control scan', source='igtl')
        peer.send_message(pyigtl.StringMessage('STOP_SEQUENCE', device_name='SCANNER'))
        probe.wait_phase(IDLE, source='igtl')
        seen = len(probe.states)
        # Another device's text is ignored (the filter is igtl_device).
        peer.send_message(pyigtl.StringMessage('START_SEQUENCE', device_name='Slicer'))
        peer.send_message(StatusMessage(StatusCode.OK, status_string='PREPARE', device_name='SCANNER'))
        probe.wait_phase(PREPARING)
        assert all(m.phase != ACQUIRING for m in probe.states[seen:])
        peer.send_message(StatusMessage(StatusCode.OK, status_string='STOP_SEQUENCE', device_name='SCANNER'))
        probe.wait_phase(IDLE)
        peer.send_message(pyigtl.StringMessage('what is this', device_name='SCANNER'))
        probe.wait_phase(UNKNOWN, 'unrecognised text -> UNKNOWN')
        peer.send_message(pyigtl.StringMessage('STOP_SEQUENCE', device_name='SCANNER'))
        probe.wait_phase(IDLE)
    finally:
        peer.stop()
    probe.wait_phase(UNKNOWN, 'UNKNOWN once the bridge disconnected')
    assert 'scan_started' in probe.kinds() and 'scan_ended' in probe.kinds()


def test_igtl_client_connects_to_a_bridge_and_notices_its_loss(graph):
    probe = Probe(graph)
    listener = socket.create_server(('127.0.0.1', 0))
    listener.settimeout(20.0)
    try:
        node = start(graph, 'sources:=[igtl]', 'igtl_mode:=client',
                     f'igtl_port:={listener.getsockname()[1]}', 'scanner_is_ct:=true')
        conn, _ = listener.accept()
        with conn:
            testing.wait_for(lambda: node.igtl_connected, 10, 'the node to connect')
            conn.sendall(pyigtl.StringMessage('start_sequence  helical CT', device_name='ScannerBridge').pack())
            probe.wait_phase(ACQUIRING, protocol_name='helical CT', is_ionising=True)
            # A CT acquisition without figures: no zero dose record (the scan's record comes from its images).
            testing.wait_for(lambda: 'dose_not_reported' in probe.kinds(), 10, 'the dose_not_reported event')
            assert not probe.doses
            conn.sendall(StatusMessage(StatusCode.OK, error_name='STOP_SEQUENCE', device_name='x').pack())
            probe.wait_phase(IDLE)
            conn.sendall(StatusMessage(StatusCode.HARDWARE_FAILURE, status_string='STOP_SEQUENCE').pack())
            probe.wait_phase(UNKNOWN, 'a non-OK STATUS means UNKNOWN whatever its text')
            conn.sendall(pyigtl.StringMessage('STOP_SEQUENCE').pack())
            probe.wait_phase(IDLE)
        probe.wait_phase(UNKNOWN, 'UNKNOWN after the bridge closed the connection')
        conn, _ = listener.accept()   # the client reconnects by itself
        with conn:
            conn.sendall(pyigtl.StringMessage('STOP_SEQUENCE').pack())
            probe.wait_phase(IDLE, 'IDLE again after the reconnection')
    finally:
        listener.close()


class FakeModemPort:
    """Stands in for serial.Serial: modem-status attributes the test sets; reads can be made to fail."""

    def __init__(self):
        self.cts = self.cd = self.ri = False
        self._dsr = True
        self.fail = False
        self.opened = 0

    @property
    def dsr(self):
        if self.fail:
            raise OSError(5, 'Input/output error')
        return self._dsr

    @dsr.setter
    def dsr(self, level):
        self._dsr = level

    def close(self):
        pass


def test_modem_line_trigger_with_polarity_and_read_errors(graph):
    port = FakeModemPort()

    def factory(name):
        assert name == '/dev/ttyFAKE'
        port.opened += 1
        return port

    probe = Probe(graph)
    # DSR active low: line asserted (True) = idle, released (False) = imaging.
    start(graph, 'sources:=[trigger]', 'trigger_port:=/dev/ttyFAKE', 'trigger_line:=DSR',
          'trigger_active_high:=false', 'trigger_release_debounce_s:=0.02', serial_factory=factory)
    probe.wait_phase(IDLE, source='trigger')
    port.dsr = False
    probe.wait_phase(ACQUIRING, 'line released -> imaging')
    port.dsr = True
    probe.wait_phase(IDLE, 'line asserted again -> idle after the debounce')
    port.fail = True
    probe.wait_phase(UNKNOWN, 'unreadable line -> UNKNOWN')
    port.fail = False
    probe.wait_phase(IDLE, 'port reopened and read again')
    assert port.opened >= 2


def test_trigger_on_a_pty_is_unknown_because_modem_lines_are_not_emulated(graph):
    master, slave = pty.openpty()
    try:
        probe = Probe(graph)
        start(graph, 'sources:=[trigger]', f'trigger_port:={os.ttyname(slave)}')
        testing.wait_for(lambda: len(probe.states) >= 5, 10, 'five /scanner/state messages')
        assert {m.phase for m in probe.states} == {UNKNOWN}
    finally:
        os.close(master)
        os.close(slave)


def schedule_file(run_dir, schedule: str):
    """A params file carrying ``simulated_schedule`` (a YAML list does not fit on a ``-p`` command line)."""
    path = run_dir / 'schedule.yaml'
    path.write_text('scanner_interface:\n  ros__parameters:\n    simulated_schedule: |\n'
                    + ''.join(f'      {line}\n' for line in schedule.splitlines()))
    return path


def test_simulated_ct_schedule_gives_phases_and_a_dose_record(graph, run_dir):
    probe = Probe(graph)
    params = schedule_file(run_dir, '- {start: 0.5, duration: 0.5, prepare_s: 0.2, protocol: sim CT, is_ct: true,\n'
                                    '   ctdi_vol_mgy: 6.0, dlp_mgy_cm: 90.0, kv: 100.0, mas: 80.0}')
    graph.add(ScannerInterfaceNode(context=graph.context, cli_args=[
        '--ros-args', '-p', 'sources:=[simulated]', '--params-file', str(params)]))
    probe.wait_phase(PREPARING, protocol_name='sim CT', source='simulated')
    probe.wait_phase(ACQUIRING, protocol_name='sim CT', is_ionising=True)
    probe.wait_phase(IDLE)
    testing.wait_for(lambda: probe.doses, 10, 'the dose record')
    dose = probe.doses[0]
    assert (dose.ctdi_vol_mgy, dose.dlp_mgy_cm, dose.kv, dose.mas, dose.scan_count) == (6.0, 90.0, 100.0, 80.0, 1)
    assert dose.source == DoseRecord.SOURCE_SIMULATED
    phases = [m.phase for m in probe.states]
    assert phases.index(PREPARING) < phases.index(ACQUIRING) < len(phases) - 1 - phases[::-1].index(IDLE)


def test_bad_schedule_is_a_clear_error(graph, run_dir):
    params = schedule_file(run_dir, '- {start: 1.0, duration: 0.0}')
    with pytest.raises(ValueError, match='duration must be > 0'):
        ScannerInterfaceNode(context=graph.context, cli_args=[
            '--ros-args', '-p', 'sources:=[simulated]', '--params-file', str(params)])
    with pytest.raises(ValueError, match="'sources'"):
        start(graph, 'sources:=[service, telepathy]')


def test_the_most_restrictive_source_wins(graph):
    probe = Probe(graph)
    node = start(graph, 'sources:=[service, igtl]', 'service_initial_phase:=IDLE', 'igtl_port:=0')
    probe.wait_phase(UNKNOWN, 'UNKNOWN: the igtl source is not connected although the service says IDLE',
                     source='igtl')
    peer = pyigtl.OpenIGTLinkClient(host='127.0.0.1', port=node.igtl_port)
    try:
        testing.wait_for(lambda: node.igtl_connected, 10, 'the pyigtl peer to connect')
        peer.send_message(pyigtl.StringMessage('STOP_SEQUENCE'))
        probe.wait_phase(IDLE, 'both sources IDLE')
        assert probe.set_state(ACQUIRING, protocol_name='manual').accepted
        probe.wait_phase(ACQUIRING, source='service')
        peer.send_message(pyigtl.StringMessage('PREPARE'))
        assert probe.set_state(IDLE).accepted
        probe.wait_phase(PREPARING, source='igtl')
    finally:
        peer.stop()


def test_node_process_serves_and_exits_cleanly(graph, processes):
    proc = processes('igt_robot.nodes.scanner_interface_node', '--ros-args', '-p', 'sources:=[service]')
    probe = Probe(graph)
    probe.wait_phase(UNKNOWN, timeout=30.0)
    assert probe.set_state(PREPARING, protocol_name='x').accepted
    probe.wait_phase(PREPARING, protocol_name='x')
    assert proc.stop() == 0, proc.output()


def test_idle_override_needs_the_operator_secret_imaging_does_not(graph):
    probe = Probe(graph)
    start(graph, 'sources:=[service]', 'service_initial_phase:=IDLE')
    assert probe.set_state(ACQUIRING, token='', protocol_name='from anyone').accepted   # stopping is honoured
    probe.wait_phase(ACQUIRING)
    for bad in ('', 'guess'):
        refused = probe.set_state(IDLE, token=bad)
        assert not refused.accepted and 'operator session secret' in refused.message
    assert probe.last().phase == ACQUIRING
    testing.wait_for(lambda: 'scanner_override_refused' in probe.kinds(), 10, 'the refusal recorded')
    assert probe.set_state(IDLE).accepted
    probe.wait_phase(IDLE)


def test_the_state_heartbeat_goes_on_while_the_executor_is_busy(graph):
    # The heartbeat every interlock times must not wait for the node's executor: here nobody spins the
    # node at all (as if every executor thread were busy), and /scanner/state still arrives, counting.
    probe = Probe(graph)
    node = ScannerInterfaceNode(context=graph.context, cli_args=[
        '--ros-args', '-p', 'sources:=[simulated]', '-p', 'publish_rate_hz:=20.0',
        '-p', f'operator_session_file:={SESSION}'])
    try:
        testing.wait_for(lambda: len(probe.states) >= 5, 10, 'five heartbeats from a node nobody spins')
        with probe.lock:
            counters = [m.heartbeat for m in probe.states]
        assert counters == sorted(counters) and len(set(counters)) == len(counters)
        assert all(m.phase == ScannerState.PHASE_IDLE for m in probe.states)
    finally:
        node.destroy_node()
