"""What the engine schedules: one `Sequence` per (prompt, sample), grouped for a shared
prefill, and the `Request` they came in.

Design decisions:
- A Sequence is CPU bookkeeping only: its tokens, log-probs and provenance (a `Completion`,
  which is what the caller gets back), its sampling params (its request's), its randomness key,
  its KV slot and its finish reason. Its device state between steps (the drafts of its next
  step and the distributions they were drawn from) lives in the runner, indexed by its slot.
- The committed length of a running sequence (what its slot's cache holds) is derived, never
  stored: the prompt plus every generated token but the last, which is the pending d_0.
- A `PromptGroup` is the samples of one prompt that are admitted together and share one
  prefill; the scheduler splits a group when only part of it fits the free slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..params import Completion, FinishReason, SamplingParams
from .history import Track
from .lookup import NgramIndex


@dataclass
class GenerationStats:
    """Counters of one request (or of everything an engine has run, for metrics)."""
    sampler: str = ""
    rows: int = 0
    forward_passes: int = 0            # engine forwards this request took part in
    row_forward_passes: int = 0        # sum over rows of the forwards each row took part in
    generated_tokens: int = 0
    prefill_seconds: float = 0.0       # arrival to first token of the last row to start
    decode_seconds: float = 0.0        # the rest, to the last row's end
    draft_attempts: list[int] = field(default_factory=list)  # per draft position 1..k-1
    draft_accepts: list[int] = field(default_factory=list)
    level_choices: dict[str, int] = field(default_factory=dict)  # decode steps by level set ("ar", "1", ...)
    # decode row-steps by the source of the drafts they verified ("model", "history", "lookup",
    # "none"): [row-steps, drafts offered, drafts accepted]
    draft_sources: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(self.row_forward_passes, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / n if n else 0.0 for a, n in zip(self.draft_accepts, self.draft_attempts)]

    def add(self, other: GenerationStats) -> None:
        """Accumulates another request's counters (lifetime totals)."""
        self.rows += other.rows
        self.forward_passes += other.forward_passes
        self.row_forward_passes += other.row_forward_passes
        self.generated_tokens += other.generated_tokens
        for label, n in other.level_choices.items():
            self.level_choices[label] = self.level_choices.get(label, 0) + n
        for source, counts in other.draft_sources.items():
            mine = self.draft_sources.setdefault(source, [0, 0, 0])
            self.draft_sources[source] = [a + b for a, b in zip(mine, counts)]
        width = max(len(self.draft_attempts), len(other.draft_attempts))
        for name in ("draft_attempts", "draft_accepts"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, [a + b for a, b in zip(mine + [0] * (width - len(mine)),
                                                        theirs + [0] * (width - len(theirs)))])


@dataclass(eq=False)
class Request:
    request_id: str
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    arrived_at: float = field(default_factory=time.perf_counter)
    arrived_wall: float = field(default_factory=time.time)  # the same instant, wall clock
    started_at: float | None = None     # its first group was admitted (perf_counter)
    num_unfinished: int = 0

    @property
    def done(self) -> bool:
        return self.num_unfinished == 0

    def wall(self, perf_time: float) -> float:
        """A perf_counter time of this request as wall-clock time (one clock for its timings)."""
        return self.arrived_wall + (perf_time - self.arrived_at)


@dataclass(eq=False)
class Sequence:
    request: Request
    prompt: list[int]
    key: int                     # randomness key (sampling.row_key)
    out: Completion              # prompt/sample index, tokens, log-probs, provenance, finish reason
    slot: int = -1               # KV slot while admitted, else -1
    first_token_at: float | None = None  # perf_counter time its first token was sampled
    lookup: NgramIndex | None = None     # its history's n-grams, once a step looked up drafts
    history: Track | None = None         # its completion in its prompt's history (history drafts)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def drafts(self) -> bool:
        """Whether this row carries TiDAR drafts (an `ar` row never does)."""
        return self.request.params.sampler != "ar"

    @property
    def num_committed(self) -> int:
        """Tokens in its slot's cache once running: the prompt and all generated tokens but
        the pending last one (d_0 of the next step)."""
        return len(self.prompt) + len(self.out.token_ids) - 1

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def finish(self, reason: FinishReason) -> None:
        self.out.finish_reason = reason


@dataclass(eq=False)
class PromptGroup:
    """Samples of one prompt admitted together: the prompt is prefilled once, into the first
    sequence's slot, in chunks of at most the scheduler's token budget, then copied to the rest."""
    prompt: list[int]
    sequences: list[Sequence]
    num_prefilled: int = 0

    @property
    def request(self) -> Request:
        return self.sequences[0].request

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.num_prefilled
