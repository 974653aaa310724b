"""Drop-in hooks for TRL: `rollout_func` for `GRPOTrainer` (its tool-loop settings: `ToolLoopConfig`), tool rewards,
a weight-sync callback, and weight pushes to vLLM servers as TRL's `WeightTransferProtocol` (`ServerWeightSync`).

May import `..module`, `..tools`, `..backends` (capabilities and the vLLM backend) and `..errors`; only TRL's public
surface (`rollout_func`, `reward_funcs`, callbacks, config), never its private methods.
"""

from ..tools.config import ToolLoopConfig
from .callbacks import InferenceSyncCallback
from .rewards import tool_call_reward, tool_success_reward
from .rollout import RolloutFunction, rollout_func
from .rows import tag_rows
from .sampling import sampling_from_trl_args
from .server_weight_sync import ServerWeightSync, VLLMWeightTransfer
from .stats import RolloutRecorder, RolloutStep

__all__ = [
    "InferenceSyncCallback",
    "RolloutFunction",
    "RolloutRecorder",
    "RolloutStep",
    "ServerWeightSync",
    "ToolLoopConfig",
    "VLLMWeightTransfer",
    "rollout_func",
    "sampling_from_trl_args",
    "tag_rows",
    "tool_call_reward",
    "tool_success_reward",
]
