"""The step-speed targets in one run: is TiDAR ever slower than AR on this device, and is our AR
faster than HF `generate`? (Issue 10's "Measured" list; any device.)

    python -m benchmarks.speed_targets                       # embedded model, CPU, ~10 min on 2 cores
    python -m benchmarks.speed_targets --device cuda --batches 1,8,64,256
    python -m benchmarks.speed_targets --compile             # our forward and step sampling through Inductor

One engine with cost-aware drafting (`--drafting auto`, as `rollout serve` runs it) and its
start-up step-cost calibration; prompts are held-out documents (`benchmarks/acceptance.py`).
For each temperature and batch, the samplers run in turn, `--repeats` times (each repeat with
another seed and the next `batch` prompts; the samplers' order alternates between repeats);
the table gives the median tokens/s of each, the ratios (medians of the per-repeat ratios)
beside their targets, the tokens per forward and the step shapes the cost model chose
(row-steps by label: "ar", "m" levels of the full block, "m/d" m levels at draft length d,
"lookup/d" a lookup step). Then our AR against HF `generate` (same weights, same prompts,
sampling at T = 1, every row forced to --max-tokens).
Ratios are only meaningful within one run; this machine's absolute times are not a GPU's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig

from .acceptance import heldout_prompts
from .rerollout import time_by_kind, time_shares_cell

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
TARGETS = {"lossless / ar": 0.95, "lossless / ar, T=0, batch 1": 1.3, "mixed / lossless, T=1": 1.0,
           "ar / hf, batch 1": 2.0, "ar / hf, batch 16": 1.5}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paired(a: list[float], b: list[float]) -> float:
    """The median of a / b over repeats: each repeat ran both back to back, so a pair's ratio is
    less exposed than a ratio of medians to a machine whose speed drifts between runs."""
    return statistics.median(x / y for x, y in zip(a, b))


def timed(engine: Engine, prompts, params: SamplingParams, device: str) -> tuple[float, float, Counter]:
    sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    sync(device)
    s = engine.last_stats
    return s.generated_tokens / (time.perf_counter() - t0), s.tokens_per_forward, Counter(s.level_choices)


def repeat_prompts(prompts: list, batch: int, rep: int) -> list:
    """The prompts of one repeat of a cell: each repeat takes the next `batch` of them (wrapping
    round), so a small batch is not the measure of one prompt (lookup drafts, for one, gain on
    some documents far more than on others)."""
    start = rep * batch % len(prompts)
    return (prompts[start:] + prompts[:start])[:batch]


def engine_table(engine: Engine, prompts, args) -> list[str]:
    lines = ["| T | batch | ar tokens/s | lossless tokens/s | mixed tokens/s | lossless / ar (target) | "
             "mixed / lossless | tokens/forward lossless | lossless row-steps by shape | "
             "lossless decode time by step kind |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for temperature in args.temperatures:
        samplers = ["ar", "lossless"] + (["mixed"] if temperature > 0 else [])
        for batch in args.batches:
            rates = {s: [] for s in samplers}
            tpf, shapes, kinds = [], Counter(), {}
            if args.compile:  # compile every step shape this cell meets before timing it
                for sampler in samplers:
                    engine.generate(prompts[:batch], SamplingParams(sampler=sampler, temperature=temperature,
                                                                    max_tokens=args.max_tokens, seed=99))
            for rep in range(args.repeats):
                batch_prompts = repeat_prompts(prompts, batch, rep)
                for sampler in (samplers if rep % 2 == 0 else samplers[::-1]):  # no sampler always first
                    params = SamplingParams(sampler=sampler, temperature=temperature, max_tokens=args.max_tokens,
                                            seed=rep, mix_weight=args.mix_weight)
                    before = time_by_kind(engine)
                    rate, per_forward, chosen = timed(engine, batch_prompts, params, args.device)
                    rates[sampler].append(rate)
                    if sampler == "lossless":
                        tpf.append(per_forward)
                        shapes += chosen
                        for kind, (n, t) in time_by_kind(engine).items():  # this run's steps, summed over repeats
                            was, sum_ = before.get(kind, [0, 0.0]), kinds.setdefault(kind, [0, 0.0])
                            sum_[0], sum_[1] = sum_[0] + n - was[0], sum_[1] + t - was[1]
            med = {s: statistics.median(r) for s, r in rates.items()}
            target = TARGETS["lossless / ar, T=0, batch 1"] if temperature == 0 and batch == 1 else TARGETS[
                "lossless / ar"]
            ratio = paired(rates["lossless"], rates["ar"])
            mixed = f"{med['mixed']:.0f}" if "mixed" in med else "-"
            mixed_ratio = f"{paired(rates['mixed'], rates['lossless']):.2f}x" if "mixed" in med else "-"
            lines.append(f"| {temperature:g} | {batch} | {med['ar']:.0f} | {med['lossless']:.0f} | {mixed} | "
                         f"{ratio:.2f}x ({'>=' if ratio >= target else 'below'} {target}) | {mixed_ratio} | "
                         f"{statistics.median(tpf):.2f} | {dict(shapes.most_common())} | "
                         f"{time_shares_cell({}, kinds)} |")
            print(lines[-1], flush=True)
    return lines


def weight_streaming_floor(engine: Engine, device: str) -> tuple[float, float, float]:
    """(MB of weights, GB/s a large copy reaches on this device, ms to read the weights once at
    that rate): the least time of a batch-1 forward that is bound by memory bandwidth."""
    weight_bytes = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    src = torch.empty(32 << 20, dtype=torch.float32, device=device)  # 128 MiB: beyond any cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    rate = 5 * 2 * src.numel() * src.element_size() / (time.perf_counter() - t0)  # read + write
    return weight_bytes / 1e6, rate / 1e9, 1e3 * weight_bytes / rate


def hf_table(engine: Engine, model_dir: Path, prompts, args) -> list[str]:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype).to(args.device).eval()
    lines = ["| batch | HF generate tokens/s | our AR tokens/s | ours / HF (target) |", "|---|---|---|---|"]
    for batch in args.hf_batches:
        ids = torch.tensor(prompts[:batch], device=args.device)
        mask = torch.ones_like(ids)
        hf_rates, ours = [], []
        with torch.inference_mode():
            hf.generate(ids[:1], attention_mask=mask[:1], do_sample=True, max_new_tokens=2, min_new_tokens=2,
                        pad_token_id=0)
            if args.compile:
                engine.generate(prompts[:batch], SamplingParams(sampler="ar", max_tokens=args.max_tokens, seed=99))
            for rep in range(args.repeats):
                for who in (("hf", "ours") if rep % 2 == 0 else ("ours", "hf")):
                    if who == "ours":
                        params = SamplingParams(sampler="ar", max_tokens=args.max_tokens, seed=rep)
                        ours.append(timed(engine, prompts[:batch], params, args.device)[0])
                        continue
                    sync(args.device)
                    t0 = time.perf_counter()
                    hf.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=args.max_tokens,
                                min_new_tokens=args.max_tokens, pad_token_id=0)
                    sync(args.device)
                    hf_rates.append(batch * args.max_tokens / (time.perf_counter() - t0))
        h, o, ratio = statistics.median(hf_rates), statistics.median(ours), paired(ours, hf_rates)
        target = TARGETS.get(f"ar / hf, batch {batch}")
        verdict = f" ({'>=' if ratio >= target else 'below'} {target})" if target else ""
        lines.append(f"| {batch} | {h:.0f} | {o:.0f} | {ratio:.2f}x{verdict} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED, help="HF model directory with TiDAR settings")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--hf-batches", default="1,16", help="batch sizes of the HF comparison ('' : skip it)")
    p.add_argument("--temperatures", default="0,1", help="comma-separated temperatures")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs per cell (medians)")
    p.add_argument("--mix-weight", type=float, default=0.5)
    p.add_argument("--calibration-seconds", type=float, default=20.0,
                   help="seconds of timed steps in the start-up calibration")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our forward and step sampling (HF generate stays eager)")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    biggest = max(args.batches + args.hf_batches)
    prompts = heldout_prompts(args.model, args.corpus, max(biggest, args.repeats), args.prompt_len)  # see repeat_prompts
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, config=EngineConfig(
        max_num_seqs=biggest, max_model_len=args.prompt_len + args.max_tokens, drafting="auto",
        calibration_seconds=args.calibration_seconds, compile=args.compile))
    load = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    head = [f"# {args.model.name}{' (compiled)' if args.compile else ''}, {args.device} ({device}, "
            f"{torch.get_num_threads()} threads), {dtype}, "
            f"torch {torch.__version__}; {len(prompts)} held-out prompts of {args.prompt_len} tokens, "
            f"{args.max_tokens} generated, median of {args.repeats}",
            f"engine start {load:.1f} s, of which step-cost calibration {engine.calibration['seconds']:.1f} s "
            f"({engine.calibration['steps']} timed steps)", ""]
    print("\n".join(head), flush=True)
    lines = head + engine_table(engine, prompts, args)
    if args.hf_batches:
        lines += [""] + hf_table(engine, args.model, prompts, args)
        mb, gbs, ms = weight_streaming_floor(engine, args.device)
        lines += ["", f"weights {mb:.1f} MB; a large copy moves {gbs:.1f} GB/s here, so a batch-1 forward that reads "
                      f"them once takes >= {ms:.2f} ms: AR at batch 1 cannot pass {1e3 / ms:.0f} tokens/s"]
        print(lines[-1], flush=True)
    coef = engine.drafting.costs.coefficients()
    lines += ["", "step cost model after the run (s): " + (
        "a={:.3g}, per TiDAR step {:.3g}, per row {:.3g}, per token {:.3g}, per token x context {:.3g}".format(*coef)
        if coef else "not fitted"),
              "acceptance learned: " + str(engine.drafting.status()["acceptance"])]
    text = "\n".join(lines)
    print("\n".join(lines[-2:]))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
