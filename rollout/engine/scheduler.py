"""The scheduler: CPU-only bookkeeping of which sequences run, wait or have finished.

Design decisions (nano-vllm's shape, TiDAR's needs):
- Queues: `waiting` prompt groups (FIFO), `prefilling` groups (slots held, prompt partly in the
  cache), `running` sequences (decoding). Groups are admitted between steps while the pool has
  free slots; the samples of a group admitted together share one prefill. When the head group
  needs more slots than are free, the samples that fit are admitted now as a group of their
  own (one more prefill of that prompt) and the rest keep their place: no slot idles while
  work waits, and no request can wait forever for a whole pool to drain.
- A step is either a prefill step (chunks of waiting prompts, at most `max_prefill_tokens`
  tokens in all, so a long prompt is prefilled over several steps) or a decode step over every
  running sequence. While both kinds of work exist they alternate: running rows never wait
  more than one prefill chunk between two of their own steps.
- Stop tokens, max_tokens, aborts and freeing slots are handled here, after the runner's
  forward; a finished or aborted sequence's slot is free for the next admission at once.
- The level set of each decode step (how many pre-draft blocks it carries) is chosen here, by
  the `DraftPolicy` (`drafting.py`), from what is running; so are the rows' point-mass draft
  candidates (history drafts, `history.py`; lookup drafts, `lookup.py`), looked up only when
  the policy asks (a step using them might win), and which rows take them (`DraftPolicy.assign`).
- Two admission brakes: `max_running_requests` (1 = the serial mode, for comparisons) and
  `admit_new` (off while a wait-mode weight swap drains the requests already started, so no
  request mixes weight versions).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass

from ..params import FinishReason
from .drafting import DraftPolicy, DraftShape, RowDraft, takes_lookup
from .history import CATCH_UP_TOKENS
from .lookup import lookup_drafts
from .kv_slots import SlotAllocator
from .sequence import PromptGroup, Request, Sequence

# A prefill step's dense in-step mask is rows x T x T booleans; keep it under this many.
PREFILL_MASK_BUDGET = 1 << 26


@dataclass
class PrefillChunk:
    group: PromptGroup
    start: int    # first prompt position of the chunk (what the cache already holds)
    length: int

    @property
    def last(self) -> bool:
        return self.start + self.length == len(self.group.prompt)


@dataclass
class Plan:
    """One step: prefill chunks, or the running sequences to decode (exactly one is non-empty)
    with the step's draft shape (None: an AR step; see `drafting.py`)."""
    prefill: list[PrefillChunk]
    decode: list[Sequence]
    started: list[Request]   # requests whose first group was admitted for this step
    shape: DraftShape | None = None
    context: float = 0.0     # mean committed length of the decoded rows
    lookup: list[list[int]] | None = None  # per decoded row, the point-mass drafts it verifies ([]: none)
    kinds: list[str] | None = None  # per decoded row, their kind ("history/aligned", "lookup"; "": none)


def history_kind(match: str) -> str:
    """The acceptance class suffix of a history draft: aligned prefix, or a suffix match of
    >= 3 ("long") or fewer ("short") tokens."""
    if match == "aligned":
        return "history/aligned"
    return "history/long" if int(match) >= 3 else "history/short"


class Scheduler:
    def __init__(self, num_slots: int, block_size: int, max_prefill_tokens: int,
                 max_running_requests: int | None = None, drafting: DraftPolicy | None = None):
        self.slots = SlotAllocator(num_slots)
        self.drafting = drafting
        self.block_size, self.max_prefill_tokens = block_size, max_prefill_tokens
        self.max_running_requests = max_running_requests
        self.waiting: deque[PromptGroup] = deque()
        self.prefilling: list[PromptGroup] = []
        self.running: list[Sequence] = []
        self.active: dict[str, Request] = {}  # started and not done
        self.admit_new = True
        self._prefill_turn = True

    # ------------------------------------------------------------------ queues
    def add(self, groups: list[PromptGroup]) -> None:
        self.waiting.extend(groups)

    @property
    def num_waiting_sequences(self) -> int:
        return sum(len(g.sequences) for g in self.waiting)

    @property
    def busy(self) -> bool:
        """Admitted work remains (prefills or running rows)."""
        return bool(self.prefilling or self.running)

    def schedule(self) -> Plan | None:
        """Admits what fits, then plans the next step; None when there is nothing to run."""
        started = self._admit()
        if self.prefilling and (self._prefill_turn or not self.running):
            self._prefill_turn = False
            return Plan(self._prefill_chunks(), [], started)
        if self.running:
            self._prefill_turn = True
            rows = list(self.running)
            context = sum(s.num_committed for s in rows) / len(rows)
            params = [s.params for s in rows]
            if not self.drafting:
                return Plan([], rows, started, None, context)
            lookups = functools.cache(lambda: self._lookup_drafts(rows))  # looked up once, if asked
            wants = self.drafting.wants_lookup(params)
            shape = self.drafting.choose(params, context, lookups if wants else None)
            # The rows take point-mass drafts in a verify-only step, or in a TiDAR step where
            # the policy looked at them (it might then stack them with the model's drafts).
            if wants and shape is not None and (shape.lookup or lookups.cache_info().currsize):
                assigned = self.drafting.assign(params, shape, lookups())
                if any(assigned):
                    return Plan([], rows, started, shape, context, [list(d.tokens) if d else [] for d in assigned],
                                [d.kind if d else "" for d in assigned])
            return Plan([], rows, started, shape, context)
        return None

    def _admit(self) -> list[Request]:
        started = []
        while self.waiting:
            group = self.waiting[0]
            request = group.request
            if request.request_id not in self.active:
                if not self.admit_new:
                    break
                if self.max_running_requests is not None and len(self.active) >= self.max_running_requests:
                    break
            free = self.slots.num_free
            if free == 0:
                break
            if free < len(group.sequences):  # admit what fits now; the rest keeps its place
                group.sequences, rest = group.sequences[:free], group.sequences[free:]
                self.waiting[0] = PromptGroup(group.prompt, rest)
            else:
                self.waiting.popleft()
            for seq, slot in zip(group.sequences, self.slots.allocate(len(group.sequences))):
                seq.slot = slot
            self.prefilling.append(group)
            if request.request_id not in self.active:
                self.active[request.request_id] = request
                request.started_at = time.perf_counter()
                started.append(request)
        return started

    def _prefill_chunks(self) -> list[PrefillChunk]:
        chunks, budget, longest = [], self.max_prefill_tokens, 0
        for group in self.prefilling:
            take = min(group.remaining, budget)
            if take <= 0:
                break
            width = max(longest, take + self.block_size)
            if chunks and (len(chunks) + 1) * width ** 2 > PREFILL_MASK_BUDGET:
                break
            chunks.append(PrefillChunk(group, group.num_prefilled, take))
            budget, longest = budget - take, width
        return chunks

    # ------------------------------------------------------------------ after a forward
    def prefilled(self, chunks: list[PrefillChunk]) -> None:
        """Records the chunks as in the cache; groups whose prompt is complete start running
        (their first tokens are appended by the caller)."""
        for chunk in chunks:
            chunk.group.num_prefilled += chunk.length
            if chunk.last:
                self.prefilling.remove(chunk.group)
                self.running.extend(chunk.group.sequences)

    def append(self, seq: Sequence, tokens: list[int], logprobs: list[float], behavior: list[float],
               from_draft: list[bool], version: int, top: list | None = None) -> bool:
        """Appends one step's tokens, cutting at a stop token or max_tokens. True when finished.
        top: None or per token (ids, log-probs) of the top alternatives."""
        c, params = seq.out, seq.params
        for i, (t, lp, blp, fd) in enumerate(zip(tokens, logprobs, behavior, from_draft)):
            if top is not None:
                c.top_token_ids.append(top[i][0])
                c.top_logprobs.append(top[i][1])
            c.token_ids.append(t)
            c.logprobs.append(lp)
            c.behavior_logprobs.append(blp)
            c.from_draft.append(fd)
            c.policy_versions.append(version)
            if t in params.stop_token_ids:
                seq.finish(FinishReason.STOP)
                return True
            if len(c.token_ids) >= params.max_tokens:
                seq.finish(FinishReason.LENGTH)
                return True
        return False

    def _lookup_drafts(self, rows: list[Sequence]) -> list[list[RowDraft]]:
        """Each row's point-mass draft candidates for this step (up to block length - 1 tokens;
        none for rows that cannot take them): its history draft (`history.py`) and its lookup
        drafts (its n-gram index brought up to date).

        The history indexes take in at most a step's share of what waits: per prompt, k tokens
        per row of it in the step (what a step can commit) and its rows' part of
        CATCH_UP_TOKENS, so a step that looks up every step keeps up with its rows, and a
        look-up after a long run of AR steps (at batch 64: 64 rows x up to 64 tokens waiting
        each) pays about a step's worth, not the whole gap at once."""
        out, count = [], self.block_size - 1
        share: dict[int, float] = {}  # id(prompt history) -> tokens it may still index this step
        if self.drafting.history:
            for s in rows:
                if s.history is not None:
                    key = id(s.history.prompt)
                    share[key] = share.get(key, 0.0) + self.block_size + CATCH_UP_TOKENS / len(rows)
        for s in rows:
            candidates = []
            if takes_lookup(s.params):
                if self.drafting.history and s.history is not None:
                    # No further than max_tokens: later drafts could only be cut off.
                    left = s.params.max_tokens - len(s.out.token_ids)
                    prompt, key = s.history.prompt, id(s.history.prompt)
                    indexed = prompt.num_indexed
                    proposal = prompt.propose(s.history, min(count, left), int(share[key]))
                    share[key] -= prompt.num_indexed - indexed
                    if proposal is not None:
                        candidates.append(RowDraft(tuple(proposal.tokens), history_kind(proposal.match)))
                if self.drafting.lookup:
                    s.lookup, drafts = lookup_drafts(s.lookup, s.prompt, s.out.token_ids, count)
                    if drafts:
                        candidates.append(RowDraft(tuple(drafts), "lookup"))
            out.append(candidates)
        return out

    def retire(self, finished: list[Sequence]) -> None:
        """Frees the slots of finished sequences and drops them from the running set."""
        if not finished:
            return
        gone = set(map(id, finished))
        self.running = [s for s in self.running if id(s) not in gone]
        self.slots.free([s.slot for s in finished if s.slot >= 0])
        for seq in finished:
            seq.slot = -1
            request = seq.request
            request.num_unfinished -= 1
            if request.done:
                self.active.pop(request.request_id, None)

    # ------------------------------------------------------------------ aborts
    def abort(self, request: Request) -> list[Sequence]:
        """Ends every unfinished sequence of `request` (finish reason abort, tokens kept) and
        frees its slots. Returns the sequences it ended."""
        ended = [s for s in request.sequences if not s.finished]
        if not ended:
            return []
        for seq in ended:
            seq.finish(FinishReason.ABORT)
        self.waiting = deque(g for g in self.waiting if g.request is not request)
        self.prefilling = [g for g in self.prefilling if g.request is not request]
        self.retire(ended)
        return ended

    def restart_prefills(self) -> None:
        """After a weight swap: prompts partly in the cache are prefilled again from the start."""
        for group in self.prefilling:
            group.num_prefilled = 0
