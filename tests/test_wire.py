"""Weight-push framing: chunks reassemble exactly; malformed streams are refused with a reason."""

import msgpack
import pytest
import torch

from rollout.v1 import rollout_pb2 as pb
from rollout.wire import WeightAssembler, weight_chunks


@pytest.fixture(params=["native", "python"])
def hashing(request, monkeypatch):
    """The assembler's copy, hash and finite check run natively (without the GIL) and through
    the numpy / xxhash fallback: the same answers."""
    from rollout import native
    if request.param == "python":
        monkeypatch.setattr(native, "_bytes_kernels", lambda: None)
    elif not native.available():
        pytest.skip("no native kernels on this machine (no C compiler, or xxhash without its C API)")


def tensors():
    return {"a": torch.randn(3, 700, dtype=torch.bfloat16), "b": torch.arange(10.0), "c": torch.zeros(0)}


def assemble(chunks):
    asm = WeightAssembler()
    for c in chunks:
        asm.add(c)
    return asm, asm.finish()


def test_chunks_round_trip_exactly_with_version_and_mode():
    src = tensors()
    asm, out = assemble(weight_chunks(src.items(), version=4, num_tensors=3, chunk_bytes=512, mode="keep"))
    assert asm.version == 4 and asm.mode == "keep"
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in src.items())


@pytest.mark.parametrize("mutate,match", [
    (lambda cs: cs.pop(1), r"chunk at offset \d+, expected 512"),
    (lambda cs: cs.__setitem__(0, pb.WeightChunk(metadata=cs[0].metadata, data=cs[0].data[:-1] + b"\x01")),
     "checksum mismatch"),
    (lambda cs: cs.__setitem__(0, pb.WeightChunk(metadata=b"\xc1", data=b"")), "msgpack"),
    (lambda cs: cs.append(cs[0]), "tensor a was sent twice"),
    (lambda cs: cs.__delitem__(slice(len(cs) - 1, None)), "announced 3 tensors, 2 arrived"),
])
def test_malformed_streams_are_refused(hashing, mutate, match):
    chunks = list(weight_chunks(tensors().items(), version=0, num_tensors=3, chunk_bytes=512))
    mutate(chunks)
    with pytest.raises(ValueError, match=match):
        assemble(chunks)


def test_first_chunk_must_announce_the_push():
    meta = msgpack.packb(dict(name="a", offset=0, nbytes=4, crc32=0, dtype="float32", shape=[1]))
    with pytest.raises(ValueError, match="first weight chunk must carry 'version'"):
        WeightAssembler().add(pb.WeightChunk(metadata=meta, data=b"\x00" * 4))


def test_a_tensor_longer_than_announced_is_refused():
    chunks = list(weight_chunks([("a", torch.ones(4))], version=0, num_tensors=1))
    chunks[0].data += b"\x00"
    with pytest.raises(ValueError, match="header says 16"):
        assemble(chunks)


def test_an_empty_push_is_refused():
    with pytest.raises(ValueError, match="weight push was empty"):
        WeightAssembler().finish()


@pytest.mark.parametrize("entry,match", [
    (["a", "float99", [2], 0], "tensor a: unknown dtype 'float99'"),
    (["a", "float32", [2, -1], 0], "tensor a: shape must be a list of ints >= 0"),
    (["a", "float32", [2], "x"], "checksum an int"),
])
def test_a_bad_broadcast_manifest_is_refused_before_anything_is_received(entry, match):
    meta = msgpack.packb(dict(transport="broadcast", version=0, mode="wait", tensors=[entry]))
    with pytest.raises(ValueError, match=match):
        WeightAssembler().broadcast_manifest(pb.WeightChunk(metadata=meta))


def test_a_broadcast_manifest_announces_its_size():
    meta = msgpack.packb(dict(transport="broadcast", version=3, mode="keep",
                              tensors=[["a", "bfloat16", [4, 5], 1], ["b", "float32", [3], 2]]))
    asm = WeightAssembler()
    assert len(asm.broadcast_manifest(pb.WeightChunk(metadata=meta))) == 2
    assert (asm.version, asm.mode, asm.num_tensors, asm.num_bytes) == (3, "keep", 2, 4 * 5 * 2 + 3 * 4)


def test_a_header_is_checked_against_the_model_before_its_buffer_is_allocated():
    """A first chunk announcing 1 GiB for a 32-float tensor is refused at once, not allocated."""
    expected = {"model.norm.weight": (32,)}
    for head, match in ((dict(name="model.norm.weight", dtype="float32", shape=[32], nbytes=1 << 30), "nbytes 1073741824"),
                        (dict(name="model.norm.weight", dtype="float32", shape=[1 << 28], nbytes=1 << 30), "shape"),
                        (dict(name="huge.weight", dtype="float32", shape=[1 << 28], nbytes=1 << 30), "not a weight")):
        meta = msgpack.packb(dict(head, offset=0, crc32=0, version=0, num_tensors=1))
        asm = WeightAssembler(expected)
        with pytest.raises(ValueError, match=match):
            asm.add(pb.WeightChunk(metadata=meta, data=b"\x00" * 4))
        assert asm._current is None  # nothing was allocated


def test_a_broadcast_manifest_must_name_the_models_tensors():
    meta = msgpack.packb(dict(transport="broadcast", version=0, tensors=[["model.norm.weight", "float32", [1 << 30], 0]]))
    with pytest.raises(ValueError, match="not a weight of the served model"):
        WeightAssembler({"model.norm.weight": (32,)}).broadcast_manifest(pb.WeightChunk(metadata=meta))


def test_tensor_checksum_sees_any_changed_byte_and_swaps_and_is_its_definition():
    from rollout.wire import tensor_checksum
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    base = tensor_checksum(t)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert tensor_checksum(t.to(dtype)) != base  # the bytes, not the values
    raw = t.clone().view(torch.uint8)
    for i in (0, 1, 1234, 3999):
        changed = raw.clone()
        changed[i] ^= 1
        assert tensor_checksum(changed.view(torch.float32)) != base
    swapped = t.clone()
    swapped[[3, 700]] = swapped[[700, 3]]
    assert tensor_checksum(swapped) != base
    gen = torch.Generator().manual_seed(1)
    for n in (0, 1, 65520, 65521, 65522, 130 * 65521 + 5):  # the column sums: whole rows, a tail, > 128 rows
        data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        direct = int((data.to(torch.int64) * (torch.arange(n) % 65521 + 1)).sum())
        assert tensor_checksum(data) == direct
    assert tensor_checksum(torch.tensor(2.5)) == tensor_checksum(torch.tensor([2.5]))


def test_frames_are_the_chunks_serialised_and_reassemble_exactly():
    from rollout.wire import weight_frames
    src = tensors()
    frames = list(weight_frames(src.items(), version=2, num_tensors=3, chunk_bytes=512, mode="abort"))
    assert frames == [c.SerializeToString() for c in weight_chunks(src.items(), 2, 3, 512, "abort")]
    asm, out = assemble(pb.WeightChunk.FromString(f) for f in frames)
    assert (asm.version, asm.mode) == (2, "abort")
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in src.items())


def test_chunks_of_older_clients_are_checked_with_crc32():
    import zlib
    data = torch.arange(4.0).numpy().tobytes()
    head = dict(name="a", offset=0, nbytes=16, dtype="float32", shape=[4], version=0, num_tensors=1)
    _, out = assemble([pb.WeightChunk(metadata=msgpack.packb(dict(head, crc32=zlib.crc32(data))), data=data)])
    assert torch.equal(out["a"], torch.arange(4.0))
    with pytest.raises(ValueError, match=r"checksum mismatch \(crc32\)"):
        assemble([pb.WeightChunk(metadata=msgpack.packb(dict(head, crc32=zlib.crc32(data) ^ 1)), data=data)])
    with pytest.raises(ValueError, match="needs a checksum"):
        assemble([pb.WeightChunk(metadata=msgpack.packb(head), data=data)])


def test_packed_tensors_round_trip_without_a_copy():
    from rollout.wire import pack_tensors, unpack_tensors
    src = tensors()
    packed = pack_tensors(src)
    out = unpack_tensors(packed)
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in src.items())
    assert out["a"].data_ptr() == packed["a"][2].ctypes.data  # a view of the stored bytes
    assert unpack_tensors({"t": src["b"]})["t"] is src["b"]


def test_bucket_layout_packs_consecutive_tensors_aligned_and_big_ones_alone():
    from rollout.service.weight_group import ALIGN, bucket_layout
    buckets = bucket_layout([10, 20, 300, 5, 0, 7], 128)
    assert [[i for i, _, _ in b.items] for b in buckets] == [[0, 1], [2], [3, 4, 5]]
    assert all(off % ALIGN == 0 for b in buckets for _, off, _ in b.items)
    assert buckets[1].alone and buckets[0].size == ALIGN + 20
    assert [len(b.items) for b in bucket_layout([10, 20, 30], 0)] == [1, 1, 1]  # 0: every tensor alone


def test_the_servers_chunk_parser_reads_what_protobuf_reads_and_refuses_malformed_frames():
    from rollout.wire import parse_chunk, weight_frames
    src = tensors()
    frames = list(weight_frames(src.items(), version=1, num_tensors=3, chunk_bytes=512))
    for f in frames:
        raw, ref = parse_chunk(f), pb.WeightChunk.FromString(f)
        assert (bytes(raw.metadata), bytes(raw.data)) == (ref.metadata, ref.data)
    _, out = assemble(parse_chunk(f) for f in frames)
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in src.items())
    odd = pb.WeightChunk(metadata=b"m", data=b"d").SerializeToString() + b"\x18\x05"  # an unknown varint field
    assert bytes(parse_chunk(odd).data) == b"d"
    for bad in (frames[0][:-1], b"\x0a\xff", b"\x0b", b"\x0a" + b"\xff" * 11):
        with pytest.raises(ValueError, match="weight chunk"):
            parse_chunk(bad)


def test_sampling_params_round_trip_through_the_proto_and_seed_stable_defaults_to_true():
    from rollout import SamplingParams
    from rollout.wire import params_from_proto, params_to_proto

    for params in (SamplingParams(seed=3, top_k=5, min_p=0.25, logprobs=2),  # float32 fields: exact values
                   SamplingParams(sampler="ar", temperature=0.5, seed_stable=False)):
        assert params_from_proto(params_to_proto(params)) == params
    assert params_from_proto(pb.SamplingParams(max_tokens=8)).seed_stable is True  # an older client's request


def test_the_assembler_checks_finite_values_as_it_copies_and_reuses_kept_buffers(hashing):
    """Each chunk is copied, hashed and finite-checked piece by piece: a NaN in the second chunk
    of a tensor is refused naming it; a clean push marks every tensor checked, and the next push
    assembles into the buffers the last one kept (no fresh allocation)."""
    big = torch.randn(3 << 18).to(torch.bfloat16)  # 1.5 MiB: two chunks of 1 MiB
    small = torch.randn(10, 4)
    bad = big.clone()
    bad[(1 << 19) + 5] = float("nan")

    def assemble(tensors, buffers=None):
        asm = WeightAssembler(buffers=buffers)
        for chunk in weight_chunks(tensors.items(), 1, len(tensors), chunk_bytes=1 << 20):
            asm.add(chunk)
        return asm, asm.finish()

    with pytest.raises(ValueError, match="big: contains NaN or Inf"):
        assemble({"big": bad, "small": small})
    asm, out = assemble({"big": big, "small": small})
    assert torch.equal(out["big"], big) and torch.equal(out["small"], small)
    assert asm.finite_checked == {"big", "small"}
    kept = asm.kept_buffers()
    assert set(kept) == {"big"}  # "small" was one chunk: its bytes as received, no buffer
    again, out = assemble({"big": big * 2, "small": small}, dict(kept))
    assert torch.equal(out["big"], big * 2)
    assert again.kept_buffers()["big"] is kept["big"]
