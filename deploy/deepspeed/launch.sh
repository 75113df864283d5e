#!/usr/bin/env bash
# Multi-node DeepSpeed launch of one ramflow training stage.
#
#   deploy/deepspeed/launch.sh                         # retrained_model on every host in the hostfile
#   STAGE=finetuned_model NUM_GPUS=4 deploy/deepspeed/launch.sh
#   deploy/deepspeed/launch.sh --params params.yaml    # extra args go to ram_model.train_stage
#
# What it runs (from the repository root, on the first host's view of the hostfile):
#   deepspeed --hostfile $HOSTFILE --num_gpus $NUM_GPUS [--num_nodes N] \
#             --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
#             --module --no_local_rank ram_model.train_stage --stage $STAGE [extra args]
#
# `--module` makes DeepSpeed run `python -m ram_model.train_stage` on every rank (DeepSpeed's
# launcher spells module mode `--module`, not `-m`). `--no_local_rank` keeps it from appending
# `--local_rank=N` to the stage's arguments: the stage reads LOCAL_RANK / RANK / WORLD_SIZE from
# the environment exactly as under `python -m torch.distributed.run`, so both launchers share
# one entry point.
#
# Requirements on every node: the repository at the same absolute path, the same Python
# environment (DeepSpeed starts `<this python> -m deepspeed.launcher.launch` there over ssh via
# pdsh), the same data root (shared filesystem or identical copy) and passwordless ssh from
# this node. Environment variables starting with NCCL_, MLFLOW_ and PYTHON are forwarded to the
# other nodes by DeepSpeed itself; the others listed in FORWARD_VARS below go through a
# generated DeepSpeed environment file (DS_ENV_FILE).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../.." && pwd)"

# --- what to train ---------------------------------------------------------------------
STAGE="${STAGE:-retrained_model}"            # preliminary_model | retrained_model | refined_model | finetuned_model
HOSTFILE="${HOSTFILE:-${SCRIPT_DIR}/hostfile}"
NUM_GPUS="${NUM_GPUS:-8}"                    # GPUs used on *each* node
NUM_NODES="${NUM_NODES:-}"                   # empty: every host in the hostfile
MASTER_PORT="${MASTER_PORT:-29500}"

if [[ ! -f "${HOSTFILE}" ]]; then
  echo "launch.sh: hostfile '${HOSTFILE}' not found (copy ${SCRIPT_DIR}/hostfile.example)" >&2
  exit 2
fi

# Rank 0 runs on the first host of the hostfile; the other nodes must reach it at this address.
first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "${HOSTFILE}")"
if [[ -z "${first_host}" ]]; then
  echo "launch.sh: hostfile '${HOSTFILE}' lists no hosts" >&2
  exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-${first_host}}"

# --- NCCL ------------------------------------------------------------------------------
# Defaults that are safe on most clusters; override any of them from the caller's environment.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                 # INFO when diagnosing hangs / topology
# Network interface for bootstrap and socket transport: the one carrying the node-to-node
# network (e.g. eth0, ens5, bond0). Leaving it unset lets NCCL guess, which can pick docker0.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
# InfiniBand / RoCE: keep enabled (0) where the fabric exists; set NCCL_IB_DISABLE=1 on plain
# Ethernet clusters so NCCL does not probe absent HCAs.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
# Surface NCCL failures as errors instead of silent hangs (PyTorch >= 2.2 name).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Fixed per-rank CPU threads: torch would otherwise start one thread per core in each of the
# NUM_GPUS processes of a node.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# --- environment forwarded to the other nodes -----------------------------------------
# DeepSpeed forwards NCCL_*, MLFLOW_* and PYTHON* by itself; list here the other variables the
# stage needs on every rank. Only the ones set here are written.
FORWARD_VARS=(HF_HUB_OFFLINE TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS
              AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL CUDA_DEVICE_MAX_CONNECTIONS)
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
ds_env_file="$(mktemp "${TMPDIR:-/tmp}/ramflow-deepspeed-env.XXXXXX")"
trap 'rm -f "${ds_env_file}"' EXIT
chmod 600 "${ds_env_file}"                   # may hold credentials
for var in "${FORWARD_VARS[@]}"; do
  if [[ -n "${!var:-}" ]]; then
    printf '%s=%s\n' "${var}" "${!var}" >> "${ds_env_file}"
  fi
done
# DeepSpeed joins DS_ENV_FILE to its search folders; an absolute path is used as is.
export DS_ENV_FILE="${ds_env_file}"

# --- launch ------------------------------------------------------------------------------
cmd=(deepspeed
     --hostfile "${HOSTFILE}"
     --num_gpus "${NUM_GPUS}"
     --master_addr "${MASTER_ADDR}"
     --master_port "${MASTER_PORT}")
if [[ -n "${NUM_NODES}" ]]; then
  cmd+=(--num_nodes "${NUM_NODES}")
fi
cmd+=(--module --no_local_rank ram_model.train_stage --stage "${STAGE}" "$@")

cd "${REPO_ROOT}"                            # remote ranks `cd` to this same path
echo "launch.sh: ${cmd[*]}" >&2
"${cmd[@]}"
