#!/usr/bin/env python3
"""Wait until the running Ray cluster offers N GPUs, asking the autoscaler for them meanwhile.

    python3 cluster/wait-for-gpus.py N [--address auto] [--timeout SECONDS]

Run before `python -m rollout serve --replicas N`: the front end gives each replica a GPU only
when the cluster already has N GPUs when it starts (otherwise the replicas run on CPUs), and
GPU workers join a fresh cluster some seconds to minutes after the head. The request for N
one-GPU bundles makes the Ray autoscaler (cluster launcher or KubeRay in-tree autoscaling) add
GPU nodes; it stays in force until replaced, so the autoscaler keeps those GPUs. Without an
autoscaler it changes nothing and the wait lasts until enough workers have joined.
Exit status: 0 once the GPUs are there (at once for N = 0), 1 on timeout.
"""

from __future__ import annotations

import argparse
import sys
import time


def wait_for_gpus(need: int, timeout: float | None = None, poll: float = 5.0, report_every: float = 30.0) -> bool:
    """Blocks until ray.cluster_resources() has `need` GPUs (Ray already initialised)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * need)
    start = last_report = time.monotonic()
    while (have := ray.cluster_resources().get("GPU", 0)) < need:
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            print(f"wait-for-gpus: the cluster has {have:g} of {need} GPUs after {timeout:g} s",
                  file=sys.stderr)
            return False
        if now - last_report >= report_every:
            print(f"wait-for-gpus: waiting for {need} GPUs, the cluster has {have:g}", file=sys.stderr)
            last_report = now
        time.sleep(poll)
    print(f"wait-for-gpus: the cluster has {have:g} GPUs", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wait-for-gpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gpus", type=int, help="GPUs the cluster must offer (0: return at once)")
    p.add_argument("--address", default="auto", help="Ray cluster address [auto: the one on this node]")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds [never]")
    args = p.parse_args(argv)
    if args.gpus < 0:
        p.error(f"gpus must be >= 0, got {args.gpus}")
    if args.gpus == 0:
        return 0
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        return 0 if wait_for_gpus(args.gpus, args.timeout) else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
