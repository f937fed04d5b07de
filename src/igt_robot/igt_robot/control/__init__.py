"""Control core (pure; no rclpy): fixed-rate loop, tracking monitor, goal
bookkeeping and the motion executor that plays trajectories on a
:class:`~igt_robot.hardware.interface.HardwareInterface`."""
from .executor import ExecutorMode, MotionExecutor, MotionRequest, StepReport
from .goal_manager import (Goal, GoalDecision, GoalManager, GoalState, GoalStateError, ResultCode,
                           TERMINAL_STATES)
from .loop import FixedRateLoop, LoopStats
from .tracking import TrackingFault, TrackingMonitor

__all__ = ['ExecutorMode', 'MotionExecutor', 'MotionRequest', 'StepReport',
           'Goal', 'GoalDecision', 'GoalManager', 'GoalState', 'GoalStateError', 'ResultCode',
           'TERMINAL_STATES', 'FixedRateLoop', 'LoopStats', 'TrackingFault', 'TrackingMonitor']
