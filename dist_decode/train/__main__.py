"""``python -m dist_decode.train``: train one LOSO fold (see :mod:`dist_decode.train`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from dist_decode.cli import setup_logging
from dist_decode.config import PROFILES, RunConfig
from dist_decode.contracts.run import RunDir, resolve_config
from dist_decode.fsutil import DiskFull
from dist_decode.train.loop import FoldInterrupted, train_fold

log = logging.getLogger("dist_decode.train")


def build_config(args: argparse.Namespace) -> RunConfig:
    """The fold's config: the run's ``config.json`` when it has one (asking for other settings is refused), else
    ``--config`` or ``--profile`` (default gpu); then ``--set`` and the dedicated options."""
    sets = list(args.set or [])
    if args.model:
        sets.append(f"model.name={json.dumps(args.model)}")
        if args.model == "anchor2022":  # the published recipe: raw volumes at 64^3
            sets += ["data.grid=[64,64,64]", 'data.proportional_scaling="none"', "data.smooth_fwhm_mm=0",
                     "data.site_gain=false", "data.site_center=false", 'model.route="joint"',
                     'model.decoder="conv"']
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.precision:
        sets.append(f"train.precision={json.dumps(args.precision)}")
    if args.zero_stage is not None:
        sets.append(f"train.zero_stage={args.zero_stage}")
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    return resolve_config(RunDir(args.run_dir), args.config, args.profile, sets)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_decode.train",
                                description="Train one leave-one-site-out fold with DeepSpeed (torchrun, srun, the "
                                            "deepspeed launcher, submitit or a plain process).",
                                epilog="Exit status: 0 done (or already done), 2 bad input or a full disk (nothing "
                                       "half-written is kept), 143/138 interrupted by SIGTERM/SIGUSR1 after "
                                       "checkpointing (re-run to resume).")
    p.add_argument("--store", required=True, help="packed store directory (data_prep.pack output)")
    p.add_argument("--fold", required=True, type=int, help="LOSO fold index k: holds out the store's sites[k]")
    p.add_argument("--run-dir", required=True, help="run directory; outputs go to RUN/folds/<site>/")
    p.add_argument("--config", help="RunConfig JSON for a new run (an existing run uses its own config.json)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="named settings for a new run (default gpu: full grid; cpu: cohorts at 3-4 mm on CPU)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="config override, value parsed as JSON (repeatable), e.g. --set train.batch_size=4")
    p.add_argument("--model", choices=["decode_sz", "vae", "anchor2022"],
                   help="model (anchor2022 also sets data.grid=64^3 and raw, unnormalised inputs)")
    p.add_argument("--steps", type=int, help="optimiser steps (train.steps)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="train.precision")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], help="DeepSpeed ZeRO stage (train.zero_stage)")
    p.add_argument("--seed", type=int, help="run seed (model init, data order, noise, feature samples)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # DeepSpeed's ZeRO-1/2 still calls a torch collective that torch 2.13 marks deprecated (noise per rank)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = build_config(args)
        train_fold(args.store, args.fold, Path(args.run_dir), cfg)
    except FoldInterrupted as exc:
        log.warning("%s", exc)
        return exc.exit_code
    except (FileNotFoundError, ValueError, DiskFull) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
