"""Engine behaviour: greedy equality, log-prob parity with HF, seeds, batching, stopping."""

import math

import pytest
import torch
from conftest import PROMPTS

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.sampling import process_logits


def tokens(outs):
    return [[c.token_ids for c in group] for group in outs]


@pytest.mark.parametrize("block_size,levels", [(None, None), (None, (1, 3)), (6, None), (6, (1, 2, 5))])
def test_greedy_tidar_equals_greedy_ar(tiny_dir, block_size, levels):
    engine = Engine.from_pretrained(tiny_dir, block_size=block_size, levels=levels,
                                    config=EngineConfig(drafting="fixed"))
    ar = tokens(engine.generate(PROMPTS, SamplingParams(sampler="ar", temperature=0, max_tokens=30)))
    for sampler in ("lossless", "mixed"):
        out = engine.generate(PROMPTS, SamplingParams(sampler=sampler, temperature=0, max_tokens=30, mix_weight=0.3))
        assert tokens(out) == ar, sampler
    assert engine.last_stats.tokens_per_forward > 1


def test_greedy_ar_equals_hf_generate(engine, hf_model):
    ours = engine.generate(PROMPTS, SamplingParams(sampler="ar", temperature=0, max_tokens=20))
    for prompt, group in zip(PROMPTS, ours):
        ref = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                                pad_token_id=0, eos_token_id=None)
        assert group[0].token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("sampler", ["ar", "lossless", "mixed"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.8, 6, 0.9, 0.0), (0.0, 0, 1.0, 0.0),
                                                         (1.2, 0, 1.0, 0.1)])
def test_logprobs_match_teacher_forced_hf(engine, hf_model, sampler, temperature, top_k, top_p, min_p):
    params = SamplingParams(sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            max_tokens=25, n=2, seed=5)
    outs = engine.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, outs):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = hf_model(ids).logits[0, len(prompt) - 1:-1]
            ref = process_logits(logits, temperature, top_k, top_p, (15,), min_p).gather(
                -1, torch.tensor(c.token_ids)[:, None])
            ref, ours = ref.squeeze(-1), torch.tensor(c.logprobs)
            # Only `mixed` can emit a token that top-k/top-p removed from p: log p = -inf on both sides.
            assert torch.equal(torch.isinf(ref), torch.isinf(ours))
            assert sampler == "mixed" or torch.isfinite(ours).all()
            finite = torch.isfinite(ref)
            assert (ref[finite] - ours[finite]).abs().max().item() <= 1e-5
            if sampler != "mixed" or temperature == 0:
                assert c.behavior_logprobs == c.logprobs


def test_mixed_at_weight_one_is_identical_to_lossless(engine):
    lossless = engine.generate(PROMPTS, SamplingParams(sampler="lossless", max_tokens=30, n=3, seed=9))
    mixed = engine.generate(PROMPTS, SamplingParams(sampler="mixed", mix_weight=1.0, max_tokens=30, n=3, seed=9))
    for a, b in zip(sum(lossless, []), sum(mixed, [])):
        assert (a.token_ids, a.logprobs, a.behavior_logprobs, a.from_draft) == (
            b.token_ids, b.logprobs, b.behavior_logprobs, b.from_draft)


def test_mixed_reports_its_behaviour_logprobs(engine):
    outs = engine.generate(PROMPTS, SamplingParams(sampler="mixed", mix_weight=0.3, max_tokens=30, seed=2))
    differs = [blp != lp for c in sum(outs, []) for blp, lp in zip(c.behavior_logprobs, c.logprobs)]
    assert any(differs) and not all(differs)


@pytest.mark.parametrize("sampler", ["ar", "lossless", "mixed"])
def test_same_seed_same_output_different_seed_different_output(engine, sampler):
    def run(seed):
        return tokens(engine.generate(PROMPTS, SamplingParams(sampler=sampler, max_tokens=20, n=2, seed=seed)))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_n_samples_per_prompt_differ(engine):
    outs = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, n=6, seed=0))
    assert len(outs) == 1 and len(outs[0]) == 6
    assert len({tuple(c.token_ids) for c in outs[0]}) > 1
    assert [c.sample_index for c in outs[0]] == list(range(6))


def test_rows_accept_different_numbers_of_drafts(engine):
    outs = engine.generate(PROMPTS * 4, SamplingParams(max_tokens=40, seed=3))
    passes = {c.num_forward_passes for c in sum(outs, [])}
    assert len(passes) > 1
    assert all(c.num_forward_passes < 40 for c in sum(outs, []))
    stats = engine.last_stats
    assert stats.generated_tokens == 40 * len(PROMPTS) * 4
    assert 0 < stats.acceptance_by_position[0] <= 1


def test_ar_takes_one_forward_per_token(engine):
    c = engine.generate([PROMPTS[1]], SamplingParams(sampler="ar", max_tokens=12, seed=0))[0][0]
    assert c.num_forward_passes == 12 and not any(c.from_draft)


def test_stop_token_ends_the_completion(engine):
    outs = engine.generate(PROMPTS * 3, SamplingParams(max_tokens=60, n=2, seed=4, stop_token_ids=(1, 6)))
    stopped = [c for c in sum(outs, []) if c.finish_reason == "stop"]
    assert stopped
    for c in sum(outs, []):
        hits = [i for i, t in enumerate(c.token_ids) if t in (1, 6)]
        if c.finish_reason == "stop":
            assert hits == [len(c.token_ids) - 1]
        else:
            assert c.finish_reason == "length" and not hits and len(c.token_ids) == 60
        assert len(c.token_ids) == len(c.logprobs) == len(c.behavior_logprobs) == len(c.from_draft)


def test_max_tokens_is_exact_even_mid_block(engine):
    for max_tokens in (1, 2, 5, 7):
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, seed=1, temperature=0.5))
        assert all(len(c.token_ids) == max_tokens and c.finish_reason == "length" for c in sum(outs, []))


def test_a_one_token_request_prefills_without_a_mask_block(engine, monkeypatch):
    """A request that stops at its first token (max_tokens 1: a probe, a prompt's log-probs)
    forwards its prompt only, without the mask block that would draft a step it never takes,
    and samples the same first token with the same log-prob as a longer request."""
    widths = []
    forward = engine.runner._forward_chunks

    def spy(slots, tokens, starts, block, cache):
        widths.append(max(map(len, tokens)) + block)
        return forward(slots, tokens, starts, block, cache)

    monkeypatch.setattr(engine.runner, "_forward_chunks", spy)
    params = dict(seed=3, temperature=0.8, n=2)
    one = engine.generate(PROMPTS, SamplingParams(max_tokens=1, **params))
    longest = max(map(len, PROMPTS))
    assert widths == [longest]
    widths.clear()
    more = engine.generate(PROMPTS, SamplingParams(max_tokens=3, **params))
    assert widths[0] == longest + engine.tidar.block_size
    for a, b in zip(sum(one, []), sum(more, [])):
        assert a.token_ids == b.token_ids[:1]
        assert abs(a.logprobs[0] - b.logprobs[0]) <= 1e-6


@pytest.mark.parametrize("max_prefill_tokens", [1, 2, 5])
def test_chunked_prefill_gives_the_same_samples(engine, max_prefill_tokens):
    """Prompts prefilled a few tokens per step (interleaved with other rows' decode steps)
    sample exactly what a whole-prompt prefill samples."""
    params = SamplingParams(max_tokens=12, n=2, seed=7)
    whole = engine.generate(PROMPTS, params)
    chunked = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", max_prefill_tokens=max_prefill_tokens))
    again = chunked.generate(PROMPTS, params)
    assert tokens(again) == tokens(whole)
    for a, b in zip(sum(whole, []), sum(again, [])):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


def test_generate_iter_yields_each_completion_once_as_it_finishes(engine):
    params = SamplingParams(max_tokens=30, n=2, seed=1, stop_token_ids=(1,))
    streamed = list(engine.generate_iter(PROMPTS, params))
    assert sorted((c.prompt_index, c.sample_index) for c in streamed) == [
        (i, j) for i in range(len(PROMPTS)) for j in range(2)]
    assert tokens([[c] for c in sorted(streamed, key=lambda c: (c.prompt_index, c.sample_index))]) == [
        [c.token_ids] for c in sum(engine.generate(PROMPTS, params), [])]
    passes = [c.num_forward_passes for c in streamed]  # finishing order = step order
    assert passes == sorted(passes) and len(set(passes)) > 1


def test_abort_ends_running_completions_with_their_tokens(engine):
    steps = iter(range(1000))
    outs = list(engine.generate_iter(PROMPTS, SamplingParams(max_tokens=50, seed=1),
                                     should_abort=lambda: next(steps) >= 3))
    assert len(outs) == len(PROMPTS)
    assert all(c.finish_reason == "abort" and 0 < len(c.token_ids) < 50 for c in outs)
    assert all(len(c.policy_versions) == len(c.token_ids) for c in outs)


def test_tokens_are_tagged_with_the_weight_version(engine):
    engine.weight_version = 7
    try:
        c = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=9, seed=0))[0][0]
    finally:
        engine.weight_version = 0
    assert c.policy_versions == [7] * 9


def test_acceptance_stats_count_only_drafted_positions(tiny_dir):
    # Levels (1, 3) with k = 4: after accepting 2 drafts the next step has only 2 valid drafts.
    engine = Engine.from_pretrained(tiny_dir, levels=(1, 3), config=EngineConfig(drafting="fixed"))
    engine.generate(PROMPTS * 3, SamplingParams(max_tokens=40, seed=2))
    s = engine.last_stats
    assert s.draft_attempts[0] >= s.draft_attempts[1] >= s.draft_attempts[2] > 0
    assert all(a <= n for a, n in zip(s.draft_accepts, s.draft_attempts))
    assert s.draft_accepts[1] <= s.draft_accepts[0]


def test_compiled_engine_samples_what_the_eager_engine_samples_with_a_filter(engine):
    """torch.compile (Inductor on the CPU; padded decode batches) of whole AR decode steps
    (`ar_step`: inputs, forward, sampling and slot update in one call) with a top-p filter,
    against eager: same tokens, log-probs within 1e-5. TiDAR steps, and AR and TiDAR steps
    taking turns: test_drafting."""
    compiled = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", compile=True))
    calls = []
    fused = compiled.runner.ar_step
    compiled.runner.ar_step = lambda *a: calls.append(1) or fused(*a)
    params = SamplingParams(sampler="ar", max_tokens=12, n=3, seed=8, temperature=0.9, top_p=0.8)
    eager = engine.generate(PROMPTS[:3], params)
    for a, b in zip(sum(compiled.generate(PROMPTS[:3], params), []), sum(eager, [])):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
    assert len(calls) >= 3  # decode steps ran fused (12 tokens: at least 11 steps)


def test_the_mask_token_is_never_sampled_even_at_high_temperature(engine):
    """The policy removes the mask token (id 15) before temperature: at T = 5 the near-uniform
    distribution would otherwise give it ~1/16 of the tokens."""
    for sampler in ("lossless", "mixed", "ar"):
        outs = engine.generate(PROMPTS, SamplingParams(sampler=sampler, temperature=5.0, max_tokens=40, n=8, seed=2))
        tokens = [t for g in outs for c in g for t in c.token_ids]
        assert len(tokens) == len(PROMPTS) * 8 * 40 and 15 not in tokens
        assert all(math.isfinite(lp) for g in outs for c in g for lp in c.logprobs)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.8, 6, 0.9, 0.0), (1.3, 0, 0.7, 0.0), (1.0, 3, 1.0, 0.0),
                                                         (1.5, 0, 1.0, 0.05)])
def test_trainer_bridge_logprobs_are_the_rollout_policy(engine, temperature, top_k, top_p, min_p):
    """trainer_bridge.token_logprobs, given the request's settings and the mask id, computes the
    same policy as the rollout's returned log-probs (top-k / top-p / min-p included)."""
    from trainer_bridge import token_logprobs
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, max_tokens=20, n=2,
                            seed=6)
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            logits = engine.forward_logits(ids.tolist())[0][None]  # [1, S, V]
            new = token_logprobs(logits, ids, temperature, top_k, top_p, forbidden=(15,), min_p=min_p)[0, len(prompt):]
            assert (new - torch.tensor(c.logprobs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sampler", ["ar", "lossless", "mixed"])
def test_top_logprobs_are_the_policys_most_likely_tokens(engine, sampler):
    """logprobs=N returns, per token, the N most likely ids under the same policy as `logprobs`
    (teacher-forced reference), most likely first; rows without it get none."""
    params = SamplingParams(sampler=sampler, temperature=0.9, top_k=8, max_tokens=18, n=2, seed=3, logprobs=4)
    outs = engine.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, outs):
        for c in group:
            assert len(c.top_token_ids) == len(c.top_logprobs) == len(c.token_ids)
            ids = torch.tensor([prompt + c.token_ids])
            ref = process_logits(engine.forward_logits(ids.tolist())[0][len(prompt) - 1:-1], 0.9, 8, 1.0, (15,))
            values, _ = ref.topk(4, dim=-1)
            ours = torch.tensor(c.top_logprobs)
            assert (ours - values).abs().max().item() <= 1e-5
            chosen = ref.gather(-1, torch.tensor(c.top_token_ids))
            assert (chosen - ours).abs().max().item() <= 1e-5  # the ids are the ones with those log-probs
            assert all(a >= b for row in c.top_logprobs for a, b in zip(row, row[1:]))
    plain = engine.generate(PROMPTS[:1], SamplingParams(sampler=sampler, max_tokens=5, seed=3))[0][0]
    assert plain.top_token_ids == [] and plain.top_logprobs == []


def test_logprobs_count_is_bounded():
    from rollout.params import MAX_LOGPROBS
    with pytest.raises(ValueError, match=f"logprobs must be an integer in \\[0, {MAX_LOGPROBS}\\]"):
        SamplingParams(logprobs=MAX_LOGPROBS + 1)
    with pytest.raises(ValueError, match="min_p must be in"):
        SamplingParams(min_p=1.5)


def test_a_push_naming_both_tied_weights_copies_into_their_one_parameter_once(monkeypatch):
    """lm_head.weight and the embedding are one parameter in a tied model. Both names in one
    `load_weights` made two copies into it, run on two threads at once, which left rows of each
    (gpu_run's push check then saw greedy tokens differ from HF's in about one process in four)."""
    from pathlib import Path

    import rollout
    from rollout.engine import engine as engine_module

    eng = Engine.from_pretrained(Path(rollout.__file__).parent / "default_model")
    params = eng.model.state_dict()
    head, embedding = params["lm_head.weight"], params["model.embed_tokens.weight"]
    assert eng.model.config.tie_word_embeddings and head.data_ptr() == embedding.data_ptr()
    pushed = {name: t + 0.01 * (i + 1) for i, (name, t) in enumerate(params.items())}  # every name its own value
    given = []
    copy = engine_module.copy_weights
    monkeypatch.setattr(engine_module, "copy_weights", lambda pairs: given.append(pairs) or copy(pairs))
    eng.load_weights(pushed, version=1)
    (pairs,) = given
    assert len({dst.data_ptr() for dst, _ in pairs}) == len(pairs)  # no parameter is copied into twice
    last = [name for name in pushed if name in ("lm_head.weight", "model.embed_tokens.weight")][-1]
    assert torch.equal(eng.model.state_dict()["model.embed_tokens.weight"], pushed[last])  # the last name given
    for name, t in eng.model.state_dict().items():
        if name not in ("lm_head.weight", "model.embed_tokens.weight"):
            assert torch.equal(t, pushed[name]), name
