"""``python -m dist_decode.maps --run-dir RUN``: healthy-twin subject maps, per-site group maps, overlap heatmap."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# One ITK/BLAS thread per process: the subject pool is the parallelism (set before numpy/ants load).
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dist_decode.cli import setup_logging  # noqa: E402
from dist_decode.config import override  # noqa: E402
from dist_decode.contracts.run import RunDir  # noqa: E402
from dist_decode.fsutil import DiskFull, disk_full_errors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_decode.maps",
        description="For every finished LOSO fold: decode each held-out patient's reconstruction decoder([c,s]) "
                    "and healthy twin decoder([c,0]) and write the subject maps (NIfTI, store grid): with "
                    "maps.kind density (the default) the effect log(recon/twin) and the deviation "
                    "log(observed/twin) of the grey-matter density; with maps.kind jacobian the log Jacobians of "
                    "the ANTs SyN registrations twin -> recon and twin -> observed. Then per held-out site a "
                    "thresholded one-sample test (maps.test_on; FWE sign-flip maxT by default), and across sites "
                    "the overlap heatmap RUN/maps/overlap.nii.gz, a Dice matrix and a cluster table. Re-running "
                    "skips finished work.")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (with manifest.json and folds/)")
    p.add_argument("--workers", type=int, default=None,
                   help="registration processes (default: config maps.workers; 0 = one per core; 1 = in-process)")
    p.add_argument("--shard", default=None,
                   help="K/N: register only every N-th subject from K (SLURM array / MPI rank); 'auto' reads "
                        "RANK/WORLD_SIZE, PMI_RANK/PMI_SIZE, SLURM_PROCID/SLURM_NTASKS or SLURM_ARRAY_TASK_*")
    p.add_argument("--stage", choices=("all", "jacobians", "group"), default="all",
                   help="jacobians: only the per-subject maps (either kind); group: only group maps + overlap; all: both")
    p.add_argument("--fold", action="append", default=None, metavar="K",
                   help="only this fold (index into the store's sites, or site name; repeatable): its subject and "
                        "group maps, no overlap; run once more without --fold (or with --combine) to combine")
    p.add_argument("--combine", action="store_true",
                   help="only combine: group maps still missing + overlap, Dice, clusters (same as --stage group)")
    p.add_argument("--use-samples", action="store_true", help="decode posterior samples instead of means")
    p.add_argument("--threshold", choices=("fdr", "fwe"), default=None, help="group-map threshold method")
    p.add_argument("--fdr-q", type=float, default=None, help="FDR q of the fdr threshold")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="maps.FIELD=VALUE",
                   help="override any config field (repeatable), e.g. --set maps.smooth_fwhm_mm=4")
    p.add_argument("--force", action="store_true", help="recompute finished outputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("dist_decode.maps")
    try:
        from dist_decode.maps.pipeline import resolve_shard, run_maps

        run = RunDir(args.run_dir)
        run.manifest()  # a started run (clear error otherwise)
        sets = list(args.overrides)
        if args.use_samples:
            sets.append("maps.use_samples=true")
        if args.threshold:
            sets.append(f"maps.threshold={args.threshold}")
        if args.fdr_q is not None:
            sets.append(f"maps.fdr_q={args.fdr_q}")
        cfg = override(run.config(), sets)  # --set changes this invocation only, never the run's config.json
        shard = resolve_shard(args.shard)
        if args.combine and args.fold:
            raise ValueError("--combine and --fold exclude each other")
        stage = "group" if args.combine else args.stage
        with disk_full_errors(Path(args.run_dir) / "maps", "the maps"):
            result = run_maps(args.run_dir, cfg, workers=args.workers, shard=shard, stage=stage,
                              force=args.force, progress=not args.no_progress, folds=args.fold)
    except (FileNotFoundError, ValueError, RuntimeError, DiskFull) as exc:
        log.error("%s", exc)
        return 2
    ov = result.get("overlap")
    if ov:
        log.info("wrote %s (%d sites, max overlap %d, %d clusters)", args.run_dir / "maps" / "overlap.nii.gz",
                 ov["n_sites"], ov["overlap_max"], len(ov["clusters"]))
    elif args.fold:
        log.info("fold(s) %s done; combine with: python -m dist_decode.maps --run-dir %s --combine",
                 ",".join(args.fold), args.run_dir)
    elif stage != "jacobians":
        log.warning("no overlap map yet (see the warnings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
