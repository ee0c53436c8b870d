"""The top-k MoE families (Qwen3-MoE, Mixtral) against transformers on tiny random models:
logits of every step kind, greedy and sampled output, exactness of the lossless sampler,
weight pushes with fused 3-D expert tensors, conversion and a service round trip."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import rollout.sampling
from rollout import Engine, SamplingParams
from rollout.config import EngineConfig, ModelConfig, UnsupportedModelError
from rollout.model.batch import StepBatch
from rollout.model.kv_cache import KVCache
from rollout.model import moe
from rollout.model.qwen3_moe import MoeLayer
from rollout.sampling import process_logits
from rollout.step_layout import decode_layout
from rollout.train.tiny import make_tiny_model
from test_distribution import ALPHA, NUM_SAMPLES, PROMPT, VOCAB, chi_square_pvalue, sample_counts
from test_lookup import every_step_a_lookup_step

transformers = pytest.importorskip("transformers")

V = 32  # vocabulary of the tiny models: mask id 31, EOS 1
MASK = V - 1
PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12], [3, 3, 3, 3, 9]]
FAMILIES = {
    # layer 1 dense (mlp_only_layers); layers 0 and 2 sparse; top-2 of 8 without renormalisation
    "qwen3_moe": dict(num_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False),
    # every layer sparse, top-2 of 4, always renormalised
    "mixtral": dict(num_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(model dir, our engine, HF's model) of one family."""
    name = request.param
    model_dir = make_tiny_model(tmp_path_factory.mktemp(name), name, vocab_size=V, hidden_size=32, num_heads=4,
                                num_kv_heads=2, block_size=4, **FAMILIES[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed")), hf


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen3_moe_replica"), "qwen3_moe", vocab_size=V, hidden_size=32,
                           num_heads=4, num_kv_heads=2, block_size=4, **FAMILIES["qwen3_moe"])


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def causal_step(model, cache: KVCache, ids: list[int], start: int) -> torch.Tensor:
    """One step of row 0 over `ids` at positions start.. (causal, all kept): logits [T, V]."""
    T = len(ids)
    slots, positions = torch.tensor([0]), (start + torch.arange(T))[None]
    batch = StepBatch(slots, torch.tensor([start]), start, positions, torch.ones(T, T, dtype=torch.bool).tril()[None],
                      cache.write_index(slots, positions, torch.ones(1, T, dtype=torch.bool)), ar_step=T == 1)
    with torch.inference_mode():
        return model.logits(model(torch.tensor([ids]), batch, cache))[0]


def new_cache(engine: Engine) -> KVCache:
    cfg = engine.config
    return KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 64, cfg.head_dim, torch.float32, "cpu")


def tokens(outs):
    return [[c.token_ids for c in group] for group in outs]


# ---------------------------------------------------------------------------- config and checkpoints
def test_config_reads_which_layers_are_sparse_and_the_routing():
    base = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    cfg = ModelConfig.from_hf_dict(dict(base, model_type="qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layers == (1, 5) and cfg.family == "qwen3_moe" and cfg.qk_norm and not cfg.norm_topk_prob
    mixtral = ModelConfig.from_hf_dict(dict(base, model_type="mixtral", num_local_experts=4, sliding_window=None))
    assert mixtral.moe_layers == tuple(range(6)) and mixtral.num_experts == 4 and mixtral.norm_topk_prob
    assert mixtral.moe_intermediate_size == 64 and not mixtral.qk_norm  # Mixtral's experts are its MLP
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok must be in"):
        ModelConfig.from_hf_dict(dict(base, model_type="qwen3_moe", num_experts_per_tok=9))
    with pytest.raises(UnsupportedModelError, match="sliding_window is set"):
        ModelConfig.from_hf_dict(dict(base, model_type="mixtral", sliding_window=4096))
    with pytest.raises(UnsupportedModelError, match="model_type 'olmoe' is not supported"):
        ModelConfig.from_hf_dict(dict(base, model_type="olmoe"))


def test_per_expert_checkpoints_load_into_hf_fused_names_and_values(family):
    """transformers writes one tensor per expert; in memory (and in pushes) they are 3-D."""
    model_dir, engine, hf = family
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        on_disk = list(f.keys())
    assert any(".experts.0." in k for k in on_disk) and not any(k.endswith("gate_up_proj") for k in on_disk)
    ours, theirs = engine.model.state_dict(), hf.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert ours["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3


def expert_reference(gate_up, down, x, weights, experts):
    """The per-assignment definition of the experts' output; ids >= E (a skip expert) contribute zero."""
    E, H = down.shape[0], down.shape[1]

    def expert(e, v):
        if e >= E:
            return torch.zeros(H)
        g, u = (gate_up[e] @ v).chunk(2)
        return down[e] @ (torch.nn.functional.silu(g) * u)
    return torch.stack([sum(weights[n, j] * expert(experts[n, j], x[n]) for j in range(experts.shape[1]))
                        for n in range(len(x))])


def test_expert_compute_is_grouped_by_expert(monkeypatch):
    """Both paths equal the per-token definition; the loop runs one GEMM pair per expert that
    has tokens (never one per token), the grouped GEMM one call per projection."""
    E, H, I, k, N = 6, 16, 8, 2, 40
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    x = torch.randn(N, H, generator=gen)
    weights, experts = torch.topk(torch.randn(N, E, generator=gen).softmax(-1), k)
    experts[:, 0] = experts[:, 0].clamp(max=E - 2)  # expert E-1 gets few tokens, maybe none
    ref = expert_reference(gate_up, down, x, weights, experts)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, *r, **kw: calls.append(len(a)) or linear(a, *r, **kw))
    looped = moe.expert_loop(x, weights, experts, gate_up, down)
    # gate_up GEMMs first (one per expert), then the down GEMMs: each assignment once in each
    assert len(calls) == 2 * len(experts.unique()) and sum(calls[:len(calls) // 2]) == N * k
    assert (looped - ref).abs().max().item() <= 1e-4
    assert not moe.grouped_gemm_runs(x, gate_up)  # autograd: the loop
    with torch.no_grad():
        assert moe.grouped_gemm_runs(x, gate_up) == (moe._grouped_mm is not None)  # torch 2.13's CPU has it
        assert (moe.expert_grouped_gemm(x, weights, experts, gate_up, down) - ref).abs().max().item() <= 1e-4



def test_expert_loop_one_token_and_skip_experts_equal_the_definition():
    """The loop's special cases against the per-assignment definition: one token (no sort, k
    assignments in order, as decode at batch 1 runs), ids >= E (ZAYA's skip expert: zero, with
    or without real assignments beside them), and every token skipped."""
    E, H, I = 5, 16, 8
    gen = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)

    cases = [(1, [[3, 0, 4]]), (1, [[2, E]]), (6, [[0], [E], [3], [E], [0], [4]]), (3, [[E], [E], [E]]),
             (4, [[1, E], [E, 1], [2, 2 + 1], [E, E]])]
    for n, ids in cases:
        x = torch.randn(n, H, generator=gen)
        experts = torch.tensor(ids)
        weights = torch.rand(experts.shape, generator=gen)
        out = moe.expert_loop(x, weights, experts, gate_up, down)
        assert out.shape == x.shape
        assert (out - expert_reference(gate_up, down, x, weights, experts)).abs().max().item() <= 1e-5, ids



def test_grouped_gemm_zeroes_skip_expert_rows_the_kernel_leaves_unwritten(monkeypatch):
    """ZAYA's skip ids sort past every offset of the grouped GEMM, whose kernel leaves those rows
    unwritten: here they hold NaN (as reused memory may), and the result must still equal the
    definition (zero for skipped assignments), not NaN and not garbage."""
    E, H, I, N = 4, 16, 8, 12
    gen = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    x = torch.randn(N, H, generator=gen)
    experts = torch.tensor([[0], [E], [3], [E], [1], [1], [E], [2], [0], [3], [E], [2]])
    weights = torch.rand(experts.shape, generator=gen)
    real = moe._grouped_mm

    def unwritten_nan(a, b, offs):
        out = real(a, b, offs=offs)
        out[int(offs[-1]):] = float("nan")
        return out
    monkeypatch.setattr(moe, "_grouped_mm", unwritten_nan)
    with torch.no_grad():
        out = moe.expert_grouped_gemm(x, weights, experts, gate_up, down, skip_expert=True)
    assert (out - expert_reference(gate_up, down, x, weights, experts)).abs().max().item() <= 1e-4


def test_grouped_experts_trace_into_one_compiled_graph_as_the_eager_op():
    """Under torch.compile the expert grouping (host reads: run lengths, a token's ids) is one
    opaque op: fullgraph=True would raise at a graph break. Loop (one token, few assignments)
    and grouped GEMM (many) alike, with and without skip ids, equal the eager call and the
    definition."""
    E, H, I = 8, 16, 8
    gen = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    compiled = torch.compile(moe.grouped_experts, fullgraph=True, dynamic=True)
    cases = [([[5, 1]], False), ([[3], [E]], True), ([[e % (E + 1)] for e in range(20)], True),
             ([[e % E, (e + 3) % E] for e in range(12)], False)]
    with torch.no_grad():
        for ids, skip in cases:
            experts = torch.tensor(ids)
            x = torch.randn(len(ids), H, generator=gen)
            weights = torch.rand(experts.shape, generator=gen)
            eager = moe.grouped_experts(x, weights, experts, gate_up, down, skip_expert=skip)
            out = compiled(x, weights, experts, gate_up, down, skip_expert=skip)
            assert torch.equal(out, eager), ids
            assert (out - expert_reference(gate_up, down, x, weights, experts)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------- logits
def test_prefill_chunked_prefill_decode_and_tidar_step_logits_match_hf(family):
    _, engine, hf = family
    model, seq = engine.model, [2, 9, 4, 17, 5, 6, 22, 8, 3, 11, 29, 7]
    ref = hf_logits(hf, seq)
    whole = causal_step(model, new_cache(engine), seq, 0)
    assert (whole - ref).abs().max().item() <= 1e-4
    cache = new_cache(engine)  # chunked prefill: 5 + 5 + 2 tokens
    chunked = torch.cat([causal_step(model, cache, seq[i:i + 5], i) for i in range(0, len(seq), 5)])
    assert (chunked - ref).abs().max().item() <= 1e-4
    cache = new_cache(engine)  # prefill 4, then one AR decode step per token
    decoded = [causal_step(model, cache, seq[:4], 0)] + [causal_step(model, cache, [t], i)
                                                         for i, t in enumerate(seq[4:], start=4)]
    assert (torch.cat(decoded) - ref).abs().max().item() <= 1e-4
    # A TiDAR step: 4 drafts + a mask block per level in one forward; the drafts' AR logits.
    cache, prompt, drafts = new_cache(engine), seq[:5], seq[5:9]
    causal_step(model, cache, prompt, 0)
    layout = decode_layout(4, (1, 2, 3, 4))
    T, slots, L = layout.num_tokens, torch.tensor([0]), torch.tensor([len(prompt)])
    write = torch.zeros(1, T, dtype=torch.bool)
    write[:, :4] = True
    positions = L[:, None] + layout.offsets
    batch = StepBatch(slots, L, len(prompt), positions, layout.visible[None], cache.write_index(slots, positions, write))
    with torch.inference_mode():
        logits = model.logits(model(torch.tensor([drafts + [MASK] * (T - 4)]), batch, cache)[0, :4])
    assert (logits - ref[len(prompt):len(prompt) + 4]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------- the engine
def test_greedy_ar_equals_hf_generate(family):
    _, engine, hf = family
    ours = engine.generate(PROMPTS, SamplingParams(sampler="ar", temperature=0, max_tokens=16))
    for prompt, group in zip(PROMPTS, ours):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                          pad_token_id=0, eos_token_id=None, suppress_tokens=[MASK])  # we never sample the mask
        assert group[0].token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("sampler", ["ar", "lossless"])
def test_logprobs_match_teacher_forced_hf(family, sampler):
    _, engine, hf = family
    outs = engine.generate(PROMPTS, SamplingParams(sampler=sampler, temperature=0.8, top_k=12, max_tokens=16,
                                                   n=2, seed=5))
    for prompt, group in zip(PROMPTS, outs):
        for c in group:
            logits = hf_logits(hf, prompt + c.token_ids)[len(prompt) - 1:-1]
            ref = process_logits(logits, 0.8, 12, 1.0, (MASK,)).gather(-1, torch.tensor(c.token_ids)[:, None])
            assert (ref.squeeze(-1) - torch.tensor(c.logprobs)).abs().max().item() <= 1e-5


def test_lossless_greedy_equals_ar_greedy_with_chunked_prefill_and_lookup_drafts(family):
    _, engine, _ = family
    greedy = SamplingParams(temperature=0, max_tokens=20)
    ar = tokens(engine.generate(PROMPTS, SamplingParams(sampler="ar", temperature=0, max_tokens=20)))
    assert tokens(engine.generate(PROMPTS, greedy)) == ar
    assert engine.last_stats.tokens_per_forward > 1
    chunked = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", max_prefill_tokens=2))
    assert tokens(chunked.generate(PROMPTS, greedy)) == ar
    looked_up = every_step_a_lookup_step(Engine(engine.model, engine.tidar,
                                                config=EngineConfig(drafting="auto", lookup_drafts=True)), 3)
    assert tokens(looked_up.generate(PROMPTS, greedy)) == ar
    assert any(k.startswith("lookup/") for k in looked_up.last_stats.level_choices)


def test_keep_mode_weight_swap_continues_on_the_new_weights_exactly(family):
    model_dir, engine, _ = family
    old, new = Engine.from_pretrained(model_dir), Engine.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in old.model.state_dict().items()}
    new.load_weights(tensors, 1)
    swapped = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    request = swapped.add_request(PROMPTS, SamplingParams(max_tokens=12, n=2, seed=3))
    for _ in range(4):
        swapped.step()
    swapped.load_weights(tensors, 1)
    while not request.done:
        swapped.step()
    for seq in request.sequences:
        c, prompt = seq.out, seq.prompt
        assert c.policy_versions[0] == 0 and c.policy_versions[-1] == 1
        refs = [process_logits(e.forward_logits([prompt + c.token_ids])[0], 1.0, 0, 1.0, (MASK,)) for e in (old, new)]
        for i, (tok, v) in enumerate(zip(c.token_ids, c.policy_versions)):
            assert abs(float(refs[v][len(prompt) - 1 + i, tok]) - c.logprobs[i]) <= 1e-5


def test_calibration_cache_key_names_the_family_and_its_experts(family, tiny_dir):
    _, engine, _ = family
    key, dense_key = engine.cost_key(), Engine.from_pretrained(tiny_dir).cost_key()
    c = engine.config
    assert f"|{c.model_type}|" in key and f"experts={c.num_experts}/top{c.num_experts_per_tok}" in key
    assert f"expert_intermediate={c.moe_intermediate_size}" in key and "|dense|" in dense_key


# ---------------------------------------------------------------------------- exactness (Qwen3-MoE)
@pytest.fixture(scope="module")
def mc_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mc_moe"), "qwen3_moe", vocab_size=VOCAB, hidden_size=32,
                           block_size=4, init_std=0.25, seed=3, num_layers=1, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=16, norm_topk_prob=True)


def exact_ar_distribution(model_dir, temperature: float, top_k: int) -> torch.Tensor:
    """P(x1, x2, x3 | PROMPT) [V, V, V] by enumeration with HF's model in float64 (its eager
    experts: the grouped GEMM has no float64 kernel)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                                           experts_implementation="eager").eval()
    with torch.no_grad():
        def next_probs(prefixes):
            logits = hf(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1]
            return process_logits(logits, temperature, top_k, 1.0, (VOCAB - 1,)).exp()
        p1 = next_probs([[]])[0]
        p2 = next_probs([[a] for a in range(VOCAB)])
        p3 = next_probs([[a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def test_lossless_matches_ar_distribution_on_qwen3_moe(mc_dir):
    params = SamplingParams(sampler="lossless", temperature=0.9, top_k=6, max_tokens=3, n=NUM_SAMPLES, seed=11,
                            seed_stable=False)
    p = chi_square_pvalue(sample_counts(mc_dir, params), exact_ar_distribution(mc_dir, 0.9, 6))
    assert p > ALPHA, f"lossless samples differ from AR (chi-square p = {p:.2e}; a correct sampler fails w.p. {ALPHA})"


def test_wrong_residual_is_detected_on_qwen3_moe(mc_dir, monkeypatch):
    """Negative control: resampling from p instead of norm(max(0, p - q)) after a rejection."""
    monkeypatch.setattr(rollout.sampling, "residual_distribution", lambda p, q: p)
    params = SamplingParams(sampler="lossless", max_tokens=3, n=NUM_SAMPLES, seed=11, seed_stable=False)
    p = chi_square_pvalue(sample_counts(mc_dir, params), exact_ar_distribution(mc_dir, 1.0, 0))
    assert p < 1e-8, f"the wrong sampler was not detected (p = {p:.2e}): the test has no power"


# ---------------------------------------------------------------------------- around the model
def test_weight_pushes_whole_bucketed_and_from_disk_serve_those_weights(qwen3_moe_dir, tmp_path):
    """Through an in-process replica (the service's unit): a whole push of HF 5 state-dict names,
    a bucket of 3-D expert tensors and the router, and a directory saved by transformers (one
    tensor per expert); after each, the served logits and greedy tokens are HF's."""
    from rollout.service.messages import Finished
    from rollout.service.replica import GeneratorReplica
    from rollout.service.servicer import model_weight_shapes
    from rollout.service.updates import read_bucket
    from rollout.service.weights import canonical_name

    hf = transformers.AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32).eval()
    replica = GeneratorReplica(str(qwen3_moe_dir), "moe0", metrics_port=None)
    gen = torch.Generator().manual_seed(1)

    def check_served(version: int):
        assert replica.engine.weight_version == version
        assert (replica.engine.forward_logits([PROMPTS[1]])[0] - hf_logits(hf, PROMPTS[1])).abs().max() <= 1e-4
        messages = replica.generate(f"check{version}", [PROMPTS[1]], dict(sampler="ar", temperature=0,
                                                                        max_tokens=10), version)
        [record] = [r for m in messages if isinstance(m, Finished) for r in m.records]
        ref = hf.generate(torch.tensor([PROMPTS[1]]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0, eos_token_id=None, suppress_tokens=[MASK])
        assert record["token_ids"].tolist() == ref[0, len(PROMPTS[1]):].tolist()

    try:
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in hf.state_dict().items()}
        hf.load_state_dict(state)
        replica.stage_weights(1, state)
        replica.commit_weights(1)
        check_served(1)
        expected = model_weight_shapes(replica.engine.config)
        names = ["model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj",
                 "model.layers.2.mlp.gate.weight"]
        sent = {n: torch.randn(expected[n], generator=gen) * 0.3 for n in names}
        bucket = read_bucket(save(sent), lambda n: canonical_name(n, expected), expected)
        hf.load_state_dict(sent, strict=False)
        replica.stage_weights(2, bucket, partial=True)
        replica.commit_weights(2)
        check_served(2)
        for p in hf.parameters():
            p.data.mul_(0.9)
        hf.save_pretrained(tmp_path / "ckpt")
        replica.stage_from_disk(3, str(tmp_path / "ckpt"))
        replica.commit_weights(3)
        check_served(3)
    finally:
        replica.close()


def test_a_push_of_one_experts_tensor_is_refused_naming_the_fused_tensor(family):
    from rollout.service.servicer import model_weight_shapes
    from rollout.service.weights import WeightMismatchError, canonical_name

    expected = model_weight_shapes(family[1].config)
    with pytest.raises(WeightMismatchError, match=r"one expert's weight: .*model.layers.0.mlp.experts.gate_up_proj"):
        canonical_name("model.layers.0.mlp.experts.1.up_proj.weight", expected)
    assert canonical_name("module.model.layers.0.mlp.experts.down_proj", expected) == \
        "model.layers.0.mlp.experts.down_proj"


def test_three_conversion_steps_train_our_moe_decoder(tmp_path):
    """`rollout convert` on a Qwen3-MoE base: the hybrid objective trains through the router and
    the experts, and the written model loads in the engine and in transformers with our logits."""
    from rollout.train.convert import convert, train_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 3 for i in range(60)]
    base = make_tiny_model(tmp_path / "base", "qwen3_moe", vocab_size=300, hidden_size=32, init_std=0.02,
                           **FAMILIES["qwen3_moe"])
    (base / "tidar_config.json").unlink()
    train_tokenizer(iter(texts), 300).save_pretrained(base)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    before = Engine.from_pretrained(base, mask_token_id=299, block_size=4).model.state_dict()
    convert(base, corpus, tmp_path / "out", steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=1,
                      block_size=4, seed=0, device="cpu")
    engine = Engine.from_pretrained(tmp_path / "out")
    after = engine.model.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = [5, 6, 7, 8, 9]
    assert (engine.forward_logits([ids])[0] - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    out = engine.generate([ids], SamplingParams(max_tokens=8, seed=0))
    assert len(out[0][0].token_ids) == 8


def test_moe_layers_pack_attention_only_and_keep_the_dense_mlp_packed(family):
    _, engine, _ = family
    layers = engine.model.model.layers
    assert engine.model.packs_current()
    for i, layer in enumerate(layers):
        assert isinstance(layer, MoeLayer)
        assert len(layer.packs()) == (1 if i in engine.config.moe_layers else 2)
        if i in engine.config.moe_layers:  # the CPU engine stores expert weights input-major too
            assert layer.mlp.experts.gate_up_proj.transpose(1, 2).is_contiguous()
            assert layer.mlp.experts.down_proj.transpose(1, 2).is_contiguous()


def test_cotrain_forward_on_hf_and_our_decoder_agree_and_trains_the_experts(family):
    """The co-training layout (`trainer_bridge.tidar_forward`) gives the same AR and diffusion
    logits on HF's MoE model and ours; the loss reaches the router and the experts."""
    from rollout.model.loader import load_decoder
    from trainer_bridge import diffusion_cotrain_loss, tidar_forward

    model_dir, engine, _ = family
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    ours = load_decoder(model_dir, engine.config, "cpu", torch.float32)
    x = torch.randint(0, MASK, (2, 11), generator=torch.Generator().manual_seed(0))
    ar, diff = tidar_forward(ours, x, MASK, 4)
    with torch.no_grad():
        hf_ar, hf_diff = tidar_forward(hf, x, MASK, 4)
    assert (hf_ar - ar).abs().max().item() <= 1e-4 and (hf_diff - diff).abs().max().item() <= 1e-4
    diffusion_cotrain_loss(ar, diff, torch.ones(x.shape)).backward()
    layer = ours.model.layers[0].mlp
    assert layer.gate.weight.grad.abs().sum() > 0 and layer.experts.gate_up_proj.grad.abs().sum() > 0
