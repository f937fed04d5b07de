#!/usr/bin/env bash
# Build every ROS package of the repository with colcon (from PyPI, in the venv) and run `colcon test`,
# as a ROS 2 user would: the venv is the underlay (ROS 2 Kilted from wheels), build/colcon the workspace.
# Checks that each package installed its executables where `ros2 run` (lib/<pkg>) and PATH (bin) find
# them, and that `colcon test` ran tests in each package and all passed.
#   COLCON_CHECK_SKIP_MSGS=1  reuse the venv's igt_robot_msgs instead of rebuilding it (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-${VIRTUAL_ENV:-$PWD/.venv}}
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
OUT=${COLCON_CHECK_OUT:-build/colcon}
mkdir -p "$OUT"
PACKAGES=(igt_robot_msgs igt_robot igt_planner)
select=()
if [ "${COLCON_CHECK_SKIP_MSGS:-0}" = 1 ]; then PACKAGES=(igt_robot igt_planner); select=(--packages-ignore igt_robot_msgs); fi
colcon --log-base "$OUT/log" list --base-paths src
colcon --log-base "$OUT/log" build --base-paths src --build-base "$OUT/build" --install-base "$OUT/install" \
  "${select[@]}" --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python" \
  --event-handlers console_cohesion-
INSTALL=$OUT/install
for pkg in "${PACKAGES[@]}"; do
  test -f "$INSTALL/$pkg/share/$pkg/package.xml" || { echo "colcon-check: $pkg not installed" >&2; exit 1; }
done
for exe in igt_robot/lib/igt_robot/hardware_node igt_robot/lib/igt_robot/igt-operator igt_robot/bin/igt-operator \
           igt_robot/bin/igt-firmware-emulator igt_planner/lib/igt_planner/planner_node; do
  test -x "$INSTALL/$exe" || { echo "colcon-check: $INSTALL/$exe missing" >&2; exit 1; }
done
# The installed workspace as a user sources it: the tools are on PATH.
(
  set +u
  # shellcheck disable=SC1091
  source "$INSTALL/setup.bash"
  command -v igt-operator >/dev/null || { echo "colcon-check: igt-operator is not on PATH after sourcing the install" >&2; exit 1; }
  igt-firmware-emulator --help >/dev/null
)
echo "colcon-check: all packages built into $INSTALL; running colcon test"
colcon --log-base "$OUT/log" test --base-paths src --build-base "$OUT/build" --install-base "$OUT/install" \
  "${select[@]}" --event-handlers console_cohesion- \
  --pytest-args -p no:cacheprovider
colcon --log-base "$OUT/log" test-result --test-result-base "$OUT/build" --all | tee "$OUT/test-result.txt"
summary=$(tail -1 "$OUT/test-result.txt")
tests=$(sed -n 's/^Summary: \([0-9]*\) tests.*/\1/p' <<<"$summary")
[ "${tests:-0}" -gt 0 ] || { echo "colcon-check: colcon test ran no tests" >&2; exit 1; }
colcon --log-base "$OUT/log" test-result --test-result-base "$OUT/build" >/dev/null \
  || { echo "colcon-check: colcon test has failures (above)" >&2; exit 1; }
echo "colcon-check: $summary"
