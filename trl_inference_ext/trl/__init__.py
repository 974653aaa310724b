"""Drop-in hooks for TRL: `rollout_func` for `GRPOTrainer`, tool rewards, a weight-sync callback, and weight pushes to
vLLM servers as TRL's `WeightTransferProtocol`."""

from .callbacks import InferenceSyncCallback
from .rewards import tool_call_reward, tool_success_reward
from .rollout import RolloutFunction, rollout_func
from .sampling import sampling_from_trl_args
from .stats import RolloutRecorder, RolloutStep
from .weight_transfer import VLLMWeightTransfer

__all__ = [
    "InferenceSyncCallback",
    "RolloutFunction",
    "RolloutRecorder",
    "RolloutStep",
    "VLLMWeightTransfer",
    "rollout_func",
    "sampling_from_trl_args",
    "tool_call_reward",
    "tool_success_reward",
]
