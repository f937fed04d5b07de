"""A procedure driven through the OpenIGTLink bridge by a pyigtl client, as 3D Slicer drives it.

The control nodes run in their own process (as in `make demo`), the workflow nodes
in this one; the client sends the target (RAS mm) and the BRP-style commands,
reads the STATUS acknowledgements and the needle pose the bridge sends back.
Slicer is the operator's console: the plan confirmation and the resume go through
the bridge, which sends the operator session secret with them.
"""
import numpy as np
import pytest

pyigtl = pytest.importorskip('pyigtl', reason='pyigtl not installed')

from igt_robot import frames, testing, units  # noqa: E402
from igt_robot.bringup import PROFILES, Bringup  # noqa: E402
from igt_robot.demo import _control_process  # noqa: E402
from igt_robot.igtl import StatusCode  # noqa: E402
from igt_robot.safety.operator_session import issue_session, read_session  # noqa: E402


@pytest.fixture
def stack(run_dir):
    session_file = run_dir / 'operator' / 'operator_session'
    issued_here = issue_session(session_file)  # the nodes that check the secret and the bridge that sends it share it
    session = {'operator_session_file': str(session_file)}
    shared = {'procedure_id': 'slicer-test', 'record_dir': str(run_dir / 'record')}
    overrides = {'recorder_node': dict(shared), 'procedure_node': dict(shared, scan_duration=0.2, **session),
                 'igtl_bridge': dict(session, port=0, pose_rate=10.0), 'scanner_interface': dict(session, igtl_port=0),
                 'hardware_node': dict(session, backend='mujoco', scanner_timeout=0.5, scanner_period=0.2),
                 # The supervisory timeouts have their own tests; a loaded machine must not latch spurious
                 # faults in the middle of the Slicer flow under test.
                 'safety_supervisor': dict(session, heartbeat_timeout_s=3.0, scanner_timeout_s=2.0)}
    (run_dir / 'record').mkdir(parents=True, exist_ok=True)
    with _control_process(overrides, run_dir / 'control_process.log'), \
            _control_process(overrides, run_dir / 'supervision_process.log', 'supervision'), \
            Bringup(PROFILES['workflow'], overrides=overrides) as bringup:
        # The supervisor issues a fresh secret as it starts (in the supervision process). A command sent before
        # that is checked against whichever secret the file holds at that moment: wait for the supervisor's.
        testing.wait_for(lambda: read_session(session_file) != issued_here, 60, 'the supervisor to issue its session')
        yield bringup


def test_slicer_drives_planning_and_targeting_and_sees_the_needle_pose(stack):
    procedure, bridge = stack.nodes['procedure_node'], stack.nodes['igtl_bridge']
    client = pyigtl.OpenIGTLinkClient('127.0.0.1', bridge.port)
    try:
        testing.wait_for(lambda: bridge.bridge.connected and client.is_connected(), 20, 'the Slicer connection')

        # Slicer marks the lesion: RAS millimetres on the wire, LPS metres inside.
        target_lps = procedure.scenario.target
        target_ras_mm = units.m_to_mm(frames.lps_to_ras(target_lps))
        assert client.send_message(pyigtl.PointMessage(positions=[target_ras_mm.tolist()], names=['T'],
                                                       device_name='TARGET'), wait=False)
        testing.wait_for(lambda: np.allclose(procedure.target, target_lps, atol=1e-6), 20,
                         'the target to reach the procedure')

        def slicer_command(name, query_id):
            assert client.send_message(pyigtl.StringMessage(name, device_name=f'CMD_{query_id}'), wait=False)
            box = []

            def poll():
                message = client.wait_for_message(name, timeout=0)
                if message is not None:
                    box.append(message)
                return box
            testing.wait_for(poll, 180, f'the STATUS of {name}')
            return box[0]

        assert slicer_command('START_UP', '0001').code == StatusCode.OK
        assert slicer_command('PLANNING', '0002').code == StatusCode.OK          # the planning CT is acquired
        assert slicer_command('CALIBRATION', '0003').code == StatusCode.OK       # Z-frame registration
        assert slicer_command('TARGETING', '0004').code == StatusCode.OK         # the path is planned
        refused = slicer_command('MOVE_TO_TARGET', '0005')                       # not confirmed yet
        assert refused.code != StatusCode.OK
        assert 'confirm' in (refused.status_string + refused.error_name).lower()

        # The operator confirms in Slicer and resumes motion explicitly (operator-only: the bridge sends the
        # session secret with both).
        confirmed = slicer_command('CONFIRM_PLAN', '0007')
        assert confirmed.code == StatusCode.OK, confirmed.status_string
        testing.wait_for(lambda: procedure.safety is not None and procedure.safety.state in ('HOLD', 'READY'), 60,
                         'the supervisor to settle after the scan')
        resumed = slicer_command('RESUME', '0008')
        assert resumed.code == StatusCode.OK, resumed.status_string

        moved = slicer_command('MOVE_TO_TARGET', '0006')
        assert moved.code == StatusCode.OK, moved.status_string
        assert procedure.workflow.step.value == 'CONFIRM_ALIGNMENT'

        # The needle pose comes back as CURRENT_POSITION (RAS mm); its z axis is the needle direction.
        plan = procedure.state.plan
        direction_ras = frames.lps_to_ras(np.array([plan.direction.x, plan.direction.y, plan.direction.z]))
        box = []

        def aligned_pose():
            message = client.wait_for_message('CURRENT_POSITION', timeout=0)
            if message is not None:
                box.append(message)
            return box and np.asarray(box[-1].matrix)[:3, 2] @ direction_ras > np.cos(np.radians(1.0))
        testing.wait_for(aligned_pose, 30, 'a CURRENT_POSITION along the planned direction')
        pose = np.asarray(box[-1].matrix)
        tip_lps = units.mm_to_m(frames.lps_to_ras(pose[:3, 3]))   # the flip is its own inverse
        entry = np.array([plan.entry.x, plan.entry.y, plan.entry.z])
        # The retracted needle's tip sits on the planned line, above the entry point.
        offset = tip_lps - entry
        lateral = np.linalg.norm(offset - (offset @ np.array([plan.direction.x, plan.direction.y,
                                                              plan.direction.z])) * np.array(
            [plan.direction.x, plan.direction.y, plan.direction.z]))
        assert lateral < 0.0015
    finally:
        client.stop()
