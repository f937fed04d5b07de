"""One-goal-at-a-time goal bookkeeping with explicit states and result codes.

Mirrors a ROS action server's goal life cycle without ROS:

    ACCEPTED -> EXECUTING -> SUCCEEDED | ABORTED
                         `-> CANCELING -> CANCELED | ABORTED
    ACCEPTED -> CANCELED (canceled or preempted before it started)

Policy when a goal arrives while another is active:
* ``reject`` (default): the new goal is rejected (REJECTED_BUSY);
* ``preempt``: the active goal is asked to cancel (result PREEMPTED) and the new
  goal waits as *pending* until the old one has finished stopping.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict, Optional


class GoalState(str, enum.Enum):
    ACCEPTED = 'ACCEPTED'
    EXECUTING = 'EXECUTING'
    CANCELING = 'CANCELING'
    SUCCEEDED = 'SUCCEEDED'
    ABORTED = 'ABORTED'
    CANCELED = 'CANCELED'


TERMINAL_STATES = frozenset({GoalState.SUCCEEDED, GoalState.ABORTED, GoalState.CANCELED})

_ALLOWED = {
    GoalState.ACCEPTED: {GoalState.EXECUTING, GoalState.CANCELED, GoalState.ABORTED},
    GoalState.EXECUTING: {GoalState.CANCELING, GoalState.SUCCEEDED, GoalState.ABORTED},
    GoalState.CANCELING: {GoalState.CANCELED, GoalState.ABORTED},
}


class ResultCode(str, enum.Enum):
    SUCCEEDED = 'SUCCEEDED'
    REJECTED_BUSY = 'REJECTED_BUSY'                     # another goal is active (policy reject)
    REJECTED_INVALID = 'REJECTED_INVALID'               # malformed / out-of-limits request
    REJECTED_NOT_PERMITTED = 'REJECTED_NOT_PERMITTED'   # safety does not permit motion
    CANCELED = 'CANCELED'                               # canceled on request
    PREEMPTED = 'PREEMPTED'                             # replaced by a newer goal
    ABORTED_INTERLOCK = 'ABORTED_INTERLOCK'             # safety permission dropped
    ABORTED_TRACKING_ERROR = 'ABORTED_TRACKING_ERROR'
    ABORTED_HARDWARE = 'ABORTED_HARDWARE'               # hardware refused / failed
    ABORTED_GOAL_TOLERANCE = 'ABORTED_GOAL_TOLERANCE'   # did not settle at the goal in time
    ABORTED_INVALID = 'ABORTED_INVALID'                 # could not be planned when started


class GoalStateError(RuntimeError):
    """An illegal goal transition was requested (a programming error)."""


@dataclasses.dataclass
class Goal:
    """A goal and its outcome; times are host monotonic seconds."""

    goal_id: str
    request: Any
    state: GoalState = GoalState.ACCEPTED
    result_code: Optional[ResultCode] = None
    message: str = ''
    accepted_at: float = 0.0
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    cancel_code: Optional[ResultCode] = None   # CANCELED or PREEMPTED once canceling

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclasses.dataclass(frozen=True)
class GoalDecision:
    """Answer to a goal submission."""

    accepted: bool
    code: Optional[ResultCode]       # None when accepted
    message: str
    goal: Optional[Goal] = None
    preempted_goal_id: Optional[str] = None


class GoalManager:
    """Tracks the active goal (at most one) and, under ``preempt``, one pending goal."""

    POLICIES = ('reject', 'preempt')

    def __init__(self, policy: str = 'reject', keep_finished: int = 100):
        if policy not in self.POLICIES:
            raise ValueError(f'goal policy {policy!r} must be one of {self.POLICIES}')
        self.policy = policy
        self.active: Optional[Goal] = None
        self.pending: Optional[Goal] = None
        self._finished: Dict[str, Goal] = {}
        self._keep = max(1, int(keep_finished))

    def get(self, goal_id: str) -> Optional[Goal]:
        for g in (self.active, self.pending):
            if g is not None and g.goal_id == goal_id:
                return g
        return self._finished.get(goal_id)

    def submit(self, goal_id: str, request: Any, now: float) -> GoalDecision:
        goal_id = str(goal_id)
        if not goal_id:
            return GoalDecision(False, ResultCode.REJECTED_INVALID, 'empty goal id')
        if self.get(goal_id) is not None:
            return GoalDecision(False, ResultCode.REJECTED_INVALID, f'duplicate goal id {goal_id!r}')
        goal = Goal(goal_id=goal_id, request=request, accepted_at=float(now))
        if self.active is None:
            self.active = goal
            return GoalDecision(True, None, 'accepted', goal)
        if self.policy == 'reject':
            return GoalDecision(False, ResultCode.REJECTED_BUSY,
                                f'busy with goal {self.active.goal_id!r} ({self.active.state.value}); '
                                f'policy is reject')
        # preempt
        preempted = self.active.goal_id
        if self.active.state is GoalState.ACCEPTED:
            self.finish(self.active.goal_id, GoalState.CANCELED, ResultCode.PREEMPTED,
                        f'preempted by goal {goal_id!r} before it started', now)
            self.active = goal
            return GoalDecision(True, None, 'accepted (preempted a goal not yet started)', goal, preempted)
        if self.active.state is GoalState.EXECUTING:
            self.request_cancel(preempted, now, ResultCode.PREEMPTED)
        if self.pending is not None:
            old = self.pending
            self.pending = None
            self._retire(old, GoalState.CANCELED, ResultCode.PREEMPTED,
                         f'preempted by goal {goal_id!r} before it started', now)
        self.pending = goal
        return GoalDecision(True, None, f'accepted; preempting goal {preempted!r}', goal, preempted)

    def start(self, goal_id: str, now: float) -> Goal:
        goal = self._require_active(goal_id)
        self._transition(goal, GoalState.EXECUTING)
        goal.started_at = float(now)
        return goal

    def request_cancel(self, goal_id: str, now: float, code: ResultCode = ResultCode.CANCELED) -> bool:
        """Cancel a goal. Pending/not-started goals are canceled at once; an
        executing goal goes to CANCELING and is finished by the executor after it
        has stopped. Returns False if the goal is unknown or already done."""
        if self.pending is not None and self.pending.goal_id == goal_id:
            goal, self.pending = self.pending, None
            self._retire(goal, GoalState.CANCELED, code, 'canceled before it started', now)
            return True
        goal = self.active
        if goal is None or goal.goal_id != goal_id:
            return False
        if goal.state is GoalState.ACCEPTED:
            self.finish(goal_id, GoalState.CANCELED, code, 'canceled before it started', now)
            return True
        if goal.state is GoalState.EXECUTING:
            self._transition(goal, GoalState.CANCELING)
            goal.cancel_code = code
            return True
        return goal.state is GoalState.CANCELING

    def finish(self, goal_id: str, state: GoalState, code: ResultCode, message: str, now: float) -> Goal:
        """Terminal transition of the active goal; promotes the pending goal."""
        goal = self._require_active(goal_id)
        if state not in TERMINAL_STATES:
            raise GoalStateError(f'{state.value} is not a terminal goal state')
        self._retire(goal, state, code, message, now)
        self.active = None
        if self.pending is not None:
            self.active, self.pending = self.pending, None
        return goal

    # ------------------------------------------------------------- internals
    def _require_active(self, goal_id: str) -> Goal:
        if self.active is None or self.active.goal_id != goal_id:
            raise GoalStateError(f'goal {goal_id!r} is not the active goal')
        return self.active

    def _retire(self, goal: Goal, state: GoalState, code: ResultCode, message: str, now: float) -> None:
        if state not in TERMINAL_STATES:
            raise GoalStateError(f'{state.value} is not a terminal goal state')
        self._transition(goal, state)
        goal.result_code = code
        goal.message = message
        goal.finished_at = float(now)
        self._finished[goal.goal_id] = goal
        while len(self._finished) > self._keep:
            self._finished.pop(next(iter(self._finished)))

    @staticmethod
    def _transition(goal: Goal, new: GoalState) -> None:
        if new not in _ALLOWED.get(goal.state, set()):
            raise GoalStateError(f'goal {goal.goal_id!r}: illegal transition {goal.state.value} -> {new.value}')
        goal.state = new
