"""Where each token of a TiDAR forward sits and what it may see (DESIGN.md section 2).

The single source of truth for the step structure: inference (`decode_layout`,
`prefill_layout`) and training (`training_visible`) both come from here.

Decode step with block length k and level set J, prefix length L already cached:
  in-step index 0..k-1        drafts d_0..d_{k-1} at positions L..L+k-1, causal
  then, per level j in J      k mask tokens at positions L+j..L+j+k-1; they see the prefix and
                              d_0..d_{j-1}, every token of their own block, nothing else
Drafts never see masks. Only the drafts' K/V are written to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeLayout:
    block_size: int
    levels: tuple[int, ...]
    offsets: torch.Tensor  # [T] position of each in-step token minus L
    visible: torch.Tensor  # [T, T] bool, in-step query x in-step key
    num_drafts: int        # the first num_drafts in-step tokens are drafts (written to the cache)

    @property
    def num_tokens(self) -> int:
        return self.offsets.numel()

    def block_start(self, level_index: int) -> int:
        """In-step index of the first mask token of the block for levels[level_index]."""
        return self.num_drafts + level_index * self.block_size

    def to(self, device) -> DecodeLayout:
        return DecodeLayout(self.block_size, self.levels, self.offsets.to(device),
                            self.visible.to(device), self.num_drafts)


def decode_layout(block_size: int, levels: tuple[int, ...]) -> DecodeLayout:
    """The TiDAR step; `levels=()` gives verify-only (drafts, no pre-draft blocks)."""
    k = block_size
    T = k + len(levels) * k
    offsets = torch.empty(T, dtype=torch.long)
    visible = torch.zeros(T, T, dtype=torch.bool)
    offsets[:k] = torch.arange(k)
    visible[:k, :k] = torch.ones(k, k, dtype=torch.bool).tril()
    for b, j in enumerate(levels):
        s = k + b * k
        offsets[s:s + k] = j + torch.arange(k)
        visible[s:s + k, :j] = True
        visible[s:s + k, s:s + k] = True
    return DecodeLayout(k, tuple(levels), offsets, visible, num_drafts=k)


def ar_layout() -> DecodeLayout:
    """One token per forward: the plain autoregressive step through the same engine."""
    return DecodeLayout(1, (), torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), 1)


def prefill_layout(chunk_lens: list[int], block_size: int, starts: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt chunks (right-padded to the longest) followed by one mask block (`block_size` 0:
    none). Row b's chunk holds prompt tokens starts[b]..starts[b]+n_b-1 (default start 0); the
    tokens before it are already in the cache and every query sees them.

    Row b: chunk at in-step 0..n_b-1 (positions starts[b]+0..n_b-1, causal, written to the cache),
    padding that sees only itself, then the mask block at in-step Nmax..Nmax+k-1, positions
    starts[b]+n_b..+k-1, seeing the whole chunk and its own block.
    Returns positions [B, T], visible [B, T, T], write [B, T].
    """
    B, P, k = len(chunk_lens), max(chunk_lens), block_size
    starts = starts or [0] * B
    T = P + k
    positions = torch.zeros(B, T, dtype=torch.long)
    visible = torch.zeros(B, T, T, dtype=torch.bool)
    write = torch.zeros(B, T, dtype=torch.bool)
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    for b, (n, s) in enumerate(zip(chunk_lens, starts)):
        positions[b, :n] = s + torch.arange(n)
        visible[b, :n, :n] = causal[:n, :n]
        write[b, :n] = True
        idx = torch.arange(n, P)
        visible[b, idx, idx] = True
        positions[b, P:] = s + n + torch.arange(k)
        visible[b, P:, :n] = True
        visible[b, P:, P:] = True
    return positions, visible, write


def training_visible(seq_len: int, block_size: int) -> torch.Tensor:
    """Dense [2S, 2S] visibility of the training sequence [x_0..x_{S-1} | MASK * S]
    (the reference the training kernel's mask must equal).

    clean -> clean causal; clean -> mask never; mask in block b -> clean tokens before b*B;
    mask -> mask inside its own block only (bidirectional).
    """
    S = seq_len
    idx = torch.arange(2 * S)
    q, kv = idx[:, None], idx[None, :]
    return training_mask_rule(q, kv, S, block_size)


def training_mask_rule(q: torch.Tensor, kv: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """The visibility rule on index tensors; usable as a FlexAttention mask_mod body."""
    S = seq_len
    q_clean, kv_clean = q < S, kv < S
    q_block = (q - S) // block_size
    kv_block = (kv - S) // block_size
    clean_clean = q_clean & kv_clean & (kv <= q)
    mask_clean = ~q_clean & kv_clean & (kv < q_block * block_size)
    mask_mask = ~q_clean & ~kv_clean & (q_block == kv_block)
    return clean_clean | mask_clean | mask_mask


def training_positions(seq_len: int) -> torch.Tensor:
    """Positions of the doubled training sequence: [0..S-1 | 0..S-1]."""
    return torch.arange(seq_len).repeat(2)
