"""Continuous batching vs one request at a time, on ONE replica, in one run.

    python benchmarks/concurrency.py --model rollout/default_model

1. Concurrency through the service (gRPC + one Ray replica): `--requests` concurrent requests,
   each 1 prompt x n samples (lossless, T=1). Requests/s and p50/p99 latency with continuous
   batching (the default) and with the same replica limited to one request at a time
   (`--max-running-requests 1`, the serial mode).
2. A GRPO-shaped batch (64 prompts x 8 samples, lengths long-tailed by a stop token) through
   the engine in this process: tokens/s as one request in continuous mode, as one request in
   serial mode, and as 64 concurrent requests of 1 prompt x 8 (async-GRPO style).
3. Memory: resident set size of a replica (in this process, no Ray) after the first 100 and
   after 1,000 requests of mixed shapes.
Ratios hold within one run; absolute numbers only for the machine they were taken on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time
from pathlib import Path

import grpc
import ray
import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.service.messages import RequestDone
from rollout.service.replica import GeneratorReplica
from rollout.service.serve import RolloutService, init_ray
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
CODE = ["import os\n\ndef ", "class Config:\n    def __init__(self", "for i in range(", "# Parse the",
        "def main(argv", "    return [x for x in ", "with open(path) as f:\n", "if __name__ == "]


def prompts_for(model_dir: str, count: int, seed: int = 0) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    return [tok.encode(CODE[rng.randrange(len(CODE))] + rng.choice(["x", "y", "name", "value", ""]))
            for _ in range(count)]


def newline_id(model_dir: str) -> int:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir).encode("\n")[-1]


async def concurrent_requests(model_dir: str, prompts, args, serial: bool) -> dict:
    config = EngineConfig(max_running_requests=1 if serial else None, max_model_len=args.max_model_len,
                          drafting=args.drafting)
    service = RolloutService(model_dir, replicas=1, port=0, name="serial" if serial else "batched",
                             max_queue=args.requests + 8, engine_config=config)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as ch:
            stub = pb_grpc.RolloutServiceStub(ch)

            def req(i):
                return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=prompts[i % len(prompts)])],
                                          params=pb.SamplingParams(sampler="lossless", temperature=1.0, n=args.n,
                                                                   max_tokens=args.max_tokens, seed=i))

            async def timed(i):
                t0 = time.perf_counter()
                resp = await stub.Generate(req(i), timeout=1800)
                return time.perf_counter() - t0, sum(len(t.token_ids) // 4 for t in resp.trajectories)

            await asyncio.gather(*(timed(i) for i in range(2)))  # warm-up
            t0 = time.perf_counter()
            out = await asyncio.gather(*(timed(i) for i in range(args.requests)))
            seconds = time.perf_counter() - t0
    finally:
        await service.stop(1)
    lat = sorted(x for x, _ in out)
    return dict(mode="serial" if serial else "continuous", seconds=seconds, rps=args.requests / seconds,
                tokens_per_s=sum(t for _, t in out) / seconds, p50=statistics.median(lat),
                p99=lat[min(len(lat) - 1, int(0.99 * len(lat)))])


def grpo_batch(model_dir: str, prompts, args) -> list[dict]:
    stop = newline_id(model_dir)
    params = SamplingParams(sampler="lossless", temperature=1.0, max_tokens=args.grpo_max_tokens, n=8, seed=0,
                            stop_token_ids=(stop,))
    rows = []
    common = dict(max_model_len=args.max_model_len, drafting=args.drafting)
    for label, config, split in (("one request, continuous", EngineConfig(**common), False),
                                 ("one request, serial", EngineConfig(max_running_requests=1, **common), False),
                                 ("64 requests of 1 x 8, continuous", EngineConfig(**common), True)):
        engine = Engine.from_pretrained(model_dir, config=config)
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, seed=1))  # warm-up
        t0 = time.perf_counter()
        if split:
            requests = [engine.add_request([p], params) for p in prompts]
            while engine.has_work:
                engine.step()
            tokens = sum(len(s.out.token_ids) for r in requests for s in r.sequences)
        else:
            tokens = sum(len(c.token_ids) for g in engine.generate(prompts, params) for c in g)
        seconds = time.perf_counter() - t0
        rows.append(dict(mode=label, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                         slots=engine.limits.num_slots))
    return rows


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory(model_dir: str, prompts, args) -> tuple[float, float]:
    replica = GeneratorReplica(model_dir, "mem", metrics_port=None,
                               engine_config=EngineConfig(max_model_len=args.max_model_len))
    rng = random.Random(0)
    after = {}
    try:
        for i in range(1000):
            n, count = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4])
            params = dict(sampler=rng.choice(["lossless", "ar", "mixed"]), max_tokens=rng.randrange(4, 40), n=n,
                          seed=i)
            prompts_i = [prompts[(i + j) % len(prompts)] for j in range(count)]
            messages = list(replica.generate(f"r{i}", prompts_i, params, 0))
            assert isinstance(messages[-1], RequestDone)
            if i + 1 in (100, 1000):
                after[i + 1] = rss_mib()
    finally:
        replica.close()
    return after[100], after[1000]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests (part 1)")
    p.add_argument("--n", type=int, default=8, help="samples per request (part 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per sample (part 1)")
    p.add_argument("--grpo-max-tokens", type=int, default=128, help="max tokens per sample (part 2)")
    p.add_argument("--max-model-len", type=int, default=256, help="KV slot length (prompt + max tokens)")
    p.add_argument("--drafting", default="auto", choices=["auto", "fixed"],
                   help="the engines' drafting mode (auto: cost-aware level sets, the serve default)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    prompts = prompts_for(args.model, 64)
    print(f"# {args.model}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"drafting {args.drafting}, {time.strftime('%Y-%m-%d')}")
    if "1" in parts:
        init_ray(include_dashboard=False, log_to_driver=False, namespace="bench-concurrency")
        print(f"\n## {args.requests} concurrent requests (1 prompt x n={args.n}, {args.max_tokens} tokens, "
              f"lossless T=1), one replica")
        print("| mode | seconds | requests/s | tokens/s | p50 latency s | p99 latency s |")
        print("|---|---|---|---|---|---|")
        rows = []
        for serial in (True, False):
            r = asyncio.run(concurrent_requests(args.model, prompts, args, serial))
            rows.append(r)
            print(f"| {r['mode']} | {r['seconds']:.2f} | {r['rps']:.2f} | {r['tokens_per_s']:.0f} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} |", flush=True)
        print(f"continuous / serial requests/s: {rows[1]['rps'] / rows[0]['rps']:.2f}x")
        ray.shutdown()
    if "2" in parts:
        print(f"\n## GRPO-shaped batch: 64 prompts x 8 samples, lossless T=1, stop at newline, "
              f"max_tokens {args.grpo_max_tokens} (engine in this process, {torch.get_num_threads()} threads)")
        print("| mode | KV slots | tokens | seconds | tokens/s |")
        print("|---|---|---|---|---|")
        for r in grpo_batch(args.model, prompts, args):
            print(f"| {r['mode']} | {r['slots']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |",
                  flush=True)
    if "3" in parts:
        first, last = memory(args.model, prompts, args)
        print(f"\n## Memory (replica in this process): RSS after 100 requests {first:.0f} MiB, after 1,000 "
              f"{last:.0f} MiB ({100 * (last - first) / first:+.1f}%)")


if __name__ == "__main__":
    main()
