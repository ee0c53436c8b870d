"""Parts (b) step cost, (c) end to end, (d) the GRPO-shaped re-rollout and (e) the MoE families of
`benchmarks.gpu_run`, and the table of part (a)'s checks (`gpu_checks.py`). Each part takes the run's context (plan,
device, dtype, its Budget, trimmed repeats and batches) and returns a dict: its rows (the JSON),
`markdown` (its table) and `summary` (a few lines for the one-screen summary). The timing
helpers are the suite's (`suite.fill`, `time_steps`, `sampler_rates`, `hf_rate`) and
`speed_targets.weight_streaming_floor`: the full suite stays for longer lends.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- part b: step cost
def set_step_path(engine, attention: str, graphs: bool, cache: dict) -> None:
    """Switches a filled engine's decode steps to another attention path, with or without
    static-shape graphs, without refilling its KV cache (the runner's per-step settings)."""
    from rollout.engine.step_graphs import StepGraphs
    from rollout.model.triton_attention import triton_unavailable_reason
    runner = engine.runner
    if attention == "triton" and (reason := triton_unavailable_reason(runner.device)) is not None:
        raise RuntimeError(f"triton attention cannot run here: {reason}")
    runner.attention = attention
    if graphs and attention not in cache:
        cache[attention] = StepGraphs(runner.model, runner.cache, attention, runner.ar_layout,
                                      engine.tidar.mask_token_id)
    runner.graphs = cache[attention] if graphs else None


def swap_rates(engine, device: str, repeats: int) -> dict:
    """The last leg of a weight push on this device: `Engine.load_weights` (verified tensors
    into the serving parameters: the copy a replica makes while paused) of the engine's own
    weights negated (random weights stay random weights), from a copy on the device (what a
    CUDA / HIP IPC hand-over would give) and, on a GPU, from pinned host memory (a host
    segment's bytes). GB/s of weights, best of `repeats`; `equal`: the parameters hold the last
    push's values afterwards (each push differs from what the parameters held). Run before any
    sequence is running (a swap recomputes running sequences' K/V, which would be timed too)."""
    params = {t.data_ptr(): (n, t) for n, t in engine.model.state_dict().items()}  # tied names: one tensor
    nbytes = sum(t.numel() * t.element_size() for _, t in params.values())
    sources = {"device": {n: t.detach().neg() for n, t in params.values()}}
    if device.startswith("cuda"):
        sources["pinned host"] = {n: t.detach().to("cpu").pin_memory() for n, t in params.values()}
    found = {}
    for where, tensors in sources.items():
        best = math.inf
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            engine.load_weights(tensors, version=engine.weight_version)
            sync(device)
            best = min(best, time.perf_counter() - t0)
            for t in tensors.values():  # the next push differs from what is now served
                t.neg_()
        state = engine.model.state_dict()
        equal = all(torch.equal(state[n], t.to(state[n].device).neg()) for n, t in tensors.items())
        found[where] = dict(seconds=round(best, 4), gb_s=round(nbytes / best / 1e9, 2), equal=equal)
    del sources
    return dict(weight_mb=round(nbytes / 1e6, 1), **found)


def step_cost(ctx) -> dict:
    from rollout.config import EngineConfig
    from rollout.engine.drafting import DraftShape

    from .shapes import random_engine
    from .speed_targets import weight_streaming_floor
    from .suite import fill, time_steps
    plan, device, dtype, budget = ctx.plan, ctx.device, ctx.dtype, ctx.budget
    K = plan.block
    shapes = [("AR", None), ("len 2, 1 level", DraftShape(2, (1,))), ("1 level", DraftShape(K, (1,))),
              (f"all {K} levels", DraftShape(K, tuple(range(1, K + 1))))]
    # On a GPU: the cells that matter most first (graphs, then eager). Triton only where it is compiled.
    paths = [("dense", True), ("dense", False)]
    if device.startswith("cuda"):
        paths = [("dense", True), ("triton", True), ("dense", False), ("triton", False)]
    rows, floor, last_fill, swap = [], None, None, None
    batch_max = max(plan.step_batches)
    for i, context in enumerate(plan.step_contexts):
        share = budget.share(len(plan.step_contexts) - i)
        # A fill grows at least with its context: not started if it and one cell would not fit.
        fill_guess = last_fill[0] * context / last_fill[1] if last_fill else 0.0
        if share.left() <= fill_guess + budget.longest:
            rows.append(dict(context=context, skipped="time budget"))
            continue
        t0 = time.perf_counter()
        engine = random_engine(plan.shape, K, device, dtype, EngineConfig(
            max_num_seqs=batch_max, max_model_len=context + 16, attention="dense"))
        if swap is None:
            swap = swap_rates(engine, device, 3)
            t0 = time.perf_counter()
        seqs = fill(engine, batch_max, context)
        fill_s = time.perf_counter() - t0
        last_fill = (fill_s, context)
        if floor is None:
            mb, gbs, ms = weight_streaming_floor(engine, device)
            floor = dict(weight_mb=round(mb, 1), copy_gb_s=round(gbs, 1), floor_ms=round(ms, 4))
        graphs_by_path: dict = {}
        for attention, graphs in paths:
            for batch in plan.step_batches:
                label = attention + ("+graphs" if graphs else "")
                if not share.allows():
                    rows.append(dict(path=label, batch=batch, context=context, skipped="time budget"))
                    continue
                with share.cell(), budget.cell():
                    set_step_path(engine, attention, graphs, graphs_by_path)
                    ms = [1000 * time_steps(engine, seqs[:batch], s, ctx.repeats, device) for _, s in shapes]
                rows.append(dict(path=label, batch=batch, context=context, fill_s=round(fill_s, 2),
                                 **{f"{n} ms": round(m, 4) for (n, _), m in zip(shapes, ms)},
                                 **{f"{n} / AR": round(m / ms[0], 3) for (n, _), m in zip(shapes[1:], ms[1:])}))
        del engine, seqs, graphs_by_path
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ar_ref = next((r for r in rows if r.get("batch") == min(plan.step_batches) and "AR ms" in r
                   and r["path"].startswith("dense")), None)
    if floor is not None and ar_ref is not None:
        floor.update(ar_step_ms=ar_ref["AR ms"], path=ar_ref["path"], batch=ar_ref["batch"], context=ar_ref["context"],
                     ar_over_floor=round(ar_ref["AR ms"] / floor["floor_ms"], 2))
    names = [n for n, _ in shapes]
    md = [f"| path | batch | context | " + " | ".join(f"{n} ms" for n in names) + " | TiDAR / AR (" +
          " ; ".join(names[1:]) + ") |", "|---|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        if "skipped" in r:
            md.append(f"| {r.get('path', '-')} | {r.get('batch', '-')} | {r['context']} | skipped: {r['skipped']} |")
        else:
            md.append(f"| {r['path']} | {r['batch']} | {r['context']} | " +
                      " | ".join(f"{r[n + ' ms']:.3f}" for n in names) + " | " +
                      " / ".join(f"{r[n + ' / AR']:.2f}x" for n in names[1:]) + " |")
    if floor and "ar_step_ms" in floor:
        md += ["", f"bandwidth floor: {floor['weight_mb']} MB of weights at {floor['copy_gb_s']} GB/s (a device copy "
                   f"measured now) = {floor['floor_ms']:.3f} ms; the AR step ({floor['path']}, batch {floor['batch']}, "
                   f"context {floor['context']}) takes {floor['ar_step_ms']:.3f} ms = {floor['ar_over_floor']}x the floor"]
    if swap and floor:
        copy_s = 2 * swap["weight_mb"] / 1e3 / floor["copy_gb_s"]  # a device copy of the same bytes: read + write
        swap["copy_floor_s"] = round(copy_s, 6)
        for w in ("device", "pinned host"):
            if w in swap:
                swap[w]["over_copy"] = round(swap[w]["seconds"] / copy_s, 2)
        md += ["", f"weight swap (`Engine.load_weights` of {swap['weight_mb']} MB, best of 3): " + "; ".join(
            f"from {w} {swap[w]['gb_s']} GB/s ({swap[w]['over_copy']}x a device copy of the same bytes)"
            for w in ("device", "pinned host") if w in swap)]
    done = [r for r in rows if "AR ms" in r]
    summary = [f"{len(done)} cells, {len(rows) - len(done)} skipped"]
    for r in done:
        if r["batch"] in (1, max(plan.step_batches)) and r["path"] in ("dense+graphs", "triton+graphs", "dense"):
            summary.append(f"{r['path']} b{r['batch']} ctx{r['context']}: AR {r['AR ms']:.2f} ms, TiDAR/AR " +
                           " / ".join(f"{r[n + ' / AR']:.2f}" for n in names[1:]))
    if floor and "ar_over_floor" in floor:
        summary.append(f"AR step / bandwidth floor: {floor['ar_over_floor']}x ({floor['floor_ms']:.3f} ms floor)")
    summary = summary[:7]
    if swap:
        summary.append("weight swap: " + ", ".join(f"from {w} {swap[w]['gb_s']} GB/s" for w in ("device", "pinned host")
                                                   if w in swap))
    return dict(rows=rows, bandwidth_floor=floor, weight_swap=swap, shapes=names, markdown=md, summary=summary)


def ratio(a: float, b: float) -> float | None:
    """a / b to 3 places; None where b is 0 (a run cut before it generated anything)."""
    return round(a / b, 3) if b else None


def times(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ---------------------------------------------------------------- part c: end to end
def load_model(ctx, name: str):
    """(our decoder, HF model on the same weights, block length, prompts source) for "embedded"
    or a named random shape (HF's random init, copied into our decoder)."""
    from rollout import Engine
    from rollout.config import EngineConfig

    from .shapes import random_decoder
    from .suite import hf_model
    if name == "embedded":  # loaded as `rollout serve` loads it; the engine around it is dropped
        loaded = Engine.from_pretrained(EMBEDDED, device=ctx.device, dtype=ctx.dtype,
                                        config=EngineConfig(max_num_seqs=1, max_model_len=64))
        return loaded.model, hf_model(EMBEDDED, name, ctx.device, ctx.dtype), loaded.tidar
    from rollout.config import TidarConfig
    hf = hf_model(None, name, ctx.device, ctx.dtype)
    model = random_decoder(name, ctx.device, ctx.dtype)
    ours, theirs = model.state_dict(), hf.state_dict()
    if missing := sorted(set(ours) - set(theirs)):
        raise RuntimeError(f"HF's {name} has no tensors named {missing[:3]}...: the weights would differ")
    with torch.no_grad():
        for key, t in ours.items():
            t.copy_(theirs[key])
    return model, hf, TidarConfig(mask_token_id=model.config.vocab_size - 1, block_size=ctx.plan.block)


def end_to_end(ctx) -> dict:
    from rollout import Engine
    from rollout.config import EngineConfig

    from .suite import hf_rate, sampler_rates
    plan, device, budget = ctx.plan, ctx.device, ctx.budget
    rows = []
    for i, name in enumerate(("embedded", plan.shape)):
        share = budget.share(2 - i)
        model = hf = None
        for drafting in ("auto", "fixed"):  # auto first: what `rollout serve` runs
            for batch in ctx.e2e_batches:
                if not share.allows():
                    rows.append(dict(model=name, drafting=drafting, batch=batch, skipped="time budget"))
                    continue
                with share.cell():
                    if model is None:
                        model, hf, tidar = load_model(ctx, name)
                        prompts = ctx.prompts(model.config.vocab_size, max(ctx.e2e_batches), plan.prompt_len,
                                              name == "embedded")
                        engines, hf_rates = {}, {}
                    if drafting not in engines:
                        engines.clear()
                        engines[drafting] = Engine(model, tidar, device, ctx.dtype, EngineConfig(
                            max_num_seqs=max(ctx.e2e_batches), max_model_len=plan.prompt_len + plan.max_tokens,
                            cuda_graphs=True, drafting=drafting, calibration_seconds=plan.calibration_seconds))
                    engine = engines[drafting]
                    rates, tpf, cut = sampler_rates(engine, prompts[:batch], plan.max_tokens, True, device,
                                                    deadline=share.end)
                    if batch not in hf_rates:
                        hf_rates[batch] = hf_rate(hf, prompts[:batch], plan.max_tokens, device)
                    rows.append(dict(model=name, drafting=drafting, batch=batch,
                                     **{f"{s} tok/s": round(r, 1) for s, r in rates.items()},
                                     **{"HF tok/s": round(hf_rates[batch], 1),
                                        "lossless / AR": ratio(rates["lossless"], rates["ar"]),
                                        "AR / HF": ratio(rates["ar"], hf_rates[batch]),
                                        "tokens/forward": round(tpf, 2), "cut": cut}))
        del model, hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    md = ["| model | drafting | batch | lossless tok/s | mixed tok/s | AR tok/s | HF tok/s | lossless / AR | AR / HF | "
          "tokens/forward |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['drafting']} | {r['batch']} | "
        md.append(head + (f"skipped: {r['skipped']} |" if "skipped" in r else
                          f"{r['lossless tok/s']:.0f} | {r['mixed tok/s']:.0f} | {r['ar tok/s']:.0f} | "
                          f"{r['HF tok/s']:.0f} | {times(r['lossless / AR'])} | {times(r['AR / HF'])} | "
                          f"{r['tokens/forward']}{' (cut at the budget)' if r['cut'] else ''} |"))
    done = [r for r in rows if "skipped" not in r]
    summary = [f"{len(done)} cells, {len(rows) - len(done)} skipped, {sum(r['cut'] for r in done)} cut"] + [
        f"{r['model']} {r['drafting']} b{r['batch']}: lossless/AR {times(r['lossless / AR'])}, "
        f"AR/HF {times(r['AR / HF'])}, "
        f"{r['tokens/forward']} tok/fwd" for r in done if r["drafting"] == "auto"]
    return dict(rows=rows, markdown=md, summary=summary[:7])


# ---------------------------------------------------------------- part d: GRPO-shaped re-rollout
def long_tailed_lengths(count: int, cap: int, seed: int = 0) -> list[int]:
    """Generation lengths of a GRPO batch: log-normal (median cap / 6, a few near the cap),
    clipped to [4, cap]."""
    rng = random.Random(seed)
    return [max(4, min(cap, round(math.exp(rng.gauss(math.log(cap / 6), 0.9))))) for _ in range(count)]


def rollout_once(engine, prompts, lengths, samples: int, sampler: str, seed: int, device: str,
                 deadline: float, temperature: float = 1.0) -> dict:
    """One GRPO batch: every prompt a request of `samples` samples and its own length, all
    queued at once and stepped to the end (or ended at `deadline`: cut). Returns its wall
    time, tokens, engine steps and the requests' counters added up (`stats`)."""
    from rollout import SamplingParams
    from rollout.engine.sequence import GenerationStats
    requests = [engine.add_request([prompt], SamplingParams(sampler=sampler, temperature=temperature,
                                                            max_tokens=length, n=samples, seed=seed))
                for prompt, length in zip(prompts, lengths)]
    sync(device)
    t0, tokens, forwards, cut = time.perf_counter(), 0, 0, False
    while engine.has_work:
        if time.perf_counter() > deadline:
            cut = True
            for request in requests:
                tokens += sum(len(s.out.token_ids) for s in engine.abort(request.request_id))
            break
        out = engine.step()
        forwards += 1
        tokens += sum(len(s.out.token_ids) for s in out.finished)
    sync(device)
    stats = GenerationStats()
    for request in requests:
        stats.add(request.stats)
    return dict(seconds=time.perf_counter() - t0, tokens=tokens, forwards=forwards, cut=cut, stats=stats)


def epoch_row(model: str, temperature: float, epoch: int, runs: dict, history_tokens: int) -> dict:
    """One epoch's cell: AR and lossless + auto wall times and their speed ratio (tokens per
    second: a run cut at the budget generated fewer tokens; None where one generated none),
    medians over the epoch's pairs; the first lossless run's tokens per row-forward and its
    decode row-steps by draft source."""
    from rollout.engine.drafting import source_summary

    def rate(run: dict) -> float:
        return run["tokens"] / run["seconds"] if run["seconds"] > 0 else 0.0
    ar, auto = (statistics.median(rate(r) for r in runs[n]) for n in ("ar", "lossless"))
    first = runs["lossless"][0]["stats"]  # the epoch's first lossless run: its drafts came from earlier epochs only
    sources = source_summary(first.draft_sources)
    return dict(model=model, temperature=temperature, epoch=epoch, tokens=runs["ar"][0]["tokens"],
                repeats=len(runs["ar"]), ar_s=round(statistics.median(r["seconds"] for r in runs["ar"]), 3),
                auto_lossless_s=round(statistics.median(r["seconds"] for r in runs["lossless"]), 3),
                auto_over_ar_speed=ratio(auto, ar) if auto > 0 else None, ar_forwards=runs["ar"][0]["forwards"],
                auto_forwards=runs["lossless"][0]["forwards"], tokens_per_forward=round(first.tokens_per_forward, 3),
                sources={k: dict(share=v["share"], acceptance=v["acceptance"]) for k, v in sources.items()},
                history_tokens_at_start=history_tokens, cut=any(r["cut"] for v in runs.values() for r in v))


def grpo_rollout(ctx) -> dict:
    """The same GRPO batch rolled out epoch after epoch with new seeds, as RL does (issue 26's
    re-rollout cell): per temperature, the engine's history store starts empty, so epoch 1
    drafts only from its rows' growing siblings and later epochs also from the earlier ones'
    completions. Each epoch runs our AR and lossless + auto drafting (calibrated on this device
    in the GPU plan) on one engine, in alternating order and with the epoch's seed; a run's
    completions with the keys of the next run's rows are dropped by the store when that run
    begins, so every lossless run drafts from the earlier epochs (and its own siblings) only."""
    from rollout import Engine
    from rollout.config import EngineConfig
    plan, device, budget = ctx.plan, ctx.device, ctx.budget
    lengths = long_tailed_lengths(plan.rollout_prompts, plan.rollout_max_tokens)
    rows, cells = [], len(plan.rollout_models) * len(plan.rollout_temperatures)
    for i, name in enumerate(plan.rollout_models):
        model_share = budget.share(len(plan.rollout_models) - i)
        if not model_share.allows():
            rows.append(dict(model=name, skipped="time budget"))
            continue
        model, _, tidar = load_model(ctx, name)
        prompts = ctx.prompts(model.config.vocab_size, plan.rollout_prompts, plan.prompt_len, name == "embedded")
        engine = Engine(model, tidar, device, ctx.dtype, EngineConfig(
            max_num_seqs=plan.rollout_prompts * plan.rollout_samples,
            max_model_len=plan.prompt_len + plan.rollout_max_tokens, cuda_graphs=True, drafting="auto",
            calibration_seconds=plan.calibration_seconds, cost_model=plan.rollout_cost_model))
        # Untimed first pass of each (captures every graph shape the timed passes meet).
        warm = [rollout_once(engine, prompts, lengths, plan.rollout_samples, sampler, 99, device, model_share.end)
                for sampler in ("ar", "lossless")]
        if any(w["cut"] for w in warm):
            rows.append(dict(model=name, skipped="the warm-up passes used the budget"))
            del engine, model
            continue
        for j, temperature in enumerate(plan.rollout_temperatures):
            share = model_share.share(len(plan.rollout_temperatures) - j)
            if engine.history is not None:
                engine.history.clear()
            for epoch in range(1, plan.rollout_epochs + 1):
                if not share.allows():
                    rows.append(dict(model=name, temperature=temperature, epoch=epoch, skipped="time budget"))
                    continue
                seed = 1000 * epoch + round(100 * temperature)
                runs = {"ar": [], "lossless": []}
                held = engine.history.num_tokens if engine.history is not None else 0
                # Each run of the epoch's first pair gets half of the epoch's share of what is left, so
                # a short budget cuts both at the same length instead of leaving the second nothing.
                epoch_end = time.perf_counter() + share.left() / (plan.rollout_epochs - epoch + 1)
                with share.cell():
                    for rep in range(max(1, ctx.repeats // 5)):
                        pair_start = time.perf_counter()
                        for k, sampler in enumerate(("ar", "lossless") if (epoch + rep) % 2 else ("lossless", "ar")):
                            deadline = pair_start + (epoch_end - pair_start) * (k + 1) / 2
                            runs[sampler].append(rollout_once(engine, prompts, lengths, plan.rollout_samples,
                                                              sampler, seed, device, deadline, temperature))
                        if epoch_end - time.perf_counter() < time.perf_counter() - pair_start:
                            break
                rows.append(epoch_row(name, temperature, epoch, runs, held))
        del engine, model
    md = ["| model | T | epoch | prompts x samples, tokens | AR s | auto (lossless) s | auto / AR speed | "
          "tokens / row-forward | row-steps by draft source (acceptance) | forwards AR / auto |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            t = f"{r['temperature']:g}" if "temperature" in r else "-"
            md.append(f"| {r['model']} | {t} | {r.get('epoch', '-')} | skipped: {r['skipped']} |")
            continue
        sources = ", ".join(f"{k} {v['share']:.0%} ({v['acceptance']:.2f})" for k, v in r["sources"].items()
                            if k != "none" or v["share"] >= 0.01)
        md.append(f"| {r['model']} | {r['temperature']:g} | {r['epoch']} | {plan.rollout_prompts} x "
                  f"{plan.rollout_samples}, {r['tokens']} | {r['ar_s']:.2f} | {r['auto_lossless_s']:.2f} | "
                  f"{times(r['auto_over_ar_speed'])} | {r['tokens_per_forward']:.2f} | {sources} | "
                  f"{r['ar_forwards']} / {r['auto_forwards']}{' (cut at the budget)' if r['cut'] else ''} |")
    md += ["", f"Generation lengths: median {statistics.median(lengths):g}, max {max(lengths)}; {cells} "
           "(model, temperature) cells, each starting from an empty history store."]
    summary = [f"{r['model']} T={r['temperature']:g} epoch {r['epoch']}: auto/AR speed {times(r['auto_over_ar_speed'])}, "
               f"{r['tokens_per_forward']:.2f} tok/row-fwd" for r in rows if "skipped" not in r]
    return dict(rows=rows, markdown=md, summary=summary[:8] or ["skipped"])


# ---------------------------------------------------------------- part e: MoE families vs HF
# The random shapes of `benchmarks/moe_decode.py` and `zaya_decode.py` (issue 24's speed cells);
# the smoke plan halves their layers.
MOE_FAMILIES = ("qwen3_moe", "zaya")


def moe_families(ctx) -> dict:
    """Our AR decode (greedy) against HF `generate` on the same random Qwen3-MoE and ZAYA
    weights, at part c's batches: one unmeasured round per batch, then the run's repeats
    interleaved, median tokens/s. CUDA graphs for Qwen3-MoE where the device has a grouped GEMM
    (no host read; the per-expert loop reads counts on the host), eager ZAYA (it refuses them);
    no torch.compile, as in the rest of the run."""
    import tempfile

    import transformers

    from rollout.model.moe import grouped_gemm_runs

    from . import moe_decode, zaya_decode
    plan, device, budget = ctx.plan, ctx.device, ctx.budget
    rows = []
    for i, family in enumerate(MOE_FAMILIES):
        share = budget.share(len(MOE_FAMILIES) - i)
        module = moe_decode if family == "qwen3_moe" else zaya_decode
        args = module.parser().parse_args(["--max-tokens", str(plan.max_tokens), "--prompt-len", str(plan.prompt_len),
                                           "--repeats", str(ctx.repeats)] + (["--layers", "2"] if plan.name == "smoke" else []))
        with torch.inference_mode():  # a device without a grouped GEMM runs the host-reading loop: no graphs
            graphs = family == "qwen3_moe" and grouped_gemm_runs(torch.zeros(1, 8, device=device, dtype=ctx.dtype),
                                                                 torch.zeros(1, 8, 4, device=device, dtype=ctx.dtype))
        with tempfile.TemporaryDirectory() as model_dir:
            hf = None
            for batch in ctx.e2e_batches:
                if not share.allows():
                    rows.append(dict(family=family, batch=batch, skipped="time budget"))
                    continue
                with share.cell():
                    if hf is None:
                        module.build(model_dir, args)
                        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=ctx.dtype)
                        hf = hf.to(device).eval()
                    rng = random.Random(batch)
                    prompts = [[rng.randrange(2, args.vocab - 1) for _ in range(args.prompt_len)] for _ in range(batch)]
                    med, _ = moe_decode.decode_medians(model_dir, hf, args, prompts, ("ar", "hf"), device, ctx.dtype,
                                                       cuda_graphs=graphs)
                    rows.append(dict(family=family, batch=batch, ours_tok_s=round(med["ar"], 1),
                                     hf_tok_s=round(med["hf"], 1), ours_over_hf=ratio(med["ar"], med["hf"]),
                                     cuda_graphs=graphs, experts_implementation=hf.config._experts_implementation))
        del hf
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    md = ["| family | batch | ours AR tok/s | HF generate tok/s | ours / HF |", "|---|---|---|---|---|"]
    md += [f"| {r['family']} | {r['batch']} | skipped: {r['skipped']} |" if "skipped" in r else
           f"| {r['family']} | {r['batch']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {times(r['ours_over_hf'])} |"
           for r in rows]
    summary = [", ".join(f"{r['family']} b{r['batch']} {times(r['ours_over_hf'])}" for r in rows if "skipped" not in r)
               or "skipped"]
    return dict(rows=rows, markdown=md, summary=summary)


def correctness(ctx) -> dict:
    from .gpu_checks import run_checks
    checks = run_checks(ctx.device, ctx.plan.checks, ctx.budget)
    md = ["| check | result | seconds | figures |", "|---|---|---|---|"]
    for c in checks:
        verdict = {True: "pass", False: "FAIL", None: "not run"}[c["ok"]]
        figures = {k: v for k, v in c.items() if k not in ("name", "ok", "seconds", "traceback")}
        md.append(f"| {c['name']} | {verdict} | {c.get('seconds', '-')} | {json.dumps(figures)} |")
    failed = [c["name"] for c in checks if c["ok"] is False]
    summary = [f"{sum(c['ok'] is True for c in checks)}/{len(checks)} pass" +
               (f"; FAILED: {', '.join(failed)}" if failed else "")]
    return dict(checks=checks, ok=not failed, markdown=md, summary=summary)
