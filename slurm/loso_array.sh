#!/bin/bash
# One LOSO fold per array task: task K trains fold K (holds out site K of the store) with DeepSpeed
# data-parallel ranks started by srun (one per task; on GPU nodes add --gpus-per-task=1).
#   sbatch slurm/loso_array.sh                          # the demo's store -> runs/slurm
#   DD_STORE=/data/store DD_RUN_DIR=/scratch/run1 sbatch -p gpu -A lab --ntasks=4 --gpus-per-task=1 slurm/loso_array.sh
#   DD_PROFILE=cpu sbatch slurm/loso_array.sh           # a new run on CPU nodes (cohorts at 3-4 mm)
# Tasks beyond the store's sites and sites that cannot be held out exit 0 with a message, so --array=0-7
# fits any store (slurm/submit_all.sh submits exactly the eligible folds). A finished fold is a no-op; the run's
# config.json (written by the first fold, or by launch.submit) is used by every fold.
# Preemption / scontrol requeue: SLURM sends SIGTERM, the trainer checkpoints and the requeued task resumes.
# Near the time limit (--signal=B:USR1@180) launch.runner makes the fold checkpoint and requeues the task;
# --open-mode=append keeps the log of every attempt in one file.
#SBATCH --job-name=dd-fold
#SBATCH --array=0-7
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
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
settings=()
if [ -n "${DD_CONFIG:-}" ]; then
    settings=(--config "$DD_CONFIG")
elif [ -n "${DD_PROFILE:-}" ]; then
    settings=(--profile "$DD_PROFILE")
fi
# shellcheck disable=SC2086  # DD_TRAIN_ARGS is a word list on purpose
stage "fold $fold" srun --kill-on-bad-exit=1 "$DD_PYTHON" -m dist_decode.train --store "$DD_STORE" \
    --fold "$fold" --run-dir "$DD_RUN_DIR" "${settings[@]}" ${DD_TRAIN_ARGS:-}
