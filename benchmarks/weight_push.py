"""Weight push speed: every transport against a `python -m rollout serve` process, beside the copy
floor of the same bytes, with the time to the first token on the new version.

    python benchmarks/weight_push.py --shapes qwen2.5-0.5b --replicas 1,2 --repeats 3

For each shape, writes a random-weight model of it (--dtype) to a temporary directory; for each
replica count, starts `python -m rollout serve` on it in a subprocess (CPU: gloo for the broadcast
path), then, transport after transport (interleaved within each repeat, so all of them see the
same machine load), pushes the weights perturbed in place with `WeightSync.push`. Per push it reports:
- GB/s = tensor bytes / wall time of the whole push (write or send, verify on every replica,
  swap, version bump);
- TTFT: from the start of a pause -> push -> resume cycle to the first token generated on the
  new version (a request waiting for that version, max_tokens 1, sent at the start); below
  each row, what TTFT - push is made of (the pause and resume RPCs, from the end of the push to
  that token) beside the same one-token request on warm weights just before the push;
- the copy floor: `torch` copy of the same tensors into preallocated ones in this process,
  measured just before each push; "x floor" = push GB/s / floor GB/s (1.0 = memory speed);
- with grpc among the transports, the gRPC floor: the same number of bytes streamed in
  messages of the push's chunk size to a bare sink process (`grpc_sink.py`: no parsing,
  hashing or copying on either side) just before each gRPC push, so the push's own work can
  be told from gRPC's.
`--transports` takes any of shared, grpc, broadcast, auto; `--inprocess` also runs the service in
this process (the replicas are Ray actors either way) to compare with the subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import grpc_sink
import torch
from safetensors.torch import save_file
from shapes import SHAPES, hf_config

from rollout.config import ModelConfig
from rollout.model.decoder import Decoder
from rollout.v1 import rollout_pb2 as pb
from rollout.wire import WEIGHT_CHUNK_BYTES
from trainer_bridge import RolloutClient, WeightSync
from trainer_bridge.client import CHANNEL_OPTIONS

TOKEN = "bench"


def write_model(shape: str, dtype: torch.dtype, root: Path) -> dict[str, torch.Tensor]:
    cfg = hf_config(shape)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tidar_config.json").write_text(json.dumps({"mask_token_id": cfg["vocab_size"] - 1, "block_size": 16}))
    model = Decoder(ModelConfig.from_hf_dict(cfg)).to(dtype)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(state, root / "model.safetensors")
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, replicas: int, dtype: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (tmp / "token").write_text(TOKEN)
    cmd = [sys.executable, "-m", "rollout", "serve", "--model", str(model_dir), "--replicas", str(replicas),
           "--port", str(port), "--host", "127.0.0.1", "--auth-token-file", str(tmp / "token"), "--dtype", dtype,
           "--drafting", "fixed", "--kv-cache-gib", "0.25", "--max-model-len", "256", "--max-num-seqs", "4",
           "--metrics-port", "0"]
    log = open(tmp / f"serve-{replicas}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    with RolloutClient(address) as probe:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rollout serve exited ({proc.returncode}); see {tmp / f'serve-{replicas}.log'}")
            try:
                st = probe.status(timeout=5)
                if len(st.replicas) == replicas and all(r.ready for r in st.replicas):
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    proc.kill()
    raise TimeoutError("rollout serve did not become ready in 600 s")


def copy_floor(state: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> float:
    started = time.perf_counter()
    for k, v in state.items():
        dst[k].copy_(v)
    return time.perf_counter() - started


def start_sink() -> tuple[subprocess.Popen, grpc.Channel]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("grpc_sink.py")), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the gRPC sink did not start")
    return proc, grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


def grpc_floor(channel: grpc.Channel, nbytes: int, chunk_bytes: int = WEIGHT_CHUNK_BYTES) -> float:
    """Seconds to stream `nbytes` in raw messages of `chunk_bytes` to the sink (one message
    object sent again and again: what gRPC alone costs)."""
    call = channel.stream_unary(grpc_sink.METHOD, request_serializer=None, response_deserializer=None)
    frame = bytes(chunk_bytes)
    sizes = [chunk_bytes] * (nbytes // chunk_bytes) + ([nbytes % chunk_bytes] if nbytes % chunk_bytes else [])
    started = time.perf_counter()
    got = call((frame if n == chunk_bytes else frame[:n] for n in sizes), timeout=600)
    seconds = time.perf_counter() - started
    if int.from_bytes(got, "little") != nbytes:
        raise RuntimeError("the gRPC sink did not receive every byte")
    return seconds


def one_token(client: RolloutClient, version: int | None = None) -> int:
    """Generates one token (greedy, a 4-token prompt); with `version`, waiting for it. Returns
    the version that sampled it."""
    req = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=[11, 12, 13, 14])],
                             params=pb.SamplingParams(max_tokens=1, temperature=0.0),
                             min_policy_version=version or 0, wait_for_version=version is not None)
    resp = client.stub.Generate(req, timeout=600)
    return int.from_bytes(resp.trajectories[0].policy_versions[:8], "little")


def timed_push(sync: WeightSync, client: RolloutClient, state: dict, version: int) -> dict[str, float]:
    """Seconds of one pause -> push -> resume cycle: the push, TTFT (from the start of the pause
    to the first token on the new version, by a request sent at the start), the pause and resume
    RPCs, and from the end of the push to that token."""
    got = {}

    def first_token() -> None:
        got["version"] = one_token(client, version + 1)
        got["at"] = time.perf_counter()

    waiter = threading.Thread(target=first_token)
    started = time.perf_counter()
    waiter.start()
    sync.pause(mode="keep", timeout_seconds=600)
    paused = time.perf_counter()
    result = sync.push(state)
    pushed = time.perf_counter()
    sync.resume()
    resumed = time.perf_counter()
    waiter.join(600)
    if got.get("version") != version + 1:
        raise RuntimeError(f"the first token after the push came from version {got.get('version')}, not {version + 1}")
    return dict(push=result.seconds, ttft=got["at"] - started, pause=paused - started, resume=resumed - pushed,
                after=got["at"] - pushed)


def run(address: str, state: dict, transports: list[str], repeats: int, label: str) -> list[dict]:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    copy_floor(state, dst)  # the destination's pages are touched once, as a model's are
    client = RolloutClient(address, token=TOKEN)
    syncs = {t: WeightSync(client, t, master_address="127.0.0.1", timeout=600) for t in transports}
    for sync in syncs.values():
        sync.choose_transport()  # "auto" asks GetStatus once; not part of any push
    rows = {t: dict(push=[], ttft=[], floor=[], pause=[], resume=[], after=[], token=[]) for t in transports}
    version = client.status().weight_version
    sink = start_sink() if "grpc" in transports else None
    grpc_floors = []
    try:
        for _ in range(repeats):
            for v in state.values():  # new weights in place: no second model-sized allocation (the 1.5B shape)
                v.add_(1e-3)
            for transport in transports:
                rows[transport]["floor"].append(copy_floor(state, dst))
                if transport == "grpc":
                    grpc_floors.append(grpc_floor(sink[1], nbytes))
                started = time.perf_counter()
                one_token(client)  # the same request on warm weights: what the first token alone costs
                rows[transport]["token"].append(time.perf_counter() - started)
                for key, seconds in timed_push(syncs[transport], client, state, version).items():
                    rows[transport][key].append(seconds)
                version += 1
    finally:
        if sink is not None:
            sink[1].close()
            sink[0].kill()
            sink[0].wait()
    out = []
    for transport, r in rows.items():
        push, ttft, floor = (statistics.median(r[k]) for k in ("push", "ttft", "floor"))
        chosen = syncs[transport].chosen_transport
        out.append(dict(setup=label, transport=transport if chosen == transport else f"{transport} ({chosen})",
                        push_s=push, gb_s=nbytes / push / 1e9, floor_gb_s=nbytes / floor / 1e9, ratio=floor / push,
                        ttft_s=ttft, ttft_over_push=ttft / push,
                        runs=", ".join(f"{p:.2f}/{t:.2f}" for p, t in zip(r["push"], r["ttft"]))))
        print(f"| {label} | {out[-1]['transport']} | {push:.3f} | {out[-1]['gb_s']:.2f} | {out[-1]['floor_gb_s']:.2f} | "
              f"{out[-1]['ratio']:.2f} | {ttft:.3f} | {ttft / push:.2f} | {out[-1]['runs']} |", flush=True)
        fixed = {k: statistics.median(r[k]) for k in ("pause", "resume", "after", "token")}
        print(f"# {label}, {out[-1]['transport']}: TTFT - push {ttft - push:.3f} s (medians: pause RPC "
              f"{fixed['pause']:.3f}, resume RPC {fixed['resume']:.3f}, end of push -> first token {fixed['after']:.3f}; "
              f"one-token Generate on warm weights {fixed['token']:.3f})", flush=True)
    if grpc_floors:
        median = statistics.median(grpc_floors)
        print(f"# {label}: gRPC floor (the same bytes to a bare sink, {WEIGHT_CHUNK_BYTES >> 20} MiB messages): "
              f"{median:.3f} s median, {nbytes / median / 1e9:.2f} GB/s; runs "
              f"{', '.join(f'{s:.2f}' for s in grpc_floors)}", flush=True)
    client.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-0.5b", help=f"comma-separated, of {', '.join(sorted(SHAPES))}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weight dtype")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--repeats", type=int, default=3, help="pushes per transport")
    p.add_argument("--transports", default="shared,grpc,broadcast", help="comma-separated transports")
    p.add_argument("--inprocess", action="store_true", help="also run the service in this process")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    transports = args.transports.split(",")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads here")
    print("| setup | transport | push s (median) | GB/s | copy floor GB/s | x floor | TTFT s | TTFT / push | "
          "runs (push/TTFT s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes.split(","):
            state = write_model(shape, dtype, tmp / shape)
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            print(f"# {shape}: {len(state)} tensors, {nbytes / 1e9:.3f} GB {args.dtype}", flush=True)
            for replicas in (int(r) for r in args.replicas.split(",")):
                proc, address = start_server(tmp / shape, replicas, args.dtype, tmp)
                try:
                    run(address, state, transports, args.repeats, f"{shape}, {replicas} replica(s), serve process")
                finally:
                    proc.terminate()
                    proc.wait(120)
                if args.inprocess:
                    run_inprocess(tmp / shape, state, replicas, args, transports)


def run_inprocess(model_dir: Path, state: dict, replicas: int, args, transports: list[str]) -> None:
    import ray

    from rollout.service.serve import BackgroundService, RolloutService, init_ray
    init_ray(include_dashboard=False, log_to_driver=False, namespace="bench-push")
    service = BackgroundService(RolloutService(model_dir, replicas=replicas, port=0, auth_token=TOKEN, name="push",
                                               dtype=args.dtype))
    try:
        service.wait_started()
        run(service.address, state, transports, args.repeats, f"{model_dir.name}, {replicas} replica(s), in-process")
    finally:
        service.stop()
        ray.shutdown()


if __name__ == "__main__":
    main()
