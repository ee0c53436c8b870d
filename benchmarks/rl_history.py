"""History drafts over an RL run: the GRPO example's task and trainer, in one process, with the
rollout engines driven directly (no service), so each step's draft sources can be read.

    python -m benchmarks.rl_history --steps 40 --lr 5e-4 --png benchmarks/rl_history.png --json /tmp/rl.json

Each step samples --prompts-per-step prompts from a pool of --prompt-pool (so prompts come back
every few steps, as epochs do), n = --group-size samples each, trains one GRPO step on them
(`trainer_bridge.grpo_example`: clipped policy gradient, group-relative advantages, co-training
loss) and loads the new weights into the engines, all sharing one model:
- "flat": lossless + auto drafting under the flat cost model (every step shape priced like an AR
  step): its rollouts train the policy; per step its tokens per forward, and the share of
  decode row-steps and acceptance of each draft source;
- with --timed, also "calibrated" (lossless + auto drafting, this CPU's step costs, its own
  history) and our AR on the same prompts and seed, interleaved: wall time of each.
The policy's mean entropy over the completion tokens is computed from the trainer's forward.
A PNG plots tokens per forward, tokens per row-step by draft source and entropy over the steps,
and each source's acceptance against the policy's entropy (needs matplotlib). With --json the
rows are written after every step, so a run stopped early still gives its table;
`--plot-from rows.json --png out.png` redraws the PNG from such a file.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import source_summary
from rollout.model.loader import load_decoder, read_model_config
from rollout.service.weights import stage_weights
from rollout.tokenizer import TextTokenizer
from trainer_bridge.cotrain import diffusion_cotrain_loss, tidar_forward, token_logprobs
from trainer_bridge.grpo_example import first_line_is_valid_python, grpo_loss, make_prompts

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"


def batch_of(prompts, completions):
    """[N, L] ids, loss mask and the rollout's log-probs (aligned with ids) of every sample."""
    rows = [(prompts[i], c) for i, group in enumerate(completions) for c in group]
    L = max(len(p) + len(c.token_ids) for p, c in rows)
    ids, mask, old = (torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L),
                      torch.zeros(len(rows), L))
    for i, (p, c) in enumerate(rows):
        P, T = len(p), len(c.token_ids)
        ids[i, :P], ids[i, P:P + T] = torch.tensor(p), torch.tensor(c.token_ids)
        mask[i, P:P + T] = 1
        old[i, P:P + T] = torch.tensor(c.logprobs)
    return ids, mask, old


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=EMBEDDED)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-pool", type=int, default=16, help="held-out prompts the steps draw from")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--cotrain-weight", type=float, default=0.5)
    p.add_argument("--timed", action="store_true", help="also time calibrated lossless and AR rollouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--plot-from", type=Path, help="only draw --png from the rows of this --json file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.plot_from:
        history = json.loads(args.plot_from.read_text())["steps"]
        plot(history, args.png)
        return history
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = Engine.from_pretrained(args.model)
    model, tidar = base.model, base.tidar
    model_dir, _, cfg = read_model_config(args.model)
    trainer = load_decoder(model_dir, cfg, "cpu", torch.float32).train()  # the trainer's own copy
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.lr, weight_decay=0.0)
    pool = make_prompts(TextTokenizer(args.model), args.prompt_pool, 48, args.seed)
    tokenizer = TextTokenizer(args.model)
    engines = {"flat": Engine(model, tidar, config=EngineConfig(drafting="auto", cost_model="flat"))}
    if args.timed:
        engines["calibrated"] = Engine(model, tidar, config=EngineConfig(drafting="auto", calibration_seconds=10))
        engines["ar"] = Engine(model, tidar, config=EngineConfig(drafting="auto", history_mib=0))
    rng, history = random.Random(args.seed), []
    for step in range(args.steps):
        started = time.perf_counter()
        prompts = rng.sample(pool, args.prompts_per_step)
        seconds = {}
        order = ["flat", "calibrated", "ar"] if step % 2 else ["flat", "ar", "calibrated"]
        for name in [n for n in order if n in engines]:
            params = SamplingParams(sampler="ar" if name == "ar" else "lossless", max_tokens=args.max_tokens,
                                    n=args.group_size, seed=args.seed * 100_003 + step)
            t0 = time.perf_counter()
            out = engines[name].generate(prompts, params)
            seconds[name] = time.perf_counter() - t0
            if name == "flat":
                completions, stats = out, engines[name].last_stats
        rewards = torch.tensor([[first_line_is_valid_python(tokenizer.decode(c.token_ids)) for c in g]
                                for g in completions])
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        ids, mask, old = batch_of(prompts, completions)
        ar_logits, diff_logits = tidar_forward(trainer, ids, tidar.mask_token_id, tidar.block_size)
        new = token_logprobs(ar_logits, ids, forbidden=(tidar.mask_token_id,))
        with torch.no_grad():  # the policy's entropy at each completion token (mask id excluded)
            logits = ar_logits[:, :-1].float().clone()
            logits[..., tidar.mask_token_id] = -torch.inf
            logp = torch.log_softmax(logits, -1)
            entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
            entropy = (entropy * mask[:, 1:]).sum() / mask[:, 1:].sum()
        loss = grpo_loss(new, old, advantages, mask, args.clip)
        loss = loss + args.cotrain_weight * diffusion_cotrain_loss(ar_logits, diff_logits, mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            tensors = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        staged = stage_weights(model, step + 1, tensors, "cpu")
        first = True
        for engine in engines.values():  # one shared model: copied once, every engine tags the new version
            engine.load_weights(staged.tensors if first else {}, step + 1)
            first = False
        sources = source_summary(stats.draft_sources)
        # The flat engine's learned acceptance by draft position, per class and point-mass kind
        # ("lossless@1+history/aligned"): what its policy expects of each source now.
        estimates = engines["flat"].drafting.status()["acceptance"]
        row = dict(step=step, reward=rewards.mean().item(), entropy=entropy.item(),
                   tokens_per_forward=stats.tokens_per_forward, sources=sources, acceptance_estimates=estimates,
                   seconds={k: round(v, 3) for k, v in seconds.items()},
                   step_seconds=round(time.perf_counter() - started, 3))
        history.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every step: a run stopped early still gives its table
            write_json(args, history)
    summary = write_json(args, history) if args.json else summarize(history, args.timed)
    print(json.dumps(summary))
    if args.png:
        plot(history, args.png)
    return history


def summarize(history: list[dict], timed: bool) -> dict:
    last = history[-10:]
    summary = dict(steps=len(history), tokens_per_forward_last10=sum(r["tokens_per_forward"] for r in last) / len(last))
    if timed:
        summary["calibrated_over_ar_time_last10"] = (sum(r["seconds"]["calibrated"] for r in last)
                                                     / sum(r["seconds"]["ar"] for r in last))
        summary["calibrated_over_ar_time_all"] = (sum(r["seconds"]["calibrated"] for r in history)
                                                  / sum(r["seconds"]["ar"] for r in history))
    return summary


def write_json(args, history: list[dict]) -> dict:
    summary = summarize(history, args.timed)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, steps=history,
                                   summary=summary), indent=1))
    tmp.replace(args.json)
    return summary


def plot(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[3, 2]))
    ax.plot(steps, [r["tokens_per_forward"] for r in history], "k-", label="tokens / forward (flat cost model)")
    styles = (("history", "g"), ("model", "b"), ("lookup", "m"))
    for source, color in styles:
        ax.plot(steps, [r["sources"].get(source, {}).get("tokens_per_step", float("nan")) for r in history],
                color + "--", label=f"{source} drafts: tokens per row-step")
        ax.plot(steps, [r["sources"].get(source, {}).get("share", 0.0) for r in history], color + ":",
                label=f"{source} share of row-steps")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("tokens per forward / row-step; share")
    right = ax.twinx()
    right.plot(steps, [r["entropy"] for r in history], "r-", label="policy entropy (nats)")
    right.set_ylabel("entropy (nats)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=6, loc="upper left")
    for source, color in styles:  # each step one point: that step's acceptance of the source's drafts
        pts = [(r["entropy"], r["sources"][source]["acceptance"]) for r in history
               if r["sources"].get(source, {}).get("offered", 1) > 0 and source in r["sources"]]
        if pts:
            acc.scatter(*zip(*pts), s=12, c=color, label=source)
    acc.set_xlabel("policy entropy (nats)")
    acc.set_ylabel("acceptance of offered drafts")
    acc.set_title("acceptance vs entropy, by source", fontsize=9)
    acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=75)


if __name__ == "__main__":
    main()
