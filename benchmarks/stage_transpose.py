"""Would staging the new weights in their serving layout shorten a same-host push? The replica's
passes over a push's 2-D weights, timed in this process (issue 27, fourth pass):

    python benchmarks/stage_transpose.py --shape qwen2.5-0.5b --repeats 7

Per repeat, interleaved (all see the same machine load), on `native.threads()` threads:
- check: XXH3-64 + finite check of every tensor (`digest_and_finite`, what `check_segment` runs);
- transpose: the swap's copy into input-major weights (`transpose.copy_weights`, row blocks);
- fused: check + transposing copy in one pass per tensor, 1 MiB of rows hashed and then
  transposed while in cache (the staged design: new weights laid out while they are checked);
- memcpy: a plain copy of the serving layout (the commit of a staged copy without a pointer swap).
The 1-D tensors (norms, biases: < 0.1% of the bytes) are left out. Digests and copies of the
fused pass are asserted equal to the separate ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from shapes import SHAPES, hf_config

from rollout.config import ModelConfig
from rollout.model.decoder import Decoder
from rollout.model.transpose import _kernels, copy_weights
from rollout.native import Xxh3, available, spread
from rollout.service.shared_weights import digest_and_finite
from rollout.wire import FINITE_BITS


def fused(src: torch.Tensor, dst: torch.Tensor, kernel) -> tuple[int, bool]:
    """XXH3-64 and finiteness of `src`, and `src` transposed into input-major `dst`, by row blocks."""
    digest, (rows, cols) = Xxh3(), src.shape
    step = max(8, (1 << 20) // (cols * 2) // 8 * 8)
    raw, bad = src.reshape(-1).view(torch.uint8).numpy(), False
    for i in range(0, rows, step):
        n = min(step, rows - i)
        bad |= digest.update(raw[i * cols * 2:(i + n) * cols * 2], 2, FINITE_BITS[src.dtype][2])
        kernel(src.data_ptr() + i * cols * 2, dst.data_ptr() + i * 2, n, cols, dst.stride(1))
    return digest.intdigest(), not bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if not available() or _kernels() is None:
        raise SystemExit("needs the native kernels (a C compiler, x86-64)")
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_hf_dict(hf_config(args.shape))).to(torch.bfloat16)
    srcs = [v.detach().contiguous() + 1e-3 for k, v in model.state_dict().items()
            if v.dim() == 2 and k != "lm_head.weight"]
    del model
    nbytes = sum(t.nbytes for t in srcs)
    live = [torch.zeros(t.shape[1], t.shape[0], dtype=t.dtype).t() for t in srcs]
    staged = [torch.zeros(t.shape[1], t.shape[0], dtype=t.dtype).t() for t in srcs]
    kernel, sizes = _kernels()[2], [t.nbytes for t in srcs]

    def memcpy() -> None:
        jobs = []
        for d, s in zip(live, staged):
            dn, sn = d.t().reshape(-1).view(torch.int16).numpy(), s.t().reshape(-1).view(torch.int16).numpy()
            jobs += [lambda dn=dn, sn=sn, a=a: np.copyto(dn[a:a + (16 << 20)], sn[a:a + (16 << 20)])
                     for a in range(0, dn.size, 16 << 20)]
        spread(jobs, [1] * len(jobs))

    passes = {
        "check": lambda: spread([lambda t=t: digest_and_finite(t) for t in srcs], sizes),
        "transpose": lambda: copy_weights(list(zip(live, srcs))),
        "fused": lambda: spread([lambda s=s, d=d: fused(s, d, kernel) for s, d in zip(srcs, staged)], sizes),
        "memcpy": memcpy,
    }
    times: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(args.repeats):
        results = {}
        for name, fn in passes.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
        assert results["check"] == results["fused"] and all(torch.equal(a, b) for a, b in zip(live, staged))
    print(f"{args.shape}: {len(srcs)} 2-D tensors, {nbytes / 1e9:.3f} GB bf16, {args.repeats} repeats")
    print("| pass | median s | best s | GB/s (median) | runs |\n|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f} | {nbytes / med / 1e9:.2f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    sep = [a + b for a, b in zip(times["check"], times["transpose"])]
    print(f"check + transpose per repeat: median {statistics.median(sep):.3f} s, best {min(sep):.3f} s")


if __name__ == "__main__":
    main()
