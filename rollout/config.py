"""Model and TiDAR settings, read from an HF model directory and validated on construction.

Design decisions:
- One dataclass per concern: `ModelConfig` (the decoder's shape, from `config.json`) and
  `TidarConfig` (mask token id, block length, acceptance levels, from `tidar_config.json` or a
  `"tidar"` entry of `config.json`).
- Accepted: the dense Llama / Qwen2 / Qwen3 family and the top-k MoE families Qwen3-MoE and
  Mixtral (`model/decoder.py` FAMILY_LAYERS). Anything the decoder would silently compute
  differently from HF (sliding windows, other activations, unknown RoPE types) is refused at
  load time with a message naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
TIDAR_CONFIG_FILE = "tidar_config.json"
ATTENTION_PATHS = ("dense", "split", "triton")  # `model/attention.py`


class UnsupportedModelError(ValueError):
    """The model directory or its config describes something this decoder does not implement."""


@dataclass(slots=True, frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling.rope_type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if not self.theta > 0:
            raise UnsupportedModelError(f"rope_theta must be > 0, got {self.theta}")
        if self.rope_type != "default" and not self.factor > 0:
            raise UnsupportedModelError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    # Top-k MoE (`model/moe.py`): the layers whose MLP is a sparse MoE block, experts per
    # block, experts per token, each expert's intermediate size, whether the top-k routing
    # weights are renormalised to sum to 1.
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise UnsupportedModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.moe_layers:
            if self.moe_intermediate_size < 1:
                raise UnsupportedModelError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise UnsupportedModelError(
                    f"num_experts_per_tok must be in [1, num_experts = {self.num_experts}], "
                    f"got {self.num_experts_per_tok}")

    @property
    def family(self) -> str:
        """The decoder family serving this model_type (`model/decoder.py` FAMILY_LAYERS)."""
        return {"llama": "dense", "qwen2": "dense", "qwen3": "dense"}.get(self.model_type, self.model_type)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ModelConfig:
        """Builds the config from an HF `config.json` dict (transformers 4 or 5 layout)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"config.json model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in cfg:
                raise UnsupportedModelError(f"config.json lacks the required field {key!r}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config.json hidden_act {act!r} is not supported (only 'silu')")
        if cfg.get("use_sliding_window") or any(
                t == "sliding_attention" for t in cfg.get("layer_types") or ()):
            raise UnsupportedModelError("config.json enables sliding-window attention, which is not supported")
        if model_type == "llama" and cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("config.json pretraining_tp != 1 is not supported")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if model_type in ("qwen3_moe", "mixtral"):
            moe = _moe_from_hf_dict(cfg, model_type)
        else:
            moe = {}
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf_dict(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            eos_token_ids=eos_ids,
            **moe,
        )


def _moe_from_hf_dict(cfg: dict, model_type: str) -> dict:
    """The MoE fields of a Qwen3-MoE or Mixtral config.json: which layers are sparse (Qwen3-MoE:
    every `decoder_sparse_step`-th layer not in `mlp_only_layers`; Mixtral: all), experts per
    block and per token, `norm_topk_prob` (Mixtral always renormalises)."""
    layers = cfg["num_hidden_layers"]
    if model_type == "mixtral":
        experts = cfg.get("num_local_experts", cfg.get("num_experts", 8))
        if cfg.get("sliding_window") is not None:
            raise UnsupportedModelError("config.json sliding_window is set: sliding-window attention is not supported")
        # Mixtral's experts are its MLP: their size is intermediate_size.
        return dict(moe_layers=tuple(range(layers)), num_experts=experts,
                    num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(f"config.json decoder_sparse_step must be an integer >= 1, got {step!r}")
    dense_only = set(cfg.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
    return dict(moe_layers=sparse, num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
                moe_intermediate_size=cfg.get("moe_intermediate_size", 768),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))


def _rope_from_hf_dict(cfg: dict) -> RopeConfig:
    # transformers 5 keeps everything in rope_parameters; 4 has rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("config.json has per-layer-type RoPE parameters, which are not supported")
    if (params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0) != 1.0:
        raise UnsupportedModelError("config.json partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = cfg.get("max_position_embeddings", 2048)
    factor = params.get("factor")
    if factor is None:
        factor = (cfg.get("max_position_embeddings", 2048) / original) if rope_type == "yarn" else 1.0
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


@dataclass(slots=True, frozen=True)
class TidarConfig:
    """How the model drafts: `block_size` mask tokens per block, `levels` the acceptance levels
    that get a pre-drafted block each step (None: all of 1..block_size). `acceptance`: measured
    acceptance by draft position per request class ("lossless@1", ...), which seeds the
    cost-aware drafting policy (`engine/drafting.py`)."""
    mask_token_id: int
    block_size: int
    levels: tuple[int, ...] | None = field(default=None)
    acceptance: dict[str, list[float]] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be >= 0, got {self.mask_token_id}")
        if self.levels is not None:
            levels = tuple(self.levels)
            if not levels or levels != tuple(sorted(set(levels))):
                raise ValueError(f"levels must be a non-empty increasing list, got {list(levels)}")
            if levels[0] != 1 or levels[-1] > self.block_size:
                raise ValueError(
                    f"levels must start at 1 and stay <= block_size ({self.block_size}), got {list(levels)}")

    @property
    def level_set(self) -> tuple[int, ...]:
        return self.levels if self.levels is not None else tuple(range(1, self.block_size + 1))


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None


# config.json keys read for the TiDAR settings when neither tidar_config.json nor a "tidar"
# entry exists, first match wins.
CONFIG_ALIASES = {
    "mask_token_id": ("mask_token_id", "diffusion_mask_token_id", "mask_id"),
    "block_size": ("block_size", "diffusion_block_size", "block_length", "diffusion_block_length"),
}


def load_tidar_config(model_dir: Path, hf_cfg: dict, mask_token_id: int | None,
                      block_size: int | None, levels: tuple[int, ...] | None = None) -> TidarConfig:
    """TiDAR settings from `tidar_config.json` (or config.json's "tidar" entry, or its top-level
    keys in `CONFIG_ALIASES`); arguments override."""
    stored: dict = {}
    if (model_dir / TIDAR_CONFIG_FILE).exists():
        stored = read_json(model_dir / TIDAR_CONFIG_FILE)
    elif isinstance(hf_cfg.get("tidar"), dict):
        stored = hf_cfg["tidar"]
    else:
        # A converted checkpoint may name the settings at config.json's top level (ZAYA1-8B-
        # Diffusion-Preview's layout is not public: these names are assumptions).
        stored = {name: hf_cfg[key] for name, keys in CONFIG_ALIASES.items()
                  for key in reversed(keys) if hf_cfg.get(key) is not None}
    mask = mask_token_id if mask_token_id is not None else stored.get("mask_token_id")
    block = block_size if block_size is not None else stored.get("block_size")
    if mask is None:
        raise UnsupportedModelError(
            f"{model_dir} has no TiDAR mask token: add {TIDAR_CONFIG_FILE} with mask_token_id, "
            "or pass mask_token_id=")
    if block is None:
        raise UnsupportedModelError(
            f"{model_dir} has no TiDAR block length: add {TIDAR_CONFIG_FILE} with block_size, "
            "or pass block_size=")
    lv = levels if levels is not None else stored.get("levels")
    acceptance = stored.get("acceptance")
    if acceptance is not None and not (isinstance(acceptance, dict) and all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v)
            for v in acceptance.values())):
        raise UnsupportedModelError(f"{TIDAR_CONFIG_FILE}: acceptance must map request classes to lists of "
                                    "rates in [0, 1]")
    return TidarConfig(mask_token_id=int(mask), block_size=int(block),
                       levels=tuple(lv) if lv is not None else None, acceptance=acceptance)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """How a replica's engine sizes its KV pool and schedules work (all fixed for its life).

    max_num_seqs: KV slots, i.e. sequences decoded at once; None sizes the pool from memory
        (`kv_cache_gib` on the CPU; `gpu_memory_utilization` of free device memory on a GPU),
        capped at `DEFAULT_MAX_NUM_SEQS`.
    max_model_len: the longest prompt + max_tokens a sequence may ask for; None: the model's
        context (max_position_embeddings).
    kv_cache_gib: memory budget of the pool (K/V plus per-slot draft state); None: 1 GiB on the
        CPU, `gpu_memory_utilization` of free memory on a GPU.
    max_prefill_tokens: prompt tokens per prefill step; longer prompts are prefilled in chunks,
        so running rows wait at most one such step between their own steps.
    max_running_requests: requests admitted at once; None: as many as the pool holds. 1 is the
        serial mode (one request at a time, the old behaviour), for comparisons.
    drafting: "auto" (cost-aware: each step picks an AR step, a draft length and the first m
        levels, or a lookup step, by expected tokens per second: never much slower than AR) or
        "fixed" (every decode step pre-drafts all the model's levels, whatever it costs). The
        output distribution is the same; with `SamplingParams.seed_stable` (the default) so are
        the tokens of a seed, whatever the choices made (without it they depend on them).
    attention: "dense" (one masked SDPA over prefix + step: the reference) or "split" (the prefix
        through FlexAttention by lengths only, merged with the in-step part by log-sum-exp; the
        fast path for long contexts on a GPU, see `model/attention.py`) or "triton" (as "split",
        with the prefix part by a fused split-KV Triton kernel reading the cache by slot; needs
        triton on a CUDA / ROCm device, `model/triton_attention.py`).
    compile: run the model forward and each decode step's sampling half through torch.compile
        (Inductor; dynamic shapes, decode batches padded to powers of two); auto drafting then
        chooses among the calibrated step shapes only. False is the eager fallback.
    cuda_graphs: run decode forwards at static shapes (rows and prefix length rounded up to powers
        of two) and, on a CUDA / ROCm GPU, as captured graphs replayed with one launch
        (`engine/step_graphs.py`); on the CPU the same static shapes run eagerly (the tested
        path, no speed-up). Needs attention "dense" or "triton"; exclusive with compile.
    max_sequences_per_request: prompts x n of one request; None: 8 x the pool's slots.
    max_waiting_sequences: sequences queued but not yet admitted, over all requests; beyond it
        new requests are refused (load, not a bad request); None: 32 x the pool's slots.
    calibration_seconds: with auto drafting, the seconds of timed steps in the start-up
        step-cost calibration (`Engine.calibrate_step_costs`), after an unmeasured warm-up
        (longer with compile or cuda_graphs: it compiles or captures every calibrated shape);
        0: none, the cost model learns from live steps only.
    lookup_drafts: with auto drafting, also consider verify-only steps over lookup drafts (the
        tokens that followed the latest earlier occurrence of a row's last few tokens in its
        own prompt and output; `engine/lookup.py`), for lossless rows. Exact like any draft.
    calibration_cache: a JSON file of measured step costs keyed by device, model shape, dtype,
        block length and threads; a hit skips the timed steps (not the warm-up of compiled or
        captured steps). None: no cache.
    history_mib: with auto drafting, the memory of the history store (`engine/history.py`: per
        prompt, the completions of its recent rollouts, drafts for lossless rows that roll the
        same prompt out again, as RL does); least recently used prompts are evicted past it.
        0: no history drafts.
    cost_model: how auto drafting prices a step: "calibrated" (this device's measured step costs)
        or "flat", a what-if: every step shape costs what an AR step over the same rows costs,
        the memory-bound regime of a GPU at small and medium batch, so drafts are taken whenever
        they are expected to be accepted (for measuring draft quality on a CPU). Either way the
        output distribution is the same; only which drafts are proposed changes.
    """
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    max_prefill_tokens: int = 2048
    max_running_requests: int | None = None
    max_sequences_per_request: int | None = None
    max_waiting_sequences: int | None = None
    drafting: str = "auto"
    attention: str = "dense"
    compile: bool = False
    cuda_graphs: bool = False
    calibration_seconds: float = 0.0
    calibration_cache: str | None = None
    lookup_drafts: bool = True
    cost_model: str = "calibrated"
    history_mib: float = 256.0

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "max_running_requests", "max_sequences_per_request",
                     "max_waiting_sequences"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not isinstance(self.max_prefill_tokens, int) or self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {self.max_prefill_tokens!r}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_PATHS)}, got {self.attention!r}")
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs and compile are exclusive: choose one")
        if self.cuda_graphs and self.attention not in ("dense", "triton"):
            raise ValueError(f"cuda_graphs needs attention 'dense' or 'triton', got {self.attention!r}")
        if not isinstance(self.lookup_drafts, bool):
            raise ValueError(f"lookup_drafts must be true or false, got {self.lookup_drafts!r}")
        if self.drafting not in ("fixed", "auto"):
            raise ValueError(f"drafting must be 'fixed' or 'auto', got {self.drafting!r}")
        if not (isinstance(self.history_mib, (int, float)) and 0 <= self.history_mib <= 1 << 20):
            raise ValueError(f"history_mib must be in [0, {1 << 20}] (MiB), got {self.history_mib!r}")
        if self.cost_model not in ("calibrated", "flat"):
            raise ValueError(f"cost_model must be 'calibrated' or 'flat', got {self.cost_model!r}")
        if not (0 <= self.calibration_seconds <= 600 and math.isfinite(self.calibration_seconds)):
            raise ValueError(f"calibration_seconds must be in [0, 600], got {self.calibration_seconds}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


DEFAULT_MAX_NUM_SEQS = 256
