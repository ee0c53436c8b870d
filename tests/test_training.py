"""The TiDAR hybrid objective: mask, labels, loss, and that it trains."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from rollout.model.batch import SequenceBatch
from rollout.model.loader import load_decoder, read_model_config
from rollout.train.objective import (
    IGNORE,
    CausalLoss,
    HybridLoss,
    ar_perplexity,
    training_block_mask,
    training_inputs,
    training_labels,
    training_mask,
)
from rollout.train.tiny import make_tiny_model

MASK = 15  # make_tiny_model: the last vocab id of a 16-token vocabulary


def reference_visible(S: int, k: int, q: int, kv: int) -> bool:
    """DESIGN.md section 2 "Training", written out per pair of indices of [clean | mask]."""
    q_clean, kv_clean = q < S, kv < S
    if q_clean and kv_clean:
        return kv <= q                      # clean -> clean causal
    if q_clean:
        return False                        # clean -> mask never
    b = (q - S) // k
    if kv_clean:
        return kv < b * k                   # mask in block b -> clean tokens before b*k
    return (kv - S) // k == b               # mask -> mask inside its own block


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), vocab_size=16, init_std=0.02)
    model_dir, _, cfg = read_model_config(path)
    return path, cfg


def load(tiny):
    path, cfg = tiny
    torch.manual_seed(0)
    return load_decoder(path, cfg, "cpu", torch.float32)


@pytest.mark.parametrize("S,k", [(1, 2), (5, 2), (8, 4), (9, 4), (12, 3), (16, 8), (7, 8)])
def test_dense_training_mask_equals_reference_rules(S, k):
    mask = training_mask(S, k, "cpu")
    assert mask.shape == (2 * S, 2 * S) and mask.dtype == torch.bool
    expected = torch.tensor([[reference_visible(S, k, q, kv) for kv in range(2 * S)] for q in range(2 * S)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("S,k", [(40, 4), (100, 8), (64, 3)])
def test_flex_block_mask_agrees_with_dense_mask(S, k):
    block_mask = training_block_mask(S, k, torch.device("cpu"))
    idx = torch.arange(2 * S)
    from_mask_mod = block_mask.mask_mod(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    assert torch.equal(from_mask_mod, training_mask(S, k, "cpu"))

    from torch.nn.attention.flex_attention import flex_attention
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(2, 2, 2 * S, 16, generator=g) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is unfused
        flex = flex_attention(q, key, v, block_mask=block_mask)
    dense = F.scaled_dot_product_attention(q, key, v, attn_mask=training_mask(S, k, "cpu"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_inputs_are_clean_then_all_mask_at_repeated_positions():
    x = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    ids, positions = training_inputs(x, MASK)
    assert ids.tolist() == [[3, 4, 5, 6, MASK, MASK, MASK, MASK], [7, 8, 9, 10, MASK, MASK, MASK, MASK]]
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2


def test_labels_clean_half_shifted_mask_half_unshifted():
    x = torch.tensor([[10, 11, 12, 13, 14]])
    labels = training_labels(x)
    assert labels.tolist() == [[11, 12, 13, 14, IGNORE, 10, 11, 12, 13, 14]]


def test_loss_is_alpha_weighted_mean_of_components(tiny):
    model = load(tiny)
    x = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for alpha in (1.0, 3.0, 0.0):
            loss, ar, diff = HybridLoss(model, MASK, 4, alpha)(x)
            torch.testing.assert_close(loss, (alpha * ar + diff) / (1 + alpha))


def test_components_equal_cross_entropy_of_unchunked_logits(tiny):
    model = load(tiny)
    S, k = 12, 4
    x = torch.randint(0, MASK, (2, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, ar, diff = HybridLoss(model, MASK, k)(x)
        ids, positions = training_inputs(x, MASK)
        logits = model.logits(model(ids, SequenceBatch(positions, training_mask(S, k, "cpu")), None))
    torch.testing.assert_close(ar, F.cross_entropy(logits[:, :S - 1].flatten(0, 1), x[:, 1:].flatten()))
    torch.testing.assert_close(diff, F.cross_entropy(logits[:, S:].flatten(0, 1), x.flatten()))


def test_ar_component_equals_plain_causal_loss(tiny):
    """Clean tokens never see the mask half, so the AR loss is the ordinary next-token loss."""
    model = load(tiny)
    x = torch.randint(0, MASK, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, ar, _ = HybridLoss(model, MASK, 4)(x)
        torch.testing.assert_close(ar, CausalLoss(model)(x))


def test_optimisation_steps_lower_both_losses(tiny):
    model = load(tiny)
    objective = HybridLoss(model, MASK, 4)
    x = torch.randint(0, MASK, (4, 16), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    _, ar0, diff0 = objective(x)
    for _ in range(10):
        loss, _, _ = objective(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, ar1, diff1 = objective(x)
    assert ar1 < ar0 - 0.1, (float(ar0), float(ar1))
    assert diff1 < diff0 - 0.1, (float(diff0), float(diff1))


def test_ar_perplexity_matches_transformers(tiny):
    import transformers

    path, _ = tiny
    model = load(tiny)
    windows = torch.randint(0, MASK, (3, 20), generator=torch.Generator().manual_seed(5))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = hf(windows, labels=windows).loss
    assert ar_perplexity(model, windows, batch_size=2) == pytest.approx(float(loss.exp()), rel=1e-4)


def test_ar_perplexity_rejects_one_token_windows(tiny):
    with pytest.raises(ValueError, match="S >= 2"):
        ar_perplexity(load(tiny), torch.zeros(2, 1, dtype=torch.long))


# ---------------------------------------------------------------- self-distillation (issue 13)
def reference_distill_loss(model, x, k, distill):
    """Written out per position: the diffusion target at i >= 1 mixes onehot(x_i) with the AR
    policy p(. | x_<i) from a plain causal forward (mask token removed), at i = 0 the label."""
    B, S = x.shape
    with torch.no_grad():
        ids, positions = training_inputs(x, MASK)
        logq = torch.log_softmax(model.logits(model(ids, SequenceBatch(positions, training_mask(S, k, "cpu")),
                                                    None))[:, S:], -1)
        causal = model.logits(model(x, SequenceBatch(torch.arange(S)[None].expand(B, S),
                                                     torch.ones(S, S, dtype=torch.bool).tril()), None))
    total = 0.0
    for b in range(B):
        for i in range(S):
            target = F.one_hot(x[b, i], logq.shape[-1]).float()
            if i > 0:
                ar = causal[b, i - 1].clone()
                ar[MASK] = float("-inf")
                target = (1 - distill) * target + distill * torch.softmax(ar, -1)
            total += float(-(target * logq[b, i]).sum())
    return total / (B * S)


@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_distilled_diffusion_loss_equals_per_position_reference(tiny, distill):
    model = load(tiny)
    S, k = 12, 4
    x = torch.randint(0, MASK, (2, S), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, _, diff = HybridLoss(model, MASK, k, distill=distill)(x)
    assert float(diff) == pytest.approx(reference_distill_loss(model, x, k, distill), rel=1e-5)


def test_distillation_teacher_is_detached(tiny):
    """With alpha = 0 and distill = 1 the gradient is that of the diffusion half against a fixed
    target: equal to the gradient of the same loss with the teacher computed beforehand."""
    model = load(tiny)
    x = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(6))
    loss, _, _ = HybridLoss(model, MASK, 4, alpha=0.0, distill=1.0)(x)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    S = 12
    with torch.no_grad():
        causal = model.logits(model(x, SequenceBatch(torch.arange(S)[None].expand(2, S),
                                                     torch.ones(S, S, dtype=torch.bool).tril()), None))
        teacher = torch.softmax(causal.index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
        target = torch.cat((F.one_hot(x[:, :1], 16).float(), teacher[:, :-1]), dim=1)
    ids, positions = training_inputs(x, MASK)
    logq = torch.log_softmax(model.logits(model(ids, SequenceBatch(positions, training_mask(S, 4, "cpu")),
                                                None))[:, S:], -1)
    (-(target * logq).sum(-1).mean() / 2).backward()  # (alpha * 0 + diff) / (1 + alpha), alpha = 0 -> / 1
    want = [p.grad for p in model.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b * 2, rtol=1e-4, atol=1e-6)


def test_ar_rows_restrict_the_ar_loss_to_corpus_rows(tiny):
    model = load(tiny)
    x = torch.randint(0, MASK, (4, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, ar_first, diff_all = HybridLoss(model, MASK, 4)(x, ar_rows=2)
        _, ar_ref, _ = HybridLoss(model, MASK, 4)(x[:2])
        _, _, diff_ref = HybridLoss(model, MASK, 4)(x)
        _, ar_none, _ = HybridLoss(model, MASK, 4)(x, ar_rows=0)
    torch.testing.assert_close(ar_first, ar_ref)
    torch.testing.assert_close(diff_all, diff_ref)
    assert float(ar_none) == 0.0
    with pytest.raises(ValueError, match="ar_rows"):
        HybridLoss(model, MASK, 4)(x, ar_rows=5)
    with pytest.raises(ValueError, match="distill"):
        HybridLoss(model, MASK, 4, distill=1.5)


def test_distillation_raises_acceptance_of_a_tiny_model(tmp_path):
    """What the objective is for: trained with distill = 1 on the policy's own samples, the
    draft distribution moves towards the AR policy: 1 - TV(p, q) at a first draft position rises."""
    from rollout.config import TidarConfig
    from rollout.train.self_distill import sample_continuations

    path = make_tiny_model(tmp_path, vocab_size=16)  # init_std 0.3: peaked p and q that disagree
    _, _, cfg = read_model_config(path)
    model = load((path, cfg))
    tidar = TidarConfig(MASK, 4)
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, MASK, (16, 4), generator=g)

    def overlap():  # mean sum_v min(p, q) at mask position 4 (first draft of block 1) on fresh samples
        x = sample_continuations(model, tidar, prompts, 12, 1.0, seed=99)
        with torch.no_grad():
            ids, positions = training_inputs(x, MASK)
            logits = model.logits(model(ids, SequenceBatch(positions, training_mask(16, 4, "cpu")), None))
        p = torch.softmax(logits[:, 3].index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
        q = torch.softmax(logits[:, 16 + 4].index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
        return float(torch.minimum(p, q).sum(-1).mean())

    before = overlap()
    objective = HybridLoss(model, MASK, 4, alpha=0.0, distill=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        x = sample_continuations(model, tidar, prompts, 12, 1.0, seed=step)
        loss, _, _ = objective(x, ar_rows=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = overlap()
    assert after > before + 0.1, (before, after)
