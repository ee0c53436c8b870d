"""The generation loop: prefill, then one forward per step until every row has finished.

Design decisions:
- `ar` is the same loop with block length 1 and no mask blocks, so the baseline and TiDAR
  share prefill, verification, stop handling and log-prob bookkeeping.
- Randomness: each (prompt, sample) row owns a CPU generator seeded from (seed, prompt index,
  sample index) and draws a fixed number of uniforms per step. A row's tokens therefore do not
  depend on which other rows share its batch, and are the same on any device.
- Per step the only host sync is reading the accepted tokens; logits are computed for the k
  draft positions and for the one pre-drafted block each row actually continues from.
- The n samples of a prompt share one prefill: its K/V are copied to the other samples' slots.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TidarConfig, load_tidar_config
from ..model.decoder import Decoder, StepBatch
from ..model.kv_cache import KVCache
from ..model.loader import load_decoder, read_model_config
from ..params import Completion, SamplingParams, validate_prompts
from ..sampling import mixed_logits, policy_distribution, sample_from, verify_drafts
from ..step_layout import ar_layout, decode_layout, prefill_layout

log = logging.getLogger(__name__)

# Prefill rows are chunked so that one chunk's dense [rows, T, T] mask stays under this many entries.
PREFILL_MASK_BUDGET = 1 << 26


@dataclass
class GenerationStats:
    """Counters of the last `generate` call."""
    sampler: str = ""
    rows: int = 0
    forward_passes: int = 0            # decode steps + the prefill, over the whole batch
    row_forward_passes: int = 0        # sum over rows of the forwards each row took part in
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_attempts: list[int] = field(default_factory=list)  # per draft position 1..k-1
    draft_accepts: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(self.row_forward_passes, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / n if n else 0.0 for a, n in zip(self.draft_accepts, self.draft_attempts)]


@dataclass
class _Rows:
    """Decode state of the rows still running (tensors on the model's device)."""
    slots: torch.Tensor          # [B]
    drafts: torch.Tensor         # [B, k]: d_0 (decided) and d_1..d_{k-1}
    draft_logits: torch.Tensor   # [B, k, V]: diffusion logits d_i was drafted from (index 0 unused)
    num_valid: torch.Tensor      # [B]: valid entries of `drafts`, d_0 included
    ids: list[int]               # row ids into the completion list

    def keep(self, mask: torch.Tensor, ids: list[int]) -> _Rows:
        return _Rows(self.slots[mask], self.drafts[mask], self.draft_logits[mask], self.num_valid[mask], ids)


class Engine:
    def __init__(self, model: Decoder, tidar: TidarConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model, self.tidar = model, tidar
        self.config: ModelConfig = model.config
        self.device, self.dtype = torch.device(device), dtype
        if not 0 <= tidar.mask_token_id < self.config.vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {self.config.vocab_size}), got {tidar.mask_token_id}")
        k = tidar.block_size
        self.tidar_layout = decode_layout(k, tidar.level_set).to(self.device)
        self.ar_layout = ar_layout().to(self.device)
        self.levels = torch.tensor(tidar.level_set, device=self.device)
        self.last_stats = GenerationStats()
        self.weight_version = 0  # the policy version every emitted token is tagged with

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, mask_token_id: int | None = None,
                        block_size: int | None = None, levels: tuple[int, ...] | None = None) -> Engine:
        """Loads an HF directory (config.json, *.safetensors, TiDAR settings beside them)."""
        model_dir, hf_cfg, cfg = read_model_config(path)
        tidar = load_tidar_config(model_dir, hf_cfg, mask_token_id, block_size, levels)
        model = load_decoder(model_dir, cfg, device, dtype)
        return cls(model, tidar, device, dtype)

    # ---------------------------------------------------------------- validation
    def validate(self, prompts: list[list[int]], params: SamplingParams) -> None:
        validate_prompts(prompts, params, self.config.vocab_size, self.config.max_position_embeddings,
                         self.tidar.mask_token_id)

    def forward_logits(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced causal forward through the engine's own path: for each sequence, the
        raw next-token logits [len, V] (float32) at every position."""
        cache = KVCache(self.config.num_layers, len(token_ids), self.config.num_kv_heads,
                        max(map(len, token_ids)), self.config.head_dim, self.dtype, self.device)
        with torch.inference_mode():
            hidden = self._prefill_hidden(token_ids, 0, cache, cache.allocate(len(token_ids)))
            return [self.model.logits(h) for h in hidden]

    def _prefill_hidden(self, prompts: list[list[int]], block: int, cache: KVCache, slots: list[int]
                        ) -> list[torch.Tensor]:
        """Prefills each prompt into its slot, followed by `block` mask tokens (0: none), in
        chunks that bound the dense mask. Returns per prompt the hidden states [len + block, H]."""
        out, start, dev = [], 0, self.device
        while start < len(prompts):
            end, longest = start, 0
            while end < len(prompts):
                longest = max(longest, len(prompts[end]) + block)
                if end > start and ((end + 1 - start) * longest ** 2 > PREFILL_MASK_BUDGET):
                    break
                end += 1
            chunk, lens = prompts[start:end], [len(p) for p in prompts[start:end]]
            positions, visible, write = prefill_layout(lens, block)
            P = max(lens)
            ids = torch.full((len(chunk), P + block), self.tidar.mask_token_id, dtype=torch.long)
            for b, p in enumerate(chunk):
                ids[b, :len(p)] = torch.tensor(p)
            chunk_slots = torch.tensor(slots[start:end], device=dev)
            batch = StepBatch(chunk_slots, torch.zeros(len(chunk), dtype=torch.long, device=dev),
                              positions.to(dev), visible.to(dev), write.to(dev))
            hidden = self.model(ids.to(dev), batch, cache)
            cache.lengths[chunk_slots] = torch.tensor(lens, device=dev)
            out += [torch.cat((hidden[b, :n], hidden[b, P:])) for b, n in enumerate(lens)]
            start = end
        return out

    # ---------------------------------------------------------------- generation
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Samples `params.n` completions for every prompt. Returns [prompt][sample]."""
        done = sorted(self.generate_iter(prompt_token_ids, params),
                      key=lambda c: (c.prompt_index, c.sample_index))
        n = params.n
        return [done[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    def generate_iter(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                      should_abort: Callable[[], bool] | None = None,
                      on_first_token: Callable[[], None] | None = None,
                      between_steps: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Yields each completion as soon as it finishes (see `generate_steps`)."""
        for finished in self.generate_steps(prompt_token_ids, params, should_abort, on_first_token, between_steps):
            yield from finished

    def generate_steps(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                       should_abort: Callable[[], bool] | None = None,
                       on_first_token: Callable[[], None] | None = None,
                       between_steps: Callable[[], bool] | None = None) -> Iterator[list[Completion]]:
        """Yields, after each forward that finished some completions, the list of them.

        Hooks, all called between forwards (never during one):
        `should_abort() -> bool`: True ends the running completions with finish_reason "abort",
            keeping the tokens they have.
        `on_first_token()`: once the prefill has sampled every row's first token.
        `between_steps() -> bool`: may swap the model's weights; True says it did, and the K/V
            of every running row is then recomputed with the new weights before the next step
            (drafts already drawn stay valid: verification uses the new target).
        Input is validated first."""
        self.validate(prompt_token_ids, params)
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        k = self.tidar.block_size if params.sampler != "ar" else 1
        completions = [Completion(i, j) for i in range(len(prompts)) for j in range(params.n)]
        generators = self._row_generators(len(prompts), params.n, params.seed)
        cache = KVCache(self.config.num_layers, len(completions), self.config.num_kv_heads,
                        max(map(len, prompts)) + params.max_tokens + k + 1, self.config.head_dim,
                        self.dtype, self.device)
        stats = GenerationStats(sampler=params.sampler, rows=len(completions),
                                draft_attempts=[0] * (k - 1), draft_accepts=[0] * (k - 1))
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                rows, finished = self._prefill(prompts, params, k, cache, completions, generators, stats)
            stats.prefill_seconds = time.perf_counter() - t0
            if on_first_token is not None:
                on_first_token()
            if finished:
                yield [completions[r] for r in finished]
            while rows.ids:
                if should_abort is not None and should_abort():
                    for r in rows.ids:
                        completions[r].finish_reason = "abort"
                    yield [completions[r] for r in rows.ids]
                    break
                if between_steps is not None and between_steps():
                    with torch.inference_mode():
                        self._recompute_cache(rows, prompts, completions, cache)
                with torch.inference_mode():
                    rows, finished = self._decode_step(rows, params, k, cache, completions, generators, stats)
                if finished:
                    yield [completions[r] for r in finished]
        finally:
            stats.decode_seconds = time.perf_counter() - t0 - stats.prefill_seconds
            stats.generated_tokens = sum(len(c.token_ids) for c in completions)
            stats.row_forward_passes = sum(c.num_forward_passes for c in completions)
            self.last_stats = stats

    def _recompute_cache(self, rows: _Rows, prompts: list[list[int]], completions: list[Completion],
                         cache: KVCache) -> None:
        """Rewrites the committed K/V of running rows with the current weights. A row's cache
        holds its prompt and every generated token but the last (the pending d_0)."""
        seqs = [prompts[completions[r].prompt_index] + completions[r].token_ids[:-1] for r in rows.ids]
        self._prefill_hidden(seqs, 0, cache, rows.slots.tolist())

    def _row_generators(self, num_prompts: int, n: int, seed: int | None) -> list[torch.Generator]:
        base = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
        gens = []
        for i in range(num_prompts):
            for j in range(n):
                digest = hashlib.blake2b(f"{base}/{i}/{j}".encode(), digest_size=8).digest()
                gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
        return gens

    def _uniforms(self, generators: list[torch.Generator], ids: list[int], count: int) -> torch.Tensor:
        u = torch.stack([torch.rand(count, generator=generators[r], dtype=torch.float64) for r in ids])
        return u.to(self.device)

    def _prefill(self, prompts, params: SamplingParams, k: int, cache: KVCache,
                 completions: list[Completion], generators, stats: GenerationStats
                 ) -> tuple[_Rows, list[int]]:
        n, dev, V = params.n, self.device, self.config.vocab_size
        lens = [len(p) for p in prompts]
        prompt_slots = cache.allocate(len(prompts))
        hidden = self._prefill_hidden(prompts, k if k > 1 else 0, cache, prompt_slots)
        stats.forward_passes += 1

        # Fan each prompt out to its n samples: sample 0 keeps the prompt's slot.
        slots = []
        for s in prompt_slots:
            others = cache.allocate(n - 1)
            cache.copy_prefix(s, others, int(cache.lengths[s]))
            slots += [s] + others
        src = [i for i in range(len(prompts)) for _ in range(n)]
        ar_logits = self.model.logits(torch.stack([hidden[i][lens[i] - 1] for i in src]))  # [R, V]
        row_ids = list(range(len(completions)))
        u = self._uniforms(generators, row_ids, k)
        probs, logprobs = policy_distribution(ar_logits, params.temperature, params.top_k, params.top_p)
        first = sample_from(probs, u[:, 0])
        first_lp = logprobs.gather(-1, first[:, None]).squeeze(-1)
        R = len(row_ids)
        drafts = torch.full((R, k), self.tidar.mask_token_id, dtype=torch.long, device=dev)
        drafts[:, 0] = first
        draft_logits = torch.zeros(R, k, V, device=dev)
        if k > 1:
            # Mask slot 0 sits at the position of `first`; slots 1..k-1 draft the positions after it.
            draft_logits[:, 1:] = self.model.logits(torch.stack([hidden[i][lens[i] + 1:] for i in src]))
            drafts[:, 1:] = self._draw_drafts(draft_logits[:, 1:], params, u[:, 1:])
        rows = _Rows(torch.tensor(slots, device=dev), drafts, draft_logits,
                     torch.full((R,), k, dtype=torch.long, device=dev), row_ids)
        tokens, lps = first.tolist(), first_lp.tolist()
        done = []
        for r in row_ids:
            completions[r].num_forward_passes += 1
            done.append(self._append(completions[r], [tokens[r]], [lps[r]], [lps[r]], [False], params))
        return self._drop_finished(rows, done, cache)

    def _draw_drafts(self, logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
        """logits [B, m, V], u [B, m] -> draft tokens [B, m] drawn from the processed distribution."""
        B, m, V = logits.shape
        q, _ = policy_distribution(logits, params.temperature, params.top_k, params.top_p)
        return sample_from(q.reshape(B * m, V), u.reshape(B * m)).view(B, m)

    def _decode_step(self, rows: _Rows, params: SamplingParams, k: int, cache: KVCache,
                     completions: list[Completion], generators, stats: GenerationStats
                     ) -> tuple[_Rows, list[int]]:
        layout = self.tidar_layout if k > 1 else self.ar_layout
        B, T, dev = len(rows.ids), layout.num_tokens, self.device
        prefix = cache.lengths[rows.slots]
        ids = torch.full((B, T), self.tidar.mask_token_id, dtype=torch.long, device=dev)
        ids[:, :k] = rows.drafts
        write = torch.zeros(B, T, dtype=torch.bool, device=dev)
        write[:, :k] = True
        batch = StepBatch(rows.slots, prefix, prefix[:, None] + layout.offsets[None],
                          layout.visible.expand(B, T, T), write)
        hidden = self.model(ids, batch, cache)
        stats.forward_passes += 1

        u = self._uniforms(generators, rows.ids, 2 * k - 1)
        u_accept, u_sample, u_draft = u[:, :k - 1], u[:, k - 1], u[:, k:]
        ar_logits = self.model.logits(hidden[:, :k])  # [B, k, V]: predicts positions L+1..L+k
        p, p_logprobs = policy_distribution(ar_logits, params.temperature, params.top_k, params.top_p)
        q, _ = policy_distribution(rows.draft_logits[:, 1:], params.temperature, params.top_k, params.top_p)
        target, target_logprobs = p, p_logprobs
        if params.sampler == "mixed" and params.temperature > 0:
            r, r_logprobs = policy_distribution(
                mixed_logits(ar_logits[:, :k - 1], rows.draft_logits[:, 1:], params.mix_weight),
                params.temperature, params.top_k, params.top_p)
            drafted = (torch.arange(k - 1, device=dev)[None] < rows.num_valid[:, None] - 1)[..., None]
            target = torch.cat((torch.where(drafted, r, p[:, :k - 1]), p[:, k - 1:]), dim=1)
            target_logprobs = torch.cat(
                (torch.where(drafted, r_logprobs, p_logprobs[:, :k - 1]), p_logprobs[:, k - 1:]), dim=1)
        num_drafts = rows.num_valid - 1
        accepted, next_token = verify_drafts(rows.drafts[:, 1:], q, target, num_drafts, u_accept, u_sample)
        cache.lengths[rows.slots] += accepted + 1

        # Output tokens of this step: d_1..d_m then the verifier's token (index i predicts L+i+1).
        out = torch.cat((rows.drafts[:, 1:], next_token[:, None]), dim=1)
        out.scatter_(1, accepted[:, None], next_token[:, None])
        lp = p_logprobs.gather(-1, out[..., None]).squeeze(-1)
        blp = target_logprobs.gather(-1, out[..., None]).squeeze(-1)

        if k > 1:
            rows.draft_logits, rows.num_valid, drafts = self._next_drafts(hidden, accepted + 1, params, u_draft)
            rows.drafts = torch.cat((next_token[:, None], drafts), dim=1)
        else:
            rows.drafts = next_token[:, None]

        out_l, lp_l, blp_l, acc_l, valid_l = (
            out.tolist(), lp.tolist(), blp.tolist(), accepted.tolist(), num_drafts.tolist())
        done = []
        for b, r in enumerate(rows.ids):
            m = acc_l[b]
            completions[r].num_forward_passes += 1
            for i in range(min(m + 1, valid_l[b])):
                stats.draft_attempts[i] += 1
            for i in range(m):
                stats.draft_accepts[i] += 1
            done.append(self._append(completions[r], out_l[b][:m + 1], lp_l[b][:m + 1], blp_l[b][:m + 1],
                                     [True] * m + [False], params))
        return self._drop_finished(rows, done, cache)

    def _next_drafts(self, hidden: torch.Tensor, committed: torch.Tensor, params: SamplingParams,
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drafts for the next step from the block pre-drafted for this row's acceptance level.

        committed [B] = a (tokens committed this step); the new decided token sits at L+a. The
        block for the largest level j <= a starts at L+j, so its slot (a - j) + s drafts L+a+s.
        Returns draft_logits [B, k, V], num_valid [B], drafts [B, k-1].
        """
        layout, k = self.tidar_layout, self.tidar.block_size
        B, dev = hidden.shape[0], self.device
        level_idx = torch.searchsorted(self.levels, committed, right=True) - 1  # [B]
        shift = committed - self.levels[level_idx]  # [B]
        rows = torch.arange(B, device=dev)
        slot = (shift[:, None] + torch.arange(1, k, device=dev)[None]).clamp(max=k - 1)  # [B, k-1]
        token_idx = layout.num_drafts + level_idx[:, None] * k + slot  # in-step index
        block_logits = self.model.logits(hidden[rows[:, None], token_idx])  # [B, k-1, V]
        num_valid = k - shift
        drafts = self._draw_drafts(block_logits, params, u)
        invalid = torch.arange(1, k, device=dev)[None] >= num_valid[:, None]
        drafts = drafts.masked_fill(invalid, self.tidar.mask_token_id)
        draft_logits = torch.cat((torch.zeros_like(block_logits[:, :1]), block_logits), dim=1)
        return draft_logits, num_valid, drafts

    def _append(self, c: Completion, tokens: list[int], lps: list[float], blps: list[float],
                from_draft: list[bool], params: SamplingParams) -> bool:
        """Appends one step's tokens, cutting at a stop token or max_tokens. True when finished."""
        stop = params.stop_token_ids
        for t, lp, blp, fd in zip(tokens, lps, blps, from_draft):
            c.token_ids.append(t)
            c.logprobs.append(lp)
            c.behavior_logprobs.append(blp)
            c.from_draft.append(fd)
            c.policy_versions.append(self.weight_version)
            if t in stop:
                c.finish_reason = "stop"
                return True
            if len(c.token_ids) >= params.max_tokens:
                c.finish_reason = "length"
                return True
        return False

    def _drop_finished(self, rows: _Rows, done: list[bool], cache: KVCache) -> tuple[_Rows, list[int]]:
        """Frees the slots of finished rows. Returns the remaining rows and the finished row ids."""
        if not any(done):
            return rows, []
        cache.free([int(s) for s, d in zip(rows.slots.tolist(), done) if d])
        keep = torch.tensor([not d for d in done], device=self.device)
        return rows.keep(keep, [r for r, d in zip(rows.ids, done) if not d]), [r for r, d in zip(rows.ids, done) if d]
