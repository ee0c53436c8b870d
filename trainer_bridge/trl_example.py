"""TRL's GRPOTrainer trained through the rollout service, on one CPU machine.

    pip install 'tidar-rollout[trl]'
    python -m trainer_bridge.trl_example --steps 3

Starts the service in-process on the embedded model (or trains against a running one with
--address), loads the same model with transformers, and runs `ServiceGRPOTrainer`: every step
generates through the service, scores with the reward of `grpo_example` (the first complete line
is valid Python), takes one optimiser step and pushes the weights (version + 1). Printed per
step: reward, the rollout-vs-trainer log-prob gap TRL measured, and the served version.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from rollout.config import load_tidar_config
from rollout.model.loader import read_model_config
from rollout.tokenizer import TextTokenizer

from .client import RolloutClient
from .grpo_example import DEFAULT_MODEL, first_line_is_valid_python, make_prompts

TOKEN = "trl-example"


def python_line_reward(completions: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1 when the first complete line is valid Python."""
    return [first_line_is_valid_python(c) for c in completions]


def train(address: str, token: str, model_dir: Path = DEFAULT_MODEL, *, steps: int = 3, prompts_per_step: int = 1,
          group_size: int = 4, max_tokens: int = 8, lr: float = 1e-4, seed: int = 0, output_dir: str | None = None,
          callbacks: list | None = None, config: dict | None = None):
    """Runs `steps` GRPO steps against the service at `address`; returns the trainer (its
    `state.log_history` holds the per-step metrics). `config`: GRPOConfig fields to override."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from .trl import ServiceGRPOTrainer, ServiceRollout

    model_dir, hf_cfg, _ = read_model_config(model_dir)
    tidar = load_tidar_config(model_dir, hf_cfg, None, None)
    text = TextTokenizer(model_dir)
    prompts = [text.decode(p) for p in make_prompts(text, prompts_per_step * steps, 32, seed)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # bf16=False: GRPOConfig's default bf16 autocast would score completions in another precision
    # than the float32 service samples in (ServiceGRPOTrainer warns about it on the first step).
    args = GRPOConfig(**{**dict(
        output_dir=output_dir or tempfile.mkdtemp(prefix="trl-example-"), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=prompts_per_step * group_size, num_generations=group_size,
        max_completion_length=max_tokens, temperature=1.0, use_cpu=True, bf16=False, report_to="none",
        logging_steps=1, save_strategy="no", seed=seed, dataloader_num_workers=0, disable_tqdm=True),
        **(config or {})})
    with RolloutClient(address, token=token) as client:
        rollout = ServiceRollout(client, tidar.mask_token_id, seed=seed)
        trainer = ServiceGRPOTrainer(model=model, reward_funcs=python_line_reward, args=args,
                                     train_dataset=Dataset.from_dict({"prompt": prompts}),
                                     processing_class=tokenizer, rollout=rollout, callbacks=callbacks)
        trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="TiDAR model directory (default: embedded)")
    p.add_argument("--address", help="a running service (host:port); default: start one in-process")
    p.add_argument("--token-file", type=Path, help="bearer token of the running service (with --address)")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps (one weight push each)")
    p.add_argument("--prompts-per-step", type=int, default=1, help="prompts (GRPO groups) per step")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (TRL's num_generations)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per completion")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, rollouts and the trainer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    kw = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
              max_tokens=args.max_tokens, lr=args.lr, seed=args.seed)
    if args.address:
        token = args.token_file.read_text().strip() if args.token_file else None
        trainer = train(args.address, token, args.model, **kw)
    else:
        import ray

        from rollout.service.serve import BackgroundService, RolloutService
        ray.init(include_dashboard=False, log_to_driver=False, namespace="trl-example")
        service = BackgroundService(RolloutService(args.model, replicas=1, port=0, auth_token=TOKEN, name="trl"))
        try:
            service.wait_started()
            trainer = train(service.address, TOKEN, args.model, **kw)
        finally:
            service.stop()
            ray.shutdown()
    history = [h for h in trainer.state.log_history if "sampling/rollout_logp_gap/max" in h]
    for i, (h, push) in enumerate(zip(history, trainer.push_callback.pushes)):
        print(f"step {i}: reward {h['reward']:.3f}  |dlogp| max {h['sampling/rollout_logp_gap/max']:.2e}  "
              f"pushed version {push.version} ({push.seconds:.2f} s)")
    return history


if __name__ == "__main__":
    main()
