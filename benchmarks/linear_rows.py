"""What one more token per row costs a decode step's matmuls on this device.

TiDAR's premise is that a pass carrying T tokens per sequence costs little more than a 1-token
pass (memory-bound weight reads: 1.16-1.39x at T = 32 on an H100, DESIGN.md section 3). This
script measures that premise for a model's own linear layers: every projection of every layer
and the LM head (packed q/k/v and gate/up as the engine runs them), applied to M rows, for M
from 1 up; medians of interleaved repeats, as a ratio to M = 1.

    python -m benchmarks.linear_rows                          # embedded model, CPU
    python -m benchmarks.linear_rows --shape qwen2.5-1.5b --device cuda

A TiDAR step at batch 1 with draft length d and m levels carries d (1 + m) rows through these
matmuls (4 for the cheapest drafting step, 72 for all 8 levels of the embedded model's block):
if M = 4 already costs ~2x M = 1, no acceptance rate this model reaches can pay for drafting.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rollout import Engine

from .shapes import SHAPES, random_engine

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def model_linears(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of each matmul of one decode forward, in order (packed where packed)."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = attn.packed
        out += ([(qkv.weight, qkv.bias)] if qkv is not None
                else [(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
        out.append((attn.o_proj.weight, attn.o_proj.bias))
        gu = mlp.packed
        out += [(gu.weight, gu.bias)] if gu is not None else [(m.weight, m.bias) for m in (mlp.gate_proj, mlp.up_proj)]
        out.append((mlp.down_proj.weight, mlp.down_proj.bias))
    out.append((model.lm_head.weight, None))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rows(linears, rows: list[int], repeats: int, device: str, dtype) -> dict[int, float]:
    """Median seconds to run every linear once on M rows, for each M (interleaved repeats)."""
    inputs = {m: {w.shape[1]: torch.randn(m, w.shape[1], device=device, dtype=dtype) for w, _ in linears}
              for m in rows}
    times = {m: [] for m in rows}
    with torch.inference_mode():
        for r in range(repeats + 3):
            for m in rows:
                xs = inputs[m]
                sync(device)
                t0 = time.perf_counter()
                for w, b in linears:
                    F.linear(xs[w.shape[1]], w, b)
                sync(device)
                if r >= 3:  # warm-up
                    times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model directory (default: the embedded model)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a random-weight shape instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default="1,2,3,4,6,8,16,32,72", help="comma-separated row counts M")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.shape:
        from rollout.config import EngineConfig
        engine = random_engine(args.shape, 16, args.device, dtype, EngineConfig(max_num_seqs=1, max_model_len=64))
        what = f"random {args.shape}"
    else:
        engine = Engine.from_pretrained(args.model or EMBEDDED, device=args.device, dtype=dtype)
        what = str(args.model or "embedded model")
    linears = model_linears(engine.model)
    rows = [int(m) for m in args.rows.split(",")]
    secs = time_rows(linears, rows, args.repeats, args.device, dtype)
    mb = sum(w.numel() + (b.numel() if b is not None else 0) for w, b in linears) * linears[0][0].element_size() / 2**20
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# {what}: {len(linears)} matmuls, {mb:.1f} MiB of weights; {device}, {torch.get_num_threads()} threads, "
          f"{dtype}, torch {torch.__version__}; median of {args.repeats}")
    print(f"| rows M | ms for every matmul | vs M = {rows[0]} |")
    print("|---|---|---|")
    for m in rows:
        print(f"| {m} | {secs[m] * 1000:.3f} | {secs[m] / secs[rows[0]]:.2f}x |")


if __name__ == "__main__":
    main()
