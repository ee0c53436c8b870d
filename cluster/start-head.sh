#!/usr/bin/env bash
# Start the Ray head on this machine, then run the tidar-rollout front end on it in the foreground.
#
# Usage:
#   ROLLOUT_MODEL=/models/policy ROLLOUT_REPLICAS=8 cluster/start-head.sh [extra `serve` flags]
#   cluster/start-head.sh -h
# then on every GPU node: cluster/start-worker.sh <this host's IP>
#
# Runs `ray start --head --port=6379 --dashboard-host=0.0.0.0 --ray-client-server-port=10001
# --num-gpus=N`, waits until the cluster offers ROLLOUT_REPLICAS GPUs (cluster/wait-for-gpus.py:
# the front end only gives replicas GPUs that exist when it starts; the wait also asks an
# autoscaler for them), then execs `python3 -m rollout serve --address auto ...`. Ray keeps
# running when the front end exits: `ray stop` ends it.
#
# Environment [default]:
#   ROLLOUT_MODEL            model directory, same path on every node (required)
#   ROLLOUT_REPLICAS         number of GeneratorReplica actors, one GPU each (required)
#   ROLLOUT_PORT             gRPC port for trainers [50051]
#   ROLLOUT_METRICS_PORT     Prometheus port of the front end [9400]
#   ROLLOUT_AUTH_TOKEN_FILE  file holding the shared auth token [unset: no auth]
#   ROLLOUT_TLS_CERT, ROLLOUT_TLS_KEY  PEM certificate and key for gRPC over TLS [unset: plaintext]
#   ROLLOUT_NUM_GPUS         GPUs this node gives to replicas [detected; 0 keeps replicas off the head]
#   ROLLOUT_WAIT_FOR_GPUS    GPUs to wait for before serving [ROLLOUT_REPLICAS; 0 for a CPU-only cluster]
#   ROLLOUT_REPLICA_METRICS_PORT  fixed Prometheus port of the replicas Ray starts on this node;
#                            only for a node with one GPU [unset: each replica picks a free port]
#   ROLLOUT_RAY_PORT, ROLLOUT_RAY_CLIENT_PORT  Ray GCS and Ray client ports [6379, 10001]
#   ROLLOUT_PYTHON           interpreter with this repo and ray installed [python3]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { awk 'NR > 1 && /^set -euo/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { echo "start-head.sh: $*" >&2; exit 2; }

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi

model="${ROLLOUT_MODEL:-}"
replicas="${ROLLOUT_REPLICAS:-}"
port="${ROLLOUT_PORT:-50051}"
metrics_port="${ROLLOUT_METRICS_PORT:-9400}"
ray_port="${ROLLOUT_RAY_PORT:-6379}"
client_port="${ROLLOUT_RAY_CLIENT_PORT:-10001}"
python="${ROLLOUT_PYTHON:-python3}"

[[ -n "$model" ]] || die "set ROLLOUT_MODEL to the model directory (see -h)"
[[ -d "$model" ]] || die "ROLLOUT_MODEL=$model is not a directory on this node"
[[ "$replicas" =~ ^[1-9][0-9]*$ ]] || die "set ROLLOUT_REPLICAS to a positive integer, got '${replicas}'"
wait_gpus="${ROLLOUT_WAIT_FOR_GPUS:-$replicas}"
[[ "$wait_gpus" =~ ^[0-9]+$ ]] || die "ROLLOUT_WAIT_FOR_GPUS must be a count, got '$wait_gpus'"
command -v ray >/dev/null 2>&1 || die "ray not found: pip install 'ray[default]==2.60.0' grpcio"

serve_args=(--address auto --model "$model" --replicas "$replicas"
            --port "$port" --metrics-port "$metrics_port")
if [[ -n "${ROLLOUT_AUTH_TOKEN_FILE:-}" ]]; then
  [[ -r "$ROLLOUT_AUTH_TOKEN_FILE" ]] || die "ROLLOUT_AUTH_TOKEN_FILE=$ROLLOUT_AUTH_TOKEN_FILE is not readable"
  serve_args+=(--auth-token-file "$ROLLOUT_AUTH_TOKEN_FILE")
fi
if [[ -n "${ROLLOUT_TLS_CERT:-}${ROLLOUT_TLS_KEY:-}" ]]; then
  [[ -r "${ROLLOUT_TLS_CERT:-}" && -r "${ROLLOUT_TLS_KEY:-}" ]] \
    || die "set both ROLLOUT_TLS_CERT and ROLLOUT_TLS_KEY to readable PEM files"
  serve_args+=(--tls-cert "$ROLLOUT_TLS_CERT" --tls-key "$ROLLOUT_TLS_KEY")
fi

num_gpus="${ROLLOUT_NUM_GPUS:-$(bash "$here/detect-gpus.sh")}"
[[ "$num_gpus" =~ ^[0-9]+$ ]] || die "ROLLOUT_NUM_GPUS must be a count, got '$num_gpus'"
echo "start-head.sh: this node offers $num_gpus GPU(s) to replicas" >&2

ulimit -n 65536 2>/dev/null || true
ray start --head --port="$ray_port" --dashboard-host=0.0.0.0 \
  --ray-client-server-port="$client_port" --num-gpus="$num_gpus"
"$python" "$here/wait-for-gpus.py" "$wait_gpus"

exec "$python" -m rollout serve "${serve_args[@]}" "$@"
