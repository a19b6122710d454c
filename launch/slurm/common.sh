#!/usr/bin/env bash
# Shared by the sbatch scripts: derive the rendezvous from SLURM's variables and run (or, with
# CLSGEN_DRY_RUN=1, print) the launch command. Sourced, not run.
# shellcheck shell=bash

# Repository root: sbatch copies the script to a spool folder, so prefer the submit directory.
CLSGEN_ROOT=${CLSGEN_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}
cd "$CLSGEN_ROOT" || exit 1

mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}")
NNODES=${SLURM_NNODES:-${#NODES[@]}}
MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
# A port derived from the job id keeps concurrent jobs sharing a node apart.
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# SLURM_GPUS_ON_NODE is a count; SLURM_GPUS_PER_NODE may read "h100:8".
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:+${SLURM_GPUS_PER_NODE##*:}}}}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
PYTHON=${PYTHON:-python}
export MASTER_ADDR MASTER_PORT HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# When SLURM itself signals every process (preemption, scancel), torchrun gives its workers this long
# to save before it kills them (its default is 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-280}

# The launch command, filled by distributed_cmd and used by the sourcing script.
# shellcheck disable=SC2034
CMD=()

run() {  # run "$@", or print it (one shell-quoted line) under CLSGEN_DRY_RUN=1
  if [ "${CLSGEN_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# distributed_cmd SCRIPT ARGS... — the command that starts SCRIPT on every GPU of every node.
distributed_cmd() {
  local script=$1
  shift
  case ${LAUNCHER:-torchrun} in
    torchrun)
      # shellcheck disable=SC2034
      CMD=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
           "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE"
           --rdzv_id="${SLURM_JOB_ID:-0}" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
           "$script" "$@")
      ;;
    deepspeed)  # the DeepSpeed launcher reaches the other nodes over ssh (pdsh) with a hostfile
      local hosts=() addr=()  # one node: local processes, no hostfile (it would need ssh to this node)
      if [ "$NNODES" -gt 1 ]; then
        HOSTFILE=${HOSTFILE:-${OUTPUT_DIR:-.}/hostfile}
        if [ "${CLSGEN_DRY_RUN:-0}" != 1 ]; then
          mkdir -p "$(dirname "$HOSTFILE")"
          for n in "${NODES[@]}"; do echo "$n slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
        fi
        hosts=(--hostfile "$HOSTFILE" --num_nodes "$NNODES")
        addr=(--master_addr "$MASTER_ADDR")
      fi
      # shellcheck disable=SC2034
      CMD=(deepspeed "${hosts[@]}" --num_gpus "$GPUS_PER_NODE" "${addr[@]}" --master_port "$MASTER_PORT"
           "$script" "$@")
      ;;
    *)
      echo "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
      exit 2
      ;;
  esac
}

# setting_from_args KEY DEFAULT ARGS...: the value of the last KEY=value among ARGS, else DEFAULT.
# The scripts pass output_dir= and ds_config= to the trainer and must know the values that win.
setting_from_args() {
  local key=$1 value=$2 a
  shift 2
  for a in "$@"; do
    case $a in "$key="*) value=${a#"$key="} ;; esac
  done
  printf '%s\n' "$value"
}

# run_requeueable: run CMD; USR1 (--signal=B:USR1@N, N seconds before the time limit) or TERM
# (preemption) to this shell creates $OUTPUT_DIR/STOP, which the trainer checks every step: every
# rank saves a checkpoint and exits, and if this attempt left $OUTPUT_DIR/PREEMPTED the job requeues
# itself (it then continues with resume=auto). A file rather than a forwarded signal: torchrun and
# the DeepSpeed launcher kill their workers 30 s after passing one on (too soon for a large save),
# and the DeepSpeed runner does not pass it on at all. Returns the run's exit status. Under
# CLSGEN_DRY_RUN=1 it only prints CMD.
run_requeueable() {
  if [ "${CLSGEN_DRY_RUN:-0}" = 1 ]; then
    run "${CMD[@]}"
    return 0
  fi
  local child status=0
  # shellcheck disable=SC2329  # invoked by the trap
  forward() { mkdir -p "$OUTPUT_DIR" && touch "$OUTPUT_DIR/STOP"; }
  trap forward USR1 TERM
  # PREEMPTED must come from this attempt: an earlier one's would requeue a failed attempt (say, one
  # resumed with other settings) forever. (The exit status cannot tell: torchrun exits non-zero
  # when SLURM's SIGTERM reached it, even when every rank saved and exited 0.) A stale STOP would
  # stop this attempt after one step.
  rm -f "$OUTPUT_DIR/PREEMPTED" "$OUTPUT_DIR/STOP"
  "${CMD[@]}" &
  child=$!
  while :; do  # a trapped signal interrupts wait (status > 128): wait again, for the save and the exit
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break  # it has exited: status is its exit status
  done
  if [ -f "$OUTPUT_DIR/PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "stopped early (checkpoint saved): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
