"""What a GRPO / PPO trainer imports to use tidar-rollout: the rollout client, weight sync,
padded batches and the diffusion co-training loss."""

from .batch import RolloutBatch, pad_groups
from .client import AsyncRolloutClient, RolloutClient, Trajectory, TrajectoryGroup
from .cotrain import diffusion_cotrain_loss, tidar_forward, token_logprobs
from .weight_sync import PushResult, WeightSync

__all__ = ["RolloutClient", "AsyncRolloutClient", "Trajectory", "TrajectoryGroup", "RolloutBatch", "pad_groups",
           "WeightSync", "PushResult", "tidar_forward", "token_logprobs", "diffusion_cotrain_loss"]
