"""Tests of the igt_robot package: `colcon test --packages-select igt_robot`, or pytest on this folder.

Every run gets a private ROS graph before anything imports rclpy (localhost discovery, a per-run
domain id, logs under build/). The suite at the repository root (test/) moves here with
tools/move_tests_into_packages.py, which brings its fixtures along.
"""
import os

from igt_robot import paths, testing

testing.apply_env(testing.isolated_ros_env(
    paths.repo_root() / 'build' / 'test_runs' / 'igt_robot' / 'ros_log',
    domain_id=int(os.environ['ROS_DOMAIN_ID']) if os.environ.get('ROS_DOMAIN_ID') else None))
