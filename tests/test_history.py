"""History drafts (`engine/history.py`): what the index proposes, the store's bounds, and that
verifying history drafts (alone or stacked with the model's in one step) keeps lossless exact."""

import gc
import random
import tracemalloc

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import PRIOR_ACCEPTANCE, DraftPolicy, DraftShape, RowDraft
from rollout.engine.history import BYTES_PER_TOKEN, KEEP_VERSIONS, ROOT, HistoryStore
from test_distribution import (  # noqa: F401 - the model_dir fixture
    ALPHA,
    NUM_SAMPLES,
    chi_square_pvalue,
    exact_ar_distribution,
    model_dir,
    sample_counts,
)
from test_lookup import counting_lookups

from conftest import PROMPTS


def store_with(completions, prompt=(1, 2), version=0, budget=1 << 30):
    """A store holding these finished completions of `prompt` (keys 100, 101, ...)."""
    store = HistoryStore(budget)
    for track, tokens in zip(store.begin(list(prompt), [100 + i for i in range(len(completions))], version),
                             completions):
        store.extend(track, tokens, version)
    return store


def propose(store, output, count=8, prompt=(1, 2), key=0):
    """What a new row of `prompt` that has generated `output` is proposed."""
    track = store.begin(list(prompt), [key], 0)[0]
    store.extend(track, output, 0)
    proposal = track.prompt.propose(track, count)
    return (proposal.tokens, proposal.match) if proposal else ([], "")


def test_a_row_follows_the_completions_that_began_as_its_output_did_the_most_shared_first():
    store = store_with([[5, 6, 7, 8, 9], [5, 6, 7, 8, 3], [5, 6, 4, 4, 4], [5, 6, 7, 8, 9]])
    assert propose(store, [5, 6]) == ([7, 8, 9], "aligned")  # 3 of 4 go on with 7, 8; then 2 of 3 with 9
    assert propose(store_with([[5, 6, 7]]), []) == ([5, 6, 7], "aligned")  # a new row: from the first token


def test_without_an_aligned_prefix_the_longest_suffix_match_proposes_its_most_shared_continuation():
    store = store_with([[9, 9, 2, 3, 4, 4], [8, 2, 3, 4, 4], [7, 7, 7, 3, 5, 5, 5]])
    tokens, match = propose(store, [6, 2, 3])
    assert match == "2" and tokens[:2] == [4, 4]  # (2, 3) matched; (3,) alone would also say 5
    assert propose(store, [6]) == ([], "")  # 6 never occurred


def test_drafts_stop_where_too_few_completions_agree():
    store = store_with([[5, 1], [5, 2], [5, 3], [5, 4], [5, 5], [5, 6]])
    assert propose(store, []) == ([5], "aligned")  # after 5, no continuation has a share >= MIN_SUPPORT


def test_an_index_grown_token_by_token_proposes_what_one_built_at_once_does():
    rng = random.Random(0)
    completions = [[rng.randrange(4) for _ in range(30)] for _ in range(5)]
    grown = HistoryStore(1 << 30)
    tracks = grown.begin([1], list(range(5)), 0)
    for i in range(30):  # siblings growing together, a token each per step
        for track, tokens in zip(tracks, completions):
            grown.extend(track, tokens[i:i + 1], 0)
        tracks[0].prompt.propose(tracks[0], 4)  # asked each step: the indexes catch up a token at a time
    at_once = store_with(completions, prompt=(1,))
    for output in ([], [0], [1, 2], completions[0][:7], [3, 3, 3]):
        assert propose(grown, output, prompt=(1,), key=9) == propose(at_once, output, prompt=(1,), key=9)


def test_tokens_are_indexed_only_when_a_draft_is_asked_for():
    store = store_with([[5, 6, 7, 8], [5, 6, 7, 9]])
    history = store.prompts[(1, 2)]
    assert not history.ngrams and not history.kids[ROOT]  # an engine taking AR steps never pays for them
    assert propose(store, [5, 6]) == ([7, 8], "aligned")
    # the asking row (output 5, 6) is indexed too: three completions through 5
    assert history.ngrams[(5, 6)] == {7: 2} and history.counts[history.kids[ROOT][5]] == 3 and not history.stale


def test_a_proposal_indexes_its_own_row_and_at_most_a_budget_of_the_others_newest_first():
    rng = random.Random(2)
    completions = [[rng.randrange(6) for _ in range(40)] for _ in range(5)]  # 200 tokens to index
    store = store_with(completions)
    history = store.prompts[(1, 2)]
    track = store.begin([1, 2], [7], 0)[0]
    store.extend(track, completions[4][:10], 0)
    assert track.prompt.propose(track, 4).match == "aligned"  # its own 10 tokens, then 64: the newest 40 + 24
    assert track.indexed == 10 and [t.indexed for t in history.tracks[:5]] == [0, 0, 0, 24, 40]
    for _ in range(3):  # the rest over the next proposals
        track.prompt.propose(track, 4)
    assert not history.stale  # now indexed as if at once (order aside, which only breaks ties)
    whole = store_with(completions + [completions[4][:10]]).prompts[(1, 2)]
    whole.catch_up()
    assert history.ngrams == whole.ngrams
    def firsts(h):
        return {t: h.counts[c] for t, c in h.kids[ROOT].items()}
    assert firsts(history) == firsts(whole)


def test_the_store_keeps_its_memory_budget_evicting_the_least_recently_used_prompts():
    per_prompt = 8 * 20 * BYTES_PER_TOKEN
    store = HistoryStore(3 * per_prompt)
    for p in range(5):
        for track in store.begin([p], list(range(8)), 0):
            store.extend(track, list(range(20)), 0)
        store.evict()  # as the engine does after each step
        if p == 2:
            store.begin([0], [50], 0)  # prompt 0 used again: now the most recent
    assert store.bytes <= 3 * per_prompt
    assert set(store.prompts) == {(0,), (3,), (4,)}


def test_the_indexes_give_the_garbage_collector_no_objects_per_token():
    rng = random.Random(3)
    gc.collect()
    before = len(gc.get_objects())
    store = HistoryStore(1 << 40)
    for p in range(4):
        for track in store.begin([p], list(range(8)), 0):
            store.extend(track, [rng.randrange(50) for _ in range(100)], 0)
    for history in store.prompts.values():
        history.catch_up()
    gc.collect()  # n-gram keys (tuples of ints) are untracked by a collection
    # 3,200 tokens indexed; a trie node object per token made ~2 tracked objects per token, which
    # every full collection walks. Per prompt now: its history, track objects and lists, the trie's
    # lists and the n-gram table.
    assert len(gc.get_objects()) - before < 4 * (8 * 2 + 8)


def test_a_row_whose_own_tokens_wait_to_be_indexed_is_proposed_what_an_indexed_row_is():
    completions = [[5, 6, 7, 8, 1], [5, 6, 7, 8, 2], [5, 6, 4, 4, 4]]
    for limit in (0, 1, None):  # none of its tokens indexed, one, all
        store = store_with(completions)
        store.prompts[(1, 2)].catch_up()
        track = store.begin([1, 2], [9], 0)[0]
        store.extend(track, [5, 6], 0)
        proposal = track.prompt.propose(track, 4, limit)
        assert track.indexed == (2 if limit is None else limit)
        assert (proposal.tokens, proposal.match) == ([7, 8, 1], "aligned")  # 2 of 3 went on with 7, 8 (then a tie)


def test_a_look_up_step_indexes_at_most_a_steps_share_of_what_waits(engine):
    engine = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto"))
    prompts = [list(p) for p in PROMPTS[:2]]
    engine.drafting.wants_lookup = lambda params: False  # AR steps: 192 tokens wait to be indexed
    engine.generate(prompts, SamplingParams(max_tokens=24, n=4, seed=1))
    del engine.drafting.wants_lookup
    waiting = sum(t.indexed < len(t.tokens) for h in engine.history.prompts.values() for t in h.tracks)
    request = engine.add_request(prompts, SamplingParams(max_tokens=24, n=4, seed=2))
    while not engine.scheduler.running:
        engine.step()
    rows = engine.scheduler.running
    indexed = sum(h.num_indexed for h in engine.history.prompts.values())
    engine.scheduler._lookup_drafts(rows)
    took = sum(h.num_indexed for h in engine.history.prompts.values()) - indexed
    k = engine.tidar.block_size
    assert waiting == 8 and 0 < took <= len(rows) * k + 64  # not the 192 waiting + the rows' own
    for _ in range(8):  # looked up every step, the indexes catch up
        engine.scheduler._lookup_drafts(rows)
    assert all(t.indexed == len(t.tokens) for h in engine.history.prompts.values() for t in h.tracks)
    engine.abort(request.request_id)


def test_bytes_per_token_bounds_what_the_indexes_really_take():
    rng = random.Random(1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = HistoryStore(1 << 40)
        for p in range(4):
            for track in store.begin([p], list(range(8)), 0):
                store.extend(track, [rng.randrange(150_000) for _ in range(100)], 0)  # no sharing: the worst case
        for history in store.prompts.values():
            history.catch_up()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used <= store.bytes, f"{used / store.num_tokens:.0f} bytes per token > {BYTES_PER_TOKEN}"


def test_a_prompt_keeps_its_newest_policy_versions_and_drops_completions_of_the_same_row_key():
    store = HistoryStore(1 << 30)
    for version in range(KEEP_VERSIONS + 2):
        for track in store.begin([1], [10 * version, 10 * version + 1], version):
            store.extend(track, [version, version], version)
    kept = {t.version for t in store.prompts[(1,)].tracks}
    assert kept == set(range(2, KEEP_VERSIONS + 2))
    # A request repeated with the same seed has the same row keys: its old completions would
    # depend on the very uniforms that judge the new drafts, so they go.
    store.begin([1], [10 * (KEEP_VERSIONS + 1)], KEEP_VERSIONS + 1)
    keys = [t.key for t in store.prompts[(1,)].tracks]
    assert keys.count(10 * (KEEP_VERSIONS + 1)) == 1 and store.num_tokens == 2 * (2 * KEEP_VERSIONS - 1)


def test_history_is_cleared_when_the_weights_are_reset(engine):
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", history_mib=1))
    auto.generate(PROMPTS[:2], SamplingParams(max_tokens=6, n=2, seed=1))
    assert auto.history.num_tokens == 2 * 2 * 6 and auto.history.bytes <= 2 ** 20
    auto.load_weights({}, 1)
    assert auto.history.num_tokens == 24  # a new policy version: the old completions still draft
    auto.load_weights({}, 2, reset=True)
    assert auto.history.num_tokens == 0 and not auto.history.prompts
    assert Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", history_mib=0)).history is None
    with pytest.raises(ValueError, match="history_mib must be in"):
        EngineConfig(history_mib=-1)


def test_a_rerollout_drafts_from_history_and_stays_greedy_with_ar_log_probs(engine):
    """Epoch 2 of the same prompts (new seed) under the flat cost model: greedy output and
    log-probs as AR's, with history drafts verified and mostly accepted."""
    ar = engine.generate(PROMPTS[:2], SamplingParams(sampler="ar", temperature=0, max_tokens=16))
    auto = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="auto", cost_model="flat",
                                                                  lookup_drafts=False))
    for epoch in range(2):
        out = auto.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16, n=2, seed=epoch))
        for got, want in zip(out, ar):
            for c in got:
                assert c.token_ids == want[0].token_ids
                assert max(abs(x - y) for x, y in zip(c.logprobs, want[0].logprobs)) <= 1e-5
    sources = auto.last_stats.draft_sources
    steps, offered, accepted = sources["history"]
    assert steps > 4 and accepted / offered > 0.9  # greedy: a sibling's past is this row's future
    assert accepted > sum(a for _, _, a in sources.values()) / 2  # most accepted drafts came from history
    assert auto.drafting.status()["draft_sources"]["history"]["acceptance"] > 0.5


def random_sources(engine, seed):
    """Each step a random shape (verify-only of random length, a TiDAR step, or AR), and each
    row with a history draft verifies it or its own drafts at random: both sources, alone and
    stacked with the model's pre-drafting in one step."""
    rng = random.Random(seed)
    k = engine.tidar.block_size
    options = [DraftShape(d, (), lookup=True) for d in range(2, k + 1)] + [DraftShape(k, (1, 2)),
                                                                           DraftShape(2, (1,)), None]

    def choose(params, context, lookups=None):
        lookups()  # the candidates were looked at: the scheduler asks `assign`
        return rng.choice(options)
    engine.drafting.choose = choose
    engine.drafting.wants_lookup = lambda params: True
    engine.drafting.assign = lambda params, shape, lookups: [
        RowDraft(c[0].tokens[:shape.length - 1], c[0].kind) if c and rng.random() < 0.7 else None for c in lookups]
    return engine


HISTORY_ONLY = EngineConfig(drafting="auto", lookup_drafts=False)


def earlier_epoch(engine):
    """An earlier rollout of the test prompt (another seed): the history the samples draft from."""
    engine.generate([[2, 3]], SamplingParams(max_tokens=3, n=64, seed=99))


def test_lossless_keeps_the_ar_distribution_when_it_verifies_history_drafts(model_dir):  # noqa: F811
    engine = random_sources(Engine.from_pretrained(model_dir, config=HISTORY_ONLY), 5)
    earlier_epoch(engine)
    seen = counting_lookups(engine)  # history drafts are stored as lookup drafts are
    counts = sample_counts(model_dir, SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=29, seed_stable=False), engine)
    assert seen["rows"] > NUM_SAMPLES // 4  # history drafts were verified often
    stats = engine.last_stats.draft_sources
    assert stats["history"][2] > NUM_SAMPLES // 8 and stats["model"][0] > 0
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p > ALPHA, f"samples verified against history drafts differ from AR (chi-square p = {p:.2e})"


def test_history_drafts_verified_as_if_drawn_from_a_spread_distribution_are_detected(model_dir):  # noqa: F811
    """Negative control: without the point mass q = 1[d] (the slot's draft logits left uniform
    under the history drafts) they are accepted too often, and the test above must see it."""
    engine = random_sources(Engine.from_pretrained(model_dir, config=HISTORY_ONLY), 5)
    earlier_epoch(engine)
    runner = engine.runner

    def spread(seqs, length, drafts):
        for s, d in zip(seqs, drafts):
            if d:
                runner.drafts[s.slot, 1:1 + len(d)] = torch.tensor(d)
                runner.draft_logits[s.slot, 1:1 + len(d)] = 0.0
                runner.num_valid[s.slot] = 1 + len(d)
    runner._store_lookup = spread
    counts = sample_counts(model_dir, SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=29, seed_stable=False), engine)
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p < ALPHA, f"a wrong draft distribution went unnoticed (chi-square p = {p:.2e})"


def test_replica_metrics_show_each_draft_sources_share_and_acceptance():
    from rollout.engine.sequence import GenerationStats
    from rollout.service.metrics import ReplicaMetrics

    metrics = ReplicaMetrics("r0")
    metrics.observe_stats(GenerationStats(draft_sources={"history": [30, 90, 60], "model": [10, 30, 3]}))
    value = metrics.registry.get_sample_value
    assert value("rollout_replica_draft_source_share", {"source": "history"}) == 0.75
    assert value("rollout_replica_draft_source_acceptance", {"source": "history"}) == pytest.approx(2 / 3, abs=1e-4)
    assert value("rollout_replica_draft_source_acceptance", {"source": "model"}) == 0.1


def cpu_like_policy(cost_model="calibrated"):
    """Block 4, CPU-like step costs (4 ms a step plus 0.1 ms a token), history drafts that
    usually pass, the model's that rarely do."""
    policy = DraftPolicy(4, (1, 2, 3, 4), "auto", {"lossless@0+history/aligned": [0.9] * 3, "lossless@0": [0.2] * 3},
                         lookup=False, cost_model=cost_model, history=True)
    for rows, tokens in ((1, 1), (1, 4), (1, 20), (8, 8), (8, 160), (64, 512)):
        for context in (16, 128):
            policy.costs.observe(tokens > rows, rows, tokens, context, 4e-3 + 1e-4 * tokens)
    return policy


def test_history_drafts_ride_in_a_tidar_step_where_steps_cost_alike_and_must_pay_where_tokens_cost():
    params = [SamplingParams(temperature=0)] * 64
    candidates = [[RowDraft((1, 2, 3), "history/aligned")]] * 60 + [[]] * 4
    flat = cpu_like_policy("flat")
    shape = flat.choose(params, 64, lambda: candidates)
    assert shape is not None and shape.levels and not shape.lookup  # stacked: the step also pre-drafts
    assigned = flat.assign(params, shape, candidates)
    assert [d is not None for d in assigned] == [True] * 60 + [False] * 4
    # On the CPU the four rows without drafts keep the batch as long as before: the history
    # drafts' saved row-steps do not pay for a step over 64 rows x (1 + levels) x d tokens.
    calibrated = cpu_like_policy()
    shape = calibrated.choose(params, 64, lambda: candidates)
    assert shape is None or (shape.lookup and shape.length <= 4)
    assert calibrated.choose(params[:1], 64, lambda: candidates[:1]) is not None  # at batch 1 they pay


def test_a_replica_reset_to_its_base_weights_clears_the_history_a_push_keeps_it(make_replica):
    replica = make_replica("h0", engine_config=EngineConfig(drafting="auto", history_mib=1))
    store = replica.engine.history  # filled directly: the replica's loop is idle and never steps
    for track in store.begin([1, 2, 3], [7, 8], 0):
        store.extend(track, [4, 5, 6, 7], 0)
    held = store.num_tokens
    assert held == 8
    replica.stage_weights(1, {k: v.clone() for k, v in replica.engine.model.state_dict().items()})
    replica.commit_weights(1)
    assert replica.engine.history.num_tokens == held  # a new policy version drafts from the old one's samples
    replica.stage_from_disk(2, None)  # the base weights again
    replica.commit_weights(2)
    assert replica.engine.history.num_tokens == 0


def test_a_history_kind_never_verified_is_priced_like_the_rows_best_known_point_mass_drafts():
    """At the 0.5 prior a history draft lost every comparison with the seeded lookup drafts
    (0.87-0.99 at T = 0) in `best_draft`, so on greedy re-rollouts history drafts were never
    verified, never learned, never used. Until it is observed, a point-mass kind takes the rates
    of the row class's best seeded or observed one: the history draft (listed first) is tried,
    and what it then shows is learned (here it fails: lookup drafts win again)."""
    policy = DraftPolicy(8, tuple(range(1, 9)), "auto", {"lossless@0+lookup": [0.9] * 7}, history=True)
    params = SamplingParams(temperature=0)
    history, lookup = RowDraft(tuple(range(2, 9)), "history/long"), RowDraft(tuple(range(2, 9)), "lookup")
    assert policy.best_draft(params, [history, lookup]) is history
    assert policy.best_draft(params, [RowDraft((2, 3), "history/long"), lookup]) is lookup  # longer: more expected
    for _ in range(3 * 16):
        policy.observe_step([params], DraftShape(8, (), lookup=True), [0], [7], 64, 1e-2, ["history/long"])
    assert policy.best_draft(params, [history, lookup]) is lookup
    assert policy.status()["acceptance"]["lossless@0+history/long"][0] < 0.2


def test_an_unobserved_history_kind_never_borrows_a_prior_below_the_default():
    """Borrowing the row class's best point-mass rates must only ever raise an unobserved kind's
    prior: at T = 1 the embedded model's lookup seed is low (0.26-0.86), and a history kind that
    took it was priced under the model's own drafts, never offered and never learned (the RL
    run's history share fell from 19% to 0)."""
    low = [0.255, 0.324, 0.5, 0.35, 0.857, 0.333, 0.5]
    policy = DraftPolicy(8, tuple(range(1, 9)), "auto", {"lossless@1.1+lookup": low}, history=True)
    rates = policy.estimate("lossless@1.1+history/aligned").rates
    assert rates[0] == pytest.approx(PRIOR_ACCEPTANCE) and min(rates) >= PRIOR_ACCEPTANCE - 1e-9
    assert rates[4] == pytest.approx(0.857)  # where the borrowed rate is higher, it is kept
    fresh = DraftPolicy(8, tuple(range(1, 9)), "auto", {}, history=True)
    assert policy._gains("lossless@1.1+history/aligned")[-1] >= fresh._gains("lossless@1.1+history/aligned")[-1]
