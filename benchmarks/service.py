"""Service overhead: the same batch through gRPC + Ray vs direct engine calls, in one run.

    python benchmarks/service.py --model rollout/default_model

1. Overhead: one 64-prompt Generate through the service (1 replica) vs `Engine.generate` of
   the same prompts and seed in this process, alternated `--repeats` times; medians compared.
   Ray gives each replica actor 1 CPU (and sets its torch threads to 1), so the direct engine
   here runs with 1 thread too: the comparison is like for like.
2. Requests/s with 2 replicas: `--requests` single-prompt requests sent concurrently.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import grpc
import ray
import torch

from rollout import Engine, SamplingParams
from rollout.service.serve import RolloutService, init_ray
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def make_request(prompts, max_tokens, seed):
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=p) for p in prompts],
                              params=pb.SamplingParams(max_tokens=max_tokens, seed=seed))


async def overhead(model_dir, prompts, args) -> tuple[list[float], list[float]]:
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(model_dir)
    service = RolloutService(model_dir, replicas=1, port=0, name="bench1")
    port = await service.start()
    direct, served = [], []
    try:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as ch:
            stub = pb_grpc.RolloutServiceStub(ch)
            req = make_request(prompts, args.max_tokens, 0)
            await stub.Generate(req, timeout=600)  # warm-up both paths
            engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, seed=0))
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                await stub.Generate(req, timeout=600)
                served.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, seed=0))
                direct.append(time.perf_counter() - t0)
    finally:
        await service.stop(1)
    return direct, served


async def requests_per_second(model_dir, prompts, args) -> tuple[float, int]:
    service = RolloutService(model_dir, replicas=2, port=0, name="bench2", max_queue=args.requests)
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"localhost:{port}") as ch:
            stub = pb_grpc.RolloutServiceStub(ch)
            reqs = [make_request([prompts[i % len(prompts)]], args.rps_max_tokens, i) for i in range(args.requests)]
            await asyncio.gather(*(stub.Generate(r, timeout=600) for r in reqs[:4]))  # warm-up
            t0 = time.perf_counter()
            out = await asyncio.gather(*(stub.Generate(r, timeout=600) for r in reqs))
            seconds = time.perf_counter() - t0
    finally:
        await service.stop(1)
    return args.requests / seconds, sum(len(t.token_ids) // 4 for o in out for t in o.trajectories)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory")
    p.add_argument("--batch", type=int, default=64, help="prompts in the overhead batch")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=5, help="alternated repetitions of each path")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests for requests/s")
    p.add_argument("--rps-max-tokens", type=int, default=16, help="tokens per request in the requests/s test")
    args = p.parse_args()
    engine = Engine.from_pretrained(args.model)
    rng = random.Random(0)
    vocab = [t for t in range(engine.config.vocab_size) if t != engine.tidar.mask_token_id]
    prompts = [[rng.choice(vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    del engine
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="bench-service")
    try:
        direct, served = asyncio.run(overhead(args.model, prompts, args))
        rps, tokens = asyncio.run(requests_per_second(args.model, prompts, args))
    finally:
        ray.shutdown()
    d, s = statistics.median(direct), statistics.median(served)
    print(f"# model {args.model}, batch {args.batch} x prompt {args.prompt_len} -> {args.max_tokens} tokens, "
          f"lossless T=1, {args.repeats} alternated repeats, torch {torch.__version__}")
    print("| path | median s | all runs (s) |")
    print("|---|---|---|")
    print(f"| direct Engine.generate (1 thread) | {d:.3f} | {', '.join(f'{x:.3f}' for x in direct)} |")
    print(f"| gRPC Generate -> Ray replica (1 CPU) | {s:.3f} | {', '.join(f'{x:.3f}' for x in served)} |")
    print(f"service overhead: {100 * (s / d - 1):+.1f}% of the direct time")
    print(f"requests/s with 2 replicas: {rps:.1f} ({args.requests} concurrent single-prompt requests, "
          f"{args.rps_max_tokens} tokens each, {tokens} tokens returned)")


if __name__ == "__main__":
    main()
