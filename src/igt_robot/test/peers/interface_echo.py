"""A peer process for the cross-process interface test.

Echoes every custom message type from /probe/<Type> to /echo/<Type>, serves
SetScannerState (accepts IDLE/PREPARING/ACQUIRING, refuses anything else with a
reason) and a MoveGuide action that reports feedback and returns the goal's
target x as its final position. Exits on SIGINT/SIGTERM.
"""
import signal
import sys

import rclpy
from rclpy.action import ActionServer
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from igt_robot_msgs import msg as igt_msg
from igt_robot_msgs.action import MoveGuide
from igt_robot_msgs.srv import SetScannerState

MESSAGE_TYPES = ['ScannerState', 'SafetyFault', 'SafetyStatus', 'RobotState', 'RegistrationResult', 'NeedlePlan',
                 'ProcedureEvent', 'DoseRecord']


class InterfaceEcho(Node):
    def __init__(self):
        super().__init__('interface_echo')
        self._keep = []
        for name in MESSAGE_TYPES:
            msg_type = getattr(igt_msg, name)
            pub = self.create_publisher(msg_type, f'/echo/{name}', 10)
            self._keep.append(self.create_subscription(msg_type, f'/probe/{name}', pub.publish, 10))
        self.create_service(SetScannerState, '/probe/set_scanner_state', self.on_set_state)
        ActionServer(self, MoveGuide, '/probe/move_guide', self.on_move)

    def on_set_state(self, request, response):
        known = (igt_msg.ScannerState.PHASE_IDLE, igt_msg.ScannerState.PHASE_PREPARING,
                 igt_msg.ScannerState.PHASE_ACQUIRING)
        response.accepted = request.phase in known
        response.message = f'phase {request.phase} set' if response.accepted else f'unknown phase {request.phase}'
        return response

    def on_move(self, goal_handle):
        for step in range(1, 4):
            feedback = MoveGuide.Feedback(progress=step / 3.0, state='moving')
            goal_handle.publish_feedback(feedback)
        goal_handle.succeed()
        return MoveGuide.Result(error_code=MoveGuide.Result.SUCCEEDED, message='done',
                                final_positions=[goal_handle.request.target.point.x])


def main():
    rclpy.init()
    node = InterfaceEcho()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    signal.signal(signal.SIGTERM, lambda *_: rclpy.try_shutdown())
    print('READY', flush=True)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
