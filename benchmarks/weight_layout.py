"""Input-major linear weights against PyTorch's default layout, in one run.

On the CPU the engine stores every linear weight [out, in] as the transpose of a contiguous
[in, out] tensor (`rollout.model.layers`, "input-major"): MKL multiplies a few rows by weights
stored so faster than by the default [out, in] storage. This script times both layouts on the
same engine (`Decoder.pack_projections(input_major=...)` switches between them, copying the
weights), interleaved `--repeats` times after a warm-up that compiles both, for the `ar`
sampler (AR steps) and the `lossless` one (TiDAR steps of every level: fixed drafting), and
says whether both layouts returned the same tokens.

    python -m benchmarks.weight_layout                    # embedded model, CPU, compiled, batches 1 and 8
    python -m benchmarks.weight_layout --eager
    python -m benchmarks.weight_layout --device cuda --batches 1,16

Prints per batch the median tokens/s of each and the median of the paired ratios.
"""

from __future__ import annotations

import torch

from rollout import Engine
from rollout.config import EngineConfig

from .packed import ab_parser, ab_setup, sampler_table


def main(argv: list[str] | None = None) -> str:
    p = ab_parser(__doc__, repeats=9)
    p.add_argument("--samplers", default="ar,lossless", help="comma-separated: ar (AR steps), lossless (TiDAR)")
    p.add_argument("--eager", action="store_true", help="time eager steps (default: compiled)")
    args = p.parse_args(argv)
    batches, dtype, prompts, device = ab_setup(args)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, config=EngineConfig(
        max_num_seqs=max(batches), max_model_len=args.prompt_len + args.max_tokens, compile=not args.eager,
        drafting="fixed"))

    def use(layout: str) -> None:
        engine.model.pack_projections(input_major=layout == "input")
        assert engine.model.packs_current()

    title = (f"# input-major vs default weight layout: {args.model.name}, {args.device} ({device}, "
             f"{torch.get_num_threads()} threads), {dtype}, {'eager' if args.eager else 'compiled'}, "
             f"torch {torch.__version__}; {args.max_tokens} tokens per row, {args.repeats} interleaved repeats")
    lines = sampler_table(title, ("input-major", "default"), engine, args, batches, prompts, use,
                          ("input", "default"))
    use("input" if args.device == "cpu" else "default")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
