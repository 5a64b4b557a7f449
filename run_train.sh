#!/usr/bin/env bash
# Launch dlm_titan training.
#   ./run_train.sh                                   # train_configs/debug.toml, one process
#   NGPU=8 CONFIG_FILE=train_configs/170m.toml ./run_train.sh --training.steps 1000
# NGPU: processes on this node (default 1; without CUDA they use gloo on the CPU).
# CONFIG_FILE: TOML config (default train_configs/debug.toml). Extra arguments are CLI overrides.
# Multi-node: NNODES=<nodes> RDZV_ENDPOINT=<node0 host>:<port> on every node (c10d rendezvous).
# SHUTDOWN_TIMEOUT: seconds torchrun gives the trainers to save after SIGTERM/SIGUSR1 (default 120).
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug.toml}
PYTHON=${PYTHON:-python}
# Counts of processes and nodes: anything else failed in bash arithmetic ("abc: unbound variable") or, for 0, in a
# ZeroDivisionError traceback of the config check.
check_count() {
    if [[ ! "$2" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $1=$2 must be a positive integer (the number of $3), e.g. $1=1" >&2
        exit 2
    fi
}
check_count NGPU "$NGPU" "processes on this node"
check_count NNODES "$NNODES" nodes

args=("$@")
# An explicit --job.config_file on the command line wins over CONFIG_FILE.
if [[ " $* " != *" --job.config_file"* ]]; then
    args=(--job.config_file "$CONFIG_FILE" "$@")
fi
export PYTHONUNBUFFERED=1

if [[ -n "${DLM_TITAN_CHECK_ONLY:-}" ]]; then
    # Only the config check, for the world size NGPU x NNODES (scripts/slurm_train.sh runs it once per job).
    WORLD_SIZE=$((NGPU * NNODES)) exec "$PYTHON" -m dlm_titan.train "${args[@]}"
fi

# Several nodes meet at node 0's address: without one each node's torchrun made its own rendezvous on localhost (port
# 0, a new one per node) and waited there for the others until its join timeout, 10 minutes, without a word.
if [[ "$NNODES" != 1 && ( -z "${RDZV_ENDPOINT:-}" || "${RDZV_ENDPOINT}" == *:0 ) ]]; then
    echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=<node 0's host>:<free port> (the same on every node), e.g." \
         "RDZV_ENDPOINT=node0:29500; got '${RDZV_ENDPOINT:-(unset)}'" >&2
    exit 2
fi

if [[ "$NGPU" == 1 && "$NNODES" == 1 ]]; then
    # One process needs no launcher; running it directly keeps its exit code (2 = bad input).
    exec "$PYTHON" -m dlm_titan.train "${args[@]}"
fi

# Check the config once before starting many processes, so bad input fails with one line and exit 2. Skipped
# with DLM_TITAN_PRECHECKED=1, set by scripts/slurm_train.sh, which checks once for all nodes: the nodes' checks,
# run at the same time, would race for the dump folder's lock, and a node refused ends the whole job.
if [[ "${DLM_TITAN_PRECHECKED:-0}" != 1 ]]; then
    # LOCAL_WORLD_SIZE: the processes this node starts, checked against its GPUs
    DLM_TITAN_CHECK_ONLY=1 WORLD_SIZE=$((NGPU * NNODES)) LOCAL_WORLD_SIZE=$NGPU "$PYTHON" -m dlm_titan.train "${args[@]}"
fi

# One node meets at a rendezvous of its own on a free port whatever RDZV_ENDPOINT says (it is for NNODES > 1): a run
# given a fixed one (an export left from a multi-node run) while another job used it with the same RDZV_ID joined
# that job's closed rendezvous and waited, without a word, until that job ended.
endpoint=localhost:0
if [[ "$NNODES" != 1 ]]; then endpoint=$RDZV_ENDPOINT; fi

# Only rank 0 prints, so lines keep the `step: N  loss: ...` form that scripts parse (no torchrun prefixes).
# torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT by default; SIGUSR1 (the trainer's other "save and stop",
# common on Slurm) only when asked. SHUTDOWN_TIMEOUT: seconds the trainers get to save before SIGKILL.
# dlm_titan.launch is torchrun ending with the trainers' exit code 2 (bad input) or 130 (Ctrl-C) without its
# traceback, which buried their one error line.
exec "$PYTHON" -m dlm_titan.launch --nnodes "$NNODES" --nproc_per_node "$NGPU" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}" \
    --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-dlm_titan}" \
    -m dlm_titan.train "${args[@]}"
