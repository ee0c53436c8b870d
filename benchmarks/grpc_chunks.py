"""gRPC weight pushes by chunk size, alternated against one `rollout serve` process (issue 27):

    python benchmarks/grpc_chunks.py --shape qwen2.5-0.5b --chunk-mib 1,2,8 --repeats 6

Writes a random-weight model of the shape, starts `python -m rollout serve` on it with one
replica (as `weight_push.py` does), then pushes the weights perturbed in place with one
`WeightSync(transport="grpc", chunk_bytes=...)` per size, the sizes in turn (their order reversed
every other repeat, so every size sees the same machine load). No pause, resume or token
request around the pushes: the push alone. Reports each size's median push from the second
repeat on (the first one also fills the front end's segment) and every run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from shapes import SHAPES
from weight_push import TOKEN, start_server, write_model

from trainer_bridge import RolloutClient, WeightSync


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help=f"one of {', '.join(sorted(SHAPES))}")
    p.add_argument("--chunk-mib", default="1,2,8", help="comma-separated chunk sizes in MiB")
    p.add_argument("--repeats", type=int, default=6, help="pushes per size")
    args = p.parse_args()
    sizes = [int(x) << 20 for x in args.chunk_mib.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = write_model(args.shape, torch.bfloat16, tmp / "model")
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        proc, address = start_server(tmp / "model", 1, "bfloat16", tmp)
        try:
            with RolloutClient(address, token=TOKEN) as client:
                syncs = {s: WeightSync(client, "grpc", timeout=600, chunk_bytes=s) for s in sizes}
                times: dict[int, list[float]] = {s: [] for s in sizes}
                for r in range(args.repeats):
                    for s in sizes if r % 2 == 0 else sizes[::-1]:
                        for v in state.values():
                            v.add_(1e-3)
                        times[s].append(syncs[s].push(state).seconds)
        finally:
            proc.kill()
            proc.wait()
    print(f"# {args.shape}: {len(state)} tensors, {nbytes / 1e9:.3f} GB bfloat16, one replica of a serve process")
    print("| chunk MiB | push s (median, 2nd on) | GB/s | runs (s) |\n|---|---|---|---|")
    for s, ts in times.items():
        med = statistics.median(ts[1:] or ts)
        print(f"| {s >> 20} | {med:.3f} | {nbytes / med / 1e9:.2f} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
