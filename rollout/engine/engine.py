"""The engine: requests in, finished trajectories out, one forward per `step()`.

    step():  plan = scheduler.schedule()  ->  runner.prefill / runner.decode  ->  scheduler bookkeeping

Design decisions:
- Continuous batching over a KV pool allocated once (`runner.py`): requests are added at any
  time (`add_request`), their sequences are admitted between steps as slots free up, and each
  finished sequence is returned by the step that finished it.
- `ar` is the same loop with block length 1 and no mask blocks, so the baseline and TiDAR
  share prefill, verification, stop handling and log-prob bookkeeping; rows of different
  samplers and settings share one forward.
- A sample's tokens depend only on (seed, prompt index, sample index, weights): randomness is a
  counter-based hash of (row key, position, purpose) (`sampling.counter_uniforms`).
- The n samples of a prompt share one prefill (copied to their slots) when they are admitted
  together; under a full pool the scheduler may admit them in parts, each with its own prefill.
- Single-threaded: one caller drives `step()` (the replica's engine loop, or `generate`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEFAULT_MAX_NUM_SEQS, EngineConfig, ModelConfig, TidarConfig, load_tidar_config
from ..model.decoder import Decoder
from ..model.kv_cache import KVCache, state_widths
from ..model.loader import declared_dtype, load_decoder, read_model_config
from ..model.transpose import copy_weights
from ..params import Completion, SamplingParams, validate_prompts
from ..sampling import row_key
from .drafting import DraftPolicy, DraftShape, count_source, draft_source, level_label
from .history import HistoryStore
from .runner import ModelRunner, StepTokens
from .scheduler import Scheduler
from .sequence import GenerationStats, PromptGroup, Request, Sequence

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The request is valid but the replica cannot queue it now (resource exhausted)."""


def cpu_input_major(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the engine stores its weights input-major (`rollout.model.layers`): on the CPU in
    float32, where MKL multiplies a decode step's rows by them 1.1-1.6x faster; and for the MoE
    families, whose native expert kernel walks input-major experts. Not for dense models in
    bfloat16 / float16 on the CPU: oneDNN reads the default [out, in] layout faster (the 0.5B
    shape in bfloat16: one-token requests 0.78-0.83x the time, AR decode at batch 1 0.78x, at
    batch 8 0.88x; benchmarks/RESULTS.md, issue 27's seventh pass), and a GPU's GEMMs take either."""
    if torch.device(device).type != "cpu":
        return False
    return dtype == torch.float32 or cfg.family != "dense"


@dataclass(frozen=True)
class EngineLimits:
    """What one request may ask of this engine (derived from its pool)."""
    num_slots: int                   # sequences decoded at once; the n samples of a prompt share a prefill up to this
    max_model_len: int               # prompt + max_tokens of one sequence
    max_sequences_per_request: int   # prompts x n
    max_waiting_sequences: int       # queued, not yet admitted, over all requests


@dataclass
class StepOutput:
    finished: list[Sequence]
    started: list[Request]


class Engine:
    def __init__(self, model: Decoder, tidar: TidarConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, config: EngineConfig | None = None):
        self.model, self.tidar = model, tidar
        self.config: ModelConfig = model.config
        self.device, self.dtype = torch.device(device), dtype
        self.engine_config = config = config or EngineConfig()
        if not 0 <= tidar.mask_token_id < self.config.vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {self.config.vocab_size}), got {tidar.mask_token_id}")
        max_model_len = config.max_model_len or self.config.max_position_embeddings
        if max_model_len > self.config.max_position_embeddings:
            raise ValueError(f"max_model_len must be <= the model's context of {self.config.max_position_embeddings}, "
                             f"got {max_model_len}")
        slot_len = max_model_len + tidar.block_size  # draft positions of the last step may run past it
        num_slots = config.max_num_seqs or self._slots_from_memory(slot_len)
        self.limits = EngineLimits(
            num_slots, max_model_len,
            config.max_sequences_per_request or 8 * num_slots,
            config.max_waiting_sequences or 32 * num_slots)
        self.runner = ModelRunner(model, tidar, self.device, dtype, num_slots, slot_len, config.attention,
                                  config.compile, config.cuda_graphs)
        # Recent completions per prompt, for history drafts (auto drafting only).
        self.history = (HistoryStore(int(config.history_mib * 2 ** 20))
                        if config.drafting == "auto" and config.history_mib > 0 else None)
        self.drafting = DraftPolicy(tidar.block_size, tidar.level_set, config.drafting, tidar.acceptance,
                                    config.lookup_drafts, config.cost_model, history=self.history is not None)
        if config.compile:
            self.drafting.restrict_to_calibrated()
        self.scheduler = Scheduler(num_slots, tidar.block_size, config.max_prefill_tokens, config.max_running_requests,
                                   self.drafting)
        self.requests: dict[str, Request] = {}
        self.totals = GenerationStats()  # everything this engine has run (metrics)
        self.last_stats = GenerationStats()  # of the last `generate` call
        self.weight_version = 0  # the policy version every emitted token is tagged with
        self._ids = itertools.count()
        log.info("KV pool: %d slots x %d positions on %s", num_slots, slot_len, self.device)
        self.calibration: dict = {}  # what the start-up step-cost calibration did (status)
        if config.drafting == "auto" and config.calibration_seconds > 0:
            self.calibration = self.calibrate_step_costs(config.calibration_seconds, config.calibration_cache)
            log.info("step-cost calibration: %s", self.calibration)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, mask_token_id: int | None = None,
                        block_size: int | None = None, levels: tuple[int, ...] | None = None,
                        config: EngineConfig | None = None) -> Engine:
        """Loads an HF directory (config.json, *.safetensors, TiDAR settings beside them). dtype
        None: the dtype config.json declares (weights and KV cache alike; float32 if none). Weight
        layout: `cpu_input_major`."""
        model_dir, hf_cfg, cfg = read_model_config(path)
        dtype = dtype or declared_dtype(hf_cfg)
        tidar = load_tidar_config(model_dir, hf_cfg, mask_token_id, block_size, levels)
        model = load_decoder(model_dir, cfg, device, dtype, input_major=cpu_input_major(cfg, device, dtype))
        return cls(model, tidar, device, dtype, config)

    def _slots_from_memory(self, slot_len: int) -> int:
        cfg, c = self.config, self.engine_config
        per_slot = (KVCache.bytes_per_slot(cfg.num_layers, cfg.num_kv_heads, slot_len, cfg.head_dim, self.dtype,
                                           state_widths(self.model))
                    + ModelRunner.draft_state_bytes(cfg, self.tidar))
        if c.kv_cache_gib is not None:
            budget = c.kv_cache_gib * 2 ** 30
        elif self.device.type == "cpu":
            budget = 2 ** 30
        else:  # CUDA and ROCm builds alike
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * c.gpu_memory_utilization
        slots = min(int(budget // per_slot), DEFAULT_MAX_NUM_SEQS)
        if slots < 1:
            raise ValueError(f"the KV budget of {budget / 2 ** 30:.2f} GiB holds no slot of {slot_len} positions "
                             f"({per_slot / 2 ** 20:.1f} MiB each): raise kv_cache_gib or lower max_model_len")
        return slots

    # ---------------------------------------------------------------- step costs
    def cost_key(self) -> str:
        """What step costs depend on: device, threads, torch, dtype, weight layout, model family and shape (with
        MoE: experts, top-k, expert size), block length, attention path (the key of the
        calibration cache)."""
        if self.device.type == "cpu":
            device = f"cpu:{platform.processor() or platform.machine()}:threads={torch.get_num_threads()}"
        else:
            device = f"{self.device.type}:{torch.cuda.get_device_name(self.device)}"
        c = self.config
        # MoE: a step's cost depends on how many experts its tokens touch (experts, top-k, their size).
        moe = (f",moe_layers={len(c.moe_layers)},experts={c.num_experts}/top{c.num_experts_per_tok},"
               f"expert_intermediate={c.moe_intermediate_size}" if c.moe_layers else "")
        layout = "input-major" if getattr(self.model, "input_major", False) else "default"
        return (f"{device}|torch={torch.__version__}|{self.dtype}|{layout}|{c.family}|layers={c.num_layers},"
                f"hidden={c.hidden_size},intermediate={c.intermediate_size},heads={c.num_heads}/{c.num_kv_heads},"
                f"vocab={c.vocab_size}{moe}|"
                f"block={self.tidar.block_size}|{self.engine_config.attention}|compile={self.engine_config.compile}"
                f"|graphs={self.engine_config.cuda_graphs}")

    def calibrate_step_costs(self, seconds: float, cache: str | Path | None = None) -> dict:
        """Seeds the drafting policy's step-cost model with this device's figures: decode steps
        of each kind (AR; draft length 2 with one level; one level of the full block; every
        level) at batch 1, 8 and 64 (up to the pool), each over a few steps on scratch prompts,
        cheapest batch first, until `seconds` of measuring run out. An unmeasured warm-up goes
        first; with graphs or compile it runs every measured (batch, context, shape) once, cache
        hit or not, so that captures and compilations happen here (steps that still capture or
        compile are not timed: `step`). With `cache`, figures stored for the same
        `cost_key()` are read instead, and fresh ones are stored. Engine totals, request stats
        and acceptance estimates are left as they were. Returns what it did (seconds, steps,
        cached)."""
        t0 = time.perf_counter()
        key = self.cost_key()
        costs = self.drafting.costs
        stored = _read_costs(cache).get(key) if cache else None
        if stored and not all(isinstance(x, list) and len(x) == 5 for x in stored):
            stored = None  # another version's format: measure again
        steps = 4
        shapes = self.drafting.calibration_shapes()
        room = self.limits.max_model_len - steps - 1
        if room < 1:
            return dict(seconds=0.0, steps=0, cached=False)
        short, long = min(64, room), min(512, room)
        runs = [(1, short), (1, long)] + [(b, short) for b in (8, 64) if b <= self.limits.num_slots]
        runs = list(dict.fromkeys(runs))
        mask = self.tidar.mask_token_id

        def scratch(batch: int, context: int) -> list[list[int]]:
            """The same prompts for the same (batch, context): a warm-up meets the shapes the
            measured run will (rows finish at the same steps)."""
            rng = random.Random(batch * 1_000_003 + context)
            draw = (rng.randrange(self.config.vocab_size - 1) for _ in range(batch * context))
            ids = [t if t < mask else t + 1 for t in draw]
            return [ids[i * context:(i + 1) * context] for i in range(batch)]

        # With CUDA graphs (a capture per batch, context and shape) or torch.compile (a
        # compilation per shape and batch class) every measured run is first run unmeasured, even
        # when the figures are cached: those one-off costs are paid here, not by live requests.
        one_off = self.runner.graphs is not None or self.runner.compiled
        if stored and not one_off:
            costs.set_anchor(stored)
            return dict(seconds=round(time.perf_counter() - t0, 3), steps=len(stored), cached=True)
        totals, last = self.totals, self.last_stats
        self.totals = GenerationStats()  # scratch requests are not counted
        try:
            # Warm-up: first calls of a shape pay one-off costs (eager: batch 1 only, one short run).
            warm = [(b, c, steps + 1) for b, c in runs] if one_off else [(1, short, 3)]
            for batch, context, tokens in warm:
                for shape in shapes:
                    with self.drafting.forcing(shape):
                        self.generate(scratch(batch, context), SamplingParams(max_tokens=tokens, seed=0))
            if stored:
                costs.set_anchor(stored)
                return dict(seconds=round(time.perf_counter() - t0, 3), steps=len(stored), cached=True)
            costs.clear()
            t_measure = time.perf_counter()
            for batch, context in runs:
                for shape in shapes:
                    if time.perf_counter() - t_measure > seconds:
                        break
                    with self.drafting.forcing(shape):
                        self.generate(scratch(batch, context), SamplingParams(max_tokens=steps + 1, seed=0))
        finally:
            self.totals, self.last_stats = totals, last
            if self.history is not None:
                self.history.clear()  # the scratch prompts' completions
        measured = [list(x) for x in costs.samples]
        costs.set_anchor(measured)
        if cache and measured:
            _write_costs(cache, key, measured)
        return dict(seconds=round(time.perf_counter() - t0, 3), steps=len(measured), cached=False)

    # ---------------------------------------------------------------- validation
    def validate(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Raises ValueError naming the field and the limit (vocabulary, mask token, prompt +
        max_tokens against max_model_len)."""
        validate_prompts(prompts, params, self.config.vocab_size, self.limits.max_model_len, self.tidar.mask_token_id,
                         context_name="max_model_len")

    def check_capacity(self, num_prompts: int, n: int) -> None:
        """What a service checks before queueing a request: its size against
        max_sequences_per_request (ValueError: the request can never be served as it is) and
        the queue against max_waiting_sequences (LoadError: retry later). `generate` does not
        apply these: an in-process caller owns the engine."""
        check_request_size(num_prompts, n, self.limits)
        waiting, num = self.scheduler.num_waiting_sequences, num_prompts * n
        if waiting + num > self.limits.max_waiting_sequences:
            raise LoadError(f"the replica's queue holds {waiting} sequences; {num} more would exceed "
                            f"max_waiting_sequences={self.limits.max_waiting_sequences}")

    def forward_logits(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced causal forward through the engine's own path: for each sequence, the
        raw next-token logits [len, V] (float32) at every position."""
        with torch.inference_mode():
            return self.runner.forward_logits([[int(t) for t in s] for s in token_ids], self.dtype)

    # ---------------------------------------------------------------- requests
    def add_request(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                    request_id: str | None = None, rows: list[tuple[int, list[int]]] | None = None) -> Request:
        """Validates and queues a request: params.n samples of every prompt. Returns it; its
        sequences come back from `step()` as they finish. `rows` (a router re-dispatching part of
        a request): per prompt, the caller's prompt index and sample indices of its n samples;
        they key each row's randomness and label its Completion, so a re-dispatched row draws
        exactly what the row it replaces would have (default: prompt i, samples 0..n-1)."""
        self.validate(prompt_token_ids, params)
        rows = _check_rows(rows, len(prompt_token_ids), params.n)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already running")
        num = len(prompt_token_ids) * params.n
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        k = self.tidar.block_size if params.sampler != "ar" else 1
        request = Request(rid, params, stats=GenerationStats(sampler=params.sampler, rows=num,
                                                              draft_attempts=[0] * (k - 1), draft_accepts=[0] * (k - 1)))
        groups = []
        for prompt, (i, samples) in zip(prompt_token_ids, rows):
            prompt = [int(t) for t in prompt]
            seqs = [Sequence(request, prompt, row_key(seed, i, j), Completion(i, j)) for j in samples]
            if self.history is not None:
                for seq, track in zip(seqs, self.history.begin(prompt, [s.key for s in seqs], self.weight_version)):
                    seq.history = track
            request.sequences += seqs
            groups.append(PromptGroup(prompt, seqs))
        request.num_unfinished = num
        self.requests[rid] = request
        self.scheduler.add(groups)
        return request

    def abort(self, request_id: str) -> list[Sequence]:
        """Ends a request's unfinished sequences now (finish reason abort, tokens kept) and frees
        their slots. Returns them (empty if the request is unknown or done)."""
        request = self.requests.get(request_id)
        if request is None:
            return []
        ended = self.scheduler.abort(request)
        self._finish(ended)
        return ended

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.busy)

    # ---------------------------------------------------------------- the step
    def step(self) -> StepOutput:
        """One scheduler round and at most one forward. Returns the sequences it finished and
        the requests it started."""
        # A decode step's time starts before its scheduling: the drafts' look-up (history
        # proposals, lookup indexes) is host time its shape costs, as the forward is.
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan is None:
            return StepOutput([], [])
        with torch.inference_mode():
            if plan.prefill:
                result = self.runner.prefill(plan.prefill, self.drafting.expects_drafts())
                self.scheduler.prefilled(plan.prefill)
                touched = {id(c.group.request): c.group.request for c in plan.prefill}
            else:
                one_offs = self.runner.one_off_count()
                result = self.runner.decode(plan.decode, plan.shape, plan.lookup)  # ends in the step's one sync
                # A step that captured or compiled is not timed (its cost is paid once).
                seconds = None if self.runner.one_off_count() != one_offs else time.perf_counter() - started
                self._observe_decode(plan, result, seconds)
                touched = {id(s.request): s.request for s in plan.decode}
        for request in touched.values():
            request.stats.forward_passes += 1
        finished = self._record(result) if result is not None else []
        self.scheduler.retire(finished)
        self._finish(finished)
        return StepOutput(finished, plan.started)

    def _observe_decode(self, plan, result: StepTokens, seconds: float | None) -> None:
        """Feeds the drafting policy: the step's time (None: not a representative one) and each
        row's acceptance."""
        kinds = plan.kinds or [""] * len(plan.decode)  # per row, the point-mass drafts it verified ("": none)
        self.drafting.observe_step([s.params for s in plan.decode], result.shape, result.accepted, result.offered,
                                   plan.context, seconds, plan.kinds)
        for seq, kind, offered, accepted in zip(plan.decode, kinds, result.offered, result.accepted):
            levels = seq.request.stats.level_choices
            shape = plan.shape if seq.drafts else None
            if shape is not None and shape.lookup and not kind:  # it verified the model's drafts
                shape = DraftShape(shape.length, ())
            label = level_label(shape, self.tidar.block_size)
            levels[label] = levels.get(label, 0) + 1
            count_source(seq.request.stats.draft_sources, draft_source(kind, offered), offered, accepted)

    def _record(self, result: StepTokens) -> list[Sequence]:
        """Appends a step's tokens to its sequences; returns those that finished."""
        finished, now = [], time.perf_counter()
        for seq, tokens, lps, blps, a, offered, top in zip(result.seqs, result.tokens, result.logprobs,
                                                           result.behavior, result.accepted, result.offered,
                                                           result.top):
            seq.out.num_forward_passes += 1
            stats = seq.request.stats
            if seq.first_token_at is None:
                seq.first_token_at = now
                stats.prefill_seconds = now - seq.request.arrived_at
            for i in range(min(a + 1, offered)):
                stats.draft_attempts[i] += 1
            for i in range(a):
                stats.draft_accepts[i] += 1
            if self.scheduler.append(seq, tokens, lps, blps, [True] * a + [False], self.weight_version, top):
                finished.append(seq)
            if seq.history is not None:
                self.history.extend(seq.history, seq.out.token_ids[len(seq.history.tokens):], self.weight_version)
        if self.history is not None:
            self.history.evict()
        return finished

    def _finish(self, finished: list[Sequence]) -> None:
        """Closes the stats of requests that are now done and forgets them."""
        now = time.perf_counter()
        for seq in finished:
            request = seq.request
            if request.done and request.request_id in self.requests:
                del self.requests[request.request_id]
                s = request.stats
                s.generated_tokens = sum(len(q.out.token_ids) for q in request.sequences)
                s.row_forward_passes = sum(q.out.num_forward_passes for q in request.sequences)
                s.decode_seconds = max(now - request.arrived_at - s.prefill_seconds, 0.0)
                self.totals.add(s)

    # ---------------------------------------------------------------- weights
    def load_weights(self, tensors: dict[str, torch.Tensor], version: int, reset: bool = False) -> None:
        """Copies verified tensors (HF names, the model's dtypes and device) into the model
        between steps and tags later tokens with `version`. Running sequences keep going on the
        new weights: their K/V are recomputed, prompts partly prefilled start over. `reset`:
        these are the base weights again, so the completions of the history store (drafts of a
        policy that is gone) are dropped."""
        if reset and self.history is not None:
            self.history.clear()
        params = self.model.state_dict()
        # Tied names (lm_head.weight beside the embedding) are one parameter: copied once, from
        # the last name given, as load_state_dict does. Two copies into it would run on two
        # threads at once and leave rows of each.
        pairs = {params[name].data_ptr(): (params[name], t) for name, t in tensors.items()}
        with torch.no_grad():
            # input-major weights: a tiled transpose, not copy_'s element loop; on every core
            copy_weights(list(pairs.values()))
        self.weight_version = version
        with torch.inference_mode():
            if self.scheduler.running:
                self.runner.recompute(self.scheduler.running)
        self.scheduler.restart_prefills()

    # ---------------------------------------------------------------- one caller, one request
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Samples `params.n` completions for every prompt. Returns [prompt][sample]."""
        done = sorted(self.generate_iter(prompt_token_ids, params), key=lambda c: (c.prompt_index, c.sample_index))
        n = params.n
        return [done[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    def generate_iter(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                      should_abort: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Yields each completion as soon as it finishes. `should_abort() -> bool` is polled
        between steps; True ends the running completions with finish reason abort."""
        request = self.add_request(prompt_token_ids, params)
        try:
            while not request.done:
                if should_abort is not None and should_abort():
                    yield from (s.out for s in self.abort(request.request_id))
                    break
                out = self.step()
                yield from (s.out for s in out.finished if s.request is request)
        finally:
            self.abort(request.request_id)  # a caller that stops early frees the slots
            self.last_stats = request.stats


def _check_rows(rows: list[tuple[int, list[int]]] | None, num_prompts: int, n: int) -> list[tuple[int, list[int]]]:
    """`add_request`'s rows, checked: one (prompt index, n distinct sample indices) per prompt,
    no (prompt, sample) twice."""
    if rows is None:
        return [(i, list(range(n))) for i in range(num_prompts)]
    if len(rows) != num_prompts:
        raise ValueError(f"rows must give one (prompt index, sample indices) per prompt: {len(rows)} for "
                         f"{num_prompts} prompts")
    checked, seen = [], set()
    for p, samples in rows:
        samples = [int(s) for s in samples]
        if len(samples) != n or int(p) < 0 or min(samples, default=0) < 0:
            raise ValueError(f"rows: prompt {p} must have n={n} non-negative sample indices, got {samples}")
        keys = {(int(p), s) for s in samples}
        if len(keys) != n or keys & seen:
            raise ValueError(f"rows: a (prompt, sample) pair of prompt {p} appears twice")
        seen |= keys
        checked.append((int(p), samples))
    return checked


def _read_costs(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_costs(path: str | Path, key: str, samples: list) -> None:
    """Adds one key's figures to the cache file (written whole, then renamed into place)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_costs(path)
        data[key] = samples
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a replica
        log.warning("could not write the step-cost cache %s: %s", path, e)


def check_request_size(num_prompts: int, n: int, limits: EngineLimits, prompt_tokens: int | None = None) -> None:
    """The front door's check of a request's size against the pool-derived limits: n (the
    samples sharing a prefill) up to the pool's slots, prompts x n, and the request's prompt
    tokens up to what the pool holds (slots x max_model_len)."""
    if n > limits.num_slots:
        raise ValueError(f"n={n} exceeds the KV pool's {limits.num_slots} slots (max_num_seqs)")
    if prompt_tokens is not None and prompt_tokens > limits.num_slots * limits.max_model_len:
        raise ValueError(f"the request's prompts hold {prompt_tokens} tokens, more than the KV pool holds "
                         f"({limits.num_slots} slots x max_model_len={limits.max_model_len})")
    if num_prompts * n > limits.max_sequences_per_request:
        raise ValueError(f"{num_prompts} prompts x n={n} = {num_prompts * n} sequences exceeds "
                         f"max_sequences_per_request={limits.max_sequences_per_request}")
