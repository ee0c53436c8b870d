"""The top-k MoE family: Qwen3-MoE and Mixtral (pre-norm attention + a sparse MoE block, or a
dense gated MLP on Qwen3-MoE's `mlp_only_layers` / off its `decoder_sparse_step`).

As in the dense family, the differences between the two are config, not code: Qwen3-MoE's
per-head q/k RMSNorm and optional top-k renormalisation; Mixtral always renormalises and
weights its experts' outputs in float32 (`moe.SparseMoeBlock`). Mixtral checkpoints name the
block `block_sparse_moe` on disk; in memory (transformers 5) and here it is `mlp`."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import SequenceBatch, StepBatch
from .kv_cache import KVCache
from .layers import MLP, Attention, Packed, RMSNorm
from .moe import SparseMoeBlock


class MoeLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = (SparseMoeBlock(cfg, weights_in_fp32=cfg.model_type == "mixtral")
                    if layer in cfg.moe_layers else MLP(cfg))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, batch.packed) if isinstance(self.mlp, MLP) else self.mlp(h))

    def pack(self, input_major: bool) -> None:
        self.self_attn.pack(input_major)
        self.mlp.pack(input_major)

    def packs(self) -> tuple[Packed | None, ...]:
        modules = self._modules
        mlp = modules["mlp"]
        return (modules["self_attn"].packed,) + ((mlp.packed,) if isinstance(mlp, MLP) else ())

    def unpack(self) -> None:
        self.self_attn.packed = None
        if isinstance(self.mlp, MLP):
            self.mlp.packed = None
