#!/usr/bin/env bash
# Install the system packages the test suite needs beyond the venv (idempotent; quick when present).
#   chromium   headless rendering check of the HTML report (tests/test_report*.py)
# Needs root (or sudo) and Debian/Ubuntu apt. Without them it says so and exits 0: the report test then
# falls back to parsing the HTML (and is skipped only outside CI).
set -euo pipefail
have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
if have_chromium; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_deps: no apt-get; install chromium yourself for the report rendering test" >&2
    exit 0
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "install_test_deps: not root and no passwordless sudo; skipping chromium" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
have_chromium && echo "install_test_deps: chromium $(chromium --version 2>/dev/null || true)" >&2
