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

Where the uniforms come from (`counter_uniforms`): a counter-based hash, computed on the device,
of (row key, absolute position of the token being decided, purpose). The row key is derived
once per sequence from (seed, prompt index, sample index) by blake2b (`row_key`); the purposes
are ACCEPT (the draft at that position is accepted if u < min(1, p/q)), RESAMPLE (the verifier's
token at that position: residual, bonus or first token) and DRAFT (the draft proposed for that
position). A token's randomness therefore depends only on (seed, prompt index, sample index,
position): never on batch neighbours, arrival time, step boundaries or the device. Exactness
needs the three uniforms of a position to be independent of everything that decided the tokens
before it; they are, because whatever happened at earlier positions used their own positions'
uniforms. A uniform may be drawn again in a later step (a draft discarded after an earlier
rejection is re-drafted at the same position with the same u): it only ever decides its
position once, when that position is committed.

Seed-stable verification (`SamplingParams.seed_stable`, the Gumbel coupling): each position's
token is the Gumbel-max sample
    x_i = argmax_v ( log p_i(v) + g(key, i, v) ) = argmax_v p_i(v) / E(key, i, v),
    g = -log E ~ Gumbel(0, 1),  E(key, i, v) ~ Exp(1) i.i.d.,
which is an exact sample from p_i (computed in the second form, the exponential race: one log
per id, `coupled_tokens`); `ar` draws exactly this. A TiDAR draft at position i is
argmax_v q_i(v) / E(key, i, v) with the same E (a lookup draft is a point mass: itself), and
verification accepts d_i exactly when d_i = x_i, emitting x_i at the first mismatch
(`verify_coupled`). The emitted tokens are then, token for token, the AR sample of the key
whatever was drafted: drafts only decide how many of them one forward commits. They equal an
independent draw with probability at least (1 - TV(p, q)) / (1 + TV(p, q)) (a little below the
residual rule's 1 - TV). Exactness needs g at position i to be independent of everything that
decided the tokens before i; it is, since those used other positions' noise. Filtered ids have
p = 0 and never win; at temperature 0 p is the one-hot argmax, which wins whatever the noise.
E comes from the same counter-based hash, extended by the vocabulary id (`exponential_noise`).

Per-row settings: `process_logits` and `policy_distribution` take temperature / top-k / top-p
either as Python scalars (one setting for the whole tensor) or as tensors [B] (row b of the
leading dimension uses entry b), so requests with different settings share one forward;
`RowSampling` holds a step's per-row tensors, built once per step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .params import SamplingParams

ACCEPT, RESAMPLE, DRAFT = 0, 1, 2  # purposes of a uniform (see the module docstring)
RACE = 3  # purpose of a position's hash state in `exponential_noise`


Setting = float | int | torch.Tensor | None  # a scalar for every row, a tensor [B] per row, None: off


def _per_row(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row tensor [B] shaped to broadcast against x [B, ..., V]."""
    return value.view(-1, *([1] * (x.dim() - 1)))


def process_logits(logits: torch.Tensor, temperature: Setting, top_k: Setting, top_p: Setting,
                   forbidden: Sequence[int] = (), min_p: Setting = None) -> torch.Tensor:
    """THE policy: logits [..., V] -> log-probabilities [..., V] (float32, or float64 for
    float64 input). The sampler, the log-probs we return and the trainer bridge's log-probs
    (`trainer_bridge.token_logprobs`) all call this one function.

    Order: ids in `forbidden` (the mask token: ids the model must never emit) get probability 0,
    then temperature, then top-k, then top-p, then min-p (tokens whose probability is below
    min_p x the most likely token's are removed; HF's and vLLM's order).

    Each setting is a scalar or a tensor [B] over the leading dimension (per-row settings).
    Order and tie handling follow HF's logits warpers: top-k keeps every token whose logit ties
    the k-th largest; top-p keeps the smallest set of most likely tokens whose mass reaches
    top_p (always at least one). top_k 0 (or None), top_p 1 (or None) and min_p 0 (or None) are off. temperature 0
    is treated as 1 here: greedy decoding picks the argmax, and the log-probs it reports are
    those of the unscaled (filtered) distribution.
    """
    x = logits if logits.dtype == torch.float64 else logits.float()
    if len(forbidden):
        x = x.index_fill(-1, torch.as_tensor(forbidden, device=x.device), float("-inf"))
    if isinstance(temperature, torch.Tensor):
        t = _per_row(temperature, x).to(x.dtype)
        x = x / torch.where(t > 0, t, torch.ones_like(t))
    elif temperature is not None and temperature > 0:
        x = x / temperature
    x = _top_k(x, top_k)
    x = _top_p(x, top_p)
    x = _min_p(x, min_p)
    return torch.log_softmax(x, dim=-1)


def _top_k(x: torch.Tensor, top_k: Setting) -> torch.Tensor:
    V = x.shape[-1]
    if isinstance(top_k, torch.Tensor):
        k = _per_row(top_k, x)
        active = (k > 0) & (k < V)
        kth = torch.sort(x, dim=-1, descending=True).values.gather(
            -1, (k.clamp(1, V) - 1).expand(*x.shape[:-1], 1))
        return x.masked_fill(active & (x < kth), float("-inf"))
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        return x.masked_fill(x < kth, float("-inf"))
    return x


def _top_p(x: torch.Tensor, top_p: Setting) -> torch.Tensor:
    per_row = isinstance(top_p, torch.Tensor)
    if not per_row and (top_p is None or top_p >= 1.0):
        return x
    p = _per_row(top_p, x).to(x.dtype) if per_row else top_p
    sorted_x, order = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1] = False
    if per_row:
        remove_sorted &= p < 1  # rows with top_p 1 keep everything, underflowed tails included
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return x.masked_fill(remove, float("-inf"))


def _min_p(x: torch.Tensor, min_p: Setting) -> torch.Tensor:
    per_row = isinstance(min_p, torch.Tensor)
    if not per_row and (min_p is None or min_p <= 0):
        return x
    m = _per_row(min_p, x).to(x.dtype) if per_row else min_p
    # p_i < m * p_max  <=>  x_i < x_max + log(m): no softmax needed; m = 0 gives -inf (keeps all).
    threshold = x.max(dim=-1, keepdim=True).values + torch.log(torch.as_tensor(m, dtype=x.dtype, device=x.device))
    return x.masked_fill(x < threshold, float("-inf"))


def greedy_distribution(logprobs: torch.Tensor) -> torch.Tensor:
    """One-hot [..., V] at the argmax: the distribution greedy decoding samples from. `max`'s
    indices are argmax's (the first of ties) at a third of its cost on the CPU."""
    return torch.zeros_like(logprobs).scatter_(-1, logprobs.max(-1, keepdim=True).indices, 1.0)


def policy_distribution(logits: torch.Tensor, temperature: Setting, top_k: Setting, top_p: Setting,
                        forbidden: Sequence[int] = (), min_p: Setting = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs the token is drawn from, log-probs reported for it), both [..., V]. Rows at
    temperature 0 draw from the one-hot argmax."""
    logprobs = process_logits(logits, temperature, top_k, top_p, forbidden, min_p)
    if isinstance(temperature, torch.Tensor):
        greedy = _per_row(temperature == 0, logprobs)
        return torch.where(greedy, greedy_distribution(logprobs), logprobs.exp()), logprobs
    probs = greedy_distribution(logprobs) if temperature == 0 else logprobs.exp()
    return probs, logprobs


def mixed_logits(ar_logits: torch.Tensor, diffusion_logits: torch.Tensor, weight: float | torch.Tensor
                 ) -> torch.Tensor:
    """The mixing sampler's verification logits w * l_AR + (1 - w) * l_diff (w = 1: exactly l_AR);
    `weight` a scalar or a per-row tensor [B]."""
    if isinstance(weight, torch.Tensor):
        weight = _per_row(weight, ar_logits).float()
    return weight * ar_logits.float() + (1 - weight) * diffusion_logits.float()


@dataclass(frozen=True)
class RowSampling:
    """One step's per-row sampling settings as device tensors [B], built once per step.

    temperature 0 = greedy; top_k / top_p / min_p are None when no row of the step filters (the
    sort is skipped); mix_weight is the verification weight w of the mixing sampler, 1 (plain p)
    for every row that is not `mixed` at temperature > 0; `any_mixed` says whether any row
    needs the mixed target at all; `forbidden`: ids no row may ever sample (the mask token),
    removed from target and draft distributions alike. coupled [B] bool: the rows drawn by
    Gumbel-max and verified by `verify_coupled` (`seed_stable` at temperature > 0; greedy rows
    are the same under either rule), None when no row is;
    any_residual: whether some row draws by inverse CDF and is verified by the residual rule;
    greedy: every row is at temperature 0 (`sample` then takes the one-hot's index: what either
    rule draws from a one-hot, with no uniforms, noise or CDF)."""
    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    mix_weight: torch.Tensor
    any_mixed: bool
    forbidden: tuple[int, ...] = ()
    min_p: torch.Tensor | None = None
    coupled: torch.Tensor | None = None
    any_residual: bool = True
    greedy: bool = False

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device | str,
              forbidden: tuple[int, ...] = ()) -> RowSampling:
        mixed = [p.sampler == "mixed" and p.temperature > 0 and p.mix_weight < 1 for p in params]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        # Greedy rows take the argmax either way (the residual rule with one-hot p and q accepts
        # exactly the drafts equal to it): no noise for them.
        coupled = [p.seed_stable and p.temperature > 0 for p in params]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device),
            top_k=torch.tensor(top_k).to(device) if any(top_k) else None,
            top_p=torch.tensor(top_p, dtype=torch.float32).to(device) if min(top_p) < 1 else None,
            mix_weight=torch.tensor([p.mix_weight if m else 1.0 for p, m in zip(params, mixed)],
                                    dtype=torch.float32).to(device),
            any_mixed=any(mixed), forbidden=forbidden,
            min_p=torch.tensor(min_p, dtype=torch.float32).to(device) if max(min_p) > 0 else None,
            coupled=torch.tensor(coupled).to(device) if any(coupled) else None, any_residual=not all(coupled),
            greedy=all(p.temperature == 0 for p in params))

    def policy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`policy_distribution` with these rows' settings: logits [B, ..., V]."""
        return policy_distribution(logits, self.temperature, self.top_k, self.top_p, self.forbidden, self.min_p)

    def sample(self, probs: torch.Tensor, u: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        """Each row's tokens [B, ...] from `policy`'s probs [B, ..., V]: coupled rows by
        `coupled_tokens` with the noise [B, ..., V] (None when no row is coupled), the others by
        inverse CDF with the uniforms u [B, ...] (None when every row is coupled or greedy)."""
        if self.greedy:
            return probs.max(dim=-1).indices
        shape, V = probs.shape[:-1], probs.shape[-1]
        if self.coupled is None:
            return sample_from(probs.reshape(-1, V), u.reshape(-1)).view(shape)
        coupled = coupled_tokens(probs, noise)
        if not self.any_residual:
            return coupled
        sampled = sample_from(probs.reshape(-1, V), u.reshape(-1)).view(shape)
        return torch.where(_per_row(self.coupled, coupled), coupled, sampled)


def row_key(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 62-bit randomness key of one (prompt, sample) row of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


_M32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2^31: x * _MULTIPLIER < 2^63 for any 32-bit x, so int64 never overflows
_LANES = (0x68E31DA4, 0x1B56C4E9)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (two xor-shift-multiply rounds): every input bit flips about
    half of the output bits. Values stay in [0, 2^32) inside int64."""
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _M32
    x = (((x >> 16) ^ x) * _MULTIPLIER) & _M32
    return (x >> 16) ^ x


def _counter_hash(keys: torch.Tensor, positions: torch.Tensor, purposes: int | torch.Tensor,
                  lanes: torch.Tensor) -> torch.Tensor:
    """32-bit hashes [lanes, B, m] of (key [B], position [B, m], purpose, lane [lanes, 1, 1])."""
    key = keys[:, None]
    x = _mix32((positions & _M32) ^ ((purposes * 0x9E3779B1 + lanes) & _M32))  # [lanes, B, m]
    x = _mix32(x ^ (key & _M32))
    return _mix32(x ^ ((key >> 32) & _M32))


def counter_uniforms(keys: torch.Tensor, positions: torch.Tensor, purposes: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, 53 random bits) for keys [B] (int64 row keys) at positions
    [B, m] (int64) for purposes (an int, or int64 [m] / [B, m]): a pure function of (key,
    position, purpose), on the device. Two independent 32-bit hash chains (lanes, computed as
    one [2, B, m] tensor) give the high 27 and the low 26 bits. A step draws all its uniforms
    in one call: about thirty elementwise ops whatever the batch."""
    lanes = torch.tensor(_LANES, dtype=torch.long, device=positions.device).view(2, 1, 1)
    x = _counter_hash(keys, positions, purposes, lanes)
    return ((x[0] >> 5) * (1 << 26) + (x[1] >> 6)).double() / float(1 << 53)


def _mix32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on int32 tensors (the same bits, read as signed): multiplications wrap mod 2^32
    and each right shift is masked back to a logical one. Int32 runs vectorised where int64
    does not, and the vocabulary-wide part of a step's noise is most of its hashing."""
    x = (((x >> 16) & 0xFFFF) ^ x) * _MULTIPLIER
    x = (((x >> 16) & 0xFFFF) ^ x) * _MULTIPLIER
    return ((x >> 16) & 0xFFFF) ^ x


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def exponential_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise E(key, position, v) [B, m, V] (float32) for keys [B] at positions [B, m]: a
    pure function of (key, position, vocabulary id), on the device, one call for all of a
    step's positions. -log E is the Gumbel noise g of the module docstring.

    Per position, one 32-bit state h = the `counter_uniforms` hash of (key, position, RACE);
    per id, x = mix32(h xor (v * 0x9E3779B1 mod 2^32)) (int32, `_mix32_wrapping`),
    w = (x mod 2^31 + 1/2) / 2^31 in (0, 1) and E = -log(1 - w) (log1p keeps the small E,
    which decide the winners, exact down to 2^-32: each id's chance is exact to about 2^-31).
    About a dozen elementwise ops per (position, id); compiled (torch.compile,
    `EngineConfig.compile`) they fuse with the division and argmax that read them, so the noise
    is never stored."""
    lane = torch.tensor(_LANES[:1], dtype=torch.long, device=positions.device).view(1, 1, 1)
    h = _as_int32(_counter_hash(keys, positions, RACE, lane)[0])  # [B, m]
    ids = _as_int32((torch.arange(vocab_size, device=positions.device) * 0x9E3779B1) & _M32)  # [V]
    x = _mix32_wrapping(h[..., None] ^ ids)  # [B, m, V]
    w = ((x & 0x7FFFFFFF).float() + 0.5) * (1.0 / float(1 << 31))
    return -torch.log1p(-w)


def coupled_tokens(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax_v p(v) / E(v) = argmax_v (log p(v) + g(v)) over the last dim: probs [B, ..., V]
    (as `policy_distribution` gives them: one-hot at temperature 0) and `exponential_noise`
    -> ids [B, ...], an exact sample from p. Ids with p = 0 (filtered) never win."""
    return (probs / noise).argmax(dim=-1)


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
    num_drafts [B]: valid drafts per row; u_accept [B, m] uniforms in [0, 1); u_sample [B], or
        [B, m + 1] with one uniform per position of which the one at the row's accepted count
        is used (so a position's randomness does not depend on where the step boundaries fall)
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
    if u_sample.dim() == 2:
        u_sample = u_sample.gather(1, accepted[:, None]).squeeze(1)
    return accepted, sample_from(dist, u_sample)


def verify_coupled(drafts: torch.Tensor, target_probs: torch.Tensor, noise: torch.Tensor,
                   num_drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed-stable verification of a batch of draft blocks (the Gumbel coupling, module docstring):
        x_i = argmax_v p_i(v) / E_i(v);  accept d_i  <=>  d_1..d_i = x_1..x_i.

    drafts [B, m]: draft tokens d_1..d_m (positions past num_drafts are ignored)
    target_probs [B, m + 1, V]: p at the positions of d_1..d_m and at the bonus position
    noise [B, m + 1, V]: E of the same positions (`exponential_noise`)
    num_drafts [B]: valid drafts per row
    Returns accepted [B] (0..num_drafts) and next_token [B] = x at the first mismatch, or at the
    bonus position when every draft matched: the emitted tokens are x_1..x_{accepted + 1}
    whatever the drafts were.
    """
    B, m = drafts.shape
    x = coupled_tokens(target_probs, noise)  # [B, m + 1]
    valid = torch.arange(m, device=drafts.device)[None, :] < num_drafts[:, None]  # [B, m]
    ok = (drafts == x[:, :m]) & valid
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)  # [B]
    return accepted, x.gather(1, accepted[:, None]).squeeze(1)
