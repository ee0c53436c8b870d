"""The decoder skeleton every family shares: embedding, a stack of the family's layers, final
norm, LM head, RoPE from explicit positions; packing and the weight names a checkpoint must
provide.

Design decisions:
- One file per family (`dense.py`, ...), each defining its layer class; `FAMILY_LAYERS` maps a
  config.json model_type to it. A layer is `layer(x, cos, sin, batch, cache) -> x` plus
  `pack(input_major)`, `packs()` and `unpack()` (its packed projections, `layers.Packed`). The
  shared parts (norm, attention, MLP, packing, weight layouts) are in `layers.py`.
- Parameter names are HF's (`model.layers.0.self_attn.q_proj.weight`, ...), so an HF state
  dict loads with a strict key check and weight pushes use HF names unchanged.
- The model knows only token ids, explicit position ids, the slot of each row in the KV cache,
  the in-step visibility and which in-step tokens to commit to the cache (`batch.StepBatch`).
  The TiDAR step layout (drafts + mask blocks) is built elsewhere (`step_layout`) and is just
  data here, so the engine serves every family the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .batch import SequenceBatch, StepBatch
from .dense import DenseLayer
from .kv_cache import KVCache
from .layers import Packed, RMSNorm, lay_out
from .qwen3_moe import MoeLayer
from .rope import inverse_frequencies, rotary_cos_sin

# config.json model_type -> the family's layer class (one file per family).
FAMILY_LAYERS: dict[str, type[nn.Module]] = {
    "llama": DenseLayer,
    "qwen2": DenseLayer,
    "qwen3": DenseLayer,
    "qwen3_moe": MoeLayer,
    "mixtral": MoeLayer,
}


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layer_class = FAMILY_LAYERS[cfg.model_type]
        self.layers = nn.ModuleList(layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


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
        did; see `layers.py`). Call before an optimizer takes the parameters: packing
        and a change of layout replace them (same names, shapes and values)."""
        if input_major is None:
            input_major = self.input_major
        self.input_major = input_major
        for layer in self.model.layers:
            layer.pack(input_major)
        lay_out(self.lm_head, "weight", input_major)
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
        """Every layer's packs (None where not packed), layer by layer; read from the module
        dicts (nn.Module attribute lookups would cost more than the checks)."""
        out = []
        for layer in self._modules["model"]._modules["layers"]._modules.values():
            out += layer.packs()
        return out

    def unpack_projections(self) -> Decoder:
        """Drops every pack: the plain path runs (the parameters keep their values and storage;
        `pack_projections()` packs again)."""
        for layer in self.model.layers:
            layer.unpack()
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
