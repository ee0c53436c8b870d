"""Conversions between the protobuf messages and the engine's Python objects.

Per-token arrays travel as raw little-endian bytes (int32 ids, float32 log-probs, int64
versions, uint8 draft flags). Weight pushes travel as chunks whose framing metadata is msgpack.
Both the service and the trainer bridge use these functions, so the format has one definition.

Weight bytes are checksummed with xxHash XXH3-64 (`tensor_digest`: native, one pass at memory
speed; zlib's crc32 was a quarter of that), except where tensors land on a GPU
(`tensor_checksum`, computed on the device). Pushes avoid Python-level copies of the payload:
`weight_frames` serialises a chunk with one copy of its bytes (protobuf's message object took
two), `WeightAssembler` writes each chunk once into an uninitialised buffer, and `pack_tensors`
hands the object store numpy byte arrays, which Ray stores with one copy and every replica maps
without another (a pickled torch tensor was copied at both ends).
"""

from __future__ import annotations

import hashlib
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator

import msgpack
import numpy as np
import torch
import xxhash

from . import native
from .params import Completion, SamplingParams
from .v1 import rollout_pb2 as pb

FINISH_REASONS = {"stop": pb.STOP, "length": pb.LENGTH, "abort": pb.ABORT, "error": pb.ERROR}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}
# Chunks below glibc's largest mmap threshold (32 MiB) reuse heap pages push after push; larger
# ones got fresh pages (a page fault each 4 KiB) on every receive. 2 MiB: a frame's copies (the
# trainer's framing, gRPC's own on both sides, the front end's assembly) stay in the cache and
# the stream's stages overlap finer; a 1 GB push to a serve process on this 2-core VM took
# 0.84 s in 2 MiB chunks against 0.89 (1 MiB), 0.89 (4 MiB), 0.92-1.05 (8 MiB) and 1.01 (16 MiB).
WEIGHT_CHUNK_BYTES = 2 << 20
MAX_TENSOR_BYTES = 64 << 30


def params_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Proto defaults -> SamplingParams; raises ValueError naming the field."""
    return SamplingParams(
        sampler=p.sampler or "lossless",
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_k=p.top_k,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        max_tokens=p.max_tokens,
        n=p.n or 1,
        seed=p.seed if p.HasField("seed") else None,
        mix_weight=p.mix_weight if p.HasField("mix_weight") else 0.5,
        stop_token_ids=tuple(p.stop_token_ids),
        min_p=p.min_p,
        logprobs=p.logprobs,
        seed_stable=p.seed_stable if p.HasField("seed_stable") else True,
    )


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(sampler=p.sampler, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                            max_tokens=p.max_tokens, n=p.n, mix_weight=p.mix_weight,
                            stop_token_ids=list(p.stop_token_ids), min_p=p.min_p, logprobs=p.logprobs,
                            seed_stable=p.seed_stable)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def completion_to_record(c: Completion) -> dict:
    """A Completion as plain data (what a replica sends through Ray): arrays as numpy."""
    return dict(prompt_index=c.prompt_index, sample_index=c.sample_index,
                token_ids=np.asarray(c.token_ids, dtype="<i4"),
                logprobs=np.asarray(c.logprobs, dtype="<f4"),
                behavior_logprobs=np.asarray(c.behavior_logprobs, dtype="<f4"),
                policy_versions=np.asarray(c.policy_versions, dtype="<i8"),
                from_draft=np.asarray(c.from_draft, dtype="u1"),
                finish_reason=str(c.finish_reason), num_forward_passes=c.num_forward_passes,
                top_token_ids=_matrix(c.top_token_ids, "<i4"), top_logprobs=_matrix(c.top_logprobs, "<f4"))


def _matrix(rows: list[list], dtype: str) -> np.ndarray:
    """[tokens x N] (N = the request's logprobs); [0 x 0] when none were asked for."""
    return np.asarray(rows, dtype=dtype) if rows else np.zeros((0, 0), dtype=dtype)


def record_to_trajectory(r: dict, group_id: str, replica: str, timings: dict) -> pb.Trajectory:
    n = len(r["token_ids"])
    return pb.Trajectory(
        prompt_index=r["prompt_index"], sample_index=r["sample_index"],
        token_ids=r["token_ids"].tobytes(), logprobs=r["logprobs"].tobytes(),
        behavior_logprobs=r["behavior_logprobs"].tobytes(), policy_versions=r["policy_versions"].tobytes(),
        from_draft=r["from_draft"].tobytes(), finish_reason=FINISH_REASONS[r["finish_reason"]],
        timings=pb.Timings(**timings), tokens_per_forward=n / max(r["num_forward_passes"], 1),
        num_forward_passes=r["num_forward_passes"], group_id=group_id, replica=replica,
        error=r.get("error", ""), **_top_fields(r))


def _top_fields(r: dict) -> dict:
    top = r.get("top_token_ids")
    if top is None or top.size == 0:
        return {}
    return dict(top_token_ids=top.tobytes(), top_logprobs=r["top_logprobs"].tobytes(),
                num_top_logprobs=top.shape[1])


def trajectory_arrays(t: pb.Trajectory) -> dict:
    """The per-token arrays of a Trajectory as numpy (the inverse of the byte packing)."""
    return dict(token_ids=np.frombuffer(t.token_ids, dtype="<i4"),
                logprobs=np.frombuffer(t.logprobs, dtype="<f4"),
                behavior_logprobs=np.frombuffer(t.behavior_logprobs, dtype="<f4"),
                policy_versions=np.frombuffer(t.policy_versions, dtype="<i8"),
                from_draft=np.frombuffer(t.from_draft, dtype="u1").astype(bool),
                top_token_ids=_from_matrix(t.top_token_ids, "<i4", t.num_top_logprobs),
                top_logprobs=_from_matrix(t.top_logprobs, "<f4", t.num_top_logprobs))


def _from_matrix(data: bytes, dtype: str, columns: int) -> np.ndarray:
    """The inverse of `_matrix`: [tokens x columns], or [0 x 0] when none were asked for."""
    return np.frombuffer(data, dtype=dtype).reshape(-1, columns) if columns else np.zeros((0, 0), dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object, tensor: str) -> torch.dtype:
    """A dtype name from the wire ("bfloat16", ...) -> torch.dtype; ValueError naming the tensor."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {tensor}: unknown dtype {name!r}")
    return dtype


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor as a uint8 array (CPU, contiguous; no copy when already so)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(tensor))


def tensor_digest(tensor: torch.Tensor) -> int:
    """XXH3-64 of a tensor's bytes (a GPU tensor is copied to the host for it: GPU pushes use
    `tensor_checksum`)."""
    return xxh3_digest(tensor_bytes(tensor))


def xxh3_digest(data: np.ndarray) -> int:
    """XXH3-64 of a uint8 array: natively without the GIL where it can (`native.Xxh3`: a sender's
    hashing and gRPC's own threads share the cores), else through the xxhash Python API."""
    if native.available():
        digest = native.Xxh3()
        digest.update(data)
        return digest.intdigest()
    return xxhash.xxh3_64_intdigest(data)


def checksum(kind: str, tensor: torch.Tensor) -> int:
    """The checksum a broadcast manifest names: "xxh3" (host tensors) or "wsum" (`tensor_checksum`,
    on the tensor's device)."""
    if kind == "xxh3":
        if tensor.device.type != "cpu":
            raise ValueError("checksum 'xxh3' is for host tensors; tensors on a GPU use 'wsum'")
        return tensor_digest(tensor)
    if kind == "wsum":
        return tensor_checksum(tensor)
    raise ValueError(f"checksum must be 'xxh3' or 'wsum', got {kind!r}")


def pack_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """Tensors as (dtype name, shape, uint8 bytes) for the object store: Ray stores numpy arrays
    with one copy and maps them read-only in every reader (no per-replica copy)."""
    return {name: (dtype_name(t.dtype), list(t.shape), tensor_bytes(t)) for name, t in tensors.items()}


def unpack_tensors(packed: dict) -> dict[str, torch.Tensor]:
    """The inverse of `pack_tensors`: tensors viewing the (read-only) arrays, no copy. Plain
    tensor values pass through unchanged."""
    out = {}
    for name, value in packed.items():
        if isinstance(value, torch.Tensor):
            out[name] = value
            continue
        dtype, shape, data = value
        out[name] = bytes_tensor(data).view(parse_dtype(dtype, name)).reshape(shape)
    return out


def bytes_tensor(data: np.ndarray) -> torch.Tensor:
    """A uint8 tensor viewing `data` (no copy), also when it is read-only (object-store arrays,
    read-only mappings: nothing writes through these views) or empty."""
    if data.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(data, dtype=np.uint8))


# A float is NaN or +-inf exactly when its exponent bits are all ones: with the sign bit masked
# off, its bit pattern read as an integer of the same width is at least the pattern of +inf.
# dtype -> (integer view, every bit but the sign, +inf)
FINITE_BITS = {torch.bfloat16: (np.int16, 0x7FFF, 0x7F80), torch.float16: (np.int16, 0x7FFF, 0x7C00),
               torch.float32: (np.int32, 0x7FFF_FFFF, 0x7F80_0000),
               torch.float64: (np.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}
FINITE_CHUNK_BYTES = 1 << 20  # the masked copy of a chunk stays in the L2 cache


class FiniteCheck:
    """Finite values by chunks of one CPU tensor's bytes (`chunk`, then `ok`): a mask and a max
    per chunk, into one reused buffer. numpy, on the calling thread: torch ops on 1 MiB pieces
    each opened a parallel region, and on a busy machine every one waited for the slowest
    thread (a 1 GB check took 12-18 s with 2 torch threads under load, 0.17 s so). 2-3x faster
    than torch.aminmax on bfloat16, and callers that already hold a chunk in cache (a
    checksum, a received piece) check it there."""

    def __init__(self, dtype: torch.dtype):
        self.view, self.mask, self.inf = FINITE_BITS[dtype]
        self.buf = np.empty(FINITE_CHUNK_BYTES // dtype.itemsize, dtype=self.view)
        self.itemsize = dtype.itemsize
        self.worst = 0

    def chunk(self, data: np.ndarray) -> None:
        """`data`: a run of the tensor's bytes (uint8, whole elements), any length."""
        bits = data.view(self.view)
        for start in range(0, bits.size, self.buf.size):
            part = bits[start:start + self.buf.size]
            out = self.buf[:part.size]
            np.bitwise_and(part, self.mask, out=out)
            self.worst = max(self.worst, int(out.max()))

    @property
    def ok(self) -> bool:
        return self.worst < self.inf


def all_finite(t: torch.Tensor) -> bool:
    if not t.numel():
        return True
    if t.device.type == "cpu" and t.dtype in FINITE_BITS:
        check = FiniteCheck(t.dtype)
        check.chunk(tensor_bytes(t))
        return check.ok
    # Elsewhere (a GPU, other dtypes) the extremes propagate NaN and expose +-inf: one reduction pass.
    return all(bool(torch.isfinite(x)) for x in torch.aminmax(t))


CHECKSUM_MODULUS = 65521


def tensor_checksum(tensor: torch.Tensor) -> int:
    """A position-weighted sum of a tensor's bytes, sum_i byte_i * (i mod 65521 + 1), computed on
    the tensor's own device: the broadcast path checks tensors where they land (a GPU tensor is
    never copied to the host for it). Products stay below 2^24, so the int64 sum is exact for any
    tensor under 2^39 bytes and the same on every device and in any reduction order; any single
    changed byte, and any swap of bytes not 65521 apart, changes it.

    A byte's weight depends only on its offset mod 65521, so the bytes are summed per column of a
    [rows, 65521] view first (128 rows at a time, in int16) and the 65521 column sums
    weighted once: one pass over the bytes at a few bytes of arithmetic each, where weighting
    every byte in int64 made a CPU pass 50x slower than a copy."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    p = CHECKSUM_MODULUS
    rows = data.numel() // p
    total = torch.zeros((), dtype=torch.int64, device=data.device)
    if rows:
        grid = data[:rows * p].view(rows, p)
        columns = torch.zeros(p, dtype=torch.int64, device=data.device)
        step = 128  # rows per int16 partial sum: 128 * 255 < 2^15, exact (and twice as fast as int32)
        for start in range(0, rows, step):
            columns += grid[start:start + step].sum(dim=0, dtype=torch.int16)
        total += (columns * torch.arange(1, p + 1, dtype=torch.int64, device=data.device)).sum()
    tail = data[rows * p:].to(torch.int64)
    total += (tail * torch.arange(1, tail.numel() + 1, dtype=torch.int64, device=data.device)).sum()
    return int(total)


def weights_fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> str:
    """Names a set of weights: blake2b over (name, dtype, shape, `tensor_checksum`) in name order.
    A replica reports it for what it serves (GetStatus.weight_fingerprint); a trainer computes it
    over its state dict with `dtype` = the served dtype (each tensor cast first, as a push is) to
    know whether the service serves its policy. Equal fingerprints: the same weights, barring a
    deliberate collision of the checksum."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tensors, key=lambda item: item[0]):
        t = t.detach() if dtype is None else t.detach().to(dtype)
        digest.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|{tensor_checksum(t)};".encode())
    return digest.hexdigest()


def _chunk_parts(tensors: Iterable[tuple[str, torch.Tensor]], version: int, num_tensors: int, chunk_bytes: int,
                 mode: str, update_id: str | None) -> Iterator[tuple[bytes, np.ndarray]]:
    """(msgpack metadata, byte view) of every chunk of a push; the views are not copies."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    first = True
    for name, tensor in tensors:
        data = tensor_bytes(tensor)
        head = dict(name=name, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape), nbytes=int(data.size),
                    xxh3=xxh3_digest(data))
        for offset in range(0, max(data.size, 1), chunk_bytes):
            meta = dict(head, offset=offset)
            if first:
                meta.update(num_tensors=num_tensors, mode=mode)
                if update_id is not None:
                    meta["update_id"] = update_id
                else:
                    meta["version"] = version
                first = False
            yield msgpack.packb(meta), data[offset:offset + chunk_bytes]


def weight_chunks(tensors: Iterable[tuple[str, torch.Tensor]], version: int, num_tensors: int,
                  chunk_bytes: int = WEIGHT_CHUNK_BYTES, mode: str = "wait",
                  update_id: str | None = None) -> Iterator[pb.WeightChunk]:
    """Splits named tensors (HF names) into WeightChunk messages (the UpdateWeights stream).
    `mode` says what happens to in-flight requests at the swap: "wait", "abort" or "keep".
    With `update_id` the chunks are one bucket of that open update (PushWeightBucket)."""
    for meta, data in _chunk_parts(tensors, version, num_tensors, chunk_bytes, mode, update_id):
        yield pb.WeightChunk(metadata=meta, data=data.tobytes())


def weight_frames(tensors: Iterable[tuple[str, torch.Tensor]], version: int, num_tensors: int,
                  chunk_bytes: int = WEIGHT_CHUNK_BYTES, mode: str = "wait",
                  update_id: str | None = None) -> Iterator[bytes]:
    """The chunks of `weight_chunks`, already serialised (the WeightChunk wire format: field 1
    metadata, field 2 data), for a call made with no request serialiser (`raw_weight_calls`)."""
    for meta, data in _chunk_parts(tensors, version, num_tensors, chunk_bytes, mode, update_id):
        data_field = (b"\x12", _varint(data.size), data) if data.size else ()  # proto3 leaves empty bytes out
        yield b"".join((b"\x0a", _varint(len(meta)), meta, *data_field))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class RawChunk:
    """A WeightChunk read straight from its serialised bytes: `metadata` and `data` are views of
    them (protobuf's parse copies the bytes once, and every read of a bytes field once more)."""

    __slots__ = ("metadata", "data")

    def __init__(self, metadata: memoryview, data: memoryview):
        self.metadata, self.data = metadata, data


def parse_chunk(frame: bytes) -> RawChunk:
    """The server's deserialiser of weight chunks: the protobuf wire format of WeightChunk (field
    1 metadata, field 2 data; a repeated field keeps its last value, unknown fields are skipped,
    as protobuf does). ValueError on a malformed frame."""
    view, fields, i = memoryview(frame), {1: b"", 2: b""}, 0
    while i < len(view):
        key, i = _read_varint(view, i)
        number, kind = key >> 3, key & 7
        if kind == 2:
            size, i = _read_varint(view, i)
            if i + size > len(view):
                raise ValueError("weight chunk: a field runs past the end of the message")
            fields[number], i = view[i:i + size], i + size
        elif kind == 0:
            _, i = _read_varint(view, i)
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
        else:
            raise ValueError(f"weight chunk: unsupported wire type {kind}")
    if i != len(view):
        raise ValueError("weight chunk: truncated message")
    return RawChunk(memoryview(fields[1]), memoryview(fields[2]))


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(view) or shift > 63:
            raise ValueError("weight chunk: malformed varint")
        byte = view[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def chunk_update_id(chunk: pb.WeightChunk) -> str:
    """The update id a bucket's first chunk carries (PushWeightBucket); ValueError if none."""
    try:
        meta = msgpack.unpackb(chunk.metadata)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"weight chunk metadata is not msgpack: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("update_id"), str):
        raise ValueError("a bucket's first chunk must carry 'update_id' (from BeginWeightUpdate)")
    return meta["update_id"]


class WeightAssembler:
    """Rebuilds named tensors from WeightChunk messages, checking order, sizes, checksums and
    (for float dtypes it knows, `FINITE_BITS`) finite values: each chunk is copied into its
    tensor's buffer, hashed and checked by cache-sized pieces, one read of it from memory.
    `finite_checked` lists the tensors whose values were checked so."""

    def __init__(self, expected: dict[str, tuple[int, ...]] | None = None,
                 canonical: Callable[[str], str] | None = None, buffers: dict[str, np.ndarray] | None = None):
        # The served model's tensor names and shapes: a header is checked against them before
        # its buffer is allocated, so a push cannot make the front end allocate more than the model.
        # `canonical` maps a trainer's (wrapped) name to the model's, raising ValueError if it cannot.
        # `buffers`: assembly buffers kept by the caller from push to push (taken from here by
        # name and size; fresh pages cost more than the copy), see `kept_buffers`.
        self.expected, self.canonical, self.buffers = expected, canonical, buffers
        self.finite_checked: set[str] = set()
        self.digests: dict[str, int] = {}  # the XXH3-64 each tensor was checked against
        self._taken: dict[str, np.ndarray] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.version: int | None = None
        self.update_id: str | None = None
        self.num_tensors: int | None = None
        self.mode = "wait"
        self.num_bytes = 0
        self.broadcast_options: dict = {}  # a broadcast push's checksum kind and bucket size
        self._current: tuple[dict, np.ndarray, list] | None = None  # header, buffer, [filled, hash, one chunk]

    def broadcast_manifest(self, chunk: pb.WeightChunk) -> list | None:
        """The tensor list of a broadcast push (see the proto), or None for a chunked push."""
        if self.version is not None:
            return None
        try:
            meta = msgpack.unpackb(chunk.metadata)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"weight chunk metadata is not msgpack: {e}") from None
        if not isinstance(meta, dict) or meta.get("transport") != "broadcast":
            return None
        manifest = meta.get("tensors")
        if not isinstance(manifest, list) or not all(isinstance(m, list) and len(m) == 4 for m in manifest):
            raise ValueError("a broadcast push needs 'tensors': [[name, dtype, shape, checksum], ...]")
        for name, dtype, shape, crc in manifest:
            if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                    and isinstance(crc, int)):
                raise ValueError(f"tensor {name}: shape must be a list of ints >= 0 and checksum an int")
            if self.expected is not None and (name not in self.expected or tuple(shape) != tuple(self.expected[name])):
                raise ValueError(f"tensor {name!r}: shape {shape} is not a weight of the served model "
                                 f"({list(self.expected[name]) if name in self.expected else 'no such name'})")
            self.num_bytes += math.prod(shape) * parse_dtype(dtype, name).itemsize
        kind, bucket_bytes = meta.get("checksum", "wsum"), meta.get("bucket_bytes", 0)
        if kind not in ("xxh3", "wsum"):
            raise ValueError(f"a broadcast push's checksum must be 'xxh3' or 'wsum', got {kind!r}")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"a broadcast push's bucket_bytes must be an int >= 0, got {bucket_bytes!r}")
        self.broadcast_options = dict(checksum=kind, bucket_bytes=bucket_bytes)
        self.version, self.mode = int(meta.get("version", 0)), str(meta.get("mode", "wait"))
        self.num_tensors = len(manifest)
        return manifest

    def add(self, chunk: pb.WeightChunk) -> None:
        data = chunk.data  # each read of a protobuf bytes field is a new copy of it: read once
        try:
            meta = msgpack.unpackb(chunk.metadata)
            name, offset, nbytes = meta["name"], meta["offset"], meta["nbytes"]
        except Exception as e:  # noqa: BLE001 - any malformed framing is the caller's error
            raise ValueError(f"weight chunk metadata is not a msgpack map with name/offset/nbytes: {e}") from None
        if self.version is None:
            if ("version" not in meta and "update_id" not in meta) or "num_tensors" not in meta:
                raise ValueError("the first weight chunk must carry 'version' (or 'update_id') and 'num_tensors'")
            self.version, self.num_tensors = int(meta.get("version", 0)), int(meta["num_tensors"])
            self.update_id = str(meta["update_id"]) if "update_id" in meta else None
            self.mode = str(meta.get("mode", "wait"))
        if self._current is None or self._current[0]["key"] != name:
            self._finish_current()
            meta = dict(meta, key=name)  # the sender's name: later chunks of the tensor carry it
            if self.canonical is not None:
                meta["name"] = name = self.canonical(name)
            if name in self.tensors:
                raise ValueError(f"tensor {name} was sent twice")
            if not isinstance(nbytes, int) or not 0 <= nbytes <= MAX_TENSOR_BYTES:
                raise ValueError(f"tensor {name}: nbytes must be in [0, {MAX_TENSOR_BYTES}], got {nbytes!r}")
            if self.expected is not None:
                self._check_header(meta)
            if not isinstance(meta.get("xxh3", meta.get("crc32")), int):
                raise ValueError(f"tensor {name}: the header needs a checksum ('xxh3', or 'crc32' from older clients)")
            # A tensor in one chunk is that chunk's bytes (no copy); a longer one is assembled in an
            # uninitialised buffer (zero-filling would be a pass of its own): every byte is written
            # once, and the tensor is refused unless all of them arrived.
            state = (native.Xxh3() if native.available() else xxhash.xxh3_64()) if "xxh3" in meta else 0
            # a caller's buffer for this tensor (a shared segment's slot, say) is filled even then
            kept = self.buffers is not None and getattr(self.buffers.get(name), "size", -1) == nbytes
            whole = offset == 0 and len(data) == nbytes and not kept
            buf = np.frombuffer(data, dtype=np.uint8) if whole else self._buffer(name, nbytes)
            dtype = getattr(torch, str(meta.get("dtype")), None)
            finite = FiniteCheck(dtype) if dtype in FINITE_BITS else None
            self._current = (meta, buf, [0, state, whole, finite])
        head, buf, filled = self._current
        name = head["name"]
        if offset != filled[0]:
            raise ValueError(f"tensor {name}: chunk at offset {offset}, expected {filled[0]}")
        end = offset + len(data)
        if end > len(buf):
            raise ValueError(f"tensor {name}: received {end} bytes, header says {len(buf)}")
        if isinstance(filled[1], int):
            if not filled[2]:  # a whole-tensor chunk is the buffer already
                buf[offset:end] = np.frombuffer(data, dtype=np.uint8)
            filled[1] = zlib.crc32(data, filled[1])
        elif isinstance(filled[1], native.Xxh3):  # copy, hash and check in one native pass, without the GIL
            finite = filled[3]
            if finite is not None and (offset % finite.itemsize or len(data) % finite.itemsize):
                filled[3] = finite = None  # a chunk off the element boundaries: staging checks the values
            bad = filled[1].update(np.frombuffer(data, dtype=np.uint8),
                                   *((finite.itemsize, finite.inf) if finite else (0, 0)),
                                   into=None if filled[2] else buf[offset:end])
            if bad:
                finite.worst = finite.inf  # FiniteCheck.ok is now False
        else:
            finite, itemsize = filled[3], None if filled[3] is None else filled[3].itemsize
            step = FINITE_CHUNK_BYTES
            for start in range(offset, end, step):  # copy, hash and check each piece while it is in cache
                piece = buf[start:min(start + step, end)]
                if not filled[2]:
                    piece[:] = np.frombuffer(data[start - offset:start - offset + piece.size], dtype=np.uint8)
                filled[1].update(piece)
                if finite is not None:
                    if start % itemsize or piece.size % itemsize:
                        filled[3] = finite = None  # a chunk off the element boundaries: staging checks the values
                    else:
                        finite.chunk(piece)
        filled[0] = end
        self.num_bytes += len(data)

    def _check_header(self, meta: dict) -> None:
        """Name, shape and size of a tensor header against the served model (sizes before contents)."""
        name = meta["name"]
        if name not in self.expected:
            raise ValueError(f"tensor {name!r} is not a weight of the served model")
        shape = meta.get("shape")
        if not isinstance(shape, list) or tuple(shape) != tuple(self.expected[name]):
            raise ValueError(f"tensor {name}: shape {shape}, the model has {list(self.expected[name])}")
        size = math.prod(shape) * parse_dtype(meta.get("dtype"), name).itemsize
        if meta["nbytes"] != size:
            raise ValueError(f"tensor {name}: nbytes {meta['nbytes']}, but shape {shape} of {meta.get('dtype')} "
                             f"is {size} bytes")

    def _finish_current(self) -> None:
        if self._current is None:
            return
        meta, buf, filled = self._current
        name = meta["name"]
        if filled[0] != len(buf):
            raise ValueError(f"tensor {name}: received {filled[0]} of {len(buf)} bytes")
        if isinstance(filled[1], int):
            if filled[1] != meta["crc32"]:
                raise ValueError(f"tensor {name}: checksum mismatch (crc32)")
        elif filled[1].intdigest() != meta["xxh3"]:
            raise ValueError(f"tensor {name}: checksum mismatch (xxh3)")
        else:
            self.digests[name] = meta["xxh3"]
        if filled[3] is not None:
            if not filled[3].ok:
                raise ValueError(f"{name}: contains NaN or Inf")
            self.finite_checked.add(name)
        dtype = parse_dtype(meta["dtype"], name)
        try:
            tensor = bytes_tensor(buf).view(dtype).reshape(meta["shape"])
        except RuntimeError as e:
            raise ValueError(f"tensor {name}: dtype {meta['dtype']} / shape {meta['shape']} do not fit: {e}") from None
        self.tensors[name] = tensor
        self._current = None

    def _buffer(self, name: str, nbytes: int) -> np.ndarray:
        kept = self.buffers.pop(name, None) if self.buffers is not None else None
        buf = kept if kept is not None and kept.size == nbytes else np.empty(nbytes, dtype=np.uint8)
        self._taken[name] = buf
        return buf

    def kept_buffers(self) -> dict[str, np.ndarray]:
        """The assembly buffers this push used, for the next one once nothing reads these tensors."""
        return dict(self._taken)

    def finish(self) -> dict[str, torch.Tensor]:
        self._finish_current()
        if self.version is None:
            raise ValueError("the weight push was empty")
        if len(self.tensors) != self.num_tensors:
            raise ValueError(f"the weight push announced {self.num_tensors} tensors, {len(self.tensors)} arrived")
        return self.tensors
