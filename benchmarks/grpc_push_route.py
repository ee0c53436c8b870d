"""A gRPC push by its two routes to a replica, interleaved in one run: through the front end's
shared-memory segment (what a replica on the front end's node gets) and through one object-store
copy (what a replica on another node gets; forced here by making the router see no replica as
local, `Router.is_local`).

    python benchmarks/grpc_push_route.py --shape qwen2.5-0.5b --repeats 6

The service runs in this process (the router must be patched), with its replica a Ray actor as
in `rollout serve`; the trainer's `WeightSync` runs here too, so the push time includes the
trainer's framing on the same interpreter. Per push it reports the whole push and the router's
phase (`Router.push_weights`: the object-store copy if any, stage and commit on the replica).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from shapes import SHAPES
from weight_push import TOKEN, write_model

from rollout.config import EngineConfig
from rollout.service import router as router_module
from rollout.service.serve import BackgroundService, RolloutService, init_ray
from trainer_bridge import RolloutClient, WeightSync

ROUTES = {"segment": True, "object store": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help=f"one of {', '.join(sorted(SHAPES))}")
    p.add_argument("--repeats", type=int, default=6, help="pushes per route (the first is reported apart)")
    args = p.parse_args()
    router_phase: list[float] = []
    push_weights, is_local = router_module.Router.push_weights, router_module.Router.is_local
    local = {"on": True}

    async def timed_push_weights(self, *a, **k):
        started = time.perf_counter()
        try:
            return await push_weights(self, *a, **k)
        finally:
            router_phase.append(time.perf_counter() - started)
    router_module.Router.push_weights = timed_push_weights
    router_module.Router.is_local = lambda self, r: local["on"] and is_local(self, r)

    with tempfile.TemporaryDirectory() as tmp:
        state = write_model(args.shape, torch.bfloat16, Path(tmp) / args.shape)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        init_ray(include_dashboard=False, log_to_driver=False, namespace="bench-push-route")
        config = EngineConfig(drafting="fixed", kv_cache_gib=0.25, max_model_len=256, max_num_seqs=4)
        service = BackgroundService(RolloutService(Path(tmp) / args.shape, replicas=1, port=0, auth_token=TOKEN,
                                                   name="route", dtype="bfloat16", engine_config=config))
        try:
            service.wait_started()
            with RolloutClient(service.address, token=TOKEN) as client:
                sync = WeightSync(client, "grpc", timeout=600)
                runs = {route: ([], []) for route in ROUTES}
                for _ in range(args.repeats):
                    for route, on in ROUTES.items():
                        for v in state.values():
                            v.add_(1e-3)
                        local["on"] = on
                        router_phase.clear()
                        runs[route][0].append(sync.push(state).seconds)
                        runs[route][1].append(router_phase[0])
        finally:
            service.stop()
            ray.shutdown()
    print(f"# {args.shape}: {len(state)} tensors, {nbytes / 1e9:.3f} GB bfloat16, 1 replica, torch {torch.__version__}")
    print("| route | push s (median, 2nd on) | GB/s | router phase s (median, 2nd on) | first push s | "
          "runs (push/router s) |")
    print("|---|---|---|---|---|---|")
    for route, (push, phase) in runs.items():
        med = statistics.median(push[1:] or push)
        print(f"| {route} | {med:.3f} | {nbytes / med / 1e9:.2f} | {statistics.median(phase[1:] or phase):.3f} | "
              f"{push[0]:.3f} | {', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(push, phase))} |")


if __name__ == "__main__":
    main()
