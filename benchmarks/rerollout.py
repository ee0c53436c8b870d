"""Re-rollout: the same prompts rolled out again and again with new seeds, as RL does each epoch.
How much do history drafts (`rollout/engine/history.py`) give from the second epoch on?

    python -m benchmarks.rerollout                        # embedded model, CPU, 8 prompts x n=8 x 96 tokens
    python -m benchmarks.rerollout --temperatures 0.35 --epochs 2 --out /tmp/rerollout.md

Per temperature, three engines over the same weights, each with its own history store, run
every epoch in turn (the order alternates between epochs):
- "ar": our AR (sampler "ar"), the baseline;
- "flat": lossless + auto drafting under the flat cost model (every step shape priced like an
  AR step, a GPU's memory-bound regime): tokens per forward measure draft quality, not this
  CPU's step costs;
- "calibrated": lossless + auto drafting with this CPU's calibrated step costs, as `rollout
  serve` runs it: its wall time against AR's is the "never slower" check.
Each epoch uses a new seed (so a row never drafts from its own key's earlier sample, which the
store would drop anyway). Reported per epoch: tokens per forward (per row, prefill included),
the share of decode row-steps by draft source with each source's acceptance, and wall times.
The timed pair ("ar", "calibrated") runs --repeats times per epoch, back to back in alternating
order, with the epoch's seed: a repeat's rows have the keys of the first run's, whose
completions the store drops when they begin, so every repeat drafts from the same history
(the earlier epochs'). The speed is the median over repeats of the pair's ratio of tokens per
second (a pair is less exposed than a ratio of medians to a machine whose speed drifts), with
the range of the pairs beside it.
Ratios are only meaningful within one run; this machine's absolute times are not a GPU's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import source_summary

from .acceptance import heldout_prompts

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def run(engine: Engine, prompts, params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    s = engine.last_stats
    return dict(seconds=time.perf_counter() - t0, tpf=s.tokens_per_forward, tokens=s.generated_tokens,
                sources=source_summary(s.draft_sources))


def time_by_kind(engine: Engine) -> dict[str, list[float]]:
    """A copy of the drafting policy's decode time by step kind (label -> [steps, seconds])."""
    return {k: list(v) for k, v in engine.drafting.step_time.items()}


def time_shares_cell(before: dict, after: dict) -> str:
    """Each step kind's share of the decode time between two `time_by_kind` snapshots, largest
    first ("ar 97.5%, 1/2 exploring 0.8% (3 steps), ..."; "looked up": AR steps whose rows
    looked up point-mass drafts that then lost)."""
    spent = {k: (v[0] - before.get(k, [0, 0.0])[0], v[1] - before.get(k, [0, 0.0])[1]) for k, v in after.items()}
    spent = {k: v for k, v in spent.items() if v[0] > 0}
    total = sum(t for _, t in spent.values()) or 1.0
    ranked = sorted(spent.items(), key=lambda kv: -kv[1][1])
    return ", ".join(f"{k} {t / total:.1%} ({n} steps)" for k, (n, t) in ranked)


def sources_cell(sources: dict) -> str:
    return ", ".join(f"{name} {v['share']:.0%} (acc {v['acceptance']:.2f})" for name, v in sources.items()
                     if name != "none" or v["share"] >= 0.01)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED, help="HF model directory with TiDAR settings")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed ar / calibrated pairs per epoch (medians)")
    p.add_argument("--temperatures", default="0.35,1", help="comma-separated temperatures")
    p.add_argument("--calibration-seconds", type=float, default=10.0)
    p.add_argument("--calibration-cache", default="", help="step-cost cache file ('' : calibrate afresh)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.model, args.corpus, args.prompts, args.prompt_len)
    base = Engine.from_pretrained(args.model)
    model, tidar = base.model, base.tidar
    lines = [f"Re-rollout: {args.model.name}, {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, "
             f"{args.epochs} epochs, device cpu ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             "| T | epoch | flat tokens/forward | flat row-steps by source (acceptance) | calibrated tokens/forward | "
             f"ar s (median of {args.repeats}) | calibrated s | calibrated / ar speed (median pair) | pairs min-max | "
             "calibrated row-steps by source | calibrated decode time by step kind (all repeats) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        engines = {
            "ar": Engine(model, tidar, config=EngineConfig(drafting="auto", history_mib=0)),
            "flat": Engine(model, tidar, config=EngineConfig(drafting="auto", cost_model="flat")),
            "calibrated": Engine(model, tidar, config=EngineConfig(
                drafting="auto", calibration_seconds=args.calibration_seconds,
                calibration_cache=args.calibration_cache or None)),
        }
        for epoch in range(1, args.epochs + 1):
            seed = 1000 * epoch + int(100 * temperature)
            runs = {"ar": [], "calibrated": []}
            before = time_by_kind(engines["calibrated"])
            for rep in range(args.repeats):
                for name in (["ar", "calibrated"] if (epoch + rep) % 2 else ["calibrated", "ar"]):
                    params = SamplingParams(sampler="ar" if name == "ar" else "lossless", temperature=temperature,
                                            max_tokens=args.max_tokens, n=args.n, seed=seed)
                    runs[name].append(run(engines[name], prompts, params))
            flat = run(engines["flat"], prompts, SamplingParams(sampler="lossless", temperature=temperature,
                                                                max_tokens=args.max_tokens, n=args.n, seed=seed))
            pairs = sorted((c["tokens"] / c["seconds"]) / (a["tokens"] / a["seconds"])
                           for a, c in zip(runs["ar"], runs["calibrated"]))
            cal = runs["calibrated"][0]  # the epoch's first run: its drafts came from the earlier epochs only
            ar_s, cal_s = (statistics.median(r["seconds"] for r in runs[n]) for n in ("ar", "calibrated"))
            lines.append(f"| {temperature:g} | {epoch} | {flat['tpf']:.2f} | {sources_cell(flat['sources'])} | "
                         f"{cal['tpf']:.2f} | {ar_s:.2f} | {cal_s:.2f} | {statistics.median(pairs):.3f} | "
                         f"{pairs[0]:.2f}-{pairs[-1]:.2f} | {sources_cell(cal['sources'])} | "
                         f"{time_shares_cell(before, time_by_kind(engines['calibrated']))} |")
            print(lines[-1], flush=True)
        lines.append(f"<!-- T={temperature:g}: calibrated engine's policy {engines['calibrated'].drafting.status()['level_choices']} -->")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
