"""A ROS domain id that no other process on this machine uses, and a claim on it for this run.

A domain id picked from the process id (what ``make`` did before) is the same in two fresh containers
that start the same commands, and two test runs on one domain see each other's nodes: the supervisor
then latches FOREIGN_*_PUBLISHER faults and every multi-process test fails. So the id is checked.

How a domain is seen to be in use: Fast DDS (the RMW of the PyPI wheels, and the default of every ROS 2
install) binds UDP ports inside the domain's own block, ``7400 + 250 * domain`` to ``+ 249``
(multicast discovery at offset 0 and 1, each participant's unicast ports at 10 + 2 * participant id and
the one after). Any UDP socket bound in that block, in this network namespace, marks the domain as taken.
``/proc/net/udp`` lists them for every process of the namespace, whoever owns it.

A claim: offsets 2 to 9 of the block are never used by Fast DDS, so a run binds offset
:data:`CLAIM_OFFSET` for its whole lifetime. Another run checking the block then sees the domain as taken
even before the first participant of this run exists, and two runs cannot claim the same domain (the
second bind fails).

    python -m igt_robot.ros_domain      # prints a free domain id (what `make` uses)
"""
from __future__ import annotations

import contextlib
import random
import socket
import sys
from typing import Iterable, Optional, Set, Tuple

PORT_BASE = 7400        # Fast DDS / RTPS well-known port parameters (PB, DG)
DOMAIN_GAIN = 250
CLAIM_OFFSET = 5        # inside the domain's block, between the multicast (0, 1) and unicast (10+) ports
MAX_DOMAIN = 232        # the last domain whose block stays under port 65535
# The project's range: not 0 (every ROS install's default) and ports below the Linux ephemeral range.
PROJECT_DOMAINS = range(10, 100)
PROC_NET_UDP = ('/proc/net/udp', '/proc/net/udp6')


def domain_of_port(port: int) -> Optional[int]:
    """The domain whose port block holds ``port`` (None below domain 0's block or above the last one)."""
    if port < PORT_BASE:
        return None
    domain = (port - PORT_BASE) // DOMAIN_GAIN
    return domain if domain <= MAX_DOMAIN else None


def claim_port(domain: int) -> int:
    if not 0 <= domain <= MAX_DOMAIN:
        raise ValueError(f'ROS domain id {domain} is outside 0..{MAX_DOMAIN}')
    return PORT_BASE + DOMAIN_GAIN * domain + CLAIM_OFFSET


def parse_proc_net_udp(text: str) -> Set[int]:
    """Local ports of the sockets listed in one /proc/net/udp or udp6 table."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 1 and ':' in fields[1]:
            with contextlib.suppress(ValueError):
                ports.add(int(fields[1].rsplit(':', 1)[1], 16))
    return ports


def bound_udp_ports(tables: Iterable[str] = PROC_NET_UDP) -> Set[int]:
    ports = set()
    for table in tables:
        with contextlib.suppress(OSError):
            with open(table) as f:
                ports |= parse_proc_net_udp(f.read())
    return ports


def domains_in_use(ports: Optional[Iterable[int]] = None) -> Set[int]:
    """Domains with at least one UDP socket bound in their port block (this network namespace)."""
    ports = bound_udp_ports() if ports is None else ports
    return {d for d in map(domain_of_port, ports) if d is not None}


def claim(domain: int) -> Optional[socket.socket]:
    """Bind the domain's claim port on loopback; None if another run holds it. Keep the socket open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(('127.0.0.1', claim_port(domain)))
    except OSError:
        sock.close()
        return None
    return sock


def free_domain_id(candidates: Iterable[int] = PROJECT_DOMAINS, exclude: Iterable[int] = (),
                   rng: Optional[random.Random] = None) -> int:
    """A random domain among ``candidates`` that nothing on this machine uses; RuntimeError if none is."""
    taken = domains_in_use() | set(exclude)
    free = [d for d in candidates if d not in taken]
    if not free:
        raise RuntimeError(f'every ROS domain id in {candidates} is in use on this machine')
    return (rng or random.SystemRandom()).choice(free)


def claim_free_domain(preferred: Optional[int] = None, exclude: Iterable[int] = (),
                      attempts: int = 20) -> Tuple[int, socket.socket]:
    """Claim ``preferred`` if nothing else uses it, else a random free project domain.

    Returns (domain, claim socket); the claim lasts while the socket is open."""
    exclude = set(exclude)
    if preferred is not None and preferred not in exclude and preferred not in domains_in_use():
        sock = claim(preferred)
        if sock is not None:
            return preferred, sock
    for _ in range(attempts):
        domain = free_domain_id(exclude=exclude)
        sock = claim(domain)
        if sock is not None:
            return domain, sock
        exclude.add(domain)     # claimed by another run between the check and the bind
    raise RuntimeError(f'no free ROS domain id could be claimed after {attempts} attempts')


def main(argv=None) -> int:
    try:
        print(free_domain_id())
    except RuntimeError as exc:
        print(f'igt_robot.ros_domain: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
