#!/bin/bash
# The run's numbers (RUN/analysis/analysis.json) and its report (RUN/report/index.html), from whatever stages
# have finished.
#   sbatch --dependency=afterok:<maps job>:<rsa job> slurm/report.sh
#SBATCH --job-name=dd-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

"$DD_PYTHON" -m launch.runner --name analysis -- "$DD_PYTHON" -m dist_decode.analysis --run-dir "$DD_RUN_DIR"
stage report "$DD_PYTHON" -m dist_decode.report --run-dir "$DD_RUN_DIR"
