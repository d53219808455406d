#!/usr/bin/env bash
# The GPU path, measured: bash benchmarks/gpu_check.sh OUT.json [extra gpu_check.py options]
#
# Thin wrapper around benchmarks/gpu_check.py (see its docstring and docs/training.md "GPU check"): sets the
# environment, runs it under a hard time limit (GPU_CHECK_TIMEOUT_S, default 480 s = 8 minutes; the Python part
# stops starting new cases at GPU_CHECK_BUDGET_S, default 420 s) and keeps the JSON it wrote so far if the limit
# is hit. On a machine without CUDA it runs the same code at a tiny size (device "cpu" in the JSON).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT.json [gpu_check.py options]" >&2
    exit 2
fi
out=$1; shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
# a plain process of world size 1: never inherit a launcher's rank variables
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_PORT
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
limit=${GPU_CHECK_TIMEOUT_S:-480}
budget=${GPU_CHECK_BUDGET_S:-$((limit - 60))}
set +e
timeout --kill-after=15 "$limit" "$python" "$root/benchmarks/gpu_check.py" --out "$out" --budget-s "$budget" "$@"
rc=$?
set -e
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: hit the ${limit} s limit; $out holds the cases finished before it" >&2
fi
exit "$rc"
