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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 8), (100, 37), (64, 200), (31, 9), (257, 3)])
def test_whole_line_transpose_into_aligned_rows_equals_copy(monkeypatch, dtype, shape):
    """Destination rows 64-byte aligned (a packed weight whose row stride is whole lines): the
    streaming-store kernel, its tails of rows and columns included, writes exactly the block."""
    if transpose._line_kernels() is None:
        pytest.skip("no native transpose on this machine (not x86-64, or no C compiler)")
    src = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 100).to(dtype)
    width = -(-(shape[0] + 40) // 32) * 32  # the row stride: whole lines, room around the block
    packed = torch.full((shape[1], width), 7, dtype=dtype)
    block = packed[:, :shape[0]].t()
    assert block.data_ptr() % 64 == 0
    monkeypatch.setattr(transpose, "_kernels", lambda: {2: None, 4: None})  # the tiled kernels would fail
    copy_weight(block, src)
    assert torch.equal(block, src) and (packed[:, shape[0]:] == 7).all()


@pytest.fixture(params=["native", "python"])
def hashing(request, monkeypatch):
    """Each check runs through the native kernels (without the GIL) and through the numpy /
    xxhash fallback a machine without a C compiler takes: the same answers."""
    from rollout import native
    if request.param == "python":
        monkeypatch.setattr(native, "_bytes_kernels", lambda: None)
    elif not native.available():
        pytest.skip("no native kernels on this machine (no C compiler, or xxhash without its C API)")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_digest_and_finite_is_xxh3_and_finds_every_nan_and_inf(hashing, dtype):
    import xxhash

    from rollout.service.shared_weights import digest_and_finite
    n = (1 << 20) // dtype.itemsize * 2 + 3  # past two 1 MiB chunks of the kernel, the last one short
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[:2] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max], dtype=dtype)
    assert digest_and_finite(x) == (xxhash.xxh3_64_intdigest(x.view(torch.uint8).numpy()), True)
    assert digest_and_finite(x[:0]) == (xxhash.xxh3_64_intdigest(b""), True)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, n // 2, n - 1):
            y = x.clone()
            y[where] = bad
            assert digest_and_finite(y) == (xxhash.xxh3_64_intdigest(y.view(torch.uint8).numpy()), False), (bad, where)


def test_a_shared_segment_is_written_hashed_and_checked_tensor_by_tensor(hashing):
    """The trainer's write (copy + XXH3-64 per tensor, spread over the cores) and the replica's
    check agree; a byte changed after the write is refused as a checksum mismatch naming its
    tensor, and a NaN written with a matching checksum as a non-finite value."""
    import os

    import xxhash

    from rollout.service.shared_weights import SharedSegment, check_segment, host_id, map_segment
    from rollout.service.weights import WeightMismatchError
    items = [("big", torch.randn(1200, 1000).to(torch.bfloat16)), ("odd", torch.randn(7)), ("none", torch.zeros(0)),
             ("half", torch.randn(33, 3).to(torch.float16))]
    with SharedSegment(items) as seg:
        data = map_segment(os.getpid(), seg.fd, seg.size, host_id())
        for e, (name, t) in zip(seg.entries, items):
            assert e.xxh3 == xxhash.xxh3_64_intdigest(t.view(torch.uint8).numpy()) and e.name == name
            assert data[e.offset:e.offset + e.nbytes].tobytes() == t.view(torch.uint8).numpy().tobytes()
        check_segment(data, seg.entries)
        big = seg.entries[0]
        seg._bytes[big.offset + 12345] ^= 1
        with pytest.raises(ValueError, match="tensor big: checksum mismatch"):
            check_segment(data, seg.entries)
        items[3][1][5, 1] = float("inf")
        seg.write(items)
        with pytest.raises(WeightMismatchError, match="half: contains NaN or Inf"):
            check_segment(data, seg.entries)
        del data


def test_copy_weights_in_row_blocks_equals_copy(monkeypatch):
    """A pair larger than SPLIT_BYTES is copied as blocks of rows on several threads (packed
    blocks and plain layouts too): the same values as copy_."""
    from rollout.model import transpose
    monkeypatch.setattr(transpose, "SPLIT_BYTES", 4096)
    monkeypatch.setattr("rollout.native.threads", lambda: 3)
    srcs = [torch.randn(301, 77).to(torch.bfloat16), torch.randn(90, 64), torch.randn(5000).to(torch.bfloat16),
            torch.randn(3, 2)]
    packed = torch.zeros(77, 301 + 9, dtype=torch.bfloat16)
    dsts = [packed[:, 4:305].t(), torch.empty(64, 90).t(), torch.empty(5000, dtype=torch.bfloat16), torch.empty(3, 2)]
    transpose.copy_weights(list(zip(dsts, srcs)))
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert (packed[:, :4] == 0).all() and (packed[:, 305:] == 0).all()
