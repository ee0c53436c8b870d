"""GRPO on one CPU machine: the rollout service + a trainer, a verifiable reward, a push per step.

    python -m trainer_bridge.grpo_example --steps 12

Task (exact checker): given the first lines of a held-out Python file, continue it; the reward
is 1 when the first complete line the model writes is valid Python on its own (block openers
such as `def f(x):` get a `pass` body; `else:` / `except:` get their header), else 0.

Each step: rollouts from the service (lossless TiDAR: samples are exactly the policy's), group-
relative advantages, a clipped policy-gradient loss with the returned log-probs as the old
log-probs, the diffusion co-training loss (keeps drafting in step with the policy), then a
weight push and the next version. Printed per step: reward, rollout-vs-trainer log-prob
mismatch before the update (mean / max |delta| and a KL estimate), tokens per forward, push
time, version.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import random
import warnings
from pathlib import Path

import ray
import torch

from rollout.config import load_tidar_config
from rollout.model.loader import load_decoder, read_model_config
from rollout.params import SamplingParams
from rollout.service.serve import BackgroundService, RolloutService
from rollout.tokenizer import TextTokenizer
from rollout.train.corpus import open_corpus

from .batch import pad_groups
from .client import RolloutClient
from .cotrain import diffusion_cotrain_loss, tidar_forward, token_logprobs
from .weight_sync import WeightSync

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
TOKEN = "grpo-example"
CONTINUATION_HEADERS = {"else": "if x:\n    pass\n", "elif": "if x:\n    pass\n", "except": "try:\n    pass\n",
                        "finally": "try:\n    pass\n"}


def first_line_is_valid_python(completion: str) -> float:
    """1.0 if the first complete, non-blank line of `completion` parses on its own."""
    lines = completion.split("\n")
    complete = [ln for ln in lines[:-1] if ln.strip()]  # the last piece may be cut by max_tokens
    if not complete:
        return 0.0
    line = complete[0].strip()
    keyword = line.split(" ")[0].rstrip(":")
    source = CONTINUATION_HEADERS.get(keyword, "") + line
    if line.endswith(":"):
        source += "\n    pass"
    try:
        with warnings.catch_warnings():  # the parser warns about odd literals in generated text
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0


def make_prompts(tokenizer: TextTokenizer, count: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Line-aligned openings of held-out Python files (never trained on), <= max_tokens tokens."""
    rng = random.Random(seed)
    prompts = []
    for text in open_corpus("python-sources").texts("heldout", seed=seed):
        lines = text.split("\n")
        if len(lines) < 8:
            continue
        start = rng.randrange(0, max(1, len(lines) - 8))
        snippet = "\n".join(lines[start:start + 6]) + "\n"
        ids = tokenizer.encode(snippet)[-max_tokens:]
        if len(ids) >= 8:
            prompts.append(ids)
        if len(prompts) == count:
            return prompts
    raise ValueError(f"found only {len(prompts)} held-out prompts")


def grpo_loss(new_logprobs, old_logprobs, advantages, mask, clip: float) -> torch.Tensor:
    """Clipped policy gradient, token-mean over the batch (GRPO / PPO-clip without a critic)."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages[:, None]
    return -(torch.minimum(unclipped, clipped) * mask).sum() / mask.sum().clamp_min(1)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="TiDAR model directory (default: embedded)")
    p.add_argument("--steps", type=int, default=12, help="GRPO steps (one weight push each)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts (GRPO groups) per step")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-pool", type=int, default=64, help="held-out prompts to draw from")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per completion")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range")
    p.add_argument("--cotrain-weight", type=float, default=0.1, help="weight of the co-training loss (0: off)")
    p.add_argument("--sampler", default="lossless", choices=["lossless", "mixed", "ar"], help="rollout sampler")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas")
    p.add_argument("--transport", default="grpc", choices=["grpc", "broadcast"], help="weight push transport")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, rollouts and the trainer")
    p.add_argument("--json", type=Path, help="also write the per-step metrics to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    model_dir, hf_cfg, cfg = read_model_config(args.model)
    tidar = load_tidar_config(model_dir, hf_cfg, None, None)
    tokenizer = TextTokenizer(model_dir)
    model = load_decoder(model_dir, cfg, "cpu", torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    pool = make_prompts(tokenizer, args.prompt_pool, 48, args.seed)

    ray.init(include_dashboard=False, log_to_driver=False, namespace="grpo-example")
    service = BackgroundService(RolloutService(model_dir, replicas=args.replicas, port=0, auth_token=TOKEN,
                                               name="grpo"))
    history, client = [], None
    try:
        service.wait_started()
        client = RolloutClient(service.address, token=TOKEN)
        sync = WeightSync(client, args.transport, master_address="127.0.0.1")
        rng = random.Random(args.seed)
        version = 0
        print(f"GRPO: {args.model.name}, {args.prompts_per_step} prompts x {args.group_size} samples, "
              f"{args.max_tokens} tokens, sampler {args.sampler}, co-training weight {args.cotrain_weight}")
        print(f"{'step':>4} {'reward':>7} {'|dlogp| mean':>12} {'max':>9} {'KL':>9} {'tok/fwd':>8} "
              f"{'cotrain':>8} {'push s':>7} {'version':>7}")
        for step in range(args.steps):
            prompts = rng.sample(pool, args.prompts_per_step)
            params = SamplingParams(sampler=args.sampler, max_tokens=args.max_tokens, n=args.group_size,
                                    seed=args.seed * 100_003 + step)
            groups = client.generate(prompts, params, policy_version=version, max_staleness=0)
            rewards = torch.tensor([[first_line_is_valid_python(tokenizer.decode(t.token_ids.tolist()))
                                     for t in g.trajectories] for g in groups])
            advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
            batch = pad_groups(groups, pad_id=0)
            mask = batch.loss_mask
            ar_logits, diff_logits = tidar_forward(model, batch.input_ids, tidar.mask_token_id, tidar.block_size)
            new = token_logprobs(ar_logits, batch.input_ids, forbidden=(tidar.mask_token_id,))
            delta = (new.detach() - batch.old_logprobs)[mask.bool()]
            kl = (torch.exp(delta) - delta - 1).mean()  # k3 estimate of KL(rollout || trainer)
            loss = grpo_loss(new, batch.old_logprobs, advantages, mask, args.clip)
            cotrain = diffusion_cotrain_loss(ar_logits, diff_logits, mask)
            if args.cotrain_weight > 0:
                loss = loss + args.cotrain_weight * cotrain
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            push = sync.push(model.state_dict())
            version = push.version
            tpf = sum(t.tokens_per_forward for g in groups for t in g.trajectories) / (rewards.numel())
            row = dict(step=step, reward=rewards.mean().item(), dlogp_mean=delta.abs().mean().item(),
                       dlogp_max=delta.abs().max().item(), kl=kl.item(), tokens_per_forward=tpf,
                       cotrain=cotrain.item(), push_seconds=push.seconds, version=version)
            history.append(row)
            print(f"{step:>4} {row['reward']:>7.3f} {row['dlogp_mean']:>12.2e} {row['dlogp_max']:>9.2e} "
                  f"{row['kl']:>9.2e} {tpf:>8.2f} {row['cotrain']:>8.3f} {push.seconds:>7.2f} {version:>7}",
                  flush=True)
    finally:
        if client is not None:
            client.close()  # before the service and the interpreter go: gRPC channels are not for the GC
        service.stop()
        ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, steps=history),
                                        indent=1))
    first, last = history[:3], history[-3:]
    print(f"reward, mean of the first 3 steps: {sum(r['reward'] for r in first) / len(first):.3f}; "
          f"of the last 3: {sum(r['reward'] for r in last) / len(last):.3f}")
    return history


if __name__ == "__main__":
    main()
