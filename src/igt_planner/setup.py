"""igt_planner: safe, reachable, explained needle paths (ament_python)."""
from setuptools import find_packages, setup

PACKAGE = 'igt_planner'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
    ],
    install_requires=['setuptools'],
    extras_require={'test': ['pytest']},   # colcon test runs pytest
    zip_safe=False,
    maintainer='igt_robot maintainers',
    maintainer_email='maintainers@igt-robot.invalid',
    description='Needle trajectory planning: clearance from critical structures, reachability, ablation coverage',
    license='Apache-2.0',
    entry_points={'console_scripts': ['planner_node = igt_planner.planner_node:main']},
)
