#!/usr/bin/env bash
# SROS2 keystore for the igt_robot stack: one enclave per launched process, permissions limited to the
# topics, services and actions each node really uses (policy generated from the running graph by
# tools/sros2_policy.py).
#
#   tools/sros2_keystore.sh [KEYSTORE_DIR] [POLICY_XML]
#   ros2 launch igt_robot sim.launch.py use_security:=true keystore:=KEYSTORE_DIR
#
# Needs a ROS 2 install whose RMW has the DDS-Security plugins (e.g. the Debian/apt packages of Fast DDS
# or Cyclone DDS) and sros2 (`ros2 security`). The Fast DDS in the PyPI wheels has NO security plugins:
# this script refuses there, and nothing on that path can enforce these permissions (README, "Clinical
# install: network exposure").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
keystore="${1:-$repo/build/sros2/keystore}"
policy="${2:-$repo/build/sros2/policy.xml}"

refuse() {
    echo "sros2_keystore: $*" >&2
    echo "sros2_keystore: SROS2 needs a ROS 2 install with sros2 ('ros2 security') and an RMW built with" >&2
    echo "sros2_keystore: the DDS-Security plugins. The PyPI Fast DDS has none: security cannot be enforced" >&2
    echo "sros2_keystore: on the PyPI path. Nothing was created." >&2
    exit 2
}

command -v ros2 >/dev/null 2>&1 || refuse "'ros2' is not on PATH (source /opt/ros/<distro>/setup.bash)"
ros2 security --help >/dev/null 2>&1 || refuse "'ros2 security' is not available (install ros-<distro>-sros2)"

if [ ! -s "$policy" ]; then
    echo "sros2_keystore: generating $policy from the stack's graph" >&2
    ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}" \
        python3 "$here/sros2_policy.py" --out "$policy"
fi

if [ -e "$keystore" ] && [ -n "$(ls -A "$keystore" 2>/dev/null)" ]; then
    refuse "keystore $keystore exists and is not empty: remove it or give another folder (keys are never overwritten)"
fi

umask 077
mkdir -p "$keystore"
ros2 security create_keystore "$keystore"
# Enclaves and their permissions (signed) from the policy: one enclave per process, one profile per node.
ros2 security generate_artifacts -k "$keystore" -p "$policy"
chmod -R go-rwx "$keystore"

cat <<EOF
Keystore ready: $keystore (private keys readable by $(id -un) only).
Start the stack with security enforced:
  ros2 launch igt_robot sim.launch.py use_security:=true keystore:=$keystore
or, for processes started by hand:
  export ROS_SECURITY_KEYSTORE=$keystore ROS_SECURITY_ENABLE=true ROS_SECURITY_STRATEGY=Enforce
  ros2 run igt_robot igtl_bridge --ros-args --enclave /igt_robot/igtl_bridge
EOF
