"""A tiny random model saved as a real HF directory, for tests and demos.

The weights come from transformers' own model classes and `save_pretrained`, so loading it
exercises exactly the path a user's checkpoint takes (config.json + model.safetensors +
tidar_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TIDAR_CONFIG_FILE

HF_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                     "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig"}


def make_tiny_model(path: str | Path, model_type: str = "qwen2", vocab_size: int = 16, hidden_size: int = 32,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    intermediate_size: int = 64, block_size: int = 4, max_position_embeddings: int = 256,
                    init_std: float = 0.3, seed: int = 0, **config_overrides) -> Path:
    """Writes a random model to `path` and returns it. The mask token is the last vocab id and
    EOS is id 1. `init_std` well above HF's 0.02 makes the AR and diffusion distributions peaked
    and different from each other, which the statistical tests need to have power."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_cls = getattr(transformers, HF_CONFIG_CLASSES[model_type])
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        initializer_range=init_std, eos_token_id=1, bos_token_id=None, pad_token_id=None,
        **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    model.save_pretrained(path, safe_serialization=True)
    (path / TIDAR_CONFIG_FILE).write_text(json.dumps(
        {"mask_token_id": vocab_size - 1, "block_size": block_size}, indent=2))
    return path
