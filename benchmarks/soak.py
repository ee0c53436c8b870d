"""Soak: many mixed requests against 2 replicas while weights are pushed and replicas are killed.

    python -m benchmarks.soak --requests 3000 --seconds 900       # the long version (figures in RESULTS.md)

Clients send unary and streaming requests with all three samplers, cancel some, give some a
tiny deadline and some bad input; a pusher sends new weights every `--push-every` seconds,
cycling the wait / abort / keep modes; a killer kills a random replica every `--kill-every`
seconds (Ray restarts it). At the end it checks (and reports):
- every request that succeeded got every (prompt, sample) exactly once; the others failed with
  one of the documented status codes;
- every token's version tag was live while its request ran (between the version served when
  it was sent and one past the version served when it ended: a commit may land on a replica
  before the router's own version moves);
- outstanding tokens and in-flight counts back to zero, every replica's KV slots free;
- the front end's resident memory (first vs last quarter of the run).
`tests/test_soak.py` runs a short version (under a minute) on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import ray
import torch

from rollout.service.serve import BackgroundService, RolloutService, init_ray
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout.wire import trajectory_arrays, weight_chunks

EXPECTED_FAILURES = {"CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}


@dataclass
class SoakReport:
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    pushes: int = 0
    push_failures: int = 0
    kills: int = 0
    rss_mib: list[float] = field(default_factory=list)
    idle: dict = field(default_factory=dict)
    budget: int = 0  # requests to send in all
    push_errors: list[str] = field(default_factory=list)

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def summary(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0
        rss = (f"{self.rss_mib[0]:.0f} -> {self.rss_mib[-1]:.0f} MiB" if len(self.rss_mib) > 1 else "-")
        return (f"requests {sum(self.outcomes.values())} {dict(sorted(self.outcomes.items()))}; pushes {self.pushes} "
                f"(failed {self.push_failures}); kills {self.kills}; lost or duplicated: "
                f"{len([p for p in self.problems if 'trajector' in p])}; problems {len(self.problems)}; "
                f"p50 / p99 latency {statistics.median(lat) if lat else 0:.2f} / {p99:.2f} s; "
                f"front-end RSS {rss}; idle {self.idle}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _client(stub, version, rng: random.Random, report: SoakReport, lock: threading.Lock, deadline: float,
            vocab: int, max_tokens: int) -> None:
    while time.monotonic() < deadline and sum(report.outcomes.values()) < report.budget:
        kind = rng.choice(["unary", "unary", "stream", "stream", "cancel", "deadline", "bad"])
        n, prompts = rng.randint(1, 3), [[rng.randrange(2, vocab - 1) for _ in range(rng.randint(1, 6))]
                                        for _ in range(rng.randint(1, 3))]
        params = pb.SamplingParams(sampler=rng.choice(["lossless", "mixed", "ar"]), temperature=rng.choice([0.0, 0.7, 1.0]),
                                   max_tokens=rng.randint(1, max_tokens), n=n, seed=rng.randrange(1 << 30))
        if kind == "bad":
            prompts = [[vocab + 5]]
        req = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=p) for p in prompts], params=params,
                                 timeout_seconds=1e-3 if kind == "deadline" else 0.0)
        v_start, t0 = version(), time.perf_counter()
        try:
            if kind == "unary" or kind in ("deadline", "bad"):
                got = list(stub.Generate(req, timeout=120).trajectories)
            else:
                call = stub.GenerateStream(req, timeout=120)
                got = []
                for t in call:
                    got.append(t)
                    if kind == "cancel":
                        call.cancel()
                        break
                if kind == "cancel":
                    with lock:
                        report.count("cancelled")
                    continue
            problems = _check(got, len(prompts), n, v_start, version())
            with lock:
                report.count("ok" if not problems else "wrong")
                report.problems += problems
                report.latencies.append(time.perf_counter() - t0)
        except grpc.RpcError as e:
            code = e.code().name
            with lock:
                report.count(code)
                if code not in EXPECTED_FAILURES:
                    report.problems.append(f"{kind}: {code} {e.details()}")


def _check(trajectories, num_prompts: int, n: int, v_start: int, v_end: int) -> list[str]:
    problems = []
    keys = sorted((t.prompt_index, t.sample_index) for t in trajectories)
    if keys != [(i, j) for i in range(num_prompts) for j in range(n)]:
        problems.append(f"trajectories {keys} for {num_prompts} prompts x n={n}")
    for t in trajectories:
        versions = set(trajectory_arrays(t)["policy_versions"].tolist())
        if versions and not all(v_start <= v <= v_end + 1 for v in versions):
            problems.append(f"token versions {sorted(versions)} outside [{v_start}, {v_end + 1}]")
    return problems


def run_soak(model_dir: str, *, requests: int, seconds: float, clients: int = 8, push_every: float = 3.0,
             kill_every: float = 8.0, max_tokens: int = 24, seed: int = 0, namespace: str = "soak") -> SoakReport:
    """Runs the soak against an in-process service of 2 replicas (Ray must be initialised)."""
    token = "soak-token"
    runner = BackgroundService(RolloutService(model_dir, replicas=2, port=0, auth_token=token, name=namespace,
                                              max_queue=4 * clients, request_timeout=120))
    runner.wait_started()
    service = runner.service
    channel = grpc.insecure_channel(runner.address)
    stub = pb_grpc.RolloutServiceStub(channel)
    report, lock = SoakReport(), threading.Lock()
    report.budget = requests
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)
    base = {k: v.clone() for k, v in _load_state(model_dir).items()}
    stop = threading.Event()

    def pusher():
        modes, i = ["wait", "abort", "keep"], 0
        while not stop.wait(push_every):
            state = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                     for k, v in base.items()}
            try:
                stub.UpdateWeights(weight_chunks(state.items(), version=0, num_tensors=len(state),
                                                 mode=modes[i % 3]),
                                   timeout=120, metadata=(("authorization", f"Bearer {token}"),))
                report.pushes += 1
            except grpc.RpcError as e:
                report.push_failures += 1  # a kill can land mid-push: the push fails, nothing changes
                report.push_errors.append(f"{e.code().name}: {e.details()}")
            i += 1

    def killer():
        while not stop.wait(kill_every):
            name = f"{namespace}-replica-{rng.randrange(2)}"
            ray.kill(ray.get_actor(name, namespace=ray.get_runtime_context().namespace), no_restart=False)
            report.kills += 1

    def sampler():
        while not stop.wait(max(seconds / 8, 0.5)):
            report.rss_mib.append(_rss_mib())

    vocab = service.config.vocab_size - 1  # the last id is the mask token in this project's models
    threads = [threading.Thread(target=_client, args=(stub, lambda: service.router.version, random.Random(seed + k),
                                                        report, lock, deadline, vocab, max_tokens))
               for k in range(clients)]
    side = [threading.Thread(target=f, daemon=True) for f in (pusher, killer, sampler)]
    report.rss_mib.append(_rss_mib())
    for t in threads + side:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    stop.set()
    for t in side:
        t.join(180)  # a push in flight ends within its 120 s deadline
    report.rss_mib.append(_rss_mib())
    try:
        report.idle = _wait_idle(runner, service)
    finally:
        channel.close()
        runner.stop()
    return report


def _wait_idle(runner, service, timeout: float = 120.0) -> dict:
    """Waits until every replica answers with all slots free; returns the idle counters."""
    end = time.monotonic() + timeout
    while True:
        statuses = asyncio.run_coroutine_threadsafe(service.router.replica_status(), runner.loop).result(60)
        idle = dict(outstanding=[r.outstanding_tokens for r in service.router.replicas],
                    in_flight=service.router.admitted, waiting=service.router.waiting,
                    free_slots=[s.get("free_slots") for s in statuses], slots=[s.get("num_slots") for s in statuses])
        if idle["free_slots"] == idle["slots"] and None not in idle["slots"]:
            return idle
        if time.monotonic() > end:
            return idle
        time.sleep(0.5)


def _load_state(model_dir: str) -> dict[str, torch.Tensor]:
    from rollout import Engine
    return Engine.from_pretrained(model_dir).model.state_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "rollout" / "default_model"))
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=900)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--push-every", type=float, default=5.0)
    p.add_argument("--kill-every", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    init_ray(include_dashboard=False, log_to_driver=False, namespace="soak")
    report = run_soak(args.model, requests=args.requests, seconds=args.seconds, clients=args.clients,
                      push_every=args.push_every, kill_every=args.kill_every, max_tokens=args.max_tokens)
    print(f"# soak {time.strftime('%Y-%m-%d')}: {report.summary()}")
    for problem in report.problems[:20]:
        print("PROBLEM", problem)


if __name__ == "__main__":
    main()
