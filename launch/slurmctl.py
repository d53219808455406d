"""Read-only questions to SLURM: is it there, and what state is a job in.

Job states come from ``scontrol show job`` (kept by slurmctld for ``MinJobAge`` after the end), since
``sacct`` needs accounting, which small clusters and CI often lack.
"""
from __future__ import annotations

import shutil
import subprocess

#: States in which a job will still run (or is running).
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


def slurm_available(timeout: float = 10.0) -> bool:
    """True when ``sbatch`` is installed and a partition of the controller answers as up."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "up" in out.stdout.split()


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """Parse ``scontrol -o show job`` output: one record per line, ``Key=Value`` pairs."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        rec: dict[str, str] = {}
        key = None
        for token in line.split(" "):
            if "=" in token and not token.startswith("="):
                key, _, value = token.partition("=")
                rec[key] = value
            elif key is not None:  # values with spaces (Command=..., Reason=...) continue here
                rec[key] += " " + token
        records.append(rec)
    return records


def job_info(job_id: str, timeout: float = 10.0) -> dict[str, str] | None:
    """The ``scontrol`` record of one job (for an array: its first task), or None when unknown/purged.

    Keys used by the launcher: ``JobState``, ``Reason``, ``ExitCode``, ``Restarts``, ``RunTime``,
    ``StdOut``, ``Dependency``.
    """
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    recs = parse_scontrol(out.stdout)
    return recs[0] if recs else None


def job_state(job_id: str) -> str:
    """Base state of a job (``RUNNING``, ``FAILED``, ...) or ``UNKNOWN`` when SLURM no longer knows it."""
    info = job_info(job_id)
    if not info:
        return "UNKNOWN"
    return info.get("JobState", "UNKNOWN").split()[0]


def cancel(job_id: str) -> None:
    """``scancel`` one job (errors ignored: it may have ended meanwhile)."""
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
