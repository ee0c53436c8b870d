"""Packed projections (one GEMM for q/k/v, one for gate/up) against the plain path, in one run.

The same engine decodes the same prompts with its packs in place and with them dropped
(`Decoder.pack_projections` again restores them), the two interleaved `--repeats` times, eager
and, with --compile, compiled (each variant is its own compilation, done before timing).

    python -m benchmarks.packed                       # embedded model, CPU, eager and compiled
    python -m benchmarks.packed --device cuda --batches 1,16

Prints median tokens/s of each and packed / plain (the median of interleaved pairs) per batch.
Tokens are the same either way (the test suite checks the numbers agree to 1e-5); only the
speed differs.
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


def set_packed(engine: Engine, packed: bool) -> None:
    if packed:
        engine.model.pack_projections()  # in the layout it had
    else:
        engine.model.unpack_projections()
    assert engine.model.packs_current() == packed


def generate_rate(engine: Engine, prompts, sampler: str, args, seed: int) -> tuple[float, list[list[int]]]:
    """Tokens/s of one timed `generate` of `prompts`, and each prompt's first completion."""
    sync(args.device)
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(sampler=sampler, max_tokens=args.max_tokens, seed=seed))
    sync(args.device)
    return engine.last_stats.generated_tokens / (time.perf_counter() - t0), [g[0].token_ids for g in out]


def interleaved(run, use, variants: tuple[str, str], repeats: int) -> tuple[dict[str, float], float, bool]:
    """One cell of an in-process A/B: `use(v)` switches the engine to variant v, `run(seed)`
    returns (tokens/s, tokens). Each variant runs once untimed (compiling or warming it), then
    `repeats` pairs back to back, the order alternating. Returns the median tokens/s of each
    variant, the median of the pairs' first / second ratios (a pair is less exposed than a
    ratio of medians to a machine whose speed drifts) and whether the untimed runs returned the
    same tokens."""
    tokens, rates = {}, {v: [] for v in variants}
    for v in variants:
        use(v)
        tokens[v] = run(99)[1]
    for rep in range(repeats):
        for v in (variants if rep % 2 else variants[::-1]):
            use(v)
            rates[v].append(run(rep)[0])
    first, second = variants
    ratio = statistics.median(a / b for a, b in zip(rates[first], rates[second]))
    return {v: statistics.median(r) for v, r in rates.items()}, ratio, tokens[first] == tokens[second]


def sampler_table(title: str, labels: tuple[str, str], engine: Engine, args, batches: list[int], prompts,
                  use, variants: tuple[str, str]) -> list[str]:
    """An A/B table with a row per sampler (`args.samplers`) and batch: the median tokens/s of
    the second variant and the first (headed by `labels`, in that order), the median of the
    pairs' first / second ratios and whether both returned the same tokens. Printed as it
    goes; returns its lines."""
    new, old = labels
    lines = [title, "", f"| sampler | batch | {old} tokens/s | {new} tokens/s | {new} / {old} (median of pairs) "
             "| same tokens |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    first, second = variants
    for sampler in args.samplers.split(","):
        for batch in batches:
            med, ratio, same = interleaved(lambda seed: generate_rate(engine, prompts[:batch], sampler, args, seed),
                                           use, variants, args.repeats)
            lines.append(f"| {sampler} | {batch} | {med[second]:.0f} | {med[first]:.0f} | {ratio:.3f}x "
                         f"| {'yes' if same else 'NO'} |")
            print(lines[-1], flush=True)
    return lines


def ab_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of an in-process A/B benchmark (this one, `fused_ar`): model, prompts, batches."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED)
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved runs of each variant (medians)")
    return p


def ab_setup(args) -> tuple[list[int], torch.dtype, list[list[int]], str]:
    """Parsed `ab_parser` options -> (batch sizes, dtype, held-out prompts, device name)."""
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    prompts = heldout_prompts(args.model, args.corpus, max(batches), args.prompt_len)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return batches, dtype, prompts, device


def main(argv: list[str] | None = None) -> str:
    p = ab_parser(__doc__, repeats=5)
    p.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    args = p.parse_args(argv)
    batches, dtype, prompts, device = ab_setup(args)
    lines = [f"# packed vs plain projections: {args.model.name}, {args.device} ({device}, "
             f"{torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}; AR, "
             f"{args.max_tokens} tokens per row, median of {args.repeats}", "",
             "| mode | batch | plain tokens/s | packed tokens/s | packed / plain |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for mode in args.modes.split(","):
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, config=EngineConfig(
            max_num_seqs=max(batches), max_model_len=args.prompt_len + args.max_tokens,
            compile=mode == "compiled"))
        for batch in batches:
            med, ratio, _ = interleaved(lambda seed: generate_rate(engine, prompts[:batch], "ar", args, seed),
                                        lambda v: set_packed(engine, v == "packed"), ("packed", "plain"),
                                        args.repeats)
            lines.append(f"| {mode} | {batch} | {med['plain']:.0f} | {med['packed']:.0f} | {ratio:.2f}x |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
