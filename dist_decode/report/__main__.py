"""``python -m dist_decode.report --run-dir RUN``: the self-contained HTML report of a (possibly partial) run."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from dist_decode.cli import setup_logging  # noqa: E402
from dist_decode.fsutil import DiskFull, disk_full_errors  # noqa: E402
from dist_decode.report.build import build_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_decode.report",
        description="Write RUN/report/index.html (self-contained: figures embedded), report.json, CSV tables and "
                    "figures/*.png: cohort, per-fold table (held-out n, reconstruction error, S/C diagnosis AUC, "
                    "parameter counts vs the 2022 anchor), RSA, overlap maps, Dice, clusters, ground-truth "
                    "recovery (synthetic cohorts) and provenance. The numbers come from the analysis stage "
                    "(RUN/analysis/analysis.json, brought up to date first). Works on partial runs and lists what "
                    "is missing; skips the build when nothing it shows changed.")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory")
    p.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("dist_decode.report")
    try:
        with disk_full_errors(args.run_dir, "the report (or the analysis it brings up to date)"):
            index = build_report(args.run_dir, force=args.force)
    except (FileNotFoundError, ValueError, DiskFull) as exc:
        log.error("%s", exc)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
