"""A standalone torch.distributed group between a trainer (rank 0) and the replicas, and the
bucketed, pipelined broadcast of a push over it.

Built from a TCPStore and a ProcessGroupGloo / ProcessGroupNCCL object rather than
`init_process_group`, so it neither needs nor disturbs the trainer's own default group (its
DDP / FSDP world). The timeout bounds the rendezvous and every collective.

Design decisions:
- Tensors travel in buckets of about `bucket_bytes` (`bucket_layout`: consecutive tensors packed
  into one flat byte buffer, each at an offset aligned for any dtype; a tensor at least that large
  is a bucket alone and is sent as itself). One collective per bucket instead of per tensor: a
  0.5B model has 290 tensors, and each collective costs a round trip.
- Pipelined: both sides launch the broadcast of bucket k + 1 before handling bucket k (the
  trainer packs it into one of two rotating buffers, a replica checks bucket k), so packing and
  checking overlap the transfer. A replica receives every bucket straight into its place in one
  flat staging buffer (the tensors are views of it): no unpacking copy, and on the CPU the
  buffer is kept from push to push (fresh pages cost more than the copy here). The same code
  runs gloo (CPU) and NCCL / RCCL (GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

ALIGN = 64  # bucket offsets: a multiple of every dtype's size, and of a cache line


def make_weight_group(address: str, port: int, world_size: int, rank: int, backend: str, timeout: float):
    """Rank 0 hosts the store at address:port; the others connect to it. Blocks until all joined."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    wait = timedelta(seconds=timeout)
    store = dist.TCPStore(address, port, world_size, rank == 0, timeout=wait)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, wait)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = wait
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def broadcast_async(group, tensor: torch.Tensor, timeout: float):
    """Starts an in-place broadcast of `tensor` from rank 0 of `group`; returns its work handle."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.timeout = timedelta(seconds=timeout)
    return group.broadcast([tensor], opts)


def broadcast(group, tensor: torch.Tensor, timeout: float) -> None:
    """In-place broadcast of `tensor` from rank 0 of `group`."""
    broadcast_async(group, tensor, timeout).wait()


@dataclass(frozen=True)
class Bucket:
    size: int                                  # bytes of the flat buffer
    items: tuple[tuple[int, int, int], ...]    # (tensor index, byte offset, nbytes)

    @property
    def alone(self) -> bool:
        """A single tensor, sent as itself (no packing)."""
        return len(self.items) == 1


def bucket_layout(sizes: Sequence[int], bucket_bytes: int) -> list[Bucket]:
    """Consecutive tensors (their byte sizes, in push order) grouped into buckets of at most
    `bucket_bytes` (0: every tensor alone). Trainer and replicas compute it from the manifest."""
    buckets, items, offset = [], [], 0
    for i, nbytes in enumerate(sizes):
        start = math.ceil(offset / ALIGN) * ALIGN
        if items and start + nbytes > bucket_bytes:
            buckets.append(Bucket(offset, tuple(items)))
            items, start = [], 0
        items.append((i, start, nbytes))
        offset = start + nbytes
    if items:
        buckets.append(Bucket(offset, tuple(items)))
    return buckets


def bucket_bases(buckets: list[Bucket]) -> tuple[list[int], int]:
    """Where each bucket lands in a receiver's flat staging buffer (aligned), and its size."""
    bases, offset = [], 0
    for b in buckets:
        offset = math.ceil(offset / ALIGN) * ALIGN
        bases.append(offset)
        offset += b.size
    return bases, offset


def staged_views(buckets: list[Bucket], staging: torch.Tensor, manifest_shapes: Sequence[tuple[torch.dtype, list[int]]]
                 ) -> list[torch.Tensor]:
    """The tensors of a push as views of the receiver's flat staging buffer (`receive_buckets`)."""
    bases, _ = bucket_bases(buckets)
    views: list = [None] * len(manifest_shapes)
    for b, base in zip(buckets, bases):
        for i, offset, nbytes in b.items:
            dtype, shape = manifest_shapes[i]
            views[i] = staging[base + offset:base + offset + nbytes].view(dtype).reshape(shape)
    return views


def pipelined_broadcast(group, buckets: list[Bucket], tensors: Sequence[torch.Tensor], device, timeout: float,
                        buffers: list[torch.Tensor] | None = None) -> None:
    """The sender's side (rank 0): broadcasts `tensors` bucket by bucket, packing bucket k + 1
    into one of two rotating flat buffers while bucket k travels. `buffers`: a list the caller
    keeps from push to push (filled here when empty or too small). A bucket of one tensor is
    sent as itself."""
    packed = max((b.size for b in buckets if not b.alone), default=0)
    buffers = [] if buffers is None else buffers
    if packed and (len(buffers) < 2 or buffers[0].numel() < packed or buffers[0].device.type != torch.device(device).type):
        buffers[:] = [torch.empty(packed, dtype=torch.uint8, device=device) for _ in range(2)]
    works: list = [None] * len(buckets)
    slot = 0

    def start(k: int) -> None:
        nonlocal slot
        bucket = buckets[k]
        if bucket.alone:
            works[k] = broadcast_async(group, tensors[bucket.items[0][0]], timeout)
            return
        flat = buffers[slot][:bucket.size]
        slot ^= 1
        for i, offset, nbytes in bucket.items:
            if flat.device.type == "cpu":  # numpy's memcpy: torch's copy_ opens a parallel region per tensor
                flat[offset:offset + nbytes].numpy()[:] = _bytes(tensors[i]).numpy()
            else:
                flat[offset:offset + nbytes].copy_(_bytes(tensors[i]))
        works[k] = broadcast_async(group, flat, timeout)

    # Bucket k + 1 is packed only once bucket k - 1 (which used the same buffer) is done.
    _one_ahead(len(buckets), start, works)


def receive_buckets(group, buckets: list[Bucket], staging: torch.Tensor, timeout: float,
                    after: Callable[[int], None] | None = None) -> None:
    """A receiver's side: every bucket lands straight in its place of the flat `staging` buffer
    (`bucket_bases`; the tensors are views of it, `staged_views`: nothing is unpacked), the next
    bucket in flight while `after(k)` checks bucket k."""
    bases, _ = bucket_bases(buckets)
    works: list = [None] * len(buckets)

    def start(k: int) -> None:
        works[k] = broadcast_async(group, staging[bases[k]:bases[k] + buckets[k].size], timeout)

    _one_ahead(len(buckets), start, works, after)


def _one_ahead(count: int, start: Callable[[int], None], works: list, after: Callable[[int], None] | None = None
               ) -> None:
    """Runs `count` buckets with the next one in flight: starts bucket k + 1 (`start` stores its
    work in `works`), waits for bucket k, then `after(k)`."""
    if count:
        start(0)
    for k in range(count):
        if k + 1 < count:
            start(k + 1)
        works[k].wait()
        works[k] = None
        if after is not None:
            after(k)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
