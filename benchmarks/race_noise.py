"""What seed-stable sampling's vocabulary-wide noise costs per decode step, on this device.

A seed-stable step draws race noise E(key, position, v) ~ Exp(1) for every id v at the positions
it verifies and may draft next (`sampling.exponential_noise`: k + b - 1 positions per row for
draft length k and pre-draft block b) and takes argmax(p / E) = argmax(log p + g), g = -log E
Gumbel, there (`sampling.coupled_tokens`).
The residual rule instead draws a few uniforms per position and samples by inverse CDF
(`sampling.counter_uniforms` + `sample_from`: a cumsum and a search over the vocabulary).
For each vocabulary size, batch and position count, this times (median of --repeats):
    noise     exponential_noise alone                   [B, m, V]
    coupled   exponential_noise + coupled_tokens        (what a seed-stable step does)
    residual  counter_uniforms + sample_from            (what the residual rule does instead)
    lm_head   the LM head matmul for the same rows      (hidden --hidden, for scale)
and, with --compile, `coupled` through torch.compile (hash, log, division and argmax fused into
one kernel that never stores the noise: how it is run on a GPU).

    python benchmarks/race_noise.py                       # vocab 4097 and 151936
    python benchmarks/race_noise.py --compile --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rollout.sampling import counter_uniforms, coupled_tokens, exponential_noise, sample_from


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def coupled_step(keys, positions, probs):
    return coupled_tokens(probs, exponential_noise(keys, positions, probs.shape[-1]))


def residual_step(keys, positions, probs):
    B, m, V = probs.shape
    u = counter_uniforms(keys, positions, 1)
    return sample_from(probs.reshape(B * m, V), u.reshape(B * m)).view(B, m)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="4097,151936", help="comma-separated vocabulary sizes")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--positions", default="15,31",
                   help="comma-separated positions per row (k + b - 1: 15 for block 8, 31 for block 16)")
    p.add_argument("--hidden", type=int, default=896, help="hidden size of the LM head timed for scale")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--compile", action="store_true", help="also time the coupled step through torch.compile")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    compiled = torch.compile(coupled_step, dynamic=True) if args.compile else None
    print(f"device {dev}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    header = "| vocab | batch | positions | noise ms | coupled ms | residual ms | lm_head ms |"
    if compiled:
        header += " coupled compiled ms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    gen = torch.Generator().manual_seed(0)
    for V in map(int, args.vocab.split(",")):
        head = torch.randn(V, args.hidden, generator=gen).to(dev)
        for B in map(int, args.batch.split(",")):
            for m in map(int, args.positions.split(",")):
                keys = torch.randint(0, 1 << 62, (B,), generator=gen).to(dev)
                positions = (torch.arange(m)[None] + torch.randint(0, 900, (B, 1), generator=gen)).to(dev)
                hidden = torch.randn(B, m, args.hidden, generator=gen).to(dev)
                probs = torch.softmax(hidden @ head.T, -1)
                row = [timed(lambda: exponential_noise(keys, positions, V), args.repeats, dev),
                       timed(lambda: coupled_step(keys, positions, probs), args.repeats, dev),
                       timed(lambda: residual_step(keys, positions, probs), args.repeats, dev),
                       timed(lambda: hidden @ head.T, args.repeats, dev)]
                if compiled:
                    row.append(timed(lambda: compiled(keys, positions, probs), args.repeats, dev))
                print(f"| {V} | {B} | {m} | " + " | ".join(f"{t * 1e3:.2f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()
