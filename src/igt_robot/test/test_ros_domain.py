"""A run's ROS domain is one nothing else on the machine uses, and its claim keeps other runs off it."""
import os
import random
import socket
import subprocess
import sys

import pytest

from igt_robot import ros_domain, testing

UDP4_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  12: 00000000:549C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000 0
  13: 0100007F:1CE8 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0000 0
"""
UDP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   1: 00000000000000000000000000000000:1B58 00000000000000000000000000000000:0000 07 00000000:00000000
"""


def test_the_local_ports_of_both_tables_are_read():
    assert ros_domain.parse_proc_net_udp(UDP4_TABLE) == {0x549C, 0x1CE8}
    assert ros_domain.parse_proc_net_udp(UDP6_TABLE) == {7000}
    assert ros_domain.parse_proc_net_udp('header only\n') == set()


def test_a_port_belongs_to_the_domain_whose_fast_dds_block_holds_it():
    assert ros_domain.domain_of_port(7000) is None           # below domain 0's block (not a domain port)
    assert ros_domain.domain_of_port(7400) == 0
    assert ros_domain.domain_of_port(7649) == 0
    assert ros_domain.domain_of_port(7650) == 1
    assert ros_domain.domain_of_port(0x549C) == 57           # 21660: domain 57, participant 0's unicast port
    assert ros_domain.domain_of_port(7400 + 250 * 232 + 249) == 232
    assert ros_domain.domain_of_port(7400 + 250 * 233) is None
    assert ros_domain.domains_in_use([7000, 7411, 21660, 21661]) == {0, 57}


def test_the_claim_port_is_inside_the_block_and_never_one_fast_dds_binds():
    for domain in (0, 10, 99, 232):
        offset = ros_domain.claim_port(domain) - (7400 + 250 * domain)
        assert ros_domain.domain_of_port(ros_domain.claim_port(domain)) == domain
        assert offset not in (0, 1) and offset < 10     # multicast: 0, 1; unicast: 10 + 2 * participant id (+1)
    with pytest.raises(ValueError, match='outside'):
        ros_domain.claim_port(233)


def test_a_claimed_domain_is_in_use_and_cannot_be_claimed_twice():
    domain, held = ros_domain.claim_free_domain()
    try:
        assert domain in ros_domain.PROJECT_DOMAINS
        assert domain in ros_domain.domains_in_use()
        assert ros_domain.claim(domain) is None
        other, second = ros_domain.claim_free_domain(preferred=domain)
        second.close()
        assert other != domain
    finally:
        held.close()
    again = ros_domain.claim(domain)      # released with its socket
    assert again is not None
    again.close()


def test_the_preferred_domain_is_kept_when_free_and_left_when_another_process_binds_in_its_block():
    preferred = ros_domain.free_domain_id()
    domain, held = ros_domain.claim_free_domain(preferred=preferred)
    held.close()
    assert domain == preferred
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(('127.0.0.1', 7400 + 250 * preferred + 11))      # a participant's user unicast port
    try:
        domain, held = ros_domain.claim_free_domain(preferred=preferred)
        held.close()
        assert domain != preferred
    finally:
        squatter.close()


def test_no_free_domain_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ros_domain, 'domains_in_use', lambda ports=None: set(range(0, 233)))
    with pytest.raises(RuntimeError, match='in use on this machine'):
        ros_domain.free_domain_id(rng=random.Random(1))


def test_a_running_ros_participant_marks_its_domain_as_in_use(ros_env):
    domain = testing.pick_domain_id()
    for claim in testing._DOMAIN_CLAIMS[-1:]:
        claim.close()      # only the participant below may mark the domain now
    assert domain not in ros_domain.domains_in_use()
    script = ('import sys, rclpy; rclpy.init(); node = rclpy.create_node("neighbour"); '
              'print("up", flush=True); sys.stdin.read(); node.destroy_node(); rclpy.shutdown()')
    neighbour = subprocess.Popen([sys.executable, '-c', script], env=dict(ros_env, ROS_DOMAIN_ID=str(domain)),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert neighbour.stdout.readline().strip() == 'up'
        assert domain in ros_domain.domains_in_use()
        assert ros_domain.claim_free_domain(preferred=domain)[0] != domain
    finally:
        neighbour.stdin.close()
        neighbour.wait(30)


def test_the_command_prints_a_free_project_domain():
    out = subprocess.run([sys.executable, '-m', 'igt_robot.ros_domain'], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) in ros_domain.PROJECT_DOMAINS


def test_a_process_of_the_run_is_found_by_its_marker_even_when_another_parent_has_it(tmp_path):
    marker = f'test-{os.getpid()}'
    env = dict(os.environ, **{testing.RUN_MARKER_ENV: marker})
    # sh starts sleep in the background and exits: the sleeper is no longer this process's child.
    subprocess.run(['sh', '-c', f'sleep 60 & echo $! > {tmp_path / "pid"}'], env=env, check=True)
    orphan = int((tmp_path / 'pid').read_text())
    try:
        # Right after the fork the child may still be replacing itself with sleep (its environ unreadable then).
        found = testing.wait_for(lambda: (f := testing.processes_of_run(marker)).get(orphan, '').startswith('sleep')
                                 and f, 10, 'the sleeper to be found by its marker')
        assert 'sleep 60' in found[orphan]
        assert testing.processes_of_run('another-run') == {}
    finally:
        os.kill(orphan, 9)
    testing.wait_for(lambda: orphan not in testing.processes_of_run(marker), 10, 'the sleeper to be gone')
