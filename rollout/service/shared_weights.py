"""Same-host weight pushes through shared memory: the trainer writes every tensor once into a
sealed memfd, and each replica maps it and stages straight from it.

Design decisions:
- A memfd (`os.memfd_create`), not a named /dev/shm file: it has no name to leak. It lives while
  the trainer holds it open or a replica maps it, so a trainer killed at any point leaves nothing
  behind once the replicas drop their mappings (a failed or aborted push discards them; a
  committed one drops them after the copy into the model).
- Replicas open it through /proc/<trainer pid>/fd/<fd>, which needs the trainer's host and pid
  namespace: `host_id` names both, and a replica refuses a push made from another.
- Sealed before it is announced (F_SEAL_WRITE | SHRINK | GROW | SEAL): the bytes a replica
  verified are the bytes it commits, whatever the trainer does meanwhile; a replica refuses an
  unsealed file.
- One pass per replica over the bytes beyond verification: the staged tensors are views of the
  mapping, and the swap copies them into the model. Verification: the XXH3-64 of each tensor
  here, then names, shapes, dtypes and finite values as for every push (`weights.stage_weights`).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import xxhash

from ..wire import bytes_tensor, dtype_name, parse_dtype

ALIGN = 64
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page in one call, not one fault per page
WRITE_BYTES = 1 << 30  # per pwrite call


class SharedSegmentError(RuntimeError):
    """The trainer's segment cannot be mapped here (another host, a dead trainer, unsealed)."""


@lru_cache(maxsize=1)
def host_id() -> str:
    """"<boot id>/<pid namespace>": processes with equal ids can open each other's
    /proc/<pid>/fd/<fd>."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""  # not Linux: no shared-memory pushes


@dataclass(frozen=True)
class SharedEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    xxh3: int


def layout(tensors: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[int, int]], int]:
    """(offset, nbytes) of each tensor in a segment, offsets aligned to ALIGN; and its size."""
    spans, offset = [], 0
    for _, t in tensors:
        offset = math.ceil(offset / ALIGN) * ALIGN
        nbytes = t.numel() * t.element_size()
        spans.append((offset, nbytes))
        offset += nbytes
    return spans, max(offset, 1)


class SharedSegment:
    """The trainer's side: a sealed memfd holding `tensors`, open until `close()` (use `with`)."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]]):
        spans, self.size = layout(tensors)
        self.fd = os.memfd_create("rollout-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            self.entries = self._write(tensors, spans)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(self.fd)
            raise

    def _write(self, tensors, spans) -> list[SharedEntry]:
        """pwrite, not a mapping: a write fills fresh shared-memory pages without zeroing and
        mapping them first (twice as fast here)."""
        entries = []
        for (name, t), (offset, nbytes) in zip(tensors, spans):
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            entries.append(SharedEntry(name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes,
                                       xxhash.xxh3_64_intdigest(data)))
            view = memoryview(data)
            while view:  # pwrite may write less than asked
                n = os.pwrite(self.fd, view[:WRITE_BYTES], offset)
                view, offset = view[n:], offset + n
        return entries

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SharedSegment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_segment(pid: int, fd: int, size: int, trainer_host: str) -> np.ndarray:
    """The replica's side: the trainer's sealed segment mapped read-only, as bytes."""
    here = host_id()
    if not here or trainer_host != here:
        raise SharedSegmentError(f"a shared-memory push needs the trainer on this replica's host and pid "
                                 f"namespace (trainer {trainer_host!r}, replica {here!r}); use the grpc transport")
    try:
        f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SharedSegmentError(f"cannot open the trainer's segment (pid {pid}, fd {fd}): {e.strerror}; "
                                 "did the trainer exit?") from None
    try:
        try:
            seals = fcntl.fcntl(f, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            raise SharedSegmentError(f"pid {pid} fd {fd} is not a sealed memfd: its bytes could change after "
                                     "they were verified")
        actual = os.fstat(f).st_size
        if actual != size:
            raise SharedSegmentError(f"the segment holds {actual} bytes, the manifest says {size}")
        mm = mmap.mmap(f, size, flags=mmap.MAP_SHARED | POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(f)
    return np.frombuffer(mm, dtype=np.uint8)


def segment_tensors(data: np.ndarray, entries: list[SharedEntry]) -> dict[str, torch.Tensor]:
    """Tensors viewing the mapped segment (no copy); `check_digests` verifies them."""
    return {e.name: bytes_tensor(data[e.offset:e.offset + e.nbytes]).view(parse_dtype(e.dtype, e.name)).reshape(e.shape)
            for e in entries}


def check_digests(data: np.ndarray, entries: list[SharedEntry]) -> None:
    """Every tensor's XXH3-64 against the manifest; ValueError naming the first that differs."""
    for e in entries:
        if xxhash.xxh3_64_intdigest(data[e.offset:e.offset + e.nbytes]) != e.xxh3:
            raise ValueError(f"tensor {e.name}: checksum mismatch (xxh3) in the shared segment")


def check_entries(entries: list[SharedEntry], size: int) -> None:
    """Sizes before contents: every tensor inside the segment, aligned for its dtype, its byte
    count that of its shape and dtype."""
    for e in entries:
        itemsize = parse_dtype(e.dtype, e.name).itemsize
        if any(s < 0 for s in e.shape):
            raise ValueError(f"tensor {e.name}: shape {list(e.shape)} has a negative size")
        if e.nbytes != math.prod(e.shape) * itemsize:
            raise ValueError(f"tensor {e.name}: nbytes {e.nbytes}, but shape {list(e.shape)} of {e.dtype} is "
                             f"{math.prod(e.shape) * itemsize} bytes")
        if e.offset % itemsize or e.offset + e.nbytes > size:
            raise ValueError(f"tensor {e.name}: bytes [{e.offset}, {e.offset + e.nbytes}) are not an aligned range "
                             f"of the {size}-byte segment")



