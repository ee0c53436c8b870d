"""What an AR step of the lossless + auto engine costs against an AR step of our AR sampler.

    python -m benchmarks.ar_step_cost --threads 1                  # batch 8 and 64, T = 1 and 0
    python -m benchmarks.ar_step_cost --batches 64 --temperatures 1 --blocks 40 --profile /tmp/p

Where the lossless + auto engine takes AR steps only, it should run as fast as our AR sampler;
whole rollouts (`benchmarks/rerollout.py`, `speed_targets.py`) are too short and too noisy on a
shared machine to tell a per-step host cost of a few percent from noise. Here two engines over
the same weights each decode one request of `batch` rows (same prompts, no stop tokens, long
max_tokens) in steady state, stepped in alternating blocks of `--block` steps (the order within
a pair of blocks alternates); every `Engine.step()` call is timed whole (scheduling, forward,
bookkeeping, history), so every host cost of a step is in it:
- "ar": our AR sampler on an engine with auto drafting and no history store (the re-rollout's
  baseline);
- "lossless": sampler "lossless" on an engine with auto drafting, history and lookup drafts on,
  as `rollout serve` runs it. `--policy held` (default): its ranking prices every drafting step
  at 1000x and exploring never comes due, so it takes AR steps only while doing all of its
  per-step bookkeeping; `--policy settled`: its calibrated policy as it is (exploring and
  look-ups included), only its "ar" steps counted in the ratio, the rest reported apart.
Reported per cell: each engine's median per-step time, the median over block pairs of the ratio
of mean AR-step times (lossless / ar; above 1: the lossless engine's AR steps cost more) with
its quartiles and range, so noise can be told from a real cost; the garbage collector's time
within each engine's steps; and over every step (exploring and look-ups included) the ratio of
seconds per committed token (above 1: lossless slower). `--profile DIR` also writes a
cProfile of each engine's steps (the same number of steps each) to DIR.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig

from .acceptance import heldout_prompts

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


class GcClock:
    """Seconds the cyclic garbage collector ran (all generations, and full collections apart),
    from gc's own callbacks: a full collection walks every tracked object of the process
    (~350k here, most of them torch's and transformers'), ~0.1-0.3 s on this CPU."""

    def __init__(self) -> None:
        self.seconds = self.full_seconds = 0.0
        self.full = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        spent = time.perf_counter() - self._start
        self.seconds += spent
        if info["generation"] == 2:
            self.full += 1
            self.full_seconds += spent


GC = GcClock()


def hold_to_ar(engine: Engine) -> None:
    """Makes the engine's policy take AR steps only while keeping all its per-step work: every
    drafting step is priced at 1000x its prediction and exploring never has the budget."""
    policy = engine.drafting
    seconds = policy._seconds
    policy._seconds = lambda drafting, rows, tokens, context: seconds(drafting, rows, tokens, context) * (
        1000.0 if drafting else 1.0)
    policy._exploring_cost = lambda *args: math.inf


class Stepper:
    """One engine decoding one request of rows, restarted when it finishes; `step()` returns
    (seconds of one `Engine.step()`, its kind: the policy's step-time label, or "prefill", the
    tokens it committed)."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams):
        self.engine, self.prompts, self.params = engine, prompts, params
        self.request = None
        self.gc = [0.0, 0, 0.0]  # garbage collection within its steps: seconds, full collections, their seconds

    def step(self) -> tuple[float, str, int]:
        if self.request is None or self.request.done:
            self.request = self.engine.add_request(self.prompts, self.params)
        committed = sum(len(s.out.token_ids) for s in self.request.sequences)
        counts = {k: v[0] for k, v in self.engine.drafting.step_time.items()}
        gc_before = GC.seconds, GC.full, GC.full_seconds
        t0 = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - t0
        self.gc = [a + b - c for a, b, c in zip(self.gc, (GC.seconds, GC.full, GC.full_seconds), gc_before)]
        # A decode step adds one to its kind's count (both engines' policies label their steps);
        # nothing counted: a prefill (or a step that compiled or captured: not timed).
        kind = next((k for k, v in self.engine.drafting.step_time.items() if v[0] != counts.get(k, 0)), "prefill")
        return seconds, kind, sum(len(s.out.token_ids) for s in self.request.sequences) - committed


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def cell(model, tidar, prompts, batch: int, temperature: float, args) -> dict:
    ar = Engine(model, tidar, config=EngineConfig(drafting="auto", history_mib=0, max_num_seqs=batch,
                                                  max_model_len=args.prompt_len + args.max_tokens))
    lossless = Engine(model, tidar, config=EngineConfig(
        drafting="auto", max_num_seqs=batch, max_model_len=args.prompt_len + args.max_tokens,
        calibration_seconds=args.calibration_seconds, calibration_cache=args.calibration_cache or None))
    if args.policy == "held":
        hold_to_ar(lossless)
    rows = (prompts * batch)[:batch]
    steppers = {name: Stepper(engine, rows, SamplingParams(sampler=name, temperature=temperature, seed=7,
                                                          max_tokens=args.max_tokens))
                for name, engine in (("ar", ar), ("lossless", lossless))}
    for _ in range(args.warmup):  # prefill and first steps, both engines
        for s in steppers.values():
            s.step()
    for s in steppers.values():
        s.gc = [0.0, 0, 0.0]
    times = {name: [] for name in steppers}  # per block: the AR-step times
    per_token = {name: [] for name in steppers}  # per block: seconds per committed token, every step
    other: dict[str, list[float]] = {}  # the lossless engine's other steps, by kind
    for block in range(args.blocks):
        order = ["ar", "lossless"] if block % 2 == 0 else ["lossless", "ar"]
        for name in order:
            got, spent, tokens = [], 0.0, 0
            for _ in range(args.block):
                seconds, kind, committed = steppers[name].step()
                spent, tokens = spent + seconds, tokens + committed
                if kind == "ar":
                    got.append(seconds)
                elif kind != "prefill":
                    other.setdefault(kind, []).append(seconds)
            times[name].append(got)
            per_token[name].append(spent / max(tokens, 1))
    pairs = [statistics.fmean(b) / statistics.fmean(a) for a, b in zip(times["ar"], times["lossless"]) if a and b]
    whole = [b / a for a, b in zip(per_token["ar"], per_token["lossless"])]
    flat = {name: [x for b in blocks for x in b] for name, blocks in times.items()}
    profiles = {}
    if args.profile:
        for name, stepper in steppers.items():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.block * args.blocks // 2):
                stepper.step()
            prof.disable()
            path = Path(args.profile) / f"{name}_b{batch}_t{temperature:g}.prof"
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(path)
            profiles[name] = str(path)
    return dict(pairs=pairs, whole=whole, median={n: statistics.median(v) for n, v in flat.items()},
                steps={n: len(v) for n, v in flat.items()}, other=other, profiles=profiles,
                gc={n: list(s.gc) for n, s in steppers.items()},
                choices=dict(lossless.drafting.choices))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED, help="HF model directory with TiDAR settings")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--batches", default="8,64", help="comma-separated batch sizes")
    p.add_argument("--temperatures", default="1,0", help="comma-separated temperatures")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=400, help="per request (restarted when it finishes)")
    p.add_argument("--block", type=int, default=16, help="steps of one engine before the other steps")
    p.add_argument("--blocks", type=int, default=30, help="blocks per engine (pairs of blocks give the ratios)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per engine first")
    p.add_argument("--policy", choices=("held", "settled"), default="held",
                   help="held: the lossless engine's policy prices drafting out (AR steps only, all its "
                        "bookkeeping); settled: its calibrated policy as it is")
    p.add_argument("--calibration-seconds", type=float, default=5.0)
    p.add_argument("--calibration-cache", default="", help="step-cost cache file ('' : calibrate afresh)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", default="", help="directory for a cProfile of each engine's steps")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = heldout_prompts(args.model, args.corpus, max(batches), args.prompt_len)
    base = Engine.from_pretrained(args.model)
    print(f"AR-step cost: {args.model.name}, cpu ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), policy {args.policy}, {args.blocks} block pairs x {args.block} steps",
          flush=True)
    print("\n| T | batch | ar ms/step (median) | lossless ms/step (median) | lossless / ar (median of pairs) | "
          "pairs q1-q3 | pairs min-max | AR steps ar / lossless | lossless's other steps (ms each) | "
          "garbage collection in the steps, ar / lossless: ms (full collections) | every step: lossless / ar "
          "seconds per token (median of pairs, q1-q3) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        for batch in batches:
            r = cell(base.model, base.tidar, prompts, batch, temperature, args)
            q1, med, q3 = quartiles(r["pairs"])
            other = ", ".join(f"{k} {len(v)} x {1e3 * statistics.fmean(v):.2f}" for k, v in sorted(r["other"].items()))
            print(f"| {temperature:g} | {batch} | {1e3 * r['median']['ar']:.3f} | {1e3 * r['median']['lossless']:.3f} "
                  f"| {med:.3f} | {q1:.3f}-{q3:.3f} | {min(r['pairs']):.3f}-{max(r['pairs']):.3f} | "
                  f"{r['steps']['ar']} / {r['steps']['lossless']} | {other or '-'} | "
                  f"{1e3 * r['gc']['ar'][0]:.0f} ({r['gc']['ar'][1]}) / {1e3 * r['gc']['lossless'][0]:.0f} "
                  f"({r['gc']['lossless'][1]}) | {statistics.median(r['whole']):.3f} "
                  f"({quartiles(r['whole'])[0]:.3f}-{quartiles(r['whole'])[2]:.3f}) |", flush=True)
            if r["profiles"]:
                print(f"<!-- profiles: {r['profiles']} -->", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
