"""Same-host weight pushes through shared memory: the trainer writes every tensor once into a
memfd, and each replica maps it, checks it and copies from it into its model at the commit.

Design decisions:
- A memfd (`os.memfd_create`), not a named /dev/shm file: it has no name to leak. It lives while
  the trainer holds it open or a replica maps it, so a trainer killed at any point leaves nothing
  behind once the replicas drop their mappings (a failed or aborted push discards them; after
  a commit a replica keeps its mapping for the next push from the same file, `KeptMapping`,
  and lets it go within about a second of the trainer closing the file or dying).
- Replicas open it through /proc/<trainer pid>/fd/<fd>, which needs the trainer's host and pid
  namespace: `host_id` names both, and a replica refuses a push made from another.
- Reused push after push (`SharedSegment.write`, same tensors in the same layout): fresh
  shared-memory pages cost more than the copy itself here (allocating and zeroing 1 GB took
  0.4 s, a copy into touched pages 0.1-0.3 s), so the trainer keeps its segment and mapping.
  A reused file cannot be sealed against writes; it is sealed against resizing (a replica's
  mapping can never fault on a truncated file, and a replica refuses a file that is not), and
  the ownership rule replaces the write seal: the trainer library is the only writer and writes
  only between pushes (after the previous push's RPC returned, i.e. every replica committed
  its copy or dropped its mapping); a push whose RPC failed abandons the segment (a replica may
  still be reading it) and the next push writes a new one.
- The gRPC front end uses the same segments (`ReceiveSegment`) when a replica runs on its node:
  it assembles, hashes and finite-checks the received chunks straight into its memfd, and the
  replicas there stage from it instead of from an object-store copy (Router.push_weights).
- Passes fused by cache-sized chunks (`FUSE_BYTES`): the trainer hashes each chunk it just
  copied into the segment; a replica hashes and finite-checks each chunk it reads. The commit
  then copies the segment into the model: per replica, one checking read and one copy, and the
  trainer one copy. Each pass runs tensor by tensor on every core (`native.spread`), the
  chunks in C without the GIL (`native.Xxh3`; the numpy / xxhash fallback without a compiler).
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import xxhash

from .. import native
from ..native import spread
from ..wire import FINITE_BITS, FiniteCheck, all_finite, bytes_tensor, dtype_name, parse_dtype, tensor_bytes
from .weights import WeightMismatchError

ALIGN = 64
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL  # the size is fixed; see the docstring
POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page in one call, not one fault per page
FUSE_BYTES = 1 << 20  # a chunk copied (or read) and hashed while it is in the L2 cache
KEPT_FILES = 2  # segment files a replica keeps mapped (KeptMapping): a trainer's and the gRPC front end's


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
    """The trainer's side: a memfd holding `tensors`, open until `close()` (use `with`), written
    again by `write` for the next push of the same layout (`fits`)."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]]):
        spans, self.size = layout(tensors)
        self.key = _layout_key(tensors)
        self.fd, self._map, self._bytes = _memfd(self.size)
        try:
            self._spans = spans
            self.entries: list[SharedEntry] = []
            self.write(tensors)
        except BaseException:
            self.close()
            raise

    def fits(self, tensors: list[tuple[str, torch.Tensor]]) -> bool:
        """The same names, dtypes and shapes in the same order: `write` can reuse this segment."""
        return self.fd >= 0 and _layout_key(tensors) == self.key

    def write(self, tensors: list[tuple[str, torch.Tensor]]) -> list[SharedEntry]:
        """Copies `tensors` (laid out as at creation) into the segment, hashing each chunk just
        written; returns (and keeps) the manifest entries. Only between pushes (module docstring)."""
        if not self.fits(tensors):
            raise ValueError("these tensors do not fit the segment's layout: make a new SharedSegment")
        spans = self._spans
        # tensors spread over the cores; each job takes its tensor's host bytes itself (a GPU
        # tensor's host copy lives only while its job runs)
        digests = spread([lambda t=t, o=offset, n=nbytes: _copy_and_hash(self._bytes[o:o + n], tensor_bytes(t))
                          for (_, t), (offset, nbytes) in zip(tensors, spans)], [n for _, n in spans])
        self.entries = [SharedEntry(name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes, digest)
                        for (name, t), (offset, nbytes), digest in zip(tensors, spans, digests)]
        return self.entries

    def close(self) -> None:
        if getattr(self, "fd", -1) < 0:
            return
        if getattr(self, "_bytes", None) is not None:
            self._bytes = None
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the mapping goes with it
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # A dropped WeightSync must not keep a model-sized file open until the process exits.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown (os already gone): the exit closes it
            pass

    def __enter__(self) -> SharedSegment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layout_key(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors)


def _memfd(size: int, populate: bool = True) -> tuple[int, mmap.mmap, np.ndarray]:
    """A new memfd of `size` bytes, sealed against resizing, mapped read-write: (fd, map, bytes).
    Without `populate`, only the pages written are ever allocated."""
    fd = os.memfd_create("rollout-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | (POPULATE if populate else 0),
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm, np.frombuffer(mm, dtype=np.uint8)


class ReceiveSegment(SharedSegment):
    """The gRPC front end's side: a memfd with one slot per weight of the served model, in the
    model's order, each `itemsize` bytes per element; the front end assembles received chunks
    straight into the slots (`slots`) and hands same-host replicas the segment instead of an
    object-store copy. Same ownership rule as the trainer's segment: written only between pushes
    (the router takes it back, or abandons it, once a push has ended; see Router.claim_segment)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], itemsize: int):
        self.itemsize = itemsize
        self.plan = [(name, math.prod(shape) * itemsize) for name, shape in shapes.items()]
        self.offsets, offset = {}, 0
        for name, nbytes in self.plan:
            offset = math.ceil(offset / ALIGN) * ALIGN
            self.offsets[name] = offset
            offset += nbytes
        self.slot_bytes = dict(self.plan)
        self.size, self.key, self.entries, self.used = max(offset, 1), None, [], 0
        self.finite = False  # whether the front end checked every value of what it holds
        # not populated: a tied head's slot stays unallocated when the trainer does not send it
        self.fd, self._map, self._bytes = _memfd(self.size, populate=False)

    def fits_plan(self, shapes: dict[str, tuple[int, ...]], itemsize: int) -> bool:
        return self.fd >= 0 and itemsize == self.itemsize and self.plan == [
            (name, math.prod(shape) * itemsize) for name, shape in shapes.items()]

    def fits(self, tensors) -> bool:
        return False  # filled by the front end's assembler, never by `write`

    def slots(self) -> dict[str, np.ndarray]:
        """Writable views of every tensor's slot, by name (the assembler's buffers)."""
        return {name: self._bytes[self.offsets[name]:self.offsets[name] + nbytes] for name, nbytes in self.plan}

    def manifest(self, tensors: dict[str, torch.Tensor], digests: dict[str, int]) -> bool:
        """Sets `entries` for `tensors` (assembled in their slots, checked against `digests`) and
        `used`, the bytes replicas map. False, and nothing set, unless every tensor is its slot
        and they fill the plan from its start without a gap (a mapping populates what it covers,
        holes included)."""
        base = self._bytes.ctypes.data
        for name, t in tensors.items():
            slot = self.offsets.get(name)
            if slot is None or t.data_ptr() != base + slot or t.numel() * t.element_size() != self.slot_bytes[name]:
                return False
        names = [name for name, _ in self.plan]
        if set(tensors) != set(names[:len(tensors)]):
            return False
        self.entries = [SharedEntry(name, dtype_name(t.dtype), tuple(t.shape), self.offsets[name],
                                    t.numel() * t.element_size(), digests[name]) for name, t in tensors.items()]
        self.used = max(e.offset + e.nbytes for e in self.entries)
        return True


def map_segment(pid: int, fd: int, size: int, trainer_host: str) -> np.ndarray:
    """The replica's side: the trainer's segment mapped read-only, as bytes."""
    f = _open_segment(pid, fd, size, trainer_host)
    try:
        return _map(f, size)
    finally:
        os.close(f)


def _open_segment(pid: int, fd: int, size: int, trainer_host: str) -> int:
    """A read-only descriptor of the trainer's segment, refused unless it is on this host, a
    memfd sealed against resizing and at least `size` bytes long."""
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
            raise SharedSegmentError(f"pid {pid} fd {fd} is not a memfd sealed against resizing: a mapping of it "
                                     "could fault when it shrinks")
        actual = os.fstat(f).st_size
        if actual < size:  # a longer file is fine: its size is sealed, and only `size` bytes are mapped
            raise SharedSegmentError(f"the segment holds {actual} bytes, the manifest says {size}")
    except BaseException:
        os.close(f)
        raise
    return f


def _map(f: int, size: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(f, size, flags=mmap.MAP_SHARED | POPULATE, prot=mmap.PROT_READ), dtype=np.uint8)


class KeptMapping:
    """A replica's read-only mappings of the segments it staged from, kept for the next push from
    the same file: mapping 1 GB (its page tables populated) and unmapping it took 0.04 and
    0.05-0.09 s here, a quarter of a same-host push. Up to `KEPT_FILES` files are kept (the
    trainer's segment and the gRPC front end's, when a trainer uses both), the least recently
    staged from let go first; a mapping let go is unmapped by the engine loop's next look (or
    later, once no staged view uses it), not on a push's path. The same file is the same
    (device, inode) behind /proc/<pid>/fd/<fd>: while mapped here it cannot be freed, so its
    inode cannot name another file. Between pushes the owner rewrites the file (the ownership
    rule); nothing here reads it then, only the next push's stage does. `drop_if_orphaned` (the engine loop, about once a second) lets a file go
    once its owner has closed it or died, so a segment outlives a crashed trainer by that second
    at most; a refused or discarded push drops them all at once."""

    def __init__(self):
        self._lock = threading.Lock()  # stages run on actor threads, the orphan check on the loop
        # (pid, fd, st_dev, st_ino) -> mapping, least recently staged from first
        self._files: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._retired: list[np.ndarray] = []  # let go, unmapped by the next drop_if_orphaned

    def map(self, pid: int, fd: int, size: int, trainer_host: str) -> np.ndarray:
        """`size` bytes of the segment at /proc/<pid>/fd/<fd>, checked as `map_segment` does."""
        with self._lock:
            f = _open_segment(pid, fd, size, trainer_host)
            try:
                st = os.fstat(f)
                key = (pid, fd, st.st_dev, st.st_ino)
                data = self._files.pop(key, None)
                if data is not None and data.size < size:
                    self._retired.append(data)
                    data = None
                if data is None:
                    data = _map(f, size)
            finally:
                os.close(f)
            self._files[key] = data  # the most recently staged from, last
            while len(self._files) > KEPT_FILES:
                self._retired.append(self._files.pop(next(iter(self._files))))
            return data[:size]

    @property
    def held(self) -> bool:
        return bool(self._files)

    def drop(self) -> None:
        """Lets every mapping go (each ends once no staged view uses it)."""
        with self._lock:
            self._files.clear()
            self._retired.clear()

    def drop_if_orphaned(self) -> bool:
        """Drops the mappings whose owner no longer holds the file at that descriptor (closed,
        abandoned after a failed push, or the process gone), and those let go. True when it
        dropped any. Never waits: a stage mapping a segment right now holds the lock (the engine
        loop looks again later)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            gone = [key for key in self._files if not _still_open(key)]
            for key in gone:
                del self._files[key]
            dropped = bool(gone or self._retired)
            self._retired.clear()
            return dropped
        finally:
            self._lock.release()


def _still_open(key: tuple[int, int, int, int]) -> bool:
    pid, fd, dev, ino = key
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def segment_tensors(data: np.ndarray, entries: list[SharedEntry]) -> dict[str, torch.Tensor]:
    """Tensors viewing the mapped segment (no copy); `check_segment` verifies them."""
    return {e.name: bytes_tensor(data[e.offset:e.offset + e.nbytes]).view(parse_dtype(e.dtype, e.name)).reshape(e.shape)
            for e in entries}


def _copy_and_hash(dst: np.ndarray, src: np.ndarray) -> int:
    """Copies `src` into `dst` and returns the XXH3-64 of the bytes, each chunk hashed and then
    copied while in cache: natively without the GIL, else numpy's memcpy (a torch copy_ of each chunk
    opened a parallel region, and on a busy machine every one of them waited for the slowest
    thread) and the xxhash Python API."""
    if native.available():
        digest = native.Xxh3()
        digest.update(src, into=dst)
        return digest.intdigest()
    digest = xxhash.xxh3_64()
    for start in range(0, src.size, FUSE_BYTES):
        part = dst[start:start + FUSE_BYTES]
        part[:] = src[start:start + FUSE_BYTES]
        digest.update(part)
    return digest.intdigest()


def digest_and_finite(t: torch.Tensor) -> tuple[int, bool]:
    """(XXH3-64 of a CPU tensor's bytes, whether its values are finite) in one read of each
    cache-sized chunk (natively without the GIL where it can)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    bits = FINITE_BITS.get(t.dtype)
    if native.available():
        digest = native.Xxh3()
        bad = digest.update(raw, *((t.element_size(), bits[2]) if bits else (0, 0)))
        return digest.intdigest(), not bad if bits else all_finite(t)
    finite = FiniteCheck(t.dtype) if bits else None
    digest = xxhash.xxh3_64()
    step = FUSE_BYTES - FUSE_BYTES % t.element_size()
    for start in range(0, raw.size, step):
        part = raw[start:start + step]
        digest.update(part)
        if finite is not None:
            finite.chunk(part)
    return digest.intdigest(), finite.ok if finite is not None else all_finite(t)


def check_segment(data: np.ndarray, entries: list[SharedEntry]) -> None:
    """Every tensor's XXH3-64 against the manifest and its values finite, in one read of each
    chunk, tensors spread over the cores; ValueError (WeightMismatchError for a non-finite
    value) naming the first bad tensor in the manifest's order."""
    tensors = list(segment_tensors(data, entries).values())
    results = spread([lambda t=t: digest_and_finite(t) for t in tensors], [e.nbytes for e in entries])
    for e, (digest, finite) in zip(entries, results):
        if digest != e.xxh3:
            raise ValueError(f"tensor {e.name}: checksum mismatch (xxh3) in the shared segment")
        if not finite:
            raise WeightMismatchError(f"{e.name}: contains NaN or Inf")


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



