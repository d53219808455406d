"""``python -m dist_decode.analysis --run-dir RUN``: the numbers of a run, written to ``RUN/analysis/``.

``recovery.json``: on a synthetic cohort (a store with ground truth), every recovery metric per held-out site and
overall, beside its goal (:mod:`dist_decode.analysis.recovery`); on real data ``{"status": "not_applicable"}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dist_decode.cli import setup_logging
from dist_decode.fsutil import atomic_write_json

log = logging.getLogger("dist_decode.analysis")


def analyse(run_dir: Path) -> dict:
    """Compute and write ``RUN/analysis/recovery.json``; returns its content."""
    from dist_decode.analysis.recovery import run_recovery
    from dist_decode.config import RunConfig
    from dist_decode.data import Store

    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: run manifest not found (train at least one fold first)")
    store = Store.open(json.loads(manifest.read_text())["store"])
    cfg = RunConfig.from_json(run_dir / "config.json")
    inel = {e["site"] for e in store.manifest.get("loso_ineligible", []) or []}
    sites = [s for s in store.sites if s not in inel]
    rec = run_recovery(run_dir, store, sites, cfg.seed)
    # strict JSON: undefined statistics become null
    rec = json.loads(json.dumps(rec, default=str).replace("NaN", "null"))
    atomic_write_json(run_dir / "analysis" / "recovery.json", rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_decode.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="run directory")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        rec = analyse(args.run_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    if rec.get("status") == "ok":
        for g in rec["goals"]:
            v = g["value"]
            log.info("%-55s %8s  goal %-10s %s", g["metric"], "n/a" if v is None else f"{v:.3f}", g["goal"],
                     {True: "met", False: "NOT MET", None: ""}[g["met"]])
    else:
        log.info("recovery: %s (%s)", rec.get("status"), rec.get("reason"))
    log.info("wrote %s", args.run_dir / "analysis" / "recovery.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
