"""The native grouped-expert kernel (`model/expert_kernel.py`) against torch's grouped GEMM path
(`moe.expert_grouped_gemm`: `aten::_grouped_mm`, what HF runs) and the per-expert loop, on the
MoE / ZAYA decode benchmarks' expert shapes, one thread.

Each variant computes a whole MoE layer's experts (sort, both projections, SiLU gate, weighted
combine) for random top-k routing; `--layers` layers of experts are cycled so that the weights
come from memory, not cache, as in a decode step. Reported: ms per layer (median of `--repeats`
rounds, variants interleaved per round) and the GB/s of expert weights read (the experts hit
x their bytes, over the time).

    python -m benchmarks.expert_kernel --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rollout.model import expert_kernel, moe

SHAPES = {  # name: (experts, hidden, expert intermediate, top-k), as benchmarks/moe_decode.py and zaya_decode.py
    "qwen3_moe": (128, 256, 128, 8),
    "zaya": (16, 256, 256, 1),
}


def variants(skip: bool):
    def native(x, w, ids, gu, dn):
        return moe._combine(expert_kernel.expert_rows(x, ids, gu, dn).to(x.dtype), None, w, x)

    return {"native": native,
            "grouped_mm": lambda x, w, ids, gu, dn: moe.expert_grouped_gemm(x, w, ids, gu, dn, skip),
            "loop": lambda x, w, ids, gu, dn: moe.expert_loop(x, w, ids, gu, dn)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64", help="tokens per step, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, comma-separated")
    parser.add_argument("--layers", type=int, default=8, help="layers of experts cycled (out of cache)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("| shape | dtype | tokens | experts hit | MB read | variant | ms / layer | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (E, H, I, k) in SHAPES.items():
        skip = name == "zaya"
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            layers = [tuple(w.transpose(1, 2).contiguous().transpose(1, 2).to(dtype)  # input-major, as the engine
                            for w in (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5,
                                      torch.randn(E, H, I, generator=gen) / I ** 0.5))
                      for _ in range(args.layers)]
            for N in [int(b) for b in args.batches.split(",")]:
                x = torch.randn(N, H, generator=gen).to(dtype)
                scores = torch.randn(N, E + skip, generator=gen).softmax(-1)
                w, ids = torch.topk(scores, k)
                w = w.to(dtype)
                hit = int((ids.unique() < E).sum())
                nbytes = hit * 3 * I * H * layers[0][0].element_size()
                times = {v: [] for v in variants(skip)}
                with torch.no_grad():
                    assert expert_kernel.serves(x, ids, *layers[0]), "the native kernel does not run here"
                    for rnd in range(args.repeats + 1):
                        for v, fn in variants(skip).items():
                            t = time.perf_counter()
                            for gu, dn in layers:
                                fn(x, w, ids, gu, dn)
                            if rnd:
                                times[v].append((time.perf_counter() - t) / len(layers))
                for v, ts in times.items():
                    s = statistics.median(ts)
                    print(f"| {name} | {str(dtype)[6:]} | {N} | {hit} | {nbytes / 1e6:.1f} | {v} | {s * 1e3:.3f} "
                          f"| {nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
