"""The fast passes of a weight push: the finite check on a float's bits (`wire.all_finite`)
and the tiled transpose into input-major weights (`model.transpose.copy_weight`)."""

import pytest
import torch

from rollout.model import transpose
from rollout.model.transpose import copy_weight
from rollout.wire import FINITE_CHUNK_BYTES, all_finite

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_finds_every_nan_and_inf_and_passes_the_extreme_finite_values(dtype):
    n = FINITE_CHUNK_BYTES // dtype.itemsize * 2 + 7  # three chunks, the last one short
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    info = torch.finfo(dtype)
    x[:6] = torch.tensor([info.max, -info.max, info.tiny, -info.tiny, 0.0, -0.0], dtype=dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf"), -float("nan")):
        for where in (0, n // 2, n - 1):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
            assert not all_finite(y.reshape(1, -1).expand(2, -1).t())  # a non-contiguous view is checked too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int16])
@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (8, 8), (7, 13), (64, 64), (65, 129), (300, 17)])
def test_copy_weight_into_an_input_major_weight_equals_copy(dtype, shape):
    src = (torch.randn(shape) * 100).to(dtype)
    dst = torch.empty(shape[::-1], dtype=dtype).t()  # stored transposed, as lay_out(input_major=True) does
    copy_weight(dst, src)
    assert torch.equal(dst, src) and dst.stride() == (1, shape[0])
    packed = torch.full((shape[1], shape[0] + 5), 7, dtype=dtype)  # a block of a packed projection
    block = packed[:, 2:2 + shape[0]].t()
    copy_weight(block, src)
    assert torch.equal(block, src) and (packed[:, :2] == 7).all() and (packed[:, 2 + shape[0]:] == 7).all()
    plain = torch.empty(shape, dtype=dtype)
    copy_weight(plain, src)  # any other layout: Tensor.copy_
    assert torch.equal(plain, src)


def test_copy_weight_uses_the_native_kernel_on_x86_64(monkeypatch):
    """On x86-64 with a C compiler the input-major copy goes through the kernel (not copy_)."""
    if transpose._kernels() is None:
        pytest.skip("no native transpose on this machine (not x86-64, or no C compiler)")
    src, dst = torch.randn(40, 24).to(torch.bfloat16), torch.empty(24, 40, dtype=torch.bfloat16).t()

    def no_copy(self, other):
        raise AssertionError("Tensor.copy_ was used")
    monkeypatch.setattr(torch.Tensor, "copy_", no_copy)
    copy_weight(dst, src)
    monkeypatch.undo()
    assert torch.equal(dst, src)
