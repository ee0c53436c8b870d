"""What a caller asks for (`SamplingParams`) and what it gets back (`Completion`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

SAMPLERS = ("lossless", "mixed", "ar")
MAX_LOGPROBS = 20  # top-N alternatives per token a request may ask for (vLLM's default limit)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Per-request decoding settings.

    sampler: "lossless" (TiDAR, exact), "mixed" (TiDAR verified against
        softmax(w*l_AR + (1-w)*l_diff): faster, not exact; w = 1 is lossless), "ar" (one token
        per forward through the same engine).
    temperature 0 is greedy; top_k 0 disables top-k; top_p 1 disables top-p; min_p 0 disables
    min-p. The same processing applies to the target and the draft distributions. At temperature 0 there is nothing to
    relax, so `mixed` verifies against the greedy AR target and equals `lossless`.
    seed: None draws fresh entropy; an int makes the whole call reproducible.
    seed_stable: every token is the Gumbel-max sample argmax_v(log p(v) + g(seed, position, v))
        and a draft is accepted exactly when it equals that token (`sampling.verify_coupled`),
        so `lossless` gives, for a seed, the tokens `ar` gives, whatever the drafts, step shapes,
        batch or load (wherever the logits are the same: see docs/ARCHITECTURE.md). False: the
        residual rule min(1, p/q) with inverse-CDF sampling (exact too, and accepts a little
        more, but which tokens a seed gives depends on the step shapes). `mixed` rows verify
        against their mixed target the same way.
    logprobs: how many most likely alternatives (ids and log-probs under the same policy) to
        return per generated token, besides the sampled token's own log-prob; 0: none.
    """
    sampler: str = "lossless"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 64
    n: int = 1
    seed: int | None = None
    seed_stable: bool = True
    mix_weight: float = 0.5
    stop_token_ids: tuple[int, ...] = field(default=())
    logprobs: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        if not 0 <= self.mix_weight <= 1:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if not isinstance(self.seed_stable, bool):
            raise ValueError(f"seed_stable must be true or false, got {self.seed_stable!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class FinishReason(str, Enum):
    """Why a trajectory ended. A str enum: compares equal to its value ("stop", ...)."""
    STOP = "stop"        # a stop token was sampled (it is the last token)
    LENGTH = "length"    # max_tokens reached
    ABORT = "abort"      # aborted (by the caller, a deadline or an abort-mode weight swap)

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class Completion:
    """One sampled trajectory.

    logprobs: log p_target(token) under the AR policy after temperature/top-k/top-p (what a
        trainer uses as the old/behaviour log-prob for lossless and ar).
    behavior_logprobs: log-prob under the distribution the token was actually drawn from; equals
        `logprobs` except for `mixed` at temperature > 0.
    from_draft: per token, True if it was an accepted draft, False if sampled by the verifier.
    policy_versions: per token, the weight version of the engine that sampled it.
    finish_reason: "stop", "length" or "abort".
    top_token_ids / top_logprobs: per token, the `SamplingParams.logprobs` most likely ids under
        the same policy as `logprobs` and their log-probs, most likely first (empty when 0).
    """
    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    behavior_logprobs: list[float] = field(default_factory=list)
    from_draft: list[bool] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_forward_passes: int = 0
    top_token_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(self.num_forward_passes, 1)


def validate_prompts(prompts: list[list[int]], params: SamplingParams, vocab_size: int, context: int,
                     mask_token_id: int, context_name: str = "max_position_embeddings") -> None:
    """Raises ValueError naming the offending prompt / field and the limit. Sizes are checked
    before contents, and contents in one vectorised pass per prompt, so a huge request costs
    little before it is refused."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt_token_ids must be a non-empty list of prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt_token_ids[{i}] is empty")
        if len(p) + params.max_tokens > context:
            raise ValueError(
                f"prompt_token_ids[{i}] has {len(p)} tokens; with max_tokens={params.max_tokens} "
                f"that exceeds the model's context of {context} ({context_name})")
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.dtype.kind not in "iu":
            bad = next(t for t in p if not isinstance(t, numbers.Integral))
            raise ValueError(f"prompt_token_ids[{i}] has token id {bad!r} outside the vocabulary [0, {vocab_size})")
        outside = (ids < 0) | (ids >= vocab_size)
        if outside.any():
            raise ValueError(f"prompt_token_ids[{i}] has token id {int(ids[outside.argmax()])} outside the "
                             f"vocabulary [0, {vocab_size})")
        if (ids == mask_token_id).any():
            raise ValueError(f"prompt_token_ids[{i}] contains the mask token id {mask_token_id}")
    bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad_stop:
        raise ValueError(f"stop_token_ids has {bad_stop[0]} outside the vocabulary [0, {vocab_size})")
