"""Where a result came from: the time, the code's git commit and the versions of the packages that made it."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

#: Packages whose versions every run and store records.
PACKAGES = ("dist-decode", "numpy", "scipy", "torch", "deepspeed", "h5py", "hdf5plugin", "nibabel", "nilearn",
            "antspyx", "scikit-learn", "mpi4py")


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's and the installed ``packages``' versions (absent packages are left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
