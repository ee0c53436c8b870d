"""How many tokens a trained TiDAR model commits per forward, on held-out prompts.

Prompts are the first --prompt-len tokens of --prompts held-out documents of --corpus (the same
hash split `rollout convert` used, so the model never trained on them). Each sampler generates
--max-tokens tokens per prompt with no stop token; reported per sampler: mean tokens per forward
(per row, the prefill forward included), acceptance rate by draft position, wall time. Also
checks that greedy lossless output equals greedy AR output token for token, and reports the
held-out AR perplexity (`rollout.train.objective.ar_perplexity` on the first 64 256-token
windows of the held-out split, as `rollout convert` does).

Several --model directories (same tokenizer) are measured on the same prompts and windows, and
a table compares them: the before / after of a conversion run.

    python benchmarks/acceptance.py --model rollout/default_model
    python benchmarks/acceptance.py --model OLD NEW                    # compared on the same prompts
    python benchmarks/acceptance.py --model OUT --corpus data.jsonl --update-metrics
    python benchmarks/acceptance.py --model OUT --write-calibration   # seeds cost-aware drafting
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import TIDAR_CONFIG_FILE
from rollout.config import EngineConfig
from rollout.engine.drafting import DraftShape, request_class
from rollout.train.corpus import open_corpus

RUNS = [  # (name, sampler, temperature, drafts from lookup instead of the model)
    ("ar_t0", "ar", 0.0, False),
    ("lossless_t0", "lossless", 0.0, False),
    ("lossless_t0.7", "lossless", 0.7, False),
    ("lossless_t1", "lossless", 1.0, False),
    ("mixed_w0.5_t1", "mixed", 1.0, False),
    ("lookup_t0", "lossless", 0.0, True),
    ("lookup_t1", "lossless", 1.0, True),
]


def heldout_prompts(model_dir: Path, corpus: str, count: int, prompt_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for text in open_corpus(corpus).texts("heldout", seed=0):
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(ids) >= prompt_len:
            prompts.append(ids[:prompt_len])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"the held-out split of {corpus} has only {len(prompts)} documents of >= {prompt_len} tokens")


def measure(engine: Engine, prompts: list[list[int]], sampler: str, temperature: float, args,
            lookup: bool = False) -> tuple[dict, list]:
    """One run; `lookup`: every decode step a lookup step of the full block (acceptance of
    lookup drafts, by position, where a row had them)."""
    params = SamplingParams(sampler=sampler, temperature=temperature, max_tokens=args.max_tokens,
                            seed=args.seed, mix_weight=args.mix_weight)
    t0 = time.perf_counter()
    if lookup:
        lookups = Engine(engine.model, engine.tidar, device=engine.device, dtype=engine.dtype,
                         config=EngineConfig(drafting="auto"))
        with lookups.drafting.forcing(DraftShape(engine.tidar.block_size, (), lookup=True)):
            out = lookups.generate(prompts, params)
        engine = lookups
    else:
        out = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    stats = engine.last_stats
    per_prompt = [c[0].tokens_per_forward for c in out]
    result = {"sampler": sampler, "temperature": temperature, "lookup": lookup,
              "mix_weight": args.mix_weight if sampler == "mixed" else None,
              "tokens_per_forward": round(stats.tokens_per_forward, 3),
              "tokens_per_forward_min_max": [round(min(per_prompt), 3), round(max(per_prompt), 3)],
              "acceptance_by_position": [round(a, 3) for a in stats.acceptance_by_position],
              "generated_tokens": stats.generated_tokens, "seconds": round(seconds, 2)}
    return result, [c[0].token_ids for c in out]


def heldout_perplexity(engine: Engine, model_dir: Path, corpus: str, seq_len: int) -> float | None:
    from transformers import AutoTokenizer

    from rollout.train.convert import _heldout_windows
    from rollout.train.objective import ar_perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = _heldout_windows(open_corpus(corpus), tokenizer, tokenizer.eos_token_id, seq_len)
    return None if windows is None else round(ar_perplexity(engine.model, windows), 3)


def evaluate(model_dir: Path, prompts: list[list[int]], args) -> dict:
    engine = Engine.from_pretrained(model_dir, device=args.device)
    results, outputs = {}, {}
    for name, sampler, temperature, lookup in RUNS:
        results[name], outputs[name] = measure(engine, prompts, sampler, temperature, args, lookup)
    report = {"model": str(model_dir), "corpus": args.corpus, "prompts": len(prompts), "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "seed": args.seed, "block_size": engine.tidar.block_size,
              "device": args.device, "host": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(),
              "greedy_lossless_equals_ar": outputs["lossless_t0"] == outputs["ar_t0"],
              "greedy_lookup_equals_ar": outputs["lookup_t0"] == outputs["ar_t0"],
              "heldout_ar_perplexity": heldout_perplexity(engine, model_dir, args.corpus, args.perplexity_seq_len)
              if args.perplexity_seq_len else None,
              "runs": results}
    if args.write_calibration:
        path = model_dir / TIDAR_CONFIG_FILE
        tidar = json.loads(path.read_text())
        tidar["acceptance"] = {
            request_class(SamplingParams(sampler=r["sampler"], temperature=r["temperature"]), r["lookup"]):
                r["acceptance_by_position"]
            for r in results.values() if r["sampler"] != "ar"}
        path.write_text(json.dumps(tidar, indent=2) + "\n")
    if args.update_metrics:
        path = model_dir / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics["acceptance"] = report
        path.write_text(json.dumps(metrics, indent=2) + "\n")
    return report


def table(reports: list[dict]) -> str:
    """Markdown: one row per (model, sampler run)."""
    lines = ["| model | run | tokens/forward | min-max | acceptance by draft position | wall s | AR ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        for name, run in r["runs"].items():
            lo, hi = run["tokens_per_forward_min_max"]
            accept = " ".join(f"{a:.2f}" for a in run["acceptance_by_position"]) or "-"
            lines.append(f"| {r['model']} | {name} | {run['tokens_per_forward']:.3f} | {lo:.2f}-{hi:.2f} | {accept} "
                         f"| {run['seconds']} | {r['heldout_ar_perplexity']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, nargs="+",
                   help="TiDAR model directories (config.json, tidar_config.json, ...); several are compared "
                        "on the same prompts (they must share the tokenizer)")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prompts")
    p.add_argument("--prompts", type=int, default=16, help="number of held-out prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--mix-weight", type=float, default=0.5, help="AR weight w of the mixed sampler")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--perplexity-seq-len", type=int, default=256,
                   help="window length of the held-out AR perplexity (0: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--update-metrics", action="store_true", help="write the results into MODEL/metrics.json")
    p.add_argument("--write-calibration", action="store_true",
                   help="store acceptance by draft position per request class in MODEL/tidar_config.json "
                        "(the prior of cost-aware drafting)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dirs = [Path(m) for m in args.model]
    prompts = heldout_prompts(model_dirs[0], args.corpus, args.prompts, args.prompt_len)
    reports = [evaluate(d, prompts, args) for d in model_dirs]
    print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    print(table(reports))
    return reports if len(reports) > 1 else reports[0]


if __name__ == "__main__":
    main()
