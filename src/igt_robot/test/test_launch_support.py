"""The launch files' Python, run here against recording stand-ins for launch / launch_ros / ament_index.

ROS 2's launch is absent from the PyPI environment, so `generate_launch_description()` of each file runs
with stand-ins that record every action and its arguments. That checks what the static test cannot: the
optional packages (rviz2, robot_state_publisher, Gazebo's) become a log line or a refusal instead of a
crash, the emulator is a Node, every Node gets the ports and record folder, and the procedure's exit
code becomes the launch's (igt_robot.launch_support.end_launch_with). On a ROS 2 install the
launch_pytest tests (test_launch_pytest.py) run the real thing.
"""
import importlib
import pathlib
import runpy
import sys
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


class Recorded:
    """Any launch action or substitution: its class name, positional and keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self):
        return f'{type(self).__name__}{self.args}{self.kwargs}'


def _recording(name):
    return type(name, (Recorded,), {})


class LaunchDescription(Recorded):
    @property
    def entities(self):
        return list(self.args[0])


class PackageNotFoundError(KeyError):
    pass


@pytest.fixture
def fake_ros(monkeypatch, tmp_path):
    """Stand-in modules; ``installed`` is the set of packages the fake ament index knows."""
    share = tmp_path / 'share'
    (share / 'igt_robot').mkdir(parents=True)
    for folder in ('urdf', 'config', 'launch'):
        (share / 'igt_robot' / folder).symlink_to(REPO / folder)
    state = types.SimpleNamespace(installed={'igt_robot'})

    def get_package_share_directory(package):
        if package not in state.installed:
            raise PackageNotFoundError(package)
        return str(share / package)

    modules = {
        'ament_index_python': {}, 'launch_ros': {}, 'launch_ros.parameter_descriptions': {
            'ParameterValue': _recording('ParameterValue')},
        'ament_index_python.packages': {'get_package_share_directory': get_package_share_directory,
                                        'PackageNotFoundError': PackageNotFoundError},
        'launch': {'LaunchDescription': LaunchDescription},
        'launch.actions': {n: _recording(n) for n in ('DeclareLaunchArgument', 'IncludeLaunchDescription', 'LogInfo',
                                                      'SetEnvironmentVariable', 'OpaqueFunction', 'Shutdown',
                                                      'ExecuteProcess')},
        'launch.conditions': {'IfCondition': _recording('IfCondition')},
        'launch.substitutions': {n: _recording(n) for n in ('LaunchConfiguration', 'PathJoinSubstitution',
                                                            'PythonExpression')},
        'launch.launch_description_sources': {'PythonLaunchDescriptionSource': _recording('Source')},
        'launch_ros.actions': {'Node': _recording('Node')},
    }
    for name, attributes in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))
    monkeypatch.delitem(sys.modules, 'igt_robot.launch_support', raising=False)
    yield state
    sys.modules.pop('igt_robot.launch_support', None)


def describe(name):
    return runpy.run_path(str(REPO / 'launch' / name))['generate_launch_description']()


def of_type(description, kind):
    return [e for e in description.entities if type(e).__name__ == kind]


def node(description, executable):
    return next(n for n in of_type(description, 'Node') if n.kwargs.get('executable') == executable)


def test_stack_without_optional_packages_logs_instead_of_crashing(fake_ros):
    stack = describe('igt_stack.launch.py')
    messages = [e.kwargs['msg'] for e in of_type(stack, 'LogInfo')]
    assert any("'rviz2' is not installed" in m for m in messages)
    assert any("'robot_state_publisher' is not installed" in m for m in messages)
    # Without robot_state_publisher the stack's state_publisher publishes the robot links.
    assert node(stack, 'state_publisher').kwargs['parameters'][-1] == {'publish_robot_links': True}
    rviz_log = next(e for e in of_type(stack, 'LogInfo') if 'rviz2' in e.kwargs['msg'])
    assert type(rviz_log.kwargs['condition']).__name__ == 'IfCondition'    # only said when use_rviz:=true


def test_stack_with_robot_state_publisher_and_rviz_starts_them(fake_ros):
    fake_ros.installed |= {'robot_state_publisher', 'rviz2'}
    stack = describe('igt_stack.launch.py')
    assert not of_type(stack, 'LogInfo')
    assert '<robot' in node(stack, 'robot_state_publisher').kwargs['parameters'][0]['robot_description']
    assert node(stack, 'state_publisher').kwargs['parameters'][-1] == {'publish_robot_links': False}
    assert node(stack, 'rviz2').kwargs['arguments'][0] == '-d'


def test_stack_arguments_reach_the_nodes(fake_ros):
    stack = describe('igt_stack.launch.py')
    declared = {e.args[0]: e.kwargs.get('default_value') for e in of_type(stack, 'DeclareLaunchArgument')}
    assert {'igtl_port', 'scanner_igtl_port', 'record_root', 'procedure_id', 'demo', 'use_rviz',
            'serial_connect_timeout'} <= set(declared)
    assert declared['use_rviz'] == 'false' and declared['demo'] == 'false' and declared['igtl_port'] == '18944'
    assert 'igt_records' in declared['record_root']
    assert 'port' in node(stack, 'igtl_bridge').kwargs['parameters'][-1]
    assert 'igtl_port' in node(stack, 'scanner_interface').kwargs['parameters'][-1]
    for name in ('recorder_node', 'procedure_node'):
        assert type(node(stack, name).kwargs['parameters'][-1]['record_dir']).__name__ == 'PathJoinSubstitution'
    assert callable(node(stack, 'procedure_node').kwargs['on_exit'])


def test_sim_starts_the_emulator_as_a_node_the_hardware_waits_for(fake_ros):
    sim = describe('sim.launch.py')
    declared = {e.args[0]: e.kwargs.get('default_value') for e in of_type(sim, 'DeclareLaunchArgument')}
    assert declared['backend'] == 'mujoco' and declared['demo'] == 'true' and declared['use_rviz'] == 'false'
    emulator = node(sim, 'igt-firmware-emulator')
    assert emulator.kwargs['package'] == 'igt_robot' and emulator.kwargs['arguments'][0] == '--link'
    include = of_type(sim, 'IncludeLaunchDescription')[0]
    passed = dict(include.kwargs['launch_arguments'])
    assert passed['serial_connect_timeout'] == '10.0'
    assert {'igtl_port', 'record_root', 'demo', 'procedure_id'} <= set(passed)


def test_robot_launch_defaults_to_no_rviz(fake_ros):
    robot = describe('robot.launch.py')
    declared = {e.args[0]: e.kwargs.get('default_value') for e in of_type(robot, 'DeclareLaunchArgument')}
    assert declared['use_rviz'] == 'false'
    passed = dict(of_type(robot, 'IncludeLaunchDescription')[0].kwargs['launch_arguments'])
    assert passed['backend'] == 'serial' and passed['demo'] == 'false'


def test_gazebo_without_its_packages_says_which_and_fails(fake_ros):
    gazebo = describe('gazebo.launch.py')
    messages = ' '.join(e.kwargs['msg'] for e in of_type(gazebo, 'LogInfo'))
    assert "'ros_gz_sim' is not installed" in messages and "'gz_ros2_control' is not installed" in messages
    refuse = of_type(gazebo, 'OpaqueFunction')[0].kwargs['function']
    with pytest.raises(RuntimeError, match='ros_gz_sim'):
        refuse(None)
    assert not of_type(gazebo, 'Node')


def test_gazebo_with_its_packages_spawns_the_robot(fake_ros, tmp_path):
    fake_ros.installed |= {'ros_gz_sim', 'gz_ros2_control', 'controller_manager', 'robot_state_publisher'}
    (tmp_path / 'share' / 'ros_gz_sim').mkdir()
    gazebo = describe('gazebo.launch.py')
    assert {n.kwargs['executable'] for n in of_type(gazebo, 'Node')} == {'robot_state_publisher', 'create', 'spawner'}


def test_the_procedures_exit_code_becomes_the_launchs(fake_ros):
    support = importlib.import_module('igt_robot.launch_support')
    on_exit = support.end_launch_with('procedure_node')
    running = types.SimpleNamespace(is_shutdown=False)
    assert type(on_exit(types.SimpleNamespace(returncode=0), running)[0]).__name__ == 'Shutdown'
    with pytest.raises(RuntimeError, match='procedure_node exited with code 1'):
        on_exit(types.SimpleNamespace(returncode=1), running)
    # Ctrl-C: the launch is already shutting down; a signal's exit code is no failure of the procedure.
    assert on_exit(types.SimpleNamespace(returncode=-2), types.SimpleNamespace(is_shutdown=True))
