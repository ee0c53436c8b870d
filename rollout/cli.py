"""Command line: `python -m rollout generate` (the main job), `serve`, `convert`, `pretrain`.

`generate` decodes a few prompts with each sampler (ar, lossless, mixed) on the same model and
prints what was generated and how fast: tokens per forward, draft acceptance by position and
tokens/s (CPU numbers are only indicative; benchmarks/ has the measured ones).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).parent / "default_model"
DELEGATED = {"serve": "serve the model over gRPC on Ray replicas",
             "convert": "convert an AR checkpoint into a TiDAR model",
             "pretrain": "train a small AR model from scratch, then convert it"}
DEFAULT_PROMPTS = ["import os\n\ndef ", "class Config:\n    def __init__(self", "for i in range(", "# Parse the"]


def _generate(args: argparse.Namespace) -> int:
    from . import Engine, SamplingParams
    from .config import EngineConfig
    from .tokenizer import TextTokenizer

    model_dir = args.model
    if model_dir is None:
        if (DEFAULT_MODEL / "config.json").exists():
            model_dir = DEFAULT_MODEL
        else:
            from .train.tiny import make_tiny_model
            model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", vocab_size=64, block_size=4)
            print(f"no embedded model found; using a random tiny model at {model_dir}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    engine = Engine.from_pretrained(model_dir, device=args.device, dtype=dtype,
                                    block_size=args.block_size, config=EngineConfig(drafting=args.drafting))
    tokenizer = TextTokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None
    if args.prompt_ids:
        prompts = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    elif tokenizer is not None:
        prompts = [tokenizer.encode(p) for p in (args.prompt or DEFAULT_PROMPTS)]
    else:
        prompts = [[2, 3, 4], [5, 6, 7, 8], [9], [10, 11]]
    stop = tuple(engine.config.eos_token_ids) if args.stop_at_eos else ()
    print(f"model {model_dir} ({engine.config.model_type}, {engine.config.num_layers} layers, "
          f"vocab {engine.config.vocab_size}), block {engine.tidar.block_size}, "
          f"levels {list(engine.tidar.level_set)}, device {args.device}, {len(prompts)} prompts x n={args.n}")
    print(f"{'sampler':<10}{'tokens':>8}{'forwards':>10}{'tok/fwd':>9}{'tok/s':>9}  acceptance by draft position")
    shown = []
    for sampler in args.samplers.split(","):
        params = SamplingParams(sampler=sampler, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, n=args.n, seed=args.seed, mix_weight=args.mix_weight,
                                stop_token_ids=stop, seed_stable=not args.residual)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        s = engine.last_stats
        acc = " ".join(f"{a:.2f}" for a in s.acceptance_by_position) or "-"
        print(f"{sampler:<10}{s.generated_tokens:>8}{s.row_forward_passes:>10}{s.tokens_per_forward:>9.2f}"
              f"{s.generated_tokens / seconds:>9.1f}  {acc}")
        shown.append((sampler, outs[0][0]))
    for sampler, c in shown:
        text = tokenizer.decode(c.token_ids) if tokenizer else str(c.token_ids)
        print(f"\n--- {sampler}, prompt 0, sample 0 ({c.finish_reason}, "
              f"{c.tokens_per_forward:.2f} tokens/forward):\n{text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="decode prompts with ar / lossless / mixed and print stats")
    g.add_argument("--model", type=Path, default=None,
                   help="HF model directory with TiDAR settings (default: the embedded model)")
    g.add_argument("--prompt", action="append", help="a text prompt (repeatable; needs tokenizer.json)")
    g.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    g.add_argument("--samplers", default="ar,lossless,mixed", help="comma-separated samplers to run")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per sample")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    g.add_argument("--top-p", type=float, default=1.0, help="1 disables top-p")
    g.add_argument("--mix-weight", type=float, default=0.5, help="w of the mixed sampler (1 = lossless)")
    g.add_argument("--residual", action="store_true",
                   help="verify by the residual rule min(1, p/q) instead of the seed-stable coupling (the default)")
    g.add_argument("--drafting", choices=["fixed", "auto"], default="fixed",
                   help="fixed (every step drafts all levels: shows acceptance; the default here) or auto "
                        "(cost-aware, the library default: on a CPU mostly AR steps)")
    g.add_argument("--seed", type=int, default=0, help="seed of the whole call")
    g.add_argument("--block-size", type=int, default=None, help="override the model's TiDAR block length")
    g.add_argument("--stop-at-eos", action="store_true", help="stop a sample at the model's EOS token")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    g.set_defaults(func=_generate)
    for name, what in DELEGATED.items():  # parsed by their own modules (see main)
        sub.add_parser(name, help=f"{what} (see `python -m rollout {name} --help`)", add_help=False)
    return parser


def _delegate(name: str, argv: list[str]) -> int:
    """Runs a subcommand; its exit status. `convert` / `pretrain` return a summary (logged as
    they run), so success is 0; bad input (ValueError, OSError: an unsupported architecture, a
    missing file) is one line on stderr and status 1, its traceback only at debug level."""
    if name == "serve":
        from .service.serve import main_serve
        return main_serve(argv)
    from .train import convert
    try:
        getattr(convert, f"main_{name}")(argv)
    except (ValueError, OSError) as e:
        logging.getLogger(__name__).debug("rollout %s failed", name, exc_info=e)
        print(f"rollout {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
