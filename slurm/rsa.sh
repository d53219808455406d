#!/bin/bash
# MPI permutation RSA over every finished fold (RUN/rsa/rsa.json): one MPI rank per task, started by
# srun with PMI-2 (the pip mpich wheel speaks PMI-2; without --mpi=pmi2 the ranks would silently be
# independent singletons, which --expect-ranks refuses).
#   sbatch --dependency=afterok:<fold array job> --ntasks=8 slurm/rsa.sh
#SBATCH --job-name=dd-rsa
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

if [ -f "$DD_RUN_DIR/rsa/rsa.json" ]; then
    echo "rsa: $DD_RUN_DIR/rsa/rsa.json exists; nothing to do"
    exit 0
fi
stage rsa srun --mpi=pmi2 --kill-on-bad-exit=1 "$DD_PYTHON" -m dist_decode.rsa --run-dir "$DD_RUN_DIR" \
    --expect-ranks "${SLURM_NTASKS:-1}"
