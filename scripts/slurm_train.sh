#!/usr/bin/env bash
# Multi-node training under Slurm: one torchrun per node (through run_train.sh), joined by a c10d rendezvous
# on the first node of the allocation. Arguments are trainer flags.
#
#   sbatch --nodes 4 scripts/slurm_train.sh --job.config_file train_configs/1b.toml
#   sbatch --nodes 2 --time 24:00:00 scripts/slurm_train.sh --job.config_file train_configs/170m.toml \
#       --job.dump_folder /shared/runs/170m --data.path /shared/slimpajama_shards
#
# The dump folder and data must be on a file system every node sees. Resubmitting the same command resumes
# from the newest checkpoint in the dump folder. Slurm sends SIGTERM 3 minutes before the time limit
# (--signal below); torchrun passes it on and the trainer saves a checkpoint and stops.
#
#SBATCH --job-name=dlm_titan
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@180
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from a spool folder: find the repository from where the job was submitted.
REPO=${DLM_TITAN_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
[[ -x "$REPO/run_train.sh" ]] || { echo "error: $REPO/run_train.sh not found; submit from the repository root or set DLM_TITAN_ROOT" >&2; exit 2; }

# sed reads the whole list: `head -n 1` exits after one line, and a scontrol still writing then dies of SIGPIPE,
# which pipefail and set -e turn into the end of the job (exit 141).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export NNODES=$SLURM_NNODES
export NGPU=${NGPU:-${SLURM_GPUS_ON_NODE:-8}}
export RDZV_ENDPOINT=${RDZV_ENDPOINT:-$HEAD_NODE:29500}
export RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}

# NCCL: report problems, fail fast on a hung collective instead of waiting forever. On InfiniBand/RoCE
# clusters also set what your cluster documents, e.g. NCCL_SOCKET_IFNAME (bootstrap interface) and
# NCCL_IB_HCA (adapters); NCCL finds NVLink within a node by itself.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "dlm_titan: $NNODES nodes x $NGPU GPUs, rendezvous $RDZV_ENDPOINT (id $RDZV_ID), repo $REPO"
# Check the config once, here, so bad input ends the job with one line and exit 2; the nodes' launchers then skip
# their own checks, which would run at the same moment and race for the dump folder's lock (one refused = job over).
DLM_TITAN_CHECK_ONLY=1 "$REPO/run_train.sh" "$@"
export DLM_TITAN_PRECHECKED=1
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$REPO/run_train.sh" "$@"
