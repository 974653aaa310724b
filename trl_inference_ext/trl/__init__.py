"""Drop-in hooks for TRL: `rollout_func` for `GRPOTrainer`, tool rewards, and a weight-sync callback."""

from .callbacks import InferenceSyncCallback
from .rewards import tool_call_reward, tool_success_reward
from .rollout import RolloutFunction, rollout_func
from .sampling import sampling_from_trl_args
from .stats import RolloutRecorder, RolloutStep

__all__ = [
    "InferenceSyncCallback",
    "RolloutFunction",
    "RolloutRecorder",
    "RolloutStep",
    "rollout_func",
    "sampling_from_trl_args",
    "tool_call_reward",
    "tool_success_reward",
]
