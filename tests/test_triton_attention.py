"""The split-KV Triton prefix kernel against its dense PyTorch oracle (lengths, GQA ratios, splits,
slot order, dtypes), the "triton" attention path against the dense path on decode steps, and
through the engine. Runs on a GPU, or on the CPU under Triton's interpreter (slow: tiny shapes),
which conftest.py turns on where there is no GPU."""

import os

import pytest
import torch

pytest.importorskip("triton")

from rollout import Engine, SamplingParams  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.model.triton_attention import (SHARED_MEMORY, KernelConfig, gpu_vendor,  # noqa: E402
                                            kernel_config, prefix_attention, prefix_attention_reference,
                                            shared_memory_estimate, triton_available,
                                            triton_unavailable_reason)

from conftest import PROMPTS  # noqa: E402
from test_attention import decode_step  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                reason="needs a CUDA / ROCm GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_cache(gen, slots, kv_heads, slot_len, D, dtype=torch.float32):
    k = torch.randn(slots + 1, kv_heads, slot_len, D, generator=gen)
    v = torch.randn(slots + 1, kv_heads, slot_len, D, generator=gen)
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def test_triton_is_available_where_the_tests_run():
    assert triton_available(DEVICE)


@pytest.mark.parametrize("heads,kv_heads,D", [(2, 2, 16), (4, 2, 16), (4, 1, 8)])  # D 8: padded to 16
@pytest.mark.parametrize("T", [1, 5])
def test_prefix_attention_equals_the_dense_oracle(heads, kv_heads, D, T):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads + T)
    cache_k, cache_v = random_cache(gen, 6, kv_heads, 200, D)
    # Empty, one key, the split edges at 64 (3 splits) and 128 (2 splits) and one key past them,
    # several blocks; slots out of order.
    prefix_lens = torch.tensor([0, 1, 64, 65, 128, 129, 190], device=DEVICE)
    slots = torch.tensor([3, 0, 2, 6, 4, 1, 5], device=DEVICE)
    q = torch.randn(7, heads, T, D, generator=gen).to(DEVICE)
    ref_out, ref_lse = prefix_attention_reference(q, cache_k, cache_v, slots, prefix_lens, 190)
    assert torch.isneginf(ref_lse[0]).all() and not ref_out[0].any()
    for num_splits in (None, 1, 2, 3):
        out, lse = prefix_attention(q, cache_k, cache_v, slots, prefix_lens, 190, num_splits)
        assert out.dtype == lse.dtype == torch.float32
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)  # -inf where the oracle's is


def test_prefix_attention_in_bfloat16_with_a_wider_head_and_more_query_rows_than_a_block():
    gen = torch.Generator().manual_seed(3)
    D, T = 32, 17  # G * T = 68 query rows: two row blocks of 64
    cache_k, cache_v = random_cache(gen, 3, 1, 160, D, torch.bfloat16)
    prefix_lens = torch.tensor([150, 0, 7], device=DEVICE)
    slots = torch.tensor([2, 1, 0], device=DEVICE)
    q = torch.randn(3, 4, T, D, generator=gen).to(DEVICE, torch.bfloat16)
    ref_out, ref_lse = prefix_attention_reference(q, cache_k, cache_v, slots, prefix_lens, 150)
    out, lse = prefix_attention(q, cache_k, cache_v, slots, prefix_lens, 150, num_splits=2)
    # bf16 dots of P @ V round the probabilities to bf16: a bf16-sized tolerance.
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


def test_prefix_attention_rejects_a_head_dim_that_is_not_a_power_of_two():
    q = torch.zeros(1, 2, 1, 24, device=DEVICE)
    cache = torch.zeros(2, 2, 8, 24, device=DEVICE)  # 24: a multiple of 8, not a power of two
    with pytest.raises(ValueError, match="power-of-two head_dim, got 24"):
        prefix_attention(q, cache, cache, torch.tensor([0], device=DEVICE), torch.tensor([3], device=DEVICE), 3)


@pytest.mark.skipif(not INTERPRET, reason="the layout helper of test_attention builds CPU tensors")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("levels", [(1, 3), ()])
def test_the_triton_path_equals_the_dense_oracle_on_decode_steps(heads, kv_heads, levels):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads + len(levels))
    prefix_lens = [0, 1, 64, 200]
    B = len(prefix_lens)
    run = decode_step(gen, heads, kv_heads, levels, prefix_lens)
    (dense, c_dense), (fused, c_fused) = run("dense"), run("triton")
    torch.testing.assert_close(fused, dense, atol=5e-6, rtol=1e-5)
    assert torch.equal(c_dense.k[:, :B], c_fused.k[:, :B]) and torch.equal(c_dense.v[:, :B], c_fused.v[:, :B])


def test_the_engine_samples_the_same_with_triton_attention(engine):
    fused = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", attention="triton", max_prefill_tokens=3))
    dense = Engine(engine.model, engine.tidar, config=EngineConfig(drafting="fixed", max_prefill_tokens=3))
    for sampler, temperature in (("lossless", 1.0), ("ar", 0.0)):
        params = SamplingParams(sampler=sampler, temperature=temperature, max_tokens=8, n=2, seed=4)
        a, b = fused.generate(PROMPTS, params), dense.generate(PROMPTS, params)
        for x, y in zip(sum(a, []), sum(b, [])):
            assert x.token_ids == y.token_ids
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-5


def test_the_engine_refuses_the_triton_path_where_triton_cannot_run(engine, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if engine.device.type != "cpu":
        pytest.skip("the engine runs on a GPU, where triton can run")
    with pytest.raises(RuntimeError, match="attention path 'triton'.*TRITON_INTERPRET"):
        Engine(engine.model, engine.tidar, config=EngineConfig(attention="triton"))


# ---------------------------------------------------------------- AMD (ROCm): what can be checked without one
@pytest.mark.parametrize("vendor", ["amd", "nvidia"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [8, 64, 128, 256])
def test_kernel_config_fits_the_vendors_shared_memory(vendor, dtype, D):
    config = kernel_config(dtype, D, vendor=vendor)
    assert config.block_n in (16, 32, 64) and config.num_warps == 4
    assert config.num_stages == (1 if vendor == "amd" else 3)
    if config.block_n > 16:  # the largest key block that fits
        assert shared_memory_estimate(config, 64, max(16, D), dtype) <= SHARED_MEMORY[vendor]
    if config.block_n < 64:
        bigger = KernelConfig(config.block_n * 2, config.num_warps, config.num_stages)
        assert shared_memory_estimate(bigger, 64, max(16, D), dtype) > SHARED_MEMORY[vendor]


def test_kernel_config_uses_what_the_device_reports():
    # An H100 opts in to 227 KiB per block: bf16 at head_dim 128 keeps the 64-key block it always
    # had; float32 K/V tiles at three stages would not fit it (the default 99 KiB fits 16 keys).
    h100 = 227 * 1024
    assert kernel_config(torch.bfloat16, 128, vendor="nvidia", shared_memory=h100).block_n == 64
    assert kernel_config(torch.float32, 128, vendor="nvidia", shared_memory=h100).block_n == 32
    assert kernel_config(torch.float32, 128, vendor="nvidia").block_n == 16


@pytest.mark.parametrize("dtype,D", [(torch.float32, 128), (torch.bfloat16, 128), (torch.float32, 64),
                                     (torch.float32, 16)])
def test_prefix_attention_with_the_configs_an_amd_gpu_gets(dtype, D):
    """The kernel at the key blocks and stages a ROCm build would launch (64, 16 and, below, 32
    keys per block), against the oracle: prefix lengths that end inside and across blocks."""
    config = kernel_config(dtype, D, vendor="amd")
    gen = torch.Generator().manual_seed(D)
    cache_k, cache_v = random_cache(gen, 3, 2, 100, D, dtype)
    prefix_lens = torch.tensor([97, 0, 33], device=DEVICE)
    slots = torch.tensor([1, 3, 0], device=DEVICE)
    q = torch.randn(3, 4, 3, D, generator=gen).to(DEVICE, dtype)
    ref_out, ref_lse = prefix_attention_reference(q, cache_k, cache_v, slots, prefix_lens, 97)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for cfg in (config, KernelConfig(32, 4, 1)):
        out, lse = prefix_attention(q, cache_k, cache_v, slots, prefix_lens, 97, num_splits=2, config=cfg)
        torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, ref_lse, atol=max(tol, 1e-3) if dtype != torch.float32 else tol, rtol=tol)


def test_a_hip_build_is_detected_and_gets_the_amd_config(monkeypatch):
    """A ROCm build of torch reports its GPUs as device type "cuda": only torch.version.hip
    tells the vendor. The triton path stays available on such a "cuda" device."""
    monkeypatch.setattr(torch.version, "hip", "6.4.43482-0f2d60242", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert gpu_vendor() == "amd"
    assert kernel_config(torch.bfloat16, 128) == kernel_config(torch.bfloat16, 128, vendor="amd")
    assert kernel_config(torch.bfloat16, 128).num_stages == 1
    assert triton_unavailable_reason("cuda") is None
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert gpu_vendor() == "nvidia" and kernel_config(torch.bfloat16, 128).num_stages == 3
    monkeypatch.setattr(torch.version, "cuda", None)
    assert gpu_vendor() == "none"
