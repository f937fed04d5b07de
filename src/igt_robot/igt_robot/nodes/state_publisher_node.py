"""state_publisher: /robot_description, /tf and /tf_static for rviz and any tf2 listener on the graph.

The tree and its transforms come from :mod:`igt_robot.frame_tree` (the core); this node only
translates:

* ``/joint_states`` (sensor_msgs/JointState, RELIABLE depth 10) -> the robot's movable joints on
  ``/tf`` with the joint state's stamp -- when ``publish_robot_links`` is true, i.e. where no
  robot_state_publisher runs (the PyPI path; the launch files start the real one where it is
  installed and set this false).
* ``/robot_description`` (std_msgs/String, LATCHED) -- the URDF, with ``publish_robot_links``.
* ``/tf_static`` (tf2_msgs/TFMessage, LATCHED as tf2 expects): the URDF's fixed joints (with
  ``publish_robot_links``), base_link -> scanner from each *accepted* ``/registration/result``, and
  scanner -> plan_entry / plan_target from ``/planner/current_plan``. A latched topic keeps only the
  last message, so every publication carries this node's whole static set.

Without tf2_msgs (a venv set up before tools/setup.sh built it) the node says so and publishes
/robot_description only.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional

import numpy as np
from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from igt_robot import frame_tree
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.robot_model import JOINT_NAMES, default_urdf_path, load_robot_model
from igt_robot_msgs.msg import NeedlePlan, RegistrationResult

from . import common, msg_convert, qos, topics
from .params import Param, declare

try:  # tf2_msgs: ROS 2 installs have it; tools/setup.sh builds it into the venv where the wheels lack it
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - depends on the install
    TFMessage = None

JOINT_STATE_QOS = 10   # as robot_state_publisher subscribes: RELIABLE, KEEP_LAST 10

PARAMS = [
    Param('publish_robot_links', True, 'publish /robot_description and the robot links on /tf (false where '
          'robot_state_publisher runs)'),
    Param('urdf_path', '', 'URDF of the robot; empty = the installed urdf/igt_robot.urdf'),
]


class StatePublisherNode(Node):
    """Translates joint states, the accepted registration and the current plan into tf messages."""

    def __init__(self, **kwargs):
        super().__init__('state_publisher', **kwargs)
        self.p = declare(self, PARAMS)
        urdf_path = self.p['urdf_path'] or str(default_urdf_path())
        self.kinematics = NeedleGuideKinematics(load_robot_model(urdf_path))
        self._lock = threading.Lock()
        self._static: Dict[str, tuple] = {}   # child frame -> (FrameTransform, stamp)
        self._joint_index: Optional[np.ndarray] = None
        self.published_tf = 0
        robot_links = bool(self.p['publish_robot_links'])
        if robot_links:
            with open(urdf_path, encoding='utf-8') as f:
                self.description_pub = self.create_publisher(String, topics.ROBOT_DESCRIPTION, qos.LATCHED)
                self.description_pub.publish(String(data=f.read()))
        if TFMessage is None:
            self.get_logger().warning('tf2_msgs is not installed: no /tf or /tf_static (run tools/setup.sh, which '
                                      'builds it, or install ros-$ROS_DISTRO-tf2-msgs)')
            return
        self.tf_pub = self.create_publisher(TFMessage, topics.TF, JOINT_STATE_QOS)
        # tf2's static QoS: RELIABLE, TRANSIENT_LOCAL, depth 1 (= LATCHED).
        self.tf_static_pub = self.create_publisher(TFMessage, topics.TF_STATIC, qos.LATCHED)
        if robot_links:
            self.create_subscription(JointState, topics.JOINT_STATES, self._on_joint_states, JOINT_STATE_QOS)
            self._set_static(frame_tree.robot_fixed_transforms(self.kinematics))
        self.create_subscription(RegistrationResult, topics.REGISTRATION_RESULT, self._on_registration, qos.LATCHED)
        self.create_subscription(NeedlePlan, topics.PLANNER_CURRENT_PLAN, self._on_plan, qos.LATCHED)
        self.get_logger().info(f'publishing /tf_static{" and the robot links on /tf" if robot_links else ""}')

    # ------------------------------------------------------------------ inputs
    def _on_joint_states(self, msg: JointState) -> None:
        try:
            q = self._joint_vector(msg)
        except ValueError as exc:
            self.get_logger().warning(f'/joint_states ignored: {exc}', throttle_duration_sec=5.0)
            return
        links = frame_tree.robot_link_transforms(self.kinematics, q)
        self.tf_pub.publish(TFMessage(transforms=[self._stamped(t, msg.header.stamp) for t in links]))
        self.published_tf += 1

    def _joint_vector(self, msg: JointState) -> np.ndarray:
        names = list(msg.name)
        if len(msg.position) != len(names):
            raise ValueError(f'{len(names)} names but {len(msg.position)} positions')
        missing = [n for n in JOINT_NAMES if n not in names]
        if missing:
            raise ValueError(f'joints {missing} missing')
        return np.array([msg.position[names.index(n)] for n in JOINT_NAMES], dtype=float)

    def _on_registration(self, msg: RegistrationResult) -> None:
        if not msg.accepted:   # only an accepted registration places the scanner
            return
        T_base_scanner = msg_convert.transform_matrix(msg.transform.transform)
        self._set_static([frame_tree.scanner_transform(T_base_scanner)], msg.header.stamp)

    def _on_plan(self, msg: NeedlePlan) -> None:
        direction = [msg.direction.x, msg.direction.y, msg.direction.z]
        try:
            transforms = frame_tree.plan_transforms(msg_convert.point_list(msg.entry),
                                                    msg_convert.point_list(msg.target), direction)
        except ValueError as exc:
            self.get_logger().warning(f'plan {msg.plan_id!r} not shown on /tf_static: {exc}')
            return
        self._set_static(transforms, msg.header.stamp)

    # ----------------------------------------------------------------- outputs
    def _set_static(self, transforms, stamp=None) -> None:
        stamp = stamp if stamp is not None and (stamp.sec or stamp.nanosec) else common.stamp_now(self)
        with self._lock:
            for transform in transforms:
                self._static[transform.child] = (transform, stamp)
            message = TFMessage(transforms=[self._stamped(t, s) for t, s in self._static.values()])
        self.tf_static_pub.publish(message)

    @staticmethod
    def _stamped(transform: frame_tree.FrameTransform, stamp) -> TransformStamped:
        out = TransformStamped(child_frame_id=transform.child, transform=msg_convert.transform_from_matrix(
            transform.matrix))
        out.header.frame_id = transform.parent
        out.header.stamp = stamp
        return out


def main(args=None) -> int:
    return common.run_node(StatePublisherNode, args)


if __name__ == '__main__':
    import sys
    sys.exit(main())
