"""The needle placement in simulation: `ros2 launch igt_robot sim.launch.py`.

Arguments (and those of igt_stack.launch.py: igtl_port, scanner_igtl_port, record_root,
procedure_id, use_rviz, log_level):
  backend        mujoco (physics, default) | emulator (the firmware emulator on a pseudo-terminal
                 behind the serial driver, as a real controller would be)
  emulator_link  where the emulator links its pty (the serial driver's port)
  demo           true (default): the procedure node runs planning scan -> registration -> plan ->
                 alignment -> stepwise insertion with control scans -> confirmation scan -> report,
                 then the launch ends with its exit code (non-zero when the procedure failed).
                 false: the operator drives it (`igt-operator cmd start`, ... or 3D Slicer).

    ros2 launch igt_robot sim.launch.py backend:=emulator
    ros2 launch igt_robot sim.launch.py demo:=false igtl_port:=18950
"""
import os
import time

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

from igt_robot.launch_support import default_record_root

EMULATOR_LINK = '/tmp/igt_robot_emulator'
TRIGGER_LINK = '/tmp/igt_robot_emulator_trigger'


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    arg = LaunchConfiguration
    use_emulator = PythonExpression(["'", arg('backend'), "' == 'emulator'"])
    hardware_backend = PythonExpression(["'serial' if '", arg('backend'), "' == 'emulator' else 'mujoco'"])
    passed_on = ('igtl_port', 'scanner_igtl_port', 'record_root', 'procedure_id', 'use_rviz', 'log_level', 'demo')
    return LaunchDescription([
        DeclareLaunchArgument('backend', default_value='mujoco',
                              description='mujoco (physics) | emulator (firmware emulator on a pseudo-terminal)'),
        DeclareLaunchArgument('emulator_link', default_value=EMULATOR_LINK,
                              description="the emulator's pty link = the serial driver's port"),
        DeclareLaunchArgument('demo', default_value='true',
                              description='true: the automatic procedure, then exit; false: operator-driven'),
        DeclareLaunchArgument('use_rviz', default_value='false', description='start rviz2'),
        DeclareLaunchArgument('igtl_port', default_value='18944', description='OpenIGTLink port for 3D Slicer'),
        DeclareLaunchArgument('scanner_igtl_port', default_value='18945', description="the scanner's port"),
        DeclareLaunchArgument('record_root', default_value=default_record_root(),
                              description='records go to <record_root>/<procedure_id>'),
        DeclareLaunchArgument('procedure_id', default_value=time.strftime('sim-%Y%m%d-%H%M%S'),
                              description='record folder name'),
        DeclareLaunchArgument('log_level', default_value='info', description='ROS log level'),
        # The firmware emulator as a node of its own: it links its pty to emulator_link, and
        # hardware_node retries opening that port (serial_connect_timeout) until it is there.
        Node(package='igt_robot', executable='igt-firmware-emulator', output='screen',
             arguments=['--link', arg('emulator_link'), '--trigger-link', TRIGGER_LINK],
             condition=IfCondition(use_emulator)),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'igt_stack.launch.py')),
            launch_arguments=[('backend', hardware_backend), ('serial_port', arg('emulator_link')),
                              ('serial_connect_timeout', '10.0'),
                              # The relay on the controller's trigger port: the emulator links its second pty
                              # there, the MuJoCo backend offers the simulated controller's there.
                              ('trigger_port', TRIGGER_LINK)]
            + [(name, arg(name)) for name in passed_on]),
    ])
