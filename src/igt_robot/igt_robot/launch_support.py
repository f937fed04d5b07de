"""Helpers for the launch files (launch/*.launch.py) on a ROS 2 install: optional packages, exit codes.

Imports launch and launch_ros, which the PyPI-wheel environment does not have: only the launch
files import this module.

* :func:`installed` -- is a ROS package installed (ament index)?
* :func:`optional_node` -- a Node of an optional package (rviz2, robot_state_publisher), or a clear
  log line that it is absent, instead of launch's "package not found" crash mid-launch (which left
  the processes already started orphaned).
* :func:`end_launch_with` -- ``on_exit`` for the process that is the job (procedure_node): the launch
  ends with it, and a non-zero exit code makes ``ros2 launch`` exit non-zero too.
"""
from __future__ import annotations

import os

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import LogInfo, Shutdown
from launch_ros.actions import Node


def installed(package: str) -> bool:
    """Whether ``package`` is in the ament index of the sourced workspaces."""
    try:
        get_package_share_directory(package)
    except PackageNotFoundError:
        return False
    return True


def missing_message(package: str, what: str) -> str:
    return (f"[igt_robot] '{package}' is not installed: {what}. Install it (e.g. apt install "
            f"ros-$ROS_DISTRO-{package.replace('_', '-')}) and launch again.")


def optional_node(package: str, what: str, condition=None, **node_kwargs):
    """``Node(package=...)`` if ``package`` is installed, else a log line naming what is left out."""
    if installed(package):
        return Node(package=package, condition=condition, **node_kwargs)
    return LogInfo(msg=missing_message(package, what), condition=condition)


def end_launch_with(name: str):
    """``on_exit`` handler: shut the launch down when ``name`` exits; fail it when ``name`` failed.

    ``LaunchService.run`` returns 1 (and ``ros2 launch`` exits 1) when an action raises, so a
    non-zero exit of the job's process is turned into an exception; a clean exit ends the launch
    with code 0. An exit while the launch is already shutting down (Ctrl-C) is not a failure.
    """
    def on_exit(event, context):
        if event.returncode not in (0, None) and not getattr(context, 'is_shutdown', False):
            raise RuntimeError(f'{name} exited with code {event.returncode}: the procedure did not complete '
                               f'(its log above says why)')
        return [Shutdown(reason=f'{name} finished')]
    return on_exit


def default_record_root() -> str:
    """Where a launched stack keeps its records: $ROS_HOME/igt_records (~/.ros/igt_records)."""
    ros_home = os.environ.get('ROS_HOME') or os.path.join(os.path.expanduser('~'), '.ros')
    return os.path.join(ros_home, 'igt_records')
