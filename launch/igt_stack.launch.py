"""The igt_robot stack as separate processes, parameterised by the same config/*.yaml as igt-bringup.

Included by sim.launch.py and robot.launch.py; not meant to be launched alone
(it works, with backend:=mujoco by default).

Arguments:
  backend        mujoco | serial (hardware backend of hardware_node)
  serial_port    serial device of the motor controller (backend serial)
  use_rviz       start rviz2 with config/igt_robot.rviz
  log_level      ROS log level of every node
  demo           run the simulated procedure automatically (procedure_node), then exit
  procedure_id   name of the record folder shared by recorder_node and procedure_node
  use_security   enforce SROS2 (ROS_SECURITY_ENABLE/STRATEGY/KEYSTORE); needs a keystore made by
                 tools/sros2_keystore.sh and an RMW with DDS-Security (not the PyPI Fast DDS)
  keystore       SROS2 keystore folder (use_security); each process uses enclave /igt_robot/<executable>
"""
import os
import time

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable, Shutdown
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    config = os.path.join(share, 'config')
    with open(os.path.join(share, 'urdf', 'igt_robot.urdf')) as f:
        robot_description = f.read()
    backend = LaunchConfiguration('backend')
    log_level = LaunchConfiguration('log_level')
    ros_args = ['--ros-args', '--log-level', log_level]
    use_security = IfCondition(LaunchConfiguration('use_security'))

    def node(package, executable, *params_files, extra=None, on_exit=None):
        # No `name=` remap: the motion_controller process hosts two nodes (hardware_node and
        # motion_controller), and a name remap would rename both. Each node's own name selects its
        # section of the parameter files.
        # One SROS2 enclave per process (tools/sros2_policy.py); ignored unless security is enabled.
        return Node(package=package, executable=executable, output='screen',
                    parameters=[os.path.join(config, f) for f in params_files] + ([extra] if extra else []),
                    arguments=ros_args + ['--enclave', f'/igt_robot/{executable}'], on_exit=on_exit)

    return LaunchDescription([
        DeclareLaunchArgument('backend', default_value='mujoco', description='mujoco | serial'),
        DeclareLaunchArgument('serial_port', default_value='/dev/ttyUSB0',
                              description='motor controller port (backend serial)'),
        DeclareLaunchArgument('use_rviz', default_value='false', description='start rviz2'),
        DeclareLaunchArgument('log_level', default_value='info', description='ROS log level'),
        DeclareLaunchArgument('demo', default_value='false', description='run the simulated procedure'),
        DeclareLaunchArgument('procedure_id', default_value=time.strftime('proc-%Y%m%d-%H%M%S'),
                              description='record folder name shared by recorder_node and procedure_node'),
        DeclareLaunchArgument('use_security', default_value='false',
                              description='enforce SROS2 with the keystore of tools/sros2_keystore.sh'),
        DeclareLaunchArgument('keystore', default_value='build/sros2/keystore', description='SROS2 keystore'),
        SetEnvironmentVariable('ROS_SECURITY_ENABLE', 'true', condition=use_security),
        SetEnvironmentVariable('ROS_SECURITY_STRATEGY', 'Enforce', condition=use_security),
        SetEnvironmentVariable('ROS_SECURITY_KEYSTORE', LaunchConfiguration('keystore'), condition=use_security),
        Node(package='robot_state_publisher', executable='robot_state_publisher', output='screen',
             parameters=[{'robot_description': robot_description}],
             arguments=['--ros-args', '--enclave', '/igt_robot/robot_state_publisher']),
        # hardware_node + motion_controller in one process: the control loop runs where the hardware is
        # (as ros2_control's controller manager), and the serial port has exactly one owner.
        node('igt_robot', 'motion_controller', 'robot.yaml', 'motion.yaml',
             extra={'backend': backend, 'serial_port': LaunchConfiguration('serial_port')}),
        node('igt_robot', 'scanner_interface', 'safety.yaml'),
        node('igt_robot', 'safety_supervisor', 'safety.yaml'),
        node('igt_robot', 'registration_node', 'registration.yaml'),
        node('igt_planner', 'planner_node', 'planner.yaml'),
        node('igt_robot', 'igtl_bridge', 'procedure.yaml'),
        node('igt_robot', 'recorder_node', 'procedure.yaml',
             extra={'procedure_id': LaunchConfiguration('procedure_id')}),
        node('igt_robot', 'procedure_node', 'procedure.yaml',
             extra={'procedure_id': LaunchConfiguration('procedure_id'), 'demo': LaunchConfiguration('demo'),
                    'exit_when_done': LaunchConfiguration('demo')},
             # The procedure is the job: when its node exits (demo finished), the launch ends.
             on_exit=[Shutdown(reason='procedure_node exited')]),
        Node(package='rviz2', executable='rviz2', output='screen', condition=IfCondition(LaunchConfiguration('use_rviz')),
             arguments=['-d', os.path.join(config, 'igt_robot.rviz'),
                        '--ros-args', '--enclave', '/igt_robot/rviz2']),
    ])
