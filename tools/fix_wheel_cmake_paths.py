"""Rewrite the build-host paths that the ROS 2 PyPI wheels bake into their CMake exports.

The ros-kilted-* wheels are built in a manylinux container where Python lives in
/opt/python/cp311-cp311. Their ``*__rosidl_generator_pyExport.cmake`` files name
that Python's include directory and numpy's, so any package that generates
interfaces against them (igt_robot_msgs) fails to configure on a normal machine.
This replaces those paths with the ones of the interpreter running this script.
Idempotent: a second run finds nothing to change.
"""
import pathlib
import re
import sys
import sysconfig

import numpy

BUILD_HOST_PYTHON = re.compile(r'/opt/python/cp3\d+-cp3\d+[^;"]*?/include/python3\.\d+')
BUILD_HOST_NUMPY = re.compile(r'/opt/python/cp3\d+-cp3\d+[^;"]*?/site-packages/numpy/_core/include')


def fix_file(path: pathlib.Path, python_include: str, numpy_include: str) -> bool:
    text = path.read_text()
    new = BUILD_HOST_NUMPY.sub(numpy_include, text)
    new = BUILD_HOST_PYTHON.sub(python_include, new)
    if new != text:
        path.write_text(new)
        return True
    return False


def main(prefix: str) -> int:
    share = pathlib.Path(prefix) / 'share'
    python_include = sysconfig.get_paths()['include']
    numpy_include = numpy.get_include()
    changed = [p for p in share.glob('*/cmake/*.cmake') if fix_file(p, python_include, numpy_include)]
    leftover = [p for p in share.glob('*/cmake/*.cmake') if '/opt/python/' in p.read_text()]
    print(f'fix_wheel_cmake_paths: rewrote {len(changed)} file(s) under {share}')
    if leftover:
        print('fix_wheel_cmake_paths: build-host paths remain in:', *map(str, leftover), sep='\n  ', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix))
