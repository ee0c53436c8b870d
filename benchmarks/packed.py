"""Packed projections (one GEMM for q/k/v, one for gate/up) against the plain path, in one run.

The same engine decodes the same prompts with its packs in place and with them dropped
(`Decoder.pack_projections` again restores them), the two interleaved `--repeats` times, eager
and, with --compile, compiled (each variant is its own compilation, done before timing).

    python -m benchmarks.packed                       # embedded model, CPU, eager and compiled
    python -m benchmarks.packed --device cuda --batches 1,16

Prints median tokens/s of each and packed / plain per batch. Tokens are the same either way
(the test suite checks the numbers agree to 1e-5); only the speed differs.
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


def rate(engine: Engine, prompts, args, seed: int) -> float:
    sync(args.device)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(sampler="ar", max_tokens=args.max_tokens, seed=seed))
    sync(args.device)
    return engine.last_stats.generated_tokens / (time.perf_counter() - t0)


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
            rates = {True: [], False: []}
            for packed in (True, False):  # compile (or warm) both variants before timing
                set_packed(engine, packed)
                rate(engine, prompts[:batch], args, seed=99)
            for rep in range(args.repeats):
                for packed in (True, False):
                    set_packed(engine, packed)
                    rates[packed].append(rate(engine, prompts[:batch], args, seed=rep))
            plain, packed = statistics.median(rates[False]), statistics.median(rates[True])
            lines.append(f"| {mode} | {batch} | {plain:.0f} | {packed:.0f} | {packed / plain:.2f}x |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
