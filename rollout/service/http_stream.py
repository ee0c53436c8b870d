"""What an HTTP response shows of a trajectory (`Choice`), and a streamed response's chunks: each
engine step's committed tokens as they are made, as vLLM streams, with the same final content as
the whole response (`StreamedChoices`).

Design decisions:
- A chunk is a Choice holding only what is new: token ids, log-probs (and top-N, provenance) of
  the new tokens, and the text they add. Concatenating a choice's chunks gives the whole
  response's choice.
- Text is sent only while it is final: a chunk is held back while the text so far ends in an
  incomplete character (U+FFFD from a partial UTF-8 sequence), ends with the beginning of a stop
  string, or holds one (the trajectory's finished record then decides where it is cut). The
  tokens that made held-back text wait with it, so token ids and text stay in step.
- A trajectory's last tokens come with its finished record, never as a delta: the stop token or
  string that ended it is left out of the text as in the whole response.
- After a replica failure the router runs the missing samples again; if a sample's new tokens
  do not extend what was already streamed, the stream ends with an error rather than send a
  choice that contradicts itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MIN_LOGPROB = -9999.0  # what JSON responses say for log-prob -inf (vLLM's value)


@dataclass
class Choice:
    """A trajectory (or, streamed, the new part of one) after stop strings, in the caller's numbering."""
    index: int
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    extras: dict = field(default_factory=dict)   # policy_versions, from_draft, behavior_logprobs
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: top-N (id, log-prob)
    finish_reason: str | None = "length"  # None: a streamed chunk of a choice still running
    stop_reason: int | str | None = None
    text: str = ""
    opening: bool = True  # the first chunk of its choice (a whole choice is its own first chunk)


def json_logprobs(logprobs: np.ndarray) -> list:
    """Log-probs as JSON can carry them: probability zero (-inf, from top-k / top-p / min-p or a
    token the target policy excludes) becomes vLLM's -9999.0, and so would anything non-finite.
    Every log-prob an HTTP response holds passes through here."""
    return np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=MIN_LOGPROB, neginf=MIN_LOGPROB,
                         posinf=0.0).clip(MIN_LOGPROB, None).tolist()


def record_arrays(r: dict) -> dict:
    """A wire record's per-token fields as JSON-ready lists (log-probs through json_logprobs)."""
    top = r.get("top_token_ids")
    return dict(token_ids=r["token_ids"].tolist(), logprobs=json_logprobs(r["logprobs"]),
                top=[list(zip(ids, lps)) for ids, lps in zip(top.tolist(), json_logprobs(r["top_logprobs"]))]
                if top is not None and top.size else [],
                extras=dict(policy_versions=r["policy_versions"].tolist(),
                            from_draft=r["from_draft"].astype(bool).tolist(),
                            behavior_logprobs=json_logprobs(r["behavior_logprobs"])))


@dataclass
class _Progress:
    received: dict            # record_arrays of every delta so far, concatenated
    sent_tokens: int = 0
    sent_text: str = ""


class StreamedChoices:
    """Turns a request's token deltas and finished choices into chunks (see the module docstring).
    `decode(ids)` is the text of ids as the response shows it; `stops` the request's stop strings."""

    def __init__(self, n: int, decode: Callable[[list[int]], str] | None, stops: list[str]):
        self.n, self.decode, self.stops = n, decode, stops
        self.progress: dict[int, _Progress] = {}

    def delta(self, r: dict) -> Choice | None:
        """A Tokens record -> the chunk to send now, or None while it is held back."""
        index = r["prompt_index"] * self.n + r["sample_index"]
        new = record_arrays(r)
        p = self.progress.setdefault(index, _Progress(dict(token_ids=[], logprobs=[], top=[], extras={
            k: [] for k in new["extras"]})))
        if r["start"] != len(p.received["token_ids"]):
            return None  # not the continuation of what this choice received (a re-dispatched sample)
        for k in ("token_ids", "logprobs", "top"):
            p.received[k] += new[k]
        for k, v in new["extras"].items():
            p.received["extras"][k] += v
        text = self.decode(p.received["token_ids"]) if self.decode is not None else ""
        if not self._final_text(text):
            return None
        chunk = self._chunk(index, r["prompt_index"], p, len(p.received["token_ids"]), p.received, text)
        p.sent_tokens, p.sent_text = len(p.received["token_ids"]), text
        return chunk

    def final(self, c: Choice) -> Choice:
        """A finished choice -> its last chunk: what was not streamed yet, and the finish reason."""
        p = self.progress.pop(c.index, None)
        if p is None or p.sent_tokens == 0:
            return c
        whole = dict(token_ids=c.token_ids, logprobs=c.logprobs, top=c.top, extras=c.extras)
        if c.token_ids[:p.sent_tokens] != p.received["token_ids"][:p.sent_tokens] or not c.text.startswith(p.sent_text):
            raise RuntimeError(f"choice {c.index}: its replica failed mid-stream and the sample run again does not "
                               "continue the tokens already streamed; the stream ends here")
        chunk = self._chunk(c.index, c.prompt_index, p, len(c.token_ids), whole, c.text)
        chunk.finish_reason, chunk.stop_reason = c.finish_reason, c.stop_reason
        return chunk

    @staticmethod
    def _chunk(index: int, prompt_index: int, p: _Progress, end: int, arrays: dict, text: str) -> Choice:
        s = p.sent_tokens
        return Choice(index, prompt_index, token_ids=arrays["token_ids"][s:end], logprobs=arrays["logprobs"][s:end],
                      top=arrays["top"][s:end], extras={k: v[s:end] for k, v in arrays["extras"].items()},
                      finish_reason=None, text=text[len(p.sent_text):], opening=s == 0)

    def _final_text(self, text: str) -> bool:
        """Whether `text` can be sent: no partial character at its end, no stop string in it or
        beginning at its end."""
        if text.endswith("\ufffd"):
            return False
        for stop in self.stops:
            if stop in text or any(text.endswith(stop[:k]) for k in range(1, len(stop))):
                return False
        return True
