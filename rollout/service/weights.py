"""The weight-update lifecycle of a replica: stage (verify names, shapes, dtypes, finite values;
move to the device) -> commit (swap between engine steps, version + 1). Nothing the engine
serves changes before commit, and a commit swaps every tensor at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.decoder import Decoder

WEIGHT_SWAP_MODES = ("wait", "abort", "keep")


class WeightMismatchError(ValueError):
    """A pushed state dict does not fit the served model."""


@dataclass(frozen=True)
class StagedWeights:
    version: int
    tensors: dict[str, torch.Tensor]  # verified, on the model's device and in its dtypes
    nbytes: int


def check_swap_mode(mode: str) -> None:
    if mode not in WEIGHT_SWAP_MODES:
        raise ValueError(f"mode must be one of {', '.join(WEIGHT_SWAP_MODES)}, got {mode!r}")


def stage_weights(model: Decoder, version: int, tensors: dict[str, torch.Tensor], device: str | torch.device
                  ) -> StagedWeights:
    """Verifies a full state dict (HF names) against the model and prepares it for commit."""
    expected = model.weight_names_and_shapes()
    if model.config.tie_word_embeddings:  # a trainer may send the tied head too: it is the embedding
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightMismatchError(f"weight names differ from the model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
    staged, nbytes, params = {}, 0, model.state_dict()
    for name, t in tensors.items():
        if t.shape != expected[name]:
            raise WeightMismatchError(f"{name}: shape {list(t.shape)}, the model has {list(expected[name])}")
        if not t.is_floating_point():
            raise WeightMismatchError(f"{name}: dtype {t.dtype} is not a floating-point type")
        # amax/amin propagate NaN and expose +-inf: two reductions, no boolean copy of t.
        if t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
            raise WeightMismatchError(f"{name}: contains NaN or Inf")
        staged[name] = t.to(device=device, dtype=params[name].dtype)
        nbytes += t.numel() * t.element_size()
    return StagedWeights(version, staged, nbytes)
