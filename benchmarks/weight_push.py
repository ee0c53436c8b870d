"""Weight push throughput: a Qwen2.5-0.5B-shaped state dict to the replicas, gRPC vs broadcast.

    python benchmarks/weight_push.py --shape qwen2.5-0.5b --replicas 1 --dtype bfloat16

Writes a random-weight model of the shape to a temporary directory, serves it (CPU: gloo for
the broadcast path; on a GPU machine the replicas use NCCL), then times `WeightSync.push` of a
perturbed copy over each transport, `--repeats` times. GB/s = tensor bytes / wall time of the
whole push (send, verify on every replica, swap, version bump).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray
import torch
from safetensors.torch import save_file
from shapes import SHAPES, hf_config

from rollout.config import ModelConfig
from rollout.model.decoder import Decoder
from rollout.service.serve import BackgroundService, RolloutService, init_ray
from trainer_bridge import RolloutClient, WeightSync


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES), help="model shape")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weight dtype")
    p.add_argument("--replicas", type=int, default=1, help="replicas receiving each push")
    p.add_argument("--repeats", type=int, default=3, help="pushes per transport")
    p.add_argument("--transports", default="grpc,broadcast", help="comma-separated transports")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        cfg = hf_config(args.shape)
        (model_dir / "config.json").write_text(json.dumps(cfg))
        (model_dir / "tidar_config.json").write_text(json.dumps({"mask_token_id": cfg["vocab_size"] - 1,
                                                                 "block_size": 16}))
        model = Decoder(ModelConfig.from_hf_dict(cfg)).to(dtype)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
        save_file(state, model_dir / "model.safetensors")
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        init_ray(include_dashboard=False, log_to_driver=False, namespace="bench-push")
        service = BackgroundService(RolloutService(model_dir, replicas=args.replicas, port=0, auth_token="t",
                                                   name="push", dtype=args.dtype))
        try:
            service.wait_started()
            client = RolloutClient(service.address, token="t")
            print(f"# {args.shape} state dict, {args.dtype}, {len(state)} tensors, {nbytes / 1e9:.3f} GB, "
                  f"{args.replicas} replica(s), torch {torch.__version__}")
            print("| transport | median s | GB/s | all runs (s) |")
            print("|---|---|---|---|")
            for transport in args.transports.split(","):
                sync = WeightSync(client, transport, master_address="127.0.0.1")
                times = []
                for i in range(args.repeats):
                    pushed = {k: v + (i + 1) * 1e-3 for k, v in state.items()}
                    times.append(sync.push(pushed).seconds)
                med = statistics.median(times)
                print(f"| {transport} | {med:.2f} | {nbytes / med / 1e9:.2f} | "
                      f"{', '.join(f'{t:.2f}' for t in times)} |", flush=True)
        finally:
            service.stop()
            ray.shutdown()


if __name__ == "__main__":
    main()
