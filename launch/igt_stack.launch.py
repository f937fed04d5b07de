"""The igt_robot stack as separate processes, parameterised by the same config/*.yaml as igt-bringup.

The operator-driven stack (nothing automatic: `igt-operator cmd ...` or 3D Slicer drives the
procedure). sim.launch.py and robot.launch.py include it; launched alone it runs the MuJoCo robot:

    ros2 launch igt_robot igt_stack.launch.py                       # = sim.launch.py demo:=false

Arguments:
  backend          mujoco | serial (hardware backend of hardware_node)
  serial_port      serial device of the motor controller (backend serial)
  serial_connect_timeout  how long hardware_node retries opening serial_port, s (the emulator's pty
                   appears a moment after launch)
  trigger_port     the motor controller's trigger port (docs/serial_protocol.md §9); '' (default): no
                   scanner_trigger relay. With one, scanner_trigger runs in a process of its own
  igtl_port        TCP port of the OpenIGTLink server for 3D Slicer (igtl_bridge); 0 = a free port
  scanner_igtl_port  TCP port of the scanner's OpenIGTLink link (scanner_interface); 0 = a free port
  record_root      folder of the procedure records; each procedure writes <record_root>/<procedure_id>
  procedure_id     name of the record folder shared by recorder_node and procedure_node
  demo             run the simulated procedure automatically, then end the launch with its exit code
  use_rviz         start rviz2 with config/igt_robot.rviz (if rviz2 is installed)
  log_level        ROS log level of every node
  use_security     enforce SROS2 (ROS_SECURITY_ENABLE/STRATEGY/KEYSTORE); needs a keystore made by
                   tools/sros2_keystore.sh and an RMW with DDS-Security (not the PyPI Fast DDS)
  keystore         SROS2 keystore folder (use_security); each process uses enclave /igt_robot/<executable>

/robot_description and /tf: robot_state_publisher from /joint_states where it is installed, else
the stack's state_publisher fills in; state_publisher always adds zframe, the scanner frame of the
accepted registration and the plan's frames.
"""
import os
import time

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from igt_robot.launch_support import default_record_root, end_launch_with, installed, optional_node
from igt_robot.nodes.topics import WORKFLOW_HEARTBEAT_NODES


def generate_launch_description():
    share = get_package_share_directory('igt_robot')
    config = os.path.join(share, 'config')
    with open(os.path.join(share, 'urdf', 'igt_robot.urdf')) as f:
        robot_description = f.read()
    arg = LaunchConfiguration
    record_dir = PathJoinSubstitution([arg('record_root'), arg('procedure_id')])
    ros_args = ['--ros-args', '--log-level', arg('log_level')]
    demo = ParameterValue(arg('demo'), value_type=bool)
    have_robot_state_publisher = installed('robot_state_publisher')
    use_security = IfCondition(arg('use_security'))

    def node(package, executable, *params_files, extra=None, on_exit=None, condition=None):
        # No `name=` remap: the motion_controller process hosts two nodes (hardware_node and
        # motion_controller), and a name remap would rename both. Each node's own name selects its
        # section of the parameter files.
        # One SROS2 enclave per process (tools/sros2_policy.py); ignored unless security is enabled.
        return Node(package=package, executable=executable, output='screen',
                    parameters=[os.path.join(config, f) for f in params_files] + ([extra] if extra else []),
                    arguments=ros_args + ['--enclave', f'/igt_robot/{executable}'], on_exit=on_exit,
                    condition=condition)

    return LaunchDescription([
        DeclareLaunchArgument('backend', default_value='mujoco', description='mujoco | serial'),
        DeclareLaunchArgument('serial_port', default_value='/dev/ttyUSB0',
                              description='motor controller port (backend serial)'),
        DeclareLaunchArgument('serial_connect_timeout', default_value='0.0',
                              description='retry opening serial_port for this long, s'),
        DeclareLaunchArgument('trigger_port', default_value='',
                              description="the controller's trigger port; '' = no scanner_trigger relay"),
        DeclareLaunchArgument('igtl_port', default_value='18944',
                              description='OpenIGTLink server port for 3D Slicer (0 = a free port)'),
        DeclareLaunchArgument('scanner_igtl_port', default_value='18945',
                              description="the scanner's OpenIGTLink port (0 = a free port)"),
        DeclareLaunchArgument('record_root', default_value=default_record_root(),
                              description='records go to <record_root>/<procedure_id>'),
        DeclareLaunchArgument('acquisition', default_value='simulated',
                              description='image source of the procedure: simulated | dicom | igtl | folder'),
        DeclareLaunchArgument('service_dose_source', default_value='SIMULATED', choices=['SIMULATED', 'MANUAL'],
                              description='what dose figures given through /scanner/set_state are recorded as'),
        DeclareLaunchArgument('procedure_id', default_value=time.strftime('proc-%Y%m%d-%H%M%S'),
                              description='record folder name shared by recorder_node and procedure_node'),
        DeclareLaunchArgument('demo', default_value='false',
                              description='run the simulated procedure automatically, then end the launch'),
        DeclareLaunchArgument('use_rviz', default_value='false', description='start rviz2'),
        DeclareLaunchArgument('log_level', default_value='info', description='ROS log level'),
        DeclareLaunchArgument('use_security', default_value='false',
                              description='enforce SROS2 with the keystore of tools/sros2_keystore.sh'),
        DeclareLaunchArgument('keystore', default_value='build/sros2/keystore', description='SROS2 keystore'),
        # Every event and dose of the procedure carries its id (igt_robot.record.procedure_id): the recorder
        # keeps only its own procedure's.
        SetEnvironmentVariable('IGT_PROCEDURE_ID', arg('procedure_id')),
        SetEnvironmentVariable('ROS_SECURITY_ENABLE', 'true', condition=use_security),
        SetEnvironmentVariable('ROS_SECURITY_STRATEGY', 'Enforce', condition=use_security),
        SetEnvironmentVariable('ROS_SECURITY_KEYSTORE', arg('keystore'), condition=use_security),
        optional_node('robot_state_publisher', 'state_publisher publishes the robot links instead',
                      executable='robot_state_publisher', output='screen',
                      parameters=[{'robot_description': robot_description}],
                      arguments=['--ros-args', '--enclave', '/igt_robot/robot_state_publisher']),
        node('igt_robot', 'state_publisher', 'robot.yaml',
             extra={'publish_robot_links': not have_robot_state_publisher}),
        # hardware_node + motion_controller in one process: the control loop runs where the hardware is
        # (as ros2_control's controller manager), and the serial port has exactly one owner.
        node('igt_robot', 'motion_controller', 'robot.yaml', 'motion.yaml',
             # trigger_port: with the MuJoCo backend the simulated controller offers its trigger port there.
             extra={'backend': arg('backend'), 'serial_port': arg('serial_port'),
                    'mujoco_trigger_port_link': arg('trigger_port'),
                    'serial_connect_timeout': ParameterValue(arg('serial_connect_timeout'), value_type=float)}),
        # The scanner -> trigger-port relay, alone in its process (docs/safety.md: the lean process).
        node('igt_robot', 'scanner_trigger', 'robot.yaml', extra={'trigger_port': arg('trigger_port')},
             condition=IfCondition(PythonExpression(["'", arg('trigger_port'), "' != ''"]))),
        node('igt_robot', 'scanner_interface', 'safety.yaml',
             extra={'igtl_port': ParameterValue(arg('scanner_igtl_port'), value_type=int),
                    'service_dose_source': arg('service_dose_source')}),
        # The full stack: no motion without the record and the workflow alive (config/safety.yaml).
        node('igt_robot', 'safety_supervisor', 'safety.yaml',
             extra={'motion_heartbeats': list(WORKFLOW_HEARTBEAT_NODES)}),
        node('igt_robot', 'registration_node', 'registration.yaml'),
        node('igt_planner', 'planner_node', 'planner.yaml'),
        node('igt_robot', 'igtl_bridge', 'procedure.yaml',
             extra={'port': ParameterValue(arg('igtl_port'), value_type=int)}),
        node('igt_robot', 'recorder_node', 'procedure.yaml',
             extra={'procedure_id': arg('procedure_id'), 'record_dir': record_dir}),
        node('igt_robot', 'procedure_node', 'procedure.yaml',
             extra={'procedure_id': arg('procedure_id'), 'record_dir': record_dir, 'demo': demo,
                    'exit_when_done': demo, 'acquisition': arg('acquisition')},
             # The procedure is the job: the launch ends with it, failing when it failed.
             on_exit=end_launch_with('procedure_node')),
        optional_node('rviz2', 'no rviz window (use_rviz:=true)', condition=IfCondition(arg('use_rviz')),
                      executable='rviz2', output='screen',
                      arguments=['-d', os.path.join(config, 'igt_robot.rviz'),
                                 '--ros-args', '--enclave', '/igt_robot/rviz2']),
    ])
