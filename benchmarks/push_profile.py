"""Where a weight push's time goes: each pass over the bytes of a random state dict, timed alone,
in this process, beside the copy floor of the same bytes (issue 27).

    python benchmarks/push_profile.py --shape qwen2.5-0.5b --threads 1

The passes of each path (before: what the paths did until issue 27; now: what they do):
- gRPC before: chunking (crc32 per tensor + a bytes copy per chunk), protobuf serialise (message
  objects), parse, reassembly (bytearray + crc32), pickling torch tensors for `ray.put`, a
  finite check of two reductions (amax, amin), then the copy into the model.
- gRPC now: XXH3-64 + frames serialised with one copy (`wire.weight_frames`), parsed as views of
  the received bytes (`wire.parse_chunk`), reassembly (XXH3-64 on the way; a one-chunk tensor is
  its chunk), `pack_tensors` for `ray.put` (one copy into the store, none out),
  a one-pass finite check (aminmax), the copy into the model.
- broadcast: the position-weighted checksum as it was computed (every byte widened to int64),
  XXH3-64 (what a gloo broadcast now checks), and `tensor_checksum` now (column sums; what an
  NCCL broadcast checks on the GPU), on each side.
- the commit into the replica's model as the engine lays it out on the CPU (input-major): torch's
  `copy_` (before) and `transpose.copy_weight` (now); the finite check on the bits (now).
- shared memory now: the trainer's first write (a new memfd) and a rewrite of the kept one
  (copy + XXH3-64 by 1 MiB chunks), the replica's mapping, its fused XXH3-64 + finite check,
  and the commit copy.
`--threads` sets torch's threads (a Ray replica actor runs with 1).
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
import zlib

import msgpack
import torch
from shapes import SHAPES, hf_config

from rollout.config import ModelConfig
from rollout.model.decoder import Decoder
from rollout.model.transpose import copy_weight
from rollout.service.shared_weights import SharedSegment, check_segment, host_id, map_segment, segment_tensors
from rollout.service.weights import all_finite
from rollout.v1 import rollout_pb2 as pb
from rollout.wire import WeightAssembler, pack_tensors, parse_chunk, tensor_checksum, tensor_digest, weight_frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--skip-slow", action="store_true", help="leave out the old checksum (a minute on a CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = Decoder(ModelConfig.from_hf_dict(hf_config(args.shape))).to(torch.bfloat16)
    state = {k: v.detach().contiguous() + 1e-3 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    params = {k: v.detach() for k, v in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"# {args.shape}: {len(state)} tensors, {nbytes / 1e9:.3f} GB bfloat16, torch threads {args.threads}")
    print("| pass | s | GB/s |\n|---|---|---|")

    def timed(label: str, fn):
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
        print(f"| {label} | {seconds:.3f} | {nbytes / seconds / 1e9:.2f} |", flush=True)
        return out

    timed("copy floor (torch copy_ into the model)", lambda: [params[k].copy_(v) for k, v in state.items()])
    # gRPC, before (the same library calls the old code made, rebuilt here)
    chunks = timed("before: crc32 + bytes copy per 4 MiB chunk + message objects", lambda: _old_chunks(state))
    wire = timed("before: protobuf serialise", lambda: [c.SerializeToString() for c in chunks])
    del chunks
    parsed = timed("parse (before and now)", lambda: [pb.WeightChunk.FromString(w) for w in wire])
    del wire
    tensors = timed("before: reassembly into a bytearray + crc32", lambda: _old_assemble(parsed, state))
    del parsed
    timed("before: pickle torch tensors (ray.put)", lambda: len(pickle.dumps(tensors, protocol=5)))
    timed("before: finite check (amax + amin)",
          lambda: [torch.isfinite(t.amax()) and torch.isfinite(t.amin()) for t in tensors.values()])
    del tensors
    # gRPC, now
    frames = timed("now: XXH3-64 + frames, one copy (8 MiB)", lambda: list(weight_frames(state.items(), 0, len(state))))
    tensors = timed("now: server parse (views, wire.parse_chunk) + reassembly + XXH3-64 + finite check (one read)",
                    lambda: _assemble(parse_chunk(f) for f in frames))
    del frames
    timed("now: pack_tensors + pickle out of band (ray.put)", lambda: _pickle_out_of_band(pack_tensors(tensors)))
    timed("now: finite check (aminmax)", lambda: [torch.aminmax(t) for t in tensors.values()])
    del tensors
    # broadcast checksums
    if not args.skip_slow:
        timed("broadcast before: tensor_checksum, every byte weighted in int64 (one side)",
              lambda: [_old_tensor_checksum(t) for t in state.values()])
    timed("broadcast now (gloo): XXH3-64 (one side)", lambda: [tensor_digest(t) for t in state.values()])
    timed("broadcast now (NCCL, timed here on the CPU): tensor_checksum by columns",
          lambda: [tensor_checksum(t) for t in state.values()])
    # the commit: the replica's engine keeps linear weights input-major on the CPU (layers.lay_out)
    replica = Decoder(ModelConfig.from_hf_dict(hf_config(args.shape))).to(torch.bfloat16)
    replica = replica.pack_projections(input_major=True)
    model_params = {k: v.detach() for k, v in replica.state_dict().items()}
    timed("commit into the input-major model: Tensor.copy_ (before)",
          lambda: [model_params[k].copy_(v) for k, v in state.items()])
    timed("commit into the input-major model: copy_weight (tiled transpose)",
          lambda: [copy_weight(model_params[k], v) for k, v in state.items()])
    timed("finite check on the bits (weights.all_finite)", lambda: [all_finite(t) for t in state.values()])
    # shared memory
    segment = timed("shared: trainer's first push (new memfd, fresh pages; copy + XXH3-64 by 1 MiB)",
                    lambda: SharedSegment(list(state.items())))
    timed("shared: trainer's next push (the kept segment rewritten)", lambda: segment.write(list(state.items())))
    data = timed("shared: replica maps it", lambda: map_segment(os.getpid(), segment.fd, segment.size, host_id()))
    timed("shared: replica XXH3-64 + finite check by 1 MiB (check_segment)", lambda: check_segment(data, segment.entries))
    views = segment_tensors(data, segment.entries)
    timed("shared: commit copy into the input-major model (copy_weight)",
          lambda: [copy_weight(model_params[k], v) for k, v in views.items()])
    del views, data
    segment.close()


def _old_chunks(state: dict[str, torch.Tensor], chunk_bytes: int = 4 << 20) -> list[pb.WeightChunk]:
    """Before issue 27: crc32 of each tensor, then a bytes copy per chunk into a message object."""
    out = []
    for name, t in state.items():
        data = t.reshape(-1).view(torch.uint8).numpy()
        meta = msgpack.packb(dict(name=name, nbytes=int(data.size), crc32=zlib.crc32(data)))
        out += [pb.WeightChunk(metadata=meta, data=data[o:o + chunk_bytes].tobytes())
                for o in range(0, data.size, chunk_bytes)]
    return out


def _old_assemble(chunks: list[pb.WeightChunk], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Before issue 27: a zero-filled bytearray per tensor, chunks copied in, crc32 over it."""
    out, i = {}, 0
    for name, t in state.items():
        meta = msgpack.unpackb(chunks[i].metadata)
        buf, filled = bytearray(meta["nbytes"]), 0
        while filled < len(buf):
            data = chunks[i].data
            buf[filled:filled + len(data)] = data
            filled, i = filled + len(data), i + 1
        assert zlib.crc32(buf) == meta["crc32"]
        out[name] = torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype).reshape(t.shape)
    return out


def _old_tensor_checksum(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Before issue 27: the same sum, each byte widened to int64 and weighted."""
    data = tensor.reshape(-1).view(torch.uint8)
    total = torch.zeros((), dtype=torch.int64)
    for start in range(0, data.numel(), chunk):
        piece = data[start:start + chunk].to(torch.int64)
        total += (piece * (torch.arange(start, start + piece.numel()) % 65521 + 1)).sum()
    return int(total)


def _assemble(chunks) -> dict[str, torch.Tensor]:
    asm = WeightAssembler()
    for c in chunks:
        asm.add(c)
    return asm.finish()


def _pickle_out_of_band(obj) -> int:
    buffers = []
    pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    out = [bytearray(b.raw()) for b in buffers]  # the one copy Ray makes into its store
    return sum(len(b) for b in out)


if __name__ == "__main__":
    main()
