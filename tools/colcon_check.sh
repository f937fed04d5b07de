#!/usr/bin/env bash
# Build every ROS package of the repository with colcon (from PyPI, in .venv), as a ROS 2 user would:
# the venv is the underlay (ROS 2 Kilted from wheels), build/colcon the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$PWD/.venv
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
OUT=build/colcon
mkdir -p "$OUT"
colcon --log-base "$OUT/log" list --base-paths src
colcon --log-base "$OUT/log" build --base-paths src --build-base "$OUT/build" --install-base "$OUT/install" \
  --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python" --event-handlers console_cohesion-
for pkg in igt_robot_msgs igt_robot igt_planner; do
  test -f "$OUT/install/$pkg/share/$pkg/package.xml" || { echo "colcon-check: $pkg not installed" >&2; exit 1; }
done
echo "colcon-check: all packages built into $OUT/install"
