"""Bad requests and bad model directories fail early, naming what is wrong."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from rollout import Engine, SamplingParams, UnsupportedModelError


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(sampler="beam"), "sampler must be one of"),
    (dict(mix_weight=1.2), r"mix_weight must be in \[0, 1\]"),
    (dict(mix_weight=-0.1), r"mix_weight must be in \[0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(seed_stable="yes"), "seed_stable must be true or false"),
])
def test_bad_sampling_params_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompts,params,match", [
    ([], SamplingParams(), "prompt_token_ids must be a non-empty list"),
    ([[2, 3], []], SamplingParams(), r"prompt_token_ids\[1\] is empty"),
    ([[2, 16]], SamplingParams(), r"prompt_token_ids\[0\] has token id 16 outside the vocabulary \[0, 16\)"),
    ([[-1]], SamplingParams(), "outside the vocabulary"),
    ([[2, 15, 3]], SamplingParams(), r"prompt_token_ids\[0\] contains the mask token id 15"),
    ([[2] * 200], SamplingParams(max_tokens=57), "exceeds the model's context of 256"),
    ([[2]], SamplingParams(stop_token_ids=(99,)), "stop_token_ids has 99 outside the vocabulary"),
])
def test_bad_prompts_raise_naming_the_field(engine, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, params)


def test_prompt_exactly_filling_the_context_is_accepted(engine):
    out = engine.generate([[2] * 250], SamplingParams(max_tokens=6, seed=0))
    assert len(out[0][0].token_ids) == 6


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "nope")


def test_missing_config(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(UnsupportedModelError, match="has no config.json"):
        Engine.from_pretrained(d)


def test_missing_weights(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match=r"no \*.safetensors weight files"):
        Engine.from_pretrained(d)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="model.layers.1.mlp.up_proj.weight"):
        Engine.from_pretrained(d)


def test_wrong_tensor_shape_is_named(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    edit_config(d, intermediate_size=48)
    with pytest.raises(UnsupportedModelError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\], config.json implies"):
        Engine.from_pretrained(d)


def test_missing_tidar_settings(tiny_dir, tmp_path):
    d = copy_model(tiny_dir, tmp_path / "m")
    (d / "tidar_config.json").unlink()
    with pytest.raises(UnsupportedModelError, match="no TiDAR mask token"):
        Engine.from_pretrained(d)
    assert Engine.from_pretrained(d, mask_token_id=15, block_size=4).tidar.block_size == 4


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(use_sliding_window=True), "sliding-window attention"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope_type 'dynamic' is not supported"),
    (dict(num_key_value_heads=3), "must be a multiple of num_key_value_heads"),
])
def test_unsupported_config_is_refused_at_load(tiny_dir, tmp_path, changes, match):
    d = copy_model(tiny_dir, tmp_path / "m")
    edit_config(d, **changes)
    with pytest.raises(UnsupportedModelError, match=match):
        Engine.from_pretrained(d)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=1), "block_size must be >= 2"),
    (dict(levels=(2, 3)), "levels must start at 1"),
    (dict(levels=(1, 9)), r"stay <= block_size \(4\)"),
    (dict(mask_token_id=16), r"mask_token_id must be in \[0, 16\)"),
])
def test_bad_tidar_overrides(tiny_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine.from_pretrained(tiny_dir, **kwargs)


def test_sizes_are_checked_before_contents(engine):
    """A prompt that is both too long and full of bad ids is refused for its length: the check
    that costs nothing runs first."""
    with pytest.raises(ValueError, match="has 300 tokens; with max_tokens=1"):
        engine.validate([[-1] * 300], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] has token id 99 outside"):
        engine.validate([[2, 3], [4, 99, -5]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token id 2.5 outside"):
        engine.validate([[2, 2.5]], SamplingParams(max_tokens=1))
