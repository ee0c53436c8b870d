"""Sampling: logit processing, the exact lossless verifier and the logit-mixing target.

Lossless rule (speculative sampling, Leviathan et al. / Chen et al.), per draft position i with
target distribution p_i and the distribution q_i that draft d_i was actually drawn from:
    accept d_i with probability  min(1, p_i(d_i) / q_i(d_i))                (left to right)
    on the first rejection, sample from  norm(max(0, p_i - q_i))
    if every draft is accepted, sample the bonus token from p at the next position.
Then P(output = x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y q(y) min(1, p(y)/q(y))) r(x) = p(x),
whatever q is, so decoded sequences are distributed exactly as autoregressive sampling from p.

Randomness enters only as uniforms in [0, 1) passed in by the caller (one per decision), which
makes every function here a pure tensor function: testable by enumeration, the same on any
device, and independent of how rows are batched.
"""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [..., V] -> log-probabilities [..., V] after temperature, top-k, top-p (float32,
    or float64 for float64 input).

    Order and tie handling follow HF's logits warpers: top-k keeps every token whose logit ties
    the k-th largest; top-p keeps the smallest set of most likely tokens whose mass reaches
    top_p (always at least one). temperature 0 is treated as 1 here: greedy decoding picks the
    argmax, and the log-probs it reports are those of the unscaled (filtered) distribution.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature > 0:
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def greedy_distribution(logprobs: torch.Tensor) -> torch.Tensor:
    """One-hot [..., V] at the argmax: the distribution greedy decoding samples from."""
    return torch.zeros_like(logprobs).scatter_(-1, logprobs.argmax(-1, keepdim=True), 1.0)


def policy_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs the token is drawn from, log-probs reported for it), both [..., V]."""
    logprobs = process_logits(logits, temperature, top_k, top_p)
    probs = greedy_distribution(logprobs) if temperature == 0 else logprobs.exp()
    return probs, logprobs


def mixed_logits(ar_logits: torch.Tensor, diffusion_logits: torch.Tensor, weight: float) -> torch.Tensor:
    """The mixing sampler's verification logits w * l_AR + (1 - w) * l_diff (w = 1: exactly l_AR)."""
    return weight * ar_logits.float() + (1 - weight) * diffusion_logits.float()


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (need not be normalised), u [N] in [0, 1) -> ids [N]."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.double() * cdf[:, -1])[:, None]
    # right=True skips zero-probability tokens: their cdf equals their predecessor's.
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def acceptance_probability(p_of_draft: torch.Tensor, q_of_draft: torch.Tensor) -> torch.Tensor:
    """min(1, p(d) / q(d)); q(d) > 0 because d was drawn from q."""
    return (p_of_draft / q_of_draft.clamp_min(torch.finfo(q_of_draft.dtype).tiny)).clamp(max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim. Where p <= q everywhere (rejection then has
    probability zero and can only happen through rounding) it falls back to p."""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def verify_drafts(drafts: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  num_drafts: torch.Tensor, u_accept: torch.Tensor, u_sample: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless verification of a batch of draft blocks.

    drafts [B, m]: draft tokens d_1..d_m (positions past num_drafts are ignored)
    draft_probs [B, m, V]: q_i, the distribution d_i was drawn from
    target_probs [B, m + 1, V]: target at the position of d_1..d_m and at the bonus position
        (index i >= num_drafts must hold the plain target p: nothing was drafted there)
    num_drafts [B]: valid drafts per row; u_accept [B, m], u_sample [B] uniforms in [0, 1)
    Returns accepted [B] (leading drafts accepted, 0..num_drafts) and next_token [B]: the
    residual sample at the first rejection, or the bonus sample when all were accepted.
    """
    B, m = drafts.shape
    valid = torch.arange(m, device=drafts.device)[None, :] < num_drafts[:, None]  # [B, m]
    p_d = target_probs[:, :m].gather(-1, drafts[..., None]).squeeze(-1)  # [B, m]
    q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)  # [B, m]
    ok = (u_accept < acceptance_probability(p_d, q_d)) & valid
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    rows = torch.arange(B, device=drafts.device)
    p_next = target_probs[rows, accepted]  # [B, V]
    rejected = accepted < num_drafts
    q_next = draft_probs[rows, accepted.clamp(max=m - 1)] if m > 0 else torch.zeros_like(p_next)
    dist = torch.where(rejected[:, None], residual_distribution(p_next, q_next), p_next)
    return accepted, sample_from(dist, u_sample)
