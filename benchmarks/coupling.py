"""Seed-stable (Gumbel-coupled) verification against the residual rule, on held-out prompts.

Part `acceptance` (issue 25, item 3): tokens per forward of `lossless` with `seed_stable` and
with the residual rule min(1, p/q) (`seed_stable=False`), fixed drafting (every step all the
model's levels), the same prompts and seed, at each --temperatures; the two rules alternate so
both see the same machine load. Also counts the rows where seed-stable `lossless` gave exactly
`ar`'s tokens for the seed (`ar` with seed_stable: the same Gumbel-max noise).

Part `batch` (item 6): how often a row's tokens change with the batch it runs in, which they
may only where float results do (logits move by a few ulps with the batch shape, and a choice
between two near-equal values can flip). The same seeded request runs alone, then admitted
among --others other requests (other prompts and settings, added at other steps); rows whose
tokens differ are counted, for `ar` with inverse-CDF sampling (seed_stable False), `ar` with
Gumbel-max, and seed-stable `lossless` with auto drafting (step shapes then change with the
load too) against `ar` alone.

    python -m benchmarks.coupling --threads 2                      # both parts, embedded model
    python -m benchmarks.coupling --part batch --prompts 24 --n 12
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from .acceptance import heldout_prompts
from rollout import Engine, SamplingParams
from rollout.config import EngineConfig

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def rows_of(out) -> list[list[int]]:
    return [c.token_ids for per_prompt in out for c in per_prompt]


def acceptance(engine: Engine, prompts, args) -> None:
    print("| temperature | rule | tokens/forward | acceptance by draft position | rows == ar | wall s |\n"
          "|---|---|---|---|---|---|", flush=True)
    for t in map(float, args.temperatures.split(",")):
        ar = rows_of(engine.generate(prompts, SamplingParams(sampler="ar", temperature=t, max_tokens=args.max_tokens,
                                                             n=args.n, seed=args.seed)))
        for stable in (True, False):
            t0 = time.perf_counter()
            out = engine.generate(prompts, SamplingParams(temperature=t, max_tokens=args.max_tokens, n=args.n,
                                                          seed=args.seed, seed_stable=stable))
            seconds = time.perf_counter() - t0
            stats, rows = engine.last_stats, rows_of(out)
            same = sum(a == b for a, b in zip(rows, ar))
            accept = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position)
            print(f"| {t:g} | {'seed_stable' if stable else 'residual'} | {stats.tokens_per_forward:.3f} "
                  f"| {accept} | {same}/{len(rows)} | {seconds:.1f} |", flush=True)


def among_others(engine: Engine, prompts, params: SamplingParams, others, args) -> list[list[int]]:
    """The rows of `params` over `prompts`, admitted after a few steps of other requests, with
    more of them added every few steps until it finishes."""
    rng = random.Random(args.seed)
    pending = list(others)
    engine.add_request(*pending.pop(0))
    for _ in range(3):
        engine.step()
    target = engine.add_request(prompts, params)
    rows: dict[tuple[int, int], list[int]] = {}
    steps = 0
    while engine.has_work:
        if pending and steps % rng.randint(2, 5) == 0:
            engine.add_request(*pending.pop(0))
        for seq in engine.step().finished:
            if seq.request is target:
                rows[(seq.out.prompt_index, seq.out.sample_index)] = seq.out.token_ids
        steps += 1
    return [rows[key] for key in sorted(rows)]


def batch_shapes(model: Path, prompts, other_prompts, args) -> None:
    others = [(other_prompts[i::args.others][:3], SamplingParams(
        sampler=("ar", "lossless", "mixed")[i % 3], temperature=(1.0, 0.7, 0.0, 1.3)[i % 4], top_k=(0, 20)[i % 2],
        max_tokens=args.max_tokens // (1 + i % 3), n=1 + i % 4, seed=100 + i)) for i in range(args.others)]
    print("| rows compared | rule | alone vs among others: rows that differ | tokens that differ |\n"
          "|---|---|---|---|", flush=True)
    alone_engine = Engine.from_pretrained(model, config=EngineConfig(drafting="fixed"))
    cases = [("ar", "ar, inverse CDF (seed_stable False)", False, "fixed"),
             ("ar", "ar, Gumbel-max (seed_stable)", True, "fixed"),
             ("lossless", "lossless seed_stable, auto drafting, among others vs ar alone", True, "auto")]
    ar_alone = {}
    for sampler, name, stable, drafting in cases:
        params = SamplingParams(sampler=sampler, temperature=1.0, max_tokens=args.max_tokens, n=args.n,
                                seed=args.seed, seed_stable=stable)
        if sampler == "ar":
            alone = ar_alone[stable] = rows_of(alone_engine.generate(prompts, params))
        else:
            alone = ar_alone[True]
        busy = Engine.from_pretrained(model, config=EngineConfig(drafting=drafting))
        mixed = among_others(busy, prompts, params, others, args)
        differ = [sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) for a, b in zip(alone, mixed)]
        print(f"| {len(alone)} x {args.max_tokens} | {name} | {sum(d > 0 for d in differ)} | {sum(differ)} |",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED, help="model directory (default: the embedded model)")
    p.add_argument("--part", choices=["acceptance", "batch", "both"], default="both", help="what to measure")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per row (no stop token)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="request seed")
    p.add_argument("--temperatures", default="1,0.7,0", help="acceptance part: comma-separated temperatures")
    p.add_argument("--others", type=int, default=12, help="batch part: other requests around the measured one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.model, args.corpus, args.prompts + 3 * args.others, args.prompt_len)
    prompts, other_prompts = prompts[:args.prompts], prompts[args.prompts:]
    print(f"model {args.model}, {args.prompts} prompts x {args.prompt_len} tokens, n {args.n}, "
          f"{args.max_tokens} tokens, seed {args.seed}, threads {torch.get_num_threads()}", flush=True)
    if args.part in ("acceptance", "both"):
        engine = Engine.from_pretrained(args.model, config=EngineConfig(drafting="fixed"))
        acceptance(engine, prompts, args)
    if args.part in ("batch", "both"):
        batch_shapes(args.model, prompts, other_prompts, args)


if __name__ == "__main__":
    main()
