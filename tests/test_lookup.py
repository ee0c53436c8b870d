"""Lookup drafts (`engine/lookup.py`): what they propose, when the policy takes them, and that
verifying them keeps the lossless sampler exact."""

import random

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import AR_REFIT_EVERY, EXPLORE_EVERY, DraftPolicy, DraftShape, RowDraft
from rollout.engine.lookup import NgramIndex, lookup_drafts
from test_distribution import (  # noqa: F401 - the model_dir fixture
    ALPHA,
    NUM_SAMPLES,
    chi_square_pvalue,
    exact_ar_distribution,
    model_dir,
    sample_counts,
)


def lk(*tokens):
    """A row's candidates: these lookup drafts."""
    return [RowDraft(tuple(tokens), "lookup")]


def index_of(tokens):
    index = NgramIndex()
    index.extend(tokens)
    return index


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_matching_suffix():
    # suffix (7, 8) occurred at 0 (then 1, 2) and at 5 (then 3, 4); (8,) alone last at 9.
    assert index_of([7, 8, 1, 2, 0, 7, 8, 3, 4, 8, 9, 7, 8]).drafts(3) == [3, 4, 8]
    assert index_of([5, 6, 5, 6, 9, 1, 6]).drafts(4) == [9, 1, 6]  # only (6,) matches: its latest, at 3
    assert index_of([1, 2, 3]).drafts(4) == []  # no earlier occurrence
    assert index_of([4, 4]).drafts(3) == [4]  # the continuation may run into the suffix itself
    assert index_of([]).drafts(3) == [] and index_of([4]).drafts(3) == []


def test_an_index_built_step_by_step_proposes_what_one_built_at_once_does():
    rng = random.Random(0)
    prompt, generated, index = [rng.randrange(5) for _ in range(12)], [], None
    for _ in range(60):
        generated.append(rng.randrange(5))
        index, drafts = lookup_drafts(index, prompt, generated, 4)
        assert drafts == index_of(prompt + generated).drafts(4)


def costly_tokens_policy(**kwargs) -> DraftPolicy:
    """A CPU-like cost fit: 4 ms a step plus 0.1 ms a token; lookup drafts that usually pass."""
    policy = DraftPolicy(4, (1, 2, 3, 4), "auto", {"lossless@0+lookup": [0.9, 0.9, 0.9]}, **kwargs)
    for rows, tokens in ((1, 1), (1, 4), (1, 20), (8, 8), (8, 160), (64, 512)):
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 4e-3 + 1e-4 * tokens)
    return policy


def test_rows_with_lookup_drafts_take_a_verify_only_lookup_step():
    policy = costly_tokens_policy()
    params = [SamplingParams(temperature=0)]
    assert policy.wants_lookup(params)
    shape = policy.choose(params, 64, lambda: [lk(5, 6, 7)])
    assert shape is not None and shape.lookup and shape.levels == () and shape.length >= 2
    without = policy.choose(params, 64, lambda: [[]])
    assert without is None or not without.lookup


def test_rows_look_up_drafts_only_when_a_lookup_step_could_win():
    policy = DraftPolicy(4, (1, 2, 3, 4), "auto")
    for rows, tokens in ((1, 1), (1, 4), (1, 20), (8, 8), (8, 160), (64, 512)):  # every token costs, nothing fixed
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 1e-3 * tokens)
    asked = []
    policy._explore_lookup = False  # an exploring step now would be a TiDAR step
    assert policy.choose([SamplingParams(temperature=0)] * 8, 64, lambda: asked.append(1) or [lk(5, 6, 7)] * 8) is None
    assert asked == []


def test_a_lookup_step_that_would_leave_a_row_behind_must_pay_for_itself_in_row_steps():
    """At batch 64 with these costs a lookup step costs 2.8x an AR step. With 60 of 64 rows
    holding good drafts its rate beats AR's (7.7 against 6.2 tokens/ms), but the four rows without
    drafts keep the batch as long as before: the step saves only the other rows' row-steps
    (16 ms) against 19 ms it costs more. With every row holding drafts the batch is shortened."""
    policy = costly_tokens_policy()
    policy.calibration["lossless@0+lookup"] = [0.95] * 3
    params = [SamplingParams(temperature=0)] * 64
    shape = policy.choose(params, 64, lambda: [lk(1, 2, 3)] * 60 + [[]] * 4)
    assert shape is None or not shape.lookup
    policy._lookup_wait = policy._lookup_misses = 0  # the look-up that lost delays the next (see the back-off tests)
    shape = policy.choose(params, 64, lambda: [lk(1, 2, 3)] * 64)
    assert shape is not None and shape.lookup


def test_look_ups_that_do_not_pay_back_off_and_resume_at_once_when_they_do():
    """Looking drafts up costs host time on every row: after each look-up that loses to an AR
    step the next waits twice as many steps (1, 2, 4, ...); one that pays ends the wait."""
    policy = costly_tokens_policy()
    policy.calibration["lossless@0+lookup"] = [0.95] * 3
    policy._lookup_scale = 0.0  # look-ups cost nothing from the exploring budget (see the next test)
    params, asked = [SamplingParams(temperature=0)] * 64, []

    def losing(step):
        return lambda: asked.append(step) or [lk(1, 2, 3)] * 60 + [[]] * 4
    for step in range(12):
        assert policy.choose(params, 64, losing(step)) is None
    assert asked == [0, 2, 5, 10]  # waits of 1, 2 and 4 steps
    policy._lookup_wait = 0
    assert policy.choose(params, 64, lambda: [lk(1, 2, 3)] * 64).lookup  # it pays: no wait after it
    assert policy._lookup_wait == 0 and policy.choose(params, 64, lambda: [lk(1, 2, 3)] * 64).lookup


def test_look_ups_that_lose_where_ar_steps_win_are_paid_from_the_exploring_budget():
    """A fake clock: a step whose rows looked up drafts that then lost takes 4x an AR step (the
    history look-up at batch 64 on the CPU); the fit never learns it. The back-off alone let
    such steps take ~6% of an AR-only re-rollout; charged to the exploring budget, what they
    take beyond an AR step and the explorations take at most 1/EXPLORE_EVERY of the AR time,
    and look-ups still happen."""
    policy = costly_tokens_policy()
    policy.calibration["lossless@0+lookup"] = [0.95] * 3
    policy.costs.observe = lambda *args: None  # the fit stays as it is
    params, spent = [SamplingParams(temperature=0)] * 64, {}
    for _ in range(20_000):
        asked = []
        wants = policy.wants_lookup(params)
        drafts = (lambda: asked.append(1) or [lk(1, 2, 3)] * 60 + [[]] * 4) if wants else None
        shape = policy.choose(params, 64, drafts)
        seconds = policy.costs.predict(shape is not None, 64, 64 * policy.tokens_per_row(shape), 64) * (
            4 if asked and shape is None else 1)
        policy.observe_step(params, shape, [0] * 64, [0] * 64, 64, seconds)
    (ar_steps, ar), (looked_up_steps, looked_up) = policy.step_time["ar"], policy.step_time["ar looked up"]
    charged = looked_up - looked_up_steps * ar / ar_steps + sum(t for k, (_, t) in policy.step_time.items()
                                                                if "exploring" in k)
    assert looked_up_steps > 0 and charged <= 1.02 / EXPLORE_EVERY * ar


def test_only_lossless_rows_take_lookup_drafts_and_only_with_auto_drafting():
    policy = costly_tokens_policy()
    mixed = [SamplingParams(sampler="mixed", temperature=0)]
    assert not policy.wants_lookup(mixed) and not policy.wants_lookup([SamplingParams(sampler="ar")])
    shape = policy.choose(mixed, 64, lambda: [lk(5, 6, 7)])  # drafts a mixed row cannot verify count for nothing
    assert shape is None or not shape.lookup
    assert not costly_tokens_policy(lookup=False).wants_lookup([SamplingParams()])
    assert DraftPolicy(4, (1, 2, 3, 4), "fixed").lookup_candidates == []


def per_token_policy(**kwargs) -> DraftPolicy:
    """A cost fit where every token costs and nothing is fixed: AR steps win."""
    policy = DraftPolicy(4, (1, 2, 3, 4), "auto", **kwargs)
    for rows, tokens in ((1, 1), (1, 4), (1, 20), (8, 8), (8, 160), (64, 512)):
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 1e-3 * tokens)
    return policy


def test_while_ar_steps_win_a_step_that_taught_re_ranks_at_once():
    """While AR steps win, a ranking is reused for AR_REFIT_EVERY observed steps (and a context
    bucket): AR steps teach no acceptance. An exploring step that taught does, and the next
    step ranks again instead of waiting up to AR_REFIT_EVERY steps."""
    policy = per_token_policy(lookup=False)
    policy._exploring_cost = lambda *args: float("inf")  # no exploring: AR steps only
    rankings, rank = [0], policy._rank
    policy._rank = lambda *args: (rankings.__setitem__(0, rankings[0] + 1), rank(*args))[1]
    params = [SamplingParams(temperature=1)] * 8
    for _ in range(AR_REFIT_EVERY + 1):
        assert policy.choose(params, 64) is None
        policy.observe_step(params, None, [0] * 8, [0] * 8, 64, 1e-3)
    assert rankings[0] <= 3  # a ranking kept for AR_REFIT_EVERY steps
    before = rankings[0]
    policy.choose(params, 64)
    assert rankings[0] == before  # nothing learned: the same ranking
    policy.observe_step(params, DraftShape(4, (1,)), [1] * 8, [3] * 8, 64, 1e-3)  # an exploring step taught
    policy.choose(params, 64)
    assert rankings[0] == before + 1


def test_exploring_alternates_between_the_models_drafts_verified_a_step_later_and_lookup_drafts():
    """Where neither source pays AR steps run, and the explorations that keep both estimates
    fresh take turns: the model's drafts take a step that pre-drafts them and a verify-only step
    that checks them (without a look-up: an AR step would drop them and teach nothing), lookup
    drafts one lookup step, though it does not pay."""
    policy = per_token_policy()
    params, asked = [SamplingParams(temperature=0)], []
    assert policy.choose(params, 64, lambda: [lk(5, 6, 7)]) is None
    explored = []
    for step in range(6):
        policy._explore_credit = 1e9  # exploration is due
        wants = policy.wants_lookup(params)
        explored.append((policy.choose(params, 64, (lambda: asked.append(step) or [lk(5, 6, 7)]) if wants else None),
                         wants))
    pre_draft, verify = explored[0][0], explored[1][0]
    assert pre_draft.levels and not pre_draft.lookup and explored[0][1]
    assert verify == DraftShape(pre_draft.length, (), lookup=True) and not explored[1][1]
    assert explored[2][0].lookup and explored[2][1]
    assert explored[3:] == explored[:3] and asked == [2, 5]  # looked up for the lookup steps only


@pytest.mark.parametrize("ar_real, drafting_real", [(0.5, 1.0), (1.0, 2.0), (1.0, 0.5)])
def test_exploring_takes_its_budget_of_measured_time_however_wrong_the_cost_fit(ar_real, drafting_real):
    """A fake clock: each step really takes the fit's prediction times `ar_real` (AR steps) or
    `drafting_real` (the others), and the fit never learns it. (0.5, 1.0) is the CPU at batch 64,
    where a '1/2' step cost 2x what the fit said against an AR step: exploring took ~2x its
    budget when the budget counted predicted AR time. Measured exploring time stays within
    1/EXPLORE_EVERY of the measured AR time, and the budget is used (explorations still run)."""
    policy = per_token_policy()
    policy.costs.observe = lambda *args: None  # the fit stays as wrong as it is
    params, spent = [SamplingParams(temperature=0)] * 8, {False: 0.0, True: 0.0}
    for _ in range(20_000):
        wants = policy.wants_lookup(params)
        shape = policy.choose(params, 64, (lambda: [lk(5, 6, 7)] * 8) if wants else None)
        tokens = 8 * policy.tokens_per_row(shape)
        seconds = policy.costs.predict(shape is not None, 8, tokens, 64) * (ar_real if shape is None else drafting_real)
        policy.observe_step(params, shape, [0] * 8, [0] * 8, 64, seconds)
        spent[shape is not None] += seconds
    assert 0.7 / EXPLORE_EVERY < spent[True] / spent[False] <= 1.02 / EXPLORE_EVERY


def test_lookup_steps_are_priced_at_what_they_take_against_ar_steps_at_their_context():
    """A fake clock: 64 rows grow from context 32 to 432 (one token per row-step); a step whose
    rows verify lookup drafts takes the fit's price below context 128 and 3.4x it from 256 on
    (the host look-up and attention of ~400-token rows at batch 64 on the CPU), AR steps take
    the fit's price; the fit never learns it, and the drafts pass at the seeded 0.9. Priced by
    the fit alone, lookup steps ran on at long context, ~2x AR's time per token; priced at what
    they take against AR steps in their context bucket, the policy stops taking them there."""
    policy = costly_tokens_policy()
    policy.calibration["lossless@0+lookup"] = [0.9] * 3
    policy.costs.observe = lambda *args: None  # the fit stays as wrong as it is
    params, rng = [SamplingParams(temperature=0)] * 64, random.Random(0)
    spent, tokens, context, late = 0.0, 0, 32.0, []
    while context < 432:
        wants = policy.wants_lookup(params)
        shape = policy.choose(params, context, (lambda: [lk(1, 2, 3)] * 64) if wants else None)
        verified = shape.length - 1 if shape is not None and shape.lookup else 0
        accepted = [next((i for i in range(verified) if rng.random() > 0.9), verified) for _ in params]
        seconds = policy.costs.predict(shape is not None, 64, 64 * policy.tokens_per_row(shape), context) * (
            3.4 if verified and context >= 256 else 1.0)
        policy.observe_step(params, shape, accepted, [verified] * 64, context, seconds,
                            ["lookup"] * 64 if verified else None)
        spent, tokens = spent + seconds, tokens + 64 + sum(accepted)
        context += 1 + sum(accepted) / 64
        if context >= 256:
            late.append(verified > 0)
    ar_per_token = policy.costs.predict(False, 64, 64, 344) / 64
    assert spent / tokens < 1.05 * ar_per_token  # never slower than AR steps (~0.6 where lookup steps pay)
    assert sum(late) <= 6  # a few lookup steps in the long context: what taught the policy their price
    assert policy._point_mass_scale(64, 300) > 2 and policy._point_mass_scale(64, 500) > 2


def test_lookup_prices_are_only_ever_raised_and_only_where_such_steps_ran():
    """The correction is relative to AR steps of the same batch and context bucket: lookup steps
    faster than the fit says stay at its price (a kind whose price fell would beat kinds the fit
    prices right), and a batch or a shorter context where none ran keeps the fit's price."""
    policy = costly_tokens_policy()
    params = [SamplingParams(temperature=0)] * 64
    for _ in range(50):
        policy.observe_step(params, None, [0] * 64, [0] * 64, 300, 2 * policy.costs.predict(False, 64, 64, 300))
    for _ in range(10):
        policy.observe_step(params, DraftShape(4, (), lookup=True), [3] * 64, [3] * 64, 300,
                            6 * policy.costs.predict(True, 64, 256, 300), ["lookup"] * 64)
        policy.observe_step(params[:1], DraftShape(4, (), lookup=True), [3], [3], 300,
                            0.5 * policy.costs.predict(True, 1, 4, 300), ["lookup"])
    assert policy._point_mass_scale(64, 300) == pytest.approx(3.0, rel=0.1)  # 6x the fit where AR steps take 2x
    assert policy._point_mass_scale(64, 1000) == pytest.approx(3.0, rel=0.1)  # longer contexts: at least as much
    assert policy._point_mass_scale(64, 100) == 1.0 and policy._point_mass_scale(8, 300) == 1.0
    assert policy._point_mass_scale(1, 300) == 1.0  # faster than the fit: never cheaper
    assert DraftPolicy(4, (1, 2, 3, 4), "auto", cost_model="flat")._point_mass_scale(64, 300) == 1.0


def test_lookup_acceptance_is_learned_apart_from_the_diffusion_drafts():
    policy = costly_tokens_policy()
    params = [SamplingParams(temperature=0)]
    policy.observe_step(params, DraftShape(4, (), lookup=True), [3], [3], 64, 5e-3, ["lookup"])
    policy.observe_step(params, DraftShape(4, (1,)), [0], [3], 64, 5e-3)
    acceptance = policy.status()["acceptance"]
    assert acceptance["lossless@0+lookup"][0] > 0.5 > acceptance["lossless@0"][0]


LOOKUP_ONLY = EngineConfig(drafting="auto", history_mib=0)  # lookup drafts, no history drafts


def counting_lookups(engine):
    """Counts the rows that were given point-mass drafts (lookup or history: one store path)."""
    store, seen = engine.runner._store_lookup, {"rows": 0}

    def counted(seqs, length, lookup):
        seen["rows"] += sum(1 for d in lookup if d)
        store(seqs, length, lookup)
    engine.runner._store_lookup = counted
    return seen


def every_step_a_lookup_step(engine, seed):
    """Each step a lookup step of a random draft length, or now and then a TiDAR or AR step."""
    rng = random.Random(seed)
    k = engine.tidar.block_size
    options = [DraftShape(d, (), lookup=True) for d in range(2, k + 1)] * 2 + [None, DraftShape(k, (1, 2))]
    engine.drafting.choose = lambda params, context, lookups=None: rng.choice(options)
    engine.drafting.wants_lookup = lambda params: True
    return engine


def test_lossless_keeps_the_ar_distribution_when_it_verifies_lookup_drafts(model_dir):  # noqa: F811
    engine = every_step_a_lookup_step(Engine.from_pretrained(model_dir, config=LOOKUP_ONLY), 3)
    seen = counting_lookups(engine)
    counts = sample_counts(model_dir, SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=23, seed_stable=False), engine)
    assert seen["rows"] > NUM_SAMPLES // 8  # lookup drafts were verified often
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p > ALPHA, f"samples verified against lookup drafts differ from AR (chi-square p = {p:.2e})"


def test_lookup_drafts_verified_as_if_drawn_from_a_spread_distribution_are_detected(model_dir):  # noqa: F811
    """Negative control: the point mass q = 1[d] is what makes accepting with min(1, p(d))
    exact; leaving the slot's old (uniform) draft logits under the lookup drafts accepts them
    too often, and the test above must see it."""
    engine = every_step_a_lookup_step(Engine.from_pretrained(model_dir, config=LOOKUP_ONLY), 3)
    runner = engine.runner

    def spread(seqs, length, lookup):
        rows = [(s.slot, d[:length - 1]) for s, d in zip(seqs, lookup) if d]
        for slot, d in rows:
            runner.drafts[slot, 1:1 + len(d)] = torch.tensor(d)
            runner.draft_logits[slot, 1:1 + len(d)] = 0.0
            runner.num_valid[slot] = 1 + len(d)
    runner._store_lookup = spread
    counts = sample_counts(model_dir, SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=23, seed_stable=False), engine)
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p < ALPHA, f"a wrong draft distribution went unnoticed (chi-square p = {p:.2e})"


def test_auto_drafting_takes_lookup_steps_on_repetitive_text_and_stays_greedy(engine):
    prompt = [3, 5, 7, 9, 11] * 6
    greedy = engine.generate([prompt], SamplingParams(sampler="ar", temperature=0, max_tokens=24))[0][0]
    for lookup in (True, False):
        auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", lookup_drafts=lookup,
                                                                      history_mib=0))
        auto.drafting.costs = costly_tokens_policy().costs
        out = auto.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0][0]
        assert out.token_ids == greedy.token_ids
        assert max(abs(x - y) for x, y in zip(out.logprobs, greedy.logprobs)) <= 1e-5
        lookups = {k: n for k, n in auto.last_stats.level_choices.items() if k.startswith("lookup/")}
        assert bool(lookups) == lookup
        if lookup:
            assert "lossless@0+lookup" in auto.drafting.status()["acceptance"]
            assert auto.last_stats.tokens_per_forward > 1


def test_lookup_drafts_must_be_a_boolean():
    with pytest.raises(ValueError, match="lookup_drafts must be true or false"):
        EngineConfig(lookup_drafts="yes")
