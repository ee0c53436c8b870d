"""Compiled decode steps as one call (forward and sampling fused) against two calls, in one run.

Under `compile=True` the runner runs a decode step through `runner.ar_step` or
`runner.tidar_step`, one compiled function for the forward and the sampling half; before, a
step made two compiled calls (`forward`, then `ar_sample` or `tidar_sample`), each paying
dynamo's guard evaluation and Inductor's Python wrapper. This script times both on the same
compiled engine (the two-call variant is the runner with `fused = False`), interleaved
`--repeats` times after a warm-up that compiles both, for the `ar` sampler (AR steps) and the
`lossless` one (TiDAR steps of every level: fixed drafting), and says whether both variants
returned the same tokens.

    python -m benchmarks.fused_ar                          # embedded model, CPU, batches 1 and 8
    python -m benchmarks.fused_ar --device cuda --batches 1,16

Prints per batch the median tokens/s of each and the median of the paired ratios (each repeat
runs both variants back to back, so the ratio of a pair is less exposed to a noisy machine).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig

from .acceptance import heldout_prompts

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED)
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9, help="interleaved runs of each variant (medians)")
    p.add_argument("--samplers", default="ar,lossless", help="comma-separated: ar (AR steps), lossless (TiDAR)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    prompts = heldout_prompts(args.model, args.corpus, max(batches), args.prompt_len)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, config=EngineConfig(
        max_num_seqs=max(batches), max_model_len=args.prompt_len + args.max_tokens, compile=True,
        drafting="fixed"))

    def use(variant: str) -> None:
        engine.runner.fused = variant == "fused"

    def run(sampler: str, batch: int, seed: int) -> tuple[float, list[list[int]]]:
        sync(args.device)
        t0 = time.perf_counter()
        out = engine.generate(prompts[:batch], SamplingParams(sampler=sampler, max_tokens=args.max_tokens, seed=seed))
        sync(args.device)
        return engine.last_stats.generated_tokens / (time.perf_counter() - t0), [g[0].token_ids for g in out]

    lines = [f"# compiled decode steps, fused vs two calls: {args.model.name}, {args.device} ({device}, "
             f"{torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}; "
             f"{args.max_tokens} tokens per row, {args.repeats} interleaved repeats", "",
             "| sampler | batch | two calls tokens/s | fused tokens/s | fused / two (median of pairs) "
             "| same tokens |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for sampler in args.samplers.split(","):
        for batch in batches:
            tokens = {}
            for variant in ("fused", "two"):  # compile (or warm) both before timing
                use(variant)
                tokens[variant] = run(sampler, batch, seed=99)[1]
            rates = {"fused": [], "two": []}
            for rep in range(args.repeats):
                for variant in (("fused", "two") if rep % 2 else ("two", "fused")):
                    use(variant)
                    rates[variant].append(run(sampler, batch, seed=rep)[0])
            ratio = statistics.median(f / t for f, t in zip(rates["fused"], rates["two"]))
            lines.append(f"| {sampler} | {batch} | {statistics.median(rates['two']):.0f} "
                         f"| {statistics.median(rates['fused']):.0f} | {ratio:.3f}x "
                         f"| {'yes' if tokens['fused'] == tokens['two'] else 'NO'} |")
            print(lines[-1], flush=True)
    use("fused")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
