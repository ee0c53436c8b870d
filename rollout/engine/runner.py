"""The model runner: owns the device side of an engine (the KV pool, each slot's drafts and
draft distributions, the step layouts) and runs one forward per step.

Design decisions:
- The pool is allocated once, for the engine's life: K/V for `num_slots` slots of `slot_len`
  positions (`model/kv_cache.py`) plus, per slot, the drafts of its next step, the diffusion
  logits each was drawn from and how many are valid, and its randomness key. A step gathers
  its rows' state by slot and scatters the next state back; nothing is allocated per request.
- Inputs are built on the CPU from Sequence bookkeeping (slots, committed lengths, params) and
  copied once per step; the only device->host sync of a step is reading its sampled tokens.
- A batch may mix samplers and settings: per-row tensors (`sampling.RowSampling`). A decode
  step's shape (draft length and pre-draft levels) is the scheduler's choice (`drafting.py`):
  a TiDAR step of that shape, where `ar` rows simply carry no drafts (their draft positions
  hold mask tokens and are never verified), or a plain AR step (T = 1) that drops pending
  drafts. Drafts are stored per slot at the block length; a shorter step verifies a prefix.
- `compile=True`: a decode step is one torch.compile call (`ar_step`, `tidar_step`; dynamic
  shapes, batches padded to powers of two with sink rows) that takes the rows' slots and
  committed lengths (one host->device copy) and does the rest: token ids, positions and K/V
  write index from the slot state, the forward, the sampling half (`ar_sample`,
  `tidar_sample`: pure tensor functions) and the write of each slot's next drafts. Eagerly
  (or `fused` False) the runner builds the inputs (`step_inputs`, the same function
  `tidar_step` calls) and writes the state around the calls.
  Each forward's `StepBatch.packed` says the packed projections were checked current just
  before it (`Decoder.packs_current`), so compiled steps run them too.
  `cuda_graphs=True`: static-shape decode forwards, captured on a GPU (`step_graphs.py`).
- Logits only where needed: the k draft positions, and the one pre-drafted block each row
  continues from (chosen after verification), not every mask token.
- Randomness: `sampling.counter_uniforms` of (row key, position, purpose), on the device, one
  call per step for every decision the step can make; for seed-stable rows, `sampling.
  exponential_noise` of (row key, position, id), one call per step over the positions the step
  verifies (L+1..L+k) and may draft next (up to L+k+b-1): the same noise decides the verified
  token and the draft for a position, so drafts never change which tokens a seed gives.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, TidarConfig
from ..model.batch import StepBatch
from ..model.decoder import Decoder
from ..model.kv_cache import KVCache, state_widths
from ..model.triton_attention import triton_unavailable_reason
from ..params import SamplingParams
from ..sampling import (ACCEPT, DRAFT, RESAMPLE, RowSampling, counter_uniforms, exponential_noise,
                        mixed_logits, verify_coupled, verify_drafts)
from ..step_layout import DecodeLayout, ar_layout, decode_layout, prefill_layout
from .drafting import DraftShape
from .scheduler import PREFILL_MASK_BUDGET, PrefillChunk
from .sequence import Sequence
from .step_graphs import StepGraphs


class StepTokens:
    """One step's result for each of its sequences, on the CPU: the tokens it emits (accepted
    drafts then the verifier's token), their log-probs under p and under what sampled them,
    and how many drafts were offered and accepted. `top`: per row, None or per emitted token
    (ids, log-probs) of the most likely alternatives under p (rows that asked for logprobs > 0).
    `shape`: the draft shape a decode step ran with (None: an AR step, or a prefill)."""
    __slots__ = ("seqs", "tokens", "logprobs", "behavior", "accepted", "offered", "top", "shape")

    def __init__(self, seqs, tokens, logprobs, behavior, accepted, offered, top=None, shape=None):
        self.seqs, self.tokens, self.logprobs, self.behavior = seqs, tokens, logprobs, behavior
        self.accepted, self.offered = accepted, offered
        self.top = top if top is not None else [None] * len(seqs)
        self.shape = shape


def top_alternatives(seqs, logprobs: torch.Tensor, emitted: list[int]) -> list | None:
    """Per row: None, or [(ids, log-probs)] of the row's `params.logprobs` most likely tokens at
    each of its first `emitted[row]` positions. logprobs [B, V] or [B, k, V] (the policy p)."""
    wanted = [s.params.logprobs for s in seqs]
    N = max(wanted)
    if N == 0:
        return None
    values, ids = logprobs.topk(N, dim=-1)
    if values.dim() == 2:
        values, ids = values[:, None], ids[:, None]
    values, ids = values.tolist(), ids.tolist()
    return [None if n == 0 else [(ids[b][i][:n], values[b][i][:n]) for i in range(emitted[b])]
            for b, n in enumerate(wanted)]


RECOMPILE_LIMIT = 64  # compilations per function under compile=True (see ModelRunner.__init__)


class ModelRunner:
    def __init__(self, model: Decoder, tidar: TidarConfig, device: torch.device, dtype: torch.dtype,
                 num_slots: int, slot_len: int, attention: str = "dense", compile: bool = False,
                 cuda_graphs: bool = False):
        self.model, self.tidar, self.device, self.attention = model, tidar, device, attention
        if attention == "triton" and (reason := triton_unavailable_reason(device)) is not None:
            raise RuntimeError(f"attention path 'triton' cannot run on {device}: {reason} "
                               "(use attention='split' or 'dense')")
        if attention == "split" and compile and torch.device(device).type == "cpu":
            raise ValueError("attention 'split' cannot be compiled on the CPU (Inductor's CPU FlexAttention "
                             "has no log-sum-exp output): use attention='dense' with compile=True, or compile=False")
        self.forbidden = (tidar.mask_token_id,)  # ids the policy never emits (sampling.process_logits)
        # torch.compile of the forward (Inductor: CPU and GPU alike), with dynamic shapes: the
        # prefix length changes every step. Off: eager, the reference it must match.
        self.compiled = compile
        if compile:
            # A step's sampling half compiles once per guard set (step shape, batch 1 or more,
            # mixed rows, filters): more than dynamo's default of 8 per function, past which it
            # would run eagerly. Process-wide, raised only.
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        self.forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        self.ar_sample = torch.compile(ar_sample, dynamic=True) if compile else ar_sample
        self.tidar_sample = torch.compile(tidar_sample, dynamic=True) if compile else tidar_sample
        # A compiled decode step is one call (inputs, forward, sampling, slot update): it pays
        # dynamo's guards and Inductor's Python wrapper once and no eager op around it
        # (benchmarks/fused_ar.py). `fused` False: the forward and the sampling half as two
        # calls, with the inputs and the slot update as eager ops around them.
        self.fused = compile
        self.ar_step = torch.compile(ar_step, dynamic=True) if compile else ar_step
        self.tidar_step = torch.compile(tidar_step, dynamic=True) if compile else tidar_step
        cfg: ModelConfig = model.config
        if attention not in getattr(model, "attention_paths", (attention,)):
            raise ValueError(f"attention path {attention!r} cannot run a {cfg.model_type} model: it has sliding-window "
                             f"layers, which only {'/'.join(model.attention_paths)} honour")
        if cuda_graphs and not getattr(model, "graph_capturable", True):
            raise ValueError(f"cuda_graphs cannot run a {cfg.model_type} model (its expert routing reads token "
                             "counts on the host): use cuda_graphs=False")
        self.cache = KVCache(cfg.num_layers, num_slots, cfg.num_kv_heads, slot_len, cfg.head_dim, dtype, device,
                             state_widths(model))
        K, V, S = tidar.block_size, cfg.vocab_size, num_slots + 1  # + the sink slot
        self.drafts = torch.full((S, K), tidar.mask_token_id, dtype=torch.long, device=device)
        self.draft_logits = torch.zeros(S, K, V, device=device)  # index 0 unused (d_0 is decided)
        self.num_valid = torch.ones(S, dtype=torch.long, device=device)  # drafts incl. d_0
        self.keys = torch.zeros(S, dtype=torch.long, device=device)
        self.ar_layout = ar_layout().to(device)
        for t in (self.cache.k, self.cache.v, *self.cache.state, self.drafts, self.draft_logits, self.num_valid, self.keys):
            self._static(t)  # shapes fixed for the engine's life
        if cuda_graphs and compile:
            raise ValueError("cuda_graphs and compile are exclusive: choose one")
        self.graphs = (StepGraphs(model, self.cache, attention, self.ar_layout, tidar.mask_token_id)
                       if cuda_graphs else None)
        self._layouts: dict[DraftShape, tuple[DecodeLayout, torch.Tensor]] = {}
        self._uniforms: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows_key: list | None = None
        self._rows_value: RowSampling | None = None

    def one_off_count(self) -> int:
        """CUDA graphs captured plus graphs torch.compile produced so far (process-wide): a step
        during which this grows paid a one-off cost, and its time says nothing of the next one."""
        n = self.graphs.captures if self.graphs is not None else 0
        if self.compiled:
            from torch._dynamo.utils import counters
            n += counters["stats"]["unique_graphs"]
        return n

    def layout(self, shape: DraftShape) -> tuple[DecodeLayout, torch.Tensor]:
        """The TiDAR step layout for a draft shape and its levels as a device tensor (cached)."""
        if shape not in self._layouts:
            if not 2 <= shape.length <= self.tidar.block_size:
                raise ValueError(f"draft length must be in [2, {self.tidar.block_size}], got {shape.length}")
            layout = decode_layout(shape.length, shape.levels).to(self.device)
            levels = torch.tensor(shape.levels, dtype=torch.long, device=self.device)
            for t in (layout.offsets, layout.visible, levels):
                self._static(t)
            self._layouts[shape] = (layout, levels)
        return self._layouts[shape]

    def _static(self, t: torch.Tensor) -> torch.Tensor:
        """Marks a tensor whose shape never changes (a layout's, the pool's) static for dynamo
        when compiling: duck sizing would otherwise tie it to an equal batch size and recompile
        when they part."""
        if self.compiled:
            torch._dynamo.mark_static(t)
        return t

    def uniform_plan(self, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's uniforms for layout width k and pre-draft block length `block` (0 for
        an AR step), as offsets from L and purposes: ACCEPT at L+1..L+k-1, RESAMPLE at
        L+1..L+k, then DRAFT at L+2..L+k+block-1, which covers the next step's draft positions
        whatever the acceptance. Counter-based: the same (position, purpose) draws the same
        uniform whichever shape a step has."""
        if (k, block) not in self._uniforms:
            drafts = list(range(2, k + block)) if block else []
            offsets = list(range(1, k)) + list(range(1, k + 1)) + drafts
            purposes = [ACCEPT] * (k - 1) + [RESAMPLE] * k + [DRAFT] * len(drafts)
            self._uniforms[(k, block)] = (self._static(torch.tensor(offsets, device=self.device)),
                                          self._static(torch.tensor(purposes, device=self.device)))
        return self._uniforms[(k, block)]

    @staticmethod
    def draft_state_bytes(cfg: ModelConfig, tidar: TidarConfig) -> int:
        """Per-slot bytes besides K/V: draft logits (float32) and drafts."""
        return tidar.block_size * (cfg.vocab_size * 4 + 8) + 16

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ prefill
    def _forward_chunks(self, slots: list[int], tokens: list[list[int]], starts: list[int], block: int,
                        cache: KVCache) -> torch.Tensor:
        """One forward over prompt chunks (row b: `tokens[b]` at positions starts[b].., the cache
        holding the positions before) plus a mask block of `block` tokens per row.
        Returns hidden [B, Nmax + block, H]: the mask block starts at in-step Nmax."""
        lens = [len(t) for t in tokens]
        positions, visible, write = prefill_layout(lens, block, starts)
        N = max(lens)
        ids = torch.full((len(tokens), N + block), self.tidar.mask_token_id, dtype=torch.long)
        for b, t in enumerate(tokens):
            ids[b, :len(t)] = torch.tensor(t)
        slots_t, positions = self._tensor(slots), positions.to(self.device)
        batch = StepBatch(slots_t, self._tensor(starts), max(starts), positions, visible.to(self.device),
                          cache.write_index(slots_t, positions, write.to(self.device)), self.attention,
                          slot_range=consecutive(slots), packed=self.model.packs_current())
        return self.forward(ids.to(self.device), batch, cache)

    def prefill(self, chunks: list[PrefillChunk], draft: bool = True) -> StepTokens | None:
        """Prefills the chunks; for each group whose prompt is now complete, copies its K/V to
        the other samples' slots and samples every sample's first token (and, for drafting
        rows when `draft`, the drafts of its first step from a mask block; without them the
        first decode step has nothing to verify). Returns the first tokens."""
        K = self.tidar.block_size
        # Rows that stop at their first token (max_tokens 1: a probe, a prompt's log-probs) would
        # draft for nothing: completing chunks of only such groups take no mask block.
        completing = [c.group.sequences[0] for c in chunks if c.last and c.group.sequences[0].drafts]
        block = K if draft and K > 1 and any(s.params.max_tokens > 1 for s in completing) else 0
        hidden = self._forward_chunks([c.group.sequences[0].slot for c in chunks],
                                      [c.group.prompt[c.start:c.start + c.length] for c in chunks],
                                      [c.start for c in chunks], block, self.cache)
        done = [i for i, c in enumerate(chunks) if c.last]
        if not done:
            return None
        N = max(c.length for c in chunks)
        seqs, src = [], []
        for i in done:
            group = chunks[i].group
            if len(group.sequences) > 1:
                first = group.sequences[0].slot
                others = self._tensor([s.slot for s in group.sequences[1:]])
                self.cache.copy_prefix(torch.full_like(others, first), others, len(group.prompt))
            seqs += group.sequences
            src += [i] * len(group.sequences)
        src_t = self._tensor(src)
        last = self._tensor([chunks[i].length - 1 for i in src])
        rows = RowSampling.build([s.params for s in seqs], self.device, self.forbidden)
        keys = self._tensor([s.key for s in seqs])
        start = self._tensor([len(s.prompt) for s in seqs])  # position of the first generated token
        # One draw for the step: the first token at `start` (RESAMPLE), drafts after it (DRAFT);
        # for coupled rows the race noise of the same positions (of `start` only without drafts).
        positions = start[:, None] + torch.arange(K if block else 1, device=self.device)
        u = counter_uniforms(keys, start[:, None] + torch.arange(K, device=self.device),
                             torch.tensor([RESAMPLE] + [DRAFT] * (K - 1), device=self.device))
        g = exponential_noise(keys, positions, self.draft_logits.shape[-1]) if rows.coupled is not None else None
        probs, logprobs = rows.policy(self.model.logits(hidden[src_t, last]))  # [R, V]
        first = rows.sample(probs, u[:, 0], None if g is None else g[:, 0])
        first_lp = logprobs.gather(-1, first[:, None]).squeeze(-1)

        R = len(seqs)
        drafts = torch.full((R, K), self.tidar.mask_token_id, dtype=torch.long, device=self.device)
        drafts[:, 0] = first
        draft_logits = torch.zeros(R, K, self.draft_logits.shape[-1], device=self.device)
        drafting = self._tensor([s.drafts for s in seqs], torch.bool)
        if block:
            # Mask slot 0 sits at the position of `first`; slots 1..K-1 draft the positions after it.
            draft_logits[:, 1:] = self.model.logits(hidden[src_t, N + 1:])
            drafts[:, 1:] = torch.where(drafting[:, None],
                                        draw(draft_logits[:, 1:], rows, u[:, 1:], None if g is None else g[:, 1:]),
                                        self.tidar.mask_token_id)
        slots = self._tensor([s.slot for s in seqs])
        self.keys[slots] = keys
        self._store(slots, drafts, draft_logits, torch.where(drafting, K, 1) if block else torch.ones_like(slots))
        tokens, lps = first.tolist(), first_lp.tolist()
        return StepTokens(seqs, [[t] for t in tokens], [[x] for x in lps], [[x] for x in lps], [0] * R, [0] * R,
                          top_alternatives(seqs, logprobs, [1] * R))

    def _store(self, slots: torch.Tensor, drafts: torch.Tensor, draft_logits: torch.Tensor,
               num_valid: torch.Tensor) -> None:
        self.drafts[slots] = drafts
        self.draft_logits[slots] = draft_logits
        self.num_valid[slots] = num_valid

    # ------------------------------------------------------------------ decode
    def decode(self, seqs: list[Sequence], shape: DraftShape | None,
               lookup: list[list[int]] | None = None) -> StepTokens:
        """One step over running sequences: with a draft shape, a TiDAR step (verify up to
        shape.length - 1 of their drafts, sample the next token, pre-draft the shape's levels);
        None, an AR step (pending drafts are dropped: no draft is ever verified against a step
        it was not made for). `lookup`: per row, point-mass drafts (history or lookup drafts)
        it verifies instead of its own pending drafts ([]: its own); a TiDAR step pre-drafts
        the next block for every row whatever it verified, a lookup shape (verify-only)
        pre-drafts nothing. Returns each row's emitted tokens."""
        drafting = shape is not None and any(s.drafts for s in seqs)
        if drafting and lookup:
            self._store_lookup(seqs, shape.length, lookup)
        if self.fused:
            return self._fused_tidar(seqs, shape) if drafting else self._fused_ar(seqs)
        layout, level_t = self.layout(shape) if drafting else (self.ar_layout, None)
        k, dev = layout.num_drafts, self.device
        committed, slot_list = [s.num_committed for s in seqs], [s.slot for s in seqs]
        slots, L = self._tensor(slot_list), self._tensor(committed)
        drafts = self.drafts[slots, :k]                      # [B, k]
        keys = self.keys[slots]
        hidden = self._decode_forward(slots, L, max(committed), drafts, layout, consecutive(slot_list))
        rows = self._rows([s.params for s in seqs])
        if not drafting:  # the forward, then the sampling half
            offsets, purposes = self.uniform_plan(1, 0)
            sampled = self.ar_sample(self.model, hidden[:, 0], rows, keys, L[:, None] + offsets, purposes)
            return self._ar_tokens(seqs, slots, *sampled)
        # A shorter step verifies only the drafts it carries (the rest are dropped).
        num_valid = self.num_valid[slots].clamp(max=k)
        b, K = shape.block_length, self.tidar.block_size
        offsets, purposes = self.uniform_plan(k, b)
        drafting_rows = self._tensor([s.drafts for s in seqs], torch.bool)
        out, lp, blp, accepted, p_logprobs, next_drafts, next_logits, next_valid = self.tidar_sample(
            self.model, hidden, drafts, self.draft_logits[slots, 1:k], num_valid, keys, L[:, None] + offsets,
            purposes, rows, level_t, drafting_rows, b, len(layout.levels) == 1, K, self.tidar.mask_token_id)
        self.drafts[slots] = next_drafts
        self.draft_logits[slots[:, None], torch.arange(1, max(b, 1), device=dev)[None]] = next_logits
        self.num_valid[slots] = next_valid  # logits past a row's valid drafts are never used
        packed = torch.cat((out.double(), lp.double(), blp.double(), accepted[:, None].double(),
                            (num_valid - 1)[:, None].double()), dim=1)
        return self._tidar_tokens(seqs, packed, p_logprobs, shape, k)

    def _store_lookup(self, seqs: list[Sequence], length: int, lookup: list[list[int]]) -> None:
        """Makes the rows' point-mass drafts (lookup or history; up to length - 1 each) their
        slots' pending drafts, each drawn from a point mass (logits 0 at the draft, -inf elsewhere: q(d) = 1)."""
        rows = [(s.slot, d[:length - 1]) for s, d in zip(seqs, lookup) if d]
        if not rows:
            return
        n = max(len(d) for _, d in rows)
        drafts = torch.full((len(rows), n), self.tidar.mask_token_id, dtype=torch.long)
        for i, (_, d) in enumerate(rows):
            drafts[i, :len(d)] = torch.tensor(d)
        slots, drafts = self._tensor([s for s, _ in rows]), drafts.to(self.device)
        point = torch.full((len(rows), n, self.draft_logits.shape[-1]), -torch.inf, device=self.device)
        point.scatter_(2, drafts[..., None], 0.0)
        self.drafts[slots[:, None], torch.arange(1, n + 1, device=self.device)[None]] = drafts
        self.draft_logits[slots[:, None], torch.arange(1, n + 1, device=self.device)[None]] = point
        self.num_valid[slots] = self._tensor([1 + len(d) for _, d in rows])

    def _tidar_tokens(self, seqs: list[Sequence], packed: torch.Tensor, p_logprobs: torch.Tensor,
                      shape: DraftShape, k: int) -> StepTokens:
        """The rest of a TiDAR step, from its rows' [B, 3k + 2] float64 (tokens, log-probs
        under p, under the verification target, accepted, drafts offered) and p's log-probs."""
        tokens, lps, blps, acc, offered = [], [], [], [], []
        for row in packed.tolist():  # the step's one sync
            a = int(row[3 * k])
            tokens.append([int(t) for t in row[:a + 1]])
            lps.append(row[k:k + a + 1])
            blps.append(row[2 * k:2 * k + a + 1])
            acc.append(a)
            offered.append(int(row[3 * k + 1]))
        return StepTokens(seqs, tokens, lps, blps, acc, offered,
                          top_alternatives(seqs, p_logprobs, [a + 1 for a in acc]), shape)

    def _fused_tidar(self, seqs: list[Sequence], shape: DraftShape) -> StepTokens:
        """A TiDAR step as one call (`tidar_step`), its inputs built inside it from the rows'
        slots and committed lengths (see `_fused_ar`); padding rows (compiled: up to a power
        of two) only run through the forward, writing to the sink."""
        layout, level_t = self.layout(shape)
        k, b = layout.num_drafts, shape.block_length
        index, _ = self._step_index(seqs)
        offsets, purposes = self.uniform_plan(k, b)
        packed, p_logprobs = self.tidar_step(
            self.model, self.cache, self.drafts, self.draft_logits, self.num_valid, self.keys, index[0], index[1],
            max(s.num_committed for s in seqs), layout.offsets, layout.visible, k,
            self._tensor([s.drafts for s in seqs], torch.bool),
            offsets, purposes, self._rows([s.params for s in seqs]), level_t, b, len(layout.levels) == 1,
            self.tidar.block_size, self.tidar.mask_token_id, self.attention, self.model.packs_current())
        return self._tidar_tokens(seqs, packed, p_logprobs, shape, k)

    def _fused_ar(self, seqs: list[Sequence]) -> StepTokens:
        """An AR step as one call (`ar_step`): the runner sends only the rows' slots and
        committed lengths (one host->device copy) and their sampling settings; the token ids,
        positions, K/V write index, keys and the slot-state update are computed inside the
        call, not by ~20 small eager ops around it. Compiled, the batch is padded to a power of
        two with sink rows (sampled too, then dropped)."""
        index, pad = self._step_index(seqs)
        rows = self._rows([s.params for s in seqs] + [seqs[0].params] * pad)
        offsets, purposes = self.uniform_plan(1, 0)
        sampled, logprobs = self.ar_step(self.model, self.cache, self.drafts, self.num_valid, self.keys, index[0],
                                         index[1], max(s.num_committed for s in seqs), rows, offsets, purposes,
                                         self.attention, self.model.packs_current())
        return self._ar_result(seqs, sampled, logprobs)

    def _step_index(self, seqs: list[Sequence]) -> tuple[torch.Tensor, int]:
        """A fused step's one host->device copy: [2, P] (slots, committed lengths) of the rows,
        then, compiled, `pad` padding rows (the sink slot, length 0) up to a power of two."""
        B = len(seqs)
        pad = (1 << (B - 1).bit_length()) - B if self.compiled else 0
        return self._tensor([[s.slot for s in seqs] + [self.cache.sink] * pad,
                             [s.num_committed for s in seqs] + [0] * pad]), pad

    @staticmethod
    def _ar_result(seqs: list[Sequence], sampled: torch.Tensor, logprobs: torch.Tensor) -> StepTokens:
        """An AR step's StepTokens from [P, 2] (token, log-prob) and the policy's log-probs
        [P, V] (rows past len(seqs): padding, dropped)."""
        B = len(seqs)
        packed = sampled.tolist()[:B]  # the step's one sync
        tokens, lps = [[int(t)] for t, _ in packed], [[x] for _, x in packed]
        return StepTokens(seqs, tokens, lps, [list(x) for x in lps], [0] * B, [0] * B,
                          top_alternatives(seqs, logprobs[:B], [1] * B))

    def _rows(self, params: list[SamplingParams]) -> RowSampling:
        """`RowSampling.build` of the rows' settings, reused while a step's rows have the same
        settings as the last step's (the common case: the same requests decode step after step)."""
        key = [(p.sampler, p.temperature, p.top_k, p.top_p, p.min_p, p.mix_weight, p.seed_stable) for p in params]
        if key != self._rows_key:
            self._rows_key, self._rows_value = key, RowSampling.build(params, self.device, self.forbidden)
        return self._rows_value

    def _ar_tokens(self, seqs: list[Sequence], slots: torch.Tensor, token: torch.Tensor, lp: torch.Tensor,
                   logprobs: torch.Tensor) -> StepTokens:
        """The rest of an AR step (`ar_sample`'s token, its log-prob and the policy's log-probs)."""
        self.drafts[slots, 0] = token
        self.num_valid[slots] = 1
        return self._ar_result(seqs, torch.stack((token.double(), lp.double()), dim=1), logprobs)

    def _decode_forward(self, slots: torch.Tensor, L: torch.Tensor, prefix_max: int, drafts: torch.Tensor,
                        layout: DecodeLayout, slot_range: tuple[int, int] | None = None) -> torch.Tensor:
        """The decode forward: hidden states [B, T, H] of the rows. When compiled, the batch is
        padded to a power of two with rows that read nothing and write to the sink, so the
        compiled step sees a few batch shapes, not every one."""
        B, k, T, dev = slots.shape[0], layout.num_drafts, layout.num_tokens, self.device
        if self.graphs is not None:
            ids = torch.full((B, T), self.tidar.mask_token_id, dtype=torch.long, device=dev)
            ids[:, :k] = drafts
            hidden = self.graphs.forward(ids, slots, L, prefix_max, layout)
            if hidden is not None:
                return hidden
        ids, batch = self._decode_inputs(slots, L, prefix_max, drafts, layout, slot_range)
        return self.forward(ids, batch, self.cache)[:B]

    def _decode_inputs(self, slots: torch.Tensor, L: torch.Tensor, prefix_max: int, drafts: torch.Tensor,
                       layout: DecodeLayout, slot_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, StepBatch]:
        """A decode forward's token ids [padded, T] and StepBatch (rows past B: sink padding)."""
        B, dev = slots.shape[0], self.device
        padded = 1 << (B - 1).bit_length() if self.compiled else B
        if self.compiled:
            slot_range = None  # a Python int pair would be a guard: one recompilation per range
        if padded > B:
            pad = padded - B
            slots = torch.cat((slots, torch.full((pad,), self.cache.sink, dtype=slots.dtype, device=dev)))
            L = torch.cat((L, torch.zeros(pad, dtype=L.dtype, device=dev)))
        return step_inputs(self.cache, slots, L, prefix_max, drafts, layout.offsets, layout.visible,
                           self.tidar.mask_token_id, self.attention, self.model.packs_current(),
                           ar_step=layout is self.ar_layout, slot_range=slot_range)

    # ------------------------------------------------------------------ whole sequences
    def recompute(self, seqs: list[Sequence]) -> None:
        """Rewrites the committed K/V of running sequences with the current weights (a keep-mode
        weight swap). Their drafts stay valid: verification uses the new target."""
        items = [(s.slot, s.prompt + s.out.token_ids[:-1]) for s in seqs]
        for part in _mask_bounded([t for _, t in items]):
            self._forward_chunks([items[i][0] for i in part], [items[i][1] for i in part], [0] * len(part), 0,
                                 self.cache)

    def forward_logits(self, token_ids: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Teacher-forced causal forward through the engine's own path (a scratch cache, not
        the pool): for each sequence the raw next-token logits [len, V] (float32)."""
        cfg = self.model.config
        cache = KVCache(cfg.num_layers, len(token_ids), cfg.num_kv_heads, max(map(len, token_ids)), cfg.head_dim,
                        dtype, self.device, state_widths(self.model))
        out = []
        for part in _mask_bounded(token_ids):
            hidden = self._forward_chunks(part, [token_ids[i] for i in part], [0] * len(part), 0, cache)
            out += [self.model.logits(hidden[b, :len(token_ids[i])]) for b, i in enumerate(part)]
        return out


def draw(logits: torch.Tensor, rows: RowSampling, u: torch.Tensor | None, noise: torch.Tensor | None = None
         ) -> torch.Tensor:
    """logits [B, m, V] -> draft tokens [B, m] drawn from the processed distribution q: by
    inverse CDF with u [B, m], or for coupled rows argmax(q / noise) (noise [B, m, V])."""
    q, _ = rows.policy(logits)
    return rows.sample(q, u, noise)


def ar_sample(model: Decoder, hidden: torch.Tensor, rows: RowSampling, keys: torch.Tensor, positions: torch.Tensor,
              purposes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling half of an AR step: hidden [B, H] -> (token [B], its log-prob [B], the
    policy's log-probs [B, V]). The token is drawn from p with the RESAMPLE uniform at L+1
    (`positions` [B, 1], `purposes` [1]), or for coupled rows as argmax(log p + g) with the
    race noise at L+1: exactly what verification with no valid drafts draws. A pure tensor
    function, so `compile=True` can run it through torch.compile."""
    p, logprobs = rows.policy(model.logits(hidden))  # [B, V]
    u = counter_uniforms(keys, positions, purposes)[:, 0] if rows.any_residual and not rows.greedy else None
    g = exponential_noise(keys, positions, logprobs.shape[-1])[:, 0] if rows.coupled is not None else None
    token = rows.sample(p, u, g)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1), logprobs


def step_inputs(cache: KVCache, slots: torch.Tensor, lengths: torch.Tensor, prefix_max: int,
                row_drafts: torch.Tensor, layout_offsets: torch.Tensor, visible: torch.Tensor, mask_token_id: int,
                attention: str, packed: bool, ar_step: bool = False,
                slot_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, StepBatch]:
    """A decode forward's token ids [P, T] and StepBatch, from the rows' slots and committed
    lengths [P] (rows past row_drafts' B: padding, the sink slot and length 0) and the step
    layout (`layout_offsets` [T], `visible` [T, T]): each real row's drafts [B, k] fill its first
    k tokens (committed to the cache at their positions), mask tokens the rest. Pure tensor work:
    the eager step and the compiled `tidar_step` build their inputs with it alike."""
    (P, T), (B, k) = (slots.shape[0], layout_offsets.shape[0]), row_drafts.shape
    ids = torch.full((P, T), mask_token_id, dtype=torch.long, device=slots.device)
    ids[:B, :k] = row_drafts
    positions = lengths[:, None] + layout_offsets[None]
    write = (torch.arange(T, device=slots.device) < k)[None].expand(P, T)
    batch = StepBatch(slots, lengths, prefix_max, positions, visible.expand(P, T, T),
                      cache.write_index(slots, positions, write), attention, slot_range=slot_range,
                      ar_step=ar_step, packed=packed)
    return ids, batch


def ar_step(model: Decoder, cache: KVCache, drafts: torch.Tensor, num_valid: torch.Tensor, keys: torch.Tensor,
            slots: torch.Tensor, lengths: torch.Tensor, prefix_max: int, rows: RowSampling, offsets: torch.Tensor,
            purposes: torch.Tensor, attention: str, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole AR step as one function (for torch.compile), from the rows' slots [B] and
    committed lengths [B] (padding rows: the sink slot, length 0) and the runner's per-slot
    state (drafts [S, K], num_valid [S], keys [S]): each row's last token (d_0) is written at
    position L and attends over its prefix; `ar_sample` draws the next token with the
    uniforms at L + `offsets`; the slot state is updated in place (d_0 = the new token, one
    valid draft). Returns ([B, 2] float64 (token, its log-prob), the policy's log-probs [B, V])."""
    positions = lengths[:, None]
    batch = StepBatch(slots, lengths, prefix_max, positions, torch.ones_like(positions, dtype=torch.bool)[:, :, None],
                      (slots[:, None], positions), attention, ar_step=True, packed=packed)
    hidden = model.forward(drafts[slots, :1], batch, cache)[:, 0]
    token, lp, logprobs = ar_sample(model, hidden, rows, keys[slots], positions + offsets, purposes)
    drafts.index_put_((slots, torch.zeros_like(slots)), token)
    num_valid.index_put_((slots,), torch.ones_like(slots))
    return torch.stack((token.double(), lp.double()), dim=1), logprobs


def tidar_step(model: Decoder, cache: KVCache, drafts: torch.Tensor, draft_logits: torch.Tensor,
               num_valid: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
               prefix_max: int, layout_offsets: torch.Tensor, visible: torch.Tensor, k: int, drafting: torch.Tensor,
               offsets: torch.Tensor, purposes: torch.Tensor, rows: RowSampling, levels: torch.Tensor, block: int,
               single_level: bool, K: int, mask_token_id: int, attention: str,
               packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole TiDAR step as one function (for torch.compile), from the rows' slots [P] and
    committed lengths [P] (the first B = len(drafting) are the real rows, the rest padding: the
    sink slot, length 0) and the runner's per-slot state (drafts [S, K], draft_logits [S, K, V],
    num_valid [S], keys [S]): the step layout (`layout_offsets` [T], `visible` [T, T], the
    first k tokens drafts) over the rows' drafts, then `tidar_sample` of the real rows, whose
    next drafts, their logits and valid counts are written back in place. Returns ([B, 3k + 2]
    float64: tokens, log-probs under p and under the verification target, accepted, drafts
    offered; p's log-probs [B, k, V])."""
    B = drafting.shape[0]
    real, L = slots[:B], lengths[:B]
    row_drafts = drafts[real, :k]
    ids, batch = step_inputs(cache, slots, lengths, prefix_max, row_drafts, layout_offsets, visible, mask_token_id,
                             attention, packed)
    hidden = model.forward(ids, batch, cache)[:B]
    valid = num_valid[real].clamp(max=k)  # a shorter step verifies only the drafts it carries
    out, lp, blp, accepted, p_logprobs, next_drafts, next_logits, next_valid = tidar_sample(
        model, hidden, row_drafts, draft_logits[real, 1:k], valid, keys[real], L[:, None] + offsets, purposes,
        rows, levels, drafting, block, single_level, K, mask_token_id)
    drafts.index_put_((real,), next_drafts)
    draft_logits.index_put_((real[:, None], torch.arange(1, max(block, 1), device=slots.device)[None]), next_logits)
    num_valid.index_put_((real,), next_valid)  # logits past a row's valid drafts are never used
    return torch.cat((out.double(), lp.double(), blp.double(), accepted[:, None].double(),
                      (valid - 1)[:, None].double()), dim=1), p_logprobs


def tidar_sample(model: Decoder, hidden: torch.Tensor, drafts: torch.Tensor, draft_logits: torch.Tensor,
                 num_valid: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, purposes: torch.Tensor,
                 rows: RowSampling, levels: torch.Tensor, drafting: torch.Tensor, block: int, single_level: bool,
                 K: int, mask_token_id: int) -> tuple[torch.Tensor, ...]:
    """The sampling half of a TiDAR step, a pure tensor function (`compile=True` runs it
    through torch.compile): verify the drafts, sample the next token, draw the next drafts.

    hidden [B, T, H] (the step layout: k draft positions, then a block of `block` masks per
    level); drafts [B, k] (d_0 decided, d_1.. to verify); draft_logits [B, k-1, V] (what d_1..
    were drawn from); num_valid [B] drafts incl. d_0 this step carries; positions [B, n] and
    purposes [n]: the step's uniforms (`ModelRunner.uniform_plan`); levels [m] the pre-drafted
    levels; drafting [B] rows that draft next step; block: the pre-draft block length (0: a
    verify-only lookup step, whose next state is no drafts); single_level: m == 1.
    Returns (out, lp, blp) [B, k]: tokens emitted (the first accepted + 1 count), their log-probs
    under p and under the verification target; accepted [B]; p's log-probs [B, k, V]; and the
    next step's state: drafts [B, K] (padded with mask tokens), their logits [B, block-1, V]
    and valid counts [B].
    """
    B, k = drafts.shape
    b, dev = block, drafts.device
    if single_level:
        # One level: its block slots 1..b-1 are the only ones the next drafts can come from,
        # so their logits come with the verifier's in one pass over the LM head's weights.
        logits = model.logits(torch.cat((hidden[:, :k], hidden[:, k + 1:k + b]), dim=1))
        ar_logits, single_block = logits[:, :k], logits[:, k:]  # [B, k, V], [B, b-1, V]
    else:
        ar_logits, single_block = model.logits(hidden[:, :k]), None  # predicts positions L+1..L+k
    p, p_logprobs = rows.policy(ar_logits)
    target, target_logprobs = p, p_logprobs
    if rows.any_mixed:
        r, r_logprobs = rows.policy(mixed_logits(ar_logits[:, :k - 1], draft_logits, rows.mix_weight))
        mixed = ((torch.arange(k - 1, device=dev)[None] < num_valid[:, None] - 1)
                 & (rows.mix_weight < 1)[:, None])[..., None]
        target = torch.cat((torch.where(mixed, r, p[:, :k - 1]), p[:, k - 1:]), dim=1)
        target_logprobs = torch.cat(
            (torch.where(mixed, r_logprobs, p_logprobs[:, :k - 1]), p_logprobs[:, k - 1:]), dim=1)
    u_draft = g = None
    if rows.any_residual:
        q, _ = rows.policy(draft_logits)
        u = counter_uniforms(keys, positions, purposes)
        u_accept, u_sample, u_draft = u[:, :k - 1], u[:, k - 1:2 * k - 1], u[:, 2 * k - 1:]
        accepted, next_token = verify_drafts(drafts[:, 1:], q, target, num_valid - 1, u_accept, u_sample)
    if rows.coupled is not None:
        # The noise of L+1..L+k (verified) and on to L+k+b-1 (the furthest next draft);
        # positions[:, :1] is L+1, the first ACCEPT uniform's position.
        g = exponential_noise(keys, positions[:, :1] + torch.arange(k + max(b - 1, 0), device=dev),
                              p_logprobs.shape[-1])  # [B, k + b - 1, V]
        coupled_accepted, coupled_next = verify_coupled(drafts[:, 1:], target, g[:, :k], num_valid - 1)
        if rows.any_residual:
            accepted = torch.where(rows.coupled, coupled_accepted, accepted)
            next_token = torch.where(rows.coupled, coupled_next, next_token)
        else:
            accepted, next_token = coupled_accepted, coupled_next

    # Emitted tokens: d_1..d_a then the verifier's token (index i predicts position L+i+1).
    out = torch.cat((drafts[:, 1:], next_token[:, None]), dim=1)
    out = out.scatter(1, accepted[:, None], next_token[:, None])
    lp = p_logprobs.gather(-1, out[..., None]).squeeze(-1)
    blp = target_logprobs.gather(-1, out[..., None]).squeeze(-1)

    if b == 0:  # verify-only (a lookup step): nothing pre-drafted, the next step starts without drafts
        next_drafts = torch.cat((next_token[:, None], torch.full((B, K - 1), mask_token_id, dtype=out.dtype,
                                                                  device=dev)), dim=1)
        return out, lp, blp, accepted, p_logprobs, next_drafts, ar_logits[:, :0], torch.ones_like(accepted)
    # Next drafts, from the block pre-drafted for each row's acceptance level. a + 1 tokens are
    # committed; the new decided token sits at L+a+1. The block (length b) for the largest
    # level j <= a + 1 starts at L+j, so its slot (a + 1 - j) + s drafts L+a+1+s.
    committed = accepted + 1
    level_idx = torch.searchsorted(levels, committed, right=True) - 1  # [B]
    shift = committed - levels[level_idx]  # [B]
    slot = (shift[:, None] + torch.arange(1, b, device=dev)[None]).clamp(max=b - 1)  # [B, b-1]
    if single_block is not None:
        block_logits = single_block.gather(1, (slot - 1)[..., None].expand(-1, -1, single_block.shape[-1]))
    else:
        token_idx = k + level_idx[:, None] * b + slot  # in-step index
        block_logits = model.logits(hidden[torch.arange(B, device=dev)[:, None], token_idx])  # [B, b-1, V]
    next_valid = torch.where(drafting, b - shift, 1)
    # The drafts of the next step sit at L+a+1+s (s = 1..b-1): u_draft holds L+2.. onwards,
    # g L+1.. onwards.
    u_next = None if u_draft is None else u_draft.gather(1, accepted[:, None] + torch.arange(b - 1, device=dev))
    g_next = None if g is None else g[torch.arange(B, device=dev)[:, None],
                                      accepted[:, None] + torch.arange(1, b, device=dev)]  # [B, b-1, V]
    invalid = torch.arange(1, b, device=dev)[None] >= next_valid[:, None]
    new = draw(block_logits, rows, u_next, g_next).masked_fill(invalid, mask_token_id)
    pad = torch.full((B, K - b), mask_token_id, dtype=new.dtype, device=dev)
    next_drafts = torch.cat((next_token[:, None], new, pad), dim=1)
    return out, lp, blp, accepted, p_logprobs, next_drafts, block_logits, next_valid


def consecutive(slots: list[int]) -> tuple[int, int] | None:
    """(a, b) when `slots` is exactly a, a+1, ..., b-1 (the KV prefix is then a view)."""
    a = slots[0]
    return (a, a + len(slots)) if slots == list(range(a, a + len(slots))) else None


def _mask_bounded(seqs: list[list[int]]) -> list[list[int]]:
    """Splits sequence indices into consecutive parts whose dense mask (rows x longest^2) stays
    under PREFILL_MASK_BUDGET."""
    parts, part, longest = [], [], 0
    for i, s in enumerate(seqs):
        width = max(longest, len(s))
        if part and (len(part) + 1) * width ** 2 > PREFILL_MASK_BUDGET:
            parts.append(part)
            part, width = [], len(s)
        part.append(i)
        longest = width
    return parts + [part] if part else parts
