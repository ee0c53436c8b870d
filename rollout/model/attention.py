"""Attention of in-step queries over a slot's cached prefix plus the step's own tokens.

Every query sees the whole committed prefix of its row (positions < lengths[slot]) and the
in-step keys that `step_visible` allows. This is the dense-mask reference path: one boolean mask
over [prefix | step] keys, plain SDPA, so it runs wherever PyTorch runs (CPU, CUDA, ROCm).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .kv_cache import KVCache

if TYPE_CHECKING:
    from .decoder import StepBatch

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # FlexAttention arrived in torch 2.5; older builds use the dense path only
    BlockMask, flex_attention = None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
           batch: StepBatch) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D] -> [B, H, T, D]. Writes the step's K/V through the
    batch's slot mapping. The prefix length to read (`batch.prefix_max`) is known on the CPU:
    no host sync inside the forward."""
    B, _, T, _ = q.shape
    prefix_max, prefix_lens, step_visible = batch.prefix_max, batch.prefix_lens, batch.step_visible
    kp, vp = cache.prefix(layer, batch.slots, prefix_max)
    keys, values = torch.cat((kp, k), dim=2), torch.cat((vp, v), dim=2)
    in_prefix = torch.arange(prefix_max, device=q.device) < prefix_lens[:, None]  # [B, Lp]
    mask = torch.cat((in_prefix[:, None, :].expand(B, T, prefix_max), step_visible), dim=-1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                         enable_gqa=q.shape[1] != k.shape[1])
    cache.write(layer, batch.write_index, k, v)
    return out


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is a fused, memory-lean kernel only when compiled (CUDA, ROCm); on the CPU
    the eager reference is used (tests, small sequences)."""
    return torch.compile(flex_attention, dynamic=False)


def attend_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Whole-sequence attention without a cache (training): q [B, H, S, D], k, v [B, Hkv, S, D].

    `mask` is a FlexAttention BlockMask (memory-lean: no dense S x S mask) or a dense bool
    [S, S] / [B, S, S] tensor (the reference, for small S and tests)."""
    gqa = q.shape[1] != k.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        kernel = flex_attention if q.device.type == "cpu" else _compiled_flex_attention()
        return kernel(q, k, v, block_mask=mask, enable_gqa=gqa)
    if mask.dim() == 3:
        mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
