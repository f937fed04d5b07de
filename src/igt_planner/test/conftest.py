"""Tests of the igt_planner package: `colcon test --packages-select igt_planner`, or pytest on this folder.

The suite's fixtures and its isolation (a private ROS graph per run, nothing left behind) come from
igt_robot.pytest_fixtures, shared by both packages' test folders.
"""
from igt_robot.pytest_fixtures import *  # noqa: F401,F403
