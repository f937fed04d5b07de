"""The README's ROS-install commands, run here as far as they can run without ROS 2's launch, rviz or Gazebo.

Each command line of the README's "On a real ROS 2 install" block is matched to a check; a command no
check knows fails the test, so the README cannot gain an untried command:

* console scripts (`igt-operator`, `igt-firmware-emulator`, `ros2 run <package> <exe>`) run with
  ``--help`` -- on PATH for the bare tools, in ``lib/<package>`` where ``ros2 run`` looks for the others;
* ``ros2 launch <package> <file> arg:=value`` -- the launch file exists and declares every argument given
  (itself or in the launch file it includes);
* ``pip install -r requirements-ros.txt`` -- the file exists, lists each package rosdep lacks, and each imports;
* ``rosdep install`` -- no package.xml key is one rosdep cannot resolve (those are the pip step's);
* ``colcon build / test`` -- ``make colcon-check`` runs them (its script is checked to do so);
* ``mkdir``/``git clone``/``cd``/``source`` -- shell set-up, nothing to run here.
"""
import ast
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
PIP_ONLY = {'pydicom': 'pydicom', 'pynetdicom': 'pynetdicom', 'nibabel': 'nibabel', 'simpleitk': 'SimpleITK',
            'mujoco': 'mujoco', 'pyigtl': 'pyigtl', 'mcap': 'mcap', 'mcap-ros2-support': 'mcap_ros2'}
RESOLVABLE_PYTHON_KEYS = {'python3-numpy', 'python3-scipy', 'python3-transforms3d', 'python3-serial', 'python3-yaml',
                          'python3-matplotlib', 'python3-pytest'}


def readme_commands():
    text = (REPO / 'README.md').read_text()
    section = text.split('## On a real ROS 2 install', 1)[1].split('\n## ', 1)[0]
    block = section.split('```bash', 1)[1].split('```', 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split('#', 1)[0].strip()
        commands += [part.strip() for part in line.split('&&') if part.strip()]
    return commands


def lib_executable(package, name):
    """Where `ros2 run` finds it: <prefix>/lib/<package>/<name> (this environment's prefix)."""
    for prefix in (sys.prefix, sysconfig.get_config_var('base') or ''):
        path = pathlib.Path(prefix) / 'lib' / package / name
        if path.exists():
            return str(path)
    pytest.fail(f'{name} is not installed in lib/{package} of {sys.prefix} (ros2 run would not find it)')


def run_help(argv):
    result = subprocess.run([*argv, '--help'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f'{argv} --help: {result.stderr[-2000:]}'
    assert 'usage' in result.stdout.lower(), result.stdout


def declared_launch_arguments(path: pathlib.Path, seen=()):
    tree = ast.parse(path.read_text())
    names = set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, 'id', '') == 'DeclareLaunchArgument':
            names.add(call.args[0].value)
        if isinstance(call, ast.Constant) and isinstance(call.value, str) and call.value.endswith('.launch.py'):
            included = REPO / 'launch' / call.value
            if included != path and included.exists() and included not in seen:
                names |= declared_launch_arguments(included, (*seen, path))
    return names


def check_launch(words):
    package, launch_file, *arguments = words[2:]
    assert package == 'igt_robot'
    path = REPO / 'launch' / launch_file
    assert path.is_file(), f'{launch_file} does not exist'
    declared = declared_launch_arguments(path)
    for argument in arguments:
        name = argument.split(':=', 1)[0]
        assert name in declared, f'{launch_file} declares no argument {name!r} (declared: {sorted(declared)})'


def check_pip_step(words):
    requirements = REPO / words[-1].split('/')[-1]
    listed = {re.split(r'[=<>]', line)[0].strip().lower() for line in requirements.read_text().splitlines()
              if line.strip() and not line.startswith('#')}
    assert set(PIP_ONLY) <= listed, f'{requirements.name} lacks {sorted(set(PIP_ONLY) - listed)}'
    venv = {re.split(r'[=<>]', line)[0].strip().lower() for line in (REPO / 'requirements.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')}
    for distribution in sorted(set(PIP_ONLY) & venv):   # what this venv promises; the rest a ROS install's pip step
        module = PIP_ONLY[distribution]
        result = subprocess.run([sys.executable, '-c', f'import {module}'], capture_output=True, text=True)
        assert result.returncode == 0, f'{module}: {result.stderr[-500:]}'


def check_rosdep_keys(_words):
    ours = {'igt_robot', 'igt_planner', 'igt_robot_msgs'}
    for package_xml in sorted((REPO / 'src').glob('*/package.xml')):
        for element in ET.parse(package_xml).getroot():
            if not element.tag.endswith('depend'):
                continue
            key = element.text.strip()
            if key.startswith('python3-'):
                assert key in RESOLVABLE_PYTHON_KEYS, f'{package_xml}: rosdep key {key} does not resolve'
            assert key.lower() not in PIP_ONLY and key.lower().removeprefix('python3-') not in PIP_ONLY, \
                f'{package_xml}: {key} is a pip package (requirements-ros.txt), not a rosdep key'
            assert key in ours or re.fullmatch(r'[a-z][a-z0-9_]*|python3-[a-z0-9-]+', key), key


def check_colcon(words):
    script = (REPO / 'tools' / 'colcon_check.sh').read_text()
    assert f'colcon --log-base "$OUT/log" {words[1]}' in script, f'make colcon-check does not run colcon {words[1]}'
    assert 'colcon-check:' in (REPO / 'Makefile').read_text()


def check(command):
    words = shlex.split(command)
    tool = words[0]
    if tool in ('mkdir', 'cd', 'git', 'source'):
        return
    if tool == 'rosdep':
        return check_rosdep_keys(words)
    if tool == 'pip':
        return check_pip_step(words)
    if tool == 'colcon':
        return check_colcon(words)
    if tool == 'ros2' and words[1] == 'launch':
        return check_launch(words)
    if tool == 'ros2' and words[1] == 'run':
        return run_help([lib_executable(words[2], words[3])])
    if tool.startswith('igt-'):
        # PATH of an activated venv: its bin first (`make test` runs the venv's python without activating it).
        found = shutil.which(tool, path=os.pathsep.join([str(pathlib.Path(sys.executable).parent),
                                                         os.environ.get('PATH', '')]))
        assert found, f'{tool} is not on PATH (tools/setup.sh links it into the venv)'
        return run_help([found])
    pytest.fail(f'no check for the README command {command!r}: add one here')


@pytest.mark.parametrize('command', readme_commands())
def test_readme_command(command):
    check(command)


def test_the_block_lists_the_operator_path_and_the_emulator():
    commands = readme_commands()
    assert any('demo:=false' in c for c in commands)
    assert any('backend:=emulator' in c for c in commands)
    assert any(c.startswith('ros2 run igt_robot igt-operator') for c in commands)
