#!/usr/bin/env python3
"""SROS2 access-control policy of the igt_robot stack, generated from its real ROS graph.

The stack is started in one process (igt_robot.bringup, the same nodes and config/*.yaml as
launch/igt_stack.launch.py), each node's publishers, subscriptions, services, service clients and
actions are read from the graph (``get_*_names_and_types_by_node``), and a policy is written with
one enclave per launched process (``/igt_robot/<executable>``; the motion_controller process hosts
hardware_node and motion_controller, so its enclave has both profiles) and a profile per node that
allows exactly what that node uses: nothing else may be published, subscribed, served or called.
Fixed profiles are added for robot_state_publisher, rviz2 (read-only) and the operator console.

    python tools/sros2_policy.py --out build/sros2/policy.xml

tools/sros2_keystore.sh turns the policy into a keystore with ``ros2 security``. Nothing here needs
DDS-Security: generating the policy works on the PyPI build too; enforcing it does not (README,
"Clinical install: network exposure").
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Mapping, Set

ENCLAVE_ROOT = '/igt_robot'
POLICY_VERSION = '0.2.0'
ACTION_MARK = '/_action/'

# Process (executable of launch/igt_stack.launch.py) -> the stack nodes it hosts (bringup names).
PROCESSES: Dict[str, List[str]] = {
    'motion_controller': ['hardware_node', 'motion_controller'],
    'scanner_interface': ['scanner_interface'],
    'safety_supervisor': ['safety_supervisor'],
    'registration_node': ['registration_node'],
    'planner_node': ['planner_node'],
    'state_publisher': ['state_publisher'],
    'igtl_bridge': ['igtl_bridge'],
    'recorder_node': ['recorder_node'],
    'procedure_node': ['procedure_node'],
    # Only where the controller has a trigger port (the policy's stack run uses the simulated controller's).
    'scanner_trigger': ['scanner_trigger'],
}


@dataclasses.dataclass
class Endpoints:
    """What one node uses on the graph (fully qualified names)."""

    publish: Set[str] = dataclasses.field(default_factory=set)
    subscribe: Set[str] = dataclasses.field(default_factory=set)
    reply: Set[str] = dataclasses.field(default_factory=set)       # services it serves
    request: Set[str] = dataclasses.field(default_factory=set)     # services it calls
    execute: Set[str] = dataclasses.field(default_factory=set)     # actions it serves
    call: Set[str] = dataclasses.field(default_factory=set)        # actions it sends goals to


def _common_node_endpoints() -> Endpoints:
    """What every rclpy node has: /rosout, /parameter_events (its own parameter services are read)."""
    return Endpoints(publish={'/rosout', '/parameter_events'}, subscribe={'/parameter_events'})


def merged(parts: Iterable[Endpoints]) -> Endpoints:
    """One profile for what several rclpy nodes of one stack node use together."""
    out = Endpoints()
    for part in parts:
        for field in dataclasses.fields(Endpoints):
            getattr(out, field.name).update(getattr(part, field.name))
    return out


def stack_node_endpoints(probe, node) -> Endpoints:
    """Endpoints of a stack node together with its helper nodes (``node.helper_nodes()``: the rclpy nodes it
    creates in its context for a thread of its own, e.g. the scanner subscription that no executor serves).
    DDS-Security grants per participant, so the enclave must allow what the helpers use too."""
    helpers = getattr(node, 'helper_nodes', None)
    members = [node] + (list(helpers()) if callable(helpers) else [])
    return merged(endpoints_from_graph(probe, n.get_name(), n.get_namespace()) for n in members)


def fold_actions(e: Endpoints) -> Endpoints:
    """Replace the services and topics an action is made of by the action itself."""
    out = Endpoints(set(), set(), set(), set(), set(e.execute), set(e.call))
    for name in e.reply:
        (out.execute.add(name.split(ACTION_MARK)[0]) if ACTION_MARK in name else out.reply.add(name))
    for name in e.request:
        (out.call.add(name.split(ACTION_MARK)[0]) if ACTION_MARK in name else out.request.add(name))
    out.publish = {n for n in e.publish if ACTION_MARK not in n}
    out.subscribe = {n for n in e.subscribe if ACTION_MARK not in n}
    return out


def endpoints_from_graph(probe, node_name: str, namespace: str = '/') -> Endpoints:
    """Endpoints of ``node_name`` as the ROS graph reports them to ``probe`` (an rclpy node)."""
    def names(pairs):
        return {name for name, _types in pairs}
    raw = Endpoints(publish=names(probe.get_publisher_names_and_types_by_node(node_name, namespace)),
                    subscribe=names(probe.get_subscriber_names_and_types_by_node(node_name, namespace)),
                    reply=names(probe.get_service_names_and_types_by_node(node_name, namespace)),
                    request=names(probe.get_client_names_and_types_by_node(node_name, namespace)))
    return fold_actions(raw)


def fixed_profiles(stack: Mapping[str, Endpoints]) -> Dict[str, Dict[str, Endpoints]]:
    """Enclaves of the processes that are not igt_robot nodes (their endpoints are known, not discovered)."""
    from igt_robot.nodes import topics
    published = set().union(*(e.publish for e in stack.values())) if stack else set()
    rsp = _common_node_endpoints()
    rsp.publish |= {topics.TF, topics.TF_STATIC, topics.ROBOT_DESCRIPTION}
    rsp.subscribe |= {topics.JOINT_STATES}
    rviz = _common_node_endpoints()
    rviz.subscribe |= published | {topics.TF, topics.TF_STATIC, topics.ROBOT_DESCRIPTION}
    console = _common_node_endpoints()
    try:
        from igt_robot.operator_console import SERVICES
        console.request |= {name for _type, name, _owner in SERVICES.values()}
    except ImportError:  # pragma: no cover - the console is part of the package
        pass
    console.subscribe |= {topics.SAFETY_STATUS}
    return {'robot_state_publisher': {'robot_state_publisher': rsp}, 'rviz2': {'rviz2': rviz},
            'operator_console': {'igt_operator': console}}


def policy_xml(enclaves: Mapping[str, Mapping[str, Endpoints]], namespace: str = '/') -> str:
    """SROS2 policy document: enclave ``/igt_robot/<process>`` with one profile per node."""
    root = ET.Element('policy', version=POLICY_VERSION)
    root.set('xmlns:xi', 'http://www.w3.org/2001/XInclude')
    enclaves_el = ET.SubElement(root, 'enclaves')
    for process in sorted(enclaves):
        enclave = ET.SubElement(enclaves_el, 'enclave', path=f'{ENCLAVE_ROOT}/{process}')
        profiles = ET.SubElement(enclave, 'profiles')
        for node_name in sorted(enclaves[process]):
            e = enclaves[process][node_name]
            profile = ET.SubElement(profiles, 'profile', ns=namespace, node=node_name)
            _group(profile, 'topics', 'topic', 'publish', e.publish)
            _group(profile, 'topics', 'topic', 'subscribe', e.subscribe)
            _group(profile, 'services', 'service', 'reply', e.reply)
            _group(profile, 'services', 'service', 'request', e.request)
            _group(profile, 'actions', 'action', 'execute', e.execute)
            _group(profile, 'actions', 'action', 'call', e.call)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding='unicode') + '\n'


def _group(parent, group: str, item: str, permission: str, names: Iterable[str]) -> None:
    names = sorted(set(names))
    if not names:
        return
    el = ET.SubElement(parent, group, {permission: 'ALLOW'})
    for name in names:
        ET.SubElement(el, item).text = name


def read_policy(text: str) -> Dict[str, Dict[str, Endpoints]]:
    """Parse a policy written by :func:`policy_xml` back into enclaves (for checks and tests)."""
    out: Dict[str, Dict[str, Endpoints]] = {}
    for enclave in ET.fromstring(text).iter('enclave'):
        process = enclave.get('path')[len(ENCLAVE_ROOT) + 1:]
        for profile in enclave.iter('profile'):
            e = Endpoints()
            for group in profile:
                for permission, value in group.attrib.items():
                    if value == 'ALLOW':
                        getattr(e, permission).update(child.text for child in group)
            out.setdefault(process, {})[profile.get('node')] = e
    return out


def enclaves_from_running_stack(nodes: Mapping[str, object], probe, settle_s: float = 2.0,
                                timeout_s: float = 30.0) -> Dict[str, Dict[str, Endpoints]]:
    """Read every node of ``nodes`` (bringup name -> rclpy node) from the graph once it stops changing."""
    deadline = time.monotonic() + timeout_s
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        snapshot = {name: stack_node_endpoints(probe, node) for name, node in nodes.items()}
        if snapshot != last:
            last, stable_since = snapshot, time.monotonic()
        elif time.monotonic() - stable_since >= settle_s:
            break
        time.sleep(0.2)
    by_name = {name: node.get_name() for name, node in nodes.items()}
    enclaves: Dict[str, Dict[str, Endpoints]] = {}
    for process, members in PROCESSES.items():
        present = [m for m in members if m in last]
        if present:
            enclaves[process] = {by_name[m]: last[m] for m in present}
    return enclaves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='build/sros2/policy.xml', help='policy file to write')
    parser.add_argument('--settle', type=float, default=2.0, help='graph unchanged this long before reading, s')
    args = parser.parse_args(argv)
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    import rclpy

    from igt_robot import bringup
    names = bringup.available_nodes([n for members in PROCESSES.values() for n in members
                                     if n in bringup.NODES or n == 'motion_controller'])
    run_dir = tempfile.mkdtemp(prefix='sros2_policy_')
    trigger_link = os.path.join(run_dir, 'trigger_port')
    overrides = {'igtl_bridge': {'port': 0}, 'procedure_node': {'demo': False},
                 # The simulated controller offers its trigger port, so the relay runs and gets its profile.
                 'hardware_node': {'backend': 'mujoco', 'mujoco_trigger_port_link': trigger_link},
                 # Normal scheduling: here it shares one process with the whole stack, not a process of its own.
                 'scanner_trigger': {'trigger_port': trigger_link, 'realtime_priority': 0}}
    stack = bringup.Bringup(names, overrides=overrides).start()
    try:
        probe = rclpy.create_node('sros2_policy_probe', context=stack.context)
        enclaves = enclaves_from_running_stack(stack.nodes, probe, settle_s=args.settle)
        flat = {n: e for members in enclaves.values() for n, e in members.items()}
        enclaves.update(fixed_profiles(flat))
        probe.destroy_node()
    finally:
        stack.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(policy_xml(enclaves))
    print(f'{out}: {len(enclaves)} enclaves, {sum(len(m) for m in enclaves.values())} profiles')
    return 0


if __name__ == '__main__':
    sys.exit(main())
