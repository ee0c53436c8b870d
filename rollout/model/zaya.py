"""Our decoder for ZAYA (Zyphra): CCA attention + a top-1, MLP-routed mixture of experts.

Follows transformers' `models/zaya/modeling_zaya.py` (the reference in `tests/test_zaya.py`);
parameter and buffer names are HF's, so an HF checkpoint loads and weight pushes use HF names.

Design decisions:
- CCA makes a token's q/k/v depend on the tokens before it: q and k are mixed by two causal
  convolutions over the pre-conv projections of the last P = (cca_time0-1) + (cca_time1-1)
  tokens, and half the value comes from the previous token's delayed projection. Inside a
  TiDAR step "the tokens before it" are the token's own causal path, the visibility
  `step_layout` gives attention: `lag_sources` reads, for every in-step token and every lag
  1..P, which in-step token sits at that position on its path, or that the position is in the
  committed prefix (or before position 0: zeros, as HF's left padding of the convolution).
- The pre-conv q/k projections and the delayed-v projection of every written token are kept
  per position in the pool beside its K/V (`KVCache.state`, widths `token_state_widths`): a
  row's state at any committed length is a read, and rollback after rejected drafts stays "do
  not advance the length". Mask-block tokens are never written, as for K/V.
- The convolutions run on each token's window of P+1 inputs (HF's decode-time computation),
  so a whole sequence, a chunk, a decode step and a TiDAR step share one code path.
- The router state carried from layer to layer is per token (no mixing over the sequence),
  so it needs no pool state. Experts are the shared MoE block's (`moe.Experts`,
  `moe.grouped_experts`: sorted by expert once per layer, grouped GEMMs or one matmul pair per
  expert that has tokens); the skip expert computes nothing and contributes zero. Under
  torch.compile the grouping is one opaque op, so a decode step compiles unbroken.
- fp32 residual stream as HF (`residual_in_fp32`); router softmax in the model dtype, the
  balancing biases added in fp32, as HF.
- Sliding-window (`hybrid_sliding`) layers attend through the dense path with the window as
  part of its mask (key position > query position - window, HF's rule); the split / triton
  paths know no window, so the engine refuses them for a model that has such layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UnsupportedModelError
from .attention import attend, attend_sequence
from .batch import SequenceBatch, StepBatch
from .kv_cache import KVCache
from .layers import Packed, RMSNorm, lay_out, packed_ready
from .moe import Experts, grouped_experts, lay_out_experts
from .rope import apply_rotary, rotary_cos_sin

LAYER_TYPES = ("hybrid", "hybrid_sliding")


@dataclass(slots=True, frozen=True)
class ZayaConfig:
    """The shape of a ZAYA model (from config.json: `ZayaConfig.from_hf_dict`)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    router_hidden_size: int
    cca_time0: int
    cca_time1: int
    layer_types: tuple[str, ...]
    rope_theta: tuple[tuple[str, float], ...]  # (layer type, theta)
    rotary_dims: tuple[tuple[str, int], ...]  # (layer type, rotated dims per head)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    attention_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "zaya"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "moe_intermediate_size", "num_experts", "router_hidden_size", "cca_time0", "cca_time1",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise UnsupportedModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                                        f"num_key_value_heads ({self.num_kv_heads})")
        if (self.num_kv_heads * self.head_dim) % 2:
            raise UnsupportedModelError("num_key_value_heads * head_dim must be even (half of the value is delayed)")
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise UnsupportedModelError(f"layer_types must list {self.num_layers} entries from {LAYER_TYPES}, "
                                        f"got {list(self.layer_types)}")
        if "hybrid_sliding" in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise UnsupportedModelError("sliding_window must be >= 1 when layer_types has 'hybrid_sliding'")

    @property
    def intermediate_size(self) -> int:  # the engine's cost key names the MLP width
        return self.moe_intermediate_size

    # What the engine's cost key and the status name (as `ModelConfig` has them).
    family = property(lambda self: "zaya")
    num_experts_per_tok = property(lambda self: 1)  # top-1 (or the skip expert)
    moe_layers = property(lambda self: tuple(range(self.num_layers)))

    @property
    def conv_context(self) -> int:
        """P: how many earlier tokens a token's q/k convolution reads."""
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def path_context(self) -> int:
        """How many earlier path tokens a token reads: the convolution's P, and at least the
        previous token (its delayed value)."""
        return max(self.conv_context, 1)

    @property
    def has_sliding_layers(self) -> bool:
        return "hybrid_sliding" in self.layer_types

    def rope_for(self, layer_type: str) -> tuple[float, int]:
        return dict(self.rope_theta)[layer_type], dict(self.rotary_dims)[layer_type]

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ZayaConfig:
        if cfg.get("model_type") != "zaya":
            raise UnsupportedModelError(f"not a ZAYA config: model_type {cfg.get('model_type')!r}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise UnsupportedModelError(f"config.json lacks the required field {key!r}")
        if cfg.get("num_experts_per_tok", 1) != 1:
            raise UnsupportedModelError(f"ZAYA num_experts_per_tok must be 1, got {cfg['num_experts_per_tok']}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config.json hidden_act {act!r} is not supported (only 'silu')")
        num_layers, num_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        layer_types = tuple(cfg.get("layer_types") or ["hybrid"] * num_layers)
        defaults = {"hybrid": 5_000_000.0, "hybrid_sliding": 10_000.0}
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        rope = cfg.get("rope_parameters") or {}
        thetas, dims = [], []
        for t in sorted(set(layer_types)):
            params = rope.get(t) if isinstance(rope.get(t), dict) else {}
            rope_type = params.get("rope_type", "default")
            if rope_type != "default":
                raise UnsupportedModelError(f"rope_parameters[{t!r}].rope_type {rope_type!r} is not supported "
                                            "for ZAYA (only 'default')")
            factor = float(params.get("partial_rotary_factor", 0.5 if not params else 1.0))
            thetas.append((t, float(params.get("rope_theta", defaults[t]))))
            dims.append((t, int(head_dim * factor)))
            if dims[-1][1] % 2 or not 0 < dims[-1][1] <= head_dim:
                raise UnsupportedModelError(f"rope_parameters[{t!r}].partial_rotary_factor {factor} gives "
                                            f"{dims[-1][1]} rotated dims of {head_dim}: must be even and > 0")
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads") or num_heads, head_dim=head_dim,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 2048), num_experts=cfg.get("num_experts", 16),
            router_hidden_size=cfg.get("router_hidden_size", 256), cca_time0=cfg.get("cca_time0", 2),
            cca_time1=cfg.get("cca_time1", 2), layer_types=layer_types, rope_theta=tuple(thetas),
            rotary_dims=tuple(dims), max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), sliding_window=cfg.get("sliding_window"),
            attention_bias=bool(cfg.get("attention_bias", False)), lm_head_bias=bool(cfg.get("lm_head_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))


# ---------------------------------------------------------------------------- token paths
class Lags:
    """Where each in-step token's P earlier path tokens are (lags P..1, oldest first), [B, T, P]
    each: `index` the in-step token (where `in_step`), else the pool position `cache_pos` of the
    committed prefix, or nothing (`before_start`: position < 0, read as zeros)."""
    __slots__ = ("index", "in_step", "cache_pos", "before_start")

    def __init__(self, index, in_step, cache_pos, before_start):
        self.index, self.in_step, self.cache_pos, self.before_start = index, in_step, cache_pos, before_start


def lag_sources(positions: torch.Tensor, visible: torch.Tensor, P: int) -> Lags:
    """positions [B, T], visible [B, T, T] (query x key, the step's visibility) -> Lags. The
    token at lag s on token t's path is the in-step token t sees at position pos(t) - s; where
    t sees none there, that position belongs to the committed prefix (every layout of
    `step_layout` keeps a token's path contiguous: prefix, then the in-step tokens it sees)."""
    B, T = positions.shape
    lags = torch.arange(P, 0, -1, device=positions.device)  # [P] oldest first
    wanted = positions[:, :, None] - lags  # [B, T, P]
    if T == 1:
        in_step = torch.zeros(B, 1, P, dtype=torch.bool, device=positions.device)
        index = torch.zeros(B, 1, P, dtype=torch.long, device=positions.device)
    else:
        in_step, index = [], []
        keys = torch.arange(T, device=positions.device, dtype=torch.int32)  # int32: a training [B, T, T] stays small
        for i in range(P):  # one [B, T, T] match per lag (a training sequence's T is long)
            match = (positions[:, None, :] == wanted[:, :, i, None]) & visible  # key u sits there, t sees it
            in_step.append(match.any(-1))
            # t sees at most one token per position (its path), so the match's largest key index is
            # its only one (0 where none). Not argmax over the bools: Inductor's vectorised argmax
            # over a row's tail gave indices >= T in bf16 ZAYA steps at batch 16 (torch 2.13 CPU),
            # which the gather below then refused.
            index.append(torch.where(match, keys, 0).amax(-1).long())
        in_step, index = torch.stack(in_step, -1), torch.stack(index, -1)
    return Lags(index, in_step, wanted.clamp(min=0), wanted < 0)


def path_window(x: torch.Tensor, lags: Lags, pooled: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C] (this step's per-token values) -> [B, T, P, C]: the values at lags P..1 of
    each token's path, from the step, the pool (`pooled` [B, T, P, C], None: nothing cached) or
    zeros before position 0."""
    B, T, C = x.shape
    P = lags.index.shape[-1]
    from_step = x.gather(1, lags.index.reshape(B, T * P, 1).expand(B, T * P, C)).view(B, T, P, C)
    other = torch.zeros_like(from_step) if pooled is None else pooled.masked_fill(lags.before_start[..., None], 0)
    return torch.where(lags.in_step[..., None], from_step, other)


# ---------------------------------------------------------------------------- attention
class CCAProjection(nn.Module):
    """q, k, v of each token from its own and its path's projections (HF's ZayaCCAProjection)."""

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        H, Hk, D, bias = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hk, D
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hk * D, bias=bias)
        self.v_proj_current = nn.Linear(cfg.hidden_size, Hk * D // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(cfg.hidden_size, Hk * D // 2, bias=bias)
        C = (H + Hk) * D
        self.conv_qk_depthwise = nn.Conv1d(C, C, cfg.cca_time0, groups=C)
        self.conv_qk_grouped = nn.Conv1d(C, C, cfg.cca_time1, groups=H + Hk)
        self.packed: Packed | None = None

    def pack(self, input_major: bool = False) -> None:
        self.packed = Packed(self, ["q_proj", "k_proj", "v_proj_current", "v_proj_delayed"], input_major)

    def forward(self, x: torch.Tensor, lags: Lags, layer: int, batch, cache: KVCache | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, T, H, D], k and v [B, T, Hkv, D]; writes the step's
        per-position state to the pool (with a cache)."""
        B, T, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if packed_ready(self.packed, batch.packed):
            q, k, v_now, v_delay = self.packed(x)
        else:
            q, k, v_now, v_delay = self.q_proj(x), self.k_proj(x), self.v_proj_current(x), self.v_proj_delayed(x)
        qk = torch.cat((q, k), dim=-1)  # [B, T, C] the convolutions' input
        pooled_qk = pooled_v = None
        if cache is not None:
            # Write, then read: the reads that count are of committed positions, which this step
            # does not write; read first, torch.compile would copy the whole state pool per step
            # to keep the old values alive.
            cache.write_state(layer, batch.write_index, (qk, v_delay))
            pooled_qk, pooled_v = cache.read_state(layer, batch.slots, lags.cache_pos)
        P = self.conv_qk_depthwise.kernel_size[0] + self.conv_qk_grouped.kernel_size[0] - 2
        past = path_window(qk, lags, pooled_qk)[:, :, lags.index.shape[-1] - P:]  # lags P..1
        window = torch.cat((past, qk[:, :, None]), dim=2)  # [B, T, P+1, C]
        mixed = self._convolve(window)  # [B, T, C]: the convolutions' one output per token
        q_res = (q.view(B, T, H, D) + k.view(B, T, Hk, 1, D).expand(B, T, Hk, H // Hk, D).reshape(B, T, H, D)) * 0.5
        k_res = q_res.view(B, T, Hk, H // Hk, D).mean(dim=-2)
        query = mixed[..., :H * D].view(B, T, H, D) + q_res
        key = mixed[..., H * D:].view(B, T, Hk, D) + k_res
        previous = path_window(v_delay, _last_lag(lags), None if pooled_v is None else pooled_v[:, :, -1:])[:, :, 0]
        if self.v_proj_delayed.bias is not None:  # HF: the delayed projection of a zero input at position 0
            first = _last_lag(lags).before_start[:, :, 0, None]
            previous = torch.where(first, self.v_proj_delayed.bias.to(previous.dtype), previous)
        value = torch.cat((v_now, previous), dim=-1).view(B, T, Hk, D)
        return query, key, value


    def _convolve(self, window: torch.Tensor) -> torch.Tensor:
        """Both causal convolutions over each token's window [B, T, P+1, C] -> [B, T, C]: the
        depthwise one as t0 multiply-adds, the grouped one as one batched matmul per head
        group (CPU conv1d over many length-P+1 windows is an order of magnitude slower)."""
        B, T, _, C = window.shape
        dw, grouped = self.conv_qk_depthwise, self.conv_qk_grouped
        t0, t1 = dw.kernel_size[0], grouped.kernel_size[0]
        depth = dw.bias + sum(window[:, :, i:i + t1] * dw.weight[:, 0, i] for i in range(t0))  # [B, T, t1, C]
        G = grouped.groups
        D = C // G
        x = depth.view(B * T, t1, G, D).permute(2, 0, 1, 3).reshape(G, B * T, t1 * D)
        w = grouped.weight.view(G, D, D, t1).permute(0, 3, 2, 1).reshape(G, t1 * D, D)  # [G, (j, in), out]
        out = torch.baddbmm(grouped.bias.view(G, 1, D), x, w)  # [G, B*T, D]
        return out.permute(1, 0, 2).reshape(B, T, C)


def _last_lag(lags: Lags) -> Lags:
    return Lags(lags.index[..., -1:], lags.in_step[..., -1:], lags.cache_pos[..., -1:], lags.before_start[..., -1:])


class QKNorm(nn.Module):
    """q, k L2-normalised to sqrt(head_dim); k then scaled per KV head by `temp`."""

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        self.scale = cfg.head_dim ** 0.5
        self.temp = nn.Parameter(torch.zeros(cfg.num_kv_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = torch.finfo(q.dtype).eps
        q = q * (self.scale / q.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        k = k * (self.scale / k.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        return q, k * self.temp[None, None, :, None]


class ZayaAttention(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.window = cfg.sliding_window if cfg.layer_types[layer] == "hybrid_sliding" else None
        self.qkv_proj = CCAProjection(cfg)
        self.qk_norm = QKNorm(cfg)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lags: Lags,
                batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x, lags, self.layer, batch, cache)
        q, k = self.qk_norm(q, k)
        q, k = _rotate_part(q.transpose(1, 2), cos, sin), _rotate_part(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is None:
            mask = batch.mask if self.window is None else _windowed(batch.mask, batch.positions, batch.positions,
                                                                     self.window)
            out = attend_sequence(q, k, v, mask)
        elif self.window is None:
            out = attend(q, k, v, cache, self.layer, batch)
        else:
            out = _attend_window(q, k, v, cache, self.layer, batch, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _rotate_part(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial rotary: the first cos.shape[-1] dims of each head rotate, the rest pass."""
    r = cos.shape[-1]
    return torch.cat((apply_rotary(x[..., :r], cos, sin), x[..., r:]), dim=-1)


def _windowed(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """A dense visibility [S, S] / [B, S, S] restricted to keys inside the window (HF: key
    position > query position - window); q_pos [B, S], k_pos [B, S]."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError("ZAYA's sliding-window layers need a dense attention mask for whole sequences")
    inside = k_pos[:, None, :] > q_pos[:, :, None] - window  # [B, S, S]
    return (mask if mask.dim() == 3 else mask[None]) & inside


def _attend_window(q, k, v, cache: KVCache, layer: int, batch: StepBatch, window: int) -> torch.Tensor:
    """The dense path with a sliding window: prefix keys by length and window, in-step keys by
    visibility and window. q [B, H, T, D]; k, v [B, Hkv, T, D]."""
    if batch.attention != "dense":
        raise ValueError(f"ZAYA's sliding-window layers run on the dense attention path only, "
                         f"not {batch.attention!r}")
    B, _, T, _ = q.shape
    Lp = batch.prefix_max
    kp, vp = cache.prefix(layer, batch.slots, Lp, batch.slot_range)
    prefix_pos = torch.arange(Lp, device=q.device)
    q_pos = batch.positions  # [B, T]
    in_prefix = (prefix_pos < batch.prefix_lens[:, None])[:, None, :] & (
        prefix_pos[None, None, :] > q_pos[:, :, None] - window)  # [B, T, Lp]
    in_step = batch.step_visible & (q_pos[:, None, :] > q_pos[:, :, None] - window)  # [B, T, T]
    mask = torch.cat((in_prefix, in_step), dim=-1)
    out = F.scaled_dot_product_attention(q, torch.cat((kp, k), dim=2), torch.cat((vp, v), dim=2),
                                         attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])
    cache.write(layer, batch.write_index, k, v)
    return out


# ---------------------------------------------------------------------------- mixture of experts
class RouterMLP(nn.Module):
    def __init__(self, width: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(width, eps)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


class Router(nn.Module):
    """Top-1 over the experts plus a skip expert (index num_experts, computes nothing), from a
    small MLP over a router state that each layer adds to and hands to the next."""

    def __init__(self, cfg: ZayaConfig, layer: int):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.down_proj = nn.Linear(cfg.hidden_size, cfg.router_hidden_size)
        if layer > 0:
            self.router_states_scale = nn.Parameter(torch.ones(cfg.router_hidden_size))
        self.router_mlp = RouterMLP(cfg.router_hidden_size, cfg.num_experts + 1, cfg.rms_norm_eps)
        biases = torch.zeros(cfg.num_experts + 1)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (expert [N] (num_experts: skip), weight [N], the next layer's state)."""
        h = self.down_proj(x)
        if state is not None and hasattr(self, "router_states_scale"):
            h = h + state * self.router_states_scale
        probs = torch.softmax(self.router_mlp(h), dim=-1)
        # HF: the balancing biases steer the choice in fp32; the weight is the unbiased probability.
        expert = torch.topk(probs.detach().float() + self.balancing_biases, 1, dim=-1).indices  # [N, 1]
        return expert[:, 0], probs.gather(-1, expert)[:, 0], h


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer: int):
        super().__init__()
        self.gate = Router(cfg, layer)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, Hd = x.shape
        flat = x.reshape(B * T, Hd)
        expert, weight, state = self.gate(flat, None if state is None else state.reshape(B * T, -1))
        return self.routed(flat, expert, weight).view(B, T, Hd), state.view(B, T, -1)

    def routed(self, x: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], expert [N] (num_experts: the skip expert), weight [N] -> [N, hidden]:
        the shared MoE block's grouped experts (`moe.grouped_experts`, top-1); the skip expert's
        tokens stay zero (the per-expert loop walks past them, the grouped GEMM zeroes them)."""
        return grouped_experts(x, weight[:, None], expert[:, None], self.experts.gate_up_proj,
                               self.experts.down_proj, skip_expert=True)


class ResidualScaling(nn.Module):
    """(branch + b_h) * s_h + (residual + b_r) * s_r; the residual stays fp32."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ((branch + self.hidden_states_bias) * self.hidden_states_scale
                + (residual + self.residual_bias) * self.residual_scale)


# ---------------------------------------------------------------------------- the model
class ZayaLayer(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer: int):
        super().__init__()
        self.self_attn = ZayaAttention(cfg, layer)
        self.mlp = SparseMoeBlock(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_residual_scale = ResidualScaling(cfg.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(cfg.hidden_size)

    def forward(self, residual, router_state, cos, sin, lags, batch, cache):
        dtype = self.input_layernorm.weight.dtype
        h = self.self_attn(self.input_layernorm(residual.to(dtype)), cos, sin, lags, batch, cache)
        residual = self.post_attention_residual_scale(h, residual)
        h, router_state = self.mlp(self.post_attention_layernorm(residual.to(dtype)), router_state)
        return self.post_mlp_residual_scale(h, residual), router_state


class ZayaStack(nn.Module):
    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(ZayaLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))


def rope_inverse_frequencies(theta: float, rotary_dims: int) -> torch.Tensor:
    """HF's default RoPE over the rotated dims only (partial rotary)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.float) / rotary_dims))


class ZayaDecoder(nn.Module):
    """The same interface as the dense `Decoder`: forward(ids, batch, cache) -> hidden, logits."""

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        self.config = cfg
        self.model = ZayaStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.layer_types = sorted(set(cfg.layer_types))
        for t in self.layer_types:
            self.register_buffer(f"inv_freq_{t}", rope_inverse_frequencies(*cfg.rope_for(t)), persistent=False)
        self.input_major = False

    graph_capturable = False  # the expert grouping reads token counts on the host
    dense_masks = True  # whole sequences: its convolutions follow the mask, read densely

    @property
    def attention_paths(self) -> tuple[str, ...]:
        """The attention paths that honour this model's layers (only the dense path knows windows)."""
        return ("dense",) if self.config.has_sliding_layers else ("dense", "split", "triton")

    @property
    def token_state_widths(self) -> tuple[int, int]:
        """Per-position state each layer keeps in the pool beside K/V: the pre-conv q/k
        projections and the delayed value projection."""
        c = self.config
        return (c.num_heads + c.num_kv_heads) * c.head_dim, c.num_kv_heads * c.head_dim // 2

    def reset_buffers(self, device) -> None:
        """Recomputes the RoPE buffers (after `to_empty`, which leaves them uninitialised) and
        keeps the balancing biases float32 whatever the model dtype (as HF: they steer the
        routing choice in fp32)."""
        for t in self.layer_types:
            setattr(self, f"inv_freq_{t}", rope_inverse_frequencies(*self.config.rope_for(t)).to(device))
        for layer in self.model.layers:
            gate = layer.mlp.gate
            gate.balancing_biases = gate.balancing_biases.float()

    def forward(self, input_ids: torch.Tensor, batch: StepBatch | SequenceBatch,
                cache: KVCache | None) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, hidden]."""
        stack = self.model
        x = stack.embed_tokens(input_ids)
        rope = {t: rotary_cos_sin(batch.positions, getattr(self, f"inv_freq_{t}"), 1.0, x.dtype)
                for t in self.layer_types}
        lags = _lags(batch, input_ids.shape, self.config.path_context)
        residual = ((x + stack.input_hidden_states_bias) * stack.input_hidden_states_scale).float()
        router_state = None
        for layer, kind in zip(stack.layers, self.config.layer_types):
            residual, router_state = layer(residual, router_state, *rope[kind], lags, batch, cache)
        return stack.norm(residual.to(stack.norm.weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def pack_projections(self, input_major: bool | None = None) -> ZayaDecoder:
        """Packs each layer's four CCA input projections into one GEMM and lays out the linear
        weights as the dense `Decoder.pack_projections` does, the 3-D experts as the MoE
        block's (`moe.lay_out_experts`: input-major on the CPU, for the native expert kernel)."""
        if input_major is None:
            input_major = self.input_major
        self.input_major = input_major
        for layer in self.model.layers:
            layer.self_attn.qkv_proj.pack(input_major)
            lay_out(layer.self_attn.o_proj, "weight", input_major)
            lay_out_experts(layer.mlp.experts, input_major)
        lay_out(self.lm_head, "weight", input_major)
        if self.config.tie_word_embeddings:
            self.model.embed_tokens.weight = self.lm_head.weight
        return self

    def packs(self) -> list[Packed | None]:
        return [layer.self_attn.qkv_proj.packed for layer in self.model.layers]

    def packs_current(self) -> bool:
        packs = self.packs()
        return len(packs) > 0 and all(p is not None and p.current() for p in packs)

    def unpack_projections(self) -> ZayaDecoder:
        for layer in self.model.layers:
            layer.self_attn.qkv_proj.packed = None
        return self

    def _apply(self, fn, recurse=True):
        self.unpack_projections()  # new storage for every parameter: drop the packs
        return super()._apply(fn, recurse)

    def weight_names_and_shapes(self) -> dict[str, torch.Size]:
        """Tensors a checkpoint or weight push provides (HF names; the router's balancing
        biases are a buffer HF saves, so they are among them)."""
        shapes = {name: t.shape for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        return shapes


def _lags(batch: StepBatch | SequenceBatch, shape: torch.Size, P: int) -> Lags:
    """`lag_sources` of a forward's batch; computed once for all rows when they share their
    positions and visibility (a training batch: positions expanded, one 2-D mask)."""
    B, T = shape
    if isinstance(batch, StepBatch):
        return lag_sources(batch.positions, batch.step_visible.expand(B, T, T), P)
    mask = batch.mask
    if not isinstance(mask, torch.Tensor):
        raise ValueError("ZAYA needs a dense attention mask for whole sequences (its convolutions follow it)")
    if mask.dim() == 2 and batch.positions.stride(0) == 0:
        one = lag_sources(batch.positions[:1], mask[None], P)
        return Lags(*(t.expand(B, T, P) for t in (one.index, one.in_step, one.cache_pos, one.before_start)))
    return lag_sources(batch.positions, mask.expand(B, T, T) if mask.dim() == 3 else mask[None].expand(B, T, T), P)
