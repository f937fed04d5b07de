"""Tests of the igt_planner package: `colcon test --packages-select igt_planner`, or pytest on this folder.

Every run gets a private ROS graph before anything imports rclpy (localhost discovery, a per-run
domain id, logs under build/). The planner tests at the repository root (test/) move here with
tools/move_tests_into_packages.py, which brings its fixtures along.
"""
import os

from igt_robot import paths, testing

testing.apply_env(testing.isolated_ros_env(
    paths.repo_root() / 'build' / 'test_runs' / 'igt_planner' / 'ros_log',
    domain_id=int(os.environ['ROS_DOMAIN_ID']) if os.environ.get('ROS_DOMAIN_ID') else None))
