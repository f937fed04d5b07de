"""Launch files: a static check that runs everywhere, and launch_pytest tests for ROS 2 installs.

The static check parses every launch file and verifies that each Node it starts
names an executable the packages really install and a parameter file that
exists, so a typo cannot hide until someone runs `ros2 launch`.
"""
import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))


def installed_executables():
    found = {}
    for package in ('igt_robot', 'igt_planner'):
        setup = (REPO / 'src' / package / 'setup.py').read_text()
        found[package] = set(re.findall(r"'([\w\-]+)'\s*:\s*'[\w\.]+:\w+'", setup))
        found[package] |= set(re.findall(r"'([\w\-]+) = [\w\.]+:\w+'", setup))
    return found


def node_calls(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call):
            func = getattr(call.func, 'id', getattr(call.func, 'attr', ''))
            literal_args = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if call.args and isinstance(call.args[0], ast.Name) and call.args[0].id == 'share':
                literal_args = ['<igt_robot share>'] + literal_args  # a path inside this package
            kwargs = {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}
            calls.append((func, literal_args, kwargs))
    return calls


def test_there_are_launch_files():
    names = {p.name for p in LAUNCH_FILES}
    assert {'sim.launch.py', 'robot.launch.py', 'igt_stack.launch.py'} <= names


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_starts_real_executables_with_real_config(path):
    executables = installed_executables()
    external = {'robot_state_publisher', 'rviz2', 'ros_gz_sim', 'ros_gz_bridge', 'controller_manager'}
    for func, args, kwargs in node_calls(path):
        if func == 'node' and len(args) >= 3:  # helper node(package, executable, *params_files)
            package, executable, *params_files = args
            assert executable in executables[package], f'{path.name}: {package} has no executable {executable}'
            for params_file in params_files:
                assert (REPO / 'config' / params_file).is_file(), f'{path.name}: config/{params_file} missing'
        if func == 'Node' and kwargs.get('package') and kwargs['package'] not in external:
            assert kwargs['executable'] in executables[kwargs['package']], path.name
        if func == 'join' and args and args[0] == '<igt_robot share>' and args[-1].endswith('.launch.py'):
            assert (REPO / 'launch' / args[-1]).is_file(), f'{path.name} includes missing {args[-1]}'


def test_launch_files_compile():
    for path in LAUNCH_FILES:
        compile(path.read_text(), str(path), 'exec')
