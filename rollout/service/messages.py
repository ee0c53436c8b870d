"""What a replica streams to the router for one request, as small typed messages (Ray pickles
them). In order: `Stale` alone, or `Started`, then `Finished` for each engine step that
finished some of its trajectories (and, for a request that streams tokens, `Tokens` between
them), then `RequestDone` (or `Failed`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Stale:
    """The replica serves an older weight version than the router expects (e.g. Ray restarted
    it on the base weights): nothing was generated."""
    weight_version: int


@dataclass(frozen=True, slots=True)
class Started:
    """The request's first prompt was admitted to the engine (wall-clock time)."""
    at: float
    weight_version: int


@dataclass(frozen=True, slots=True)
class Finished:
    """Trajectories that finished in one engine step, as wire records (`wire.completion_to_record`)
    with `first_token_at` and `finished_at` wall-clock times."""
    records: list[dict]


@dataclass(frozen=True, slots=True)
class Tokens:
    """Tokens committed since the last Tokens message, per unfinished trajectory that has new
    ones: wire records of just those tokens, plus `start` (how many of the trajectory's tokens
    came before them). A trajectory's last tokens come in its Finished record, which holds all
    of them; deltas never carry the token that ended it."""
    records: list[dict]


@dataclass(frozen=True, slots=True)
class Failed:
    """The engine loop failed while running the request (logged on the replica); the request
    has been ended there."""
    error: str


@dataclass(frozen=True, slots=True)
class RequestDone:
    """The request's last message: its own counters (not shared with other requests)."""
    tokens_per_forward: float
    acceptance_by_position: list[float] = field(default_factory=list)
    generated_tokens: int = 0
