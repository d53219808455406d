#!/bin/bash
# Submit the whole run with plain sbatch: the fold array, then maps and RSA (afterok: all folds), then
# the report (afterok: maps and RSA). A failed fold cancels everything downstream
# (--kill-on-invalid-dep=yes); fix it and run this again: finished folds and stages are no-ops.
#   bash slurm/submit_all.sh                    # the demo's store -> runs/slurm
#   DD_STORE=... DD_RUN_DIR=... bash slurm/submit_all.sh -p gpu -A lab   # extra args go to every sbatch
# Environment: see slurm/env.sh; DD_FOLDS ('all' or '0,3'), DD_FOLD_TASKS (ranks per fold, default 2),
# DD_RSA_RANKS (default 2). Prints the job ids (one per line: fold, maps, rsa, report).
set -euo pipefail
DD_REPO="${DD_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export DD_REPO
DD_PYTHON="${DD_PYTHON:-$DD_REPO/.venv/bin/python}"
export DD_STORE="${DD_STORE:-$DD_REPO/stores/demo}"
export DD_RUN_DIR="${DD_RUN_DIR:-$DD_REPO/runs/slurm}"
cd "$DD_REPO"
array="$("$DD_PYTHON" -m launch.stages array --store "$DD_STORE" --folds "${DD_FOLDS:-all}")"
logs="$DD_RUN_DIR/launch/slurm"
mkdir -p "$logs"
common=(--parsable --kill-on-invalid-dep=yes "$@")
fold=$(sbatch "${common[@]}" --array="$array" --ntasks="${DD_FOLD_TASKS:-2}" -o "$logs/%x-%A_%a.out" slurm/loso_array.sh)
maps=$(sbatch "${common[@]}" --dependency="afterok:$fold" -o "$logs/%x-%j.out" slurm/maps.sh)
rsa=$(sbatch "${common[@]}" --dependency="afterok:$fold" --ntasks="${DD_RSA_RANKS:-2}" -o "$logs/%x-%j.out" slurm/rsa.sh)
report=$(sbatch "${common[@]}" --dependency="afterok:$maps:$rsa" -o "$logs/%x-%j.out" slurm/report.sh)
echo "submitted: folds $fold (array $array), maps $maps, rsa $rsa, report $report; logs in $logs" >&2
echo "run directory: $DD_RUN_DIR" >&2
printf '%s\n' "$fold" "$maps" "$rsa" "$report"
