"""Our decoder for the Llama / Qwen2 / Qwen3 dense family.

Design decisions:
- Module and parameter names mirror HF's (`model.layers.0.self_attn.q_proj.weight`, ...), so an
  HF state dict loads with a strict key check and weight pushes can use HF names unchanged.
- The model knows only token ids, explicit position ids, the slot of each row in the KV cache,
  the in-step visibility and which in-step tokens to commit to the cache. The TiDAR step layout
  (drafts + mask blocks) is built elsewhere (`step_layout`) and is just data here.
- Numerics follow HF: RMSNorm in float32, RoPE cos/sin in float32, SDPA attention.
- Packed projections (`Decoder.pack_projections`, done by `load_decoder`): q/k/v and gate/up
  weights live in one tensor per layer whose row blocks ARE the HF-named parameters (views), so
  an inference step runs one GEMM where it ran three (or two), with no second copy of any
  weight: loading and weight pushes write the parameters, and the packed tensor sees it. The
  packed path runs only without autograd (parameters get their own gradients on the plain path)
  and only while every parameter still lies where it was packed (`Packed.current`): a `.to()`,
  an FSDP wrap or a reassigned parameter silently falls back to the plain path, never to stale
  weights.
- Input-major weights (`pack_projections(input_major=True)`, asked for by the engine on the
  CPU): every linear weight, the tied embedding included, keeps its [out, in] shape and HF name
  but is stored as its transpose, an [in, out] contiguous tensor (strides (1, out)). MKL runs
  a decode forward's matmuls over 1-16 rows 1.1-1.6x faster with weights stored so than with
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
from .attention import attend, attend_sequence, prefix_block_mask
from .kv_cache import KVCache
from .rope import apply_rotary, inverse_frequencies, rotary_cos_sin


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


def _lay_out(module: nn.Module, name: str, input_major: bool) -> None:
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


def _packed_ready(packed: Packed | None, checked: bool) -> bool:
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
        _lay_out(self.o_proj, "weight", input_major)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if _packed_ready(self.packed, batch.packed):
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
        _lay_out(self.down_proj, "weight", input_major)

    def forward(self, x: torch.Tensor, checked: bool = False) -> torch.Tensor:
        """`checked`: as in `_packed_ready`."""
        if _packed_ready(self.packed, checked):
            gate, up = self.packed(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch: StepBatch | SequenceBatch, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x), batch.packed)


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class StepBatch:
    """What one forward needs besides the token ids (tensors on the model's device).

    slots [B]: cache slot of each row; prefix_lens [B]: committed cache length of each row;
    prefix_max: their maximum, as a Python int (known on the CPU, so reading it costs no sync);
    positions [B, T]: position id of each in-step token; step_visible [B, T, T]: which in-step
    keys each in-step query sees; write_index: (slot, position) [B, T] where each in-step
    token's K/V is stored (`KVCache.write_index`; the sink for tokens not to keep);
    attention: "dense", "split" or "triton" (`attention.py`); prefix_mask: the split path's BlockMask over
    the prefix, built once per step (`attention.prefix_block_mask`); slot_range: (a, b) when
    the slots are the consecutive range a..b-1 in row order, known on the CPU (the prefix is then
    read as a view, not gathered); ar_step: one token per row, written at its position and seeing
    exactly its prefix and itself (the dense path then writes first and attends over the cache
    alone, with no concatenation); packed: the caller saw `Decoder.packs_current()` hold just
    before this forward, so the packed projections run without a check per layer, also under
    torch.compile (where the check could not run; the compiled step is specialised on this flag).
    """
    __slots__ = ("slots", "prefix_lens", "prefix_max", "positions", "step_visible", "write_index", "attention",
                 "prefix_mask", "slot_range", "ar_step", "packed")

    def __init__(self, slots, prefix_lens, prefix_max: int, positions, step_visible, write_index,
                 attention: str = "dense", slot_range: tuple[int, int] | None = None, ar_step: bool = False,
                 packed: bool = False):
        self.slots, self.prefix_lens, self.prefix_max, self.positions = slots, prefix_lens, prefix_max, positions
        self.step_visible, self.write_index, self.attention = step_visible, write_index, attention
        self.slot_range, self.ar_step, self.packed = slot_range, ar_step, packed
        self.prefix_mask = (prefix_block_mask(prefix_lens, positions.shape[1], prefix_max)
                            if attention == "split" and prefix_max > 0 else None)


class SequenceBatch:
    """A whole sequence with no cache (training): positions [B, S] and the attention mask
    (a FlexAttention BlockMask, or a dense bool [S, S] / [B, S, S] tensor)."""
    __slots__ = ("positions", "mask")
    packed = False  # projections packed only after a check per layer (see StepBatch.packed)

    def __init__(self, positions, mask):
        self.positions, self.mask = positions, mask


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling = inverse_frequencies(cfg.rope, cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.input_major = False  # the weight layout packing gives (`pack_projections`)

    def forward(self, input_ids: torch.Tensor, batch: StepBatch | SequenceBatch,
                cache: KVCache | None) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, hidden] (apply `logits` where needed).
        With a cache: one decode/prefill step (StepBatch). Without: a training sequence."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(batch.positions, self.inv_freq, self.rope_scaling, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, batch, cache)
        return self.model.norm(x)

    @torch.no_grad()
    def pack_projections(self, input_major: bool | None = None) -> Decoder:
        """Packs each layer's q/k/v and gate/up weights and lays out every linear weight, the
        tied embedding included, input-major or as PyTorch's default (None: as the last packing
        did; see the module docstring). Call before an optimizer takes the parameters: packing
        and a change of layout replace them (same names, shapes and values)."""
        if input_major is None:
            input_major = self.input_major
        self.input_major = input_major
        for layer in self.model.layers:
            layer.self_attn.pack(input_major)
            layer.mlp.pack(input_major)
        _lay_out(self.lm_head, "weight", input_major)
        if self.config.tie_word_embeddings:
            self.model.embed_tokens.weight = self.lm_head.weight
        return self

    def packs_current(self) -> bool:
        """Whether every layer is packed and its parameters still lie where they were packed
        (a pointer check per parameter): then a forward may take the packed path unchecked
        (`StepBatch.packed`)."""
        packs = self.packs()
        return all(p is not None and p.current() for p in packs) and len(packs) > 0

    def packs(self) -> list[Packed | None]:
        """Every layer's attention and MLP pack (None where not packed), layer by layer; read
        from the module dicts (nn.Module attribute lookups would cost more than the checks)."""
        out = []
        for layer in self._modules["model"]._modules["layers"]._modules.values():
            out += (layer._modules["self_attn"].packed, layer._modules["mlp"].packed)
        return out

    def unpack_projections(self) -> Decoder:
        """Drops every pack: the plain path runs (the parameters keep their values and storage;
        `pack_projections()` packs again)."""
        for layer in self.model.layers:
            layer.self_attn.packed = layer.mlp.packed = None
        return self

    def _apply(self, fn, recurse=True):
        # A conversion (.to(), .float(), ...) gives each parameter new storage: drop the packs
        # rather than keep the old.
        self.unpack_projections()
        return super()._apply(fn, recurse)

    def weight_names_and_shapes(self) -> dict[str, torch.Size]:
        """The tensors a checkpoint or weight push must provide (HF names); a tied lm_head
        is the embedding, so it is not among them."""
        shapes = {name: t.shape for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        return shapes

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
