"""One optimisation loop (`train`) for conversion and pretraining, and its torchrun plumbing.

Design decisions:
- AdamW, warmup + cosine, gradient accumulation, bf16 autocast on CUDA (fp32 elsewhere), a
  checkpoint (model, optimizer, step, RNG) under out_dir/checkpoint/ that `resume=True`
  continues from. The batch of a step is a function of (seed, step, rank), so a resumed run
  sees the data it would have seen.
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..model.decoder import Decoder
from .corpus import sample_windows

# A batch source: (step, micro-batch, generator) -> (x [B, S], extra keyword arguments of the objective)
Batches = Callable[[int, int, torch.Generator], tuple[torch.Tensor, dict]]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"

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
          resume: bool, d: DistributedContext, progress: bool, batches: Batches | None = None) -> dict:
    """Runs `s.steps` optimiser steps of `objective` (returns loss or (loss, ce_ar, ce_diff)) on
    random windows of `tokens`, or on what `batches` gives (self-distillation)."""
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
            if batches is None:
                x, extra = sample_windows(tokens, s.batch_size, s.seq_len, g), {}
            else:
                x, extra = batches(step, micro, g)
            x = x.to(d.device)
            sync = (wrapped.no_sync() if d.world > 1 and micro < s.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    out = wrapped(x, **extra)
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
