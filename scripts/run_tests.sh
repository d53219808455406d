#!/usr/bin/env bash
# Run the whole test suite: bootstraps the venv, starts what the tests need, runs pytest.
# SLURM: scripts/slurm_up.sh starts the project's single-node SLURM (idempotent, ~10 s on a fresh
# machine); if this script started it, a trap stops it at the end (scripts/slurm_down.sh, by PID).
# pytest's exit code is preserved. DIST_DECODE_NO_SLURM=1 skips the start (SLURM tests then skip,
# or fail under CI=true).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
# system packages some tests need (headless chromium for the report rendering test)
bash scripts/install_test_deps.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"

started_slurm=0
stop_slurm() {
    if [ "$started_slurm" = 1 ]; then
        bash scripts/slurm_down.sh || true
    fi
}
trap stop_slurm EXIT
if [ "${DIST_DECODE_NO_SLURM:-0}" != 1 ]; then
    if bash scripts/slurm_up.sh --status; then
        echo "run_tests: SLURM already up; leaving it running afterwards" >&2
    elif bash scripts/slurm_up.sh; then
        started_slurm=1
    else
        echo "run_tests: warning: could not start SLURM; @pytest.mark.slurm tests skip (fail under CI=true)" >&2
    fi
fi

rc=0
.venv/bin/python -m pytest "$@" || rc=$?
exit $rc
