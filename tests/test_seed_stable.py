"""Seed-stable lossless sampling (the Gumbel coupling, `sampling.verify_coupled`): for a seed,
`lossless` gives exactly `ar`'s tokens whatever was drafted (TiDAR blocks, lookup drafts, any
step shapes), whatever the batch, chunking or load, and after a keep-mode weight swap.

The engines here compute in float64: the guarantee holds wherever the logits are the same, and
in float64 the few-ulp differences between step shapes cannot flip a choice in these tests
(in float32 they can, rarely: benchmarks/RESULTS.md measures how often). The distribution
itself (chi-square against enumeration, with a negative control) is in test_distribution.py.
"""

import random
import threading

import pytest
import torch
from conftest import PROMPTS

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.drafting import DraftShape
from rollout.service.messages import Finished

SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9), dict(temperature=1.3, min_p=0.05),
            dict(temperature=0.0)]
SEEDS = range(2)
LONG_PROMPTS = PROMPTS + [[3, 5, 7, 9, 11] * 4, [2, 4] * 9]  # the last two repeat: lookup drafts find matches


@pytest.fixture(scope="module")
def engine64(tiny_dir):
    return Engine.from_pretrained(tiny_dir, dtype=torch.float64, config=EngineConfig(drafting="fixed"))


def fresh(engine: Engine, **config) -> Engine:
    """An engine over the same weights with its own pool and drafting policy."""
    return Engine(engine.model, engine.tidar, dtype=engine.dtype, config=EngineConfig(**config))


def tokens(out) -> list[list[int]]:
    return [c.token_ids for per_prompt in out for c in per_prompt]


def ar_tokens(engine: Engine, prompts, seed: int, max_tokens: int, n: int = 2, **setting) -> list[list[int]]:
    return tokens(engine.generate(prompts, SamplingParams(sampler="ar", max_tokens=max_tokens, n=n, seed=seed,
                                                          **setting)))


def run_together(engine: Engine, prompts, sampler: str, max_tokens: int, settings=SETTINGS) -> dict:
    """One request per (seed, setting), all admitted at once: (request, prompt, sample) -> Completion."""
    requests = [engine.add_request(prompts, SamplingParams(sampler=sampler, max_tokens=max_tokens, n=2, seed=seed,
                                                           **setting))
                for seed in SEEDS for setting in settings]
    out = {}
    while engine.has_work:
        for seq in engine.step().finished:
            out[(requests.index(seq.request), seq.out.prompt_index, seq.out.sample_index)] = seq.out
    return out


def assert_lossless_equals_ar(engine: Engine, reference: Engine, prompts=PROMPTS, max_tokens: int = 16,
                              settings=SETTINGS) -> float:
    """Seed-stable lossless on `engine` == ar on `reference`, every seed and setting, token for
    token and log-prob for log-prob. Returns the tokens per forward of the lossless rows."""
    ar = run_together(reference, prompts, "ar", max_tokens, settings)
    ll = run_together(engine, prompts, "lossless", max_tokens, settings)
    assert ll.keys() == ar.keys() and len(ar) == 2 * len(prompts) * len(SEEDS) * len(settings)
    for key, a in ar.items():
        assert ll[key].token_ids == a.token_ids, key
        assert max(abs(x - y) for x, y in zip(a.logprobs, ll[key].logprobs)) < 1e-9
    return sum(len(c.token_ids) for c in ll.values()) / sum(c.num_forward_passes for c in ll.values())


def test_lossless_equals_ar_token_for_token_under_fixed_drafting(engine64):
    assert assert_lossless_equals_ar(engine64, engine64) > 1.1


def test_lossless_equals_ar_token_for_token_under_auto_drafting(engine64):
    auto = fresh(engine64, drafting="auto")
    for rows, per_row in ((1, 1), (1, 4), (1, 20), (64, 1), (64, 8), (144, 20)):  # mostly a fixed cost: drafting pays
        for context in (16, 64):
            auto.drafting.costs.observe(per_row > 1, rows, rows * per_row, context, 4e-3 + 2e-6 * rows * per_row)
    assert assert_lossless_equals_ar(auto, engine64, LONG_PROMPTS) > 1.1
    assert sum(auto.drafting.choices.values()) > 0  # the auto policy chose the steps (random shapes: next test)


def random_shapes(engine: Engine, seed: int, lookup: bool) -> Engine:
    """Every decode step a random shape: AR, any draft length with any prefix of the levels, or
    (with `lookup`) a verify-only lookup step."""
    rng, k = random.Random(seed), engine.tidar.block_size
    options = [None] + [DraftShape(d, tuple(range(1, m + 1))) for d in range(2, k + 1) for m in range(1, d + 1)]
    if lookup:
        options += [DraftShape(d, (), lookup=True) for d in range(2, k + 1)] * 3
    engine.drafting.choose = lambda params, context, lookups=None: rng.choice(options)
    engine.drafting.wants_lookup = lambda params: lookup
    return engine


def test_lossless_equals_ar_token_for_token_with_random_level_sets_per_step(engine64):
    shaped = random_shapes(fresh(engine64, drafting="auto"), 0, lookup=False)
    assert assert_lossless_equals_ar(shaped, engine64) > 1.1


def test_lossless_equals_ar_token_for_token_when_verifying_lookup_drafts(engine64):
    shaped = random_shapes(fresh(engine64, drafting="auto"), 1, lookup=True)
    offered = []
    store = shaped.runner._store_lookup
    shaped.runner._store_lookup = lambda seqs, length, lookup: offered.append(sum(map(bool, lookup))) or store(
        seqs, length, lookup)
    assert assert_lossless_equals_ar(shaped, engine64, LONG_PROMPTS) > 1.1
    assert sum(offered) > 100  # lookup drafts were verified often


def test_lossless_equals_ar_with_chunked_prefill(engine64):
    chunked = fresh(engine64, drafting="fixed", max_prefill_tokens=4)
    assert assert_lossless_equals_ar(chunked, engine64, LONG_PROMPTS, settings=SETTINGS[:2]) > 1.1


def test_rows_alone_equal_the_same_rows_among_thirty_others_admitted_at_other_steps(engine64):
    """One seeded request (batch 1, then 2 x 2 rows) alone, and again among 30 requests of other
    samplers, settings and lengths, admitted before, with and after it: the same tokens, and
    the same as ar alone."""
    rng = random.Random(5)
    for seed, prompts in ((7, [[4, 2, 9]]), (8, [[5, 6, 7, 8], [12, 3]])):
        n = 1 if len(prompts) == 1 else 2
        params = SamplingParams(max_tokens=24, n=n, seed=seed)
        alone = tokens(fresh(engine64, drafting="auto").generate(prompts, params))
        assert alone == ar_tokens(engine64, prompts, seed, 24, n)
        busy = fresh(engine64, drafting="auto", max_num_seqs=48)
        others = [([[rng.randrange(15) for _ in range(rng.randint(1, 9))]],
                   SamplingParams(sampler=rng.choice(["ar", "lossless", "mixed"]), temperature=rng.choice([0, 0.6, 1]),
                                  top_k=rng.choice([0, 5]), max_tokens=rng.randint(4, 30), n=rng.randint(1, 3),
                                  seed=rng.randrange(1000), seed_stable=rng.random() < 0.5)) for _ in range(30)]
        for p in others[:10]:
            busy.add_request(*p)
        busy.step()
        target = busy.add_request(prompts, params)
        rows, step = {}, 0
        while busy.has_work:
            if others[10:] and step % 2 == 0:
                busy.add_request(*others.pop(10))
            for seq in busy.step().finished:
                if seq.request is target:
                    rows[(seq.out.prompt_index, seq.out.sample_index)] = seq.out.token_ids
            step += 1
        assert len(others) == 10 and [rows[k] for k in sorted(rows)] == alone


def perturbed(engine: Engine, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for k, v in engine.model.state_dict().items()}


def test_after_a_keep_mode_swap_tokens_equal_ar_on_the_new_weights_from_the_same_prefix(tiny_dir):
    reference = Engine.from_pretrained(tiny_dir, dtype=torch.float64, config=EngineConfig(drafting="fixed"))
    new_weights = perturbed(reference, 0)
    reference.load_weights(new_weights, 1)
    for seed in (3, 4):
        engine = Engine.from_pretrained(tiny_dir, dtype=torch.float64, config=EngineConfig(drafting="fixed"))
        request = engine.add_request(PROMPTS, SamplingParams(max_tokens=30, seed=seed))
        for _ in range(4):
            engine.step()
        prefixes = {s.out.prompt_index: list(s.out.token_ids) for s in engine.scheduler.running if s.request is request}
        assert len(prefixes) == len(PROMPTS) and all(prefixes.values())
        engine.load_weights(new_weights, engine.weight_version + 1)
        done = {}
        while engine.has_work:
            done.update({s.out.prompt_index: s.out for s in engine.step().finished})
        # The row key is (seed, prompt index, sample index) and the noise is by absolute
        # position, so ar from prompt + prefix continues the same row.
        continued = ar_tokens(reference, [PROMPTS[i] + prefixes[i] for i in range(len(PROMPTS))], seed, 30, 1)
        for i, out in done.items():
            cut = len(prefixes[i])
            assert out.token_ids[:cut] == prefixes[i]
            assert set(out.policy_versions[cut:]) == {engine.weight_version}
            assert out.token_ids[cut:] == continued[i][:30 - cut]


def test_the_service_returns_the_same_tokens_for_a_seeded_request_under_varying_load(make_replica, tiny_dir):
    """Two in-process replicas with the default settings (auto drafting, seed-stable): the same
    request sent to either, alone or while 0 to 12 other requests run, gives the same tokens."""
    replicas = [make_replica(f"r{i}", dtype="float64", engine_config=EngineConfig()) for i in range(2)]
    target = dict(max_tokens=24, n=2, seed=11)

    def records(replica, request_id, prompts, params):
        return [r for m in replica.generate(request_id, prompts, params, 0) if isinstance(m, Finished)
                for r in m.records]

    seen = []
    for i, load in enumerate((0, 3, 12, 6)):
        replica = replicas[i % 2]
        threads = [threading.Thread(target=records, args=(replica, f"load{i}-{j}", [[1 + j % 14, 4, 2]],
                                                          dict(max_tokens=8 + 5 * j, n=1 + j % 3, seed=j,
                                                               temperature=(0.0, 0.8, 1.0)[j % 3])))
                   for j in range(load)]
        for t in threads:
            t.start()
        got = records(replica, f"target{i}", PROMPTS, target)
        for t in threads:
            t.join(120)
        seen.append(sorted((r["prompt_index"], r["sample_index"], r["token_ids"].tolist()) for r in got))
    assert len(seen[0]) == 2 * len(PROMPTS) and all(s == seen[0] for s in seen)
    ar = Engine.from_pretrained(tiny_dir, dtype=torch.float64)
    assert [t for _, _, t in seen[0]] == ar_tokens(ar, PROMPTS, 11, 24)
