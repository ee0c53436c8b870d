"""The top-k sparse MoE block the MoE families share (Qwen3-MoE, Mixtral): a softmax router
picks `num_experts_per_tok` experts per token, each a gated SiLU MLP, and the token's output is
their weighted sum.

Design decisions:
- Names and layouts are transformers 5's in-memory ones: `mlp.gate.weight` [E, hidden] (the
  router), `mlp.experts.gate_up_proj` [E, 2 * I, hidden] (gate rows, then up rows) and
  `mlp.experts.down_proj` [E, hidden, I]. Weight pushes from an HF 5 model use them unchanged;
  checkpoints on disk keep one tensor per expert (`experts.3.gate_proj.weight`, Mixtral's
  `block_sparse_moe.experts.3.w1.weight`), which the loader gathers (`loader.expert_slot`).
- Expert compute is grouped by expert: the (token, k) assignments are sorted by expert once,
  the tokens gathered in that order, each expert's weights applied to its contiguous run of
  rows, and the outputs put back in (token, k) order, weighted and summed over k. Where torch
  has a grouped GEMM for the device and dtype (`F.grouped_mm`: CPU, CUDA SM80+; tried once,
  `grouped_gemm_runs`), each projection is one such call over all experts by offsets: no host
  sync, so decode steps can be captured as graphs. Elsewhere, and with autograd (training), a
  loop over the experts that have tokens runs one GEMM pair each (`expert_loop`, which reads the
  run lengths on the host). Never a loop over tokens. The two agree (`tests/test_moe.py`).
  Under torch.compile, where the forward would take the loop (or a grouped GEMM Inductor
  cannot lower), the same eager code runs as one opaque op (`rollout::grouped_experts`): the
  step stays one compiled graph and the rest of it fuses (ZAYA's ~900 small ops per step).
- Numerics follow HF: router softmax in float32, top-k, optional renormalisation in float32;
  Qwen3-MoE casts the routing weights back to the hidden dtype before weighting, Mixtral
  weights in float32 and casts the sum (`weights_in_fp32`). Each token's k weighted outputs
  are summed as HF's default (grouped GEMM) path sums them.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import expert_kernel
from .layers import lay_out


class TopKRouter(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))


class Experts(nn.Module):
    """Every expert's gated MLP weights as 3-D tensors (HF's names and layouts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))


def lay_out_experts(experts: Experts, input_major: bool) -> None:
    """Each expert's [out, in] matrix stored input-major (the transpose of a contiguous [in, out]
    one: what the CPU's native expert kernel reads, `expert_kernel`) or as PyTorch's default."""
    for name in ("gate_up_proj", "down_proj"):
        weight = experts._parameters[name]
        if weight.transpose(1, 2).is_contiguous() if input_major else weight.is_contiguous():
            continue
        data = (weight.detach().transpose(1, 2).contiguous().transpose(1, 2) if input_major
                else weight.detach().contiguous())
        setattr(experts, name, nn.Parameter(data, requires_grad=weight.requires_grad))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, weights_in_fp32: bool = False):
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)
        self.top_k, self.norm_topk_prob, self.weights_in_fp32 = (
            cfg.num_experts_per_tok, cfg.norm_topk_prob, weights_in_fp32)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (routing weights [N, k], expert ids [N, k]) as HF's router gives them."""
        logits = F.linear(x, self.gate.weight)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.weights_in_fp32 else weights.to(logits.dtype)), experts

    def pack(self, input_major: bool) -> None:
        """Lays out the router and expert weights input-major (each expert's [out, in] matrix
        stored as the transpose of a contiguous [in, out] one, as `layers.lay_out` does for
        linear weights: the CPU's GEMMs over a few rows run faster so) or as PyTorch's default.
        Names, shapes and values stay; nothing is packed (the experts are already fused)."""
        lay_out(self.gate, "weight", input_major)
        lay_out_experts(self.experts, input_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(flat)
        out = grouped_experts(flat, weights, experts, self.experts.gate_up_proj, self.experts.down_proj)
        return out.view(x.shape)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, skip_expert: bool = False
                    ) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]) for every token n, grouped by expert;
    with `skip_expert`, ids >= E name a skip expert (ZAYA's) whose assignments contribute zero.

    x [N, hidden]; weights, experts [N, k]; gate_up_proj [E, 2I, hidden]; down_proj [E, hidden, I].
    One grouped GEMM per projection where the device runs one (`grouped_gemm_runs`), else one
    GEMM pair per expert that has tokens (`expert_loop`, also the path with autograd). On the
    CPU, whose grouped kernel visits every expert, the loop also serves steps with fewer
    assignments than half the experts (few experts hit: decode at small batch), where it is
    cheaper (`benchmarks/moe_decode.py`); there a host sync costs nothing.
    While torch.compile traces a forward that would take the loop (or a grouped GEMM Inductor
    cannot lower), the same eager code runs as one opaque op (`rollout::grouped_experts`): the
    host reads stay inside it, so the graph around it is neither broken nor recompiled per
    token-count pattern, and the step is still one compiled call."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled() and not _traceable(x, experts, gate_up_proj):
        return torch.ops.rollout.grouped_experts(x, weights, experts, gate_up_proj, down_proj, skip_expert)
    return _grouped_experts(x, weights, experts, gate_up_proj, down_proj, skip_expert)


def _grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                     gate_up_proj: torch.Tensor, down_proj: torch.Tensor, skip_expert: bool) -> torch.Tensor:
    if expert_kernel.serves(x, experts, gate_up_proj, down_proj):
        return _combine(expert_kernel.expert_rows(x, experts, gate_up_proj, down_proj).to(x.dtype), None, weights, x)
    if loop_serves(x, experts, gate_up_proj):
        return expert_loop(x, weights, experts, gate_up_proj, down_proj)
    return expert_grouped_gemm(x, weights, experts, gate_up_proj, down_proj, skip_expert)


def _traceable(x: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """Whether the grouped GEMM path serves this forward and traces into a compiled graph
    (no host read): off the CPU, in a dtype Inductor lowers (`grouped_gemm_runs`)."""
    return x.device.type != "cpu" and not loop_serves(x, experts, gate_up_proj)


@torch.library.custom_op("rollout::grouped_experts", mutates_args=())
def _grouped_experts_op(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor, skip_expert: bool) -> torch.Tensor:
    return _grouped_experts(x, weights, experts, gate_up_proj, down_proj, skip_expert)


@_grouped_experts_op.register_fake
def _(x, weights, experts, gate_up_proj, down_proj, skip_expert):
    return x.new_empty(x.shape)


def loop_serves(x: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """Whether `grouped_experts` takes `expert_loop` for these assignments (see there)."""
    few = x.device.type == "cpu" and 2 * experts.numel() < gate_up_proj.shape[0]
    return few or not grouped_gemm_runs(x, gate_up_proj)


def _sorted_assignments(x: torch.Tensor, experts: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) assignments a = n * k + j sorted by expert (token order within one):
    (their expert ids, their places a, the token rows [N*k, hidden])."""
    ids, order = torch.sort(experts.reshape(-1), stable=True)
    return ids, order, x.index_select(0, order // experts.shape[1])


def _combine(out: torch.Tensor, order: torch.Tensor | None, weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expert outputs [M, hidden] of the first M assignments in sorted order (M < N*k when the
    rest went to a skip expert: those contribute zero; order None: [N*k, hidden] already in
    assignment order) -> each token's weighted sum over its k experts [N, hidden]: back to
    assignment order (a permutation: no accumulation), weighted, summed over k, as HF's
    grouped path does (deterministic, unlike index_add_)."""
    N, k = weights.shape
    if order is not None:
        placed = out.new_zeros((N * k, out.shape[1])) if out.shape[0] < N * k else out.new_empty(out.shape)
        out = placed.index_copy(0, order[:out.shape[0]], out)
    return (out * weights.reshape(-1, 1)).view(N, k, -1).sum(dim=1).to(x.dtype)


def expert_loop(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """`grouped_experts` as one GEMM pair per expert that has tokens, over its run of rows.
    The expert ids are read on the host (one sync) and walked run by run: sorted, with ids
    >= E (a skip expert, ZAYA's) last, computing nothing (their assignments contribute zero);
    one token (decode at batch 1) keeps its k assignments in order, no sort and no gather.
    The activation runs once over all runs' rows, between the two GEMM loops."""
    N, k = experts.shape
    E = gate_up_proj.shape[0]
    one = experts.tolist()[0] if N == 1 else None
    if one is not None and max(one) < E:
        order, runs = None, [(e, 1) for e in one]
    else:
        ids, order, rows = _sorted_assignments(x, experts)
        runs = [(e, sum(1 for _ in run)) for e, run in itertools.groupby(ids.tolist()) if e < E]
    if not runs:
        return x.new_zeros(x.shape)
    starts = list(itertools.accumulate((n for _, n in runs), initial=0))
    inputs = [x] * k if order is None else [rows[start:start + n] for (_, n), start in zip(runs, starts)]
    h = [F.linear(rows, gate_up_proj[e]) for (e, _), rows in zip(runs, inputs)]
    gate, up = (torch.cat(h) if len(h) > 1 else h[0]).chunk(2, dim=-1)
    act = F.silu(gate) * up
    out = [F.linear(act[start:start + n], down_proj[e]) for (e, n), start in zip(runs, starts)]
    return _combine(torch.cat(out) if len(out) > 1 else out[0], order, weights, x)


def expert_grouped_gemm(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                        gate_up_proj: torch.Tensor, down_proj: torch.Tensor, skip_expert: bool = False
                        ) -> torch.Tensor:
    """`grouped_experts` with one grouped GEMM per projection (each expert's weights applied to
    its run of sorted rows by offsets): no host sync, so it runs inside captured graphs. Skip
    ids sort last, past every offset: the kernel leaves their rows unwritten, so they are
    zeroed by a select (not a product: unwritten memory may hold NaN)."""
    ids, order, rows = _sorted_assignments(x, experts)
    E = gate_up_proj.shape[0]
    # histc, not bincount: bincount sizes its output from the data (a sync on a GPU).
    counts = torch.histc(ids.float() if ids.device.type == "cpu" else ids.int(), bins=E, min=0, max=E - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate, up = _grouped_mm(rows, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out = _grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    if skip_expert:
        out = torch.where((ids < E)[:, None], out, 0)
    return _combine(out, order, weights, x)


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `expert_grouped_gemm` serves this forward: a grouped GEMM in this torch for this
    device and dtype (float32 / 16-bit; tried once per device and dtype), no autograd (its CPU
    backward is missing), and not while torch.compile traces a dtype Inductor cannot lower."""
    if _grouped_mm is None or torch.is_grad_enabled() or x.dtype != weight.dtype:
        return False
    if torch.compiler.is_compiling():
        return weight.dtype == torch.bfloat16
    return _grouped_mm_works(weight.device, weight.dtype)


@functools.cache
def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """A tiny grouped GEMM against the per-expert loop: GPUs before SM80, builds without the
    kernel and unsupported dtypes fall back to the loop instead of failing a forward."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 8, generator=gen).to(device, dtype)
        w = torch.randn(3, 8, 4, generator=gen).to(device, dtype)
        out = _grouped_mm(x, w, offs=torch.tensor([2, 2, 5], dtype=torch.int32, device=device))
        ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
        return bool(torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
