"""Attention of in-step queries over a slot's cached prefix plus the step's own tokens.

Every query sees the whole committed prefix of its row (positions < its prefix length) and the
in-step keys that `step_visible` allows. Three paths, chosen per engine (`StepBatch.attention`):
- "dense": the reference. One boolean mask over [prefix | step] keys, plain SDPA; runs wherever
  PyTorch runs. On a GPU a multi-token query with a mask falls onto a kernel that parallelises
  only over batch x heads, which makes long prefixes slow (DESIGN.md section 3).
- "split": the prefix needs no mask besides each row's length, so it goes through FlexAttention
  with a block mask whose prefix blocks are full (only a row's last, partial block is masked),
  returning the log-sum-exp; the in-step part (T x T, small) is computed with its step mask; the
  two are merged by log-sum-exp. Compiled on CUDA / ROCm; eager (a correctness path) elsewhere.
  The dense path is its oracle (`tests/test_attention.py`).
- "triton": the split path with the prefix part computed by a fused split-KV Triton kernel
  (`triton_attention.prefix_attention`) that reads K/V from the cache by slot (no gather, no
  block mask) instead of FlexAttention; the in-step part and the merge are the split path's.
  Needs triton on a CUDA / ROCm device (or TRITON_INTERPRET=1 on the CPU, for tests).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .batch import StepBatch
from .kv_cache import KVCache
from .triton_attention import prefix_attention

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # FlexAttention arrived in torch 2.5; older builds use the dense path only
    BlockMask, flex_attention = None, None
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
           batch: StepBatch) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D] -> [B, H, T, D]. Writes the step's K/V through the
    batch's slot mapping. The prefix length to read (`batch.prefix_max`) is known on the CPU:
    no host sync inside the forward."""
    B, _, T, _ = q.shape
    prefix_max, prefix_lens, step_visible = batch.prefix_max, batch.prefix_lens, batch.step_visible
    gqa = q.shape[1] != k.shape[1]
    if batch.ar_step and batch.attention == "dense":
        # One token per row at position prefix_lens[b]: store it, then attend over the cache
        # positions <= prefix_lens[b] (the same keys as [prefix | itself], no concatenation).
        cache.write(layer, batch.write_index, k, v)
        keys, values = cache.prefix(layer, batch.slots, prefix_max + 1, batch.slot_range)
        mask = torch.arange(prefix_max + 1, device=q.device) <= prefix_lens[:, None]  # [B, Lp + 1]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None], enable_gqa=gqa)
    if batch.attention == "triton":  # the prefix is read from the cache by slot: no gather
        out_s, lse_s = _masked_attention(q, k, v, step_visible)
        if prefix_max > 0:
            out_p, lse_p = prefix_attention(q, cache.k[layer], cache.v[layer], batch.slots, prefix_lens, prefix_max)
            out_s = merge_by_lse(out_p, lse_p, out_s, lse_s, q.dtype)
        cache.write(layer, batch.write_index, k, v)
        return out_s
    kp, vp = cache.prefix(layer, batch.slots, prefix_max, batch.slot_range)
    if batch.attention == "split":
        out = split_attention(q, k, v, kp, vp, prefix_lens, step_visible, batch.prefix_mask)
        cache.write(layer, batch.write_index, k, v)
        return out
    keys, values = torch.cat((kp, k), dim=2), torch.cat((vp, v), dim=2)
    in_prefix = torch.arange(prefix_max, device=q.device) < prefix_lens[:, None]  # [B, Lp]
    mask = torch.cat((in_prefix[:, None, :].expand(B, T, prefix_max), step_visible), dim=-1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], enable_gqa=gqa)
    cache.write(layer, batch.write_index, k, v)
    return out


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
                    prefix_lens: torch.Tensor, step_visible: torch.Tensor, prefix_mask) -> torch.Tensor:
    """The "split" path: prefix by FlexAttention (lengths only) + in-step part with its mask,
    merged by log-sum-exp. q [B, H, T, D]; k, v [B, Hkv, T, D]; kp, vp [B, Hkv, Lp, D];
    step_visible [B, T, T]; prefix_mask from `batch.prefix_block_mask` (None when Lp = 0)."""
    gqa = q.shape[1] != k.shape[1]
    out_s, lse_s = _masked_attention(q, k, v, step_visible)
    if kp.shape[2] == 0:
        return out_s
    # Batch and prefix length change every step: compiled with dynamic shapes, not once per shape.
    kernel = flex_attention if q.device.type == "cpu" else _compiled_flex_attention(dynamic=True)
    if AuxRequest is not None:
        out_p, aux = kernel(q, kp, vp, block_mask=prefix_mask, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
        lse_p = aux.lse
    else:  # torch < 2.9
        out_p, lse_p = kernel(q, kp, vp, block_mask=prefix_mask, enable_gqa=gqa, return_lse=True)
    return merge_by_lse(out_p, lse_p, out_s, lse_s, q.dtype)


def merge_by_lse(out_p: torch.Tensor, lse_p: torch.Tensor, out_s: torch.Tensor, lse_s: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's (out [B, H, T, D],
    lse [B, H, T]); the in-step set (s) is never empty. Rows with an empty prefix have
    lse_p = -inf and out_p = 0: their weight is exp(-inf) = 0."""
    m = torch.maximum(lse_p, lse_s)
    w_p, w_s = torch.exp(lse_p - m)[..., None], torch.exp(lse_s - m)[..., None]
    out = (w_p * out_p.float() + w_s * out_s.float()) / (w_p + w_s)
    return out.to(dtype)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, S, D] with visible [B, T, S]
    (every query sees at least one key); returns (out [B, H, T, D], log-sum-exp [B, H, T] fp32)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    qg = q.reshape(B, k.shape[1], G * T, D).float()  # GQA folded into the query rows
    scores = (qg @ k.float().transpose(-1, -2)) * D ** -0.5  # [B, Hkv, G*T, S]
    scores = scores.view(B, k.shape[1], G, T, -1).masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, T]
    out = (scores - lse[..., None]).exp().flatten(2, 3) @ v.float()  # [B, Hkv, G*T, D]
    return out.view(B, H, T, D).to(q.dtype), lse.reshape(B, H, T)


@functools.cache
def _compiled_flex_attention(dynamic: bool = False):
    """FlexAttention is a fused, memory-lean kernel only when compiled (CUDA, ROCm); on the CPU
    the eager reference is used (tests, small sequences)."""
    return torch.compile(flex_attention, dynamic=dynamic)


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
