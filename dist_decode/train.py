"""Train one leave-one-site-out fold with DeepSpeed: ``python -m dist_decode.train --store S --fold K --run-dir R``.

One process per GPU (or per CPU rank), launched by torchrun, ``srun``, the ``deepspeed`` launcher,
submitit, or nothing at all (world size 1). The fold's outputs go to ``RUN/folds/<held-out site>/``
(see docs/training.md and docs/architecture.md):

``config.json``, ``deepspeed.json``, ``metrics.jsonl``, ``checkpoints/``, ``model_final.pt``,
``features.h5`` and, last, ``DONE``. A fold with ``DONE`` is skipped; a fold with a checkpoint
resumes from it (model, optimiser, LR schedule, discriminator, sampler position, RNG states).
SIGTERM / SIGUSR1 make every rank checkpoint at the next step boundary and exit with 128 + signum
(143 / 138) so that SLURM or submitit can requeue the job.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from dist_decode.config import PROFILES, RunConfig, override, profile_config
from dist_decode.fold import check_fold_config, plan_fold
from dist_decode.trainer import FoldInterrupted, deepspeed_config  # noqa: F401 (deepspeed_config: public API)

log = logging.getLogger("dist_decode.train")


def train_fold(store: str | os.PathLike, fold: int, run_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    """Train (or resume, or skip) fold ``fold`` of ``store`` into ``run_dir/folds/<site>``.

    Works in any process that torchrun, srun, the deepspeed launcher or submitit started (their
    environment is read by :func:`dist_decode.distributed.setup_env`) and in a plain process.

    Returns
    -------
    Path
        The fold directory.

    Raises
    ------
    FileNotFoundError, ValueError
        Bad store, fold or config (before any process group is created).
    FoldInterrupted
        After checkpointing on SIGTERM/SIGUSR1.
    """
    from dist_decode.model import loss_kind

    run_dir = Path(run_dir)
    plan = plan_fold(store, fold, run_dir, cfg)
    loss_kind(cfg)  # validates loss.kind against model.name early
    done = plan.fold_dir / "DONE"
    if done.is_file():
        log.info("fold %d (%s): already done (%s)", plan.fold, plan.site, done)
        return plan.fold_dir
    check_fold_config(plan.fold_dir, cfg)
    from dist_decode.trainer import FoldTrainer

    return FoldTrainer(plan, run_dir, cfg).run()



# -- CLI -----------------------------------------------------------------------------------------------

def build_config(args: argparse.Namespace) -> RunConfig:
    """RunConfig from ``--config`` or ``--profile``, then ``--set`` overrides, then the dedicated options."""
    if args.config and args.profile:
        raise ValueError("give --config or --profile, not both")
    cfg = RunConfig.from_json(args.config) if args.config else profile_config(args.profile or "gpu")
    sets = list(args.set or [])
    if args.model:
        sets.append(f"model.name={json.dumps(args.model)}")
        if args.model == "anchor2022":  # the published recipe: raw volumes at 64^3
            sets += ["data.grid=[64,64,64]", 'data.proportional_scaling="none"', "data.smooth_fwhm_mm=0",
                     "data.site_gain=false", "data.site_center=false"]
    if args.steps is not None:
        sets.append(f"train.steps={args.steps}")
    if args.precision:
        sets.append(f"train.precision={json.dumps(args.precision)}")
    if args.zero_stage is not None:
        sets.append(f"train.zero_stage={args.zero_stage}")
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    return override(cfg, sets) if sets else cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dist_decode.train``; returns the process exit status."""
    from dist_decode.cli import setup_logging

    p = argparse.ArgumentParser(prog="python -m dist_decode.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 done (or already done), 2 bad input, 143/138 interrupted by "
                                       "SIGTERM/SIGUSR1 after checkpointing (re-run to resume).")
    p.add_argument("--store", required=True, help="packed store directory (data_prep.pack output)")
    p.add_argument("--fold", required=True, type=int, help="LOSO fold index k: holds out the store's sites[k]")
    p.add_argument("--run-dir", required=True, help="run directory; outputs go to RUN/folds/<site>/")
    p.add_argument("--config", help="RunConfig JSON (e.g. RUN/config.json of another run)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="named settings (default gpu: full grid; cpu: cohorts at 3-4 mm on CPU, docs/science.md)")
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
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    # DeepSpeed's ZeRO-1/2 still calls a torch collective that torch 2.13 marks deprecated (noise per rank)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = build_config(args)
        train_fold(args.store, args.fold, args.run_dir, cfg)
    except FoldInterrupted as exc:
        log.warning("%s", exc)
        return exc.exit_code
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
