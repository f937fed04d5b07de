"""The stack on the real robot: `ros2 launch igt_robot robot.launch.py serial_port:=/dev/ttyUSB0`.

Operator-driven (no automatic procedure). Arguments: serial_port, serial_connect_timeout, trigger_port
(the controller's trigger port, docs/serial_protocol.md §9; '' = none), and
those of igt_stack.launch.py (igtl_port, scanner_igtl_port, record_root, procedure_id, use_rviz,
log_level). use_rviz defaults to false; with use_rviz:=true and no rviz2 installed, the launch says
so and runs without it.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    arg = LaunchConfiguration
    stack = os.path.join(share, 'launch', 'igt_stack.launch.py')
    passed_on = ('serial_port', 'serial_connect_timeout', 'trigger_port', 'igtl_port', 'scanner_igtl_port', 'use_rviz',
                 'log_level', 'acquisition')
    return LaunchDescription([
        DeclareLaunchArgument('serial_port', default_value='/dev/ttyUSB0', description='motor controller port'),
        DeclareLaunchArgument('serial_connect_timeout', default_value='5.0',
                              description='retry opening serial_port for this long, s'),
        DeclareLaunchArgument('trigger_port', default_value='/dev/ttyUSB1',
                              description="the controller's trigger port ('' = no scanner_trigger relay)"),
        DeclareLaunchArgument('igtl_port', default_value='18944', description='OpenIGTLink port for 3D Slicer'),
        DeclareLaunchArgument('scanner_igtl_port', default_value='18945', description="the scanner's port"),
        DeclareLaunchArgument('use_rviz', default_value='false', description='start rviz2 (if installed)'),
        DeclareLaunchArgument('log_level', default_value='info', description='ROS log level'),
        # A real scanner: images arrive over DICOM (or OpenIGTLink, a watched folder), never from the simulation.
        DeclareLaunchArgument('acquisition', default_value='dicom', choices=['dicom', 'igtl', 'folder'],
                              description='image source: dicom (Storage SCP), igtl (OpenIGTLink IMAGE) or folder'),
        # record_root and procedure_id: igt_stack.launch.py's defaults unless given on the command line.
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(stack),
            # Dose figures typed in at a console are MANUAL (flagged); there is no simulated scanner here.
            launch_arguments=[('backend', 'serial'), ('demo', 'false'), ('service_dose_source', 'MANUAL')]
            + [(name, arg(name)) for name in passed_on]),
    ])
