"""Small C kernels for the byte passes of a weight push, compiled once per machine, and XXH3
called without the GIL.

Design decisions:
- `compiled(name, source)`: a kernel is compiled with the system C compiler ($CC, else `cc`)
  into `~/.cache/rollout` (or $ROLLOUT_CACHE_DIR), named by the hash of its source, and loaded
  with ctypes. No compiler: None (logged once), and callers take their numpy / torch path,
  the same values, only slower.
- ctypes releases the GIL for the length of a call, so a push's checks and copies run on every
  core from a thread pool (`spread`); the xxhash package's Python API holds the GIL for each
  update, so two threads hashing took as long as one. XXH3 comes from the xxhash package's own
  extension, which exports the xxHash C API (XXH3_64bits_*): the same digest as
  `xxhash.xxh3_64`, no second copy of the library.
- One call per tensor (or received chunk): the kernel walks it by 64 KiB pieces,
  hashing each chunk and looking for an element whose exponent bits are all set (NaN or
  +-inf; `wire.FINITE_BITS`) while the chunk is in cache; a copying call (the trainer's write,
  the gRPC front end's reassembly) then copies the chunk from the cache with streaming stores
  (no read of the destination lines first; the copy goes to memory another pass reads later).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_THREADS = 4  # a push's passes run while its caller waits; more threads gain nothing over memory bandwidth


def compiled(name: str, source: str) -> ctypes.CDLL | None:
    """The shared library built from C `source`, compiled on first use (atomic: concurrent
    processes never load half a file); None where it cannot be (logged)."""
    root = Path(os.environ.get("ROLLOUT_CACHE_DIR", Path.home() / ".cache" / "rollout"))
    lib = root / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    try:
        if not lib.exists():
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                (Path(tmp) / f"{name}.c").write_text(source)
                subprocess.run([os.environ.get("CC", "cc"), "-O3", "-shared", "-fPIC", "-o", str(Path(tmp) / "k.so"),
                                str(Path(tmp) / f"{name}.c")], check=True, capture_output=True, timeout=120)
                os.replace(Path(tmp) / "k.so", lib)
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("no native %s kernel (%s): the numpy path is used", name, e)
        return None


BYTES_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
typedef int (*update_fn)(void *state, const void *data, size_t len);  /* XXH3_64bits_update */
/* 64 KiB pieces: the finite check's second read of a piece the hash just read comes from the
   L1/L2 cache. 1 GiB hashed and checked on one thread here: 0.154 s by 1 MiB pieces with SSE2,
   0.13 s by 64 KiB, 0.114 s by 64 KiB with AVX2 (below); the hash alone 0.097 s. */
#define CHUNK ((size_t)1 << 16)
/* GCC on x86-64: the finite check also built for AVX2, picked at load time where the CPU has it;
   the x86-64 baseline (SSE2) elsewhere. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif
/* Whether any element has all of `e`'s bits set (e = a float's exponent bits: NaN or +-inf);
   the compiler vectorises the OR of comparisons. */
#define NONFINITE(NAME, T)                                                                      \
  VECTOR_CLONES static int NAME(const T *p, size_t n, T e) {                                    \
    T bad = 0;                                                                                  \
    for (size_t i = 0; i < n; i++) bad |= (T)((p[i] & e) == e);                                 \
    return bad != 0;                                                                            \
  }
NONFINITE(nonfinite2, uint16_t)
NONFINITE(nonfinite4, uint32_t)
NONFINITE(nonfinite8, uint64_t)
static int nonfinite(const uint8_t *p, size_t n, int itemsize, uint64_t e) {
  switch (itemsize) {
    case 2: return nonfinite2((const uint16_t *)p, n / 2, (uint16_t)e);
    case 4: return nonfinite4((const uint32_t *)p, n / 4, (uint32_t)e);
    case 8: return nonfinite8((const uint64_t *)p, n / 8, e);
    default: return 0;
  }
}
/* memcpy with streaming stores for the 64-byte aligned lines of dst: a copy into memory that
   will not be read again soon (a segment, checked later by another process) skips reading every
   destination line first; 1.2x the speed of memcpy for a 1 GB copy by 1 MiB pieces here. */
static void copy_streaming(uint8_t *dst, const uint8_t *src, size_t n) {
#ifndef __SSE2__
  memcpy(dst, src, n);  /* another architecture: a plain copy */
#else
  size_t head = (64 - ((uintptr_t)dst & 63)) & 63;
  if (head > n) head = n;
  memcpy(dst, src, head);
  size_t i = head;
  for (; i + 64 <= n; i += 64) {
    __m128i a = _mm_loadu_si128((const __m128i *)(src + i)), b = _mm_loadu_si128((const __m128i *)(src + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32)), d = _mm_loadu_si128((const __m128i *)(src + i + 48));
    _mm_stream_si128((__m128i *)(dst + i), a); _mm_stream_si128((__m128i *)(dst + i + 16), b);
    _mm_stream_si128((__m128i *)(dst + i + 32), c); _mm_stream_si128((__m128i *)(dst + i + 48), d);
  }
  memcpy(dst + i, src + i, n - i);
#endif
}
/* Hashes n bytes of src into `state` and returns whether any element of `itemsize` bytes has all
   of `e`'s bits set (0 when itemsize is 0); with dst, also copies src into it. Each chunk is
   read once into the cache (hash, finite check), then copied from there with streaming stores.
   Callers pass runs of whole, aligned elements, and a src nothing writes during the call. */
int hash_nonfinite(const uint8_t *src, uint8_t *dst, size_t n, void *state, update_fn update, int itemsize,
                   uint64_t e) {
  int bad = 0;
  for (size_t s = 0; s < n; s += CHUNK) {
    size_t len = n - s < CHUNK ? n - s : CHUNK;
    update(state, src + s, len);
    if (itemsize) bad |= nonfinite(src + s, len, itemsize, e);
    if (dst) copy_streaming(dst + s, src + s, len);
  }
#ifdef __SSE2__
  if (dst) _mm_sfence();  /* the streamed lines visible before the caller hands the copy on */
#endif
  return bad;
}
"""

_P, _N = ctypes.c_void_p, ctypes.c_size_t


class _Bytes:
    """The kernels of BYTES_SOURCE and the xxhash extension's XXH3 state functions."""

    def __init__(self, lib: ctypes.CDLL, xxh: ctypes.CDLL):
        self.hash_nonfinite = lib.hash_nonfinite
        self.hash_nonfinite.argtypes = [_P, _P, _N, _P, _P, ctypes.c_int, ctypes.c_uint64]
        self.hash_nonfinite.restype = ctypes.c_int
        self.create, self.reset, self.digest, self.free = (xxh.XXH3_createState, xxh.XXH3_64bits_reset,
                                                           xxh.XXH3_64bits_digest, xxh.XXH3_freeState)
        self.create.argtypes, self.create.restype = [], _P
        self.reset.argtypes, self.reset.restype = [_P], ctypes.c_int
        self.digest.argtypes, self.digest.restype = [_P], ctypes.c_uint64
        self.free.argtypes, self.free.restype = [_P], ctypes.c_int
        # the dispatching update picks AVX2 / AVX-512 at run time where the extension has it
        self.update = ctypes.cast(getattr(xxh, "XXH3_64bits_update_dispatch", None) or xxh.XXH3_64bits_update,
                                  _P).value


@lru_cache(maxsize=1)
def _bytes_kernels() -> _Bytes | None:
    try:
        import xxhash._xxhash as ext
        xxh = ctypes.CDLL(ext.__file__)
        xxh.XXH3_64bits_update  # noqa: B018 - the exported C API, or AttributeError
    except (ImportError, OSError, AttributeError) as e:
        log.warning("no native XXH3 (%s): weight checks hash through the xxhash Python API", e)
        return None
    lib = compiled("bytes", BYTES_SOURCE)
    return None if lib is None else _Bytes(lib, xxh)


def available() -> bool:
    """Whether `Xxh3` can be used here (a C compiler, and the xxhash extension's C API)."""
    return _bytes_kernels() is not None


class Xxh3:
    """A streaming XXH3-64 (the digest of `xxhash.xxh3_64`) fed by the kernels without the GIL.
    Needs `available()`. Arrays are uint8 and contiguous."""

    def __init__(self):
        self._k = _bytes_kernels()
        self._state = self._k.create()
        if not self._state:
            raise MemoryError("XXH3_createState failed")
        self._k.reset(self._state)

    def update(self, data: np.ndarray, itemsize: int = 0, exponent: int = 0, into: np.ndarray | None = None) -> bool:
        """Hashes `data` (and copies it into `into`, chunk by chunk, when given; nothing may
        write `data` meanwhile); returns whether any of its `itemsize`-byte elements has every
        bit of `exponent` set (NaN or +-inf for a float's exponent bits, `wire.FINITE_BITS`;
        False when itemsize is 0), found in the same read."""
        data = np.ascontiguousarray(data)
        dst = None
        if into is not None:
            if into.size != data.size or not (into.flags.c_contiguous and into.flags.writeable):
                raise ValueError("`into` must be a writeable contiguous array of the data's size")
            dst = into.ctypes.data
        return bool(self._k.hash_nonfinite(data.ctypes.data, dst, data.size, self._state, self._k.update, itemsize,
                                           exponent))

    def intdigest(self) -> int:
        return int(self._k.digest(self._state))

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._k.free(self._state)
            self._state = None


def threads() -> int:
    """Threads for a push's passes: the cores this process may use, at most MAX_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_THREADS, cores))


def spread(jobs: list[Callable[[], object]], sizes: list[int]) -> list:
    """Runs `jobs` on `threads()` threads, the largest (by `sizes`) first, and returns their
    results in the jobs' order; the first exception is raised once all have ended. Jobs must
    spend their time in calls that release the GIL (the kernels here, torch copies)."""
    n = threads()
    if n < 2 or len(jobs) < 2:
        return [job() for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    with ThreadPoolExecutor(n, thread_name_prefix="push-pass") as pool:
        futures = {i: pool.submit(jobs[i]) for i in order}
    return [futures[i].result() for i in range(len(jobs))]
