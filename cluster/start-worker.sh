#!/usr/bin/env bash
# Join this GPU node to a running tidar-rollout Ray cluster; the front end then places one
# GeneratorReplica (num_gpus=1) on each of its GPUs.
#
# Usage:
#   cluster/start-worker.sh HEAD [extra `ray start` flags, e.g. --block]
#   ROLLOUT_HEAD=10.0.0.5 cluster/start-worker.sh
#   cluster/start-worker.sh -h
#
# Runs `ray start --address=HEAD:6379 --num-gpus=N` with N detected by cluster/detect-gpus.sh
# (nvidia-smi -L, else rocm-smi or /dev/kfd for AMD). `ray start` returns once the node has
# joined; add --block to keep it in the foreground (systemd, containers). `ray stop` leaves.
#
# Environment [default]:
#   ROLLOUT_HEAD                  head node address, instead of the HEAD argument
#   ROLLOUT_RAY_PORT              Ray GCS port on the head [6379]
#   ROLLOUT_NUM_GPUS              GPUs to offer [detected]
#   ROLLOUT_REPLICA_METRICS_PORT  fixed Prometheus port of the replicas Ray starts on this node;
#                                 only for a node with one GPU [unset: each picks a free port]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { awk 'NR > 1 && /^set -euo/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { echo "start-worker.sh: $*" >&2; exit 2; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

head="${ROLLOUT_HEAD:-}"
if [[ $# -gt 0 && "$1" != -* ]]; then head="$1"; shift; fi
[[ -n "$head" ]] || die "give the head node address: start-worker.sh HEAD (see -h)"
ray_port="${ROLLOUT_RAY_PORT:-6379}"
command -v ray >/dev/null 2>&1 || die "ray not found: pip install 'ray[default]==2.60.0' grpcio"

num_gpus="${ROLLOUT_NUM_GPUS:-$(bash "$here/detect-gpus.sh")}"
[[ "$num_gpus" =~ ^[0-9]+$ ]] || die "ROLLOUT_NUM_GPUS must be a count, got '$num_gpus'"
if (( num_gpus == 0 )); then
  echo "start-worker.sh: no GPU found; this node will host no replica" >&2
fi

ulimit -n 65536 2>/dev/null || true
exec ray start --address="$head:$ray_port" --num-gpus="$num_gpus" "$@"
