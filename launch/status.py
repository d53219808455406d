"""Where a run stands: one line per stage (done / running / pending / failed / not run and why).

``python -m launch.status --run-dir RUN``

Reads ``RUN/launch/plan.json`` and ``RUN/launch/jobs.json`` (written by ``launch.submit``), the stages'
completion files (:mod:`dist_decode.contracts.run`), and, for SLURM jobs, ``scontrol show job``. Exit status: 0 when the report exists and
every planned stage is finished, 3 while jobs are still queued or running, 1 when something failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_decode.cli import setup_logging
from dist_decode.contracts.run import RunDir
from launch import slurmctl


def stage_rows(run_dir: Path) -> list[dict[str, str]]:
    """Status rows ``{name, status, detail}`` of every planned stage of ``run_dir``.

    Raises
    ------
    FileNotFoundError
        When the run was never submitted (no ``RUN/launch/plan.json``).
    """
    plan_path = run_dir / "launch" / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path}: no launch plan; submit the run first (python -m launch.submit ...)")
    plan = json.loads(plan_path.read_text())
    jobs_path = run_dir / "launch" / "jobs.json"
    jobs = json.loads(jobs_path.read_text()).get("jobs", {}) if jobs_path.is_file() else {}
    rows = []
    for st in plan["stages"]:
        job = jobs.get(st["name"], {})
        jid = job.get("job_id")
        status, detail = "not submitted", ""
        if Path(st["done"]).exists() and st["kind"] != "maps_fold":
            status, detail = "done", st["done"]
        elif job.get("cluster") == "slurm" and jid:
            info = slurmctl.job_info(jid)
            if info is None:
                status, detail = "unknown", f"job {jid} no longer known to SLURM"
            else:
                state = info.get("JobState", "UNKNOWN").split()[0]
                reason = info.get("Reason", "None")
                restarts = int(info.get("Restarts", "0") or 0)
                extra = f", restarts {restarts}" if restarts else ""
                if state == "COMPLETED":
                    status = "done" if st["kind"] == "maps_fold" or Path(st["done"]).exists() else "failed"
                    detail = f"job {jid}" + ("" if status == "done" else f": completed without {st['done']}")
                elif state == "CANCELLED" and "Dependency" in reason:
                    status, detail = "not run", f"job {jid} cancelled: an upstream job failed ({reason})"
                elif state in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED", "BOOT_FAIL",
                               "DEADLINE", "PREEMPTED"):
                    status = "failed"
                    detail = f"job {jid} {state} exit {info.get('ExitCode', '?')}; log {info.get('StdOut', job.get('log', ''))}"
                elif state == "PENDING" and "DependencyNeverSatisfied" in reason:
                    status, detail = "not run", f"job {jid} can never start: an upstream job failed"
                elif state == "PENDING":
                    status, detail = "pending", f"job {jid} ({reason}{extra})"
                else:
                    status, detail = state.lower(), f"job {jid} {info.get('RunTime', '')}{extra}"
        elif jid or job.get("state"):
            state = job.get("state", "")
            status = {"COMPLETED": "done", "FAILED": "failed", "CANCELLED": "not run", "RUNNING": "interrupted"}.get(state, state.lower())
            detail = "; ".join(x for x in (f"local job {jid}" if jid else "", job.get("reason", "")) if x)
            if status == "interrupted":
                detail += " (the launcher stopped before it ended; re-run to resume)"
        rows.append({"name": st["name"], "status": status, "detail": detail})
    return rows


def format_status(run_dir: Path) -> str:
    """Human-readable status table of a run."""
    try:
        rows = stage_rows(run_dir)
    except FileNotFoundError as exc:
        return str(exc)
    width = max(len(r["name"]) for r in rows) if rows else 8
    lines = [f"run {run_dir}"]
    lines += [f"  {r['name']:<{width}}  {r['status']:<13} {r['detail']}" for r in rows]
    report = RunDir(run_dir).completion("report")
    lines.append(f"  report: {report if report.exists() else 'not written yet'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="run directory submitted with launch.submit")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    setup_logging()
    run_dir = Path(args.run_dir).absolute()
    try:
        rows = stage_rows(run_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_status(run_dir))
    statuses = {r["status"] for r in rows}
    if statuses <= {"done"} and RunDir(run_dir).done("report"):
        return 0
    if statuses & {"pending", "running", "configuring", "completing", "requeued"}:
        return 3
    return 1


if __name__ == "__main__":
    sys.exit(main())
