"""History drafts: a row's next tokens guessed from the other completions of its prompt.

An RL trainer rolls out the same prompts epoch after epoch, n samples each, with a policy that
moves a little per step; as it sharpens, a prompt's new completions repeat its old ones and
each other. The store keeps, per prompt (keyed by its token ids), the completions of its recent
rollouts: finished samples of earlier requests and the growing samples of the running group.

Design decisions:
- Two indexes per prompt, both grown token by token as completions grow (no rebuild per
  step): a prefix trie of the completions (each node counts the completions through it), and
  an n-gram table (the last n <= MAX_CONTEXT tokens -> counts of the token that followed).
  Lazily: a committed token is only appended to its completion's list (every row, every
  step); the indexes take in what is new when the prompt is next asked for a draft
  (`PromptHistory.catch_up`): the asking row's own completion in full, then the others,
  newest first, up to CATCH_UP_TOKENS per proposal (the rest at the next ones), and at most a
  `limit` the scheduler sets per prompt and step (k tokens per row of it plus its rows' part of
  CATCH_UP_TOKENS: what a step can commit, so looking up every step keeps up). An engine
  whose policy takes AR steps asks for none, so there the store costs a list append per
  row-step (indexing each token as it came cost ~3% of an AR rollout at batch 64 on the CPU),
  and the limits keep a rare look-up (an exploring step) from indexing what piled up at once
  (at batch 64: 64 rows x up to 64 tokens each, ~5-15x an AR step with the collections it
  set off). A row whose own tokens still wait finds its trie node by reading the trie.
- The trie is flat (node ids, `PromptHistory`): the indexes are dicts and lists of ints,
  which the cyclic garbage collector does not track.
- Proposal (`PromptHistory.propose`): first the aligned prefix: where other completions began
  exactly as the row's output so far, follow the trie; else (and where the trie runs out) the
  longest suffix of the row's output that occurred in the prompt's completions. At each token
  the continuation most completions share wins; the draft stops when the share of completions
  agreeing, chained along the draft, falls below MIN_SUPPORT, or at the asked length. The
  drafting policy truncates it further to what the step verifies (`drafting.py`).
- Exactness: drafts are point masses verified by the lossless rule (as lookup drafts are,
  `lookup.py`), so any draft that does not depend on the uniforms judging it keeps the output
  distributed as AR sampling. Uniforms are keyed by (row key, position, purpose), so a
  completion sampled with the same row key (a request repeated with the same seed) would be
  such a dependence: `HistoryStore.begin` drops the prompt's completions that share a key with
  the new rows. Siblings have their own keys; their tokens depend on this row only through
  tokens it has committed.
- Versions: a prompt keeps the completions of its KEEP_VERSIONS newest policy versions (by
  the version of each completion's last token). An RL run may come back to a prompt only after
  many weight updates; a few epochs back still resemble the current policy (it moves a
  little per step) and add votes to the shared continuations, while older ones mostly add
  stale votes and memory. At most MAX_COMPLETIONS per prompt (the newest).
- Memory: bounded by `budget_bytes` (`EngineConfig.history_mib`), counted as stored tokens
  times BYTES_PER_TOKEN (an upper estimate of the trie node, n-gram entries and list slot one
  token adds; see tests/test_history.py), least recently used prompts evicted first. Cleared
  when the weights are reset to the base model (`Engine.load_weights(reset=True)`).
"""

from __future__ import annotations

import math
from collections import OrderedDict

MAX_CONTEXT = 4        # longest suffix matched in the n-gram table
MIN_SUPPORT = 0.2      # a draft stops where fewer completions (chained share) agree
KEEP_VERSIONS = 3      # policy versions per prompt whose completions are kept
MAX_COMPLETIONS = 64   # completions per prompt (the newest)
BYTES_PER_TOKEN = 2048  # memory accounted per stored token (an upper estimate, measured in the tests)
CATCH_UP_TOKENS = 64    # tokens of other completions indexed per proposal, at most (see the module docstring)
ROOT = 0                # the trie's root node id


class Track:
    """One completion in a prompt's history: its tokens (they only grow), the version of its
    last token, its row key, its node in the prompt's trie (an id) and how many of its tokens
    the indexes hold (the rest wait for `PromptHistory.catch_up`)."""
    __slots__ = ("tokens", "version", "key", "node", "prompt", "indexed")

    def __init__(self, prompt: PromptHistory, key: int, version: int) -> None:
        self.prompt, self.key, self.version = prompt, key, version
        self.tokens: list[int] = []
        self.node = ROOT
        self.indexed = 0


class Proposal:
    """A history draft: its tokens and how it was found ("aligned": the trie; else the length
    of the suffix matched in the n-gram table)."""
    __slots__ = ("tokens", "match")

    def __init__(self, tokens: list[int], match: str) -> None:
        self.tokens, self.match = tokens, match


class PromptHistory:
    """The completions of one prompt and their two indexes. The trie is flat: node ids index
    `kids` (token -> child id) and `counts` (completions through the node), so the indexes are
    dicts and lists of ints, which the cyclic garbage collector does not track: a node object
    per token made the store most of what the engine added to the collector's work, and a full
    collection (it walks every tracked object of the process, ~0.2 s here) fell on a lossless
    engine's steps more often than on our AR sampler's."""

    def __init__(self) -> None:
        self.tracks: list[Track] = []
        self.kids: list[dict[int, int]] = [{}]  # ROOT's, then every node's: token -> child id
        self.counts: list[int] = [0]
        self.ngrams: dict[tuple[int, ...], dict[int, int]] = {}
        self.num_tokens = 0
        self.num_indexed = 0  # tokens the indexes took in so far (a look-up step's share counts them)
        self.held = True  # in the store (its tokens counted against the budget)
        self.stale: list[Track] = []  # tracks with tokens the indexes do not hold yet

    def add(self, key: int, version: int) -> Track:
        track = Track(self, key, version)
        self.tracks.append(track)
        self.counts[ROOT] += 1
        return track

    def extend(self, track: Track, tokens: list[int], version: int) -> None:
        """Appends a completion's new tokens (indexed at the next `catch_up`)."""
        if tokens:
            if track.indexed == len(track.tokens):
                self.stale.append(track)
            track.tokens.extend(tokens)
            self.num_tokens += len(tokens)
        track.version = version

    def catch_up(self, first: Track | None = None, budget: int | None = None, limit: int | None = None) -> None:
        """Indexes `first`'s new tokens, then the other completions', newest first, up to
        `budget` tokens of the others (None: all of them); `limit`: at most this many tokens in
        all (None: no limit; a look-up step's share, see the scheduler)."""
        rest = [t for t in self.stale if t is not first]
        left = math.inf if limit is None else limit
        if first is not None and first.indexed < len(first.tokens):
            left -= self._index(first, left)
            if first.indexed < len(first.tokens):
                rest.append(first)  # the newest: first in line next time
        left = min(math.inf if budget is None else budget, left)
        waiting = []
        for track in reversed(rest):
            if left > 0:
                left -= self._index(track, left)
            if track.indexed < len(track.tokens):
                waiting.append(track)
        self.stale = waiting[::-1]

    def _index(self, track: Track, most: float) -> int:
        """Adds up to `most` of `track`'s tokens not yet indexed to both indexes; returns how many."""
        ngrams, kids, counts = self.ngrams, self.kids, self.counts
        h, node, start = track.tokens, track.node, track.indexed
        end = len(h) if most >= len(h) - start else start + int(most)
        for i in range(start, end):
            t = h[i]
            for n in range(1, min(MAX_CONTEXT, i) + 1):
                follow = ngrams.get(key := tuple(h[i - n:i]))
                if follow is None:
                    follow = ngrams[key] = {}
                follow[t] = follow.get(t, 0) + 1
            child = kids[node].get(t)
            if child is None:
                child = kids[node][t] = len(counts)
                kids.append({})
                counts.append(0)
            counts[child] += 1
            node = child
        track.node, track.indexed = node, end
        self.num_indexed += end - start
        return end - start

    def rebuilt(self, keep: list[Track]) -> PromptHistory:
        """A fresh history holding `keep` (the same Track objects, to be re-indexed): completions
        are dropped between requests, never per step."""
        fresh = PromptHistory()
        for old in keep:
            tokens, old.tokens, old.indexed = old.tokens, [], 0
            old.prompt, old.node = fresh, ROOT
            fresh.tracks.append(old)
            fresh.counts[ROOT] += 1
            fresh.extend(old, tokens, old.version)
        return fresh

    def _position(self, track: Track) -> tuple[int | None, int]:
        """`track`'s node at its whole output and whether the node counts the track itself:
        its own node when the indexes hold all of it, else reached from there by reading the
        trie (None: no other completion began so)."""
        node, kids = track.node, self.kids
        for t in track.tokens[track.indexed:]:
            node = kids[node].get(t)
            if node is None:
                break
        return node, int(track.indexed == len(track.tokens))

    def propose(self, track: Track, count: int, limit: int | None = None) -> Proposal | None:
        """Up to `count` tokens to follow `track`'s output: the aligned prefix, else the longest
        suffix match, the most shared continuation at each token (see the module docstring);
        `limit`: the most tokens its catch-up may index (None: its own new tokens and
        CATCH_UP_TOKENS of the others)."""
        if self.stale:
            self.catch_up(track, CATCH_UP_TOKENS, limit)
        out, kids, counts = track.tokens, self.kids, self.counts
        node, own = self._position(track)  # own: the row's own path ends at its node, not a continuation
        draft: list[int] = []
        match, support = "", 1.0
        while len(draft) < count:
            if node is not None and kids[node]:
                token, child = max(kids[node].items(), key=lambda kv: (counts[kv[1]], -kv[0]))  # ties: lowest id
                share = counts[child] / max(counts[node] - own, 1)
                match = match or "aligned"
                node, own = child, 0
            else:
                node = None
                ctx = out + draft
                token, share = None, 0.0
                for m in range(min(MAX_CONTEXT, len(ctx)), 0, -1):
                    follow = self.ngrams.get(tuple(ctx[-m:]))
                    if follow:
                        token, c = max(follow.items(), key=lambda kv: (kv[1], -kv[0]))
                        share = c / sum(follow.values())
                        match = match or str(m)
                        break
                if token is None:
                    break
            support *= share
            if support < MIN_SUPPORT:
                break
            draft.append(token)
        return Proposal(draft, match) if draft else None


class HistoryStore:
    """Per prompt, its recent completions (see the module docstring); least recently used
    prompts are evicted past `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.prompts: OrderedDict[tuple[int, ...], PromptHistory] = OrderedDict()
        self.num_tokens = 0  # over the prompts held

    @property
    def bytes(self) -> int:
        return self.num_tokens * BYTES_PER_TOKEN

    def begin(self, prompt: list[int], keys: list[int], version: int) -> list[Track]:
        """Tracks for new rows of `prompt` (their row keys), after dropping the prompt's
        completions that share a key with them, those of versions older than the
        KEEP_VERSIONS newest, and the oldest beyond MAX_COMPLETIONS."""
        pk = tuple(prompt)
        history = self.prompts.pop(pk, None) or PromptHistory()
        new = set(keys)
        versions = sorted({t.version for t in history.tracks} | {version})[-KEEP_VERSIONS:]
        keep = [t for t in history.tracks if t.key not in new and t.version >= versions[0]]
        keep = keep[max(len(keep) + len(keys) - MAX_COMPLETIONS, 0):]
        if len(keep) < len(history.tracks):
            self.num_tokens -= history.num_tokens
            history.held = False
            history = history.rebuilt(keep)
            self.num_tokens += history.num_tokens
        self.prompts[pk] = history  # the most recently used
        tracks = [history.add(key, version) for key in keys]
        self.evict()
        return tracks

    def extend(self, track: Track, tokens: list[int], version: int) -> None:
        """A row's newly committed tokens. A row whose prompt was evicted meanwhile keeps its own
        (no longer counted) history until it finishes."""
        track.prompt.extend(track, tokens, version)
        if track.prompt.held:
            self.num_tokens += len(tokens)

    def evict(self) -> None:
        """Least recently used prompts out until the store fits its budget."""
        while self.bytes > self.budget_bytes and self.prompts:
            _, history = self.prompts.popitem(last=False)
            history.held = False
            self.num_tokens -= history.num_tokens

    def clear(self) -> None:
        for history in self.prompts.values():
            history.held = False
        self.prompts.clear()
        self.num_tokens = 0

    def status(self) -> dict:
        return dict(history_prompts=len(self.prompts), history_tokens=self.num_tokens,
                    history_mib=round(self.bytes / 2 ** 20, 3))
