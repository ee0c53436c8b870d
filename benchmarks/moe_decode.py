"""Decode tokens/s on a small random Qwen3-MoE: our engine (AR, and lossless TiDAR for
reference) against HF `generate`, same weights, batch 1, 16 and 64, interleaved.

    python -m benchmarks.moe_decode                        # CPU, default shape
    python -m benchmarks.moe_decode --device cuda --dtype bfloat16
    python -m benchmarks.moe_decode --batches 1,16 --max-tokens 16 --repeats 1   # quick
    python -m benchmarks.moe_decode --compile --no-lossless   # + our engine under torch.compile

The model is built by transformers from a config (random weights, std 0.02, seed 0) and saved;
our engine loads that directory (the user's path: per-expert tensors on disk gathered into
3-D ones). No EOS (the config has none), so every row decodes `--max-tokens` tokens on both
sides. Greedy decoding on both sides; HF runs its default experts implementation (named in the
output). Each variant runs once unmeasured, then `--repeats` times interleaved; the table shows
the median tokens/s and ours / HF. Random weights make TiDAR drafts nearly always rejected, so
the lossless column shows the cost of drafting that does not pay, not a trained model's speed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(path: str, args) -> None:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_intermediate, norm_topk_prob=True, max_position_embeddings=4096,
        eos_token_id=None, bos_token_id=None, pad_token_id=None, initializer_range=0.02)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)


def ours_tokens_per_second(engine: Engine, prompts, sampler: str, max_tokens: int, device: str
                           ) -> tuple[float, list[list[int]]]:
    """(tokens/s, each row's greedy tokens)."""
    params = SamplingParams(sampler=sampler, temperature=0, max_tokens=max_tokens)
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(device)
    return engine.last_stats.generated_tokens / (time.perf_counter() - t0), [g[0].token_ids for g in outs]


def hf_tokens_per_second(hf, prompts, max_tokens: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens, pad_token_id=0, eos_token_id=None)
        sync(device)
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


TABLE_HEADER = ["| batch | ours AR tok/s | ours AR compiled tok/s | ours lossless tok/s | HF generate tok/s "
                "| ours AR / HF | ours AR compiled / HF |",
                "|---|---|---|---|---|---|---|"]


def decode_medians(model_dir: str, hf, args, prompts: list[list[int]], variants: tuple[str, ...], device: str,
                   dtype: torch.dtype, cuda_graphs: bool = False) -> tuple[dict[str, float], dict[str, list]]:
    """Median tokens/s per variant over the same prompts (a batch): our engine (samplers "ar",
    "lossless", and "compiled": AR on a second engine with `EngineConfig(compile=True)`) and HF
    `generate` ("hf"), one unmeasured round (the compiled engine compiles there, captured graphs
    capture), then `args.repeats` rounds with the variants interleaved; and each of our variants'
    greedy tokens."""
    engines = {compile: Engine.from_pretrained(
        model_dir, device=device, dtype=dtype, mask_token_id=args.vocab - 1, block_size=args.block_size,
        config=EngineConfig(max_num_seqs=len(prompts), max_model_len=args.prompt_len + args.max_tokens + 8,
                            compile=compile, cuda_graphs=cuda_graphs and not compile))
        for compile in {name == "compiled" for name in variants if name != "hf"}}
    runs, greedy = {name: [] for name in variants}, {}
    for r in range(args.repeats + 1):  # the first round warms up, unmeasured
        for name in runs:
            if name == "hf":
                rate = hf_tokens_per_second(hf, prompts, args.max_tokens, device)
            else:
                rate, greedy[name] = ours_tokens_per_second(engines[name == "compiled"], prompts, "ar"
                                                            if name == "compiled" else name, args.max_tokens, device)
            if r:
                runs[name].append(rate)
    return {k: statistics.median(v) for k, v in runs.items()}, greedy


def decode_rows(model_dir: str, hf, args, batches: list[int], variants: tuple[str, ...], device: str,
                dtype: torch.dtype):
    """One table row per batch size (`TABLE_HEADER`) from `decode_medians` over random prompts;
    yields each row as it finishes."""
    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        prompts = torch.randint(2, args.vocab - 1, (batch, args.prompt_len), generator=gen).tolist()
        med, greedy = decode_medians(model_dir, hf, args, prompts, variants, device, dtype)
        same = (f" (compiled greedy == eager greedy in {sum(a == b for a, b in zip(greedy['compiled'], greedy['ar']))}"
                f"/{batch} rows)" if "compiled" in greedy else "")
        cells = [f"{med[k]:.0f}" if k in med else "-" for k in ("ar", "compiled", "lossless", "hf")]
        ratios = [f"{med[k] / med['hf']:.2f}x" if k in med else "-" for k in ("ar", "compiled")]
        yield f"| {batch} | {' | '.join(cells + ratios)} |{same}"


def parser() -> argparse.ArgumentParser:
    """The options (also read by `gpu_parts.moe_families` for its shapes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (prompts decoded at once)")
    p.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens per row")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens decoded per row")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measured runs per variant")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (all sparse)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--experts", type=int, default=128, help="experts per MoE block (Qwen3-MoE: 128)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (Qwen3-MoE: 8)")
    p.add_argument("--expert-intermediate", type=int, default=128, help="each expert's intermediate size")
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
        experts_impl = hf.config._experts_implementation
        device = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
                  else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        lines += [f"Qwen3-MoE random: hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-"
                  f"{args.top_k} (expert intermediate {args.expert_intermediate}), vocab {args.vocab}; "
                  f"{args.dtype} on {device}; torch {torch.__version__}, transformers {transformers.__version__} "
                  f"(experts_implementation={experts_impl}); prompt {args.prompt_len}, {args.max_tokens} new "
                  f"tokens, greedy, median of {args.repeats}",
                  ""] + TABLE_HEADER
        variants = ("ar",) + ("compiled",) * args.compile + ("lossless",) * (not args.no_lossless) + ("hf",)
        lines += decode_rows(model_dir, hf, args, batches, variants, args.device, dtype)
    for line in lines:
        print(line)  # noqa: T201 - a benchmark script's output
    return lines


if __name__ == "__main__":
    main()
