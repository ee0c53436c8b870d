"""Bucketed named weight updates, shared by the gRPC and HTTP front ends.

    begin(timeout) -> update id;  add(id, bucket) ... ;  commit(id, mode) -> one new version | abort(id)

Design decisions:
- The staged tensors of an open update live in the front end (CPU memory) until commit, which
  sends them to every replica as ONE partial push (`Router.push_weights(partial=True)`): a version
  is atomic however many buckets it took. Tensors never sent keep their served values.
- Every bucket is checked whole before any of it is kept: names (mapped to the model's, see
  `weights.canonical_name`), shapes, floating-point dtypes and finite values, and no tensor twice in
  one update. A refused bucket leaves the update as it was (the buckets before it stay staged; the
  caller may resend a corrected one, commit or abort).
- Header before data: the HTTP body is a safetensors blob whose JSON header (names, dtypes,
  shapes, byte ranges) is checked against the model before a tensor is built (`read_bucket`);
  gRPC buckets use the WeightChunk framing, whose headers WeightAssembler checks before allocating.
- Every update has a deadline (`timeout_seconds`, at most MAX_UPDATE_SECONDS): at the deadline it
  is aborted and its tensors freed; a later call on it names why it is gone. At most
  MAX_OPEN_UPDATES are open at once (each holds at most one copy of the model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors

from .router import QueueFullError, Router
from .weights import (SAFETENSORS_DTYPES, WeightMismatchError, canonical_name, check_swap_mode, check_tensor_header,
                      fold_tied_head, total_bytes, verify_tensor)

log = logging.getLogger(__name__)
MAX_OPEN_UPDATES = 2
MAX_UPDATE_SECONDS = 3600.0
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit


class UnknownUpdateError(ValueError):
    """The update id is not open (never begun, committed, aborted or expired)."""


@dataclass
class OpenUpdate:
    update_id: str
    deadline: float  # time.monotonic()
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_bytes: int = 0
    committing: bool = False
    timer: asyncio.TimerHandle | None = None


class WeightUpdates:
    def __init__(self, router: Router, expected: dict[str, tuple[int, ...]], tied: bool):
        self.router, self.expected, self.tied = router, expected, tied  # expected: HF names -> shapes
        self.max_bucket_bytes = total_bytes(expected) + MAX_SAFETENSORS_HEADER
        self.open: dict[str, OpenUpdate] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # id -> how it ended (for clear errors)

    def begin(self, timeout: float = 600.0) -> OpenUpdate:
        if not 0 < timeout <= MAX_UPDATE_SECONDS:
            raise ValueError(f"timeout_seconds must be in (0, {MAX_UPDATE_SECONDS:.0f}], got {timeout}")
        if len(self.open) >= MAX_OPEN_UPDATES:
            raise QueueFullError(f"{len(self.open)} weight updates are open ({', '.join(self.open)}), at most "
                                 f"{MAX_OPEN_UPDATES}: commit or abort one first")
        update = OpenUpdate(uuid.uuid4().hex, time.monotonic() + timeout)
        update.timer = asyncio.get_running_loop().call_later(timeout, self._expire, update.update_id)
        self.open[update.update_id] = update
        return update

    def canonical(self, name: str) -> str:
        return canonical_name(name, self.expected)

    def add(self, update_id: str, tensors: dict[str, torch.Tensor]) -> int:
        """Checks a bucket (canonical names) whole, then stages it. Returns the update's tensors so far."""
        update = self.get(update_id)
        for name, t in tensors.items():
            if name in update.tensors:
                raise WeightMismatchError(f"tensor {name} was already sent in update {update_id}")
            verify_tensor(name, t, self.expected)
        update.tensors.update({name: t.detach().to("cpu") for name, t in tensors.items()})
        update.num_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return len(update.tensors)

    async def commit(self, update_id: str, mode: str = "wait") -> tuple[int, int, int]:
        """One new version from the staged tensors. Returns (version, tensors, bytes). If the
        push fails the update stays open (retry the commit, or abort)."""
        check_swap_mode(mode)
        update = self.get(update_id)
        tensors = fold_tied_head(update.tensors, self.tied)
        if not tensors:
            raise ValueError(f"update {update_id} holds no tensor: push a bucket before commit")
        update.committing = True
        try:
            version = await self.router.push_weights(tensors, None, mode, partial=True)
        finally:
            update.committing = False
        staged = len(update.tensors)
        self._end(update, f"was committed as version {version}")
        return version, staged, update.num_bytes

    def abort(self, update_id: str) -> int:
        """Frees the staged tensors. Returns how many there were."""
        update = self.get(update_id)
        if update.committing:
            raise ValueError(f"update {update_id} is being committed; it cannot be aborted now")
        staged = len(update.tensors)
        self._end(update, "was aborted")
        return staged

    def get(self, update_id: str) -> OpenUpdate:
        update = self.open.get(update_id)
        if update is None:
            why = self._ended.get(update_id, "is not open (never begun)")
            raise UnknownUpdateError(f"weight update {update_id!r} {why}")
        if update.committing:
            raise ValueError(f"update {update_id} is being committed")
        return update

    def _expire(self, update_id: str) -> None:
        update = self.open.get(update_id)
        if update is None:
            return
        if update.committing:  # the commit's own timeouts bound it; look again shortly
            update.timer = asyncio.get_running_loop().call_later(1.0, self._expire, update_id)
            return
        log.warning("weight update %s expired with %d staged tensors; freed", update_id, len(update.tensors))
        self._end(update, "expired (its deadline passed) and its staged tensors were freed")

    def _end(self, update: OpenUpdate, how: str) -> None:
        if update.timer is not None:
            update.timer.cancel()
        self.open.pop(update.update_id, None)
        update.tensors = {}
        self._ended[update.update_id] = how
        while len(self._ended) > 256:
            self._ended.popitem(last=False)


def read_bucket(body: bytes, canonical, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A safetensors blob -> tensors under the model's names. The header (names, dtypes, shapes,
    byte ranges) is checked against the model and the blob's length before any tensor is built."""
    if len(body) < 8:
        raise ValueError(f"the body is {len(body)} bytes: not a safetensors blob (8-byte header length first)")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > min(MAX_SAFETENSORS_HEADER, len(body) - 8):
        raise ValueError(f"safetensors header length {header_len} exceeds the body ({len(body)} bytes) "
                         f"or {MAX_SAFETENSORS_HEADER} bytes")
    try:
        header = json.loads(body[8:8 + header_len])
    except ValueError as e:
        raise ValueError(f"safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise ValueError("the bucket holds no tensor")
    names, data_len = {}, len(body) - 8 - header_len
    for key, info in header.items():
        name = canonical(key)
        if name in names.values():
            raise WeightMismatchError(f"tensor {key!r} is {name}, which this bucket already holds")
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r}: header needs dtype, shape and data_offsets [begin, end]") from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise WeightMismatchError(f"{key}: dtype {dtype_name} is not a floating-point type "
                                      f"({', '.join(SAFETENSORS_DTYPES)})")
        check_tensor_header(name, shape, dtype, expected)
        size = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len
                and end - begin == size):
            raise ValueError(f"tensor {key!r}: data_offsets [{begin}, {end}] do not hold {size} bytes within the "
                             f"{data_len} data bytes")
        names[key] = name
    try:
        loaded = load_safetensors(body)
    except Exception as e:  # noqa: BLE001 - overlapping ranges and the like: the caller's error
        raise ValueError(f"the body is not a valid safetensors blob: {e}") from None
    return {names[k]: t for k, t in loaded.items()}
