"""Copying a row-major tensor into an input-major weight (`layers.lay_out`) at memory speed.

A weight push ends with a copy of every new tensor into the model. On the CPU the engine keeps
its linear weights input-major (stored transposed), and PyTorch's `copy_` between the two
layouts moves one element at a time: 0.15-1.4 GB/s here against 5-10 GB/s for a plain copy,
0.15 GB/s for a Qwen2.5-0.5B embedding (1.8 s of a 1 GB push; `benchmarks/RESULTS.md`, "Weight
sync at memory speed, second pass"). `copy_weight` transposes 2- and 4-byte elements in 8x8 /
4x4 tiles held in SSE2 registers (x86-64's baseline, AMD's included) through a small C kernel,
compiled once per machine with the system C compiler into `~/.cache/rollout` (or
$ROLLOUT_CACHE_DIR) and loaded with ctypes. Into 64-byte aligned destination rows (the usual
case) four tiles stacked in the source make whole cache lines of each destination row, written
with streaming stores: the copy then skips reading every destination line before writing it,
1.5-1.8x faster here (issue 27, sixth pass). Elsewhere (no compiler, another architecture,
other dtypes or layouts) it is `Tensor.copy_`: the same values, only slower.
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
#define SN(p, v) _mm_stream_si128((__m128i *)(p), (v))
/* A block of 128 source rows x 32 columns: 32 destination rows each written 256 contiguous
   bytes per block (few pages touched at a time: a tall embedding's destination rows lie 300 KB
   apart). 1.5x the speed of 64 x 64 blocks here. */
#define BLOCK_I 128
#define BLOCK_J 32
/* An 8x8 tile of 2-byte elements (rows of s, stride ss) transposed into registers: o[4 * r] is
   destination row r, so that four tiles stacked in the source (o, o + 1, o + 2, o + 3) fill four
   16-byte parts of each row (the whole-line kernel below); `tile2` stores one tile's rows.
   Always inlined: called through its array, `tile2` ran 1.4x slower (the array on the stack). */
static inline __attribute__((always_inline)) void tile2_regs(const uint16_t *s, size_t ss, __m128i *o) {
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
  o[0] = _mm_unpacklo_epi64(b0, b4); o[4] = _mm_unpackhi_epi64(b0, b4);
  o[8] = _mm_unpacklo_epi64(b1, b5); o[12] = _mm_unpackhi_epi64(b1, b5);
  o[16] = _mm_unpacklo_epi64(b2, b6); o[20] = _mm_unpackhi_epi64(b2, b6);
  o[24] = _mm_unpacklo_epi64(b3, b7); o[28] = _mm_unpackhi_epi64(b3, b7);
}
/* The same for a 4x4 tile of 4-byte elements. */
static inline __attribute__((always_inline)) void tile4_regs(const uint32_t *s, size_t ss, __m128i *o) {
  __m128i r0 = LD(s), r1 = LD(s + ss), r2 = LD(s + 2 * ss), r3 = LD(s + 3 * ss);
  __m128i a0 = _mm_unpacklo_epi32(r0, r1), a1 = _mm_unpackhi_epi32(r0, r1);
  __m128i a2 = _mm_unpacklo_epi32(r2, r3), a3 = _mm_unpackhi_epi32(r2, r3);
  o[0] = _mm_unpacklo_epi64(a0, a2); o[4] = _mm_unpackhi_epi64(a0, a2);
  o[8] = _mm_unpacklo_epi64(a1, a3); o[12] = _mm_unpackhi_epi64(a1, a3);
}
/* One tile's rows stored into rows of d (stride ds). */
static void tile2(const uint16_t *s, size_t ss, uint16_t *d, size_t ds) {
  __m128i o[29];
  tile2_regs(s, ss, o);
  for (int r = 0; r < 8; r++) ST(d + r * ds, o[4 * r]);
}
static void tile4(const uint32_t *s, size_t ss, uint32_t *d, size_t ds) {
  __m128i o[13];
  tile4_regs(s, ss, o);
  for (int r = 0; r < 4; r++) ST(d + r * ds, o[4 * r]);
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
/* Whole cache lines: four tiles stacked in the source (N = 64 bytes of elements: 32 rows of
   2-byte, 16 of 4-byte) give every destination row 64 contiguous bytes, written with
   non-temporal stores, which skip the read for ownership a 16-byte store into a line costs
   (1.6-1.8x the speed of the tiles above on this VM; 16-byte streaming stores into partial
   lines were 4x slower instead). Needs dst and every destination row 64-byte aligned (the
   caller checks). The rows past the last N go through the tiles, the last columns one by one. */
#define TRANSPOSE_LINES(NAME, T, REGS, TILE_N, N, FALLBACK)                                   \
  void NAME(const T *src, T *dst, size_t rows, size_t cols, size_t ld) {                      \
    size_t rfull = rows / N * N, cfull = cols / TILE_N * TILE_N;                                \
    for (size_t i0 = 0; i0 < rfull; i0 += BLOCK_I)                                             \
      for (size_t j0 = 0; j0 < cfull; j0 += BLOCK_J) {                                         \
        size_t i1 = i0 + BLOCK_I < rfull ? i0 + BLOCK_I : rfull;                               \
        size_t j1 = j0 + BLOCK_J < cfull ? j0 + BLOCK_J : cfull;                               \
        for (size_t i = i0; i < i1; i += N)                                                    \
          for (size_t j = j0; j < j1; j += TILE_N) {                                           \
            __m128i o[4 * TILE_N];                                                             \
            for (int t = 0; t < 4; t++) REGS(src + (i + t * TILE_N) * cols + j, cols, o + t);  \
            for (int r = 0; r < TILE_N; r++)                                                   \
              for (int t = 0; t < 4; t++) SN(dst + (j + r) * ld + i + t * TILE_N, o[4 * r + t]); \
          }                                                                                    \
      }                                                                                        \
    for (size_t i = 0; i < rfull; i++)                                                         \
      for (size_t j = cfull; j < cols; j++) dst[j * ld + i] = src[i * cols + j];               \
    if (rfull < rows) FALLBACK(src + rfull * cols, dst + rfull, rows - rfull, cols, ld);       \
    _mm_sfence(); /* the streaming stores visible before the caller's next read */             \
  }
TRANSPOSE_LINES(transpose2_lines, uint16_t, tile2_regs, 8, 32, transpose2)
TRANSPOSE_LINES(transpose4_lines, uint32_t, tile4_regs, 4, 16, transpose4)
"""


@lru_cache(maxsize=1)
def _kernels() -> dict[int, object] | None:
    """{itemsize: tiled kernel}, compiled on first use; None where it cannot be (logged once)."""
    lib = _library()
    return None if lib is None else {2: lib.transpose2, 4: lib.transpose4}


@lru_cache(maxsize=1)
def _line_kernels() -> dict[int, object] | None:
    """{itemsize: whole-line kernel} (64-byte aligned destinations only), from the same library."""
    lib = _library()
    return None if lib is None else {2: lib.transpose2_lines, 4: lib.transpose4_lines}


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    dll = compiled("transpose", SOURCE)
    if dll is None:
        return None
    for k in (dll.transpose2, dll.transpose4, dll.transpose2_lines, dll.transpose4_lines):
        k.argtypes, k.restype = [ctypes.c_void_p] * 2 + [ctypes.c_size_t] * 3, None
    return dll


LINE = 64  # bytes: the whole-line kernel writes every destination row in aligned cache lines


def copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), with the native tiled transpose when `dst` is an input-major 2-D CPU
    weight (strides (1, ld), ld >= rows: a block of a packed projection too) and `src` a
    row-major one of the same 2- or 4-byte dtype; whole cache lines with streaming stores where
    `dst` and its row stride are 64-byte aligned (torch's CPU allocations, packed blocks of
    whole lines, the row blocks of `copy_weights`)."""
    size = dst.element_size()
    if (dst.dim() == 2 and src.dtype == dst.dtype and size in (2, 4) and dst.device.type == "cpu"
            and src.device.type == "cpu" and dst.stride(0) == 1 and dst.stride(1) >= dst.shape[0] > 1
            and dst.shape[1] > 1 and src.shape == dst.shape and src.is_contiguous()
            and (kernels := _kernels()) is not None):
        if dst.data_ptr() % LINE == 0 and dst.stride(1) * size % LINE == 0:
            kernels = _line_kernels()
        kernels[size](src.data_ptr(), dst.data_ptr(), dst.shape[0], dst.shape[1], dst.stride(1))
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
        # blocks of whole cache lines of the destination rows (64 bytes: 32 bf16 rows)
        step = max(1, rows * SPLIT_BYTES // nbytes // 32) * 32 if rows else 0
        for start in range(0, rows, step) if rows else [None]:
            d, s = (dst, src) if start is None else (dst[start:start + step], src[start:start + step])
            jobs.append(lambda d=d, s=s: copy_weight(d, s))
            sizes.append(s.numel() * s.element_size())
    spread(jobs, sizes)
