#!/bin/bash
# The run's report (RUN/report/index.html), from whatever stages have finished.
#   sbatch --dependency=afterok:<maps job>:<rsa job> slurm/report.sh
#SBATCH --job-name=dd-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --requeue
source "${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"

run_step "$DD_PYTHON" -m dist_decode.report --run-dir "$DD_RUN_DIR"
echo "report: $DD_RUN_DIR/report/index.html"
