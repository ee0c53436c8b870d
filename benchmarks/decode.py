"""Decode throughput of ar / lossless / mixed through the same engine, in one run.

Reports, per sampler and batch size: generated tokens/s, mean tokens per forward (per row), and
the mean wall time of one decode forward (prefill excluded). Ratios between samplers are only
meaningful within one run; absolute times only on the device they were measured on.

    python benchmarks/decode.py --model rollout/default_model --batch-sizes 1,16,64
    python benchmarks/decode.py --shape qwen2.5-0.5b --batch-sizes 1 --max-tokens 32   # random weights

A random-weight model measures forward cost only: its drafts are noise, so tokens per forward
stays near 1. Acceptance needs a trained TiDAR model (--model).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch
from shapes import SHAPES, random_engine

from rollout import Engine, SamplingParams
from rollout.config import ATTENTION_PATHS, EngineConfig


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(engine: Engine, batch: int, sampler: str, args) -> dict:
    rng = random.Random(batch)
    vocab = engine.config.vocab_size - 1
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
    params = SamplingParams(sampler=sampler, temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=0, mix_weight=args.mix_weight)
    engine.generate(prompts[:1], SamplingParams(sampler=sampler, max_tokens=4, seed=0))  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - t0
    s = engine.last_stats
    decode_forwards = max(s.forward_passes - 1, 1)
    return dict(sampler=sampler, batch=batch, tokens=s.generated_tokens, seconds=round(seconds, 4),
                tokens_per_s=round(s.generated_tokens / seconds, 2),
                tokens_per_forward=round(s.tokens_per_forward, 3),
                ms_per_forward=round(1000 * s.decode_seconds / decode_forwards, 3),
                prefill_ms=round(1000 * s.prefill_seconds, 2),
                acceptance_by_position=[round(a, 3) for a in s.acceptance_by_position],
                level_choices=dict(s.level_choices))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory with TiDAR settings (else --shape)")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="random-weight model shape")
    p.add_argument("--block-size", type=int, default=None, help="TiDAR block length (default: model's, or 16)")
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--samplers", default="ar,lossless,mixed", help="comma-separated samplers")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per row")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--mix-weight", type=float, default=0.5, help="w of the mixed sampler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--drafting", default="fixed", choices=["fixed", "auto"],
                   help="fixed: every decode step pre-drafts all levels; auto: cost-aware level choice")
    p.add_argument("--attention", default="dense", choices=list(ATTENTION_PATHS), help="attention path")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward and step sampling")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="static-shape decode steps (CUDA graphs on a GPU, eager static shapes on the CPU)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    # A KV pool with a slot for every row of the largest batch, sized to this run's sequences.
    config = EngineConfig(max_num_seqs=max(int(b) for b in args.batch_sizes.split(",")),
                          max_model_len=args.prompt_len + args.max_tokens, drafting=args.drafting,
                          attention=args.attention, compile=args.compile,
                          cuda_graphs=args.cuda_graphs)
    if args.model:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, block_size=args.block_size,
                                        config=config)
        what = args.model
    else:
        engine = random_engine(args.shape, args.block_size or 16, args.device, dtype, config)
        what = f"random {args.shape}"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# {what}, block {engine.tidar.block_size}, levels {len(engine.tidar.level_set)} ({args.drafting}), "
          f"{args.attention} attention{', compiled' if args.compile else ''}"
          f"{', CUDA graphs' if args.cuda_graphs else ''}, "
          f"{args.device} "
          f"({device_name}, {torch.get_num_threads()} threads), {dtype}, prompt {args.prompt_len}, "
          f"max_tokens {args.max_tokens}, T={args.temperature}, torch {torch.__version__}")
    rows = []
    print("| batch | sampler | tokens/s | vs ar | tokens/forward | ms/forward | prefill ms | row-steps by level set |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        base = None
        for sampler in args.samplers.split(","):
            r = run(engine, batch, sampler, args)
            base = base or (r["tokens_per_s"] if sampler == "ar" else None)
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            print(f"| {batch} | {sampler} | {r['tokens_per_s']} | {ratio} | {r['tokens_per_forward']} | "
                  f"{r['ms_per_forward']} | {r['prefill_ms']} | {r['level_choices']} |", flush=True)
            rows.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=what, device=args.device, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
