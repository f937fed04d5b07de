"""The stack on the real robot: `ros2 launch igt_robot robot.launch.py serial_port:=/dev/ttyUSB0`."""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    return LaunchDescription([
        DeclareLaunchArgument('serial_port', default_value='/dev/ttyUSB0', description='motor controller port'),
        DeclareLaunchArgument('use_rviz', default_value='true'),
        DeclareLaunchArgument('acquisition', default_value='dicom', choices=['dicom', 'igtl', 'folder'],
                              description='image source: dicom (Storage SCP), igtl (OpenIGTLink IMAGE) or folder'),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'igt_stack.launch.py')),
            launch_arguments={'backend': 'serial', 'serial_port': LaunchConfiguration('serial_port'),
                              'use_rviz': LaunchConfiguration('use_rviz'),
                              # A real scanner: images arrive over DICOM, never from the simulation.
                              'acquisition': LaunchConfiguration('acquisition')}.items()),
    ])
