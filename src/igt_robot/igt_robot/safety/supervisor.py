"""The safety supervisor: one deterministic state machine that decides whether
the robot may move, and says why not.

Pure logic: no clocks, threads or ROS. Every input carries ``now``, the host's
monotonic time in seconds, so behaviour is exactly reproducible in tests and a
ROS node only has to forward inputs and publish outputs. The object is not
thread-safe; call it from one thread (or under one lock).

States (docs/safety.md has the diagram and table), in priority order:

* ``ESTOP``     e-stop pressed, or released but not yet ``reset()``.
* ``FAULT``     at least one latched fault; ``acknowledge()``/``reset()`` clears
                faults whose cause has gone.
* ``INIT``      some required input has never been seen.
* ``SCAN_HOLD`` the scanner is PREPARING/ACQUIRING, or its state is UNKNOWN or
                stale. No acknowledge needed.
* ``HOLD``      everything is fine but the operator has not resumed since the
                last stop (start-up, fault, e-stop, scan, operator hold).
* ``READY``     motion permitted.

Motion is never resumed implicitly. The single exception is the configured
policy ``auto_resume_after_scan``: a hold caused *only* by a scan ends by itself
when the scanner returns to IDLE.

Silence (a heartbeat or the scanner state not arriving for longer than its timeout) is decided by
``tick`` only, and only when two consecutive ticks both see it with nothing arriving in between: the
host's executor runs a due timer before the messages that queued during a stall of the process, so
the first tick after a stall would otherwise judge messages that are already there. Detection bound:
timeout + two tick periods.

Units/frames: joint positions in the robot's joint order (m / rad); the needle
tip workspace box is in ``base_link`` metres.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..scanner.phases import ScannerPhase, is_imaging, parse_phase
from .faults import (CommandResult, EventKind, FaultCode, FaultInfo, SafetyEvent, SafetyState,
                     SafetyStatus, normalise_code)

_SCANNER = ('scanner',)     # the scanner state among the timed inputs (heartbeat sources are names)

NeedleTipFn = Callable[[np.ndarray], np.ndarray]


class SafetyConfigError(ValueError):
    """The safety configuration is invalid; the message names the key."""


def _finite_positive(name: str, value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise SafetyConfigError(f'{name} must be a number, got {value!r}') from exc
    if not (math.isfinite(f) and f > 0.0):
        raise SafetyConfigError(f'{name} must be finite and > 0, got {value!r}')
    return f


@dataclasses.dataclass
class SafetyConfig:
    """Supervisor configuration (SI units; times in s, lengths in m, angles in rad).

    heartbeat_timeouts     required node heartbeats: source name -> timeout (s).
    motion_heartbeats      sources (of heartbeat_timeouts) required only for motion: INIT does not wait
                           for them and their silence is no fault, but READY needs them all alive; a
                           silence in READY is a hold that needs the operator's resume (the workflow
                           process and the recorder: image work may starve them while nothing moves).
    scanner_required       INIT waits for a scanner state; silence faults.
    scanner_timeout        no live scanner message for longer -> fault SCANNER_SILENT
                           (choose ≈ 3 scanner heartbeat periods).
    scanner_max_age        a scanner state whose own stamp is older is treated as
                           UNKNOWN (stale); None = scanner_timeout.
    auto_resume_after_scan see module docstring; default False (explicit resume).
    require_estop_input    INIT waits for the first e-stop state report.
    require_joint_state    INIT waits for the first check_limits().
    joint_names/lower/upper joint position limits (robot joint order).
    joint_limit_tolerance  allowed excursion beyond a limit (scalar or per joint),
                           absorbs encoder quantisation and servo overshoot.
    joint_units            unit label per joint for messages ('m', 'rad').
    workspace_lower/upper  axis-aligned box for the needle tip in base_link (m).
    max_insertion_depth    insertion limit (m), None = none beyond the joint limit.
    insertion_joint        name of the insertion joint.
    """

    heartbeat_timeouts: Mapping[str, float] = dataclasses.field(default_factory=dict)
    motion_heartbeats: Tuple[str, ...] = ()
    scanner_required: bool = True
    scanner_timeout: float = 1.5
    scanner_max_age: Optional[float] = None
    auto_resume_after_scan: bool = False
    require_estop_input: bool = True
    require_joint_state: bool = True
    joint_names: Tuple[str, ...] = ()
    joint_lower: Optional[Sequence[float]] = None
    joint_upper: Optional[Sequence[float]] = None
    joint_limit_tolerance: object = 1e-3
    joint_units: Tuple[str, ...] = ()
    workspace_lower: Optional[Sequence[float]] = None
    workspace_upper: Optional[Sequence[float]] = None
    max_insertion_depth: Optional[float] = None
    insertion_joint: str = 'needle_insertion'
    history_length: int = 1000

    def __post_init__(self):
        self.heartbeat_timeouts = {str(k): _finite_positive(f'heartbeat_timeouts[{k}]', v)
                                   for k, v in dict(self.heartbeat_timeouts).items()}
        self.motion_heartbeats = tuple(str(s) for s in self.motion_heartbeats)
        unknown = [s for s in self.motion_heartbeats if s not in self.heartbeat_timeouts]
        if unknown:
            raise SafetyConfigError(f'motion_heartbeats {unknown} need a timeout in heartbeat_timeouts')
        self.scanner_timeout = _finite_positive('scanner_timeout', self.scanner_timeout)
        if self.scanner_max_age is not None:
            self.scanner_max_age = _finite_positive('scanner_max_age', self.scanner_max_age)
        self.joint_names = tuple(self.joint_names)
        n = len(self.joint_names)
        if (self.joint_lower is None) != (self.joint_upper is None):
            raise SafetyConfigError('joint_lower and joint_upper must be given together')
        if self.joint_lower is not None:
            lo = np.asarray(self.joint_lower, dtype=float).reshape(-1)
            hi = np.asarray(self.joint_upper, dtype=float).reshape(-1)
            if n == 0:
                raise SafetyConfigError('joint limits need joint_names')
            if lo.size != n or hi.size != n:
                raise SafetyConfigError(f'joint limits need {n} values (one per joint name)')
            if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo < hi).all()):
                raise SafetyConfigError('joint limits must be finite with lower < upper')
            self.joint_lower, self.joint_upper = lo, hi
        tol = np.broadcast_to(np.asarray(self.joint_limit_tolerance, dtype=float), (n,)).copy() \
            if n else np.asarray(self.joint_limit_tolerance, dtype=float)
        if not (np.isfinite(tol).all() and (tol >= 0.0).all()):
            raise SafetyConfigError('joint_limit_tolerance must be finite and >= 0')
        self.joint_limit_tolerance = tol
        self.joint_units = tuple(self.joint_units) or ('',) * n
        if len(self.joint_units) != n:
            raise SafetyConfigError(f'joint_units needs {n} entries')
        if (self.workspace_lower is None) != (self.workspace_upper is None):
            raise SafetyConfigError('workspace_lower and workspace_upper must be given together')
        if self.workspace_lower is not None:
            lo = np.asarray(self.workspace_lower, dtype=float).reshape(-1)
            hi = np.asarray(self.workspace_upper, dtype=float).reshape(-1)
            if lo.size != 3 or hi.size != 3 or not (np.isfinite(lo).all() and np.isfinite(hi).all()
                                                    and (lo < hi).all()):
                raise SafetyConfigError('workspace box needs finite 3-vectors with lower < upper (m)')
            self.workspace_lower, self.workspace_upper = lo, hi
        if self.max_insertion_depth is not None:
            self.max_insertion_depth = float(self.max_insertion_depth)
            if not (math.isfinite(self.max_insertion_depth) and self.max_insertion_depth >= 0.0):
                raise SafetyConfigError('max_insertion_depth must be finite and >= 0 m')
            if self.insertion_joint not in self.joint_names:
                raise SafetyConfigError(
                    f'max_insertion_depth needs insertion_joint {self.insertion_joint!r} in joint_names')

    @classmethod
    def from_dict(cls, d: Mapping) -> 'SafetyConfig':
        """Build from a parameter mapping (YAML/ROS params); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SafetyConfigError(f'unknown safety config keys {sorted(unknown)}')
        return cls(**dict(d))


class SafetySupervisor:
    """Deterministic safety state machine (see module docstring).

    Inputs return the list of :class:`SafetyEvent` they caused (publish each);
    operator commands return a :class:`CommandResult`. :meth:`status` gives the
    current :class:`SafetyStatus`.

    ``needle_tip_fn(q) -> (3,)`` maps joint positions to the needle tip in
    base_link (m); pass the forward kinematics. It is required when a workspace
    box is configured.
    """

    def __init__(self, config: SafetyConfig, needle_tip_fn: Optional[NeedleTipFn] = None,
                 now: float = 0.0):
        if config.workspace_lower is not None and needle_tip_fn is None:
            raise SafetyConfigError('a workspace box is configured but no needle_tip_fn was given')
        self.config = config
        self._tip_fn = needle_tip_fn
        self._now = float(now)
        self._state = SafetyState.INIT
        self._faults: Dict[Tuple[str, str], FaultInfo] = {}
        self._estop_active: Optional[bool] = None
        self._estop_latched = False
        self._initialised = False
        self._awaiting_resume = True
        self._hold_reason = 'start-up'
        self._hb_last: Dict[str, Optional[float]] = {s: None for s in config.heartbeat_timeouts}
        self._scanner_phase: Optional[ScannerPhase] = None
        self._scanner_protocol = ''
        self._scanner_stamp: Optional[float] = None
        self._scanner_late: Optional[float] = None   # age of the last message's stamp at arrival, if too old
        self._scanner_alive: Optional[float] = None
        self._scanner_heartbeat = None
        self._silence_suspected: set = set()    # inputs seen silent at the last tick (SCANNER or a source)
        self._silent: set = set()               # inputs silent at two consecutive ticks: acted upon
        self._joint_seen = False
        self._max_insertion = config.max_insertion_depth
        self._insertion_index = (config.joint_names.index(config.insertion_joint)
                                 if config.insertion_joint in config.joint_names else None)
        self._history: Deque[SafetyEvent] = collections.deque(maxlen=max(1, int(config.history_length)))
        self._pending: List[SafetyEvent] = []

    # ------------------------------------------------------------------ inputs
    def update_scanner(self, phase, stamp: Optional[float], heartbeat, now: float,
                       protocol: str = '') -> List[SafetyEvent]:
        """A scanner-state message arrived at ``now``.

        ``phase``: ScannerPhase or its name; anything but IDLE inhibits motion.
        ``stamp``: when the scanner produced the state, same clock as ``now``
        (None if unavailable); older than ``scanner_max_age`` -> treated as UNKNOWN.
        ``heartbeat``: the message's sequence counter; the message proves the
        link alive only if it differs from the previous one (a stuck publisher
        repeating itself is not alive). None: every message counts.
        ``protocol``: scan protocol name, shown in the reason text.
        """
        now = self._clock(now)
        self._scanner_phase = parse_phase(phase)
        self._scanner_protocol = str(protocol or '')
        self._scanner_stamp = None if stamp is None else float(stamp)
        # Judged at arrival: between messages, silence is the rule (tick).
        age = None if stamp is None else abs(now - float(stamp))
        self._scanner_late = age if age is not None and age > self._scanner_max_age() else None
        if heartbeat is None or heartbeat != self._scanner_heartbeat or self._scanner_alive is None:
            self._scanner_alive = now
            self._silence_suspected.discard(_SCANNER)
            self._silent.discard(_SCANNER)
            self._set_condition(FaultCode.SCANNER_SILENT.value, '', False)
        self._scanner_heartbeat = heartbeat
        return self._finish(now)

    def heartbeat(self, source: str, now: float) -> List[SafetyEvent]:
        """A heartbeat from a required source (configured in heartbeat_timeouts)."""
        now = self._clock(now)
        if source not in self._hb_last:
            raise KeyError(f'heartbeat from unconfigured source {source!r}; '
                           f'configured: {sorted(self._hb_last)}')
        self._hb_last[source] = now
        self._silence_suspected.discard(source)
        self._silent.discard(source)
        self._set_condition(FaultCode.HEARTBEAT_LOST.value, source, False)
        return self._finish(now)

    def report_fault(self, code, detail: str, now: float, source: str = '',
                     active: bool = False) -> List[SafetyEvent]:
        """Latch a fault reported from outside (hardware, tracking monitor, nodes).

        ``active=False``: a one-off event (e.g. tracking error): its cause counts
        as gone, so it can be acknowledged at once. ``active=True``: a condition
        that persists until :meth:`clear_fault_condition` (e.g. a controller fault
        still latched in the drive); acknowledge is refused until then.
        """
        now = self._clock(now)
        self._raise(normalise_code(code), str(detail), now, source, active)
        return self._finish(now)

    def clear_fault_condition(self, code, now: float, source: str = '') -> List[SafetyEvent]:
        """The cause of a fault reported with ``active=True`` has gone (still latched)."""
        now = self._clock(now)
        self._set_condition(normalise_code(code), source, False)
        return self._finish(now)

    def sync_hardware_faults(self, codes: Iterable[str], now: float) -> List[SafetyEvent]:
        """Mirror the controller's latched fault list (``HardwareState.faults``).

        New codes are raised as active conditions (source 'hardware'); codes that
        disappeared have their condition cleared (the latch stays until acknowledge).
        """
        now = self._clock(now)
        current = {normalise_code(c) for c in codes}
        for code in current:
            self._raise(code, f'motor controller reports {code}', now, 'hardware', True)
        for (code, source), fault in list(self._faults.items()):
            if source == 'hardware' and code not in current:
                self._set_condition(code, source, False)
        return self._finish(now)

    def set_estop(self, active: bool, now: float) -> List[SafetyEvent]:
        """E-stop circuit state. Pressing latches ESTOP until released AND reset()."""
        now = self._clock(now)
        self._estop_active = bool(active)
        if active:
            self._estop_latched = True
            self._require_resume('emergency stop')
        return self._finish(now)

    def check_limits(self, joint_positions, now: float) -> List[SafetyEvent]:
        """Check measured joint positions (robot joint order, m / rad) against
        joint limits (+ tolerance), the needle-tip workspace box (base_link) and
        the insertion-depth limit. Each violated check is a latched fault whose
        cause clears when the positions are back inside."""
        now = self._clock(now)
        cfg = self.config
        q = np.asarray(joint_positions, dtype=float).reshape(-1)
        n = len(cfg.joint_names)
        if n and q.size != n:
            raise ValueError(f'check_limits got {q.size} joint positions, expected {n} {cfg.joint_names}')
        self._joint_seen = True
        if not np.isfinite(q).all():
            bad = [cfg.joint_names[i] if n else str(i) for i in np.flatnonzero(~np.isfinite(q))]
            self._raise(FaultCode.INVALID_JOINT_STATE.value, f'non-finite position of {", ".join(bad)}',
                        now, '', True)
            return self._finish(now)
        self._set_condition(FaultCode.INVALID_JOINT_STATE.value, '', False)

        if cfg.joint_lower is not None:
            tol = cfg.joint_limit_tolerance
            over = q > cfg.joint_upper + tol
            under = q < cfg.joint_lower - tol
            if over.any() or under.any():
                i = int(np.flatnonzero(over | under)[0])
                side, lim = ('upper', cfg.joint_upper[i]) if over[i] else ('lower', cfg.joint_lower[i])
                u = cfg.joint_units[i]
                self._raise(FaultCode.JOINT_LIMIT.value,
                            f'{cfg.joint_names[i]} = {q[i]:.4f} {u} beyond {side} limit {lim:.4f} {u}'
                            .replace('  ', ' '), now, '', True)
            else:
                self._set_condition(FaultCode.JOINT_LIMIT.value, '', False)

        if cfg.workspace_lower is not None:
            tip = np.asarray(self._tip_fn(q), dtype=float).reshape(-1)
            if tip.size != 3:
                raise ValueError(f'needle_tip_fn returned {tip.size} values, expected 3')
            # NaN compares False everywhere, so test "inside" and negate (fail-safe).
            outside = ~((tip >= cfg.workspace_lower) & (tip <= cfg.workspace_upper))
            if outside.any():
                axis = 'xyz'[int(np.flatnonzero(outside)[0])]
                self._raise(FaultCode.WORKSPACE_LIMIT.value,
                            f'needle tip ({tip[0]:.4f}, {tip[1]:.4f}, {tip[2]:.4f}) m in base_link '
                            f'outside the workspace box along {axis}', now, '', True)
            else:
                self._set_condition(FaultCode.WORKSPACE_LIMIT.value, '', False)

        if self._max_insertion is None:
            # No limit (any more): a condition raised under an earlier limit has no cause left.
            self._set_condition(FaultCode.INSERTION_LIMIT.value, '', False)
        elif self._insertion_index is not None:
            depth = q[self._insertion_index]
            if depth > self._max_insertion:
                self._raise(FaultCode.INSERTION_LIMIT.value,
                            f'insertion {depth:.4f} m deeper than allowed {self._max_insertion:.4f} m',
                            now, '', True)
            else:
                self._set_condition(FaultCode.INSERTION_LIMIT.value, '', False)
        return self._finish(now)

    def set_max_insertion_depth(self, depth: Optional[float], now: float) -> List[SafetyEvent]:
        """Set the procedure's insertion-depth limit (m) or None for none.

        Takes effect at the next :meth:`check_limits`.
        """
        now = self._clock(now)
        if depth is not None:
            depth = float(depth)
            if not (math.isfinite(depth) and depth >= 0.0):
                raise ValueError(f'max insertion depth must be finite and >= 0 m, got {depth!r}')
            if self._insertion_index is None:
                raise ValueError(f'insertion joint {self.config.insertion_joint!r} not in joint_names')
        self._max_insertion = depth
        return self._finish(now)

    def tick(self, now: float) -> List[SafetyEvent]:
        """Periodic timeout checks: node heartbeats, scanner silence, scanner staleness.

        An input is silent when this tick and the previous one both found it past its timeout with
        nothing arriving in between (module docstring)."""
        now = self._clock(now)
        over = {source for source, last in self._hb_last.items()
                if last is not None and now - last > self.config.heartbeat_timeouts[source]}
        if self._scanner_alive is not None and now - self._scanner_alive > self.config.scanner_timeout:
            over.add(_SCANNER)
        self._silent |= over & self._silence_suspected
        self._silence_suspected = over
        for source, last in self._hb_last.items():
            if source not in self._silent or source in self.config.motion_heartbeats:
                continue        # never seen: INIT covers it; motion-only sources: _target_state holds
            silence = now - last
            self._raise(FaultCode.HEARTBEAT_LOST.value, f'{source} silent for {silence:.2f} s',
                        now, source, True)
        if _SCANNER in self._silent:
            silence = now - self._scanner_alive
            self._raise(FaultCode.SCANNER_SILENT.value,
                        f'no scanner state for {silence:.2f} s (timeout {self.config.scanner_timeout:.2f} s)',
                        now, '', True)
        return self._finish(now)

    # -------------------------------------------------------- operator commands
    def request_hold(self, reason: str, now: float) -> CommandResult:
        """Operator (or planner) pause: motion stops until resume()."""
        now = self._clock(now)
        self._require_resume(f'operator hold: {reason}' if reason else 'operator hold')
        self._command(now, True, f'hold requested: {reason or "operator"}')
        return CommandResult(True, 'hold engaged', tuple(self._finish(now, cause='operator hold')))

    def refuse(self, now: float, command: str, why: str) -> CommandResult:
        """Record a command refused before it reached the state machine (e.g. no operator session secret):
        nothing changes, the refusal is an event like any other."""
        now = self._clock(now)
        msg = f'{command} refused: {why}'
        self._command(now, False, msg)
        return CommandResult(False, msg, tuple(self._finish(now)))

    def resume(self, now: float) -> CommandResult:
        """Explicit operator resume; only accepted in HOLD (or a no-op in READY)."""
        now = self._clock(now)
        self._update_state(now)   # bring the state up to date first
        state = self._state
        if state is SafetyState.READY:
            msg, ok = 'already READY: motion permitted', True
        elif state is SafetyState.HOLD:
            self._awaiting_resume = False
            msg, ok = 'resumed by operator', True
        else:
            msg, ok = f'resume refused in {state.value}: {self._reason(now)}', False
        self._command(now, ok, msg)
        return CommandResult(ok, msg, tuple(self._finish(now, cause='operator resume')))

    def acknowledge(self, now: float, code=None) -> CommandResult:
        """Clear latched faults (all, or only ``code``) whose cause has gone.

        Afterwards the state is HOLD (explicit resume needed) unless other faults
        remain. Does not clear an e-stop (use reset()).
        """
        now = self._clock(now)
        self._update_state(now)
        want = None if code is None else normalise_code(code)
        cleared, remaining = self._clear_faults(now, want)
        ok = bool(cleared)
        if not self._faults and not cleared and want is None:
            msg = 'nothing to acknowledge'
        elif cleared:
            msg = f'acknowledged {", ".join(cleared)}'
            if remaining:
                msg += f'; still active: {", ".join(remaining)}'
        else:
            msg = ('cannot acknowledge: cause still present: ' + ', '.join(remaining)) if remaining \
                else f'no latched fault {want}'
        self._command(now, ok, msg)
        return CommandResult(ok, msg, tuple(self._finish(now, cause=f'operator acknowledge ({msg})')))

    def reset(self, now: float) -> CommandResult:
        """Reset after an e-stop (must be released) and acknowledge cleared faults."""
        now = self._clock(now)
        self._update_state(now)
        if self._estop_active:
            msg = 'reset refused: e-stop still pressed (release it first)'
            self._command(now, False, msg)
            return CommandResult(False, msg, tuple(self._finish(now)))
        parts = []
        was_latched = self._estop_latched
        if was_latched:
            self._estop_latched = False
            parts.append('e-stop reset')
        cleared, remaining = self._clear_faults(now, None)
        if cleared:
            parts.append(f'acknowledged {", ".join(cleared)}')
        if remaining:
            parts.append(f'still active: {", ".join(remaining)}')
        ok = was_latched or bool(cleared)
        msg = '; '.join(parts) if parts else 'nothing to reset'
        self._command(now, ok, msg)
        return CommandResult(ok, msg, tuple(self._finish(now, cause=f'operator reset ({msg})')))

    # ------------------------------------------------------------------ output
    @property
    def state(self) -> SafetyState:
        return self._state

    @property
    def motion_permitted(self) -> bool:
        return self._state is SafetyState.READY

    @property
    def reason(self) -> str:
        """The operator-readable reason line for the current state."""
        return self._reason(self._now)

    def status(self, now: Optional[float] = None) -> SafetyStatus:
        """Current status. ``now`` (optional) only affects ages in the reason text."""
        t = self._now if now is None else max(float(now), self._now)
        phase = self.effective_scanner_phase(t)
        return SafetyStatus(
            stamp=t, state=self._state, motion_permitted=self._state is SafetyState.READY,
            latched=bool(self._faults) or self._estop_latched or bool(self._estop_active),
            awaiting_resume=self._awaiting_resume, reason=self._reason(t),
            faults=tuple(sorted(self._faults.values(), key=lambda f: f.since)),
            scanner_phase=phase.value, scanner_protocol=self._scanner_protocol,
            estop_active=bool(self._estop_active))

    def history(self) -> Tuple[SafetyEvent, ...]:
        """The last ``history_length`` events (diagnostics; publishing uses return values)."""
        return tuple(self._history)

    def effective_scanner_phase(self, now: float) -> ScannerPhase:
        """The scanner phase the supervisor acts on: UNKNOWN if never seen, silent or stale."""
        if self._scanner_phase is None or self._scanner_alive is None:
            return ScannerPhase.UNKNOWN
        if _SCANNER in self._silent:
            return ScannerPhase.UNKNOWN
        if self._scanner_stale(now):
            return ScannerPhase.UNKNOWN
        return self._scanner_phase

    # --------------------------------------------------------------- internals
    def _clock(self, now: float) -> float:
        now = float(now)
        if not math.isfinite(now):
            raise ValueError(f'now must be a finite monotonic time in s, got {now!r}')
        # A monotonic clock never goes back; tolerate out-of-order callers by
        # never letting the supervisor's own time decrease.
        self._now = max(self._now, now)
        return self._now

    def _scanner_max_age(self) -> float:
        return self.config.scanner_max_age if self.config.scanner_max_age is not None \
            else self.config.scanner_timeout

    def _scanner_stale(self, now: float) -> bool:
        return self._scanner_late is not None

    def _require_resume(self, why: str) -> None:
        self._awaiting_resume = True
        self._hold_reason = why

    def _raise(self, code: str, detail: str, now: float, source: str, active: bool) -> None:
        key = (code, source)
        existing = self._faults.get(key)
        if existing is None:
            fault = FaultInfo(code=code, detail=detail, since=now, source=source, condition_active=active)
            self._faults[key] = fault
            self._require_resume(f'fault {code}')
            self._emit(now, EventKind.FAULT_RAISED, self._state, self._state, fault.describe(), code)
        elif active and not existing.condition_active:
            # The cause came back before acknowledge: mark it present again.
            self._faults[key] = dataclasses.replace(existing, condition_active=True, detail=detail)

    def _set_condition(self, code: str, source: str, active: bool) -> None:
        fault = self._faults.get((code, source))
        if fault is not None and fault.condition_active != active:
            self._faults[(code, source)] = dataclasses.replace(fault, condition_active=active)

    def _clear_faults(self, now: float, want: Optional[str]):
        cleared, remaining = [], []
        for key, fault in list(self._faults.items()):
            label = fault.code + (f'({fault.source})' if fault.source else '')
            if want is not None and fault.code != want:
                remaining.append(label)
                continue
            if fault.condition_active:
                remaining.append(label)
                continue
            del self._faults[key]
            cleared.append(label)
            self._emit(now, EventKind.FAULT_CLEARED, self._state, self._state,
                       f'{label} acknowledged', fault.code)
        return cleared, remaining

    def _command(self, now: float, accepted: bool, message: str) -> None:
        self._emit(now, EventKind.COMMAND, self._state, self._state,
                   ('accepted: ' if accepted else 'refused: ') + message)

    def _emit(self, now, kind, from_state, to_state, cause, code=None) -> None:
        ev = SafetyEvent(stamp=now, kind=kind, from_state=from_state, to_state=to_state,
                         cause=cause, code=code)
        self._pending.append(ev)
        self._history.append(ev)

    def _missing_inputs(self) -> List[str]:
        missing = [f'heartbeat {s}' for s, t in self._hb_last.items()
                   if t is None and s not in self.config.motion_heartbeats]
        if self.config.scanner_required and self._scanner_phase is None:
            missing.append('scanner state')
        if self.config.require_estop_input and self._estop_active is None:
            missing.append('e-stop state')
        if self.config.require_joint_state and not self._joint_seen:
            missing.append('joint states')
        return missing

    def _target_state(self, now: float) -> SafetyState:
        if self._estop_active or self._estop_latched:
            return SafetyState.ESTOP
        if self._faults:
            return SafetyState.FAULT
        if not self._initialised:
            if self._missing_inputs():
                return SafetyState.INIT
            self._initialised = True      # first time all inputs are present: HOLD for resume
        # A scanner that is not required is still obeyed once it has spoken.
        scanner_in_use = self.config.scanner_required or self._scanner_phase is not None
        if scanner_in_use and is_imaging(self.effective_scanner_phase(now)):
            if not self.config.auto_resume_after_scan:
                self._require_resume('scan')
            return SafetyState.SCAN_HOLD
        silent = self._silent_motion_heartbeats(now)
        if silent:
            self._require_resume(f'no heartbeat from {", ".join(silent)} (required for motion)')
        if self._awaiting_resume:
            return SafetyState.HOLD
        return SafetyState.READY

    def _silent_motion_heartbeats(self, now: float) -> List[str]:
        return [s for s in self.config.motion_heartbeats
                if self._hb_last[s] is None or s in self._silent]

    def _finish(self, now: float, cause: Optional[str] = None) -> List[SafetyEvent]:
        """Update the state, then hand out every event queued since the last call."""
        self._update_state(now, cause)
        out, self._pending = self._pending, []
        return out

    def _update_state(self, now: float, cause: Optional[str] = None) -> None:
        new = self._target_state(now)
        if new is not self._state:
            old = self._state
            self._state = new
            if new is SafetyState.READY:
                why = cause or ('scan ended (auto-resume policy)' if old is SafetyState.SCAN_HOLD
                                else 'motion permitted')
            elif new is SafetyState.HOLD:
                why = f'{cause + ": " if cause else ""}{self._reason(now)}'
            else:
                why = self._reason(now)
            self._emit(now, EventKind.TRANSITION, old, new, why)

    def _reason(self, now: float) -> str:
        state = self._state
        if state is SafetyState.ESTOP:
            if self._estop_active:
                return 'Motion halted: emergency stop pressed'
            return 'Motion halted: emergency stop released, reset required'
        if state is SafetyState.FAULT:
            faults = sorted(self._faults.values(), key=lambda f: f.since)
            first = faults[0]
            text = first.describe()
            text += ' (cause still present)' if first.condition_active else ' (cleared: acknowledge to continue)'
            if len(faults) > 1:
                text += f' (+{len(faults) - 1} more: {", ".join(f.code for f in faults[1:])})'
            return text
        if state is SafetyState.INIT:
            return 'Motion halted: waiting for ' + ', '.join(self._missing_inputs())
        if state is SafetyState.SCAN_HOLD:
            if self._scanner_phase is None:
                return 'Motion halted: scanner state UNKNOWN (none received)'
            if self._scanner_stale(now):
                return (f'Motion halted: scanner state stale '
                        f'({self._scanner_late:.2f} s old on arrival, {self._scanner_phase.value})')
            phase = self.effective_scanner_phase(now)
            proto = f" (protocol '{self._scanner_protocol}')" if self._scanner_protocol else ''
            return f'Motion halted: scanner {phase.value}{proto}'
        if state is SafetyState.HOLD:
            return f'Motion paused: waiting for operator resume (after {self._hold_reason})'
        return 'Motion permitted'
