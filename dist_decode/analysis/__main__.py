"""``python -m dist_decode.analysis --run-dir RUN``: the numbers of a run, written to ``RUN/analysis/analysis.json``.

The report renders them; nothing else computes them. Contents: ``cohort`` (sites, counts, exclusions, sites that
cannot be held out), ``folds`` (per fold: held-out counts, reconstruction error, SZ/HC AUCs of S and C, size,
steps, time) with each fold's loss ``curves``, and ``recovery`` (synthetic cohorts: every recovery metric beside its
goal, :mod:`dist_decode.analysis.recovery`; ``not_applicable`` on real data). ``inputs`` fingerprints the files it
read, so a later call knows whether it is up to date. Works on partial runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from dist_decode.analysis import saved_if_current
from dist_decode.analysis.folds import cohort_summary, fold_rows
from dist_decode.analysis.recovery import run_recovery
from dist_decode.cli import setup_logging
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import DiskFull, atomic_write_json, disk_full_errors

log = logging.getLogger("dist_decode.analysis")
SCHEMA = 1


def inputs_fingerprint(run: RunDir) -> str:
    """Hash of the names, sizes and mtimes of every file the analysis reads, and of the analysis code itself."""
    h = hashlib.sha256()
    paths = [run.manifest_path, run.config_path, run.path / "maps" / "maps.json", run.path / "maps" / "overlap.nii.gz"]
    for site in run.folds():
        d = run.fold_dir(site)
        paths += [d / "DONE", d / "features.h5", d / "metrics.jsonl"]
    paths += sorted((run.path / "maps" / "sites").glob("*/mean_effect.nii.gz"))
    for p in paths:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(run.path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for mod in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(mod.read_bytes())
    return h.hexdigest()[:16]


def analyse(run_dir: str | Path, force: bool = False) -> dict:
    """Compute and write ``RUN/analysis/analysis.json`` unless it is up to date; returns its content."""
    run = RunDir(run_dir)
    run.manifest()  # a started run (clear error otherwise)
    key = inputs_fingerprint(run)
    path = run.completion("analysis")
    old = None if force else saved_if_current(path, key, SCHEMA)
    if old is not None:
        return old
    cfg = run.config()
    store = run.store()
    patients = {str(p) for p, pat in zip(store.participant_ids, store.is_patient) if pat}
    rows, curves = fold_rows(run, patients, cfg.seed)
    done = [r for r in rows if r["status"].startswith("done")]
    out = {"schema": SCHEMA, "inputs": key, "run_dir": str(run.path.resolve()), "seed": cfg.seed,
           "cohort": cohort_summary(store),
           "folds": {"status": "ok" if done else "missing", "folds": rows, "n_done": len(done),
                     "missing": [r["site"] for r in rows if not r["status"].startswith("done")]},
           "curves": curves, "recovery": run_recovery(run, store, cfg.seed)}
    # strict JSON: undefined statistics become null
    out = json.loads(json.dumps(out, default=str).replace("NaN", "null"))
    atomic_write_json(path, out)
    log.info("wrote %s (%d of %d folds)", path, len(done), len(rows))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_decode.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="run directory")
    p.add_argument("--force", action="store_true", help="recompute even when the analysis is up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        with disk_full_errors(args.run_dir / "analysis", "the analysis"):
            out = analyse(args.run_dir, args.force)
    except (FileNotFoundError, ValueError, KeyError, DiskFull) as exc:
        log.error("%s", exc)
        return 2
    rec = out["recovery"]
    if rec.get("status") == "ok":
        for g in rec["goals"]:
            v = g["value"]
            log.info("%-55s %8s  goal %-10s %s", g["metric"], "n/a" if v is None else f"{v:.3f}", g["goal"],
                     {True: "met", False: "NOT MET", None: ""}[g["met"]])
    else:
        log.info("recovery: %s (%s)", rec.get("status"), rec.get("reason"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
