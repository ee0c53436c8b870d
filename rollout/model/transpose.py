"""Copying a row-major tensor into an input-major weight (`layers.lay_out`) at memory speed.

A weight push ends with a copy of every new tensor into the model. On the CPU the engine keeps
its linear weights input-major (stored transposed), and PyTorch's `copy_` between the two
layouts moves one element at a time: 0.15-1.4 GB/s here against 5-10 GB/s for a plain copy,
0.15 GB/s for a Qwen2.5-0.5B embedding (1.8 s of a 1 GB push; `benchmarks/RESULTS.md`, "Weight
sync at memory speed, second pass"). `copy_weight` transposes 2- and 4-byte elements in 8x8 /
4x4 tiles held in SSE2 registers (x86-64's baseline, AMD's included) through a small C kernel,
compiled once per machine with the system C compiler into `~/.cache/rollout` (or
$ROLLOUT_CACHE_DIR) and loaded with ctypes. Elsewhere (no compiler, another architecture, other
dtypes or layouts) it is `Tensor.copy_`: the same values, only slower.
"""

from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

import torch

from ..native import compiled, spread

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <emmintrin.h>
#define LD(p) _mm_loadu_si128((const __m128i *)(p))
#define ST(p, v) _mm_storeu_si128((__m128i *)(p), (v))
/* A block of 128 source rows x 32 columns: 32 destination rows each written 256 contiguous
   bytes per block (few pages touched at a time: a tall embedding's destination rows lie 300 KB
   apart). 1.5x the speed of 64 x 64 blocks here. */
#define BLOCK_I 128
#define BLOCK_J 32
/* 8x8 tile of 2-byte elements: rows of s (stride ss) become rows of d (stride ds). */
static void tile2(const uint16_t *s, size_t ss, uint16_t *d, size_t ds) {
  __m128i r0 = LD(s), r1 = LD(s + ss), r2 = LD(s + 2 * ss), r3 = LD(s + 3 * ss);
  __m128i r4 = LD(s + 4 * ss), r5 = LD(s + 5 * ss), r6 = LD(s + 6 * ss), r7 = LD(s + 7 * ss);
  __m128i a0 = _mm_unpacklo_epi16(r0, r1), a1 = _mm_unpackhi_epi16(r0, r1);
  __m128i a2 = _mm_unpacklo_epi16(r2, r3), a3 = _mm_unpackhi_epi16(r2, r3);
  __m128i a4 = _mm_unpacklo_epi16(r4, r5), a5 = _mm_unpackhi_epi16(r4, r5);
  __m128i a6 = _mm_unpacklo_epi16(r6, r7), a7 = _mm_unpackhi_epi16(r6, r7);
  __m128i b0 = _mm_unpacklo_epi32(a0, a2), b1 = _mm_unpackhi_epi32(a0, a2);
  __m128i b2 = _mm_unpacklo_epi32(a1, a3), b3 = _mm_unpackhi_epi32(a1, a3);
  __m128i b4 = _mm_unpacklo_epi32(a4, a6), b5 = _mm_unpackhi_epi32(a4, a6);
  __m128i b6 = _mm_unpacklo_epi32(a5, a7), b7 = _mm_unpackhi_epi32(a5, a7);
  ST(d, _mm_unpacklo_epi64(b0, b4)); ST(d + ds, _mm_unpackhi_epi64(b0, b4));
  ST(d + 2 * ds, _mm_unpacklo_epi64(b1, b5)); ST(d + 3 * ds, _mm_unpackhi_epi64(b1, b5));
  ST(d + 4 * ds, _mm_unpacklo_epi64(b2, b6)); ST(d + 5 * ds, _mm_unpackhi_epi64(b2, b6));
  ST(d + 6 * ds, _mm_unpacklo_epi64(b3, b7)); ST(d + 7 * ds, _mm_unpackhi_epi64(b3, b7));
}
/* 4x4 tile of 4-byte elements. */
static void tile4(const uint32_t *s, size_t ss, uint32_t *d, size_t ds) {
  __m128i r0 = LD(s), r1 = LD(s + ss), r2 = LD(s + 2 * ss), r3 = LD(s + 3 * ss);
  __m128i a0 = _mm_unpacklo_epi32(r0, r1), a1 = _mm_unpackhi_epi32(r0, r1);
  __m128i a2 = _mm_unpacklo_epi32(r2, r3), a3 = _mm_unpackhi_epi32(r2, r3);
  ST(d, _mm_unpacklo_epi64(a0, a2)); ST(d + ds, _mm_unpackhi_epi64(a0, a2));
  ST(d + 2 * ds, _mm_unpacklo_epi64(a1, a3)); ST(d + 3 * ds, _mm_unpackhi_epi64(a1, a3));
}
#define TRANSPOSE(NAME, T, TILE, N)                                                          \
  void NAME(const T *src, T *dst, size_t rows, size_t cols, size_t ld) {                    \
    for (size_t i0 = 0; i0 < rows; i0 += BLOCK_I)                                           \
      for (size_t j0 = 0; j0 < cols; j0 += BLOCK_J) {                                       \
        size_t i1 = i0 + BLOCK_I < rows ? i0 + BLOCK_I : rows;                              \
        size_t j1 = j0 + BLOCK_J < cols ? j0 + BLOCK_J : cols;                              \
        size_t i = i0;                                                                      \
        for (; i + N <= i1; i += N) {                                                       \
          size_t j = j0;                                                                    \
          for (; j + N <= j1; j += N) TILE(src + i * cols + j, cols, dst + j * ld + i, ld);   \
          for (; j < j1; j++)                                                               \
            for (size_t k = i; k < i + N; k++) dst[j * ld + k] = src[k * cols + j];         \
        }                                                                                   \
        for (; i < i1; i++)                                                                 \
          for (size_t j = j0; j < j1; j++) dst[j * ld + i] = src[i * cols + j];             \
      }                                                                                     \
  }
TRANSPOSE(transpose2, uint16_t, tile2, 8)
TRANSPOSE(transpose4, uint32_t, tile4, 4)
"""


@lru_cache(maxsize=1)
def _kernels() -> dict[int, object] | None:
    """{itemsize: kernel}, compiled on first use; None where it cannot be (logged once)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    dll = compiled("transpose", SOURCE)
    if dll is None:
        return None
    kernels = {2: dll.transpose2, 4: dll.transpose4}
    for k in kernels.values():
        k.argtypes, k.restype = [ctypes.c_void_p] * 2 + [ctypes.c_size_t] * 3, None
    return kernels


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), with the native tiled transpose when `dst` is an input-major 2-D CPU
    weight (strides (1, ld), ld >= rows: a block of a packed projection too) and `src` a
    row-major one of the same 2- or 4-byte dtype."""
    if (dst.dim() == 2 and src.dtype == dst.dtype and dst.element_size() in (2, 4) and dst.device.type == "cpu"
            and src.device.type == "cpu" and dst.stride(0) == 1 and dst.stride(1) >= dst.shape[0] > 1
            and dst.shape[1] > 1 and src.shape == dst.shape and src.is_contiguous()
            and (kernels := _kernels()) is not None):
        kernels[dst.element_size()](src.data_ptr(), dst.data_ptr(), dst.shape[0], dst.shape[1], dst.stride(1))
        return
    dst.copy_(src)


SPLIT_BYTES = 32 << 20  # a larger pair is copied as row blocks, so that no core waits on one tall embedding


def copy_weights(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`copy_weight` of every (dst, src) pair, spread over the CPU's cores (`native.spread`: the
    kernel and `Tensor.copy_` release the GIL), largest first, a pair over SPLIT_BYTES in blocks
    of rows (a row block of an input-major weight is one too): the swap runs while generation is
    paused, so every core is free for it."""
    if not pairs or pairs[0][0].device.type != "cpu":
        for dst, src in pairs:
            copy_weight(dst, src)
        return
    jobs, sizes = [], []
    for dst, src in pairs:
        nbytes = src.numel() * src.element_size()
        rows = src.shape[0] if src.dim() == 2 and src.shape == dst.shape and nbytes > SPLIT_BYTES else 0
        step = max(1, rows * SPLIT_BYTES // nbytes) if rows else 0
        for start in range(0, rows, step) if rows else [None]:
            d, s = (dst, src) if start is None else (dst[start:start + step], src[start:start + step])
            jobs.append(lambda d=d, s=s: copy_weight(d, s))
            sizes.append(s.numel() * s.element_size())
    spread(jobs, sizes)
