"""The lossless rule, checked exactly (float64 enumeration) rather than statistically."""

import pytest
import torch

from rollout.sampling import (
    acceptance_probability,
    _as_int32,
    _mix32,
    _mix32_wrapping,
    coupled_tokens,
    exponential_noise,
    mixed_logits,
    policy_distribution,
    process_logits,
    residual_distribution,
    RowSampling,
    sample_from,
    verify_coupled,
    verify_drafts,
)

V = 7


def one_step_output_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(output = x) when a draft d ~ q is verified against p, enumerated over every d."""
    out = torch.zeros_like(p)
    residual = residual_distribution(p, q)
    for d in range(p.numel()):
        if q[d] == 0:
            continue
        a = acceptance_probability(p[d:d + 1], q[d:d + 1])[0]
        out[d] += q[d] * a
        out += q[d] * (1 - a) * residual
    return out


def random_logits(gen, scale=3.0):
    return torch.randn(V, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 4, 0.7), (1.0, 1, 1.0)])
def test_lossless_one_step_equals_target_by_enumeration(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        p, _ = policy_distribution(random_logits(gen).double(), temperature, top_k, top_p)
        q, _ = policy_distribution(random_logits(gen).double(), temperature, top_k, top_p)
        p, q = p.double(), q.double()
        assert torch.allclose(one_step_output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_lossless_with_one_hot_drafts_equals_target():
    gen = torch.Generator().manual_seed(1)
    for d in range(V):
        p = torch.softmax(random_logits(gen), -1)
        q = torch.zeros(V, dtype=torch.float64)
        q[d] = 1.0
        assert torch.allclose(one_step_output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_lossless_with_disjoint_supports_equals_target():
    p = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0], dtype=torch.float64)
    q = torch.tensor([0, 0, 0.25, 0.25, 0.5, 0, 0], dtype=torch.float64)
    assert torch.allclose(one_step_output_distribution(p, q), p, atol=1e-12, rtol=0)


def test_greedy_target_and_draft_accept_only_the_argmax():
    logits_p = torch.tensor([0.1, 2.0, -1.0, 0.3, 0.0, 0.0, 0.5])
    p, _ = policy_distribution(logits_p, 0.0, 0, 1.0)
    for d in range(V):
        q = torch.zeros(V)
        q[d] = 1.0
        out = one_step_output_distribution(p.double(), q.double())
        assert out.argmax() == 1 and out[1] == 1.0


def test_residual_of_equal_distributions_falls_back_to_target():
    p = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    assert torch.equal(residual_distribution(p, p), p)


def test_sample_from_partitions_unit_interval_by_probability():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25], dtype=torch.float64)
    u = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    ids = sample_from(probs.expand(len(u), -1), u)
    freq = torch.bincount(ids, minlength=5).double() / len(u)
    assert torch.allclose(freq, probs, atol=1e-4)
    assert freq[0] == 0 and freq[2] == 0


def test_all_greedy_rows_sample_what_inverse_cdf_draws_from_the_one_hot():
    """`RowSampling.greedy` skips the uniforms and the CDF: the index of the one-hot must be
    what inverse CDF draws from it at every u (ties: the first maximal logit, as argmax)."""
    from rollout.params import SamplingParams

    logits = torch.randn(6, 3, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 7] = logits[0, 0, 9] = logits[0, 0].max() + 1  # a tie
    rows = RowSampling.build([SamplingParams(temperature=0)] * 6, "cpu")
    mixed = RowSampling.build([SamplingParams(temperature=0)] * 5 + [SamplingParams(temperature=1)], "cpu")
    assert rows.greedy and not mixed.greedy
    probs, _ = rows.policy(logits)
    tokens = rows.sample(probs, None, None)
    assert tokens[0, 0] == 7 and torch.equal(tokens, logits.argmax(-1))
    for u in (0.0, 0.5, 1 - 2 ** -53):
        uniforms = torch.full((18,), u, dtype=torch.float64)
        assert torch.equal(tokens.reshape(-1), sample_from(probs.reshape(-1, 50), uniforms))


def test_verify_drafts_accepts_below_threshold_and_rejects_at_it():
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(random_logits(gen), -1).float()
    q = torch.softmax(random_logits(gen), -1).float()
    d = int(torch.argmax(q / p))  # a draft with acceptance probability < 1
    a = float(acceptance_probability(p[d:d + 1], q[d:d + 1]))
    assert a < 1
    drafts = torch.tensor([[d]])
    target = torch.stack([p, p])[None]  # [1, 2, V]: verify position, bonus position
    for u_acc, expect in ((a * 0.999, 1), (a, 0)):
        accepted, _ = verify_drafts(drafts, q[None, None], target, torch.tensor([1]),
                                    torch.tensor([[u_acc]]), torch.tensor([0.5]))
        assert int(accepted) == expect


def test_verify_drafts_samples_residual_after_rejection():
    p = torch.tensor([0.1, 0.6, 0.3, 0, 0, 0, 0])
    q = torch.tensor([0.5, 0.2, 0.3, 0, 0, 0, 0])
    residual = residual_distribution(p, q)  # mass only on token 1
    assert residual[1] == 1
    target = torch.stack([p, p])[None]
    for u in (0.0, 0.3, 0.99):
        accepted, token = verify_drafts(torch.tensor([[0]]), q[None, None], target, torch.tensor([1]),
                                        torch.tensor([[0.9999]]), torch.tensor([u]))
        assert int(accepted) == 0 and int(token) == 1


def test_verify_drafts_bonus_comes_from_the_last_target_position():
    p = torch.tensor([0.2, 0.8, 0, 0, 0, 0, 0])
    bonus = torch.tensor([0, 0, 0, 0, 0, 1.0, 0])
    q = p.clone()  # identical: always accepted
    accepted, token = verify_drafts(torch.tensor([[1, 1]]), torch.stack([q, q])[None],
                                    torch.stack([p, p, bonus])[None], torch.tensor([2]),
                                    torch.tensor([[0.5, 0.5]]), torch.tensor([0.3]))
    assert int(accepted) == 2 and int(token) == 5


def test_verify_drafts_stops_at_invalid_drafts():
    p = torch.softmax(torch.randn(V), -1)
    accepted, _ = verify_drafts(torch.tensor([[0, 0, 0]]), torch.stack([p] * 3)[None], torch.stack([p] * 4)[None],
                                torch.tensor([1]), torch.zeros(1, 3), torch.tensor([0.5]))
    assert int(accepted) == 1


def test_process_logits_matches_hf_warpers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(3)) * 2
    for t, k, p in ((0.7, 0, 1.0), (1.0, 10, 1.0), (1.2, 0, 0.85), (0.8, 7, 0.6)):
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        ref = torch.log_softmax(x, -1)
        ours = process_logits(logits, t, k, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_mixed_logits_at_weight_one_are_exactly_the_ar_logits():
    ar, diff = torch.randn(3, V), torch.randn(3, V)
    assert torch.equal(mixed_logits(ar, diff, 1.0), ar)


def test_forbidden_ids_get_probability_zero_before_temperature_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    lp = process_logits(logits, 2.0, 0, 0.8, forbidden=(0,))
    assert lp[0, 0] == float("-inf")
    expected = process_logits(logits[:, 1:], 2.0, 0, 0.8)  # the same policy over the other ids
    torch.testing.assert_close(lp[:, 1:], expected)


def test_min_p_matches_hf_warper_after_temperature_top_k_top_p():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4)) * 2
    for t, k, p, m in ((1.0, 0, 1.0, 0.1), (0.7, 10, 1.0, 0.05), (1.3, 0, 0.9, 0.2), (1.0, 0, 1.0, 1.0)):
        x = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1:
            x = TopPLogitsWarper(p)(None, x)
        ref = torch.log_softmax(MinPLogitsWarper(m)(None, x), -1)
        ours = process_logits(logits, t, k, p, min_p=m)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (t, k, p, m)
        finite = torch.isfinite(ref)
        assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_per_row_min_p_equals_each_rows_scalar_setting():
    logits = torch.randn(3, 4, 30, generator=torch.Generator().manual_seed(5)) * 3
    min_p = torch.tensor([0.0, 0.2, 0.6])
    rows = process_logits(logits, 1.0, 0, 1.0, min_p=min_p)
    for b in range(3):
        torch.testing.assert_close(rows[b], process_logits(logits[b], 1.0, 0, 1.0, min_p=float(min_p[b])))


def test_race_noise_is_a_function_of_key_position_and_id_only():
    keys = torch.tensor([11, 12, 11])
    positions = torch.tensor([[5, 6, 7], [5, 6, 7], [7, 8, 9]])
    e = exponential_noise(keys, positions, 50)  # [3, 3, 50]
    assert torch.equal(e[0, 2], e[2, 0])  # key 11 at position 7, whatever the row or column
    assert torch.equal(exponential_noise(keys[:1], positions[:1, 1:2], 50)[0, 0], e[0, 1])  # whatever else is drawn
    assert torch.equal(exponential_noise(keys, positions, 80)[..., :50], e)  # an id's noise does not depend on V
    assert not torch.equal(e[0, 0], e[1, 0]) and not torch.equal(e[0, 0], e[0, 1])  # other key, other position
    assert len(torch.unique(e[:2])) > 0.99 * e[:2].numel() and bool((e > 0).all())


def test_the_int32_vocabulary_hash_is_the_int64_one():
    x = torch.cat((torch.randint(0, 1 << 32, (100_000,), generator=torch.Generator().manual_seed(8)),
                   torch.tensor([0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1])))
    assert torch.equal(_as_int32(_mix32(x)), _mix32_wrapping(_as_int32(x)))


def test_race_winners_are_distributed_as_p():
    """argmax(p / E) over 200,000 positions of one key: frequencies within 5 standard errors of
    p (fails by chance with probability < 1e-5 per id); ids with p = 0 never win."""
    p = torch.tensor([0.4, 0.0, 0.25, 0.2, 0.1, 0.05, 0.0])
    N = 200_000
    e = exponential_noise(torch.tensor([3]), torch.arange(N)[None], V)[0]
    freq = torch.bincount(coupled_tokens(p.expand(N, V), e), minlength=V).double() / N
    assert freq[1] == 0 and freq[6] == 0
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-12), freq


def test_filtered_ids_never_win_and_greedy_rows_ignore_the_noise():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, 0.5, 0.2]] * 2)
    probs, _ = policy_distribution(logits, torch.tensor([1.0, 0.0]), 2, 1.0, forbidden=(0,))
    noise = torch.ones(2, V)
    noise[:, 0] = noise[:, 3] = 1e-30  # the most favourable noise on a forbidden and a top-k-filtered id
    noise[:, 2] = 1e-3  # enough to beat id 1, the most likely
    assert coupled_tokens(probs, noise).tolist() == [2, 1]


def test_verify_coupled_accepts_exactly_the_leading_drafts_equal_to_the_race_winners():
    gen = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(1, 5, V, generator=gen), -1)  # 4 draft positions + bonus
    e = exponential_noise(torch.tensor([9]), torch.arange(20, 25)[None], V)
    x = coupled_tokens(probs, e)[0]  # [5]
    other = (x + 1) % V
    for drafts, num, accepted in (
            (x[:4], 4, 4),                                                       # all match: the bonus x_5 next
            (torch.cat((x[:2], other[2:3], x[3:4])), 4, 2),                      # a mismatch stops acceptance
            (x[:4], 3, 3),                                                       # past num_drafts nothing counts
            (other[:4], 4, 0)):
        a, token = verify_coupled(drafts[None], probs, e, torch.tensor([num]))
        assert int(a) == accepted and int(token) == int(x[accepted])


def test_coupled_drafts_of_the_target_itself_are_always_accepted():
    """The coupling's point: a draft made with the same noise from q = p is the target's token."""
    gen = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(64, 4, V, generator=gen) * 2, -1)
    e = exponential_noise(torch.arange(64), torch.arange(4).expand(64, 4), V)
    drafts = coupled_tokens(probs[:, :3], e[:, :3])
    accepted, _ = verify_coupled(drafts, probs, e, torch.full((64,), 3))
    assert accepted.tolist() == [3] * 64
