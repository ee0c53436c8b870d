"""Static-shape decode steps (`cuda_graphs=True`, `engine/step_graphs.py`). On the CPU the
static shapes run eagerly: the same tokens and log-probs as the dynamic path prove that the
bucketing (rows and prefix length rounded up), the padding rows and the masking a GPU graph
relies on are right. On a GPU the captured graphs are checked the same way."""

import pytest
import torch
from conftest import PROMPTS

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.step_graphs import MIN_CONTEXT, bucket

LONG = [[(7 * i + j) % 14 + 2 for i in range(70 + 9 * j)] for j in range(5)]  # prefixes cross 64 and 128
BATCHES = ((PROMPTS[:3], 1), (LONG, 1), (PROMPTS[:5], 2))  # 3, 5 and 10 rows: padded to 4, 8 and 16


def _same(a, b):
    a, b = [c for g in a for c in g], [c for g in b for c in g]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-5


def _pair(model, tidar, device="cpu", **config):
    base = dict(max_num_seqs=16, max_model_len=200, **{"drafting": "fixed", **config})
    return (Engine(model, tidar, device, config=EngineConfig(**base)),
            Engine(model, tidar, device, config=EngineConfig(cuda_graphs=True, **base)))


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, MIN_CONTEXT) == MIN_CONTEXT and bucket(65, MIN_CONTEXT) == 128


@pytest.mark.parametrize("sampler", ["ar", "lossless", "mixed"])
def test_static_steps_sample_what_dynamic_steps_sample(engine, sampler):
    """Every sampler; prefixes from 2 to ~170 positions (buckets 64, 128 and 256 clamped to the
    slot); fixed drafting, so both engines run the same step shapes."""
    dynamic, static = _pair(engine.model, engine.tidar)
    for prompts, n in BATCHES:
        params = SamplingParams(sampler=sampler, temperature=0.9, max_tokens=40, n=n, seed=11, mix_weight=0.5)
        _same(dynamic.generate(prompts, params), static.generate(prompts, params))
    status = static.runner.graphs.status()
    assert status["static_eager_steps"] > 0 and status["dynamic_steps"] == 0 and status["device_graphs"] is False
    assert status["shapes"] >= 4  # several row buckets, prefix buckets and layouts


def test_greedy_static_steps_with_auto_drafting_equal_greedy_ar(engine):
    """Auto drafting changes the step shape (AR, draft lengths, level sets) from step to step:
    greedy TiDAR on static shapes must still equal greedy AR on the dynamic path."""
    dynamic, static = _pair(engine.model, engine.tidar, drafting="auto")
    for prompts, n in BATCHES:
        ar = dynamic.generate(prompts, SamplingParams(sampler="ar", temperature=0, max_tokens=40, n=n))
        _same(ar, static.generate(prompts, SamplingParams(sampler="lossless", temperature=0, max_tokens=40, n=n)))


def test_weight_loads_reach_static_steps_and_moved_weights_reset_them(tiny_dir):
    """A weight load copies in place (a graph reads it on its next replay, nothing is dropped);
    a parameter given new storage resets every shape (a graph would read the old storage)."""
    model_owner = Engine.from_pretrained(tiny_dir)
    dynamic, static = _pair(model_owner.model, model_owner.tidar)
    params = SamplingParams(sampler="lossless", temperature=1.0, max_tokens=20, seed=3)
    _same(dynamic.generate(PROMPTS, params), static.generate(PROMPTS, params))
    name = "model.layers.0.mlp.down_proj.weight"
    new = {name: torch.randn_like(model_owner.model.state_dict()[name])}
    dynamic.load_weights(new, version=1)  # the model is shared: one load serves both engines
    _same(dynamic.generate(PROMPTS, params), static.generate(PROMPTS, params))
    assert static.runner.graphs.resets == 0
    layer = model_owner.model.model.layers[1].self_attn
    layer.o_proj.weight.data = layer.o_proj.weight.detach() * 1.5  # new storage, same Parameter
    _same(dynamic.generate(PROMPTS, params), static.generate(PROMPTS, params))
    assert static.runner.graphs.resets == 1


def test_cuda_graphs_config_is_checked():
    with pytest.raises(ValueError, match="exclusive"):
        EngineConfig(cuda_graphs=True, compile=True)
    with pytest.raises(ValueError, match="cuda_graphs needs attention"):
        EngineConfig(cuda_graphs=True, attention="split")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graphs_sample_what_eager_steps_sample(tiny_dir):
    owner = Engine.from_pretrained(tiny_dir, device="cuda")
    dynamic, static = _pair(owner.model, owner.tidar, device="cuda")
    for sampler in ("ar", "lossless"):
        for prompts, n in BATCHES:
            params = SamplingParams(sampler=sampler, temperature=0.9, max_tokens=40, n=n, seed=4)
            _same(dynamic.generate(prompts, params), static.generate(prompts, params))
    status = static.runner.graphs.status()
    assert status["captured"] > 0 and status["replays"] > status["captured"] and status["static_eager_steps"] == 0


def test_start_up_calibration_runs_on_static_shapes(tiny_dir, monkeypatch):
    """With graphs on, calibration first runs every measured (batch, context, shape) unmeasured, on
    the same prompts, so every static shape (a capture on a GPU) is met before timing starts; its
    cost samples come from the static steps the engine will replay."""
    from rollout.engine.drafting import StepCostModel
    from rollout.engine.step_graphs import StepGraphs
    events = []
    new_entry, clear = StepGraphs._new_entry, StepCostModel.clear
    monkeypatch.setattr(StepGraphs, "_new_entry", lambda self, *a: events.append("shape") or new_entry(self, *a))
    monkeypatch.setattr(StepCostModel, "clear", lambda self: events.append("timing starts") or clear(self))
    for max_model_len in (48, 200):
        events.clear()
        config = EngineConfig(drafting="auto", cuda_graphs=True, calibration_seconds=60, max_num_seqs=8,
                              max_model_len=max_model_len)
        engine = Engine.from_pretrained(tiny_dir, config=config)
        start = events.index("timing starts")
        assert "shape" in events[:start] and "shape" not in events[start:], (max_model_len, events)
    assert engine.calibration["steps"] > 0 and engine.drafting.costs.coefficients() is not None
    samples = engine.drafting.costs.anchor
    assert {s[0] for s in samples} == {0, 1} and {s[1] for s in samples} >= {1, 8}  # AR and TiDAR; batch 1 and 8
    status = engine.runner.graphs.status()
    assert status["dynamic_steps"] == 0 and status["static_eager_steps"] > 0
    assert {1, 8} <= {key[2] for key in engine.runner.graphs.entries}  # (layout, tokens, rows, prefix)
