"""The TiDAR hybrid training objective (DESIGN.md section 2, "Training") and AR perplexity.

For token ids x [B, S] and block length k the model reads `[x_0..x_{S-1} | MASK * S]` at
positions `[0..S-1 | 0..S-1]` with the visibility of `step_layout.training_mask_rule` (the one
definition shared with inference). Labels:
  clean half   position i predicts x_{i+1}   (next-token, AR; the last clean position has none)
  mask half    position i predicts x_i       (diffusion, unshifted)
Loss = (alpha * CE_AR + CE_diff) / (1 + alpha).

Design decisions:
- On CUDA the mask is a FlexAttention BlockMask built from the rule (no dense (2S)^2 tensor);
  elsewhere FlexAttention has no backward, so the dense `training_visible` mask is used.
- Logits are computed in chunks of the sequence under activation checkpointing, so the
  [B, 2S, V] float32 logits never exist at once (large vocabularies at long S).
- The objective is an nn.Module so DistributedDataParallel can wrap it whole (lm_head included).
- One optimisation loop (`train`) serves conversion and pretraining: AdamW, warmup + cosine,
  gradient accumulation, bf16 autocast on CUDA (fp32 elsewhere), a checkpoint (model,
  optimizer, step, RNG) under out_dir/checkpoint/ that `resume=True` continues from. The batch
  of a step is a function of (seed, step, rank), so a resumed run sees the data it would have seen.
- Multi-GPU via torchrun (WORLD_SIZE > 1): DDP over the objective, each rank drawing its own
  windows, losses all-reduced for logging; rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .corpus import sample_windows
from .model import Decoder, SequenceBatch
from .step_layout import training_mask_rule, training_positions, training_visible

log = logging.getLogger(__name__)

IGNORE = -100
CHECKPOINT_DIR = "checkpoint"
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


def training_mask(seq_len: int, block_size: int, device: torch.device | str):
    """The attention mask of the doubled sequence: a BlockMask on CUDA, dense bool elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return training_block_mask(seq_len, block_size, device)
    return training_visible(seq_len, block_size).to(device)


@lru_cache(maxsize=8)
def training_block_mask(seq_len: int, block_size: int, device: torch.device):
    """The FlexAttention BlockMask of `training_mask_rule` (no dense (2S)^2 tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return training_mask_rule(q, kv, seq_len, block_size)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=2 * seq_len, KV_LEN=2 * seq_len, device=device)


def causal_mask(seq_len: int, device: torch.device | str):
    """Plain causal mask for AR training / evaluation (BlockMask on CUDA, dense elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _causal_block_mask(seq_len, device)
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


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


class HybridLoss(nn.Module):
    """forward(x [B, S]) -> (loss, ce_ar, ce_diff), each a scalar mean over its labelled tokens."""

    def __init__(self, model: Decoder, mask_token_id: int, block_size: int, alpha: float = 1.0):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.model, self.mask_token_id, self.block_size, self.alpha = model, mask_token_id, block_size, alpha

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S = x.shape
        if S < 2:
            raise ValueError(f"training sequences need at least 2 tokens, got {S}")
        ids, positions = training_inputs(x, self.mask_token_id)
        mask = training_mask(S, self.block_size, x.device)
        hidden = self.model(ids, SequenceBatch(positions, mask), None)  # [B, 2S, H]
        labels = training_labels(x)
        ce_ar = cross_entropy_sum(self.model, hidden[:, :S], labels[:, :S]) / (B * (S - 1))
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
        hidden = self.model(x, SequenceBatch(positions, causal_mask(S, x.device)), None)
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


# ---------------------------------------------------------------- the optimisation loop
@dataclasses.dataclass(frozen=True, slots=True)
class TrainSettings:
    """Optimiser settings of one run (`lr_at`: linear warmup, then cosine decay to 10% of lr)."""
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 250

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------- distributed
@dataclasses.dataclass(frozen=True, slots=True)
class DistributedContext:
    """This process's rank, the world size and its device (world 1: no torch.distributed)."""
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # init_distributed created the process group, so shutdown destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device) -> DistributedContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistributedContext(0, 1, torch.device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistributedContext(dist.get_rank(), world, dev, owns)


def barrier(d: DistributedContext) -> None:
    if d.world > 1:
        dist.barrier()


@contextlib.contextmanager
def distributed(device: str | torch.device):
    """`init_distributed` for the duration of a `with` block, then `shutdown_distributed`."""
    d = init_distributed(device)
    try:
        yield d
    finally:
        shutdown_distributed(d)


def shutdown_distributed(d: DistributedContext) -> None:
    """Destroys the process group if `init_distributed` made it (exiting without this can abort
    a rank whose communication threads are still alive)."""
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train(objective: nn.Module, model: Decoder, tokens: torch.Tensor, s: TrainSettings, out_dir: Path,
          resume: bool, d: DistributedContext, progress: bool) -> dict:
    """Runs `s.steps` optimiser steps of `objective` (returns loss or (loss, ce_ar, ce_diff))."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    ckpt = ckpt_dir / "state.pt"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), fused=d.device.type == "cuda")
    start, history, elapsed = 0, [], 0.0
    if ckpt.exists():
        if not resume:
            raise FileExistsError(f"{ckpt} exists: pass resume=True (--resume) to continue it, or remove it")
        state = torch.load(ckpt, map_location=d.device, weights_only=False)
        if state["settings"] != dataclasses.asdict(s):
            raise ValueError(f"{ckpt} was written with settings {state['settings']}, "
                             f"which differ from this run's {dataclasses.asdict(s)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state["elapsed"]
        torch.set_rng_state(state["rng"].cpu())
        log.info("resuming from %s at step %d", ckpt, start)
    elif resume:
        log.info("no checkpoint at %s: starting from step 0", ckpt)

    wrapped = objective
    if d.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            objective, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                else contextlib.nullcontext())
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * d.world
    bar = None
    if progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=s.steps, initial=start, unit="step", dynamic_ncols=True)

    def save(step: int) -> None:
        if d.main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "history": history, "elapsed": elapsed, "rng": torch.get_rng_state(),
                        "settings": dataclasses.asdict(s)}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
        barrier(d)

    resumed_elapsed = elapsed
    model.train()
    for step in range(start, s.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = s.lr_at(step)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(s.grad_accum):
            g = torch.Generator().manual_seed(
                s.seed * 1_000_003 + (step * s.grad_accum + micro) * d.world + d.rank)
            x = sample_windows(tokens, s.batch_size, s.seq_len, g).to(d.device)
            sync = (wrapped.no_sync() if d.world > 1 and micro < s.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    out = wrapped(x)
                parts = {"loss": out[0], "ar": out[1], "diff": out[2]} if isinstance(out, tuple) else {
                    "loss": out, "ar": out}
                (parts["loss"] / s.grad_accum).backward()
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float() / s.grad_accum
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        means = torch.stack(list(sums.values()))
        if d.world > 1:
            dist.all_reduce(means)
            means /= d.world
        losses = dict(zip(sums, means.tolist()))
        elapsed += time.perf_counter() - t0
        history.append({"step": step + 1, "lr": s.lr_at(step), "grad_norm": grad_norm,
                        **{k: round(v, 5) for k, v in losses.items()}})
        rate = tokens_per_step * (step + 1 - start) / max(elapsed - resumed_elapsed, 1e-9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k != "loss"} | {"tok/s": f"{rate:,.0f}"})
        elif d.main and ((step + 1) % 50 == 0 or step + 1 == s.steps):
            log.info("step %d/%d %s", step + 1, s.steps, " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
        if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
            save(step + 1)
    if bar is not None:
        bar.close()
    save(s.steps)
    model.eval()
    return {"steps": s.steps, "train_tokens": tokens_per_step * s.steps, "train_seconds": round(elapsed, 1),
            "final": history[-1] if history else {}, "history_every_50": history[49::50]}
