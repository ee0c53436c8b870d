"""The TiDAR hybrid training objective (DESIGN.md section 2, "Training") and AR perplexity.

For token ids x [B, S] and block length k the model reads `[x_0..x_{S-1} | MASK * S]` at
positions `[0..S-1 | 0..S-1]` with the visibility of `step_layout.training_mask_rule` (the one
definition shared with inference). Labels:
  clean half   position i predicts x_{i+1}   (next-token, AR; the last clean position has none)
  mask half    position i predicts x_i       (diffusion, unshifted)
Loss = (alpha * CE_AR + CE_diff) / (1 + alpha).

Self-distillation (`distill` > 0): lossless acceptance is 1 - TV(p, q) against the model's own
AR distribution p, not the corpus, so the diffusion target at mask position i mixes the one-hot
label with the AR half's detached policy p(. | x_<i) (the clean half's logits at i - 1, through
`sampling.process_logits`: mask token removed, temperature 1):
  target_i = (1 - distill) * onehot(x_i) + distill * p(. | x_<i)        (i >= 1; i = 0: onehot)
On sequences the policy sampled itself this is the marginal acceptance needs; rows the caller
marks as self-generated (`forward(x, ar_rows=n)`: rows n.. ) get no AR loss, since training p on
its own samples only adds noise.

Design decisions:
- On CUDA the mask is a FlexAttention BlockMask built from the rule (no dense (2S)^2 tensor);
  elsewhere FlexAttention has no backward, so the dense `training_visible` mask is used.
- Logits are computed in chunks of the sequence under activation checkpointing, so the
  [B, 2S, V] float32 logits never exist at once (large vocabularies at long S).
- The objective is an nn.Module so DistributedDataParallel can wrap it whole (lm_head included).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.batch import SequenceBatch
from ..model.decoder import Decoder
from ..sampling import process_logits
from ..step_layout import training_mask_rule, training_positions, training_visible

log = logging.getLogger(__name__)

IGNORE = -100
LOGIT_CHUNK = 1024  # sequence positions per lm_head chunk


def training_inputs(x: torch.Tensor, mask_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S] -> (input ids [B, 2S], positions [B, 2S]) of the doubled sequence."""
    B, S = x.shape
    ids = torch.cat((x, torch.full_like(x, mask_token_id)), dim=1)
    positions = training_positions(S).to(x.device)[None].expand(B, 2 * S)
    return ids, positions


def training_labels(x: torch.Tensor) -> torch.Tensor:
    """x [B, S] -> labels [B, 2S]: clean i -> x_{i+1} (last: ignored), mask i -> x_i."""
    ar = torch.cat((x[:, 1:], torch.full_like(x[:, :1], IGNORE)), dim=1)
    return torch.cat((ar, x), dim=1)


def training_mask(seq_len: int, block_size: int, device: torch.device | str, dense: bool = False):
    """The attention mask of the doubled sequence: a BlockMask on CUDA, dense bool elsewhere or
    when `dense` (`needs_dense_mask`)."""
    device = torch.device(device)
    if device.type == "cuda" and not dense:
        return training_block_mask(seq_len, block_size, device)
    return training_visible(seq_len, block_size).to(device)


@lru_cache(maxsize=8)
def training_block_mask(seq_len: int, block_size: int, device: torch.device):
    """The FlexAttention BlockMask of `training_mask_rule` (no dense (2S)^2 tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return training_mask_rule(q, kv, seq_len, block_size)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=2 * seq_len, KV_LEN=2 * seq_len, device=device)


def causal_mask(seq_len: int, device: torch.device | str, dense: bool = False):
    """Plain causal mask for AR training / evaluation (BlockMask on CUDA, dense elsewhere or
    when `dense`)."""
    device = torch.device(device)
    if device.type == "cuda" and not dense:
        return _causal_block_mask(seq_len, device)
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def needs_dense_mask(model: nn.Module) -> bool:
    """Whether a model reads its whole-sequence mask densely: ZAYA's convolutions and delayed
    value follow the mask's visibility (`model/zaya.py`), which a BlockMask does not expose."""
    return bool(getattr(model, "dense_masks", False))


@lru_cache(maxsize=8)
def _causal_block_mask(seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, q, kv: kv <= q, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len,
                             device=device)


def _chunk_ce_sum(model: Decoder, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model.logits(hidden)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")


def cross_entropy_sum(model: Decoder, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE of lm_head(hidden) [B, T, H] against labels [B, T], chunked over T."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], LOGIT_CHUNK):
        h, y = hidden[:, s:s + LOGIT_CHUNK], labels[:, s:s + LOGIT_CHUNK]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, model, h, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(model, h, y)
    return total


def _chunk_soft_ce_sum(model: Decoder, hidden: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    logq = torch.log_softmax(model.logits(hidden).float(), dim=-1)
    hard = -logq.gather(-1, labels[..., None]).squeeze(-1)
    soft = -(teacher.exp() * logq.clamp_min(torch.finfo(logq.dtype).min)).sum(-1)
    return ((1 - weight) * hard + weight * soft).sum()


def distill_cross_entropy_sum(model: Decoder, clean: torch.Tensor, masked: torch.Tensor, x: torch.Tensor,
                              distill: float, mask_token_id: int) -> torch.Tensor:
    """Summed diffusion CE of lm_head(masked) [B, S, H] against (1 - distill) * onehot(x_i) +
    distill * p(. | x_<i), p = the policy of lm_head(clean) at i - 1 (detached), chunked over S."""
    B, S = x.shape
    total = masked.new_zeros((), dtype=torch.float32)
    for s in range(0, S, LOGIT_CHUNK):
        e = min(s + LOGIT_CHUNK, S)
        with torch.no_grad():
            prev = model.logits(clean[:, max(s - 1, 0):e - 1].detach())
            teacher = process_logits(prev, 1.0, 0, 1.0, forbidden=(mask_token_id,))
            weight = torch.full((B, e - s), float(distill), device=x.device)
            if s == 0:  # position 0 has no AR prediction: its target is the label alone
                teacher = torch.cat((torch.zeros_like(teacher[:, :1]), teacher), dim=1)
                weight[:, 0] = 0.0
        h, y = masked[:, s:e], x[:, s:e]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_soft_ce_sum, model, h, y, teacher, weight, use_reentrant=False)
        else:
            total = total + _chunk_soft_ce_sum(model, h, y, teacher, weight)
    return total


class HybridLoss(nn.Module):
    """forward(x [B, S], ar_rows=None) -> (loss, ce_ar, ce_diff), each a scalar mean over its
    labelled tokens. ar_rows: only rows [0, ar_rows) get the AR loss (None: all); the rest are
    the policy's own samples (self-distillation), trained on the diffusion half only."""

    def __init__(self, model: Decoder, mask_token_id: int, block_size: int, alpha: float = 1.0,
                 distill: float = 0.0):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0 <= distill <= 1:
            raise ValueError(f"distill must be in [0, 1], got {distill}")
        self.model, self.mask_token_id, self.block_size, self.alpha = model, mask_token_id, block_size, alpha
        self.distill = distill

    def forward(self, x: torch.Tensor, ar_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S = x.shape
        if S < 2:
            raise ValueError(f"training sequences need at least 2 tokens, got {S}")
        ar_rows = B if ar_rows is None else ar_rows
        if not 0 <= ar_rows <= B:
            raise ValueError(f"ar_rows must be in [0, {B}], got {ar_rows}")
        ids, positions = training_inputs(x, self.mask_token_id)
        mask = training_mask(S, self.block_size, x.device, needs_dense_mask(self.model))
        hidden = self.model(ids, SequenceBatch(positions, mask), None)  # [B, 2S, H]
        labels = training_labels(x)
        ce_ar = hidden.new_zeros((), dtype=torch.float32)
        if ar_rows:
            ce_ar = cross_entropy_sum(self.model, hidden[:ar_rows, :S], labels[:ar_rows, :S]) / (ar_rows * (S - 1))
        if self.distill > 0:
            ce_diff = distill_cross_entropy_sum(self.model, hidden[:, :S], hidden[:, S:], x, self.distill,
                                                self.mask_token_id) / (B * S)
        else:
            ce_diff = cross_entropy_sum(self.model, hidden[:, S:], labels[:, S:]) / (B * S)
        loss = (self.alpha * ce_ar + ce_diff) / (1 + self.alpha)
        return loss, ce_ar, ce_diff


class CausalLoss(nn.Module):
    """Plain next-token CE (pretraining): forward(x [B, S]) -> mean CE over B*(S-1) tokens."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S = x.shape
        positions = torch.arange(S, device=x.device)[None].expand(B, S)
        hidden = self.model(x, SequenceBatch(positions, causal_mask(S, x.device, needs_dense_mask(self.model))), None)
        labels = torch.cat((x[:, 1:], torch.full_like(x[:, :1], IGNORE)), dim=1)
        return cross_entropy_sum(self.model, hidden, labels) / (B * (S - 1))


@torch.no_grad()
def ar_perplexity(model: Decoder, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Teacher-forced next-token perplexity on held-out windows [N, S] (plain causal attention,
    no mask half): exp of the mean CE over all N*(S-1) predicted tokens."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, S] with S >= 2, got shape {list(windows.shape)}")
    device = next(model.parameters()).device
    loss_fn = CausalLoss(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        x = windows[s:s + batch_size].to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(loss_fn(x)) * n
        count += n
    model.train(was_training)
    return float(torch.exp(torch.tensor(total / count)))
