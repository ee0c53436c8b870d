"""Packed projections (`Decoder.pack_projections`): one GEMM for q/k/v and one for gate/up, the
HF-named parameters being views of the packed tensors. The packed path must give the plain
path's numbers, see every write to the parameters (weight loads, optimizer steps) and fall back
to the plain path, never to stale weights, once a parameter is moved or replaced."""

import json

import pytest
import torch
from torch import nn

from rollout import Engine
from rollout.config import EngineConfig
from rollout.model.batch import SequenceBatch
from rollout.train.tiny import make_tiny_model

pytest.importorskip("transformers")

VARIANTS = {"qwen2": {}, "llama_bias": dict(attention_bias=True, mlp_bias=True), "qwen3": dict(head_dim=16),
            "qwen2_tied": dict(tie_word_embeddings=True)}


def _model(tmp_path, name):
    model_type = "llama" if name.startswith("llama") else name.split("_")[0]
    path = make_tiny_model(tmp_path / name, model_type, vocab_size=64, hidden_size=64, num_heads=4,
                           num_kv_heads=2, **VARIANTS[name])
    return Engine.from_pretrained(path, config=EngineConfig(drafting="fixed"))


def _logits(model, ids):
    S = ids.shape[1]
    batch = SequenceBatch(torch.arange(S)[None], torch.ones(S, S, dtype=torch.bool).tril())
    return model.logits(model(ids, batch, None))


def _packs(model):
    return [(layer.self_attn, layer.mlp) for layer in model.model.layers]


def _all_current(model):
    return all(a.packed.current() and m.packed.current() for a, m in _packs(model))


IDS = torch.tensor([[3, 9, 2, 17, 40, 5, 11, 8, 30, 2]])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_packed_forward_equals_plain_forward(tmp_path, name):
    model = _model(tmp_path, name).model
    assert _all_current(model)
    with torch.inference_mode():
        packed = _logits(model, IDS)
        saved = [(a.packed, m.packed) for a, m in _packs(model)]
        for a, m in _packs(model):
            a.packed = m.packed = None
        plain = _logits(model, IDS)
        for (a, m), (pa, pm) in zip(_packs(model), saved):
            a.packed, m.packed = pa, pm
    assert torch.allclose(packed, plain, atol=1e-5, rtol=0)
    assert (packed - plain).abs().max().item() < 1e-5


def test_parameters_are_views_of_the_packed_tensor(tmp_path):
    model = _model(tmp_path, "llama_bias").model
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.packed.weight.data_ptr()
    with torch.no_grad():
        attn.v_proj.weight.fill_(0.5)
        attn.k_proj.bias.fill_(-2.0)
    q, k, v = attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features
    assert (attn.packed.weight[q + k:q + k + v] == 0.5).all()
    assert (attn.packed.bias[q:q + k] == -2.0).all()
    assert set(model.state_dict()) >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"}


def test_a_weight_load_reaches_the_packed_path(tmp_path):
    """Engine.load_weights copies into the parameters; the packed GEMM reads the new values."""
    engine = _model(tmp_path, "qwen2")
    before = engine.forward_logits(IDS.tolist())[0]
    name = "model.layers.1.mlp.gate_proj.weight"
    new = torch.randn_like(engine.model.state_dict()[name])
    engine.load_weights({name: new}, version=1)
    assert _all_current(engine.model)
    after = engine.forward_logits(IDS.tolist())[0]
    mlp = engine.model.model.layers[1].mlp
    mlp.packed = None  # the plain path on the same parameters: the reference
    plain = engine.forward_logits(IDS.tolist())[0]
    assert not torch.allclose(before, after)
    assert (after - plain).abs().max().item() < 1e-5


def test_a_replaced_or_moved_parameter_falls_back_to_the_plain_path(tmp_path):
    model = _model(tmp_path, "qwen2").model
    attn = model.model.layers[0].self_attn
    with torch.inference_mode():
        base = _logits(model, IDS)
    # A new Parameter object: the pack no longer holds the layer's weight.
    attn.q_proj.weight = nn.Parameter(attn.q_proj.weight.detach().clone() * 2)
    assert not attn.packed.current() and not model.packs_current()
    with torch.inference_mode():
        replaced = _logits(model, IDS)
    assert not torch.allclose(base, replaced)
    # Same Parameter object, new storage (param.data = ...): caught by the pointer check.
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight.data = mlp.up_proj.weight.detach().clone() * 0
    assert not mlp.packed.current()
    with torch.inference_mode():
        zeroed = _logits(model, IDS)
    model.unpack_projections()
    assert all(a.packed is None and m.packed is None for a, m in _packs(model))
    with torch.inference_mode():
        assert torch.equal(zeroed, _logits(model, IDS))
    # A replaced layer (an adapter wrapping it, say): its parameters are no longer the views.
    model2 = _model(tmp_path, "llama_bias").model
    mlp2 = model2.model.layers[0].mlp
    assert model2.packs_current()
    old = mlp2.gate_proj
    mlp2.gate_proj = nn.Linear(old.in_features, old.out_features, bias=True)
    assert not mlp2.packed.current() and not model2.packs_current()
    mlp2.gate_proj = old
    assert model2.packs_current()
    # A conversion drops every pack; packing again restores the packed path.
    model = _model(tmp_path, "qwen3").model.to(torch.float64)
    assert all(a.packed is None and m.packed is None for a, m in _packs(model))
    with torch.inference_mode():
        wide = _logits(model, IDS)
        model.pack_projections()
        assert _all_current(model)
        assert (wide - _logits(model, IDS)).abs().max().item() < 1e-9


def test_training_gets_gradients_and_inference_sees_the_optimizer_step(tmp_path):
    model = _model(tmp_path, "llama_bias").model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = _logits(model, IDS[:, :-1]).log_softmax(-1).gather(-1, IDS[:, 1:, None]).sum().neg()
    loss.backward()
    layer = model.model.layers[0]
    for p in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.bias, layer.mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.inference_mode():
        before = _logits(model, IDS)
    opt.step()
    assert _all_current(model)
    with torch.inference_mode():
        after = _logits(model, IDS)
        model.unpack_projections()
        plain = _logits(model, IDS)
    assert not torch.allclose(before, after)
    assert (after - plain).abs().max().item() < 1e-5


def test_compiled_steps_run_the_packed_path_yet_never_serve_a_replaced_parameter_stale(tmp_path):
    """Under compile=True the runner checks the packs every step (`StepBatch.packed`): compiled
    decode steps run the packed GEMMs, and once a parameter is replaced they run the plain path
    on the new parameter, as eager does."""
    from rollout import SamplingParams

    engine = _model(tmp_path, "llama_bias")
    compiled = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", compile=True))
    params = SamplingParams(sampler="ar", temperature=0.8, max_tokens=6, seed=4)
    prompts = [[3, 9, 2, 17], [40, 5]]

    def run(e):
        outs = [c for g in e.generate(prompts, params) for c in g]
        return [c.token_ids for c in outs], torch.tensor([c.logprobs for c in outs])

    tokens, logprobs = run(engine)
    c_tokens, c_logprobs = run(compiled)
    assert c_tokens == tokens and (c_logprobs - logprobs).abs().max().item() <= 1e-5
    # The packed tensor is what a compiled step multiplies by: a pack that no longer matches its
    # parameters (never done outside this test) changes what the compiled engine returns.
    attn = engine.model.model.layers[0].self_attn
    real = attn.packed.weight
    attn.packed.weight = real * 0.5
    try:
        assert not torch.allclose(run(compiled)[1], logprobs, atol=1e-3)
    finally:
        attn.packed.weight = real
    assert (run(compiled)[1] - logprobs).abs().max().item() <= 1e-5
    # A replaced parameter: the packs are not current, both engines take the plain path with it.
    attn.q_proj.weight = nn.Parameter(attn.q_proj.weight.detach().clone() * 2)
    e_tokens, e_logprobs = run(engine)
    c_tokens, c_logprobs = run(compiled)
    assert not torch.allclose(e_logprobs, logprobs, atol=1e-3)
    assert c_tokens == e_tokens and (c_logprobs - e_logprobs).abs().max().item() <= 1e-5


def _linear_weights(model):
    """Every weight a linear layer multiplies by (packs, o/down projections, LM head)."""
    out = [model.lm_head.weight]
    for attn, mlp in _packs(model):
        out += [attn.packed.weight, attn.o_proj.weight, mlp.packed.weight, mlp.down_proj.weight]
    return out


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied"])
def test_the_engine_stores_weights_input_major_on_the_cpu_with_the_default_layouts_numbers(tmp_path, name):
    """On the CPU the engine multiplies by weights stored as their transposes (faster in MKL);
    names, shapes, values, the packs and a tied embedding stay, and the logits are the default
    layout's."""
    from rollout.model.layers import is_input_major

    model = _model(tmp_path, name).model
    tied = model.config.tie_word_embeddings
    assert tied == (name == "qwen2_tied")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert model.input_major and all(is_input_major(w) and not w.is_contiguous() for w in _linear_weights(model))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied and _all_current(model)
    with torch.inference_mode():
        fast = _logits(model, IDS)
        model.pack_projections(input_major=False)
        assert all(w.is_contiguous() for w in _linear_weights(model)) and _all_current(model)
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        default = _logits(model, IDS)
    # The same sums in another order: float32 rounding apart, no more.
    assert (fast - default).abs().max().item() < 1e-5 * default.abs().max().item()
    def unpacked_weights():  # the LM head, o and down projections: not concatenated by packing
        return [model.lm_head.weight] + [w for a, m in _packs(model) for w in (a.o_proj.weight, m.down_proj.weight)]

    pointers = [w.data_ptr() for w in unpacked_weights()]
    model.pack_projections()  # repacking keeps the layout and copies nothing it need not
    assert not model.input_major and [w.data_ptr() for w in unpacked_weights()] == pointers


def test_a_dense_bfloat16_engine_on_the_cpu_keeps_the_default_layout_and_moe_keeps_input_major(tmp_path):
    """oneDNN reads bfloat16 weights faster in nn.Linear's layout, so a dense bfloat16 engine on
    the CPU keeps it (and gives the float32-layout engine's greedy tokens); float32 engines and
    MoE families (the native expert kernel walks input-major experts) are laid out input-major."""
    from rollout.config import ModelConfig
    from rollout.engine.engine import cpu_input_major
    from rollout.model.layers import is_input_major

    path = make_tiny_model(tmp_path / "dense", "qwen2", vocab_size=64, hidden_size=64, num_heads=4, num_kv_heads=2)
    bf16 = Engine.from_pretrained(path, dtype=torch.bfloat16, config=EngineConfig(drafting="fixed"))
    assert not bf16.model.input_major
    assert all(w.is_contiguous() and not is_input_major(w) for w in _linear_weights(bf16.model))
    assert Engine.from_pretrained(path, config=EngineConfig(drafting="fixed")).model.input_major
    dense = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    moe = ModelConfig.from_hf_dict(dict(json.loads((path / "config.json").read_text()), model_type="qwen3_moe",
                                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    assert [cpu_input_major(dense, "cpu", d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        True, False, False]
    assert cpu_input_major(moe, "cpu", torch.bfloat16) and not cpu_input_major(dense, "meta", torch.float32)


def test_a_weight_push_lands_in_input_major_weights_in_place(tmp_path):
    """Engine.load_weights copies into the input-major parameters (their layout and storage
    stay), and the engine then computes what a default-layout model with those weights does."""
    engine = _model(tmp_path, "qwen2_tied")
    reference = _model(tmp_path / "ref", "qwen2_tied")
    reference.model.pack_projections(input_major=False)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    gen = torch.Generator().manual_seed(3)
    new = {n: torch.randn(engine.model.state_dict()[n].shape, generator=gen) for n in names}
    pointers = [w.data_ptr() for w in _linear_weights(engine.model)]
    engine.load_weights(new, version=1)
    reference.load_weights(new, version=1)
    assert [w.data_ptr() for w in _linear_weights(engine.model)] == pointers and _all_current(engine.model)
    assert torch.equal(engine.model.lm_head.weight, new["model.embed_tokens.weight"])
    ours, ref = engine.forward_logits(IDS.tolist())[0], reference.forward_logits(IDS.tolist())[0]
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
