#!/usr/bin/env bash
# Distributed evaluation on one machine: tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py arguments ...]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NPROC [test.py arguments ...]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
shift 3
cd "$(dirname "$0")/.."
# The project's environment (built by `make`) unless PYTHON names another interpreter.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    tools/test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
