"""Procedure node: the operator's workflow (planning, targeting, monitoring, control) over the stack.

/procedure/command (OperatorCommand) takes the operator's steps. The node checks
each against the workflow state machine (:mod:`igt_robot.workflow`), carries out
the accepted ones through the other nodes (scanner, registration, planner,
motion controller) and reports back. Commands beyond the workflow's own:

  status                 phase, step and the allowed commands; changes nothing
  stop                   cancel the motion goal under way (the robot stops under control)
  load_planning_scan     acquire the planning scan (simulation), wait for it (scanner/PACS) or load ARG
                         (a DICOM folder)
  register               register the robot from the planning scan's Z-frame
  plan                   plan the path to the target (the simulated lesion, or /procedure/target)
  align / insert_step    move (after the supervisor permits motion)
  control_scan           acquire a control scan, check the target has not moved, find the needle tip,
                         compare with the target
  confirmation_scan      the final scan, target motion checked, tip found and tip-to-target error reported
  accept_motion          after a scan showed the target moved beyond motion_tolerance_m (or the check could
                         not tell): go on with the current plan; the operator's decision, recorded (else abort)
  report                 write the HTML report (record + pictures)
  enter_dose             ARG = "scan_id ctdi_vol_mgy dlp_mgy_cm kv mas": dose figures typed in by the operator
                         when the scanner sent none (recorded as MANUAL, a flagged fallback)

Images come from the configured ``acquisition`` source (igt_robot.acquisition):
``simulated`` renders the scans the stack triggers (``make demo``); ``dicom`` (a
Storage SCP the scanner or PACS pushes to), ``igtl`` (OpenIGTLink IMAGE) and
``folder`` (a watched export folder) receive scans the stack does not trigger: the
node asks the operator to acquire ("acquire the control scan now"), matches the
arriving series to the request and proceeds when it is complete. Dose records come
from the images (Radiation Dose SR, else the image headers) and name their source.

With ``demo: true`` the node runs the whole needle placement by itself with the
operator's confirmations given automatically (and says so in the record), one
unexpected scan arriving mid-step, then writes the report and a summary.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import threading
import time
from typing import Optional

import numpy as np
import rclpy
from action_msgs.srv import CancelGoal
from geometry_msgs.msg import Point, PointStamped
from rclpy.action import ActionClient
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from igt_robot import acquisition as acq
from igt_robot import frames, paths, workflow
from igt_robot.acquisition import memory as image_memory
from igt_robot.acquisition.dose import series_dose
from igt_robot.imaging.io import read_dicom_series
from igt_robot.imaging.motion_check import check_motion
from igt_robot.imaging.needle import find_needle
from igt_robot.imaging.reformat import oblique_slice, plane_axes, project
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import common, qos, topics
from igt_robot.nodes.params import Param, declare
from igt_robot.procedure.steps import TipCheck, insertion_schedule
from igt_robot.procedure.peer_watch import HeartbeatWatch
from igt_robot.record import procedure_id
from igt_robot.record.dose import SOURCE_MANUAL, DoseFactors, DoseLedger, DoseValueError, ct_scan
from igt_robot.record.report import SliceView, slice_png
from igt_robot.record.store import check_free_space
from igt_robot.robot_model import load_robot_model
from igt_robot.safety import operator_session
from igt_robot.safety.interlock import Interlock, InterlockConfig
from igt_robot.simulation.scanner import PROTOCOLS, SimulatedScanner
from igt_robot.simulation.scenario import make_scenario
from igt_robot_msgs.action import InsertNeedle, MoveGuide
from igt_robot_msgs.msg import DoseRecord, ProcedureEvent, RegistrationResult, RobotState, SafetyStatus, ScannerState
from igt_robot_msgs.srv import OperatorCommand, PlanPath, RegisterImage, ResumeMotion, SetScannerState

NODE_NAME = 'procedure_node'
PARAMS = [
    Param('procedure_id', '', 'procedure identifier shared with the recorder (its record folder name)'),
    Param('record_dir', '', "the recorder's record folder; empty = <repo>/build/records/<procedure_id>"),
    Param('scan_dir', '', 'where simulated scans are written; empty = <record_dir>/scans'),
    Param('demo', False, 'run the whole procedure automatically, confirmations given by the demo operator'),
    Param('exit_when_done', False, 'shut the process down when the demo has finished (launch files)'),
    Param('operator_id', 'demo-operator', 'operator id recorded for confirmations given in demo mode'),
    Param('modality', 'CT', 'simulated scanner modality', choices=('CT', 'MR')),
    Param('scenario_seed', 7, 'seed of the simulated patient and robot mounting', 0, 1_000_000),
    Param('target_depth', 0.0, 'simulated target depth below the skin, m (0 = random 40..90 mm)', 0.0, 0.13),
    Param('insertion_steps', 3, 'insertion steps, each followed by a control scan', 1, 10),
    Param('unexpected_scan_step', 2, 'insertion step during which an unexpected scan arrives (0 = none)', 0, 10),
    Param('scan_duration', 1.0, 'duration of a simulated acquisition, s', 0.1, 30.0),
    Param('tissue_model', False, 'simulate the needle in tissue (deflection, push, breathing, MR distortion); '
          'the control scans then re-plan the rest of the insertion (closed loop)'),
    Param('service_timeout', 60.0, 'time allowed for a service or action of another node, s', 1.0, 600.0),
    Param('acquisition', 'simulated', 'image source: simulated (the stack triggers rendered scans), dicom '
          '(Storage SCP), igtl (OpenIGTLink IMAGE) or folder (watched export folder)', choices=acq.KINDS),
    Param('dicom_ae_title', 'IGT_ROBOT', "the receiver's AE title (1-16 characters)"),
    Param('dicom_host', '127.0.0.1', 'address the DICOM receiver (and the OpenIGTLink image source) binds'),
    Param('dicom_port', 11112, 'DICOM receiver port (0 = any free port, logged)', 0, 65535),
    Param('dicom_allowed_calling_aets', '', 'comma-separated calling AE titles allowed to send (empty = any; '
          'set it at a site)'),
    Param('series_quiet_period_s', 5.0, 'a series without an announced instance count is complete after this '
          'long without a new instance, s', 0.2, 120.0),
    Param('max_instance_mib', 16.0, 'largest DICOM instance accepted, MiB', 0.1, 1024.0),
    Param('igtl_image_port', 18945, 'OpenIGTLink IMAGE source port (acquisition igtl)', 0, 65535),
    Param('watch_dir', '', 'folder the scanner exports DICOM files into (acquisition folder)'),
    Param('scan_wait_timeout', 900.0, 'how long a requested scan may take to arrive, s', 1.0, 7200.0),
    Param('motion_tolerance_m', 0.002, 'target motion against the planning scan (rigid registration of the '
          'anatomy around the target) beyond which a control or confirmation scan holds the workflow until the '
          'operator accepts the motion or aborts, m', 0.0005, 0.02),
    Param('dose_report_wait_s', 5.0, 'after a CT series, wait this long for its Radiation Dose SR before '
          'using the image headers, s', 0.0, 120.0),
    Param('demo_dicom_peer', '', 'demo only: REST URL of the DICOM node (Orthanc) the simulated scanner stores '
          'its series in; it forwards them to this receiver by C-STORE'),
    Param('demo_dicom_receiver', 'stack', "demo only: the receiver's modality name in that DICOM node"),
    Param('operator_session_file', '', 'operator session file (empty: the per-user default); operator commands '
          'must carry its secret, and in demo mode this node reads it to act as the operator'),
]


class StepFailed(Exception):
    """A step could not be carried out; the message says why (returned to the operator)."""


class NoAnswer(StepFailed):
    """A service or action of another node did not answer in time."""


# s; an idempotent request unanswered this long is sent again (procedure_node._call says why). Well above a
# loaded machine's service round trip (tens of ms), well below the whole service_timeout.
IDEMPOTENT_RETRY_S = 3.0


@dataclasses.dataclass
class ProcedureState:
    """What the procedure has learnt so far (scanner LPS, m)."""

    planning_scan: Optional[object] = None        # acquisition.Series or a path
    planning_volume: Optional[object] = None
    registration: Optional[RegistrationResult] = None
    plan: Optional[object] = None                 # igt_robot_msgs/NeedlePlan
    schedule: list = dataclasses.field(default_factory=list)
    tips: list = dataclasses.field(default_factory=list)     # [(scan_id, TipCheck)]
    last_volume: Optional[object] = None
    scans: int = 0
    interlocks: int = 0


class ProcedureNode(Node):
    def __init__(self, context=None, cli_args=None, **kwargs):
        super().__init__(NODE_NAME, context=context, cli_args=cli_args, **kwargs)
        self.p = declare(self, PARAMS)
        self.model = load_robot_model()
        self.kinematics = NeedleGuideKinematics(self.model)
        self.workflow = workflow.Workflow()
        self.state = ProcedureState()
        self.procedure_id = self.p['procedure_id'] or time.strftime('%Y%m%d-%H%M%S')
        self.record_dir = paths.record_dir(self.procedure_id, self.p['record_dir'])
        self.scan_dir = pathlib.Path(self.p['scan_dir'] or self.record_dir / 'scans')
        # The simulation exists only where it is asked for: the simulated source, or the demo's stand-in scanner.
        self.scenario = self.scanner = self.stand_in = None
        self.target = None                            # the lesion the radiologist marks (/procedure/target)
        if self.p['acquisition'] == 'simulated' or self.p['demo_dicom_peer']:
            self.scenario = make_scenario(self.p['scenario_seed'], self.p['target_depth'] or None,
                                          self.p['modality'], T_base_zframe=self.model.T_base_zframe,
                                          tissue=self.p['tissue_model'])
            self.scanner = SimulatedScanner(self.scenario, self.scan_dir, self.model.T_base_zframe, self.kinematics)
            self.target = self.scenario.target.copy()   # Slicer may override
        self.source = acq.make_source(
            self.p['acquisition'], storage_dir=self.record_dir / 'received', simulated_scanner=self.scanner,
            modality=self.p['modality'], dicom_ae_title=self.p['dicom_ae_title'], dicom_host=self.p['dicom_host'],
            dicom_port=self.p['dicom_port'],
            allowed_calling_aets=[a for a in self.p['dicom_allowed_calling_aets'].split(',') if a.strip()],
            quiet_period_s=self.p['series_quiet_period_s'],
            max_instance_bytes=int(self.p['max_instance_mib'] * 1024 * 1024), igtl_port=self.p['igtl_image_port'],
            watch_dir=self.p['watch_dir'], on_event=self._source_event)
        self.dose_ledger = DoseLedger()               # dose records this node published (image-derived)
        self._scan_wait = threading.Event()           # set while a requested scan is awaited; 'stop' clears it
        self._scan_counter = 0                        # scans received from a source the stack does not trigger
        self.error_budget = None                      # from the closed loop's last control scan
        self.safety: Optional[SafetyStatus] = None
        self.robot: Optional[RobotState] = None
        self.lock = threading.RLock()                 # one operator command at a time
        self._active_goal = None
        self.demo_summary: Optional[dict] = None
        self.demo_error: Optional[str] = None
        self.demo_done = threading.Event()
        self.dose_log = []                            # DLP (mGy*cm) of each ionising scan

        group = ReentrantCallbackGroup()
        self.events = common.create_event_publisher(self)
        self.create_subscription(SafetyStatus, topics.SAFETY_STATUS, self._on_safety, qos.SAFETY_LATCHED,
                                 callback_group=group)
        self.create_subscription(RobotState, topics.ROBOT_STATE, self._on_robot, qos.STATE_STREAM, callback_group=group)
        # The interlock core decides when a goal can go (the same rule as the hardware node's).
        self.interlock, self._interlock_lock = Interlock(InterlockConfig()), threading.Lock()
        self._scanner_names = common.PublisherNames(self, topics.SCANNER_STATE)
        self._status_names = common.PublisherNames(self, topics.SAFETY_STATUS)
        self.create_subscription(ScannerState, topics.SCANNER_STATE, self._on_scanner, qos.SCANNER_STATE,
                                 callback_group=group)
        self.create_subscription(RegistrationResult, topics.REGISTRATION_RESULT, self._on_registration, qos.LATCHED,
                                 callback_group=group)
        self.create_subscription(PointStamped, topics.PROCEDURE_TARGET, self._on_target, qos.LATCHED,
                                 callback_group=group)
        self.scanner_client = self.create_client(SetScannerState, topics.SCANNER_SET_STATE, callback_group=group)
        self.register_client = self.create_client(RegisterImage, topics.REGISTRATION_REGISTER, callback_group=group)
        self.plan_client = self.create_client(PlanPath, topics.PLANNER_PLAN, callback_group=group)
        self.resume_client = self.create_client(ResumeMotion, topics.SAFETY_RESUME, callback_group=group)
        self.recorder_report_client = self.create_client(Trigger, '/recorder_node/write_report', callback_group=group)
        self.move_client = ActionClient(self, MoveGuide, topics.MOVE_GUIDE, callback_group=group)
        self.insert_client = ActionClient(self, InsertNeedle, topics.INSERT_NEEDLE, callback_group=group)
        # The actions' own cancel services (part of the ROS action protocol): an empty request cancels every goal.
        self._cancel_all_clients = {name: self.create_client(CancelGoal, f'{name}/_action/cancel_goal',
                                                             callback_group=group)
                                    for name in (topics.MOVE_GUIDE, topics.INSERT_NEEDLE)}
        self.create_service(OperatorCommand, topics.PROCEDURE_COMMAND, self._on_command, callback_group=group)
        self._watch_control_process(group)
        self.dose_pub = self.create_publisher(DoseRecord, topics.SCANNER_DOSE, qos.EVENTS)
        self.source.start()
        if self.p['demo_dicom_peer']:
            from igt_robot.procedure.scanner_stand_in import ScannerStandIn
            self.stand_in = ScannerStandIn(
                self.scanner, self.p['demo_dicom_peer'], self.p['demo_dicom_receiver'], self._stand_in_phase,
                lambda: np.array(self.robot.position) if self.robot is not None else None,
                self.p['scan_duration'], on_error=lambda text: self._event('scan_failed', text,
                                                                           severity=ProcedureEvent.ERROR))
        self.get_logger().info(f'image source: {self.source.describe()}')
        if self.p['demo']:
            self._demo_timer = self.create_timer(0.5, self._start_demo, callback_group=group)

    # ------------------------------------------------------------------ inputs
    def _on_safety(self, msg, info):
        self.safety = msg
        publisher, name = self._status_names.lookup(info)
        with self._interlock_lock:   # the supervisor's status carries its permission
            self.interlock.on_permission(publisher, name, msg.motion_permitted, time.monotonic())

    def _on_robot(self, msg):
        self.robot = msg
        with self._interlock_lock:
            self.interlock.on_drive(faults=msg.faults, estopped=msg.estopped, inhibited=msg.motion_inhibited)

    def _on_scanner(self, msg, info):
        publisher, name = self._scanner_names.lookup(info)
        with self._interlock_lock:
            self.interlock.on_scanner(publisher, name, common.phase_from_msg(msg.phase), msg.heartbeat,
                                      time.monotonic())

    def _operator_token(self) -> str:
        """The operator's secret (this node acts as the operator in demo mode, and says so in the record)."""
        return common.operator_secret(self)

    def _on_registration(self, msg):
        if msg.accepted:
            self.state.registration = msg

    def _on_target(self, msg):
        if msg.header.frame_id not in ('', frames.SCANNER_FRAME):
            self.get_logger().warning(f"target in frame '{msg.header.frame_id}' ignored: expected 'scanner'")
            return
        self.target = np.array([msg.point.x, msg.point.y, msg.point.z])
        self._event('target_set', f'target set from /procedure/target: {np.round(self.target * 1e3, 1)} mm (LPS)')

    # ----------------------------------------------------------------- command service
    def _on_command(self, request, response):
        if (request.command or '').strip().lower() != 'status':
            ok, why = operator_session.check_token(self._operator_token(), request.operator_token)
            if not ok:
                message = f'{request.command} refused: {why}'
                self.get_logger().warning(message)
                self._event('operator_command_refused', message, ProcedureEvent.WARN, operator_id=request.operator_id)
                response.accepted, response.message = False, message
                response.phase, response.step = self.workflow.phase.value, self.workflow.step.value
                return response
        outcome = self.command(request.command, request.argument, request.operator_id)
        response.accepted, response.phase, response.step, response.message = outcome
        return response

    def command(self, name: str, arg: str = '', operator_id: str = '') -> workflow.CommandResult:
        """Carry out one operator command; returns (accepted, phase, step, message)."""
        name = (name or '').strip().lower()
        if name == 'status':
            allowed = ', '.join(self.workflow.allowed_commands())
            return self._result(True, f'{self._safety_text()}; allowed: {allowed}')
        if name == 'stop':
            withdrawn = self._scan_wait.is_set()
            self._scan_wait.clear()     # a scan being waited for is no longer awaited (the step fails)
            return self._result(True, self._cancel_motion() + ('; scan request withdrawn' if withdrawn else ''))
        if self.control_lost:
            return self._result(False, f'{name} refused: {self.control_lost}')
        stopped = ''
        if name == 'abort':
            # An abort takes effect before it waits for the step under way: the scan request is withdrawn (the
            # waiting step ends at its next check, <= 0.5 s, SeriesInbox.wait_for) and the motion is cancelled
            # (the motion step ends with its result); either frees the lock for the abort to be recorded.
            stopped = self._cancel_motion()
            if self._scan_wait.is_set():
                self._scan_wait.clear()
                stopped += '; scan request withdrawn'
        if not self.lock.acquire(timeout=5.0 if name == 'abort' else 1.0):
            message = f'{name} refused: another command is being carried out' + (f' ({stopped})' if stopped else '')
            if name == 'abort':
                self._event('abort_refused', message, severity=ProcedureEvent.ERROR, operator_id=operator_id)
            return self._result(False, message)
        try:
            handler = getattr(self, f'_cmd_{name}', None)
            if handler is None:
                outcome = self.workflow.command(name, arg, self._safety_dict(), operator_id=operator_id)
            else:
                outcome = handler(arg, operator_id)
        except StepFailed as failure:
            outcome = self._result(False, str(failure))
        finally:
            self.lock.release()
            self._flush_workflow_events()
        if not outcome.accepted:
            self.get_logger().warning(f'{name} refused: {outcome.message}')
        elif name == 'abort':
            outcome = outcome._replace(message=f'{outcome.message}; {stopped}')
        return outcome

    def _result(self, accepted, message) -> workflow.CommandResult:
        return workflow.CommandResult(accepted, self.workflow.phase.value, self.workflow.step.value, message)

    def _wf(self, name, arg='', operator_id=''):
        """Advance the workflow; a refusal is a failed step (its reason goes to the operator)."""
        outcome = self.workflow.command(name, arg, self._safety_dict(), operator_id=operator_id)
        if not outcome.accepted:
            raise StepFailed(outcome.message)
        return outcome

    def _check_allowed(self, name):
        if name not in self.workflow.allowed_commands():
            raise StepFailed(self.workflow._out_of_order(name))

    # ----------------------------------------------------------------- steps
    def _cmd_load_planning_scan(self, arg, operator_id):
        self._check_allowed('load_planning_scan')
        if arg:
            self.state.planning_scan = arg
            self.state.planning_volume = read_dicom_series(arg)
            scan_id = pathlib.Path(arg).name
        else:
            acquisition = self._acquire('planning', with_labels=True)
            self.state.planning_scan = acquisition
            self.state.planning_volume = acquisition.volume
            scan_id = acquisition.scan_id
        return self._wf('load_planning_scan', scan_id, operator_id)

    def _planning_path(self) -> str:
        scan = self.state.planning_scan
        return str(scan.dicom_dir if isinstance(scan, acq.Series) else scan)

    def _need_target(self):
        if self.target is None:
            raise StepFailed('no target: mark it in Slicer (/procedure/target, scanner LPS)')
        return self.target

    def _cmd_register(self, arg, operator_id):
        self._check_allowed('register')
        self._need_target()
        volume = self.state.planning_volume
        if volume is not None:
            # The image travels once: the registration node (same process) takes the volume from memory.
            image_memory.put(self._planning_path(), volume)
        method = arg if arg in ('zframe', 'fiducials') else 'zframe'   # Slicer may pass its image source
        request = RegisterImage.Request(image_path=self._planning_path(), method=method, has_target=True,
                                        target_scanner=Point(x=float(self.target[0]), y=float(self.target[1]),
                                                             z=float(self.target[2])))
        reply = self._call(self.register_client, request)
        if not reply.success:
            raise StepFailed(f'registration rejected: {reply.message}')
        self.state.registration = reply.result
        r = reply.result
        return self._wf('register', f'{r.method} FRE {r.fre * 1e3:.2f} mm, predicted TRE '
                                    f'{r.predicted_tre * 1e3:.2f} mm', operator_id)

    def _cmd_plan(self, arg, operator_id):
        self._check_allowed('plan')
        self._need_target()
        scan = self.state.planning_scan
        labels = getattr(scan, 'labelmap_path', None)
        if labels is None:
            raise StepFailed('no label map of the planning scan (segment it first; the simulation provides one)')
        target = PointStamped()
        target.header.frame_id = frames.SCANNER_FRAME
        target.point = Point(x=float(self.target[0]), y=float(self.target[1]), z=float(self.target[2]))
        request = PlanPath.Request(target=target, labelmap_path=str(labels), max_plans=3)
        for _ in range(10):
            reply = self._call(self.plan_client, request)
            if not reply.success or not reply.plans:
                raise StepFailed(f'no plan: {reply.message}')
            plan = reply.plans[0]
            # The planner checks reachability with the robot once it has received the registration we
            # just made (latched topic); until then it plans in the guide's cone with no joint solution.
            if math.isfinite(plan.insertion_depth) and plan.joint_solution.position:
                break
            time.sleep(0.5)   # let the latched registration reach the planner, then plan again
        else:
            raise StepFailed('the planner has not received the registration: no reachable joint solution')
        self.state.plan = plan
        self.state.schedule = insertion_schedule(plan.insertion_depth, self.p['insertion_steps'])
        return self._wf('plan', plan.plan_id or 'plan-1', operator_id)

    def _cmd_align(self, arg, operator_id):
        plan = self.state.plan
        if plan is None:
            raise StepFailed('align refused: no plan')
        self._wf('align', arg, operator_id)
        goal = MoveGuide.Goal()
        for stamped, point in ((goal.entry, plan.entry), (goal.target, plan.target)):
            stamped.header.frame_id = frames.SCANNER_FRAME
            stamped.point = point
        result = self._run_action(self.move_client, goal)
        if result.error_code == MoveGuide.Result.SUCCEEDED:
            return self._wf('motion_done', '', operator_id)
        self._wf('motion_failed', result.message, operator_id)
        raise StepFailed(f'alignment interrupted: {result.message}')

    def _next_depth(self) -> float:
        depth = self._insertion()
        for planned in self.state.schedule:
            if planned > depth + 0.0005:
                return planned
        return self.state.schedule[-1]

    def _insertion(self) -> float:
        return float(self.robot.position[-1]) if self.robot is not None and self.robot.position else 0.0

    def _cmd_insert_step(self, arg, operator_id):
        if not self.state.schedule:
            raise StepFailed('insert_step refused: no plan')
        target_depth = self._insertion() + float(arg) if arg else self._next_depth()
        target_depth = min(target_depth, self.state.schedule[-1])
        self._wf('insert_step', f'{target_depth - self._insertion():.4f}', operator_id)
        result = self._run_action(self.insert_client, InsertNeedle.Goal(target_depth=float(target_depth)))
        if result.error_code == InsertNeedle.Result.SUCCEEDED:
            return self._wf('motion_done', '', operator_id)
        if result.error_code == InsertNeedle.Result.INTERLOCK:
            self.state.interlocks += 1
        self._wf('motion_failed', result.message, operator_id)
        return self._result(False, f'insertion interrupted at {self._insertion() * 1e3:.1f} mm: {result.message}')

    def _cmd_control_scan(self, arg, operator_id):
        self._check_allowed('control_scan_done')
        acquisition = self._acquire('control')
        self._wf('control_scan_done', acquisition.scan_id, operator_id)
        moved = self._check_target_motion(acquisition, operator_id)
        try:
            check = self._check_tip(acquisition)
        except StepFailed as not_found:
            # A short needle (early steps) can be too faint to find: say so; the operator decides on the next
            # step (the confirmation scan must find it).
            self._event('tip_not_found', str(not_found), severity=ProcedureEvent.WARN, scan_id=acquisition.scan_id)
            outcome = self._wf('tip_checked', '', operator_id)
            return outcome._replace(message=f'{not_found}; {outcome.message}{_held(moved)}')
        outcome = self._wf('tip_checked', f'{check.error:.5f}', operator_id)
        try:
            # Also after a reported motion: where the target is now and the expected error are what the
            # operator decides on (accept_motion or abort); nothing advances until then.
            advice = self._closed_loop_step(acquisition, check)
        except Exception as exc:  # noqa: BLE001 -- the closed loop advises; it never fails the scan
            advice = f'closed loop unavailable ({exc}); plan unchanged'
        return outcome._replace(message=f'{outcome.message}; next: {advice}{_held(moved)}')

    def _check_target_motion(self, acquisition, operator_id) -> str:
        """Compare a later scan with the planning scan around the target (rigid registration, both in memory).

        Returns '' when the target is within ``motion_tolerance_m`` of where it was planned; otherwise the reason,
        after the workflow has been told (``target_moved``: nothing advances on the plan until the operator
        accepts the motion or aborts). A check that cannot tell holds the workflow too."""
        tolerance = self.p['motion_tolerance_m']
        planning, scan_id = self.state.planning_volume, acquisition.scan_id
        started = time.monotonic()
        if planning is None or self.target is None:
            reason = f'target motion at {scan_id} not checked: no planning scan or target to compare with'
        else:
            try:
                result = check_motion(planning, acquisition.volume, self.target, threshold_m=tolerance)
            except Exception as exc:  # noqa: BLE001 -- any failure means "not known", which holds the workflow
                reason = f'target motion at {scan_id} not known: the motion check failed ({exc})'
            else:
                moved_mm = result.displacement_m * 1e3
                self._event('motion_checked', f'{scan_id}: target {moved_mm:.2f} mm from where it was planned '
                            f'(tolerance {tolerance * 1e3:.1f} mm), rotation {result.rotation_deg:.2f} deg',
                            scan_id=scan_id, displacement_m=f'{result.displacement_m:.6f}',
                            displacement_vector_m=json.dumps(np.round(result.displacement_vector_m, 6).tolist()),
                            rotation_deg=f'{result.rotation_deg:.3f}', tolerance_m=f'{tolerance:.6f}',
                            moved=str(result.moved).lower(), check_s=f'{time.monotonic() - started:.2f}')
                if not result.moved:
                    return ''
                reason = (f'target moved {moved_mm:.1f} mm (tolerance {tolerance * 1e3:.1f} mm) between the '
                          f'planning scan and {scan_id}')
        self._event('target_moved', reason, severity=ProcedureEvent.ERROR, scan_id=scan_id)
        self.get_logger().error(f'{reason}: the workflow holds until the operator accepts the motion or aborts')
        self._wf('target_moved', reason, operator_id)
        return reason

    def _closed_loop_step(self, acquisition, check) -> str:
        """Closed loop (igt_robot.procedure.closed_loop): the target is found again, the rest of the insertion
        re-planned and the expected error shown before the operator confirms the next step. The robot has no
        needle-rotation axis: a turn of the needle is asked of the operator; a re-alignment is proposed only."""
        from igt_robot.imaging.target import find_target
        from igt_robot.procedure import closed_loop
        tip_expected, u = self._expected_tip()
        if tip_expected is None:
            return 'no registration: plan unchanged'
        try:
            radius = self.scenario.target_radius if self.scenario is not None else 0.008
            target_now = find_target(acquisition.volume, self.target, radius)
        except Exception as exc:  # noqa: BLE001 -- an image that does not show the target leaves the plan as is
            return f'target not found again ({exc}); plan unchanged'
        plan = self.state.plan
        entry = np.array([plan.entry.x, plan.entry.y, plan.entry.z])
        rcm = tip_expected - self._insertion() * u
        decision = closed_loop.decide(
            rcm=rcm, direction=u, skin_distance=max(0.0, float((entry - rcm) @ u)), insertion=self._insertion(),
            tips=[c.tip for _, c in self.state.tips], target=target_now, push_rate=0.0,
            next_scheduled=self._next_depth(), max_insertion=float(self.model.upper[-1]), prior_kappa=0.6,
            uncertainty_kappa=0.3, allow_realign=False, last_step=self._next_depth() >= self.state.schedule[-1])
        # the final depth follows the target (pushed, breathing) when the tissue is simulated; with a rigid
        # world the plan stands (the decision is still shown)
        if (self.p['tissue_model'] and decision.action in ('continue', 'rotate')
                and abs(decision.final_insertion - self.state.schedule[-1]) > 5e-4):
            self.state.schedule[-1] = min(decision.final_insertion, plan.insertion_depth + 0.01)
        registration = self.state.registration
        self.error_budget = closed_loop.procedure_budget(
            predicted_tre_m=registration.predicted_tre if registration is not None else float('nan'), robot_m=0.0,
            tip=check.tip, entry=entry, direction=np.array([plan.direction.x, plan.direction.y, plan.direction.z]),
            target_planned=self.target, target_now=target_now, expected_m=decision.expected_error_m)
        self._event('closed_loop', decision.describe(), scan_id=acquisition.scan_id, action=decision.action,
                    expected_error_m=f'{decision.expected_error_m:.6f}')
        self._event('error_budget', 'error budget at the last control scan (mm)',
                    **{k: f'{v:.3f}' for k, v in self.error_budget.items()})
        return decision.describe()

    def _cmd_confirmation_scan(self, arg, operator_id):
        self._check_allowed('confirmation_scan_done')
        acquisition = self._acquire('confirmation')
        moved = self._check_target_motion(acquisition, operator_id)
        check = self._check_tip(acquisition)
        outcome = self._wf('confirmation_scan_done', f'{acquisition.scan_id}: {check.describe()}', operator_id)
        return outcome._replace(message=f'{outcome.message}{_held(moved)}')

    def _cmd_start(self, arg, operator_id):
        """Preflight: no procedure without the free space its record needs (docs/record.md, "Disk space")."""
        self._check_allowed('start')
        problem = check_free_space(self.record_dir)
        if problem:
            raise StepFailed(f'start refused: {problem}')
        return self._wf('start', arg, operator_id)

    def _cmd_report(self, arg, operator_id):
        self._check_allowed('report')
        path = self._write_report()
        return self._wf('report', path, operator_id)

    # ----------------------------------------------------------------- scans and tips
    def _acquire(self, protocol: str, with_labels: bool = False) -> acq.Series:
        """One scan from the configured source; its volume stays in memory for what follows."""
        if self.source.triggers_scans:
            series = self._acquire_simulated(protocol, with_labels)
        else:
            series = self._await_scan(protocol, with_labels)
        self.state.scans += 1
        self.state.last_volume = series.volume
        self._event('scan_acquired', f'{protocol} scan {series.scan_id}: {series.describe()}, kept in '
                    f'{series.dicom_dir}', scan_id=series.scan_id, path=str(series.dicom_dir),
                    series_instance_uid=series.series_instance_uid, image_source=series.source)
        return series

    def _acquire_simulated(self, protocol: str, with_labels: bool) -> acq.Series:
        """A scan the stack triggers: the scanner goes ACQUIRING (motion halts), the image is formed, then IDLE."""
        ionising = self.scanner.scenario.modality == 'CT'
        # The simulated scanner reports its protocol's dose figures with its state (the scanner interface records
        # them); a real scanner's come from its images.
        dose = PROTOCOLS[protocol].with_dlp(self.scanner.scenario.fov_size[2]) if ionising else DoseFactors()
        request = SetScannerState.Request(phase=ScannerState.PHASE_ACQUIRING, protocol_name=f'{protocol} scan',
                                          is_ionising=ionising, ctdi_vol_mgy=dose.ctdi_vol_mgy,
                                          dlp_mgy_cm=dose.dlp_mgy_cm, kv=dose.kv, mas=dose.mas)
        self._set_scanner(request)
        if ionising:
            self.dose_log.append(dose.dlp_mgy_cm)
        started = time.monotonic()
        try:
            joints = np.array(self.robot.position) if self.robot is not None else None
            series = self.source.acquire(protocol, joints, with_labels=with_labels)
            remaining = self.p['scan_duration'] - (time.monotonic() - started)
            if remaining > 0:
                time.sleep(remaining)   # the scanner is still acquiring (simulated duration)
        finally:
            self._set_scanner(SetScannerState.Request(phase=ScannerState.PHASE_IDLE))
        return series

    def _await_scan(self, protocol: str, with_labels: bool) -> acq.Series:
        """A scan the stack does not trigger: ask the operator, then take the matching series as it arrives."""
        request = acq.ScanRequest(protocol=protocol, modality=self.p['modality'], requested_at=time.monotonic(),
                                  keywords=(protocol,))
        self._event('scan_requested', f'{request.prompt}: the stack waits for the series from '
                    f'{self.source.describe()}', severity=ProcedureEvent.WARN, protocol=protocol)
        self.get_logger().warning(f'operator: {request.prompt}')
        if self.stand_in is not None:
            self.stand_in.request(protocol, with_labels)
        self._scan_wait.set()
        try:
            series = self.source.wait_for_series(
                request, self.p['scan_wait_timeout'],
                on_mismatch=lambda text: self._event('series_not_used', text, severity=ProcedureEvent.WARN),
                cancelled=lambda: not self._scan_wait.is_set())
        except acq.AcquisitionError as exc:
            raise StepFailed(str(exc)) from exc
        finally:
            self._scan_wait.clear()
        self._scan_counter += 1
        series.scan_id = f'scan{self._scan_counter:02d}_{protocol}'
        labels = self.stand_in.labels.get(series.series_instance_uid) if self.stand_in is not None else None
        labels = labels or self.scan_dir / f'{series.series_instance_uid}_labels.nii.gz'
        if pathlib.Path(labels).exists():
            series.labelmap_path = pathlib.Path(labels)   # the segmentation of this series (Slicer, or the demo)
        if series.modality == 'CT':
            self._dose_from_images(series)
        return series

    def _dose_from_images(self, series: acq.Series) -> None:
        """The dose record of a received CT series: its Radiation Dose SR event, else its headers."""
        deadline = time.monotonic() + self.p['dose_report_wait_s']
        wanted = set(series.irradiation_event_uids)
        while wanted and time.monotonic() < deadline:
            if wanted & {e.irradiation_event_uid for e in self.source.rdsr_events()}:
                break
            time.sleep(0.05)   # poll: the SR follows the series on the same or another association
        factors, source, note = series_dose(series, self.source.rdsr_events())
        if factors is None:
            self._event('dose_missing', f'{series.scan_id}: {note}; enter the figures with enter_dose (flagged as '
                        'manual)', severity=ProcedureEvent.WARN, scan_id=series.scan_id)
            return
        self._publish_dose(series, factors, source, note)

    def _publish_dose(self, series, factors, source: str, note: str) -> None:
        try:
            scan = ct_scan(series.scan_id, ctdi_vol_mgy=factors.ctdi_vol_mgy, dlp_mgy_cm=factors.dlp_mgy_cm,
                           kv=factors.kv, mas=factors.mas, scan_length_m=series.scan_length_m or 0.1,
                           protocol_name=series.protocol_name or series.series_description, stamp=time.time(),
                           source=source, series_instance_uid=series.series_instance_uid)
            self.dose_ledger.add(scan)
        except DoseValueError as exc:
            self._event('dose_refused', f'{series.scan_id}: dose figures from {source} refused: {exc}',
                        severity=ProcedureEvent.WARN, scan_id=series.scan_id)
            return
        self.dose_log.append(scan.dlp_mgy_cm)
        record = DoseRecord(procedure_id=self.procedure_id, **self.dose_ledger.dose_record_fields(scan))
        record.header.stamp = common.stamp_now(self)
        self.dose_pub.publish(record)
        self._event('dose_recorded', f'{series.scan_id}: CTDIvol {scan.ctdi_vol_mgy:.2f} mGy, DLP '
                    f'{scan.dlp_mgy_cm:.1f} mGy·cm from {source} ({note})', scan_id=series.scan_id,
                    dose_source=source)

    def _cmd_enter_dose(self, arg, operator_id):
        """The manual fallback: figures the operator reads off the scanner console (flagged MANUAL)."""
        fields = arg.split()
        if len(fields) != 5 or not operator_id:
            raise StepFailed('enter_dose needs an operator id and "scan_id ctdi_vol_mgy dlp_mgy_cm kv mas"')
        try:
            ctdi, dlp, kv, mas = (float(v) for v in fields[1:])
            factors = DoseFactors(ctdi, dlp, kv, mas)
        except (ValueError, DoseValueError) as exc:
            raise StepFailed(f'enter_dose refused: {exc}') from exc
        length = dlp / (ctdi * 100.0) if ctdi > 0 else 0.1
        series = acq.Series(scan_id=fields[0], series_instance_uid='', modality='CT', scan_length_m=length,
                            protocol_name=f'entered by {operator_id}')
        self._publish_dose(series, factors, SOURCE_MANUAL, f'typed in by {operator_id}')
        return self._result(True, f'dose of {fields[0]} recorded as MANUAL (flagged)')

    def _stand_in_phase(self, acquiring: bool, protocol: str, ionising: bool) -> None:
        """The demo's scanner reports its state through the scanner state source, as a real one would."""
        phase = ScannerState.PHASE_ACQUIRING if acquiring else ScannerState.PHASE_IDLE
        self._set_scanner(SetScannerState.Request(phase=phase, protocol_name=protocol, is_ionising=ionising))

    def _source_event(self, kind: str, description: str, values: dict) -> None:
        severity = ProcedureEvent.WARN if ('refused' in kind or 'incomplete' in kind or 'aborted' in kind) \
            else ProcedureEvent.INFO
        self._event(kind, description, severity=severity, **values)

    def _set_scanner(self, request):
        reply = self._call(self.scanner_client, request, idempotent=True)   # the same phase twice is one scan
        if not reply.accepted:
            raise StepFailed(f'scanner refused the state change: {reply.message}')

    def _expected_tip(self):
        """Where the tip should be: the measured joints through the *estimated* registration."""
        registration = self.state.registration
        if registration is None or self.robot is None:
            return None, None
        t = registration.transform.transform
        T_base_scanner = frames.make_transform(
            frames.rotation_from_quaternion_xyzw([t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w]),
            [t.translation.x, t.translation.y, t.translation.z])
        T_scanner_base = frames.invert(T_base_scanner)
        T_base_tip = self.kinematics.forward(np.array(self.robot.position))
        return frames.apply(T_scanner_base, T_base_tip[:3, 3]), frames.rotate(T_scanner_base, T_base_tip[:3, 2])

    def _check_tip(self, acquisition) -> TipCheck:
        expected_tip, expected_direction = self._expected_tip()
        try:
            tip, _ = find_needle(acquisition.volume, expected_tip, expected_direction)
        except Exception as exc:  # noqa: BLE001 -- reported to the operator as a failed step
            raise StepFailed(f'needle not found in {acquisition.scan_id}: {exc}') from exc
        plan = self.state.plan
        direction = np.array([plan.direction.x, plan.direction.y, plan.direction.z])
        check = TipCheck(tip=np.asarray(tip), target=self.target.copy(), direction=direction)
        self.state.tips.append((acquisition.scan_id, check))
        self._event('tip_measured', f'{acquisition.scan_id}: {check.describe()}', tip_m=json.dumps(tip.tolist()),
                    target_m=json.dumps(self.target.tolist()), error_m=f'{check.error:.6f}',
                    scan_id=acquisition.scan_id)
        return check

    # ----------------------------------------------------------------- report
    def _write_report(self) -> str:
        """Render the slice figures into <record_dir>/figures; the recorder (the only report writer) writes
        the report from the record and those figures. Returns the report's path."""
        images = []
        plan = self.state.plan
        if plan is not None:
            entry = np.array([plan.entry.x, plan.entry.y, plan.entry.z])
            direction = np.array([plan.direction.x, plan.direction.y, plan.direction.z])
            u, v = plane_axes(direction)
            # The picture spans the whole path: centred between entry and target, 15 mm beyond each.
            center = (entry + self.target) / 2.0
            half = float(np.linalg.norm(self.target - entry)) / 2.0 + 0.015
            tip = self.state.tips[-1][1].tip if self.state.tips else None
            views = [(self.state.last_volume, 'Confirmation scan along the planned path', tip),
                     (self.state.planning_volume, 'Planning scan with the planned path', None)]
            for volume, title, shown_tip in views:
                if volume is None:
                    continue
                pixels, extent = oblique_slice(volume, center, u, v, half_size=half)
                images.append(SliceView(
                    pixels=pixels, extent_m=extent, title=title, entry=project(entry, center, u, v),
                    target=project(self.target, center, u, v),
                    needle=[project(entry, center, u, v), project(shown_tip, center, u, v)] if shown_tip is not None
                    else None,
                    tip=project(shown_tip, center, u, v) if shown_tip is not None else None,
                    axis_labels=('along the path (mm)', 'across (mm)')))
        figures = self.record_dir / 'figures'
        figures.mkdir(parents=True, exist_ok=True)
        for index, view in enumerate(images):
            target = figures / f'{index:02d}_slice.png'
            with open(target, 'wb') as f:
                f.write(slice_png(view))
                f.flush()
                os.fsync(f.fileno())
        reply = self._call(self.recorder_report_client, Trigger.Request())
        if not reply.success:
            raise StepFailed(f'report not written: {reply.message}')
        self._event('report_written', f'report written to {reply.message}', path=reply.message)
        return reply.message

    # ----------------------------------------------------------------- plumbing
    def _wait_future(self, future, timeout: float, what: str):
        """Block this (worker) thread until ``future`` is done; the executor's other threads complete it."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        self._waiting.add(done)
        try:
            if not done.wait(timeout):
                raise NoAnswer(f'{what} did not answer within {timeout:g} s')
        finally:
            self._waiting.discard(done)
        if not future.done():   # ended by _check_control_process
            raise StepFailed(f'{what}: {self._loss_reason}')
        return future.result()

    def _call(self, client, request, idempotent: bool = False):
        """Call ``client``'s service and wait (``service_timeout``). An ``idempotent`` request is sent again
        every :data:`IDEMPOTENT_RETRY_S` until answered: Fast DDS drops a server's answer when the caller's
        reply reader has not been matched within 100 ms (a server process that has just started, on a loaded
        machine: measured in the test suite), and the caller would otherwise wait the whole timeout."""
        timeout = self.p['service_timeout']
        if not client.wait_for_service(timeout_sec=min(timeout, 30.0)):
            raise StepFailed(f'{client.srv_name} is not available')
        if hasattr(request, 'operator_token') and not request.operator_token:
            request.operator_token = self._operator_token()   # this node acts for the operator (demo, commands)
        deadline = time.monotonic() + timeout
        while True:
            attempt = min(IDEMPOTENT_RETRY_S, max(deadline - time.monotonic(), 0.0)) if idempotent else timeout
            future = client.call_async(request)
            try:
                return self._wait_future(future, attempt, client.srv_name)
            except StepFailed as failure:
                client.remove_pending_request(future)
                if not (idempotent and isinstance(failure, NoAnswer)):
                    raise
                if time.monotonic() >= deadline:
                    raise NoAnswer(f'{client.srv_name} did not answer within {timeout:g} s') from None
                self.get_logger().warning(f'{client.srv_name}: no answer within {attempt:g} s; sending it again')

    def _wait_drive_released(self, timeout: float = 3.0) -> None:
        """When the supervisor permits motion, the drive's inhibit is released one hop later (hardware
        node): wait for it rather than send a goal the drive would refuse."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            permitted = self.safety is not None and self.safety.motion_permitted
            with self._interlock_lock:
                inhibit, _ = self.interlock.decide(time.monotonic())
            if not permitted or not inhibit:
                return   # nothing to wait for: either released, or the goal will be refused with the reason
            time.sleep(0.02)

    def _run_action(self, client, goal):
        self._wait_drive_released()
        timeout = self.p['service_timeout']
        name = client._action_name
        if not client.wait_for_server(timeout_sec=min(timeout, 30.0)):
            raise StepFailed(f'{name} is not available')
        try:
            handle = self._wait_future(client.send_goal_async(goal), timeout, f'{name} (goal)')
        except NoAnswer:
            # The goal may have been accepted and be moving the robot with its answer lost on the way (a server
            # drops an answer to a reader it has not matched yet): cancel every goal of the action.
            self._cancel_all_goals(name)
            raise
        if not handle.accepted:
            raise StepFailed('the motion controller rejected the goal: another motion goal is active')
        self._active_goal = handle
        try:
            return self._wait_future(handle.get_result_async(), timeout * 5, f'{name} (result)').result
        except StepFailed:
            handle.cancel_goal_async()   # never leave a motion running that nobody waits for
            raise
        finally:
            self._active_goal = None

    def _cancel_all_goals(self, action: str) -> None:
        """Cancel every goal of ``action`` (zero goal id and stamp), without waiting for the answer."""
        client = self._cancel_all_clients.get(action)
        if client is None:
            return
        client.call_async(CancelGoal.Request())
        message = f'{action}: no answer to the goal; every goal of the action cancelled'
        self.get_logger().warning(message)
        self._event('motion_cancelled', message, ProcedureEvent.WARN)

    def _cancel_motion(self) -> str:
        handle = self._active_goal
        if handle is None:
            return 'no motion under way'
        handle.cancel_goal_async()
        return 'motion cancel requested'

    def _safety_dict(self):
        if self.safety is None:
            return None
        return {'state': self.safety.state, 'motion_permitted': self.safety.motion_permitted,
                'reason': self.safety.reason}

    def _safety_text(self):
        if self.safety is None:
            return 'safety state unknown'
        why = 'motion permitted' if self.safety.motion_permitted else self.safety.reason
        return f'safety {self.safety.state} ({why})'

    def _event(self, kind, description, severity=ProcedureEvent.INFO, **values):
        self.events.publish(common.make_event(self, kind, description, severity=severity, values=values,
                                              phase=self.workflow.phase.value))

    def _flush_workflow_events(self):
        for event in self.workflow.drain_events():
            fields = event.procedure_event_fields()
            message = ProcedureEvent(phase=fields['phase'], severity=int(fields['severity']), source=self.get_name(),
                                     kind=fields['kind'], description=fields['description'],
                                     values=common.key_values({kv['key']: kv['value'] for kv in fields['values']}),
                                     procedure_id=procedure_id.current())
            message.header.stamp = common.stamp_now(self)
            self.events.publish(message)

    # ----------------------------------------------------------------- demo
    def _start_demo(self):
        self._demo_timer.cancel()
        threading.Thread(target=self._demo_main, name='procedure-demo', daemon=True).start()

    def _demo_main(self):
        from igt_robot.procedure.demo_run import run_demo
        try:
            self.demo_summary = run_demo(self)
        except Exception as exc:  # noqa: BLE001 -- the demo reports any failure and exits non-zero
            self.demo_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'simulated procedure failed: {self.demo_error}')
        finally:
            self.demo_done.set()
            if self.p['exit_when_done']:
                rclpy.try_shutdown(context=self.context)

    def describe_state(self) -> str:
        return f'{self.workflow.phase.value}/{self.workflow.step.value}; {self._safety_text()}'

    # ----------------------------------------------------------------- control-process liveness
    def _watch_control_process(self, group) -> None:
        """Loss of the control process is seen here within the heartbeat timeout + two ticks: an event, a console line,
        waiting goals end, steps are refused with the reason (until the heartbeats are back)."""
        self.control_lost: Optional[str] = None
        self.control_lost_since = 0.0                      # monotonic time of the loss
        self._loss_reason = ''
        self._waiting = set()
        self._control_watch = HeartbeatWatch(timeout=1.0)   # the supervisor's heartbeat_timeout_s
        self.heartbeat = common.HeartbeatPublisher(self, 0.1, callback_group=group)   # the supervisor needs it
        self.create_subscription(Header, common.HEARTBEAT_TOPIC,
                                 lambda msg: self._control_watch.beat(msg.frame_id, time.monotonic()),
                                 qos.COMMANDS, callback_group=group)
        self.create_timer(0.1, self._check_control_process, callback_group=group)

    def _check_control_process(self) -> None:
        change = self._control_watch.tick(time.monotonic())
        if change is None:
            return
        self.control_lost = change.reason if change.lost else None
        self.control_lost_since = time.monotonic()
        if change.lost:
            self._loss_reason = change.reason
            print(f'[procedure] !! {change.reason}: waiting steps end, no step is accepted', flush=True)
            self.get_logger().error(change.reason)
            for done in list(self._waiting):
                done.set()
            self._event('control_lost', change.reason, severity=ProcedureEvent.ERROR)
        else:
            print(f'[procedure] {change.reason}', flush=True)
            self._event('control_restored', change.reason, severity=ProcedureEvent.WARN)

    def destroy_node(self):
        self.source.stop()      # closes the DICOM port / folder watch; what arrived stays on disk
        return super().destroy_node()


def _held(moved: str) -> str:
    """What a scan's answer adds when the target moved (``moved``: the reason, '' when it did not)."""
    return f'; HELD: {moved}; accept_motion or abort' if moved else ''


def exit_code(node: Optional['ProcedureNode']) -> int:
    """The process's exit code: non-zero when the demo procedure failed or did not finish."""
    if node is None or not node.p['demo']:
        return 0 if node is not None else 1
    return 0 if node.demo_done.is_set() and not node.demo_error else 1


def main(args=None) -> int:
    built = []

    def make_node():
        built.append(ProcedureNode())
        return built[-1]

    common.run_node(make_node, args)
    code = exit_code(built[0] if built else None)
    if code:
        node = built[0] if built else None
        why = 'the node could not start' if node is None else (node.demo_error or 'the procedure did not finish')
        print(f'procedure_node: FAILED: {why}', file=sys.stderr, flush=True)
    return code


if __name__ == '__main__':
    sys.exit(main())
