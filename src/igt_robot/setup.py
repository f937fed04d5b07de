"""igt_robot: nodes, drivers, safety and simulation of the needle-guidance robot (ament_python).

launch/, urdf/ and config/ are symlinks to the repository's top-level folders so one copy
serves both `colcon build` (installed into share/igt_robot) and `make setup` (editable).

Executables: every entry point lands in lib/igt_robot (setup.cfg), where `ros2 run igt_robot <name>`
and launch_ros look for it. The operator's and engineer's tools (TOOLS) are also installed into
bin/, which `source install/setup.bash` puts on PATH: scripts/<tool> are the small wrappers for that
(data files, so the same file serves `colcon build` and `--symlink-install`). In the venv of
`make setup` (an editable install, which skips data files) tools/setup.sh links .venv/bin/<tool> to
the console script instead.
"""
import glob

from setuptools import find_packages, setup

PACKAGE = 'igt_robot'

NODES = {
    'hardware_node': 'igt_robot.nodes.hardware_node:main',
    'safety_supervisor': 'igt_robot.nodes.safety_supervisor_node:main',
    'scanner_interface': 'igt_robot.nodes.scanner_interface_node:main',
    'motion_controller': 'igt_robot.nodes.motion_controller_node:main',
    'registration_node': 'igt_robot.nodes.registration_node:main',
    'igtl_bridge': 'igt_robot.nodes.igtl_bridge_node:main',
    'procedure_node': 'igt_robot.nodes.procedure_node:main',
    'recorder_node': 'igt_robot.nodes.recorder_node:main',
    'state_publisher': 'igt_robot.nodes.state_publisher_node:main',
    'scanner_trigger': 'igt_robot.nodes.scanner_trigger_node:main',
}
TOOLS = {
    'igt-bringup': 'igt_robot.bringup:main',
    'igt-demo': 'igt_robot.demo:main',
    'igt-operator': 'igt_robot.operator_console:main',
    'igt-firmware-emulator': 'igt_robot.hardware.emulator:main',
}

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob.glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/urdf', glob.glob('urdf/*')),
        ('share/' + PACKAGE + '/config', glob.glob('config/*')),
        ('bin', ['scripts/' + tool for tool in TOOLS]),
    ],
    install_requires=['setuptools'],
    extras_require={'test': ['pytest']},   # colcon test runs pytest
    zip_safe=False,
    maintainer='igt_robot maintainers',
    maintainer_email='maintainers@igt-robot.invalid',
    description='ROS 2 control stack for MRI/CT-compatible needle-guidance robots',
    license='Apache-2.0',
    entry_points={'console_scripts': [f'{name} = {target}' for name, target in {**NODES, **TOOLS}.items()]},
)
