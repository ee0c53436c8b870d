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
  trainer packs it, a replica unpacks and checks it), with two rotating buffers, so copying and
  checking overlap the transfer. The same code runs gloo (CPU) and NCCL / RCCL (GPU).
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


def pipelined_broadcast(group, buckets: list[Bucket], tensors: Sequence[torch.Tensor], device, timeout: float,
                        sender: bool, after: Callable[[int], None] | None = None) -> None:
    """Broadcasts `tensors` (the sender, rank 0, sends; the others receive into them) bucket by
    bucket, the next bucket in flight while the previous one is handled. `after(k)` runs once
    bucket k is done (a receiver's checks, while bucket k + 1 travels)."""
    packed = [b.size for b in buckets if not b.alone]
    buffers = [torch.empty(max(packed), dtype=torch.uint8, device=device) for _ in range(min(len(packed), 2))] \
        if packed else []
    slots: list = [None] * len(buckets)  # (work, flat buffer or None)

    def start(k: int, slot: int) -> None:
        bucket = buckets[k]
        if bucket.alone:
            flat = None
            work = broadcast_async(group, tensors[bucket.items[0][0]], timeout)
        else:
            flat = buffers[slot][:bucket.size]
            if sender:
                for i, offset, nbytes in bucket.items:
                    flat[offset:offset + nbytes].copy_(_bytes(tensors[i]))
            work = broadcast_async(group, flat, timeout)
        slots[k] = (work, flat)

    packed_seen = 0
    slot_of = []
    for b in buckets:  # packed buckets alternate between the two buffers
        slot_of.append(packed_seen % 2 if not b.alone else -1)
        packed_seen += not b.alone
    # Bucket k + 1 is launched before bucket k is waited for, never earlier: the buffer it
    # reuses last held bucket k - 1 or earlier, already sent and unpacked.
    if buckets:
        start(0, slot_of[0])
    for k, bucket in enumerate(buckets):
        if k + 1 < len(buckets):
            start(k + 1, slot_of[k + 1])  # its buffer's last bucket (k - 1 or earlier) is done
        work, flat = slots[k]
        work.wait()
        if not sender and flat is not None:
            for i, offset, nbytes in bucket.items:
                _bytes(tensors[i]).copy_(flat[offset:offset + nbytes])
        slots[k] = None
        if after is not None:
            after(k)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)
