"""The robot in Gazebo (gz-sim) with gz_ros2_control, for users who have Gazebo.

    ros2 launch igt_robot gazebo.launch.py

Spawns urdf/igt_robot.urdf (its <gazebo> and <ros2_control> tags load the
gz_ros2_control system plugin with position command interfaces), starts
robot_state_publisher, a joint_state_broadcaster and a position controller for
the five joints (config/gazebo_controllers.yaml). The igt_robot safety stack is
not wired to Gazebo's controllers: the supported simulation is MuJoCo
(sim.launch.py). This file is checked statically here (no Gazebo on CI).

Gazebo is optional: package.xml does not declare it. Install ros-$ROS_DISTRO-ros-gz-sim,
ros-$ROS_DISTRO-gz-ros2-control, ros-$ROS_DISTRO-controller-manager and
ros-$ROS_DISTRO-robot-state-publisher; without them this launch says which are missing and ends
with a non-zero exit code (nothing is started).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription, LogInfo, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch_ros.actions import Node

from igt_robot.launch_support import installed, missing_message

GAZEBO_PACKAGES = ('ros_gz_sim', 'gz_ros2_control', 'controller_manager', 'robot_state_publisher')


def _refuse(missing):
    def fail(context):
        raise RuntimeError(f'gazebo.launch.py needs {", ".join(missing)} (not installed)')
    return LaunchDescription([LogInfo(msg=missing_message(name, 'gazebo.launch.py cannot run')) for name in missing]
                             + [OpaqueFunction(function=fail)])


def generate_launch_description():
    missing = [name for name in GAZEBO_PACKAGES if not installed(name)]
    if missing:
        return _refuse(missing)
    share = get_package_share_directory('igt_robot')
    controllers = os.path.join(share, 'config', 'gazebo_controllers.yaml')
    with open(os.path.join(share, 'urdf', 'igt_robot.urdf')) as f:
        # Plain URDF cannot resolve package paths: hand the plugin its controller file here.
        robot_description = f.read().replace(
            '<plugin filename="gz_ros2_control-system" name="gz_ros2_control::GazeboSimROS2ControlPlugin"/>',
            '<plugin filename="gz_ros2_control-system" name="gz_ros2_control::GazeboSimROS2ControlPlugin">'
            f'<parameters>{controllers}</parameters></plugin>')
    gz_launch = os.path.join(get_package_share_directory('ros_gz_sim'), 'launch', 'gz_sim.launch.py')
    return LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(gz_launch),
                                 launch_arguments={'gz_args': '-r empty.sdf'}.items()),
        Node(package='robot_state_publisher', executable='robot_state_publisher', output='screen',
             parameters=[{'robot_description': robot_description, 'use_sim_time': True}]),
        Node(package='ros_gz_sim', executable='create', output='screen',
             arguments=['-topic', 'robot_description', '-name', 'igt_robot', '-z', '0.3']),
        Node(package='controller_manager', executable='spawner', output='screen',
             arguments=['joint_state_broadcaster', '--param-file', controllers]),
        Node(package='controller_manager', executable='spawner', output='screen',
             arguments=['needle_guide_position_controller', '--param-file', controllers]),
    ])
