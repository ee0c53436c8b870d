"""The weight-update lifecycle of a replica: stage (verify names, shapes, dtypes, finite values;
move to the device) -> commit (swap between engine steps, version + 1). Nothing the engine
serves changes before commit, and a commit swaps every tensor at once.

Design decisions:
- Names are the model's HF names. A trainer's wrapped names map to them when the mapping is
  unambiguous (`canonical_name`): DDP's `module.`, torch.compile's `_orig_mod.`, FSDP1's
  `_fsdp_wrapped_module.` and activation checkpointing's `_checkpoint_wrapped_module.` (anywhere
  in the path), a leading `model.` too many (`model.model.` -> `model.`) and PEFT's
  `base_model.model.`. Anything else is refused with the name in the message.
- A tied `lm_head.weight` is the embedding: alone it updates `model.embed_tokens.weight`; sent
  with the embedding it must equal it (`fold_tied_head`).
- A partial update (some tensors) keeps the served values of the others; the version is still
  atomic: every tensor of the update swaps in the same step boundary.
- Dtypes (`check_dtype`, policy "strict" by default): a tensor is taken in the served dtype, or
  wider (float32 to a bfloat16 replica: rounding to the served precision is what serving in
  bfloat16 means). A narrower or different 16-bit dtype (float16 to a float32 replica) is
  refused: the trainer rounded its weights, so the served policy would silently differ from
  the one it computed. Policy "cast" (`rollout serve --weight-dtype-policy cast`) takes any
  floating-point dtype. Resetting to the base weights casts as loading them did.
- From disk (`read_weights_from_disk`): a safetensors file, or a directory (with an HF shard
  index, or every *.safetensors in it). Names, shapes and dtypes are checked from the files'
  headers before any tensor is read, and the set must be complete (a checkpoint is a whole model).
  Only regular files are opened, and every read is bounded by the update's deadline, off the
  caller's thread (`weight_files.py`). MoE experts stored one tensor per expert (transformers'
  on-disk layout) are gathered into the model's fused 3-D tensors (`model.loader.expert_slot`);
  pushes send the fused tensors under their transformers 5 names (`mlp.experts.gate_up_proj`,
  `mlp.experts.down_proj`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from ..config import UnsupportedModelError
from ..model.decoder import Decoder
from ..model.loader import checkpoint_name, expert_slot, gather_experts, safetensors_files, slot_shape, slots_per_tensor
from ..wire import all_finite
from .weight_files import SAFETENSORS_DTYPES, WeightFileError, check_regular_file, off_thread, read_header, read_tensors

WEIGHT_SWAP_MODES = ("wait", "abort", "keep")
DTYPE_POLICIES = ("strict", "cast")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
WRAPPER_PREFIXES = ("module.", "base_model.model.", "model.")
TIED_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


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


def canonical_name(name: str, expected: dict[str, tuple[int, ...]]) -> str:
    """The model's name for a trainer's tensor name (see the module docstring); raises
    WeightMismatchError naming it when it is unknown or could be two weights."""
    if name in expected:
        return name
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    base = ".".join(parts)
    candidates = {base} if base in expected else set()
    stack = [base]
    while stack:  # strip leading wrapper prefixes in any order (e.g. module.model.model.x)
        n = stack.pop()
        for prefix in WRAPPER_PREFIXES:
            if n.startswith(prefix):
                stripped = n[len(prefix):]
                if stripped in expected:
                    candidates.add(stripped)
                stack.append(stripped)
    if len(candidates) == 1:
        return candidates.pop()
    if not candidates and (slot := expert_slot(name, expected)) is not None:
        raise WeightMismatchError(f"tensor {name!r} is one expert's weight: the served model holds each layer's "
                                  f"experts as one 3-D tensor ({slot[0]}, transformers 5's name); push that")
    if not candidates:
        raise WeightMismatchError(f"tensor {name!r} is not a weight of the served model (nor a wrapped name of "
                                  "one: module., _orig_mod., _fsdp_wrapped_module., model.model., "
                                  "base_model.model.; merge LoRA adapters before pushing)")
    raise WeightMismatchError(f"tensor {name!r} is ambiguous: it could be {sorted(candidates)}")


def check_tensor_header(name: str, shape: list[int] | tuple[int, ...], dtype: torch.dtype,
                        expected: dict[str, tuple[int, ...]]) -> None:
    """Shape and dtype of a (canonical) tensor against the model, before its data is read."""
    if tuple(shape) != tuple(expected[name]):
        raise WeightMismatchError(f"{name}: shape {list(shape)}, the model has {list(expected[name])}")
    if not dtype.is_floating_point:
        raise WeightMismatchError(f"{name}: dtype {dtype} is not a floating-point type")


def check_dtype_policy(policy: str) -> None:
    if policy not in DTYPE_POLICIES:
        raise ValueError(f"weight_dtype_policy must be one of {', '.join(DTYPE_POLICIES)}, got {policy!r}")


def check_dtype(name: str, dtype: torch.dtype, served: torch.dtype, policy: str = "strict") -> None:
    """The dtype policy of a push (module docstring): served or wider, unless policy "cast"."""
    check_dtype_policy(policy)
    if policy == "cast" or dtype == served:
        return
    if torch.finfo(dtype).bits > torch.finfo(served).bits and dtype in (torch.float32, torch.float64):
        return
    raise WeightMismatchError(
        f"{name}: pushed as {dtype}, the replica serves {served}: a narrower or different 16-bit dtype would "
        f"silently serve a policy other than the trainer's; send {served} or wider, or start the service with "
        "--weight-dtype-policy cast")


def verify_tensor(name: str, t: torch.Tensor, expected: dict[str, tuple[int, ...]], finite: bool = False) -> None:
    """Shape, dtype and finite values of one (canonical) tensor (`finite`: already checked, as
    the same-host path does while it checksums)."""
    check_tensor_header(name, t.shape, t.dtype, expected)
    if not finite and not all_finite(t):
        raise WeightMismatchError(f"{name}: contains NaN or Inf")


def fold_tied_head(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """With tied embeddings, lm_head.weight is the embedding: alone it stands for it, beside it
    it must be equal. Returns the tensors without lm_head.weight."""
    if not tied or TIED_HEAD not in tensors:
        return tensors
    tensors = dict(tensors)
    head = tensors.pop(TIED_HEAD)
    if EMBEDDING not in tensors:
        tensors[EMBEDDING] = head
    elif not torch.equal(head, tensors[EMBEDDING].to(head.dtype)):
        raise WeightMismatchError(f"{TIED_HEAD} differs from {EMBEDDING}, but the model ties them: "
                                  "send one of them, or equal values")
    return tensors


def stage_weights(model: Decoder, version: int, tensors: dict[str, torch.Tensor], device: str | torch.device,
                  partial: bool = False, dtype_policy: str = "strict", owned: bool = False,
                  finite: bool = False) -> StagedWeights:
    """Verifies a state dict (HF names) against the model and prepares it for commit. With
    `partial`, tensors left out keep their served values; otherwise every weight must be there.
    Dtypes follow `dtype_policy` (`check_dtype`). `owned`: nothing else can change `tensors`
    (received for this push, read-only views of the object store, or of a same-host segment,
    which its owner does not write during a push), so they are staged as they are rather than
    copied; on the CPU, where the parameter is laid out as the tensor is (not input-major), not
    even cast: the commit's copy casts as it copies (no model-sized allocation, one pass fewer).
    `finite`: the caller checked the values already."""
    expected = model.weight_names_and_shapes()
    tensors = fold_tied_head(tensors, model.config.tie_word_embeddings)
    missing = [] if partial else sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise WeightMismatchError(f"weight names differ from the model: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
    if not tensors:
        raise WeightMismatchError("the update holds no tensor")
    staged, nbytes, params = {}, 0, model.state_dict()
    for name, t in tensors.items():
        verify_tensor(name, t, expected, finite)
        check_dtype(name, t.dtype, params[name].dtype, dtype_policy)
        if owned and t.device.type == params[name].device.type == "cpu" and params[name].is_contiguous():
            staged[name] = t  # cast by the commit's copy (Tensor.copy_), if the dtypes differ
        else:
            staged[name] = t.to(device=device, dtype=params[name].dtype)
            if not owned and staged[name].untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                # .to() returned the caller's own tensor: an in-process caller editing it before the
                # commit would change what is served. Staging owns a copy.
                staged[name] = staged[name].clone()
        nbytes += t.numel() * t.element_size()
    return StagedWeights(version, staged, nbytes)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, the shards an HF index names, or
    every *.safetensors of a directory. WeightMismatchError naming the path otherwise (a path
    that is not a regular file or a directory, e.g. a FIFO, is refused without being opened)."""
    path = Path(path)
    if path.is_dir():
        try:
            files = safetensors_files(path)
        except UnsupportedModelError as e:  # the same reading as model loading, refused as a mismatch
            raise WeightMismatchError(str(e)) from None
    else:
        files = [path]
        if not path.exists():
            raise WeightMismatchError(f"weight path {path} does not exist (or is not readable) on this replica")
        if path.suffix != ".safetensors":
            raise WeightMismatchError(f"{path} is not a .safetensors file")
    for file in files:
        try:
            check_regular_file(file)
        except WeightFileError as e:
            raise WeightMismatchError(str(e)) from None
    return files


def read_weights_from_disk(path: str | Path, model: Decoder, timeout: float = 600.0) -> dict[str, torch.Tensor]:
    """A whole state dict from safetensors on disk (CPU tensors, canonical names): every header is
    checked against the model (names, shapes, dtypes, completeness) before a tensor is read.
    Regular files only; the reads run on a worker thread and every one is bounded by `timeout`
    seconds from now (TimeoutError naming the path), see weight_files.py."""
    deadline = time.monotonic() + timeout
    return off_thread(lambda stop: _read_checkpoint(path, model, deadline, stop), deadline,
                      f"reading weights from {path}")


def _read_checkpoint(path: str | Path, model: Decoder, deadline: float, stop) -> dict[str, torch.Tensor]:
    expected = dict(model.weight_names_and_shapes())
    tied = model.config.tie_word_embeddings
    if tied:
        expected[TIED_HEAD] = expected[EMBEDDING]
    found: dict[str, tuple[Path, str]] = {}
    experts: dict[str, dict[tuple, tuple[Path, str]]] = {}  # per-expert tensors of a fused one, by place
    wanted: dict[Path, dict[str, dict]] = {}
    for file in weight_files(path):
        try:
            entries = read_header(file, deadline, stop)
        except WeightFileError as e:
            raise WeightMismatchError(str(e)) from None
        except OSError as e:  # unreadable: name it
            raise WeightMismatchError(f"{file} is not a readable safetensors file: {e}") from None
        for key, entry in entries.items():
            slot = expert_slot(checkpoint_name(key), expected)  # one expert of a fused tensor
            if slot is not None:
                check_tensor_header(key, entry["shape"], entry["dtype"], {key: slot_shape(expected[slot[0]], slot[1])})
                experts.setdefault(slot[0], {})[slot[1]] = (file, key)
                wanted.setdefault(file, {})[key] = entry
                continue
            name = canonical_name(checkpoint_name(key), expected)
            if name in found:
                raise WeightMismatchError(f"{file}: tensor {key!r} is {name}, already in {found[name][0]}")
            check_tensor_header(name, entry["shape"], entry["dtype"], expected)
            found[name] = (file, key)
            wanted.setdefault(file, {})[key] = entry
    complete = {name: places for name, places in experts.items()
                if name not in found and len(places) == slots_per_tensor(name, expected[name])}
    missing = sorted(set(expected) - set(found) - set(complete) - ({TIED_HEAD} if tied else set()))
    if missing:
        raise WeightMismatchError(f"{path} lacks {len(missing)} weights of the model: {missing[:5]}")
    tensors: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[tuple, torch.Tensor]] = {}
    for file, entries in wanted.items():
        try:
            by_key = read_tensors(file, entries, deadline, stop)
        except WeightFileError as e:
            raise WeightMismatchError(str(e)) from None
        for name, (where, key) in found.items():
            if where == file:
                tensors[name] = by_key[key]
        for name, places in complete.items():
            pieces.setdefault(name, {}).update((place, by_key[key]) for place, (where, key) in places.items()
                                               if where == file)
    for name, parts in pieces.items():
        tensors[name] = gather_experts(name, expected[name], parts)
    return tensors


def total_bytes(expected: dict[str, tuple[int, ...]], itemsize: int = 8) -> int:
    """Bytes of every weight at `itemsize` bytes per element (float64 by default: the most any
    floating-point push of the model can carry)."""
    return sum(math.prod(s) for s in expected.values()) * itemsize
