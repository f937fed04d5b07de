"""The motion interlock: one decision, one staleness rule, used by every node that can stop motion.

Inputs (each call carries the caller's steady-clock time ``now``; nothing here reads a clock):

* scanner readings, tracked **per publisher** (an opaque publisher id such as the DDS GID, and the
  node that owns it): phase, heartbeat counter, optional stamp age;
* motion permission (only the configured supervisor's counts);
* the supervisor's liveliness;
* the drive's state (latched faults, e-stop, optionally its own inhibit).

Output: :meth:`Interlock.decide` -> ``Decision(inhibit, reason)``. Motion is allowed only when every
input positively says so.

Authority (docs/safety.md, "Who may say what"):

* An imaging phase (PREPARING, ACQUIRING, UNKNOWN) from ANY publisher inhibits.
* Only the configured scanner source may say IDLE. Any other publisher on the scanner topic is a
  *foreign publisher*: it inhibits while it is present and is returned as a :class:`Finding` naming its
  node (the node reports it to the supervisor, which latches it until the operator acknowledges).
* Permission from anyone but the configured supervisor is ignored and returned as a Finding.

Staleness (the one rule): the configured source's phase is believed until ``scanner_timeout`` after the
last message whose heartbeat counter advanced and whose stamp was not already older than
``scanner_timeout``. A node checks at least every ``check_period``, so silence is seen at most
``scanner_timeout + check_period`` after the last good message; :class:`InterlockConfig` refuses values
for which that exceeds three scanner heartbeat periods.

No rclpy here: core code, unit-tested directly (test/test_interlock.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Hashable, Iterable, List, NamedTuple, Optional

from igt_robot.scanner.phases import ScannerPhase, parse_phase

SILENCE_PERIODS = 3          # silence is detected within this many scanner heartbeat periods, by design
SUPERVISOR_SILENCE = 1.0     # s; the supervisor republishes at 10 Hz: a publisher of its name silent this long
#                              is replaced by a new one of that name (a restart), never while it speaks

FOREIGN_SCANNER = 'FOREIGN_SCANNER_PUBLISHER'
FOREIGN_PERMISSION = 'FOREIGN_PERMISSION_PUBLISHER'


class InterlockConfigError(ValueError):
    """An interlock configuration that would break the detection bound; the message says which."""


def node_key(name: str, namespace: str = '/') -> str:
    """A fully qualified node name ('/ns/name'); accepts 'name', '/name' or a name plus its namespace."""
    name = str(name).strip()
    if name.startswith('/'):
        return name
    ns = str(namespace or '/').strip().rstrip('/')
    return f'{ns}/{name}'


@dataclasses.dataclass(frozen=True)
class InterlockConfig:
    """Who may say what, and how old a scanner reading may be.

    ``scanner_period``: the scanner source's publication (heartbeat) period, s.
    ``scanner_timeout``: a reading is believed this long after it arrived, s (at least one period, so a
    punctual publisher never goes stale; the margin above one period absorbs the worst measured
    delivery delay, docs/safety.md). ``check_period``: the staleness check period of the node, s.
    """

    scanner_source: str = '/scanner_interface'
    supervisor: str = '/safety_supervisor'
    scanner_period: float = 0.1
    scanner_timeout: float = 0.28
    check_period: float = 0.01

    def __post_init__(self):
        for name in ('scanner_period', 'scanner_timeout', 'check_period'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
                raise InterlockConfigError(f'{name} must be a finite value > 0 s, got {value!r}')
        if self.scanner_timeout < self.scanner_period:
            raise InterlockConfigError(
                f'scanner_timeout {self.scanner_timeout:g} s is shorter than the scanner period '
                f'{self.scanner_period:g} s: a punctual scanner would go stale between messages')
        bound = SILENCE_PERIODS * self.scanner_period
        if self.scanner_timeout + self.check_period > bound + 1e-9:
            raise InterlockConfigError(
                f'scanner_timeout {self.scanner_timeout:g} s + check period {self.check_period:g} s exceeds '
                f'{SILENCE_PERIODS} scanner periods ({bound:g} s): silence would be detected too late')
        object.__setattr__(self, 'scanner_source', node_key(self.scanner_source))
        object.__setattr__(self, 'supervisor', node_key(self.supervisor))

    @property
    def silence_detection_bound(self) -> float:
        """Longest time from the last good scanner message to the inhibit, by design (s)."""
        return self.scanner_timeout + self.check_period


class Decision(NamedTuple):
    inhibit: bool
    reason: str


class Finding(NamedTuple):
    """Something the node must report: ``active`` True while the cause is present (a safety fault with
    ``cause_active``), False when it has gone."""

    code: str
    detail: str
    active: bool
    node: str


@dataclasses.dataclass
class _Source:
    node: str
    phase: ScannerPhase = ScannerPhase.UNKNOWN
    heartbeat: Optional[int] = None
    believed_since: float = -math.inf     # arrival of the last advancing, timely message


class Interlock:
    """Stateful interlock decision (see the module docstring). Not thread-safe: callers serialise."""

    def __init__(self, config: InterlockConfig):
        self.config = config
        self._active = True
        self._sources: Dict[Hashable, _Source] = {}
        self._foreign: Dict[Hashable, tuple] = {}          # publisher -> (node, finding code)
        self._foreign_imaging: Dict[Hashable, ScannerPhase] = {}
        self._unidentified_imaging: Optional[tuple] = None   # (phase, arrival) from a publisher not yet named
        self._permission: Optional[bool] = None
        self._permission_publisher: Optional[Hashable] = None
        self._permission_time = -math.inf
        self._supervisor_alive = True
        self._drive_inhibited: Optional[bool] = None
        self._drive_faults: tuple = ()
        self._drive_estopped = False
        self.ignored_permissions = 0
        self.ignored_idle = 0

    # ------------------------------------------------------------------ inputs
    def set_active(self, active: bool) -> None:
        """False: the owner cannot move anything (e.g. hardware node not active): always inhibit."""
        self._active = bool(active)

    def on_scanner(self, publisher: Hashable, node: str, phase, heartbeat: int, now: float,
                   stamp_age: Optional[float] = None) -> List[Finding]:
        """A scanner-state message from ``publisher`` (owned by ``node``) arrived at ``now``.

        ``stamp_age``: now minus the message's stamp when the clocks are comparable (None: not checked).
        """
        phase = parse_phase(phase)
        if not node:
            # Identity not (yet) on the graph: believe imaging, never IDLE, accuse nobody.
            if phase is not ScannerPhase.IDLE:
                self._unidentified_imaging = (phase, float(now))
            return []
        node = node_key(node)
        if node != self.config.scanner_source or self._second_configured(publisher, node, now):
            return self._foreign_scanner(publisher, node, phase)
        source = self._sources.setdefault(publisher, _Source(node))
        advanced = source.heartbeat is None or int(heartbeat) != source.heartbeat
        late = stamp_age is not None and stamp_age > self.config.scanner_timeout
        source.heartbeat = int(heartbeat)
        if phase is not ScannerPhase.IDLE:
            source.phase = phase                 # imaging is believed however it arrives
            source.believed_since = float(now)
        elif advanced and not late:
            source.phase = phase
            source.believed_since = float(now)
        return []

    def on_permission(self, publisher: Hashable, node: str, permitted: bool, now: float) -> List[Finding]:
        """A motion-permission message. Only the configured supervisor's counts; a False from anyone
        still stops motion (withdrawing permission is always allowed)."""
        if not node:                       # identity not yet on the graph: a False counts, a True does not
            self.ignored_permissions += int(bool(permitted))
            if not permitted:
                self._permission = False
            return []
        node = node_key(node)
        if node == self.config.supervisor and self._permission_publisher not in (None, publisher) \
                and float(now) - self._permission_time > SUPERVISOR_SILENCE:
            self._permission_publisher = None  # the supervisor restarted (its old publisher went silent)
        if node != self.config.supervisor or (self._permission_publisher not in (None, publisher)):
            self.ignored_permissions += 1
            findings = []
            if publisher not in self._foreign:
                self._foreign[publisher] = (node, FOREIGN_PERMISSION)
                findings.append(Finding(FOREIGN_PERMISSION, f"node '{node or 'unknown'}' publishes motion "
                                        f'permission; only {self.config.supervisor} may: ignored', True, node))
            if not permitted:
                self._permission = False
            return findings
        self._permission_publisher = publisher
        self._permission_time = float(now)
        self._permission = bool(permitted)
        self._supervisor_alive = True
        return []

    def on_supervisor_liveliness(self, alive: bool) -> None:
        self._supervisor_alive = bool(alive)

    def on_drive(self, faults: Iterable[str] = (), estopped: bool = False,
                 inhibited: Optional[bool] = None) -> None:
        """The drive's latched faults and e-stop; ``inhibited`` its own inhibit (None: not an input here,
        e.g. for the node that commands it)."""
        self._drive_faults = tuple(sorted(str(f) for f in faults))
        self._drive_estopped = bool(estopped)
        self._drive_inhibited = None if inhibited is None else bool(inhibited)

    def on_graph(self, scanner_publishers: Dict[Hashable, str],
                 permission_publishers: Optional[Dict[Hashable, str]] = None) -> List[Finding]:
        """The publishers the graph lists now (publisher -> node). New foreign ones are findings; foreign
        ones that left are findings with ``active=False`` (their cause has gone; the latch stays with
        the supervisor)."""
        findings = []
        permission_publishers = permission_publishers if permission_publishers is not None else {}
        # A second publisher under a configured name is judged by what it sends (on_scanner / on_permission):
        # a killed source lingers on the graph for a lease beside its restarted self.
        for publisher, node in scanner_publishers.items():
            if not node:
                continue                       # not named by the graph yet: judged once it is
            node = node_key(node)
            if node != self.config.scanner_source and publisher not in self._foreign:
                findings += self._foreign_scanner(publisher, node, None)
        for publisher, node in permission_publishers.items():
            if not node:
                continue
            node = node_key(node)
            if node != self.config.supervisor and publisher not in self._foreign:
                self._foreign[publisher] = (node, FOREIGN_PERMISSION)
                findings.append(Finding(FOREIGN_PERMISSION, f"node '{node}' publishes motion permission; only "
                                        f'{self.config.supervisor} may: ignored', True, node))
        present = set(scanner_publishers) | set(permission_publishers)
        for publisher in [p for p in self._foreign if p not in present]:
            node, code = self._foreign.pop(publisher)
            self._foreign_imaging.pop(publisher, None)
            findings.append(Finding(code, f"foreign publisher of node '{node}' left the graph", False, node))
        if self._permission_publisher is not None and permission_publishers \
                and self._permission_publisher not in permission_publishers:
            self._permission_publisher = None  # the supervisor restarted: its new publisher is accepted
        return findings

    # ------------------------------------------------------------------ output
    def decide(self, now: float) -> Decision:
        """(inhibit, reason) at ``now``; the reason names the first thing that stops motion."""
        if not self._active:
            return Decision(True, 'not active')
        foreign = self._foreign_imaging_decision()
        if foreign is not None:
            return foreign
        if self._foreign:
            nodes = ', '.join(sorted({node or 'unknown' for node, _ in self._foreign.values()}))
            return Decision(True, f'foreign publisher on a safety topic: {nodes}')
        scanner = self._scanner_decision(now)
        if scanner.inhibit:
            return scanner
        if self._drive_estopped:
            return Decision(True, 'e-stop latched in the drive')
        if self._drive_faults:
            return Decision(True, f"drive faults latched: {', '.join(self._drive_faults)}")
        if self._permission is None:
            return Decision(True, f'no motion permission received from {self.config.supervisor}')
        if not self._supervisor_alive:
            return Decision(True, 'safety supervisor lost (liveliness)')
        if not self._permission:
            return Decision(True, 'safety supervisor withholds motion permission')
        if self._drive_inhibited:
            return Decision(True, "the drive's motion-inhibit is still asserted")
        return Decision(False, 'motion permitted and scanner idle')

    def trigger_level(self, now: float) -> Decision:
        """The scanner trigger as the scanner inputs alone give it (the trigger port's relay): (imaging,
        reason). Imaging from any publisher, one not yet named, a stale or absent configured source: imaging.
        A foreign publisher that says nothing, permission, the supervisor and the drive are not inputs of the
        trigger (the hardware node's :meth:`decide` weighs them)."""
        foreign = self._foreign_imaging_decision()
        if foreign is not None:
            return foreign
        scanner = self._scanner_decision(now)
        return scanner if scanner.inhibit else Decision(False, 'scanner idle')

    def _foreign_imaging_decision(self) -> Optional[Decision]:
        """Imaging said by a foreign publisher (None: none says it)."""
        for publisher, phase in self._foreign_imaging.items():
            return Decision(True, f"scanner {phase.value} (from foreign node '{self._foreign[publisher][0]}')")
        return None

    def _scanner_decision(self, now: float) -> Decision:
        """The configured source's part of the decision (and imaging from a publisher not yet named)."""
        if self._unidentified_imaging is not None:
            phase, since = self._unidentified_imaging
            if float(now) - since <= self.config.scanner_timeout:
                return Decision(True, f'scanner {phase.value} (from a publisher not yet on the graph)')
        sources = list(self._sources.values())
        if not sources:
            return Decision(True, f'no scanner state received from {self.config.scanner_source}')
        for source in sources:
            if source.phase is not ScannerPhase.IDLE:
                return Decision(True, f'scanner {source.phase.value}')
        for source in sources:
            age = float(now) - source.believed_since
            if age > self.config.scanner_timeout:
                return Decision(True, f'scanner state stale ({age:.3f} s since the last fresh IDLE, '
                                      f'limit {self.config.scanner_timeout:.3f} s)')
        return Decision(False, '')

    @property
    def foreign_publishers(self) -> Dict[Hashable, str]:
        """Foreign publisher -> its node name."""
        return {p: node for p, (node, _) in self._foreign.items()}

    def scanner_phase(self, now: float) -> ScannerPhase:
        """The phase motion must respect now (UNKNOWN when stale, absent or contested)."""
        if self._foreign_imaging:
            return next(iter(self._foreign_imaging.values()))
        sources = list(self._sources.values())
        if not sources:
            return ScannerPhase.UNKNOWN
        for source in sources:
            if source.phase is not ScannerPhase.IDLE:
                return source.phase
        if any(float(now) - s.believed_since > self.config.scanner_timeout for s in sources):
            return ScannerPhase.UNKNOWN
        return ScannerPhase.IDLE

    # ------------------------------------------------------------------ helpers
    def _second_configured(self, publisher: Hashable, node: str, now: float) -> bool:
        """A second publisher under the configured source's name while the first still speaks (a spoofer
        reusing the name). One that went silent is replaced (the source restarted under a new id)."""
        if publisher in self._sources or publisher in self._foreign:
            return publisher in self._foreign
        alive = [p for p, s in self._sources.items() if float(now) - s.believed_since <= self.config.scanner_timeout]
        if alive:
            return True
        self._sources.clear()
        return False

    def _foreign_scanner(self, publisher: Hashable, node: str, phase: Optional[ScannerPhase]) -> List[Finding]:
        findings = []
        if publisher not in self._foreign:
            self._foreign[publisher] = (node, FOREIGN_SCANNER)
            findings.append(Finding(FOREIGN_SCANNER, f"second publisher on the scanner state: node "
                                    f"'{node or 'unknown'}' (only {self.config.scanner_source} may say IDLE)",
                                    True, node))
        if phase is not None:
            if phase is ScannerPhase.IDLE:
                self.ignored_idle += 1
                self._foreign_imaging.pop(publisher, None)
            else:
                self._foreign_imaging[publisher] = phase
        return findings
