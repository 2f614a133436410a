#!/usr/bin/env bash
# Launch `fairtune fit` with torchrun: one process per GPU on this node. For several nodes, run the
# same command on every node with its own NODE_RANK (0 on the node at MASTER_ADDR).
#
#   bash scripts/torchrun.sh --config configs/colored_digits/lora.yaml --config configs/launch/ddp.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 bash scripts/torchrun.sh \
#       --config configs/colored_digits/lora.yaml --config configs/launch/multinode.yaml
#
# Environment (all optional):
#   NPROC_PER_NODE  processes (GPUs) on this node; default: the GPUs nvidia-smi lists, else 1
#   NNODES          nodes in the job (1)          NODE_RANK    this node's rank (0)
#   MASTER_ADDR     host of node 0 (127.0.0.1)    MASTER_PORT  a free TCP port on it (29500)
#   PYTHON          the interpreter (.venv/bin/python when there is one, else python3)
# Lightning sees torchrun's RANK / LOCAL_RANK / WORLD_SIZE and joins those processes instead of
# starting its own; --trainer.devices and --trainer.num_nodes are set to match them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
  fi
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# one CPU thread pool per process, sized to this node's share of cores
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc)
  OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
  export OMP_NUM_THREADS
fi
export TOKENIZERS_PARALLELISM=false

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m fairtune.cli fit "$@" \
  --trainer.devices "$NPROC_PER_NODE" --trainer.num_nodes "$NNODES"
