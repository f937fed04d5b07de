"""The transform tree rviz sees: frame_tree (core) and state_publisher on a real graph.

The node test subscribes as rviz's tf2 listener does (/tf volatile, /tf_static transient local,
/robot_description latched), joining *after* the facts were published, and checks that the chain
scanner -> base_link -> needle_tip equals the kinematics through the accepted registration, and that
the plan's frames sit on the planned entry and target.
"""
import threading

import numpy as np
import pytest
from geometry_msgs.msg import Point, Vector3
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from igt_robot import frame_tree, frames
from igt_robot.kinematics import NeedleGuideKinematics
from igt_robot.nodes import msg_convert, qos, topics
from igt_robot.robot_model import JOINT_NAMES, TIP_LINK
from igt_robot.waiting import wait_for
from igt_robot_msgs.msg import NeedlePlan, RegistrationResult

tf2_msgs = pytest.importorskip('tf2_msgs.msg', reason='tf2_msgs is not installed (tools/setup.sh builds it)')

KIN = NeedleGuideKinematics()
Q = np.array([0.012, -0.008, np.radians(9.0), np.radians(-14.0), 0.021])
# A registration: the scanner rotated 30° about z and offset from the base (as a Z-frame fit gives).
T_BASE_SCANNER = frames.make_transform(frames.rotation_from_quaternion_xyzw([0, 0, np.sin(np.pi / 12),
                                                                             np.cos(np.pi / 12)]),
                                       [0.05, -0.12, 0.30])
# rviz's tf2 listener: /tf RELIABLE VOLATILE depth 100, /tf_static RELIABLE TRANSIENT_LOCAL depth 100.
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)


def expected_scanner_tip():
    return frames.invert(T_BASE_SCANNER) @ KIN.forward(Q)


# ------------------------------------------------------------------------- core

def test_robot_links_compose_to_the_forward_kinematics():
    tree = frame_tree.FrameTree(frame_tree.robot_link_transforms(KIN, Q) + frame_tree.robot_fixed_transforms(KIN))
    np.testing.assert_allclose(tree.lookup(frames.BASE_FRAME, TIP_LINK), KIN.forward(Q), atol=1e-12)
    np.testing.assert_allclose(tree.lookup(frames.BASE_FRAME, frames.ZFRAME_FRAME), KIN.model.T_base_zframe)
    assert tree.lookup(frames.SCANNER_FRAME, TIP_LINK) is None   # no registration yet: not connected
    tree.update([frame_tree.scanner_transform(T_BASE_SCANNER)])
    np.testing.assert_allclose(tree.lookup(frames.SCANNER_FRAME, TIP_LINK), expected_scanner_tip(), atol=1e-12)


def test_movable_joints_are_dynamic_and_fixed_ones_static():
    dynamic = {t.child for t in frame_tree.robot_link_transforms(KIN, Q)}
    static = {t.child for t in frame_tree.robot_fixed_transforms(KIN)}
    assert dynamic == {'stage_x_link', 'stage_y_link', 'pitch_link', 'yaw_link', 'needle_link'}
    assert static == {TIP_LINK, frames.ZFRAME_FRAME}


def test_plan_frames_point_along_the_path():
    entry, target = np.array([0.01, 0.02, 0.03]), np.array([0.04, 0.06, -0.05])
    direction = (target - entry) / np.linalg.norm(target - entry)
    entry_t, target_t = frame_tree.plan_transforms(entry, target, direction)
    np.testing.assert_allclose(entry_t.matrix[:3, 3], entry)
    np.testing.assert_allclose(target_t.matrix[:3, 3], target)
    np.testing.assert_allclose(entry_t.matrix[:3, 2], direction, atol=1e-12)
    np.testing.assert_allclose(entry_t.matrix[:3, :3] @ entry_t.matrix[:3, :3].T, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match='zero'):
        frame_tree.plan_transforms(entry, target, [0, 0, 0])


# ------------------------------------------------------------------------- node

class RvizLikeListener:
    """Collects /tf and /tf_static into a FrameTree, as a tf2 buffer does."""

    def __init__(self, node):
        self.tree = frame_tree.FrameTree()
        self.description = None
        self._lock = threading.Lock()
        node.create_subscription(tf2_msgs.TFMessage, topics.TF, self._on_tf, TF_QOS)
        node.create_subscription(tf2_msgs.TFMessage, topics.TF_STATIC, self._on_tf, TF_STATIC_QOS)
        node.create_subscription(String, topics.ROBOT_DESCRIPTION, self._on_description, qos.LATCHED)

    def _on_tf(self, msg):
        with self._lock:
            self.tree.update(frame_tree.FrameTransform(t.header.frame_id, t.child_frame_id,
                                                       msg_convert.transform_matrix(t.transform))
                             for t in msg.transforms)

    def _on_description(self, msg):
        self.description = msg.data

    def lookup(self, target, source):
        with self._lock:
            return self.tree.lookup(target, source)


def test_rviz_sees_robot_needle_and_plan_in_the_scanner_frame(graph):
    from igt_robot.nodes.state_publisher_node import StatePublisherNode
    graph.add(StatePublisherNode(context=graph.context))
    feeder = graph.create_node('feeder')
    registration_pub = feeder.create_publisher(RegistrationResult, topics.REGISTRATION_RESULT, qos.LATCHED)
    plan_pub = feeder.create_publisher(NeedlePlan, topics.PLANNER_CURRENT_PLAN, qos.LATCHED)
    joints_pub = feeder.create_publisher(JointState, topics.JOINT_STATES, 10)

    accepted = RegistrationResult(accepted=True, method='zframe')
    accepted.transform.header.frame_id, accepted.transform.child_frame_id = frames.BASE_FRAME, frames.SCANNER_FRAME
    accepted.transform.transform = msg_convert.transform_from_matrix(T_BASE_SCANNER)
    registration_pub.publish(accepted)
    entry, target = np.array([0.02, -0.01, 0.05]), np.array([0.03, 0.02, -0.04])
    direction = (target - entry) / np.linalg.norm(target - entry)
    plan_pub.publish(NeedlePlan(plan_id='p1', entry=Point(x=entry[0], y=entry[1], z=entry[2]),
                                target=Point(x=target[0], y=target[1], z=target[2]),
                                direction=Vector3(x=direction[0], y=direction[1], z=direction[2])))
    # rviz joins late: the static facts reach it through transient-local durability.
    listener = RvizLikeListener(graph.create_node('rviz_like'))

    def publish_joints():
        msg = JointState(name=list(JOINT_NAMES), position=[float(v) for v in Q])
        msg.header.stamp = feeder.get_clock().now().to_msg()
        joints_pub.publish(msg)

    def chain_complete():
        publish_joints()
        return listener.lookup(frames.SCANNER_FRAME, TIP_LINK) is not None and \
            listener.lookup(frames.SCANNER_FRAME, frame_tree.PLAN_TARGET_FRAME) is not None

    wait_for(chain_complete, 15, 'scanner -> needle_tip and the plan on /tf + /tf_static', poll=0.05)
    np.testing.assert_allclose(listener.lookup(frames.SCANNER_FRAME, TIP_LINK), expected_scanner_tip(), atol=1e-9)
    np.testing.assert_allclose(listener.lookup(frames.SCANNER_FRAME, frames.BASE_FRAME), frames.invert(T_BASE_SCANNER),
                               atol=1e-9)
    np.testing.assert_allclose(listener.lookup(frames.SCANNER_FRAME, frame_tree.PLAN_TARGET_FRAME)[:3, 3], target,
                               atol=1e-12)
    np.testing.assert_allclose(listener.lookup(frames.SCANNER_FRAME, frame_tree.PLAN_ENTRY_FRAME)[:3, 2], direction,
                               atol=1e-9)
    np.testing.assert_allclose(listener.lookup(frames.BASE_FRAME, frames.ZFRAME_FRAME), KIN.model.T_base_zframe,
                               atol=1e-9)
    wait_for(lambda: listener.description, 10, '/robot_description')
    assert '<robot' in listener.description and 'needle_tip' in listener.description


def test_a_rejected_registration_places_no_scanner(graph):
    from igt_robot.nodes.state_publisher_node import StatePublisherNode
    node = graph.add(StatePublisherNode(context=graph.context))
    rejected = RegistrationResult(accepted=False, rejection_reason='rod 3 not found')
    rejected.transform.transform = msg_convert.transform_from_matrix(T_BASE_SCANNER)
    node._on_registration(rejected)
    accepted = RegistrationResult(accepted=True)
    accepted.transform.transform = msg_convert.transform_from_matrix(T_BASE_SCANNER)
    assert frames.SCANNER_FRAME not in node._static
    node._on_registration(accepted)
    np.testing.assert_allclose(node._static[frames.SCANNER_FRAME][0].matrix, T_BASE_SCANNER, atol=1e-12)
