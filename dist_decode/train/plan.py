"""What a LOSO fold trains on, resolved and checked before any process group exists.

Everything here runs first, so bad input (a missing store, a fold out of range, a held-out site without both
groups, a run bound to another store, a changed config) fails fast with a clear message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_decode.config import RunConfig
from dist_decode.contracts.run import RunDir, bind, config_diff
from dist_decode.data import Store, loso_split


@dataclass
class FoldPlan:
    """What a fold trains on."""

    store_path: Path
    fold: int
    site: str
    fold_dir: Path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def plan_fold(store_path: str | os.PathLike, fold: int, run_dir: str | os.PathLike, cfg: RunConfig) -> FoldPlan:
    """Open the store, bind the run directory to it and to ``cfg``, and resolve the fold.

    Raises
    ------
    FileNotFoundError
        The store does not exist.
    ValueError
        Fold out of range, the held-out site lacks patients or controls, the run belongs to another store or
        config, or the fold was started with another config.
    """
    store = Store.open(store_path)
    split = loso_split(store, fold, cfg.data.val_fraction, cfg.seed)
    run = RunDir(run_dir)
    fold_dir = run.fold_dir(str(split.site))
    check_fold_config(fold_dir, cfg)
    bind(run, store.path, cfg, created_by="dist_decode.train")
    return FoldPlan(store.path, int(fold), str(split.site), fold_dir,
                    np.asarray(split.train), np.asarray(split.val), np.asarray(split.test))


def check_fold_config(fold_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a fold whose ``config.json`` differs from ``cfg`` in anything that shapes training.

    Compared: ``seed`` and the ``data``, ``model``, ``loss`` and ``train`` sections, except the train bookkeeping
    fields (checkpoint interval, logging, feature samples); other stages' sections (rsa, maps) may differ.
    """
    f = fold_dir / "config.json"
    if not f.is_file():
        return
    old = RunConfig.from_saved(f)
    diff = [d for d in config_diff(old, cfg) if d.split(".")[0].split(":")[0] in ("seed", "data", "model", "loss",
                                                                                  "train")]
    if diff:
        raise ValueError(f"{f}: this fold was started with a different config ({'; '.join(diff)}); "
                         "use a new --run-dir or the original settings")
