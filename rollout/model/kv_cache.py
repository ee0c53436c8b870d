"""The K/V tensors of a replica's pool: slot-based and position-indexed (gpt-fast style).

Each sequence owns a slot: a row of `slot_len` positions in every layer. The K/V of a token is
written at the row's position id; which leading positions are committed is CPU bookkeeping of
the engine (`engine/sequence.py`), passed in per step as prefix lengths. Rollback is "do not
advance the length": rejected drafts may sit past it and are overwritten before anything reads
them. Mask-block K/V is never written.

Writes go through a slot mapping computed once per step (`write_index`): a token that must not
be written (mask blocks, padding, a padding row) is sent to the sink, an extra slot that nothing
reads, so the write is one indexed store per layer with no data-dependent shapes.

Families whose tokens mix over the sequence beyond attention (ZAYA's convolutions and delayed
value) keep per-position inputs beside K/V (`state_widths`: one [layers, slots, positions,
width] tensor each), written through the same index and copied with the prefix: their state at
any committed length is a read, and rollback stays "do not advance the length".
"""

from __future__ import annotations

import torch


def state_widths(model) -> tuple[int, ...]:
    """The per-position state widths a model keeps beside K/V (none for the dense family)."""
    return tuple(getattr(model, "token_state_widths", ()))


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, slot_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str, state_widths: tuple[int, ...] = ()):
        shape = (num_layers, num_slots + 1, num_kv_heads, slot_len, head_dim)
        # Zeroed, not empty: masked attention still multiplies the unused positions' V by 0.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.state = [torch.zeros(num_layers, num_slots + 1, slot_len, w, dtype=dtype, device=device)
                      for w in state_widths]
        self.num_slots, self.slot_len = num_slots, slot_len
        self.sink = num_slots

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, slot_len: int, head_dim: int, dtype: torch.dtype,
                       state_widths: tuple[int, ...] = ()) -> int:
        return (2 * num_kv_heads * head_dim + sum(state_widths)) * num_layers * slot_len * dtype.itemsize

    def write_index(self, slots: torch.Tensor, positions: torch.Tensor, write: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B], positions [B, T], write [B, T] bool -> (slot, position) [B, T] of every
        in-step token's store; unwritten tokens go to the sink."""
        T = positions.shape[1]
        sink_pos = (torch.arange(T, device=positions.device) % self.slot_len)[None].expand_as(positions)
        return (torch.where(write, slots[:, None], torch.full_like(positions, self.sink)),
                torch.where(write, positions, sink_pos))

    def prefix(self, layer: int, slots: torch.Tensor, length: int, slot_range: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first `length` positions of each slot: [B, Hkv, length, D] each. When the
        slots are known to be the consecutive range [a, b) in order, views (no copy)."""
        if slot_range is not None:
            a, b = slot_range
            return self.k[layer, a:b, :, :length], self.v[layer, a:b, :, :length]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def write(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [B, Hkv, T, D] at the (slot, position) pairs of `index` ([B, T] each)."""
        dst_slots, dst_pos = index
        # One index_put_ on the whole pool tensor (the layer as an index too), not on a view of
        # it: under torch.compile a write into a view of a graph input is functionalised into a
        # copy of the whole pool per layer, while this one stays in place.
        at = (torch.full_like(dst_slots, layer), dst_slots, slice(None), dst_pos)
        self.k[at] = k.transpose(1, 2)
        self.v[at] = v.transpose(1, 2)

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copies the first `length` positions of slots `src` [N] to slots `dst` [N] (the n
        samples of one prompt share its prefill)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        for t in self.state:
            t[:, dst, :length] = t[:, src, :length]

    def write_state(self, layer: int, index: tuple[torch.Tensor, torch.Tensor], values: tuple[torch.Tensor, ...]
                    ) -> None:
        """Stores each per-position state [B, T, width] at the (slot, position) pairs of `index`."""
        dst_slots, dst_pos = index
        at = (torch.full_like(dst_slots, layer), dst_slots, dst_pos)
        for t, x in zip(self.state, values):
            t[at] = x.to(t.dtype)

    def read_state(self, layer: int, slots: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """Each per-position state of slots [B] at positions [B, ...] (in range): [B, ..., width]."""
        rows = slots.view(-1, *([1] * (positions.dim() - 1)))
        return [t[layer][rows, positions] for t in self.state]
