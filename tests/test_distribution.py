"""Monte-Carlo: TiDAR lossless sampling is distributed exactly as AR sampling from the same model.

The exact AR distribution of the first 3 generated tokens is enumerated with the HF reference
model (vocab 8: 512 outcomes); the engine draws N samples in one batch; a chi-square test
compares them, for the residual rule (`seed_stable=False`) and the Gumbel coupling
(`seed_stable=True`). The negative controls (the residual norm(max(0, p - q)) swapped for p; a
coupled draft accepted by the residual rule as if it were a point mass) must be rejected: that
shows the test has the power to catch a wrong verifier.
"""

import pytest
import torch
from scipy.stats import chi2

import rollout.engine.runner
import rollout.sampling
from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.sampling import coupled_tokens, process_logits
from rollout.train.tiny import make_tiny_model

transformers = pytest.importorskip("transformers")

PROMPT = [2, 3]
VOCAB = 8
NUM_SAMPLES = 12_000
# A correct sampler fails with probability ALPHA (fixed seeds make the outcome deterministic).
ALPHA = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("mc"), "qwen2", vocab_size=VOCAB, block_size=4,
                           hidden_size=32, init_std=0.25, seed=3)


def exact_ar_distribution(model_dir, temperature, top_k, top_p, min_p=0.0, **load_kwargs) -> torch.Tensor:
    """P(x1, x2, x3 | PROMPT) [V, V, V] by enumeration with the HF model (`load_kwargs` go to
    from_pretrained)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **load_kwargs).eval()
    V = VOCAB
    with torch.no_grad():
        def next_probs(prefixes):
            logits = hf(torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1]
            return process_logits(logits, temperature, top_k, top_p, (VOCAB - 1,), min_p).exp()  # the mask id
        p1 = next_probs([[]])[0]  # [V]
        p2 = next_probs([[a] for a in range(V)])  # [V, V]
        p3 = next_probs([[a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def sample_counts(model_dir, params: SamplingParams, engine: Engine | None = None) -> torch.Tensor:
    """Counts of (x1, x2, x3) over params.n samples of PROMPT (a fresh engine unless given)."""
    engine = engine or Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    outs = engine.generate([PROMPT], params)[0]
    counts = torch.zeros(VOCAB ** 3, dtype=torch.float64)
    for c in outs:
        a, b, d = c.token_ids
        counts[(a * VOCAB + b) * VOCAB + d] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square, pooling outcomes with expected count < 5 into one cell."""
    expected = probs.flatten() * counts.sum()
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None]))
    exp = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


CASES = [
    ("lossless", 1.0, 0, 1.0, 0.0, 11),
    ("lossless", 0.8, 5, 0.9, 0.0, 12),
    ("mixed", 1.0, 0, 1.0, 0.0, 13),  # mixed at w = 1 is the lossless sampler
    ("lossless", 1.2, 0, 1.0, 0.1, 14),
]
COUPLED_CASES = [
    ("lossless", 1.0, 0, 1.0, 0.0, 31),
    ("lossless", 0.8, 5, 0.9, 0.0, 32),
    ("lossless", 1.2, 0, 1.0, 0.1, 33),
]


@pytest.mark.parametrize("sampler,temperature,top_k,top_p,min_p,seed", CASES)
def test_lossless_matches_ar_distribution(model_dir, sampler, temperature, top_k, top_p, min_p, seed):
    params = SamplingParams(sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            max_tokens=3, n=NUM_SAMPLES, seed=seed, mix_weight=1.0, seed_stable=False)
    p = chi_square_pvalue(sample_counts(model_dir, params),
                          exact_ar_distribution(model_dir, temperature, top_k, top_p, min_p))
    assert p > ALPHA, f"lossless samples differ from AR (chi-square p = {p:.2e}; a correct sampler fails w.p. {ALPHA})"


def test_wrong_residual_is_detected(model_dir, monkeypatch):
    """Negative control: resampling from p instead of norm(max(0, p - q)) after a rejection."""
    monkeypatch.setattr(rollout.sampling, "residual_distribution", lambda p, q: p)
    params = SamplingParams(sampler="lossless", max_tokens=3, n=NUM_SAMPLES, seed=11, seed_stable=False)
    p = chi_square_pvalue(sample_counts(model_dir, params), exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p < 1e-8, f"the wrong sampler was not detected (p = {p:.2e}): the test has no power"


def test_mixed_below_weight_one_is_not_the_ar_distribution(model_dir):
    """The mixing sampler trades exactness for speed: at w = 0.3 the test must see the bias."""
    params = SamplingParams(sampler="mixed", mix_weight=0.3, max_tokens=3, n=NUM_SAMPLES, seed=11, seed_stable=False)
    p = chi_square_pvalue(sample_counts(model_dir, params), exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p < 1e-8


def test_lossless_rows_batched_with_rows_of_other_settings_keep_the_ar_distribution(model_dir):
    """The same chi-square for samples that share every forward with rows of other samplers,
    temperatures, top-k/top-p and lengths (per-row sampling tensors; admitted at other steps)."""
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    others = [SamplingParams(sampler="mixed", mix_weight=0.3, max_tokens=6, n=300, seed=1),
              SamplingParams(sampler="ar", temperature=0.5, max_tokens=4, n=300, seed=2),
              SamplingParams(sampler="lossless", temperature=0.0, max_tokens=5, n=200, seed=3),
              SamplingParams(temperature=1.4, top_k=3, top_p=0.7, max_tokens=3, n=300, seed=4, seed_stable=False)]
    targets, mixed_steps = [], 0
    for i in range(12):  # 12 x 1,000 lossless samples, queued between requests of other settings
        engine.add_request([[5, 1, 4], [6, 2]], others[i % len(others)])
        targets.append(engine.add_request([PROMPT], SamplingParams(max_tokens=3, n=NUM_SAMPLES // 12, seed=11 + i,
                                                                   seed_stable=False)))
    counts = torch.zeros(VOCAB ** 3, dtype=torch.float64)
    while engine.has_work:
        running = {id(s.request) for s in engine.scheduler.running}
        others_running = len(running - {id(t) for t in targets})
        mixed_steps += bool(others_running) and any(id(t) in running for t in targets)
        for seq in engine.step().finished:
            if any(seq.request is t for t in targets):
                a, b, d = seq.out.token_ids
                counts[(a * VOCAB + b) * VOCAB + d] += 1
    assert counts.sum() == NUM_SAMPLES and mixed_steps > 10
    p = chi_square_pvalue(counts, exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p > ALPHA, f"batched lossless samples differ from AR (chi-square p = {p:.2e})"


@pytest.mark.parametrize("sampler,temperature,top_k,top_p,min_p,seed", COUPLED_CASES)
def test_seed_stable_lossless_matches_ar_distribution(model_dir, sampler, temperature, top_k, top_p, min_p, seed):
    params = SamplingParams(sampler=sampler, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            max_tokens=3, n=NUM_SAMPLES, seed=seed, seed_stable=True)
    p = chi_square_pvalue(sample_counts(model_dir, params),
                          exact_ar_distribution(model_dir, temperature, top_k, top_p, min_p))
    assert p > ALPHA, f"seed-stable samples differ from AR (chi-square p = {p:.2e}; a correct one fails w.p. {ALPHA})"


def test_coupled_drafts_accepted_by_the_residual_rule_are_detected(model_dir, monkeypatch):
    """Negative control: a Gumbel-max draft is a function of g, so one might take it for a point
    mass and accept it with probability p(d) (the residual rule for q = 1[d]), emitting the coupled
    token x on rejection. But d and x share g: a rejected d is likely x again, so the output leans
    towards q, and the test must see it."""
    gen = torch.Generator().manual_seed(0)

    def residual_accept(drafts, target_probs, noise, num_drafts):
        B, m = drafts.shape
        x = coupled_tokens(target_probs, noise)
        p_d = target_probs[:, :m].gather(-1, drafts[..., None]).squeeze(-1)
        ok = (torch.rand(B, m, generator=gen, dtype=p_d.dtype) < p_d) & (torch.arange(m)[None] < num_drafts[:, None])
        accepted = ok.long().cumprod(dim=-1).sum(dim=-1)
        return accepted, x.gather(1, accepted[:, None]).squeeze(1)
    monkeypatch.setattr(rollout.engine.runner, "verify_coupled", residual_accept)
    params = SamplingParams(max_tokens=3, n=NUM_SAMPLES, seed=31, seed_stable=True)
    p = chi_square_pvalue(sample_counts(model_dir, params), exact_ar_distribution(model_dir, 1.0, 0, 1.0))
    assert p < 1e-8, f"the wrong sampler was not detected (p = {p:.2e}): the test has no power"
