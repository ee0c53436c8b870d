"""Lookup drafts: a row's next tokens guessed from its own history (prompt lookup / n-gram
drafting), a second draft source beside the model's diffusion drafts.

Design decisions:
- The guess: find the latest earlier occurrence of the row's last n tokens (n = MAX_NGRAM down
  to 1, longest match first) and propose the tokens that followed it. Code, structured data
  and a small model's greedy loops repeat themselves, and such drafts then cost no forward at
  all: a lookup step is verify-only (`DraftShape.lookup`: the row's last token plus up to d - 1
  drafts, no mask blocks), d tokens per row against k (1 + m) for a TiDAR step.
- Exactness: a lookup draft is a point mass q = 1[d], so the lossless rule accepts it with
  probability min(1, p(d)) and resamples from norm(max(0, p - q)), which is p with d removed:
  the output is still distributed as AR sampling from p. The draft depends only on tokens
  already committed, never on the uniforms that judge it. Only `lossless` rows take lookup
  drafts: the mixed sampler's target mixes q in, which a point mass would dominate.
- Incremental: each row's index maps every n-gram of its history that has a continuation to
  the continuation's start, updated with the tokens appended since the last query, so a step
  costs O(MAX_NGRAM) dictionary operations per row, not a scan of the history.
"""

from __future__ import annotations

MAX_NGRAM = 3  # longest suffix matched


class NgramIndex:
    """The n-grams (n <= MAX_NGRAM) of one token history, each mapped to where the tokens after
    its latest occurrence start."""

    __slots__ = ("tokens", "_after")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            j = len(self.tokens) - 1  # t now continues every n-gram ending at j - 1
            for n in range(1, MAX_NGRAM + 1):
                if j - n < 0:
                    break
                self._after[tuple(self.tokens[j - n:j])] = j

    def drafts(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the longest
        matching suffix (n <= MAX_NGRAM); [] when no suffix occurred before."""
        h = self.tokens
        for n in range(min(MAX_NGRAM, len(h) - 1), 0, -1):
            start = self._after.get(tuple(h[-n:]))
            if start is not None:
                return h[start:start + count]
        return []


def lookup_drafts(index: NgramIndex | None, prompt: list[int], generated: list[int],
                  count: int) -> tuple[NgramIndex, list[int]]:
    """A row's index (built on first use) brought up to its history, prompt then generated
    tokens (which only grow), and up to `count` drafts from it."""
    index = index or NgramIndex()
    seen = len(index.tokens)
    if seen < len(prompt):
        index.extend(prompt[seen:])
        seen = len(prompt)
    index.extend(generated[seen - len(prompt):])
    return index, index.drafts(count)
