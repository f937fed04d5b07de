"""SROS2 policy generated from the stack's graph, and the keystore script's refusal without `ros2 security`.

Enforcing the policy needs DDS-Security plugins (absent from the PyPI Fast DDS): what runs here is the
generator on real nodes and the script's clear refusal."""
import os
import pathlib
import subprocess
import sys

import pytest

from igt_robot.nodes import topics
from igt_robot.nodes.igtl_bridge_node import IgtlBridgeNode
from igt_robot.nodes.registration_node import RegistrationNode

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / 'tools'))
import sros2_policy  # noqa: E402

STACK_NAMES = {v for k, v in vars(topics).items() if k.isupper() and isinstance(v, str)}
ROS_INFRASTRUCTURE = {'/rosout', '/parameter_events'}


def test_each_node_is_allowed_only_its_own_topics_and_services(graph):
    bridge = graph.add(IgtlBridgeNode(context=graph.context, cli_args=['--ros-args', '-p', 'port:=0']))
    registration = graph.add(RegistrationNode(context=graph.context))
    probe = graph.create_node('policy_probe')
    enclaves = sros2_policy.enclaves_from_running_stack({'igtl_bridge': bridge, 'registration_node': registration},
                                                        probe, settle_s=0.5, timeout_s=20.0)
    text = sros2_policy.policy_xml(enclaves)
    policy = sros2_policy.read_policy(text)
    assert set(policy) == {'igtl_bridge', 'registration_node'}
    b, r = policy['igtl_bridge']['igtl_bridge'], policy['registration_node']['registration_node']

    assert {topics.PROCEDURE_TARGET, topics.PROCEDURE_ENTRY, topics.PROCEDURE_EVENTS} <= b.publish
    assert {topics.SAFETY_ESTOP, topics.SAFETY_RESUME, topics.PROCEDURE_COMMAND} <= b.request
    assert topics.REGISTRATION_RESULT in r.publish and topics.REGISTRATION_REGISTER in r.reply
    # Neither may use what only the other does.
    assert topics.REGISTRATION_RESULT not in b.publish and topics.REGISTRATION_REGISTER not in b.reply
    assert topics.PROCEDURE_TARGET not in r.publish and topics.SAFETY_ESTOP not in r.request
    # Nobody but the supervisor may publish the safety topics, and these two do not.
    for e in (b, r):
        assert not {topics.SAFETY_STATUS, topics.SAFETY_MOTION_PERMITTED, topics.SCANNER_STATE} & e.publish
    # Everything listed is a stack name, ROS infrastructure or the node's own parameter/type services.
    for name, e in (('igtl_bridge', b), ('registration_node', r)):
        for entry in e.publish | e.subscribe | e.request:
            assert entry in STACK_NAMES | ROS_INFRASTRUCTURE, (name, entry)
        assert all(s in STACK_NAMES or s.startswith(f'/{name}/') for s in e.reply), (name, e.reply)
    assert '<enclave path="/igt_robot/igtl_bridge">' in text and 'publish="ALLOW"' in text


def test_actions_are_folded_and_fixed_profiles_are_read_only_where_they_should_be():
    raw = sros2_policy.Endpoints(
        publish={'/motion/move_guide/_action/feedback', '/motion/move_guide/_action/status', '/robot/state'},
        reply={'/motion/move_guide/_action/send_goal', '/motion/move_guide/_action/get_result', '/x/get_parameters'},
        request={'/motion/insert_needle/_action/send_goal'})
    folded = sros2_policy.fold_actions(raw)
    assert folded.execute == {'/motion/move_guide'} and folded.call == {'/motion/insert_needle'}
    assert folded.publish == {'/robot/state'} and folded.reply == {'/x/get_parameters'}
    fixed = sros2_policy.fixed_profiles({'n': sros2_policy.Endpoints(publish={'/robot/state'})})
    rviz = fixed['rviz2']['rviz2']
    assert '/robot/state' in rviz.subscribe and rviz.publish == {'/rosout', '/parameter_events'}
    assert rviz.request == set() and rviz.reply == set()
    console = fixed['operator_console']['igt_operator']
    assert {topics.SAFETY_RESUME, topics.SAFETY_ESTOP} <= console.request and console.publish <= ROS_INFRASTRUCTURE
    # Every stack node is in exactly one launched process (one enclave).
    from igt_robot import bringup
    members = [n for m in sros2_policy.PROCESSES.values() for n in m]
    assert sorted(members) == sorted(bringup.NODES)


@pytest.mark.parametrize('fake_ros2', [None, 'exit 1'], ids=['no ros2', 'ros2 without security'])
def test_keystore_script_refuses_clearly_without_ros2_security(tmp_path, fake_ros2):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    if fake_ros2 is not None:
        (bin_dir / 'ros2').write_text(f'#!/bin/sh\n{fake_ros2}\n')
        (bin_dir / 'ros2').chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}:/usr/bin:/bin')
    keystore = tmp_path / 'keystore'
    result = subprocess.run(['bash', str(REPO / 'tools' / 'sros2_keystore.sh'), str(keystore),
                             str(tmp_path / 'policy.xml')], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "'ros2 security'" in result.stderr or "'ros2' is not on PATH" in result.stderr
    assert 'cannot be enforced' in result.stderr and 'PyPI' in result.stderr
    assert not keystore.exists()


def test_the_policy_tool_runs_the_whole_stack_and_gives_the_relay_its_own_enclave(tmp_path):
    """`tools/sros2_policy.py` as an installer runs it: every process of the launch files gets its enclave, the
    scanner_trigger relay's too (it needs a controller's trigger port: the tool offers the simulated one's)."""
    from igt_robot import testing
    env = testing.isolated_ros_env(tmp_path / 'ros_log')
    out = tmp_path / 'policy.xml'
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'sros2_policy.py'), '--out', str(out),
                             '--settle', '1.0'], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    policy = sros2_policy.read_policy(out.read_text())
    assert set(sros2_policy.PROCESSES) <= set(policy)
    relay = policy['scanner_trigger']['scanner_trigger']
    assert topics.SCANNER_STATE in relay.subscribe
    assert not {topics.SCANNER_STATE, topics.SAFETY_MOTION_PERMITTED} & relay.publish
    assert set(policy['motion_controller']) == {'hardware_node', 'motion_controller'}
    # Both scanner subscriptions are on helper nodes served by threads of their own: still in the profiles.
    assert topics.SCANNER_STATE in policy['motion_controller']['hardware_node'].subscribe
