"""Slot-based, position-indexed KV cache (gpt-fast style).

Each sequence owns a slot: a row of `max_len` positions in every layer. K/V of a token is written
at the row's position id, and `lengths[slot]` says how many leading positions are committed.
Rollback is "do not advance the length": rejected drafts may sit past the length and are
overwritten by the next step before anything reads them. Mask-block K/V is never written.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """No free slot is left."""


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(f"asked for {n} KV-cache slots, {len(self._free)} free")
        slots = [self._free.pop() for _ in range(n)]
        self.lengths[slots] = 0
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def prefix(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first `length` positions of each slot: [B, Hkv, length, D] each."""
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, write: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [B, Hkv, T, D] of the tokens flagged in `write` [B, T] at their positions."""
        rows, cols = write.nonzero(as_tuple=True)
        dst_slots, dst_pos = slots[rows], positions[rows, cols]
        self.k[layer, dst_slots, :, dst_pos] = k.transpose(1, 2)[rows, cols]
        self.v[layer, dst_slots, :, dst_pos] = v.transpose(1, 2)[rows, cols]

    def copy_prefix(self, src: int, dst: list[int], length: int) -> None:
        """Shares a prefilled prompt with other slots (the n samples of one prompt)."""
        self.k[:, dst, :, :length] = self.k[:, src:src + 1, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src:src + 1, :, :length]
        self.lengths[dst] = length
