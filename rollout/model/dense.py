"""The dense family: Llama, Qwen2, Qwen3 (pre-norm attention + gated MLP per layer).

The family differences are config, not code: biases (Qwen2 on q/k/v, Llama's optional
attention and MLP biases), Qwen3's per-head q/k RMSNorm (`ModelConfig.qk_norm`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import SequenceBatch, StepBatch
from .kv_cache import KVCache
from .layers import MLP, Attention, Packed, RMSNorm


class DenseLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x), batch.packed)

    def pack(self, input_major: bool) -> None:
        self.self_attn.pack(input_major)
        self.mlp.pack(input_major)

    def packs(self) -> tuple[Packed | None, ...]:
        # Read from the module dict: this runs every step (see `Decoder.packs`).
        modules = self._modules
        return modules["self_attn"].packed, modules["mlp"].packed

    def unpack(self) -> None:
        self.self_attn.packed = self.mlp.packed = None
