# Sourced by the slurm/*.sh batch scripts: resolve the project, its venv python, store, run directory.
# Everything is overridable by environment variables (sbatch exports the submitting shell's environment):
#   DD_REPO        project root (default: the directory sbatch was called from, $SLURM_SUBMIT_DIR)
#   DD_PYTHON      interpreter (default: $DD_REPO/.venv/bin/python, by absolute path)
#   DD_STORE       packed store (default: $DD_REPO/stores/demo, the store `make demo` prepares)
#   DD_RUN_DIR     run directory (default: $DD_REPO/runs/slurm)
#   DD_PROFILE     settings of a new run: gpu (default) or cpu (an existing run keeps its RUN/config.json)
#   DD_CONFIG      a RunConfig JSON for a new run instead of a profile
#   DD_TRAIN_ARGS  extra dist_decode.train arguments of a new run, e.g. "--set train.steps=200"
# Partition, account, time and GPUs are sbatch's own: flags (sbatch -p gpu -A lab -t 2:00:00 --gpus-per-task=1)
# or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT / SBATCH_GPUS_PER_TASK.
# Every stage runs through `python -m launch.runner` (exec'd, so it receives SLURM's --signal=B:USR1@T warning):
# the stage checkpoints and the job requeues itself, exactly as in the launch.submit route.
set -euo pipefail
DD_REPO="${DD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
DD_PYTHON="${DD_PYTHON:-$DD_REPO/.venv/bin/python}"
DD_STORE="${DD_STORE:-$DD_REPO/stores/demo}"
DD_RUN_DIR="${DD_RUN_DIR:-$DD_REPO/runs/slurm}"
if [ ! -x "$DD_PYTHON" ]; then
    echo "error: no python at $DD_PYTHON; submit from the project root (or set DD_REPO / DD_PYTHON)" >&2
    exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$( [ -n "${SLURM_GPUS_ON_NODE:-}${CUDA_VISIBLE_DEVICES:-}" ] && echo cuda || echo cpu )}"
export PYTHONUNBUFFERED=1
# DeepSpeed JIT-compiles a small C++ op once (~30 s); share the cache with scripts/run_tests.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$DD_REPO/.cache/torch_extensions}"
cd "$DD_REPO"
echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on $(hostname): store=$DD_STORE run=$DD_RUN_DIR"

# stage NAME CMD...: run a stage command through launch.runner in place of this shell
stage() {
    local name="$1"
    shift
    exec "$DD_PYTHON" -m launch.runner --name "$name" -- "$@"
}
