"""What one forward reads besides the token ids: `StepBatch` (a decode / prefill step over the
KV cache) and `SequenceBatch` (a whole training sequence), and the split attention path's
prefix block mask built with a step. Below both the attention dispatch and the decoder, which
read it."""

from __future__ import annotations

import torch


class StepBatch:
    """What one forward needs besides the token ids (tensors on the model's device).

    slots [B]: cache slot of each row; prefix_lens [B]: committed cache length of each row;
    prefix_max: their maximum, as a Python int (known on the CPU, so reading it costs no sync);
    positions [B, T]: position id of each in-step token; step_visible [B, T, T]: which in-step
    keys each in-step query sees; write_index: (slot, position) [B, T] where each in-step
    token's K/V is stored (`KVCache.write_index`; the sink for tokens not to keep);
    attention: "dense", "split" or "triton" (`attention.py`); prefix_mask: the split path's BlockMask over
    the prefix, built once per step (`prefix_block_mask` below); slot_range: (a, b) when
    the slots are the consecutive range a..b-1 in row order, known on the CPU (the prefix is then
    read as a view, not gathered); ar_step: one token per row, written at its position and seeing
    exactly its prefix and itself (the dense path then writes first and attends over the cache
    alone, with no concatenation); packed: the caller saw `Decoder.packs_current()` hold just
    before this forward, so the packed projections run without a check per layer, also under
    torch.compile (where the check could not run; the compiled step is specialised on this flag).
    """
    __slots__ = ("slots", "prefix_lens", "prefix_max", "positions", "step_visible", "write_index", "attention",
                 "prefix_mask", "slot_range", "ar_step", "packed")

    def __init__(self, slots, prefix_lens, prefix_max: int, positions, step_visible, write_index,
                 attention: str = "dense", slot_range: tuple[int, int] | None = None, ar_step: bool = False,
                 packed: bool = False):
        self.slots, self.prefix_lens, self.prefix_max, self.positions = slots, prefix_lens, prefix_max, positions
        self.step_visible, self.write_index, self.attention = step_visible, write_index, attention
        self.slot_range, self.ar_step, self.packed = slot_range, ar_step, packed
        self.prefix_mask = (prefix_block_mask(prefix_lens, positions.shape[1], prefix_max)
                            if attention == "split" and prefix_max > 0 else None)


class SequenceBatch:
    """A whole sequence with no cache (training): positions [B, S] and the attention mask
    (a FlexAttention BlockMask, or a dense bool [S, S] / [B, S, S] tensor)."""
    __slots__ = ("positions", "mask")
    packed = False  # projections packed only after a check per layer (see StepBatch.packed)

    def __init__(self, positions, mask):
        self.positions, self.mask = positions, mask


PREFIX_BLOCK = 128  # FlexAttention's block size along the prefix


def prefix_block_mask(prefix_lens: torch.Tensor, num_queries: int, prefix_max: int):
    """A FlexAttention BlockMask over [B, *, num_queries, prefix_max] in which every query of
    row b sees keys < prefix_lens[b]: blocks wholly inside the prefix are full (no mask_mod
    call), the row's last partial block is masked by length. Built from the lengths with a few
    tensor ops (no [B, T, L] mask is ever materialised)."""
    from torch.nn.attention.flex_attention import BlockMask as _BlockMask

    B, dev = prefix_lens.shape[0], prefix_lens.device
    num_kv_blocks = -(-prefix_max // PREFIX_BLOCK)
    num_q_blocks = -(-num_queries // PREFIX_BLOCK)
    full = (prefix_lens // PREFIX_BLOCK).to(torch.int32)  # [B] blocks wholly inside the prefix
    partial = (prefix_lens % PREFIX_BLOCK > 0).to(torch.int32)  # [B] one masked block after them, or none
    order = torch.arange(num_kv_blocks, device=dev, dtype=torch.int32)[None].expand(B, -1)  # [B, NB]
    partial_index = order.clone()
    partial_index[:, 0] = full.clamp(max=num_kv_blocks - 1)

    def per_q(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B, 1, num_q_blocks, ...]
        return x[:, None, None].expand(B, 1, num_q_blocks, *x.shape[1:]).contiguous()

    def within(b, h, q_idx, kv_idx):
        return kv_idx < prefix_lens[b]

    return _BlockMask.from_kv_blocks(per_q(partial), per_q(partial_index), per_q(full), per_q(order),
                                     BLOCK_SIZE=PREFIX_BLOCK, mask_mod=within,
                                     seq_lengths=(num_queries, prefix_max))
