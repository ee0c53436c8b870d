"""The grouped experts of an MoE layer on the CPU at a few rows per expert, near memory speed.

At decode, an expert gets a few rows (batch 64, top-8 of 128: ~4), so its GEMMs are weight
reads: torch's grouped kernel (`aten::_grouped_mm`, HF's too) read them at ~6 GB/s here and
its bf16 GEMMs at 1.6-4.6 GB/s, where a copy runs at 11.5 GB/s (`benchmarks/RESULTS.md`).
`expert_rows` streams each hit expert's gate_up and down weights once (fp32, or bf16 widened
to fp32 in registers; walked in chunks of 32 whole rows, contiguous memory) and multiplies all
of that expert's rows at once: register tiles of up to 4 rows x 64 output columns (16 AVX-512
accumulators), the SiLU gate applied between the two matrices while the expert's rows are in
cache, each result written to its assignment's row.

Design decisions:
- A small C kernel compiled once per machine with the system C compiler (`native.compiled`),
  its functions built for AVX-512F (`target` attribute) and called only where the CPU reports
  AVX-512F at run time. Elsewhere (no compiler, no AVX-512, another layout) callers keep
  torch's kernels: the same values within rounding.
- Weights input-major (each expert's [out, in] matrix the transpose of a contiguous [in, out]
  one, as the engine lays them out on the CPU): an input row of a weight is contiguous over the
  outputs, so a tile's 64 columns are four vector loads per input element.
- The assignments are sorted by expert inside the kernel (a counting sort: ids >= E, ZAYA's
  skip expert, get zero rows), so a call is one op and no host reads.
- Single-threaded, whatever torch's thread count: the weight reads are the cost, and one core
  streaming them beat torch's grouped kernel on two threads here (Qwen3-MoE shape, 64 tokens:
  4.7 ms per layer against 5.2 ms; `benchmarks/RESULTS.md`). Splitting the experts over threads
  on machines with many cores is not done.
- Accumulation in fp32 in input order, as a GEMM does; the SiLU uses a polynomial exp (the
  Cephes single-precision one, ~1 ulp), so results equal torch's within fp32 rounding.
"""

from __future__ import annotations

import ctypes
import platform
from functools import lru_cache

import torch

from ..native import compiled

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define AVX512 __attribute__((target("avx512f")))
#define PREFETCH 24
#define CHUNK 32
#define INLINE static inline __attribute__((always_inline, target("avx512f")))

int has_avx512f(void) { __builtin_cpu_init(); return __builtin_cpu_supports("avx512f"); }

/* 16 weights from an fp32 row, or a bf16 row widened (bf16 is the top half of an fp32). */
INLINE __m512 load_w(const void *w, int64_t i, int bf16) {
  if (!bf16) return _mm512_loadu_ps((const float *)w + i);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[r][j .. j+16*NV) (+)= sum_{h0 <= h < h1} x[r][h] * W[h][j ..] for the R rows x[0..R): one
   register tile, starting from zero at h0 = 0, else from what y holds (the earlier rows of W). */
INLINE void tile(const float *const *x, float *const *y, int R, int NV, int64_t h0, int64_t h1, const void *w,
                 int64_t ldw, int bf16, int64_t j) {
  __m512 acc[4][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = h0 ? _mm512_loadu_ps(y[r] + j + 16 * v) : _mm512_setzero_ps();
  for (int64_t h = h0; h < h1; h++) {
    __m512 wv[4];
    for (int v = 0; v < NV; v += 1 + bf16)
      _mm_prefetch((const char *)w + ((h + PREFETCH) * ldw + j + 16 * v) * (bf16 ? 2 : 4), _MM_HINT_T0);
    for (int v = 0; v < NV; v++) wv[v] = load_w(w, h * ldw + j + 16 * v, bf16);
    for (int r = 0; r < R; r++) {
      __m512 xb = _mm512_set1_ps(x[r][h]);
      for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(wv[v], xb, acc[r][v]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) _mm512_storeu_ps(y[r] + j + 16 * v, acc[r][v]);
}

/* One function per (tile width, weight dtype), each with its row counts unrolled: the hot loop
   then holds no branch on the dtype and keeps its accumulators in registers. */
#define TILES(NV, BF)                                                                          \
  AVX512 static void tiles##NV##_##BF(const float *const *x, float *const *y, int R, int64_t h0, int64_t h1, \
                                      const void *w, int64_t ldw, int64_t j) {                 \
    switch (R) {                                                                               \
      case 1: tile(x, y, 1, NV, h0, h1, w, ldw, BF, j); break;                                 \
      case 2: tile(x, y, 2, NV, h0, h1, w, ldw, BF, j); break;                                 \
      case 3: tile(x, y, 3, NV, h0, h1, w, ldw, BF, j); break;                                 \
      default: tile(x, y, 4, NV, h0, h1, w, ldw, BF, j); break;                                \
    }                                                                                          \
  }
TILES(4, 0)
TILES(1, 0)
TILES(4, 1)
TILES(1, 1)

/* y[r] = x[r] @ W for R rows: W [K, N] with row stride ldw (N a multiple of 16). W is walked in
   chunks of whole rows (CHUNK input elements: contiguous memory, which the hardware prefetches
   well; column strips alone read 256 of every 1024 bytes per row, 1.2x slower), every block of 4
   rows x 64 columns accumulating into y while the chunk is in L1. */
AVX512 static void gemm_rows(const float *const *x, float *const *y, int64_t R, int64_t K, int64_t N,
                             const void *w, int64_t ldw, int bf16) {
  for (int64_t h0 = 0; h0 < K; h0 += CHUNK) {
    int64_t h1 = h0 + CHUNK < K ? h0 + CHUNK : K;
    for (int64_t r = 0; r < R; r += 4) {
      int n = R - r < 4 ? (int)(R - r) : 4;
      for (int64_t j = 0; j < N;) {
        int wide = N - j >= 64;
        if (bf16) (wide ? tiles4_1 : tiles1_1)(x + r, y + r, n, h0, h1, w, ldw, j);
        else (wide ? tiles4_0 : tiles1_0)(x + r, y + r, n, h0, h1, w, ldw, j);
        j += wide ? 64 : 16;
      }
    }
  }
}

/* exp(x) as Cephes' expf: x = n ln2 + f, |f| <= ln2 / 2, a degree-6 polynomial in f, times 2^n. */
INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

/* For each assignment a (token a / k) with ids[a] < E: y[a] = down_e @ (silu(gate_e x) * up_e x);
   0 for ids >= E. gate_up: E experts of [H, 2I] (gate columns, then up) at stride gu_e, row stride
   gu_ld; down: E of [I, H] at stride dn_e, row stride dn_ld. H and I multiples of 16. Returns 0,
   or -1 when out of memory. */
AVX512 int expert_rows(const float *x, const int64_t *ids, int64_t A, int64_t k, int64_t H, int64_t I, int64_t E,
                       const void *gate_up, int64_t gu_e, int64_t gu_ld, const void *down, int64_t dn_e,
                       int64_t dn_ld, int bf16, float *y) {
  int64_t *start = calloc(E + 1, sizeof(int64_t)), *next = malloc((E + 1) * sizeof(int64_t));
  int64_t *order = malloc((A + 1) * sizeof(int64_t)), most = 0;
  if (!start || !next || !order) { free(start); free(next); free(order); return -1; }
  for (int64_t a = 0; a < A; a++) {
    if (ids[a] >= 0 && ids[a] < E) start[ids[a] + 1]++;
    else memset(y + a * H, 0, H * sizeof(float));
  }
  for (int64_t e = 0; e < E; e++) {
    most = start[e + 1] > most ? start[e + 1] : most;
    start[e + 1] += start[e];
  }
  memcpy(next, start, E * sizeof(int64_t));
  for (int64_t a = 0; a < A; a++)
    if (ids[a] >= 0 && ids[a] < E) order[next[ids[a]]++] = a;
  /* scratch for one expert's rows at a time: its gate_up outputs, then the gated activations */
  float *h = malloc((most + 1) * 2 * I * sizeof(float));
  const float **xr = malloc((most + 1) * sizeof(float *)), **hr = malloc((most + 1) * sizeof(float *));
  float **yr = malloc((most + 1) * sizeof(float *)), **hw = malloc((most + 1) * sizeof(float *));
  int ok = h && xr && hr && yr && hw;
  for (int64_t e = 0; ok && e < E; e++) {
    int64_t R = start[e + 1] - start[e];
    if (R == 0) continue;
    for (int64_t r = 0; r < R; r++) {
      int64_t a = order[start[e] + r];
      xr[r] = x + (a / k) * H;
      hw[r] = h + r * 2 * I;
      hr[r] = hw[r];
      yr[r] = y + a * H;
    }
    const char *gu = (const char *)gate_up + e * gu_e * (bf16 ? 2 : 4);
    const char *dn = (const char *)down + e * dn_e * (bf16 ? 2 : 4);
    gemm_rows(xr, hw, R, H, 2 * I, gu, gu_ld, bf16);
    for (int64_t r = 0; r < R; r++)  /* silu(gate) * up, written over the gate half */
      for (int64_t i = 0; i < I; i += 16) {
        __m512 g = _mm512_loadu_ps(hw[r] + i), u = _mm512_loadu_ps(hw[r] + I + i);
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(hw[r] + i, _mm512_mul_ps(s, u));
      }
    gemm_rows(hr, yr, R, I, H, dn, dn_ld, bf16);
  }
  free(start); free(next); free(order); free(h); free(xr); free(hr); free(yr); free(hw);
  return ok ? 0 : -1;
}
"""


@lru_cache(maxsize=1)
def _kernel():
    """The compiled `expert_rows`, or None where it cannot run here (logged once by `compiled`)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    dll = compiled("experts", SOURCE)
    if dll is None or not dll.has_avx512f():
        return None
    fn = dll.expert_rows
    fn.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] + [ctypes.c_int64] * 2
                   + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int, ctypes.c_void_p])
    fn.restype = ctypes.c_int
    return fn


def serves(x: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether `expert_rows` runs these: CPU tensors, fp32 or bf16 weights of the activations'
    dtype, laid out input-major, hidden and expert widths multiples of 16, no autograd, and a
    compiled kernel with AVX-512F."""
    E, H, I = down_proj.shape[0], down_proj.shape[1], down_proj.shape[2]
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and gate_up_proj.dtype in (torch.float32, torch.bfloat16) and x.dtype == gate_up_proj.dtype
            and down_proj.dtype == gate_up_proj.dtype and H % 16 == 0 and I % 16 == 0
            and gate_up_proj.shape == (E, 2 * I, H) and gate_up_proj.stride()[:2] == (2 * I * H, 1)
            and down_proj.stride()[:2] == (H * I, 1) and x.is_contiguous() and experts.dtype == torch.int64
            and _kernel() is not None)


def expert_rows(x: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
                ) -> torch.Tensor:
    """Each assignment's expert output [N*k, hidden] in fp32, row a = n*k + j for token n's j-th
    expert (zero where experts[n, j] >= E: a skip expert). Needs `serves`."""
    N, k = experts.shape
    E, H, I = down_proj.shape
    xf = x.float().contiguous()
    ids = experts.contiguous()
    y = torch.empty(N * k, H, dtype=torch.float32)
    if _kernel()(xf.data_ptr(), ids.data_ptr(), N * k, k, H, I, E, gate_up_proj.data_ptr(), gate_up_proj.stride(0),
                 gate_up_proj.stride(2), down_proj.data_ptr(), down_proj.stride(0), down_proj.stride(2),
                 int(gate_up_proj.dtype == torch.bfloat16), y.data_ptr()):
        raise MemoryError(f"expert_rows: no memory for {N * k} assignments")
    return y
