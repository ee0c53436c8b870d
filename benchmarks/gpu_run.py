"""The run a lent GPU does first: correctness and the speed tables in one command of under 8
minutes on one H100 from a cold start, each part written to disk the moment it is done.

    python -m benchmarks.gpu_run --out gpu_run_out                    # the GPU plan (cuda / ROCm)
    python -m benchmarks.gpu_run --out DIR --budget-seconds 240       # a shorter lend: fewer repeats, shapes
    python -m benchmarks.gpu_run --device cpu --smoke --out DIR       # the same code at tiny shapes (CI)
    python -m benchmarks.gpu_run --device cpu --out DIR               # the GPU plan, shapes scaled down

Parts (`gpu_parts.py`; part a's checks in `gpu_checks.py`), in this order, each with its own
time budget (`PLANS`; the sum, plus the cold start, is the plan's estimate, which a test holds
under 8 minutes):
  a. correctness on the device (`gpu_checks.py`): greedy lossless == greedy AR, log-probs vs HF
     (fp32, bf16), chi-square lossless vs AR, triton split-KV == dense, CUDA-graph replay ==
     eager, a weight push then generate.
  b. step cost: AR vs TiDAR step shapes at batch 1 / 16 / 64 and two contexts, dense / triton
     attention, with and without CUDA graphs; the AR step against the bandwidth floor measured
     in the same run (weight bytes per step / a large device copy's rate).
  c. end to end: lossless, mixed and AR tokens/s on the embedded model and the big shape (1.5B
     on a GPU), fixed and auto drafting, batch 1 / 16 / 64; HF generate on the same weights.
  d. a GRPO-shaped re-rollout: P prompts x S samples, long-tailed lengths, rolled out for 3
     epochs with new seeds at T = 1 and T = 0.35 from an empty history store; per epoch auto
     drafting (lossless) vs AR wall time, tokens per row-forward and draft sources (history
     drafts from the second epoch on).
  e. MoE families: our AR decode vs HF generate on the random Qwen3-MoE and ZAYA shapes of
     `moe_decode.py` / `zaya_decode.py` (issue 24's speed cells), batch 1 / 16 / 64.
DIR gets env.json (device, torch, CUDA / HIP, Triton), then a_correctness.{json,md},
b_step_cost.{json,md}, c_end_to_end.{json,md}, d_rollout.{json,md}, e_moe_families.{json,md}
as each part ends, and summary.md (one screen, also printed). A part that raises writes its error into its JSON and
the run goes on. No torch.compile anywhere (CUDA graphs only); random weights at the shapes the
tables need (the embedded model is in the repo): no downloads.

A part starts no new cell (a shape, a batch, a model) once the time left is shorter than its
longest cell so far, and records the cells it skipped; generation runs (parts c, d) are cut at
the budget's end (their rows say "cut"; a cut run's rate counts the tokens it generated), so a
part overruns by at most one step, one HF `generate` call or one engine start-up.
`--budget-seconds S` scales every part's budget and the repeats by S / estimate, and
below half the estimate drops the largest batch and context. On the CPU (`--device cpu`) the
triton path runs only in part a (interpreted, tiny shapes), CUDA graphs run their static-shape
eager path, and the models are scaled down ("small" for 1.5B): the rehearsal of the GPU plan.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

from . import gpu_parts

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
PARTS = ("correctness", "step_cost", "end_to_end", "rollout", "moe_families")
LETTERS = "abcde"
LIMIT_SECONDS = 8 * 60  # what one GPU lend leaves for this run


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    shape: str                      # the big model (random weights)
    block: int                      # its TiDAR block length
    step_batches: tuple[int, ...]
    step_contexts: tuple[int, ...]
    repeats: int                    # timed steps per cell (medians)
    e2e_batches: tuple[int, ...]
    prompt_len: int
    max_tokens: int
    calibration_seconds: float      # auto drafting's start-up step-cost calibration
    rollout_prompts: int
    rollout_samples: int
    rollout_max_tokens: int         # the long tail's cap
    rollout_temperatures: tuple[float, ...]
    rollout_epochs: int             # the same prompts rolled out again with new seeds
    rollout_cost_model: str         # part d's auto drafting: "calibrated" (timed) or "flat" (the smoke
                                    # plan's, so that its tiny runs take the history-draft path)
    rollout_models: tuple[str, ...]
    heldout: bool                   # embedded model's prompts: held-out documents (else random ids)
    checks: dict                    # sizes of part a's checks
    budgets: dict                   # seconds per part
    cold_start: float               # imports, device initialisation (not in any part)

    def estimate(self) -> float:
        return self.cold_start + sum(self.budgets.values())


# Kernel shapes of the 1.5B model: an AR step and a TiDAR step whose 6 x 17 query rows span two
# row blocks (each new shape is a Triton compilation: seconds on a cold GPU).
GPU_CHECKS = dict(rows=8, prompt_len=32, tokens=48, samples=12_000, slot_len=1100,
                  attention_shapes=((12, 2, 128, 1), (12, 2, 128, 17)))
GPU = Plan("gpu", "qwen2.5-1.5b", 16, (1, 16, 64), (1024, 8192), 10, (1, 16, 64), 128, 128, 5.0, 64, 8, 384,
           (1.0, 0.35), 3, "calibrated", ("embedded",), True, GPU_CHECKS,
           dict(correctness=90, step_cost=135, end_to_end=120, rollout=75, moe_families=25), cold_start=30)
# The GPU plan with shapes scaled down for 2 CPU cores: the embedded model's size for 1.5B, block
# 8, contexts / 8, shorter generations, no start-up calibration (its warm-up alone, every
# calibrated shape at batch 1 / 8 / 64, takes minutes here); the same parts, cells, batches and budgets.
CPU = dataclasses.replace(GPU, name="cpu", shape="small", block=8, step_contexts=(128, 1024), repeats=3,
                          prompt_len=32, max_tokens=24, calibration_seconds=0.0, rollout_max_tokens=96,
                          checks=dict(rows=2, prompt_len=8, tokens=8, samples=6000, slot_len=80,
                                      attention_shapes=((4, 2, 16, 1), (4, 2, 32, 9)), triton_rows=1,
                                      triton_tokens=4))
SMOKE = dataclasses.replace(CPU, name="smoke", shape="tiny", block=4, step_batches=(1,), step_contexts=(16, 48),
                            repeats=2, e2e_batches=(2,), prompt_len=8, max_tokens=6, rollout_prompts=4,
                            rollout_samples=2, rollout_max_tokens=48, rollout_temperatures=(0.35,),
                            rollout_epochs=2, rollout_cost_model="flat", heldout=False,
                            checks=dict(rows=2, prompt_len=8, tokens=6, samples=3000, slot_len=40,
                                        attention_shapes=((4, 2, 16, 3),), triton_rows=1, triton_tokens=3),
                            budgets=dict(correctness=90, step_cost=15, end_to_end=25, rollout=15, moe_families=20),
                            cold_start=5)
PLANS = {"gpu": GPU, "cpu": CPU, "smoke": SMOKE}


class Budget:
    """A part's soft time budget (see the module docstring)."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.longest = seconds, time.perf_counter(), 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    @property
    def end(self) -> float:
        """The budget's end in time.perf_counter() seconds: generation runs are cut there."""
        return self.start + self.seconds

    def allows(self) -> bool:
        return self.left() > self.longest

    @contextlib.contextmanager
    def cell(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.longest = max(self.longest, time.perf_counter() - t0)

    def share(self, parts: int) -> Budget:
        """A sub-budget: an equal share of what is left for `parts` more pieces of work."""
        return Budget(max(self.left(), 0.0) / parts)


def environment(device: str) -> dict:
    """What the run ran on: device, torch and its CUDA / HIP build, Triton, the kernel config."""
    from rollout.model.triton_attention import device_kernel_config, gpu_vendor
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda,
                hip=getattr(torch.version, "hip", None), triton=triton_version, vendor=gpu_vendor(),
                python=platform.python_version(), host=platform.node(), cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_units=props.multi_processor_count, warp_size=getattr(props, "warp_size", None),
                    shared_memory_per_block=getattr(props, "shared_memory_per_block_optin", None),
                    arch=getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}")
    else:
        info["name"] = info["cpu"]
    info["triton_kernel_config"] = {  # head_dim 128 (the 1.5B shape's)
        str(dt).removeprefix("torch."): dataclasses.asdict(device_kernel_config(torch.device(device), dt, 128))
        for dt in (torch.bfloat16, torch.float32)}
    return info


# ---------------------------------------------------------------- the run
class Context:
    def __init__(self, plan: Plan, device: str, scale: float):
        self.plan, self.device, self.scale = plan, device, scale
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.repeats = max(3 if plan.repeats >= 3 else plan.repeats, round(plan.repeats * min(scale, 1.0)))
        trim = scale < 0.5  # a much shorter lend: the largest batch and context go first
        self.step_batches = plan.step_batches[:-1] if trim and len(plan.step_batches) > 1 else plan.step_batches
        self.e2e_batches = plan.e2e_batches[:-1] if trim and len(plan.e2e_batches) > 1 else plan.e2e_batches
        if trim and len(plan.step_contexts) > 1:
            self.plan = dataclasses.replace(plan, step_contexts=plan.step_contexts[:-1],
                                            step_batches=self.step_batches)
        self.budget: Budget | None = None
        self._heldout: list | None = None

    def prompts(self, vocab: int, count: int, length: int, heldout: bool) -> list[list[int]]:
        """Held-out documents for the embedded model where the plan says so (its drafts mean
        something on text; read once: the corpus takes seconds to open), random ids otherwise
        or if the corpus cannot be read."""
        if heldout and self.plan.heldout and self._heldout is None:
            need = max(max(self.e2e_batches), self.plan.rollout_prompts)
            try:
                from .acceptance import heldout_prompts
                self._heldout = heldout_prompts(EMBEDDED, "python-sources", need, self.plan.prompt_len)
            except Exception:  # noqa: BLE001 -- a bare machine may lack the corpus: random prompts still time
                self._heldout = []
        if heldout and self._heldout and count <= len(self._heldout) and length <= len(self._heldout[0]):
            return [p[:length] for p in self._heldout[:count]]
        rng = random.Random(count)
        return [[rng.randrange(2, vocab - 1) for _ in range(length)] for _ in range(count)]


def write_part(out: Path, index: int, name: str, result: dict) -> None:
    stem = out / f"{LETTERS[index]}_{name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"## {LETTERS[index]}. {name.replace('_', ' ')} ({result['seconds']:.1f} s of {result['budget']:.0f})", ""]
    if "error" in result:
        lines += [f"ERROR: {result['error']}", "", "```", result.get("traceback", ""), "```"]
    lines += result.get("markdown", [])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the parts' JSON and markdown")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="total seconds for the run (default: the plan's estimate); trims repeats and shapes")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts to run")
    args = p.parse_args(argv)
    if args.device == "cpu":  # triton's interpreter (part a) must be on before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with contextlib.suppress(ImportError):  # HF's loading bars would bury the summary
        import transformers
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    plan = SMOKE if args.smoke else (GPU if args.device.startswith("cuda") else CPU)
    total = args.budget_seconds or plan.estimate()
    if total <= 0:
        p.error(f"--budget-seconds must be > 0, got {total}")
    scale = (total - plan.cold_start) / (plan.estimate() - plan.cold_start)
    ctx = Context(plan, args.device, scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment(args.device)
    env.update(plan=plan.name, budget_seconds=total, estimate_seconds=plan.estimate(), command="python -m "
               "benchmarks.gpu_run " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    functions = {"correctness": "correctness", "step_cost": "step_cost", "end_to_end": "end_to_end",
                 "rollout": "grpo_rollout", "moe_families": "moe_families"}
    wanted = [name for name in PARTS if name in args.parts.split(",")]
    results = {}
    for name in wanted:
        later = sum(plan.budgets[n] * scale for n in wanted[wanted.index(name) + 1:])
        # Its own budget, less what an earlier part overran (but never under a third of it).
        own = plan.budgets[name] * scale
        left = total - (time.perf_counter() - started) - later
        seconds = max(own / 3, min(own, left))
        ctx.budget = Budget(seconds)
        t0 = time.perf_counter()
        try:
            result = getattr(gpu_parts, functions[name])(ctx)
        except Exception as e:  # noqa: BLE001 -- a part that raises is recorded; the next part runs
            result = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8),
                          summary=[f"ERROR {type(e).__name__}: {str(e)[:120]}"])
        result.update(seconds=round(time.perf_counter() - t0, 2), budget=round(seconds, 1))
        results[name] = result
        write_part(out, PARTS.index(name), name, result)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - started
    head = (f"gpu_run ({plan.name} plan) on {env['name']} ({env['vendor']}; torch {env['torch']}, CUDA {env['cuda']}, "
            f"HIP {env['hip']}, Triton {env['triton']}): {elapsed:.0f} s of {total:.0f} s budget")
    lines = [head]
    for name in wanted:
        r = results[name]
        lines.append(f"[{LETTERS[PARTS.index(name)]}. {name}] {r['seconds']:.0f}/{r['budget']:.0f} s")
        lines += [f"    {s}" for s in r.get("summary", [])]
    lines.append(f"files: {out}/")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return dict(env=env, parts=results, seconds=elapsed, budget=total)


if __name__ == "__main__":
    main()
