"""A fused split-KV ("flash-decoding") Triton kernel for the prefix part of decode attention.

A decode step's T in-step queries of row b attend to the row's cached prefix: the keys/values
of cache slot `slots[b]` at positions < prefix_lens[b], with no other mask. This is the part the
"triton" attention path computes here (the in-step part and the log-sum-exp merge stay in
`attention.py`). Design:
- K/V are read straight from the cache tensors [num_slots + 1, Hkv, slot_len, D] by slot: no
  gather or copy of the prefix.
- GQA folded: the G = H // Hkv query heads sharing a KV head and the T in-step queries form
  G*T query rows against that one KV head, so each K/V block is loaded once per KV head (per
  block of BLOCK_M query rows when G*T is larger than one block).
- Split-KV: the key axis [0, prefix_max) is cut into `num_splits` chunks, each a separate
  program (grid: splits x B*Hkv x query-row blocks), so a few long rows still fill the device.
  Each program runs an online softmax over its chunk and stores its partial (unnormalised
  output, running max, running sum) in float32; a second small kernel combines the splits of a
  row by log-sum-exp and writes out [B, H, T, D] and lse [B, H, T] (natural log).
- Masking is by length only: a chunk's loop stops at min(chunk end, prefix_lens[b]), so
  programs whose chunk lies past a row's prefix do no work, and a row with an empty prefix gets
  lse = -inf and out = 0 (its weight in the merge is exp(-inf) = 0).
- Accumulation in float32; the softmax runs in base 2 (exp2, the scale times log2(e) folded
  into the scores). float32 inputs use IEEE dots (no TF32), bfloat16 inputs bf16 dots with
  float32 accumulation (under the CPU interpreter, whose bf16 `tl.dot` multiplies raw bit
  patterns, triton-lang/triton#11584, bf16 operands are upcast to float32 first). The output
  is float32: the merge with the in-step part happens in float32 anyway, so no intermediate
  rounding to the input dtype.
- Block sizes are constexpr; prefix lengths, split length and T are runtime arguments, so a
  new step shape does not recompile. The launch configuration (keys per block, warps, pipeline
  stages) is chosen per vendor and dtype by `kernel_config`, explicit so that the one an AMD
  GPU gets is tested under the interpreter: AMD (ROCm builds report `torch.version.hip`) runs
  one stage, as AMD's own Triton attention kernels do, and both vendors shrink the key block
  until the K/V tiles fit the device's shared memory (64 KiB of LDS per workgroup on CDNA).
  A warp is 64 lanes (a wavefront) on CDNA, 32 on NVIDIA: num_warps counts either, and no
  block size here assumes a lane count. D must be a power of two; a D under 16 (tl.dot's
  minimum, tiny test models) is padded to 16 by masked loads.
- Plain Triton only (no CUDA-specific intrinsics): the same code runs on ROCm, and on the CPU
  under TRITON_INTERPRET=1 (slow; tests only).
Triton is imported lazily: this module imports without it, and `triton_available` says whether
the kernel can run on a device. `prefix_attention_reference` is the dense PyTorch oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import torch

MAX_BLOCK_M = 64  # query rows (GQA group x in-step tokens) per program, at most
MIN_SPLIT_KEYS = 256  # a split covers at least this many keys (fewer splits for short prefixes)
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_n: int     # keys per inner-loop block (a power of two >= 16: tl.dot's minimum)
    num_warps: int   # warps (NVIDIA, 32 lanes) or wavefronts (AMD, 64 lanes) per program
    num_stages: int  # software-pipelining depth of the key loop (buffers of K/V in shared memory)


# Shared memory one program may use when the device does not say: Ampere / Ada consumer parts
# opt in to 99 KiB per block, CDNA (MI200 / MI300) has 64 KiB of LDS per workgroup.
SHARED_MEMORY = {"nvidia": 99 * 1024, "amd": 64 * 1024, "none": 99 * 1024}
STAGES = {"nvidia": 3, "amd": 1, "none": 3}  # 3: Triton's CUDA default, what this kernel always ran with


def gpu_vendor() -> str:
    """"amd" for a ROCm build of PyTorch (it reports its GPUs as device type "cuda"; only
    `torch.version.hip` tells), "nvidia" for a CUDA build, "none" for a CPU-only build."""
    if getattr(torch.version, "hip", None):
        return "amd"
    return "nvidia" if torch.version.cuda else "none"


def shared_memory_estimate(config: KernelConfig, block_m: int, block_d: int, dtype: torch.dtype) -> int:
    """Bytes of shared memory the split kernel's tiles take: num_stages buffers of a K and a V
    tile, the Q tile and P (float32 operands for float32 inputs: the kernel's IEEE dots)."""
    elem = 4 if dtype == torch.float32 else 2
    return (config.num_stages * 2 * config.block_n * block_d + block_m * block_d + block_m * config.block_n) * elem


def kernel_config(dtype: torch.dtype, head_dim: int, vendor: str | None = None,
                  shared_memory: int | None = None) -> KernelConfig:
    """The launch configuration for q of `dtype` and `head_dim`: the vendor's pipeline depth,
    4 warps, and the largest key block (64, 32, 16) whose tiles fit `shared_memory` bytes
    (default: the vendor's in SHARED_MEMORY). vendor None: this build's (`gpu_vendor`)."""
    vendor = vendor or gpu_vendor()
    limit = shared_memory or SHARED_MEMORY[vendor]
    block_d = max(16, head_dim)
    for block_n in (64, 32):
        config = KernelConfig(block_n, 4, STAGES[vendor])
        if shared_memory_estimate(config, MAX_BLOCK_M, block_d, dtype) <= limit:
            return config
    return KernelConfig(16, 4, STAGES[vendor])


def triton_available(device: torch.device | str) -> bool:
    """Whether `prefix_attention` can run on tensors of `device`: a CUDA / ROCm device with
    triton importable, or the CPU under TRITON_INTERPRET=1 with triton importable."""
    return triton_unavailable_reason(device) is None


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the kernel can run on `device`, otherwise why not (for error messages)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":  # ROCm builds of PyTorch report their GPUs as "cuda" too
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
            return None
        return "the device is the CPU and TRITON_INTERPRET=1 is not set"
    return f"triton kernels do not run on {device.type} devices"


def prefix_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                               slots: torch.Tensor, prefix_lens: torch.Tensor, prefix_max: int,
                               num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense PyTorch oracle of `prefix_attention` (gathers the prefix; num_splits is ignored).
    q [B, H, T, D]; cache_k, cache_v [S, Hkv, slot_len, D] -> (out [B, H, T, D] fp32,
    lse [B, H, T] fp32); rows with prefix_lens 0 give out 0 and lse -inf."""
    B, H, T, D = q.shape
    Hkv = cache_k.shape[1]
    G = H // Hkv
    kp = cache_k[slots, :, :prefix_max].float()  # [B, Hkv, Lp, D]
    vp = cache_v[slots, :, :prefix_max].float()
    qg = q.reshape(B, Hkv, G * T, D).float()
    scores = (qg @ kp.transpose(-1, -2)) * D ** -0.5  # [B, Hkv, G*T, Lp]
    within = torch.arange(prefix_max, device=q.device) < prefix_lens[:, None]  # [B, Lp]
    scores = scores.masked_fill(~within[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G*T]; -inf for empty rows
    probs = torch.where(torch.isfinite(lse)[..., None], (scores - lse[..., None]).exp(), 0.0)
    out = probs @ vp  # [B, Hkv, G*T, D]
    return out.view(B, H, T, D), lse.view(B, H, T)


def prefix_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
                     prefix_lens: torch.Tensor, prefix_max: int, num_splits: int | None = None,
                     config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, D] over each row's cached prefix: keys/values of cache slot
    slots[b] ([S, Hkv, slot_len, D] tensors, one layer) at positions < prefix_lens[b] <=
    prefix_max (a Python int). Returns (out [B, H, T, D] fp32, lse [B, H, T] fp32, natural
    log); rows with an empty prefix give out 0 and lse -inf. num_splits: chunks of the key axis
    (None: enough to fill the device). config: the launch configuration (None: `kernel_config`
    for this device)."""
    B, H, T, D = q.shape
    S, Hkv, slot_len, Dk = cache_k.shape
    if D < 1 or D & (D - 1):
        raise ValueError(f"prefix_attention needs a power-of-two head_dim, got {D}")
    if Dk != D or cache_v.shape != cache_k.shape or H % Hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, cache_k {tuple(cache_k.shape)}, "
                         f"cache_v {tuple(cache_v.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or cache_k.dtype != q.dtype \
            or cache_v.dtype != q.dtype:
        raise ValueError(f"q and the cache must share a float32 / bfloat16 / float16 dtype, got "
                         f"{q.dtype}, {cache_k.dtype}, {cache_v.dtype}")
    if not 0 <= prefix_max <= slot_len:
        raise ValueError(f"prefix_max {prefix_max} outside [0, {slot_len}]")
    G = H // Hkv
    out = torch.zeros(B, H, T, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
    if prefix_max == 0 or B == 0 or T == 0:
        return out, lse
    config = config or device_kernel_config(q.device, q.dtype, D)
    block_n = config.block_n
    rows = G * T
    block_m = min(max(16, _next_power_of_2(rows)), MAX_BLOCK_M)
    m_blocks = -(-rows // block_m)
    if num_splits is None:
        num_splits = _default_splits(q.device, B * Hkv * m_blocks, prefix_max)
    num_splits = max(1, min(num_splits, -(-prefix_max // block_n)))
    split_len = -(-prefix_max // num_splits)
    split_len = -(-split_len // block_n) * block_n  # whole key blocks per split
    num_splits = -(-prefix_max // split_len)
    m_pad, block_d = m_blocks * block_m, max(16, D)
    acc = torch.empty(B * Hkv, num_splits, m_pad, block_d, dtype=torch.float32, device=q.device)
    run_max = torch.empty(B * Hkv, num_splits, m_pad, dtype=torch.float32, device=q.device)
    run_sum = torch.empty_like(run_max)
    slots = slots.to(device=q.device, dtype=torch.int64)
    lens = prefix_lens.to(device=q.device, dtype=torch.int32)
    split_kernel, combine_kernel = _kernels()
    split_kernel[(num_splits, B * Hkv, m_blocks)](
        q, cache_k, cache_v, slots, lens, acc, run_max, run_sum,
        *q.stride(), *cache_k.stride(), *cache_v.stride(),
        T, rows, split_len, num_splits, m_pad, D ** -0.5 * math.log2(math.e),
        HKV=Hkv, G=G, D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        FP32_DOT=q.dtype == torch.float32 or q.device.type == "cpu",  # the interpreter: see the docstring
        num_warps=config.num_warps, num_stages=config.num_stages)
    combine_kernel[(B * Hkv, m_blocks)](
        acc, run_max, run_sum, out, lse, *out.stride(), *lse.stride(),
        T, rows, num_splits, m_pad, HKV=Hkv, G=G, D=D, BLOCK_D=block_d, BLOCK_M=block_m,
        num_warps=config.num_warps)
    return out, lse


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _default_splits(device: torch.device, programs: int, prefix_max: int) -> int:
    """Splits so that splits x programs is about twice the device's compute units, without
    cutting the prefix into chunks shorter than MIN_SPLIT_KEYS."""
    target = 2 * _compute_units(device)
    by_length = max(1, prefix_max // MIN_SPLIT_KEYS)
    return max(1, min(MAX_SPLITS, by_length, -(-target // programs)))


def device_kernel_config(device: torch.device, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """`kernel_config` for a device: this build's vendor, the device's shared memory per block
    where torch reports it."""
    return _cached_config(dtype, head_dim, gpu_vendor(), _shared_memory(device))


_cached_config = functools.cache(kernel_config)  # called per layer and step: decided once per shape


@functools.cache
def _shared_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None) or None


@functools.cache
def _compute_units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


@functools.cache
def _kernels():
    """The two Triton kernels, defined on first use (triton imported lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, K, V, Slots, Lens, Acc, RunMax, RunSum,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_ks, stride_kh, stride_kn, stride_kd,
                     stride_vs, stride_vh, stride_vn, stride_vd,
                     T, rows, split_len, num_splits, m_pad, qk_scale,
                     HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
        pid_split, pid_bh, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, kv_head = pid_bh // HKV, pid_bh % HKV
        slot = tl.load(Slots + b).to(tl.int64)
        length = tl.load(Lens + b)
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows: r = g * T + t
        d = tl.arange(0, BLOCK_D)  # BLOCK_D > D only for D < 16: the padding lanes load 0
        d_ok = d < D
        row_ok = r < rows
        head, t = kv_head * G + r // T, r % T
        q_ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt \
            + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            q = q.to(tl.float32)
        k_base = K + slot * stride_ks + kv_head.to(tl.int64) * stride_kh
        v_base = V + slot * stride_vs + kv_head.to(tl.int64) * stride_vh
        lo = pid_split * split_len
        hi = tl.minimum(lo + split_len, length)  # <= lo when the chunk lies past the prefix
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            key_ok = n < hi
            kv_ok = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_ok, other=0.0)
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_ok, other=0.0)
            if FP32_DOT:
                k, v = k.to(tl.float32), v.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(key_ok[None, :], s * qk_scale, float("-inf"))  # base-2 logits
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a key < hi
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if FP32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (pid_bh * num_splits + pid_split) * m_pad + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(Acc + part[:, None] * BLOCK_D + d[None, :], acc)
        tl.store(RunMax + part, m_i)
        tl.store(RunSum + part, l_i)

    @triton.jit
    def combine_kernel(Acc, RunMax, RunSum, Out, Lse,
                       stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
                       T, rows, num_splits, m_pad,
                       HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr):
        pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
        b, kv_head = pid_bh // HKV, pid_bh % HKV
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)  # BLOCK_D > D only for D < 16: the padding lanes load 0
        d_ok = d < D
        row_ok = r < rows
        base = pid_bh * num_splits * m_pad + r
        m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(0, num_splits):
            m_max = tl.maximum(m_max, tl.load(RunMax + base + s * m_pad))
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty rows: every weight is exp2(-inf) = 0
        l_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(0, num_splits):
            w = tl.exp2(tl.load(RunMax + base + s * m_pad) - m_ref)
            l_sum += w * tl.load(RunSum + base + s * m_pad)
            acc += w[:, None] * tl.load(Acc + (base + s * m_pad)[:, None] * BLOCK_D + d[None, :])
        nonempty = l_sum > 0
        out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
        lse = tl.where(nonempty, (m_ref + tl.log2(tl.where(nonempty, l_sum, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        head, t = kv_head * G + r // T, r % T
        o_ptrs = Out + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot \
            + d[None, :] * stride_od
        tl.store(o_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + b * stride_lb + head * stride_lh + t * stride_lt, lse, mask=row_ok)

    return split_kernel, combine_kernel
