"""Schedule a trained run's application to a new cohort: one job per fold model, then maps, RSA, analysis, report.

``python -m launch.apply --run-dir RUN --store NEWSTORE --out OUT [--wait]``

A thin shell over the ``launch.submit`` machinery (submitit on SLURM or locally, afterok dependencies, the one
time-limit mechanism of ``launch.runner``): every job runs ``python -m dist_decode.apply ... --stage S``
(:func:`launch.stages.build_apply_plan`). ``OUT`` is bound to RUN and NEWSTORE first
(:func:`dist_decode.contracts.apply.bind`), so a store on another grid or an OUT of another run or store is refused
before anything is queued. Idempotent like ``launch.submit``: finished stages are skipped, live jobs reused.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dist_decode.cli import setup_logging
from dist_decode.contracts.apply import ApplyDir, bind, identity
from dist_decode.contracts.run import RunDir
from launch.stages import build_apply_plan
from launch.submit import INTERRUPTED, execute

log = logging.getLogger("launch.apply")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.apply", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="the trained run (its finished fold models are applied)")
    p.add_argument("--store", required=True, help="the new cohort's store (data_prep.pack, on the run's grid)")
    p.add_argument("--out", required=True, help="output directory (bound to RUN and STORE)")
    g = p.add_argument_group("scheduling (as launch.submit)")
    g.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="'auto' = SLURM when sinfo answers, else local (default: auto)")
    g.add_argument("--rsa-ranks", type=int, default=1, help="MPI ranks of the RSA job (default: 1)")
    g.add_argument("--partition", default=os.environ.get("DD_PARTITION"), help="SLURM partition (default: $DD_PARTITION)")
    g.add_argument("--account", default=os.environ.get("DD_ACCOUNT"), help="SLURM account (default: $DD_ACCOUNT)")
    g.add_argument("--stage-time", type=int, default=120, help="time limit of every job in minutes (default: 120)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="SLURM: seconds before the time limit at which a job is requeued (default: 120)")
    g.add_argument("--max-parallel", type=int, default=None,
                   help="local cluster only: jobs running at once (default: the number of CPU cores)")
    g.add_argument("--wait", action="store_true", help="follow the jobs until the report exists (always on locally)")
    g.add_argument("--poll", type=float, default=0.5, help="seconds between status polls with --wait (default: 0.5)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the commands, submit nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # launch.submit.Launcher reads these fold-job settings; apply jobs are single-node CPU jobs
    p.set_defaults(nodes=1, time=120, cpus_per_task=1, maps_cpus=1, gpus_per_fold=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    out = ApplyDir(Path(args.out).absolute())
    run = RunDir(Path(args.run_dir).absolute())
    try:
        # every check (grid, mask, dtype, another run or store) before anything is queued; --dry-run writes nothing
        manifest = identity(run, args.store) if args.dry_run else bind(out, run, args.store, "launch.apply")
        sites = {s: int(k) for k, s in run.manifest()["folds"].items()}
        models = {sites[m]: m for m in manifest["models"]}
        stages = build_apply_plan(run.path, args.store, out.path, models, rsa_ranks=args.rsa_ranks)
        return execute(stages, Path(args.store).absolute(), out.path, args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED.replace("RUN", "OUT"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
