"""Named model shapes for benchmarks with random weights (HF config.json dicts), and engines on them."""

import torch

from rollout import Engine
from rollout.config import EngineConfig, ModelConfig, TidarConfig
from rollout.model.decoder import Decoder

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings)
    "tiny": (64, 128, 2, 4, 2, 512, True),
    "small": (256, 704, 4, 4, 2, 4096, True),  # the embedded model's size: the CPU stand-in for 1.5B
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
}


def hf_config(shape: str) -> dict:
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=tied, hidden_act="silu", eos_token_id=vocab - 2)


def random_decoder(shape: str, device: str, dtype: torch.dtype) -> Decoder:
    """Our decoder with random weights (std 0.02, seed 0) of a named shape, built on the device."""
    cfg = ModelConfig.from_hf_dict(hf_config(shape))
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def random_engine(shape: str, block_size: int, device: str, dtype: torch.dtype, config: EngineConfig,
                  model: Decoder | None = None) -> Engine:
    """An engine on `model` or random weights of a named shape; mask token = last id."""
    model = model if model is not None else random_decoder(shape, device, dtype)
    return Engine(model, TidarConfig(mask_token_id=model.config.vocab_size - 1, block_size=block_size),
                  device, dtype, config)
