#!/usr/bin/env bash
# Print the number of GPUs this node can give to Ray (one GeneratorReplica each).
#
# Usage: cluster/detect-gpus.sh [-h]
#
# NVIDIA: lines of `nvidia-smi -L`, or the entries of CUDA_VISIBLE_DEVICES when it is set.
# AMD (only when no NVIDIA GPU is found): HIP_VISIBLE_DEVICES entries when set, else the cards
# listed by `rocm-smi --showid --csv`, else, when /dev/kfd exists, the KFD topology nodes that
# have compute units (CPUs have none). Prints 0 when nothing is found.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^set -euo/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
  exit 0
fi

count_list() {  # "0,1,3" -> 3, "" -> 0
  local list="$1"
  [[ -z "$list" ]] && { echo 0; return; }
  tr ',' '\n' <<<"$list" | grep -c .
}

nvidia=0
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if (( nvidia > 0 )); then
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then count_list "$CUDA_VISIBLE_DEVICES"; else echo "$nvidia"; fi
  exit 0
fi

amd=0
if command -v rocm-smi >/dev/null 2>&1; then
  amd=$(rocm-smi --showid --csv 2>/dev/null | grep -c '^card' || true)
fi
if (( amd == 0 )) && [[ -e /dev/kfd ]]; then
  amd=$(grep -ls '^simd_count [1-9]' /sys/class/kfd/kfd/topology/nodes/*/properties 2>/dev/null | grep -c . || true)
fi
if (( amd > 0 )) && [[ -n "${HIP_VISIBLE_DEVICES+set}" ]]; then
  count_list "$HIP_VISIBLE_DEVICES"
else
  echo "$amd"
fi
