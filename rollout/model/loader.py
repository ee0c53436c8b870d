"""Loading an HF model directory (config.json + *.safetensors) into our decoder.

Checkpoints name most tensors as the model does. MoE experts are the exception: transformers 5
holds them fused (`mlp.experts.gate_up_proj` [E, 2I, hidden], `mlp.experts.down_proj`
[E, hidden, I]) but writes, and the Hub stores, one tensor per expert (`mlp.experts.3.gate_proj
.weight`; Mixtral: `block_sparse_moe.experts.3.w1.weight`, w1 gate, w3 up, w2 down).
`expert_slot` says where such a tensor goes in the fused one; model loading and weight updates
from disk both gather them through it, and accept the fused names as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig, UnsupportedModelError, read_json
from .decoder import Decoder
from .rope import inverse_frequencies
from .zaya import ZayaConfig, ZayaDecoder

SAFETENSORS_INDEX = "model.safetensors.index.json"
_EXPERT_PIECE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                           r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_GATE, _DOWN = ("gate_proj", "w1"), ("down_proj", "w2")


def checkpoint_name(name: str) -> str:
    """A checkpoint's name in the model's terms: Mixtral's on-disk `block_sparse_moe` is `mlp`."""
    return name.replace(".block_sparse_moe.", ".mlp.")


def expert_slot(name: str, expected: Mapping[str, Sequence[int]]) -> tuple[str, tuple[int, int, int]] | None:
    """For one expert's tensor in the per-expert layout: (the fused parameter's name, its place
    (expert, first row, end row): `fused[expert, first:end]`); None for any other name (or an
    expert the model does not have)."""
    m = _EXPERT_PIECE.search(name)
    if m is None:
        return None
    layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
    fused = f"model.layers.{layer}.mlp.experts." + ("down_proj" if proj in _DOWN else "gate_up_proj")
    if fused not in expected or expert >= expected[fused][0]:
        return None
    rows = expected[fused][1]
    if proj in _DOWN:
        return fused, (expert, 0, rows)
    return fused, (expert, 0, rows // 2) if proj in _GATE else (expert, rows // 2, rows)


def slot_shape(shape: Sequence[int], place: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of the per-expert tensor at `place` of a fused tensor of `shape`."""
    return (place[2] - place[1], *shape[2:])


def slots_per_tensor(name: str, shape: Sequence[int]) -> int:
    """How many per-expert tensors make up the fused tensor `name` of `shape`."""
    return shape[0] * (2 if name.endswith("gate_up_proj") else 1)


def gather_experts(name: str, shape: Sequence[int], parts: Mapping[tuple[int, int, int], torch.Tensor]
                   ) -> torch.Tensor:
    """The fused tensor `name` from its complete per-expert pieces (in their dtype)."""
    if len(parts) != slots_per_tensor(name, shape):
        raise ValueError(f"{name}: {len(parts)} of its {slots_per_tensor(name, shape)} per-expert tensors")
    fused = torch.empty(tuple(shape), dtype=next(iter(parts.values())).dtype)
    for (expert, start, end), t in parts.items():
        fused[expert, start:end] = t
    return fused


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
    pieces: dict[str, dict[tuple, torch.Tensor]] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = checkpoint_name(key)
                if name in expected:
                    state[name] = f.get_tensor(key)
                elif (slot := expert_slot(name, expected)) is not None:
                    fused, place = slot
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != slot_shape(expected[fused], place):
                        raise UnsupportedModelError(
                            f"{model_dir}: tensor {key} has shape {list(tensor.shape)}, config.json implies "
                            f"{list(slot_shape(expected[fused], place))}")
                    pieces.setdefault(fused, {})[place] = tensor
    for fused, parts in pieces.items():
        if fused not in state:
            if len(parts) != slots_per_tensor(fused, expected[fused]):
                raise UnsupportedModelError(
                    f"{model_dir} weights hold {len(parts)} of the {slots_per_tensor(fused, expected[fused])} "
                    f"per-expert tensors of {fused}")
            state[fused] = gather_experts(fused, expected[fused], parts)
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
