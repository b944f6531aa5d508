#!/usr/bin/env bash
# Distributed training on one machine: tools/dist_train.sh CONFIG NPROC [train.py arguments ...]
# GPUs use NCCL; without CUDA the processes talk over gloo (set GLOO_SOCKET_IFNAME, e.g. lo, if needed).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [train.py arguments ...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
cd "$(dirname "$0")/.."
# The project's environment (built by `make`) unless PYTHON names another interpreter.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    tools/train.py "$CONFIG" --launcher pytorch "$@"
