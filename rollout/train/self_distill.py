"""Training batches that mix corpus windows with the policy's own samples (self-distillation).

Lossless acceptance is 1 - TV(p, q) against the model's own AR distribution p. Trained on corpus
text alone, the draft distribution q learns the corpus where p says something else, so
`rollout convert --self-distill F` makes a fraction F of every batch out of sequences the model
sampled itself: a corpus prompt of `prompt_len` tokens continued by our engine's AR sampler at
`temperature` (1: the distribution RL samples from) up to the window length. `HybridLoss`
trains the diffusion half on those rows (soft targets: the AR half's p at each position) and
the AR half on the corpus rows only, so p does not drift towards its own samples.

Design decisions:
- Samples come in rounds: every `refresh_every` optimiser steps a pool of `pool` sequences is
  sampled with the current weights (`Engine` over the training model itself, no copy), and each
  step draws its self rows from the pool at random. Round r's prompts and sampling seed are
  functions of (seed, r, rank), so a run is reproducible; a resumed run resamples the pool it
  was using (same prompts and seed, the weights it resumed with).
- The engine samples with no stop token (training windows are packed text: EOS is an ordinary
  token inside a window, as in the corpus).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..config import EngineConfig, TidarConfig
from ..engine.engine import Engine
from ..model.decoder import Decoder
from ..params import SamplingParams
from .corpus import sample_windows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class SelfDistillSettings:
    """fraction: share of each batch's rows that are the policy's own samples (0 < f <= 1).
    prompt_len: corpus tokens each sample continues. pool: sequences sampled per round.
    refresh_every: optimiser steps between rounds. temperature: of the sampling policy."""
    fraction: float = 0.5
    prompt_len: int = 32
    pool: int = 64
    refresh_every: int = 25
    temperature: float = 1.0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"self-distill fraction must be in (0, 1], got {self.fraction}")
        for name in ("prompt_len", "pool", "refresh_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"self-distill {name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"self-distill temperature must be a finite number >= 0, got {self.temperature}")

    def self_rows(self, batch_size: int) -> int:
        return max(1, round(self.fraction * batch_size))


def sample_continuations(model: Decoder, tidar: TidarConfig, prompts: torch.Tensor, new_tokens: int,
                         temperature: float, seed: int) -> torch.Tensor:
    """prompts [N, P] -> [N, P + new_tokens]: each prompt continued by the AR policy (no stop)."""
    N, P = prompts.shape
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        engine = Engine(model, tidar, device, dtype,
                        EngineConfig(max_num_seqs=N, max_model_len=P + new_tokens, max_prefill_tokens=N * P))
        params = SamplingParams(sampler="ar", temperature=temperature, max_tokens=new_tokens, seed=seed)
        with torch.no_grad():
            out = engine.generate(prompts.tolist(), params)
    finally:
        model.train(was_training)
    completions = torch.tensor([c[0].token_ids for c in out], dtype=torch.long)
    return torch.cat((prompts.cpu(), completions), dim=1)


class MixedBatches:
    """The training loop's batch source: __call__(step, micro, generator) -> (x [B, S], {"ar_rows"}),
    the first B - n rows corpus windows, the last n the policy's own samples."""

    def __init__(self, model: Decoder, tidar: TidarConfig, tokens: torch.Tensor, batch_size: int, seq_len: int,
                 settings: SelfDistillSettings, seed: int = 0, rank: int = 0):
        if settings.prompt_len >= seq_len:
            raise ValueError(f"self-distill prompt_len must be < seq_len={seq_len}, got {settings.prompt_len}")
        self.model, self.tidar, self.tokens = model, tidar, tokens
        self.batch_size, self.seq_len, self.settings = batch_size, seq_len, settings
        self.seed, self.rank = seed, rank
        self.self_rows = min(settings.self_rows(batch_size), batch_size)
        self.round, self.pool = -1, None
        self.sample_seconds, self.sampled_tokens = 0.0, 0

    def refresh(self, round_: int) -> None:
        s = self.settings
        key = (self.seed * 1_000_003 + round_) * 1_009 + self.rank
        g = torch.Generator().manual_seed(key)
        prompts = sample_windows(self.tokens, s.pool, s.prompt_len, g)
        t0 = time.perf_counter()
        self.pool = sample_continuations(self.model, self.tidar, prompts, self.seq_len - s.prompt_len,
                                         s.temperature, seed=key)
        self.sample_seconds += time.perf_counter() - t0
        self.sampled_tokens += s.pool * (self.seq_len - s.prompt_len)
        self.round = round_
        log.debug("self-distill round %d: %d sequences in %.1f s", round_, s.pool, time.perf_counter() - t0)

    def __call__(self, step: int, micro: int, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        round_ = step // self.settings.refresh_every
        if round_ != self.round:
            self.refresh(round_)
        corpus_rows = self.batch_size - self.self_rows
        x = sample_windows(self.tokens, corpus_rows, self.seq_len, g) if corpus_rows else None
        picks = torch.randint(0, self.pool.shape[0], (self.self_rows,), generator=g)
        own = self.pool[picks]
        x = own if x is None else torch.cat((x, own))
        return x, {"ar_rows": corpus_rows}

    def summary(self) -> dict:
        return {**dataclasses.asdict(self.settings), "self_rows_per_batch": self.self_rows,
                "rounds": self.round + 1, "sampled_tokens": self.sampled_tokens,
                "sample_seconds": round(self.sample_seconds, 1)}
