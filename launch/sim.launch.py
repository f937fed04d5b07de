"""The whole needle placement in simulation: `ros2 launch igt_robot sim.launch.py`.

Starts the stack with the MuJoCo backend (or the firmware emulator behind the
serial driver with backend:=emulator) and the procedure node in demo mode, which
runs planning scan -> registration -> plan -> alignment -> stepwise insertion with
control scans -> confirmation scan -> report, then exits.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PythonExpression


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    mode = LaunchConfiguration('sim_backend')
    use_emulator = PythonExpression(["'", mode, "' == 'emulator'"])
    backend = PythonExpression(["'serial' if '", mode, "' == 'emulator' else 'mujoco'"])
    return LaunchDescription([
        DeclareLaunchArgument('sim_backend', default_value='mujoco',
                              description='mujoco (physics) | emulator (firmware emulator on a pseudo-terminal)'),
        DeclareLaunchArgument('use_rviz', default_value='false'),
        # The emulator prints its pty path; it is started at a fixed symlink so the serial driver finds it.
        ExecuteProcess(cmd=['igt-firmware-emulator', '--link', '/tmp/igt_robot_emulator'], output='screen',
                       condition=IfCondition(use_emulator)),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'igt_stack.launch.py')),
            launch_arguments={'backend': backend, 'serial_port': '/tmp/igt_robot_emulator',
                              'use_rviz': LaunchConfiguration('use_rviz'), 'demo': 'true'}.items()),
    ])
