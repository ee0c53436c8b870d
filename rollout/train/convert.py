"""Turning an autoregressive HF checkpoint into a TiDAR model (`convert`), and training a small
AR model from scratch to convert (`pretrain`).

Design decisions:
- Both train our own `Decoder` (its parameter names are HF's) and write a plain HF directory:
  config.json via transformers' config classes, model.safetensors, the tokenizer files, and for
  TiDAR models tidar_config.json. `Engine.from_pretrained` and `AutoModelForCausalLM` load it.
- The mask token is a dedicated special token "<|mask|>" appended to the vocabulary (embedding
  and lm_head rows initialised to the mean row) unless the caller names a reserved id; EOS and
  pad are refused, since a mask that means "end" corrupts both the drafts and stop handling.
- Both run `loop.train` (AdamW, warmup + cosine, gradient accumulation, resumable
  checkpoints under out_dir/checkpoint/, bf16 autocast on CUDA).
- Multi-GPU through torchrun (WORLD_SIZE > 1): DistributedDataParallel over the objective
  module, each rank drawing its own windows; rank 0 evaluates and writes files. Launch with
      torchrun --nproc_per_node 8 -m rollout.convert convert --base BASE --corpus DATA --out OUT ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from ..config import TIDAR_CONFIG_FILE, ModelConfig, TidarConfig
from ..model.decoder import Decoder
from ..model.loader import declared_dtype, load_decoder, read_model_config
from .corpus import Corpus, fixed_windows, open_corpus, pack_tokens
from .loop import (
    CHECKPOINT_DIR,
    TrainSettings,
    barrier,
    default_device,
    distributed,
    train,
)
from .objective import CausalLoss, HybridLoss, ar_perplexity
from .self_distill import MixedBatches, SelfDistillSettings

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
METRICS_FILE = "metrics.json"
EVAL_WINDOWS = 64
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# ---------------------------------------------------------------- data
def _training_tokens(corpus: Corpus, tokenizer, eos_id: int, s: TrainSettings, world: int,
                     max_tokens: int) -> torch.Tensor:
    wanted = min(s.steps * s.grad_accum * s.batch_size * s.seq_len * world + s.seq_len, max_tokens)
    return pack_tokens(corpus.texts("train", s.seed), _encoder(tokenizer), eos_id, wanted)


def _heldout_windows(corpus: Corpus, tokenizer, eos_id: int, seq_len: int) -> torch.Tensor | None:
    if not corpus.heldout:
        log.warning("corpus %s has no held-out documents: skipping held-out perplexity", corpus.name)
        return None
    tokens = pack_tokens(corpus.texts("heldout", 0), _encoder(tokenizer), eos_id, EVAL_WINDOWS * seq_len)
    if tokens.numel() < seq_len:
        log.warning("held-out split has only %d tokens: skipping held-out perplexity", tokens.numel())
        return None
    return fixed_windows(tokens, seq_len, EVAL_WINDOWS)


def _encoder(tokenizer):
    # Corpus text that spells "<|endoftext|>" or "<|mask|>" must not become the special token.
    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return encode


# ---------------------------------------------------------------- saving
def _save_model(model: Decoder, hf_config, tokenizer, out_dir: Path, tidar: dict | None,
                dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.vocab_size = model.config.vocab_size
    hf_config.architectures = [type(hf_config).__name__.replace("Config", "ForCausalLM")]
    hf_config.save_pretrained(out_dir)
    # Copies: packed projections are views of one tensor, and older safetensors refuse tensors
    # that share memory.
    state = {k: v.detach().to("cpu", dtype, copy=True).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    _drop_loader_state(out_dir / "tokenizer_config.json")
    if tidar is not None:
        (out_dir / TIDAR_CONFIG_FILE).write_text(json.dumps(tidar, indent=2) + "\n")


def _drop_loader_state(path: Path) -> None:
    """transformers 5 saves how the tokenizer was loaded ("is_local", ...): not a model property."""
    if path.exists():
        cfg = json.loads(path.read_text())
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def _write_metrics(out_dir: Path, metrics: dict) -> None:
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


# ---------------------------------------------------------------- mask token
def resize_vocab(model: Decoder, vocab_size: int) -> Decoder:
    """A copy of `model` with `vocab_size` rows; new embedding / lm_head rows are the mean row."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    cfg = dataclasses.replace(model.config, vocab_size=vocab_size)
    device = model.lm_head.weight.device
    with torch.device(device):
        new = type(model)(cfg)  # the model's family
    state = model.state_dict()
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = state[name]
            state[name] = torch.cat((w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)))
    new.load_state_dict(state)
    return new.to(model.lm_head.weight.dtype)


def add_mask_token(model: Decoder, tokenizer, mask_token_id: int | None) -> tuple[Decoder, int]:
    """Returns (model with room for the mask token, its id). A given id must be a reserved token
    of the vocabulary, not EOS or pad; otherwise "<|mask|>" is added to the tokenizer."""
    forbidden = {t for t in (*model.config.eos_token_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
                 if t is not None}
    if mask_token_id is not None:
        if not 0 <= mask_token_id < model.config.vocab_size:
            raise ValueError(f"mask_token_id must be in [0, {model.config.vocab_size}), got {mask_token_id}")
        if mask_token_id in forbidden:
            raise ValueError(f"mask_token_id {mask_token_id} is the model's EOS/pad token "
                             f"(ids {sorted(forbidden)}); pick a reserved unused id or omit it to add {MASK_TOKEN}")
        return model, mask_token_id
    from tokenizers import AddedToken

    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id in forbidden:
        raise ValueError(f"the tokenizer maps {MASK_TOKEN} to EOS/pad id {mask_id}")
    return resize_vocab(model, max(mask_id + 1, model.config.vocab_size)), mask_id


# ---------------------------------------------------------------- convert
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_tokenizer(model_dir: Path, cfg: ModelConfig):
    from transformers import AutoTokenizer

    # transformers 5 builds an empty tokenizer from config.json alone, so check for files first.
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} has no loadable tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{model_dir} has no loadable tokenizer: {e}") from None
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but config.json vocab_size "
                         f"is {cfg.vocab_size}")
    return tokenizer


def convert(base_dir: str | Path, corpus: str | Path | Corpus, out_dir: str | Path, *, block_size: int = 8,
            steps: int, batch_size: int, seq_len: int, lr: float = 1e-4, warmup: int = 0, grad_accum: int = 1,
            mask_token_id: int | None = None, alpha: float = 1.0, seed: int = 0, resume: bool = False,
            device: str | torch.device | None = None, max_corpus_tokens: int = 200_000_000,
            checkpoint_every: int = 250, progress: bool = False, distill: float = 0.0,
            self_distill: SelfDistillSettings | None = None) -> dict:
    """Trains the AR checkpoint in `base_dir` with the TiDAR hybrid objective on `corpus` and
    writes a TiDAR model directory to `out_dir`. Returns the metrics (also in out_dir/metrics.json):
    training time and tokens, final losses, held-out AR perplexity of base and converted model.

    distill: weight of the AR policy's distribution in the diffusion targets (`HybridLoss`).
    self_distill: mix the policy's own samples into every batch (`self_distill.MixedBatches`)."""
    from transformers import AutoConfig

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    s = TrainSettings(steps, batch_size, seq_len, lr, warmup, grad_accum, seed, checkpoint_every=checkpoint_every)
    with distributed(device or default_device()) as d:
        base_dir, out_dir = Path(base_dir), Path(out_dir)
        model_dir, hf_cfg, cfg = read_model_config(base_dir)
        corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
        tokenizer = _load_tokenizer(model_dir, cfg)
        eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (cfg.eos_token_ids or (None,))[0]
        if eos_id is None:
            raise ValueError(f"{model_dir}: neither the tokenizer nor config.json names an EOS token")
        if mask_token_id is not None and mask_token_id in {eos_id, tokenizer.pad_token_id, *cfg.eos_token_ids}:
            raise ValueError(f"mask_token_id {mask_token_id} is the model's EOS/pad token; pick a reserved unused id "
                             f"or omit it to add {MASK_TOKEN}")
        torch.manual_seed(seed)
        model = load_decoder(model_dir, cfg, d.device, torch.float32)
        heldout = _heldout_windows(corpus, tokenizer, eos_id, seq_len) if d.main else None
        base_ppl = ar_perplexity(model, heldout) if heldout is not None else None
        model, mask_id = add_mask_token(model, tokenizer, mask_token_id)
        tokens = _training_tokens(corpus, tokenizer, eos_id, s, d.world, max_corpus_tokens)
        log.info("converting %s: %d parameters, mask token %d, block %d, %d corpus tokens",
                 model_dir, sum(p.numel() for p in model.parameters()), mask_id, block_size, tokens.numel())
        objective = HybridLoss(model, mask_id, block_size, alpha, distill)
        batches = None
        if self_distill is not None:
            batches = MixedBatches(model, TidarConfig(mask_id, block_size), tokens, batch_size, seq_len,
                                   self_distill, seed, d.rank)
        summary = train(objective, model, tokens, s, out_dir, resume, d, progress, batches)
        if batches is not None:
            summary["self_distill"] = batches.summary()
        metrics = {}
        if d.main:
            converted_ppl = ar_perplexity(model, heldout) if heldout is not None else None
            hf_config = AutoConfig.from_pretrained(model_dir)
            _save_model(model, hf_config, tokenizer, out_dir, {"mask_token_id": mask_id, "block_size": block_size},
                        declared_dtype(hf_cfg))
            base_metrics = model_dir / METRICS_FILE
            metrics = {
                "conversion": {"base": str(model_dir), "corpus": corpus.name, "train_documents": len(corpus.train),
                               "heldout_documents": len(corpus.heldout), "block_size": block_size,
                               "mask_token_id": mask_id, "alpha": alpha, "distill": distill, "seed": seed,
                               "lr": lr, "warmup": warmup,
                               "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len,
                               "world_size": d.world, "device": str(d.device), **summary},
                "heldout_ar_perplexity": {"base": base_ppl, "converted": converted_ppl,
                                          "windows": None if heldout is None else list(heldout.shape)},
            }
            if base_metrics.exists():
                metrics["base_training"] = json.loads(base_metrics.read_text()).get("pretraining")
            _write_metrics(out_dir, metrics)
        barrier(d)
        return metrics


# ---------------------------------------------------------------- pretrain
def train_tokenizer(texts, vocab_size: int, max_chars: int = 20_000_000):
    """A byte-level BPE tokenizer trained on up to `max_chars` characters of `texts`, with
    "<|endoftext|>" as EOS and pad. Returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be >= 258 for a byte-level BPE, got {vocab_size}")

    def limited():
        seen = 0
        for t in texts:
            yield t
            seen += len(t)
            if seen >= max_chars:
                return

    # Qwen2's pre-tokenizer exactly: transformers 5 rebuilds it from config.json's model_type when
    # loading, so any other choice would tokenize differently once saved beside a qwen2 config.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(limited(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def init_weights(model: Decoder, std: float = 0.02) -> None:
    """GPT-2 style init: normal(std) matrices, output projections scaled by 1/sqrt(2 * layers)."""
    out_scale = 1 / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std * out_scale)
            else:
                p.normal_(0.0, std)


def pretrain(out_dir: str | Path, corpus: str | Path | Corpus, *, vocab_size: int = 4096, hidden_size: int = 256,
             num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 704,
             max_position_embeddings: int = 1024, steps: int, batch_size: int, seq_len: int, lr: float = 2e-3,
             warmup: int = 100, grad_accum: int = 1, seed: int = 0, tokenizer_chars: int = 20_000_000,
             resume: bool = False, device: str | torch.device | None = None,
             max_corpus_tokens: int = 200_000_000, checkpoint_every: int = 250, progress: bool = False) -> dict:
    """Trains a small Qwen2-shaped AR model and its tokenizer from scratch on `corpus`; writes an HF
    directory (no TiDAR config: `convert` it next). Returns the metrics (also out_dir/metrics.json)."""
    from transformers import AutoTokenizer, Qwen2Config

    s = TrainSettings(steps, batch_size, seq_len, lr, warmup, grad_accum, seed, checkpoint_every=checkpoint_every)
    with distributed(device or default_device()) as d:
        out_dir = Path(out_dir)
        corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
        tok_dir = out_dir / CHECKPOINT_DIR / "tokenizer"
        t0 = time.perf_counter()
        if d.main and not (resume and (tok_dir / "tokenizer.json").exists()):
            train_tokenizer(corpus.texts("train", seed), vocab_size, tokenizer_chars).save_pretrained(tok_dir)
        barrier(d)
        tokenizer_seconds = time.perf_counter() - t0
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        eos_id = tokenizer.eos_token_id
        hf_config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
            eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id)
        cfg = ModelConfig.from_hf_dict({**hf_config.to_dict(), "model_type": "qwen2"})
        torch.manual_seed(seed)
        with torch.device(d.device):
            model = Decoder(cfg)
        init_weights(model)
        tokens = _training_tokens(corpus, tokenizer, eos_id, s, d.world, max_corpus_tokens)
        log.info("pretraining: %d parameters, vocab %d, %d corpus tokens",
                 sum(p.numel() for p in model.parameters()), cfg.vocab_size, tokens.numel())
        summary = train(CausalLoss(model), model, tokens, s, out_dir, resume, d, progress)
        metrics = {}
        if d.main:
            heldout = _heldout_windows(corpus, tokenizer, eos_id, seq_len)
            _save_model(model, hf_config, tokenizer, out_dir, None)
            metrics = {"pretraining": {
                "corpus": corpus.name, "train_documents": len(corpus.train), "heldout_documents": len(corpus.heldout),
                "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": cfg.vocab_size,
                "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
                "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size, "seed": seed, "lr": lr,
                "warmup": warmup, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len,
                "corpus_pool_tokens": tokens.numel(), "tokenizer_seconds": round(tokenizer_seconds, 1),
                "device": str(d.device), "world_size": d.world, **summary,
                "heldout_ar_perplexity": ar_perplexity(model, heldout) if heldout is not None else None}}
            _write_metrics(out_dir, metrics)
        barrier(d)
        return metrics


# ---------------------------------------------------------------- command line
DEFAULT_WARMUP = 100  # optimiser steps of linear warmup unless --warmup says otherwise


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True,
                   help="a folder of text files, a .jsonl file with a 'text' field, or 'python-sources' "
                        "(this interpreter's stdlib + site-packages .py files)")
    p.add_argument("--out", required=True, help="output model directory (checkpoints go to OUT/checkpoint/)")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per process")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"linear warmup steps before the cosine decay (default: {DEFAULT_WARMUP}; at most --steps)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and windows")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/ if present")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--max-corpus-tokens", type=int, default=200_000_000,
                   help="cap on the tokenized training pool held in memory")


def _setup(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # A warmup longer than the run is capped, not refused: a short trial run (--steps 20) must not
    # need --warmup too.
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    if warmup > args.steps >= 0:
        log.warning("warmup of %d steps is longer than --steps %d: warming up over all %d steps", warmup,
                    args.steps, args.steps)
        warmup = args.steps
    args.warmup = warmup


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollout convert", description="Convert an autoregressive HF checkpoint "
                                "into a TiDAR model with the hybrid AR + block-diffusion objective.")
    p.add_argument("--base", required=True, help="HF directory of the AR model (config.json, safetensors, tokenizer)")
    _common_flags(p)
    p.add_argument("--block-size", type=int, default=8, help="TiDAR block length k (mask tokens per block)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the AR loss: (alpha*AR + diff)/(1+alpha)")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="use this reserved vocabulary id as the mask (default: add a new <|mask|> token)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="diffusion targets = (1 - D) * the next token + D * the AR half's own distribution "
                        "(detached); acceptance is measured against the AR policy, not the corpus")
    p.add_argument("--self-distill", type=float, default=0.0, metavar="FRACTION",
                   help="share of each batch made of sequences the model samples itself (AR, --self-temperature) "
                        "from corpus prompts; those rows train the diffusion half only. 0: corpus only")
    p.add_argument("--self-prompt-len", type=int, default=32, help="corpus tokens each self-sample continues")
    p.add_argument("--self-pool", type=int, default=64, help="sequences sampled per self-distillation round")
    p.add_argument("--self-refresh", type=int, default=25, help="optimiser steps between sampling rounds")
    p.add_argument("--self-temperature", type=float, default=1.0, help="temperature of the self-samples")
    return p


def main_convert(argv: list[str] | None = None) -> dict:
    """`rollout convert`: AR checkpoint + corpus -> TiDAR model directory."""
    args = convert_parser().parse_args(argv)
    _setup(args)
    return convert(args.base, args.corpus, args.out, block_size=args.block_size, steps=args.steps,
                   batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
                   grad_accum=args.grad_accum, mask_token_id=args.mask_token_id, alpha=args.alpha,
                   seed=args.seed, resume=args.resume, device=args.device,
                   max_corpus_tokens=args.max_corpus_tokens, checkpoint_every=args.checkpoint_every,
                   progress=True, distill=args.distill,
                   self_distill=SelfDistillSettings(args.self_distill, args.self_prompt_len, args.self_pool,
                                                    args.self_refresh, args.self_temperature)
                   if args.self_distill > 0 else None)


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollout pretrain", description="Train a small Qwen2-shaped autoregressive "
                                "model and its byte-level BPE tokenizer from scratch (then `rollout convert` it).")
    _common_flags(p)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (EOS included)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width")
    p.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads")
    p.add_argument("--num-kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate-size", type=int, default=704, help="MLP hidden width")
    p.add_argument("--max-position-embeddings", type=int, default=1024, help="context length written to config.json")
    p.add_argument("--tokenizer-chars", type=int, default=20_000_000,
                   help="characters of training text the tokenizer is learnt from")
    return p


def main_pretrain(argv: list[str] | None = None) -> dict:
    """`rollout pretrain`: train a small Qwen2-shaped AR model and tokenizer from scratch."""
    args = pretrain_parser().parse_args(argv)
    _setup(args)
    return pretrain(args.out, args.corpus, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                    num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                    intermediate_size=args.intermediate_size, max_position_embeddings=args.max_position_embeddings,
                    steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                    warmup=args.warmup, grad_accum=args.grad_accum, seed=args.seed,
                    tokenizer_chars=args.tokenizer_chars, resume=args.resume, device=args.device,
                    max_corpus_tokens=args.max_corpus_tokens, checkpoint_every=args.checkpoint_every,
                    progress=True)


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, like: str | Path | None = None) -> int:
    """Writes a run's checkpoint (RUN/checkpoint/state.pt, e.g. an intermediate step) as a model
    directory: the checkpoint's weights with the config, tokenizer and TiDAR files of `like`
    (default: RUN itself, once the run has finished and written them; during a continued
    conversion, its base). Returns the checkpoint's step."""
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    like = Path(like) if like is not None else run_dir
    ckpt = run_dir / CHECKPOINT_DIR / "state.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} does not exist")
    if not (like / "config.json").exists():
        raise FileNotFoundError(f"{like} has no config.json: name a directory with the run's config (--like)")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    _, _, cfg = read_model_config(like)
    weights = {k: v.contiguous() for k, v in state["model"].items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    embed = weights.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != cfg.vocab_size:
        raise ValueError(f"the checkpoint's vocabulary ({embed.shape[0]}) differs from {like}'s config "
                         f"({cfg.vocab_size}): name the run's own directory as --like")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".safetensors.index.json") \
                and f.name != METRICS_FILE:
            (out_dir / f.name).write_bytes(f.read_bytes())
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return int(state["step"])


def main_export(argv: list[str] | None = None) -> int:
    """`rollout convert export`: a run's checkpoint (an intermediate step) as a model directory."""
    p = argparse.ArgumentParser(prog="rollout export", description=export_checkpoint.__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished convert/pretrain output directory (with checkpoint/)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--like", default=None,
                   help="take config, tokenizer and TiDAR files from here (default: --run, once finished)")
    args = p.parse_args(argv)
    step = export_checkpoint(args.run, args.out, args.like)
    print(f"wrote {args.out} (step {step})")
    return step


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"convert": main_convert, "pretrain": main_pretrain, "export": main_export}
    if not argv or argv[0] not in commands:
        sys.exit("usage: python -m rollout.convert {convert,pretrain,export} [--help] ...")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
