#!/bin/bash
# One LOSO fold per array task: task K trains fold K (holds out site K of the store) with DeepSpeed
# data-parallel ranks started by srun (one per task; on GPU nodes add --gpus-per-task=1).
#   sbatch slurm/loso_array.sh                          # the demo's store -> runs/slurm
#   DD_STORE=/data/store DD_RUN_DIR=/scratch/run1 sbatch -p gpu -A lab --ntasks=4 --gpus-per-task=1 slurm/loso_array.sh
# Tasks beyond the store's sites and sites that cannot be held out exit 0 with a message, so --array=0-7
# fits any store (slurm/submit_all.sh submits exactly the eligible folds). A finished fold is a no-op.
# Preemption / scontrol requeue: SLURM sends SIGTERM, the trainer checkpoints and the requeued task resumes.
# Near the time limit (--signal=B:USR1@180) the script requeues itself the same way.
#SBATCH --job-name=dd-fold
#SBATCH --array=0-7
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

fold="${DD_FOLD:-${SLURM_ARRAY_TASK_ID:?not an array task: set DD_FOLD or submit with --array}}"
# exit 1: no such fold / site cannot be held out (nothing to do); 2: unusable store (the task fails)
rc=0
why="$("$DD_PYTHON" -m launch.stages check-fold --store "$DD_STORE" --fold "$fold")" || rc=$?
if [ "$rc" = 1 ]; then
    echo "fold $fold: $why; nothing to do"
    exit 0
elif [ "$rc" != 0 ]; then
    exit "$rc"
fi
config=()
cfg="${DD_CONFIG:-$DD_RUN_DIR/config.json}"
if [ -z "${DD_CONFIG:-}" ] && [ ! -f "$cfg" ] && [ "$DD_STORE" = "$DD_REPO/stores/demo" ]; then
    cfg="$DD_REPO/runs/demo/config.json"  # the demo's store trains with the demo's settings by default
fi
if [ -f "$cfg" ]; then
    config=(--config "$cfg")
    echo "config: $cfg"
fi
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID (the fold resumes from its checkpoint)"; scontrol requeue "$SLURM_JOB_ID"' USR1
# shellcheck disable=SC2086  # DD_TRAIN_ARGS is a word list on purpose
run_step srun --kill-on-bad-exit=1 "$DD_PYTHON" -m dist_decode.train --store "$DD_STORE" --fold "$fold" \
    --run-dir "$DD_RUN_DIR" "${config[@]}" ${DD_TRAIN_ARGS:-}
