"""Control core (pure; no rclpy): fixed-rate loop, tracking monitor, goal
bookkeeping and the streaming executor that keeps a motor controller's PVT
buffer ahead through a :class:`~igt_robot.hardware.interface.HardwareInterface`."""
from .executor import (ExecutorMode, MotionRequest, StepReport, StreamingExecutor, StreamStats,
                       TrajectoryStreamer)
from .goal_manager import (Goal, GoalDecision, GoalManager, GoalState, GoalStateError, ResultCode,
                           TERMINAL_STATES)
from .loop import FixedRateLoop, LoopStats
from .tracking import TrackingFault, TrackingMonitor

__all__ = ['ExecutorMode', 'MotionRequest', 'StepReport', 'StreamingExecutor', 'StreamStats',
           'TrajectoryStreamer', 'Goal', 'GoalDecision', 'GoalManager', 'GoalState', 'GoalStateError',
           'ResultCode', 'TERMINAL_STATES', 'FixedRateLoop', 'LoopStats', 'TrackingFault', 'TrackingMonitor']
