"""Decode tokens/s on a small random ZAYA (CCA attention + top-1 MoE): our engine (AR, and
lossless TiDAR for reference) against HF `generate`, same weights, batch 1, 16 and 64, interleaved.

    python -m benchmarks.zaya_decode                        # CPU, default shape
    python -m benchmarks.zaya_decode --batches 1,16 --max-tokens 16 --repeats 1   # quick
    python -m benchmarks.zaya_decode --dtype bfloat16      # the same weights in bf16 on both sides
    python -m benchmarks.zaya_decode --device cuda --dtype bfloat16   # on a GPU
    python -m benchmarks.zaya_decode --compile --no-lossless   # + our engine under torch.compile

The model is built by transformers from a config (random weights, HF's init, seed 0) and saved;
our engine loads that directory. Layers alternate full and sliding-window attention (window
`--window`), as ZAYA1-8B's config does. No EOS, so every row decodes `--max-tokens` tokens on
both sides; greedy. Each variant runs once unmeasured, then `--repeats` times interleaved; the
table shows the median tokens/s and ours / HF. Random weights make TiDAR drafts nearly always
rejected: the lossless column is the cost of drafting that does not pay.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch

from benchmarks.moe_decode import TABLE_HEADER, decode_rows


def build(path: str, args) -> None:
    import transformers

    cfg = transformers.ZayaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        num_experts=args.experts, moe_intermediate_size=args.expert_intermediate, router_hidden_size=args.hidden // 4,
        layer_types=["hybrid", "hybrid_sliding"] * (args.layers // 2) + ["hybrid"] * (args.layers % 2),
        sliding_window=args.window, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def parser() -> argparse.ArgumentParser:
    """The options (also read by `gpu_parts.moe_families` for its shapes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (prompts decoded at once)")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens per row")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens decoded per row")
    p.add_argument("--repeats", type=int, default=1, help="interleaved measured runs per variant")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (full and sliding alternate)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--experts", type=int, default=16, help="experts per MoE block, besides the skip expert")
    p.add_argument("--expert-intermediate", type=int, default=256, help="each expert's intermediate size")
    p.add_argument("--window", type=int, default=32, help="sliding window of the hybrid_sliding layers")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (the last id is the mask token)")
    p.add_argument("--block-size", type=int, default=4, help="TiDAR block length of the lossless column")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="add our AR on an engine with compile=True (compiles in the unmeasured round)")
    p.add_argument("--no-lossless", action="store_true", help="skip the lossless TiDAR column (a shorter run)")
    return p


def main(argv: list[str] | None = None) -> list[str]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    lines = []
    with tempfile.TemporaryDirectory() as model_dir:
        build(model_dir, args)
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
        device = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
                  else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        lines += [f"ZAYA random: hidden {args.hidden}, {args.layers} layers (sliding window {args.window} on every "
                  f"second), {args.heads}/{args.kv_heads} heads, {args.experts} experts + skip (intermediate "
                  f"{args.expert_intermediate}), vocab {args.vocab}; {args.dtype} on {device}; torch {torch.__version__}, "
                  f"transformers {transformers.__version__} (experts_implementation="
                  f"{hf.config._experts_implementation}); prompt {args.prompt_len}, {args.max_tokens} new tokens, "
                  f"greedy, median of {args.repeats}",
                  ""] + TABLE_HEADER
        print("\n".join(lines), flush=True)  # noqa: T201 - a benchmark script's output
        variants = ("ar",) + ("compiled",) * args.compile + ("lossless",) * (not args.no_lossless) + ("hf",)
        for row in decode_rows(model_dir, hf, args, batches, variants, args.device, dtype):
            lines.append(row)
            print(row, flush=True)  # noqa: T201 - rows as they finish (a slow, shared machine)
    return lines


if __name__ == "__main__":
    main()
