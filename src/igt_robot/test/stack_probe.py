"""A probe node for tests that drive the stack: action/service clients and latched-topic caches.

All entities are created before the node joins the spinning executor (rclpy's
ActionClient is not safe to construct on a node that is already being spun).
"""
import time

import numpy as np
import rclpy
from rclpy.action import ActionClient
from std_msgs.msg import Header

from igt_robot import testing
from igt_robot.nodes import qos, topics
from igt_robot.safety import operator_session
from igt_robot_msgs.action import InsertNeedle, MoveGuide
from igt_robot_msgs.msg import ProcedureEvent, RobotState, SafetyStatus
from igt_robot_msgs.srv import AcknowledgeFaults, ResumeMotion, SetEstop, SetScannerState


class StackProbe:
    def __init__(self, context, executor, name='stack_probe'):
        self.node = rclpy.create_node(name, context=context)
        self.status = None
        self.robot = None
        self.robot_count = 0
        self.events = []
        self.node.create_subscription(SafetyStatus, '/safety/status', self._on_status, qos.SAFETY_LATCHED)
        self.node.create_subscription(RobotState, '/robot/state', self._on_robot, qos.STATE_STREAM)
        self.node.create_subscription(ProcedureEvent, '/procedure/events', self.events.append, qos.EVENTS)
        self.heartbeat_seen = {}     # node name -> time.monotonic() of its latest heartbeat here
        self.node.create_subscription(Header, topics.HEARTBEAT, self._on_heartbeat, qos.COMMANDS)
        self.move = ActionClient(self.node, MoveGuide, '/motion/move_guide')
        self.insert = ActionClient(self.node, InsertNeedle, '/motion/insert_needle')
        self.resume_client = self.node.create_client(ResumeMotion, '/safety/resume')
        self.ack_client = self.node.create_client(AcknowledgeFaults, '/safety/acknowledge')
        self.estop_client = self.node.create_client(SetEstop, '/safety/estop')
        self.scanner_client = self.node.create_client(SetScannerState, '/scanner/set_state')
        executor.add_node(self.node)

    def _on_status(self, msg):
        self.status = msg

    def _on_heartbeat(self, msg):
        self.heartbeat_seen[msg.frame_id] = time.monotonic()

    def _on_robot(self, msg):
        self.robot = msg
        self.robot_count += 1

    # ------------------------------------------------------------------ waits
    def wait_status(self, predicate, what, timeout=20.0):
        return testing.wait_for(lambda: self.status is not None and predicate(self.status) and self.status,
                                timeout, what)

    def positions(self):
        testing.wait_for(lambda: self.robot is not None, 20, 'robot state')
        return np.array(self.robot.position)

    def after_more_states(self, count=25, timeout=20.0):
        """Positions after ``count`` further robot states (to see that nothing drifts)."""
        start = self.robot_count
        testing.wait_for(lambda: self.robot_count >= start + count, timeout, f'{count} more robot states')
        return np.array(self.robot.position)

    def wait_still(self, timeout=20.0):
        """Wait until the robot reports no axis moving."""
        return testing.wait_for(lambda: self.robot is not None and not self.robot.moving, timeout, 'robot at rest')

    # --------------------------------------------------------------- commands
    def call(self, client, request, timeout=10.0):
        if hasattr(request, 'operator_token') and not request.operator_token:
            request.operator_token = operator_session.read_session()   # the test acts as the operator
        assert client.wait_for_service(timeout_sec=timeout), f'{client.srv_name} not available'
        future = client.call_async(request)
        return testing.wait_for(lambda: future.done() and future.result(), timeout, f'{client.srv_name} reply')

    def resume(self):
        return self.call(self.resume_client, ResumeMotion.Request(operator_id='test'))

    def acknowledge(self, codes=()):
        return self.call(self.ack_client, AcknowledgeFaults.Request(operator_id='test', codes=list(codes)))

    def scan(self, phase, protocol='control scan'):
        return self.call(self.scanner_client, SetScannerState.Request(phase=phase, protocol_name=protocol))

    def make_ready(self):
        """From start-up HOLD to READY by the operator's explicit resume."""
        self.wait_status(lambda s: s.state in ('HOLD', 'READY'), 'supervisor out of INIT', 30)
        if self.status.state == 'HOLD':
            reply = self.resume()
            assert reply.success, reply.message
        status = self.wait_status(lambda s: s.motion_permitted, 'motion permitted')
        self.wait_drive_released()
        return status

    def wait_drive_released(self, timeout=20.0):
        """The hardware node releases the drive's motion-inhibit one hop after the supervisor permits."""
        return testing.wait_for(lambda: self.robot is not None and not self.robot.motion_inhibited, timeout,
                                'the drive motion-inhibit released')

    def send(self, client, goal, timeout=20.0):
        """Send a goal; return the goal handle (accepted or not)."""
        if not client.wait_for_server(timeout_sec=timeout):
            raise AssertionError(f'action server {client._action_name} not available after {timeout:g} s; '
                                 f'{self.describe_action(client._action_name)}')
        future = client.send_goal_async(goal)
        return testing.wait_for(lambda: future.done() and future.result(), timeout, 'goal response')

    def describe_action(self, action: str) -> str:
        """Who the graph shows behind each part of ``action`` (what wait_for_server checks), node and GID."""
        def endpoints(infos):
            return [f'{i.node_name}:{bytes(i.endpoint_gid).hex()[:24]}' for i in infos]
        parts = []
        for service in ('send_goal', 'cancel_goal', 'get_result'):
            base = f'{action}/_action/{service}'
            readers = self.node.get_subscriptions_info_by_topic(f'rq{base}Request', no_mangle=True)
            writers = self.node.get_publishers_info_by_topic(f'rr{base}Reply', no_mangle=True)
            parts.append(f'{service}: request readers {endpoints(readers)} reply writers {endpoints(writers)}')
        for topic in ('feedback', 'status'):
            parts.append(f'{topic}: {endpoints(self.node.get_publishers_info_by_topic(f"{action}/_action/{topic}"))}')
        return '; '.join(parts)

    def result(self, handle, timeout=60.0):
        future = handle.get_result_async()
        return testing.wait_for(lambda: future.done() and future.result(), timeout, 'goal result').result


def line_goal(entry, target, frame='base_link'):
    goal = MoveGuide.Goal()
    goal.entry.header.frame_id = frame
    goal.target.header.frame_id = frame
    goal.entry.point.x, goal.entry.point.y, goal.entry.point.z = map(float, entry)
    goal.target.point.x, goal.target.point.y, goal.target.point.z = map(float, target)
    return goal
