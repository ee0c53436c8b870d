"""The parts every decoder family is built from: RMSNorm, packed projections and the weight
layouts, self-attention (projections, RoPE, the attention dispatch of `attention.py`) and the
gated MLP.

Design decisions (shared by every family, see `decoder.py` for the skeleton):
- Module and parameter names mirror HF's (`self_attn.q_proj.weight`, `mlp.up_proj.weight`),
  so an HF state dict loads with a strict key check and weight pushes use HF names unchanged.
- Numerics follow HF: RMSNorm in float32, RoPE cos/sin in float32, SDPA attention.
- Packed projections (`Packed`, asked for by `Decoder.pack_projections`): q/k/v and gate/up
  weights live in one tensor per layer whose row blocks ARE the HF-named parameters (views), so
  an inference step runs one GEMM where it ran three (or two), with no second copy of any
  weight: loading and weight pushes write the parameters, and the packed tensor sees it. The
  packed path runs only without autograd (parameters get their own gradients on the plain path)
  and only while every parameter still lies where it was packed (`Packed.current`): a `.to()`,
  an FSDP wrap or a reassigned parameter silently falls back to the plain path, never to stale
  weights.
- Input-major weights (`lay_out(..., input_major=True)`, asked for by the engine on the CPU in
  float32 and for MoE families, `engine.cpu_input_major`):
  every linear weight, the tied embedding included, keeps its [out, in] shape and HF name but
  is stored as its transpose, an [in, out] contiguous tensor (strides (1, out)). MKL runs a
  decode forward's matmuls over 1-16 rows 1.1-1.6x faster with weights stored so than with
  PyTorch's default [out, in] storage (`benchmarks/RESULTS.md`, "Step speed, seventh pass":
  per weight it ranges 0.8-1.4x, the LM head at 8 rows losing). On a GPU the default stays:
  its GEMM libraries take either transpose, and the effect there is unmeasured. Loading,
  weight pushes (`copy_`) and saving (`.contiguous()`) see only shapes and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import attend, attend_sequence
from .batch import SequenceBatch, StepBatch
from .kv_cache import KVCache
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # HF's float32 arithmetic in one kernel (no casts to round): the same numbers.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def is_input_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight [out, in] is stored as its transpose (see the module docstring)."""
    return weight.t().is_contiguous()


def lay_out(module: nn.Module, name: str, input_major: bool) -> None:
    """Stores `module.<name>` [out, in] input-major or as PyTorch's default, copying (into a new
    Parameter of the same name) only when its layout changes."""
    weight = module._parameters[name]
    if (is_input_major(weight) if input_major else weight.is_contiguous()):
        return
    data = weight.detach().t().contiguous().t() if input_major else weight.detach().contiguous()
    setattr(module, name, nn.Parameter(data, requires_grad=weight.requires_grad))


class Packed:
    """Linear layers of one module that read one input (`owner.<name>` for each name), packed:
    `weight` [sum of outputs, in] (and `bias`) hold them as consecutive row blocks, each layer's
    parameter a view of its block. `input_major`: `weight` is the transpose of a contiguous [in,
    sum of outputs] tensor (the blocks are then column blocks of that tensor). `current()` tells
    whether every parameter still lies at its packed place."""
    __slots__ = ("weight", "bias", "sizes", "entries")

    def __init__(self, owner: nn.Module, names: list[str], input_major: bool = False):
        linears = [getattr(owner, n) for n in names]
        if input_major:
            self.weight = torch.cat([m.weight.detach().t() for m in linears], dim=1).t()
        else:
            self.weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
        self.sizes = [m.out_features for m in linears]
        start = 0
        for m, n in zip(linears, self.sizes):
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=m.weight.requires_grad)
            if has_bias:
                m.bias = nn.Parameter(self.bias[start:start + n], requires_grad=m.bias.requires_grad)
            start += n
        # (owner's module dict, layer name, layer, its parameter dict, parameter name, the packed
        # view, its storage address): read straight from the dicts, so a check costs a few dict
        # reads per layer, not nn.Module attribute lookups.
        self.entries = [(owner._modules, n, m, m._parameters, p, m._parameters[p], m._parameters[p].data_ptr())
                        for n, m in zip(names, linears) for p in (("weight", "bias") if has_bias else ("weight",))]

    def current(self) -> bool:
        """True while the layers' parameters are the packed views: no layer replaced, no
        parameter reassigned (a new Parameter object) or given new storage (`param.data = ...`)."""
        for modules, name, module, params, pname, view, pointer in self.entries:
            if (modules.get(name) is not module or params.get(pname) is not view
                    or view.data_ptr() != pointer):
                return False
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def packed_ready(packed: Packed | None, checked: bool) -> bool:
    """Whether to take the packed path now: packed, no autograd, parameters where they were
    packed. `checked`: the caller has just seen `Decoder.packs_current()` hold for this forward
    (the engine's runner, every step). Without it, the check runs here, but not inside
    torch.compile: there it would be decided once, at tracing, and no guard would see a
    parameter moved later."""
    if packed is None or torch.is_grad_enabled():
        return False
    if checked:
        return True
    return not torch.compiler.is_compiling() and packed.current()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.packed: Packed | None = None

    def pack(self, input_major: bool = False) -> None:
        self.packed = Packed(self, ["q_proj", "k_proj", "v_proj"], input_major)
        lay_out(self.o_proj, "weight", input_major)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if packed_ready(self.packed, batch.packed):
            qkv = F.linear(x, self.packed.weight, self.packed.bias).view(B, T, H + 2 * Hk, D)
            v = qkv[:, :, H + Hk:].transpose(1, 2)
            if hasattr(self, "q_norm"):
                q = apply_rotary(self.q_norm(qkv[:, :, :H]).transpose(1, 2), cos, sin)
                k = apply_rotary(self.k_norm(qkv[:, :, H:H + Hk]).transpose(1, 2), cos, sin)
            else:  # q and k heads are adjacent: one rotation for both
                qk = apply_rotary(qkv[:, :, :H + Hk].transpose(1, 2), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
        else:
            q = self.q_proj(x).view(B, T, H, D)
            k = self.k_proj(x).view(B, T, Hk, D)
            v = self.v_proj(x).view(B, T, Hk, D).transpose(1, 2)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rotary(q.transpose(1, 2), cos, sin)
            k = apply_rotary(k.transpose(1, 2), cos, sin)
        if cache is None:
            out = attend_sequence(q, k, v, batch.mask)
        else:
            out = attend(q, k, v, cache, self.layer, batch)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.packed: Packed | None = None

    def pack(self, input_major: bool = False) -> None:
        self.packed = Packed(self, ["gate_proj", "up_proj"], input_major)
        lay_out(self.down_proj, "weight", input_major)

    def forward(self, x: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """`checked`: as in `packed_ready`."""
        if packed_ready(self.packed, checked):
            gate, up = self.packed(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
