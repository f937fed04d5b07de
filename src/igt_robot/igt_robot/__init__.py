"""igt_robot: ROS 2 control stack for MRI/CT-compatible needle-guidance robots.

The functional core (kinematics, protocol codecs, safety state machine,
trajectory generation, registration) lives in plain modules that never import
rclpy; ROS nodes live in :mod:`igt_robot.nodes` and are thin adapters.
"""
