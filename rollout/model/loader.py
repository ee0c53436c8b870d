"""Loading an HF model directory (config.json + *.safetensors) into our decoder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig, UnsupportedModelError, read_json
from .decoder import Decoder
from .rope import inverse_frequencies
from .zaya import ZayaConfig, ZayaDecoder

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shards an HF index names, or every *.safetensors of the directory (the one reading of
    a checkpoint directory: model loading and weight updates from disk both use it)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.exists() and not index.is_file():  # a FIFO would block the read (and its caller) forever
        raise UnsupportedModelError(f"{index} is not a regular file")
    if index.exists():
        try:
            names = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError) as e:
            raise UnsupportedModelError(f"{index} is not an HF shard index with a weight_map: {e}") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UnsupportedModelError(f"{model_dir} lacks weight files named in {SAFETENSORS_INDEX}: {missing[:5]}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    odd = [f.name for f in files if not f.is_file()]
    if odd:
        raise UnsupportedModelError(f"{model_dir / odd[0]} is not a regular file (a FIFO or device is never read)")
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no *.safetensors weight files")
    return files


def read_model_config(model_dir: str | Path) -> tuple[Path, dict, ModelConfig]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").exists():
        raise UnsupportedModelError(f"{model_dir} has no config.json")
    hf_cfg = read_json(model_dir / "config.json")
    if hf_cfg.get("model_type") == "zaya":
        return model_dir, hf_cfg, ZayaConfig.from_hf_dict(hf_cfg)
    return model_dir, hf_cfg, ModelConfig.from_hf_dict(hf_cfg)


def declared_dtype(hf_cfg: dict) -> torch.dtype:
    """The dtype config.json declares ("dtype", or transformers 4's "torch_dtype"): bfloat16 and
    float16 checkpoints stay half precision; anything else (or nothing) is float32."""
    name = str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def build_decoder(cfg: ModelConfig | ZayaConfig) -> Decoder | ZayaDecoder:
    """The decoder class of the config's family, built on the current default device."""
    return ZayaDecoder(cfg) if isinstance(cfg, ZayaConfig) else Decoder(cfg)


def load_decoder(model_dir: Path, cfg: ModelConfig, device: torch.device | str,
                 dtype: torch.dtype, input_major: bool = False) -> Decoder:
    """The decoder with `model_dir`'s weights, packed (`Decoder.pack_projections`; `input_major`:
    its weight layout, for inference on the CPU)."""
    with torch.device("meta"):
        model = build_decoder(cfg)
    expected = model.weight_names_and_shapes()
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UnsupportedModelError(f"{model_dir} weights lack {len(missing)} tensors: {shown}")
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise UnsupportedModelError(
                f"{model_dir}: tensor {name} has shape {list(tensor.shape)}, "
                f"config.json implies {list(expected[name])}")
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # to_empty left the RoPE buffers uninitialised, and .to(dtype) would have rounded them.
    if isinstance(model, ZayaDecoder):
        model.reset_buffers(device)
    else:
        model.inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)[0].to(device)
    model.load_state_dict(state, strict=False)
    return model.pack_projections(input_major=input_major).eval()
