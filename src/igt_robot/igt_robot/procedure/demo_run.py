"""The simulated needle placement, driven through the procedure node's operator commands.

Every step goes through the same /procedure/command path an operator uses; the
demo operator gives the confirmations (each recorded with its operator id, which
says it was automatic) and the explicit resume after every scan. One unexpected
scan arrives in the middle of an insertion step: the interlock stops the needle,
the step is reported interrupted, a control scan locates the tip, and the
insertion continues only after the operator resumes. When a scan shows the
lesion moved beyond the motion tolerance (breathing, the needle's push), the
demo operator accepts the motion (recorded) and the closed loop follows it.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from igt_robot.waiting import wait_for as _wait
from igt_robot_msgs.msg import ScannerState
from igt_robot_msgs.srv import ResumeMotion, SetScannerState


class DemoFailed(RuntimeError):
    """The simulated procedure could not continue; the message says at which step and why."""


def _say(text: str) -> None:
    print(f'[procedure] {text}', flush=True)


def run_demo(node) -> dict:
    """Run the whole procedure on ``node`` (a ProcedureNode); return the summary."""
    started = time.monotonic()
    operator = f"{node.p['operator_id']} (auto-confirmed, demo mode)"

    def step(name, arg='', must=True):
        outcome = node.command(name, arg, operator)
        _say(f'{name:<20} {"ok " if outcome.accepted else "REFUSED"} [{outcome.phase}/{outcome.step}] '
             f'{outcome.message}')
        if must and not outcome.accepted:
            raise DemoFailed(f'{name}: {outcome.message}')
        return outcome

    def resume():
        """The operator's explicit step after a scan or an acknowledged stop."""
        status = _wait(lambda: _settled(node.safety), 60, 'the safety supervisor to reach HOLD or READY')
        if status.state == 'HOLD':
            reply = node._call(node.resume_client, ResumeMotion.Request(operator_id=operator))
            if not reply.success:
                raise DemoFailed(f'resume refused: {reply.message}')
            _say(f'resume               ok  (operator resumes motion: {reply.message})')
        _wait(lambda: _settled(node.safety) and node.safety.motion_permitted, 30, 'motion permission')

    def accept_reported_motion():
        """The simulated lesion moves between breath-holds and ahead of the needle: beyond the motion
        tolerance the workflow holds, and the demo operator goes on, the closed loop having found the
        lesion again (a real operator may abort instead)."""
        if node.workflow.context.motion_hold:
            step('accept_motion', 'demo: the closed loop follows the moved lesion')

    _say(f'simulated {node.p["modality"]} procedure {node.procedure_id}: target '
         f'{np.round(node.target * 1e3, 1).tolist()} mm (scanner LPS), record in {node.record_dir}')
    _wait(lambda: node.robot is not None and _settled(node.safety), 60,
          'the robot state and the safety supervisor in HOLD or READY')
    step('start')
    step('load_planning_scan')
    step('register')
    reg = node.state.registration
    step('plan')
    plan = node.state.plan
    clearance = ', '.join(f'{name} {value * 1e3:.1f} mm' for name, value in
                          zip(plan.structure_names, plan.min_clearance))
    _say(f'plan {plan.plan_id}: depth {plan.depth * 1e3:.1f} mm, insertion {plan.insertion_depth * 1e3:.1f} mm, '
         f'clearance {clearance}; steps at {[round(d * 1e3, 1) for d in node.state.schedule]} mm')
    step('confirm_plan', plan.plan_id)
    resume()
    step('align')
    step('confirm_alignment')
    full = node.state.schedule[-1]
    insert_count = 0
    while True:
        resume()
        insert_count += 1
        injector = None
        if insert_count == node.p['unexpected_scan_step']:
            injector = _UnexpectedScan(node)
            injector.start()
        outcome = step('insert_step', must=False)
        if injector is not None:
            injector.join()
        if not outcome.accepted and 'interrupted' not in outcome.message:
            raise DemoFailed(f'insert_step: {outcome.message}')
        step('control_scan')
        accept_reported_motion()
        if node._insertion() >= full - 0.0003:
            step('done')
            break
        if insert_count > 3 * len(node.state.schedule):
            raise DemoFailed('the insertion did not reach its planned depth')
        step('confirm_next')
    step('confirmation_scan')
    accept_reported_motion()
    step('report')
    final = node.state.tips[-1][1]
    summary = {
        'procedure_id': node.procedure_id,
        'modality': node.p['modality'],
        'target_depth_mm': round(float(plan.depth * 1e3), 2),
        'registration_fre_mm': round(reg.fre * 1e3, 3),
        'registration_predicted_tre_mm': round(reg.predicted_tre * 1e3, 3),
        'insertion_steps': insert_count,
        'interlocks': node.state.interlocks,
        'scans': node.state.scans,
        'total_dlp_mgy_cm': round(sum(a for a in node.dose_log), 1),
        'tip_to_target_mm': round(final.error * 1e3, 3),
        'tip_depth_error_mm': round(final.depth_error * 1e3, 3),
        'tip_lateral_error_mm': round(final.lateral_error * 1e3, 3),
        'wall_time_s': round(time.monotonic() - started, 1),
        'report': str(node.record_dir / 'report.html'),
    }
    _say('summary: ' + ', '.join(f'{k}={v}' for k, v in summary.items()))
    return summary


def _settled(safety):
    """``safety`` once it is HOLD or READY; None while INIT or SCAN_HOLD; DemoFailed at once on FAULT/ESTOP.

    A fault or an e-stop needs the operator (remove the cause, acknowledge): the demo gives no such
    acknowledgement, so it stops there with the supervisor's reason instead of waiting for nothing.
    """
    if safety is None:
        return None
    if safety.state in ('FAULT', 'ESTOP'):
        faults = '; '.join(f'{f.code}: {f.detail}' for f in safety.faults)
        raise DemoFailed(f'safety supervisor in {safety.state}: {safety.reason}' + (f' ({faults})' if faults else ''))
    return safety if safety.state in ('HOLD', 'READY') else None


class _UnexpectedScan(threading.Thread):
    """Starts a scan while the needle is moving, as a colleague at the console might."""

    def __init__(self, node):
        super().__init__(name='unexpected-scan', daemon=True)
        self.node = node
        self.error = None

    def run(self):
        node = self.node
        try:
            start = node._insertion()
            _wait(lambda: node._insertion() > start + 0.002, 60, 'the insertion to get under way')
            _say('!! unexpected scan started mid-step (the interlock must stop the needle)')
            node._set_scanner(SetScannerState.Request(phase=ScannerState.PHASE_ACQUIRING,
                                                      protocol_name='unexpected scan', is_ionising=False))
            time.sleep(node.p['scan_duration'])   # the scan's duration (simulated)
            node._set_scanner(SetScannerState.Request(phase=ScannerState.PHASE_IDLE))
            _say('!! unexpected scan ended')
        except Exception as exc:  # noqa: BLE001 -- reported by the demo
            self.error = exc
