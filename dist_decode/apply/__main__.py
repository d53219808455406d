"""``python -m dist_decode.apply --run-dir RUN --store NEWSTORE --out OUT``: apply a trained run to a new cohort.

Every fold model of RUN encodes every subject of NEWSTORE (packed with data_prep.pack onto the run's grid) and maps
the new patients against their healthy twins; the maps are averaged over the models, the RSA of the new cohort runs
in each model's S and C spaces, and OUT/analysis/analysis.json and OUT/report/index.html are written. A store whose
grid, mask threshold, dtype or modality differs from the run's store is refused before any work; OUT is bound to RUN
and NEWSTORE (a re-run skips finished work; another run or store is refused).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from dist_decode.cli import setup_logging  # noqa: E402

log = logging.getLogger("dist_decode.apply")
STAGES = ("all", "model", "maps", "rsa", "analysis", "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_decode.apply", description=__doc__.split("\n\n")[0].split(": ", 1)[1].capitalize()
        + "\n\n" + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages (--stage): model (per fold model: features.h5 and the new patients' maps; --model narrows "
               "it), maps (mean over the models), rsa, analysis, report; all = every stage in turn.\n"
               "Examples:\n"
               "  python -m dist_decode.apply --run-dir runs/demo --store stores/new --out runs/demo-new\n"
               "  python -m dist_decode.apply --run-dir RUN --store NEW --out OUT --stage model --model 0\n"
               "  python -m launch.apply --run-dir RUN --store NEW --out OUT --wait    # one job per model")
    p.add_argument("--run-dir", required=True, type=Path, help="the trained run (at least one finished fold)")
    p.add_argument("--store", required=True, type=Path, help="the new cohort's store (data_prep.pack, run's grid)")
    p.add_argument("--out", required=True, type=Path, help="output directory (bound to RUN and STORE)")
    p.add_argument("--stage", choices=STAGES, default="all", help="what to run (default: all)")
    p.add_argument("--model", action="append", default=None, metavar="K",
                   help="--stage model: only this fold model (its held-out site, or fold index; repeatable)")
    p.add_argument("--expect-ranks", type=int, default=None,
                   help="--stage rsa under MPI: fail unless the world has exactly this many ranks")
    p.add_argument("--force", action="store_true", help="recompute finished outputs of the chosen stage(s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    comm = None
    try:
        if args.model and args.stage != "model":
            raise ValueError("--model goes with --stage model")
        from dist_decode.contracts.apply import ApplyDir, bind
        from dist_decode.contracts.run import RunDir

        out = ApplyDir(args.out)
        bind(out, RunDir(args.run_dir), args.store, created_by="dist_decode.apply")  # every check, before any work
        from dist_decode.apply.pipeline import ApplyContext, apply_model, apply_rsa, combine_maps

        ctx = ApplyContext(out.path)
        progress = not args.no_progress
        if args.stage in ("all", "model"):
            models = [ctx.model_of(m) for m in args.model] if args.model else ctx.models
            for m in models:
                apply_model(ctx, m, args.force, progress)
        if args.stage in ("all", "maps"):
            combine_maps(ctx, args.force, progress)
        if args.stage in ("all", "rsa"):
            from dist_decode.rsa.permutation import get_comm

            comm = get_comm(args.expect_ranks)
            ranks = comm.Get_size() if comm is not None else 1
            if comm is not None and comm.Get_rank() != 0:
                logging.getLogger().setLevel(logging.WARNING)
            apply_rsa(ctx, comm, ranks, args.force, progress)
            if comm is not None and comm.Get_rank() != 0:
                return 0
        if args.stage in ("all", "analysis"):
            from dist_decode.analysis.apply import analyse_apply

            analyse_apply(out.path, args.force)
        if args.stage in ("all", "report"):
            from dist_decode.report.apply import build_apply_report

            index = build_apply_report(out.path, args.force)
            print(index)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if comm is not None and comm.Get_size() > 1:
            comm.Abort(2)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
