#!/bin/bash
# Healthy-twin Jacobian maps of every finished fold, then the per-site group maps and the overlap map
# (RUN/maps/overlap.nii.gz). The registrations are split over the job's tasks (srun, --shard auto);
# the group step runs once at the end. Re-running skips finished subjects.
#   sbatch --dependency=afterok:<fold array job> slurm/maps.sh
#SBATCH --job-name=dd-maps
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

if [ -f "$DD_RUN_DIR/maps/overlap.nii.gz" ]; then
    echo "maps: $DD_RUN_DIR/maps/overlap.nii.gz exists; nothing to do"
    exit 0
fi
help="$("$DD_PYTHON" -m dist_decode.maps --help)"
if grep -q -- "--shard" <<<"$help" && grep -q -- "--stage" <<<"$help"; then
    run_step srun --kill-on-bad-exit=1 "$DD_PYTHON" -m dist_decode.maps --run-dir "$DD_RUN_DIR" \
        --stage jacobians --shard auto --workers 1
    run_step "$DD_PYTHON" -m dist_decode.maps --run-dir "$DD_RUN_DIR" --stage group --workers "${SLURM_NTASKS:-1}"
else
    run_step "$DD_PYTHON" -m dist_decode.maps --run-dir "$DD_RUN_DIR"
fi
