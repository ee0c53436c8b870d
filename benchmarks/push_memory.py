"""Front-end memory under weight pushes alone: RSS split into anonymous (malloc) and shared-memory
(Ray object store) pages, so growth can be told apart from a leak.

Starts the service in this process on local Ray (the embedded model, --replicas replicas), then
pushes the whole state dict --pushes times over gRPC (`WeightSync.push`, mode wait), printing
/proc/self memory every 10 pushes. Run it under different glibc malloc settings to see what the
anonymous part is, e.g.

    python benchmarks/push_memory.py
    MALLOC_ARENA_MAX=2 python benchmarks/push_memory.py
    MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/push_memory.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ray  # noqa: E402
from service_helpers import ServiceRunner  # noqa: E402

from rollout import Engine  # noqa: E402
from rollout.service.serve import DEFAULT_MODEL, RolloutService, init_ray  # noqa: E402
from trainer_bridge import RolloutClient, WeightSync  # noqa: E402


def memory_mib() -> dict:
    """RSS and its parts (/proc/self/status): RssAnon (malloc), RssShmem (shared memory), RssFile."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pushes", type=int, default=40)
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    init_ray(num_cpus=args.replicas + 2, include_dashboard=False, log_to_driver=False)
    runner = ServiceRunner(RolloutService(DEFAULT_MODEL, replicas=args.replicas, port=0, metrics_port=0,
                                          auth_token="push-memory", name="push-memory"))
    runner.wait_started()
    state = Engine.from_pretrained(DEFAULT_MODEL).model.state_dict()
    state.pop("lm_head.weight")  # tied to the embedding
    sync = WeightSync(RolloutClient(runner.address, token="push-memory"))
    rows = [dict(pushes=0, **memory_mib())]
    try:
        for i in range(1, args.pushes + 1):
            sync.push({k: v + 1e-3 * i for k, v in state.items()})
            if i % 10 == 0 or i == args.pushes:
                rows.append(dict(pushes=i, **memory_mib()))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        runner.stop()
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
