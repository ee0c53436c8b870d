"""Our decoder against HF transformers on the same weights (fp32, CPU: max abs diff <= 1e-4)."""

import json

import pytest
import torch

from rollout import Engine
from rollout.train.tiny import make_tiny_model

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "qwen2": dict(model_type="qwen2"),
    "qwen2_tied_yarn": dict(model_type="qwen2", tie_word_embeddings=True,
                            rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                             "original_max_position_embeddings": 32}),
    "llama_bias_llama3": dict(model_type="llama", attention_bias=True, mlp_bias=True,
                              rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
    "qwen3_linear": dict(model_type="qwen3", head_dim=16,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}),
}


def hf_logits(model_dir, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([t])).logits[0] for t in ids]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_hf(tmp_path, name):
    kwargs = dict(VARIANTS[name])
    model_dir = make_tiny_model(tmp_path, kwargs.pop("model_type"), vocab_size=64, hidden_size=64,
                                num_heads=4, num_kv_heads=2, max_position_embeddings=256, **kwargs)
    ids = [list(range(2, 60)) + list(range(3, 50)), [5, 9, 2]]
    engine = Engine.from_pretrained(model_dir)
    assert engine.config.rope.rope_type == kwargs.get("rope_parameters", {}).get("rope_type", "default")
    ours = engine.forward_logits(ids)
    for a, b in zip(ours, hf_logits(model_dir, ids)):
        assert (a - b).abs().max().item() <= 1e-4


def test_transformers4_style_rope_scaling_is_read(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama", vocab_size=32)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 5000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    engine = Engine.from_pretrained(model_dir)
    assert engine.config.rope.rope_type == "linear" and engine.config.rope.theta == 5000.0
    ids = [list(range(2, 30))]
    assert (engine.forward_logits(ids)[0] - hf_logits(model_dir, ids)[0]).abs().max().item() <= 1e-4


def test_tidar_decode_step_ar_logits_match_hf(tiny_dir, hf_model):
    """The AR logits of a TiDAR step (drafts + mask blocks in one forward) equal HF's causal logits."""
    from rollout.model.batch import StepBatch
    from rollout.model.kv_cache import KVCache
    from rollout.step_layout import decode_layout, prefill_layout

    engine = Engine.from_pretrained(tiny_dir)
    prompt, drafts = [2, 3, 4, 5, 6], [7, 8, 9, 10]
    cfg = engine.config
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 32, cfg.head_dim, torch.float32, "cpu")
    slots = torch.tensor([0])
    pos, vis, write = prefill_layout([len(prompt)], 4)
    ids = torch.tensor([prompt + [15] * 4])
    engine.model(ids, StepBatch(slots, torch.zeros(1, dtype=torch.long), 0, pos, vis,
                                cache.write_index(slots, pos, write)), cache)
    layout = decode_layout(4, (1, 2, 3, 4))
    T = layout.num_tokens
    step_ids = torch.tensor([drafts + [15] * (T - 4)])
    L = torch.tensor([len(prompt)])
    write = torch.zeros(1, T, dtype=torch.bool)
    write[:, :4] = True
    positions = L[:, None] + layout.offsets
    hidden = engine.model(step_ids, StepBatch(slots, L, len(prompt), positions, layout.visible[None],
                                              cache.write_index(slots, positions, write)), cache)
    ours = engine.model.logits(hidden[0, :4])
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt + drafts])).logits[0, len(prompt):]
    assert (ours - ref).abs().max().item() <= 1e-4
