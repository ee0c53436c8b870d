"""A standalone torch.distributed group between a trainer (rank 0) and the replicas.

Built from a TCPStore and a ProcessGroupGloo / ProcessGroupNCCL object rather than
`init_process_group`, so it neither needs nor disturbs the trainer's own default group (its
DDP / FSDP world). The timeout bounds the rendezvous and every collective.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


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


def broadcast(group, tensor: torch.Tensor, timeout: float) -> None:
    """In-place broadcast of `tensor` from rank 0 of `group`."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.timeout = timedelta(seconds=timeout)
    group.broadcast([tensor], opts).wait()
