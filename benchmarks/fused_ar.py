"""Compiled decode steps as one call (inputs, forward, sampling, slot update) against two calls, in one run.

Under `compile=True` the runner runs a decode step through `runner.ar_step` or
`runner.tidar_step`, one compiled function that builds the step's inputs from the rows'
slots and lengths, runs the forward and the sampling half and writes the slots' next drafts;
the other variant makes two compiled calls (`forward`, then `ar_sample` or `tidar_sample`),
each paying dynamo's guard evaluation and Inductor's Python wrapper, with the inputs and the
slot update as ~20 eager ops around them. This script times both on the same
compiled engine (the two-call variant is the runner with `fused = False`), interleaved
`--repeats` times after a warm-up that compiles both, for the `ar` sampler (AR steps) and the
`lossless` one (TiDAR steps of every level: fixed drafting), and says whether both variants
returned the same tokens.

    python -m benchmarks.fused_ar                          # embedded model, CPU, batches 1 and 8
    python -m benchmarks.fused_ar --device cuda --batches 1,16

Prints per batch the median tokens/s of each and the median of the paired ratios (each repeat
runs both variants back to back, so the ratio of a pair is less exposed to a noisy machine).
"""

from __future__ import annotations

import torch

from rollout import Engine
from rollout.config import EngineConfig

from .packed import ab_parser, ab_setup, sampler_table


def main(argv: list[str] | None = None) -> str:
    p = ab_parser(__doc__, repeats=9)
    p.add_argument("--samplers", default="ar,lossless", help="comma-separated: ar (AR steps), lossless (TiDAR)")
    args = p.parse_args(argv)
    batches, dtype, prompts, device = ab_setup(args)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, config=EngineConfig(
        max_num_seqs=max(batches), max_model_len=args.prompt_len + args.max_tokens, compile=True,
        drafting="fixed"))

    def use(variant: str) -> None:
        engine.runner.fused = variant == "fused"

    title = (f"# compiled decode steps, fused vs two calls: {args.model.name}, {args.device} ({device}, "
             f"{torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}; "
             f"{args.max_tokens} tokens per row, {args.repeats} interleaved repeats")
    lines = sampler_table(title, ("fused", "two calls"), engine, args, batches, prompts, use, ("fused", "two"))
    use("fused")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
