"""Cost-aware drafting: the expected-tokens model, the choice it makes, and exactness when the
draft shape (draft length and level set) changes from one step to the next."""

import random

import numpy as np
import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine import drafting
from rollout.engine.drafting import DraftPolicy, DraftShape, RowDraft, expected_tokens, level_label
from test_distribution import (  # noqa: F401 - the model_dir fixture
    ALPHA,
    NUM_SAMPLES,
    chi_square_pvalue,
    exact_ar_distribution,
    model_dir,
    sample_counts,
)

from conftest import PROMPTS


def simulate(rates, k, levels, steps=200_000, seed=0):
    """Monte-Carlo of the row process expected_tokens describes."""
    rng = np.random.default_rng(seed)
    v, total = k - 1, 0
    for _ in range(steps):
        a = 0
        while a < v and rng.random() < rates[a]:
            a += 1
        c = a + 1
        total += c
        j = max((lv for lv in levels if lv <= c), default=None) if levels else None
        v = 0 if j is None else k - 1 - (c - j)
    return total / steps


@pytest.mark.parametrize("levels", [(1,), (1, 2), (1, 2, 3, 4), (1, 3)])
def test_expected_tokens_is_the_mean_of_the_row_process(levels):
    rates = [0.8, 0.6, 0.5]
    assert expected_tokens(rates, 4, levels) == pytest.approx(simulate(rates, 4, levels), rel=0.01)


def test_expected_tokens_grows_with_levels_and_acceptance():
    assert expected_tokens([0.9] * 7, 8, None) == 1.0
    by_levels = [expected_tokens([0.7] * 7, 8, tuple(range(1, m + 1))) for m in range(1, 9)]
    assert by_levels == sorted(by_levels) and by_levels[0] > 1
    assert expected_tokens([0.9] * 7, 8, (1, 2)) > expected_tokens([0.3] * 7, 8, (1, 2))


def policy_with_costs(intercept, per_token, rates):
    policy = DraftPolicy(8, tuple(range(1, 9)), "auto", {"lossless@1.1": rates})
    for rows, tokens in ((1, 1), (1, 8), (1, 64), (8, 8), (8, 512), (64, 4096), (256, 20000)):  # as if timed
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, intercept + per_token * tokens)
    return policy


def test_compute_bound_device_with_weak_drafts_takes_ar_steps():
    policy = policy_with_costs(0.0, 1e-5, [0.3] * 7)  # a CPU: every token costs
    assert policy.choose([SamplingParams()] * 16, 64) is None


def test_memory_bound_device_with_good_drafts_pre_drafts_every_level_at_batch_one():
    policy = policy_with_costs(2e-3, 1e-8, [0.9] * 7)  # a GPU at batch 1: extra tokens are nearly free
    assert policy.choose([SamplingParams()], 64) == DraftShape(8, tuple(range(1, 9)))


def test_costly_tokens_and_a_good_first_draft_choose_a_short_draft():
    # Per-step overhead plus a per-token cost (a CPU at batch 1): only the first draft is
    # likely to pass, so a short step (<= 6 tokens per row instead of up to 72) wins.
    policy = policy_with_costs(4e-3, 1e-4, [0.6, 0.15, 0.1, 0.1, 0.1, 0.1, 0.1])
    shape = policy.choose([SamplingParams()], 64)
    assert shape is not None and shape.length <= 3 and policy.tokens_per_row(shape) <= 6
    assert level_label(DraftShape(2, (1,)), 8) == "1/2" and level_label(DraftShape(8, (1, 2)), 8) == "2"


def test_the_flat_cost_model_prices_every_shape_like_an_ar_step_and_drafts_what_is_accepted():
    """The what-if of a memory-bound GPU on a compute-bound device: where the calibrated fit takes
    AR steps (every token costs), the flat model takes the shape with the most expected tokens."""
    calibrated = policy_with_costs(0.0, 1e-5, [0.3] * 7)
    flat = policy_with_costs(0.0, 1e-5, [0.3] * 7)
    flat.cost_model = "flat"
    rows = [SamplingParams()] * 16
    assert calibrated.choose(rows, 64) is None
    assert flat.choose(rows, 64) == DraftShape(8, tuple(range(1, 9)))
    assert flat._seconds(True, 16, 16 * 72, 64) == flat._seconds(False, 16, 16, 64)
    with pytest.raises(ValueError, match="cost_model must be"):
        EngineConfig(cost_model="free")
    with pytest.raises(ValueError, match="cost_model must be one of calibrated, flat"):
        DraftPolicy(4, (1,), "auto", cost_model="gpu")


def test_the_flat_cost_model_keeps_greedy_output_equal_to_ar(engine):
    greedy = engine.generate(PROMPTS[:2], SamplingParams(sampler="ar", temperature=0, max_tokens=12))
    flat = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", cost_model="flat"))
    out = flat.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12))
    assert [c[0].token_ids for c in out] == [c[0].token_ids for c in greedy]
    assert flat.last_stats.tokens_per_forward > 1 and flat.drafting.status()["cost_model"] == "flat"


def test_candidates_cover_every_draft_length_with_the_levels_that_fit():
    policy = DraftPolicy(4, (1, 3), "auto")
    assert policy.candidates == [None, DraftShape(2, (1,)), DraftShape(3, (1,)), DraftShape(3, (1, 3)),
                                 DraftShape(4, (1,)), DraftShape(4, (1, 3))]


def test_compiled_engines_choose_among_the_calibrated_shapes_only(engine):
    """Each step shape is a compilation under compile=True: the policy keeps to the four shapes
    calibration compiles and times (AR, length 2, one level of the block, every level)."""
    k = engine.tidar.block_size
    calibrated = [None, DraftShape(2, (1,)), DraftShape(k, (1,)), DraftShape(k, tuple(range(1, k + 1)))]
    lookup = DraftShape(min(4, k), (), lookup=True)
    compiled = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", compile=True))
    assert compiled.drafting.calibration_shapes() == calibrated + [lookup]
    assert compiled.drafting.candidates == calibrated and compiled.drafting.lookup_candidates == [lookup]
    eager = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto"))
    assert len(eager.drafting.candidates) > len(calibrated)


def test_steps_that_compile_or_capture_are_not_timed(engine):
    """A step during which a graph was captured or compiled paid a one-off cost: the cost model
    must not learn from its time (acceptance is still learned)."""
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto"))
    calls = iter(range(10 ** 6))
    auto.runner.one_off_count = lambda: next(calls)  # every step "compiles"
    auto.generate(PROMPTS[:2], SamplingParams(max_tokens=8, seed=0))
    assert len(auto.drafting.costs.samples) == 0 and auto.totals.generated_tokens == 16
    del auto.runner.one_off_count
    auto.generate(PROMPTS[:2], SamplingParams(max_tokens=8, seed=0))
    assert len(auto.drafting.costs.samples) > 0


def test_ar_rows_alone_never_draft():
    policy = policy_with_costs(2e-3, 1e-8, [0.9] * 7)
    assert policy.choose([SamplingParams(sampler="ar")] * 4, 64) is None


def random_levels(engine, seed):
    """Replaces the policy's choice by a random draft shape per step (None = AR step): every
    draft length, level prefixes and sparse level sets."""
    rng = random.Random(seed)
    k = engine.tidar.block_size
    options = engine.drafting.candidates + [DraftShape(k, (1, 3)), DraftShape(k, (1, 4)), DraftShape(3, (1, 3)),
                                            DraftShape(2, (), lookup=True), DraftShape(k, (), lookup=True)]
    engine.drafting.choose = lambda params, context, lookups=None: rng.choice(options)
    engine.drafting.wants_lookup = lambda params: True  # lossless rows look up drafts every step
    return engine


def test_compiled_steps_sample_what_eager_steps_sample_when_the_shape_changes_every_step(engine):
    """Compiled decode steps build their inputs and write the slots' next drafts inside the
    compiled call (`ModelRunner._fused_ar`, `_fused_tidar`): an AR step after a TiDAR step, a
    TiDAR step after an AR step, shorter after longer, must leave the same slot state as the
    eager runner, so the same shape script gives the same tokens and log-probs."""
    lookup_only = dict(drafting="auto", history_mib=0)  # lookup drafts for the lookup steps, no history drafts
    compiled = Engine(engine.model, engine.tidar, config=EngineConfig(compile=True, **lookup_only))
    shapes = [s for s in compiled.drafting.calibration_shapes() if s is None or s.length == 2 or len(s.levels) > 1]
    assert len(shapes) == 3  # AR, length 2 with one level, the whole block with every level
    shapes.append(DraftShape(3, (), lookup=True))  # and a lookup step
    calls = {"ar": 0, "tidar": 0}
    for kind in calls:  # count the fused calls
        fused = getattr(compiled.runner, f"{kind}_step")
        setattr(compiled.runner, f"{kind}_step", lambda *a, f=fused, k=kind: calls.update({k: calls[k] + 1}) or f(*a))
    outs = []
    for e in (Engine(engine.model, engine.tidar, config=EngineConfig(**lookup_only)), compiled):
        rng = random.Random(5)
        e.drafting.choose = lambda params, context, lookups=None: rng.choice(shapes)
        e.drafting.wants_lookup = lambda params: True
        outs.append(sum(e.generate(PROMPTS[:1], SamplingParams(max_tokens=12, n=3, seed=4, temperature=0.8)), []))
        # every shape ran (rows of a lookup step without a match count as "0/d": they verified model drafts)
        assert {level_label(s, e.tidar.block_size) for s in shapes} <= set(e.last_stats.level_choices)
    assert calls["ar"] > 0 and calls["tidar"] > 0
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


def test_split_attention_is_refused_with_compile_on_the_cpu(engine):
    with pytest.raises(ValueError, match="attention 'split' cannot be compiled on the CPU"):
        Engine(engine.model, engine.tidar, config=EngineConfig(compile=True, attention="split"))


def test_greedy_tidar_equals_greedy_ar_whatever_the_shape_of_each_step(engine):
    ar = engine.generate(PROMPTS, SamplingParams(sampler="ar", temperature=0, max_tokens=30))
    shuffled = random_levels(Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed")), 0)
    for sampler in ("lossless", "mixed"):
        out = shuffled.generate(PROMPTS, SamplingParams(sampler=sampler, temperature=0, max_tokens=30))
        assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in ar]


def test_lossless_keeps_the_ar_distribution_when_the_draft_shape_changes_between_steps(model_dir):  # noqa: F811
    engine = random_levels(Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed")), 1)
    counts = sample_counts(model_dir, SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=17, seed_stable=False), engine)
    assert sum(engine.last_stats.level_choices.values()) > 0 and len(engine.last_stats.level_choices) > 2
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p > ALPHA, f"samples under changing draft shapes differ from AR (chi-square p = {p:.2e})"


def test_auto_drafting_reports_its_choices_and_learns_acceptance(engine):
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto"))
    auto.generate(PROMPTS * 4, SamplingParams(max_tokens=40, n=2, seed=3))
    status = auto.drafting.status()
    assert status["drafting"] == "auto" and sum(status["level_choices"].values()) > 0
    assert "lossless@1.1" in status["acceptance"] and len(status["step_cost"]) == 5
    assert sum(auto.last_stats.level_choices.values()) > 0


def test_start_up_calibration_times_every_kind_of_step_and_caches_it(tiny_dir, tmp_path):
    cache = tmp_path / "costs.json"
    config = EngineConfig(drafting="auto", calibration_seconds=60, calibration_cache=str(cache), max_num_seqs=8,
                          max_model_len=48)
    first = Engine.from_pretrained(tiny_dir, config=config)
    assert first.calibration["cached"] is False and first.calibration["steps"] > 0
    samples = list(first.drafting.costs.anchor)
    assert {s[0] for s in samples} == {0, 1}  # AR steps and TiDAR steps
    assert {s[1] for s in samples} >= {1, 8}  # batch 1 and 8 (the pool holds 8)
    # AR; length 2 with one level; block 4 with one level; all 4 levels
    assert {s[2] // s[1] for s in samples if s[1] == 1} == {1, 2 * 2, 4 * 2, 4 * 5}
    assert first.drafting.costs.coefficients() is not None
    for _ in range(300):  # a long run of live AR steps keeps the TiDAR figures in the fit
        first.drafting.costs.observe(False, 1, 1, 20, 1e-3)
    assert len(first.drafting.costs.samples) == 256 and first.drafting.costs.anchor == samples
    # Scratch prompts teach nothing about acceptance and count in no totals.
    assert first.drafting.estimates == {} and first.totals.generated_tokens == 0 and first.drafting.choices == {}
    second = Engine.from_pretrained(tiny_dir, config=config)
    assert second.calibration["cached"] is True and second.drafting.costs.anchor == samples
    out = second.generate(PROMPTS, SamplingParams(max_tokens=8, seed=0))
    assert all(len(c.token_ids) == 8 for g in out for c in g)
    other = Engine.from_pretrained(tiny_dir, config=config, dtype=torch.float64)  # another key: measured again
    assert other.calibration["cached"] is False


def test_a_prefill_drafts_the_first_step_only_when_the_policy_is_drafting(engine):
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto"))
    K = auto.tidar.block_size
    for last, valid in ((None, 1), (auto.drafting.full, K)):
        auto.drafting.last_choice = last  # the last decode step was an AR step / a drafting step
        request = auto.add_request(PROMPTS[:1], SamplingParams(max_tokens=4, seed=0))
        auto.step()  # the prefill
        assert int(auto.runner.num_valid[request.sequences[0].slot]) == valid
        auto.abort(request.request_id)


def test_exploring_while_ar_steps_win_verifies_the_models_drafts_and_learns_their_acceptance(engine, monkeypatch):
    """An exploring TiDAR step pre-drafts; the next step verifies those drafts (an AR step would
    drop them: the model's acceptance was never learned while AR steps won). The fit prices
    every token (AR wins) and stays so; the budget is made generous to explore often. The fit's
    prices are far below any real step's, so one measured AR step pays for an exploration on
    any machine (at 1e-3 s per token, a fast one never earned one in 39 steps)."""
    monkeypatch.setattr(drafting, "EXPLORE_EVERY", 1)
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", history_mib=0,
                                                                    lookup_drafts=False))
    policy = auto.drafting
    for rows, tokens in ((1, 1), (1, 4), (1, 20), (8, 8), (8, 160), (64, 512)):
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 1e-7 * tokens)
    policy.costs.observe = lambda *args: None
    auto.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, seed=0))
    model = auto.last_stats.draft_sources.get("model", [0, 0, 0])
    assert policy.choices["ar"] > policy.choices.get("1/2", 0) > 0, policy.choices
    assert model[0] > 0 and model[1] > 0  # row-steps that verified the model's drafts, drafts offered
    assert policy.estimates["lossless@0"].attempts[0] > drafting.PRIOR_WEIGHT * drafting.DECAY ** 64


def test_exploring_lets_the_policy_switch_to_the_models_drafts_once_they_pay():
    """AR steps win while the model's drafts are believed weak (0.3 per position); then every
    draft starts to pass. Explorations verify the drafts they make, the estimate climbs, and
    the policy drafts: the switch needs nothing but exploring (each step is timed by the cost
    function the fit was made from)."""
    policy = policy_with_costs(4e-3, 5e-4, [0.3] * 7)
    policy.costs.set_anchor(list(policy.costs.samples))  # as calibration does: live AR steps cannot push it out
    params, shapes, pending = [SamplingParams()], [], 0
    assert policy.choose(params, 64) is None
    for _ in range(4000):
        shape = policy.choose(params, 64)
        offered = min(pending, shape.length - 1) if shape is not None else 0
        pending = shape.length - 1 if shape is not None and shape.levels else 0  # what it pre-drafted
        seconds = 4e-3 + 5e-4 * policy.tokens_per_row(shape)
        policy.observe_step(params, shape, [offered], [offered], 64, seconds)  # every draft passes
        shapes.append(shape)
    assert sum(s is not None and bool(s.levels) for s in shapes[-100:]) > 90


def history_policy(**kwargs) -> DraftPolicy:
    """Block 8, history drafts (no seeded acceptance), CPU-like costs the fit keeps: 3 ms a step
    plus 1 ms a token (a token costs a quarter of an AR step at batch 1)."""
    policy = DraftPolicy(8, tuple(range(1, 9)), "auto", lookup=False, history=True, **kwargs)
    for rows, tokens in ((1, 1), (1, 4), (1, 8), (2, 2), (2, 16), (4, 32)):
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 3e-3 + 1e-3 * tokens)
    policy.costs.observe = lambda *args: None
    return policy


def test_positions_past_the_longest_offered_are_offered_once_the_earlier_ones_pass():
    """Drafts accepted 0.98 at positions 1-3 (verified by lookup/4 steps): with every later
    position at the prior 0.5 a longer step does not pay at these costs, so positions 4-7 were
    never offered and never learned. Their prior rises to the last learned rate: the policy
    offers them, and what it observes there (every draft passes) is learned."""
    policy = history_policy()
    params, aligned = [SamplingParams(temperature=0)], "lossless@0+history/aligned"
    for step in range(200):
        policy.observe_step(params, DraftShape(4, (), lookup=True), [3 if step % 50 else 2], [3], 64, 1e-2,
                            ["history/aligned"])
    draft = [[RowDraft(tuple(range(2, 9)), "history/aligned")]]
    shape = policy.choose(params, 64, lambda: draft)
    assert shape is not None and shape.lookup and shape.length > 4, shape
    for _ in range(100):
        shape = policy.choose(params, 64, lambda: draft)
        verified = shape.length - 1 if shape is not None and shape.lookup else 0
        policy.observe_step(params, shape, [verified], [verified], 64, 1e-2, ["history/aligned"] if verified else None)
    estimate = policy.estimates[aligned]
    assert shape == DraftShape(8, (), lookup=True)
    assert min(estimate.rates[3:]) > 0.95
    assert estimate.attempts[6] > 50  # position 7 observed, not only prior


def test_a_position_never_offered_keeps_a_seeded_prior_and_learns_a_failure_at_once():
    """The optimistic prior is for positions nothing is known about: a seeded rate stays, and
    where drafts fail after position 3 one step that offers position 4 brings it down."""
    policy = history_policy()
    policy.calibration["lossless@0+history/long"] = [0.9, 0.9, 0.9, 0.1]
    params = [SamplingParams(temperature=0)]
    for _ in range(100):
        for kind in ("history/long", "history/short"):
            policy.observe_step(params, DraftShape(4, (), lookup=True), [3], [3], 64, 1e-2, [kind])
    assert policy.estimates["lossless@0+history/long"].rates[3] < 0.2  # seeded
    short = policy.estimates["lossless@0+history/short"]
    assert short.rates[3] > 0.95
    for _ in range(8):
        policy.observe_step(params, DraftShape(8, (), lookup=True), [3], [7], 64, 1e-2, ["history/short"])
    assert short.rates[3] < 0.5


def test_repeated_greedy_prompts_end_up_verifying_long_history_drafts(engine):
    """Two greedy rollouts of a prompt (new seeds), history drafts on, block 8, a fit that prices
    a token at a quarter of an AR step: the second rollout follows the first's completion
    (aligned prefix), with drafts of 7 tokens once the first positions pass, and stays greedy.
    With unlearned positions at the prior 0.5 it stopped at 3 drafts (lookup/4)."""
    import dataclasses

    tidar = dataclasses.replace(engine.tidar, block_size=8, levels=None)
    auto = Engine(engine.model, tidar, config=EngineConfig(drafting="auto", lookup_drafts=False))
    policy = history_policy()
    policy.calibration = auto.drafting.calibration
    observe = policy.observe_step

    def on_the_fits_clock(params, shape, accepted, offered, context, seconds, kinds=None):
        """Every step takes what the fit says (this machine's timings play no part)."""
        tokens = len(params) * policy.tokens_per_row(shape)
        seconds = None if seconds is None else policy.costs.predict(shape is not None, len(params), tokens, context)
        observe(params, shape, accepted, offered, context, seconds, kinds)
    policy.observe_step = on_the_fits_clock
    auto.drafting, auto.scheduler.drafting = policy, policy
    ar = engine.generate(PROMPTS[:1], SamplingParams(sampler="ar", temperature=0, max_tokens=96))
    for epoch in range(2):
        out = auto.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=96, seed=epoch))
        assert [c[0].token_ids for c in out] == [c[0].token_ids for c in ar]
    stats = auto.last_stats
    assert stats.level_choices.get("lookup/8", 0) >= 4, stats.level_choices
    assert stats.tokens_per_forward > 4, stats.tokens_per_forward
    assert policy.estimates["lossless@0+history/aligned"].attempts[6] > drafting.PRIOR_WEIGHT
