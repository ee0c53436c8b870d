"""tidar-rollout: TiDAR self-speculative decoding with an exact sampler, for RL rollouts."""

from .config import ModelConfig, TidarConfig, UnsupportedModelError
from .engine import Engine, GenerationStats
from .params import Completion, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "GenerationStats", "ModelConfig", "TidarConfig",
           "UnsupportedModelError"]
