#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install dist-decode into it.
# Idempotent: a stamp of setup.cfg skips the install when nothing changed.
#   TORCH_SPEC  torch requirement (default: torch==2.13.0, the local CPU build; on a GPU cluster set
#               e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index configured in pip)
#   VENV        venv folder (default: .venv in the project root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

stamp="$venv/.dist-decode-stamp"
want="$(cat "$root/setup.cfg" | sha256sum | cut -c1-16) $torch_spec"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi
echo "bootstrap: installing into $venv (torch: $torch_spec)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
log="$venv/bootstrap.log"
pip_quiet() {  # keep the terminal readable; show the log when pip fails
    if ! "$venv/bin/pip" install -q "$@" >>"$log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2
        echo "bootstrap: pip install $* failed (full log: $log)" >&2
        exit 1
    fi
}
pip_quiet --upgrade pip setuptools wheel
# torch first and pinned: deepspeed's loose 'torch' requirement must not pull a multi-GB CUDA build.
pip_quiet "$torch_spec"
pip_quiet "$torch_spec" -e "$root[test]"
echo "$want" > "$stamp"
echo "bootstrap: ready" >&2
