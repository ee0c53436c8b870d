"""Attention of in-step queries over a slot's cached prefix plus the step's own tokens.

Every query sees the whole committed prefix of its row (positions < lengths[slot]) and the
in-step keys that `step_visible` allows. This is the dense-mask reference path: one boolean mask
over [prefix | step] keys, plain SDPA, so it runs wherever PyTorch runs (CPU, CUDA, ROCm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
           slots: torch.Tensor, prefix_lens: torch.Tensor, positions: torch.Tensor,
           step_visible: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D]; prefix_lens [B]; positions, write [B, T];
    step_visible [B, T, T] -> [B, H, T, D]. Writes the K/V flagged in `write` to the cache."""
    B, _, T, _ = q.shape
    prefix_max = int(prefix_lens.max())
    kp, vp = cache.prefix(layer, slots, prefix_max)
    keys, values = torch.cat((kp, k), dim=2), torch.cat((vp, v), dim=2)
    in_prefix = torch.arange(prefix_max, device=q.device) < prefix_lens[:, None]  # [B, Lp]
    mask = torch.cat((in_prefix[:, None, :].expand(B, T, prefix_max), step_visible), dim=-1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                         enable_gqa=q.shape[1] != k.shape[1])
    cache.write(layer, slots, positions, write, k, v)
    return out
