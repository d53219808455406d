#!/bin/bash
# The schizophrenia-specific maps of every finished fold, then the per-site group maps and the overlap map
# (RUN/maps/overlap.nii.gz). The per-subject work is split over the job's tasks (srun, --shard auto); the group
# step runs once at the end. Re-running skips finished subjects.
#   sbatch --dependency=afterok:<fold array job> slurm/maps.sh
#SBATCH --job-name=dd-maps
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

if [ -f "$DD_RUN_DIR/maps/overlap.nii.gz" ]; then
    echo "maps: $DD_RUN_DIR/maps/overlap.nii.gz exists; nothing to do"
    exit 0
fi
"$DD_PYTHON" -m launch.runner --name "maps (subjects)" -- srun --kill-on-bad-exit=1 "$DD_PYTHON" -m dist_decode.maps \
    --run-dir "$DD_RUN_DIR" --stage jacobians --shard auto --workers 1
stage "maps (group)" "$DD_PYTHON" -m dist_decode.maps --run-dir "$DD_RUN_DIR" --stage group --workers "${SLURM_NTASKS:-1}"
