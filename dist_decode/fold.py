"""What a LOSO fold trains on, and the run-level files every fold shares.

Everything here runs before any process group exists, so bad input (a missing store, a fold out of
range, a held-out site without both groups, a changed config) fails fast with a clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_decode.config import RunConfig


@dataclass
class FoldPlan:
    """What a fold trains on, resolved (and validated) before any process group exists."""

    store_path: Path
    fold: int
    site: str
    fold_dir: Path
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray



def plan_fold(store_path: str | os.PathLike, fold: int, run_dir: str | os.PathLike, cfg: RunConfig) -> FoldPlan:
    """Open the store and resolve the fold; raises clear errors for bad input.

    Raises
    ------
    FileNotFoundError
        The store does not exist.
    ValueError
        Fold out of range, or the held-out site lacks patients or controls.
    """
    from dist_decode.data import Store, loso_split

    store_path = Path(store_path)
    if not (store_path / "manifest.json").is_file():
        raise FileNotFoundError(f"store {store_path}: no such packed store (manifest.json missing; run data_prep.pack)")
    store = Store.open(store_path)
    split = loso_split(store, fold, cfg.data.val_fraction, cfg.seed)
    fold_dir = Path(run_dir) / "folds" / str(split.site)
    return FoldPlan(store_path, int(fold), str(split.site), fold_dir,
                    np.asarray(split.train), np.asarray(split.val), np.asarray(split.test))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import deepspeed
    import h5py
    import torch

    import dist_decode

    return {"python": platform.python_version(), "dist_decode": dist_decode.__version__, "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "numpy": np.__version__, "h5py": h5py.__version__}


def write_run_files(plan: FoldPlan, run_dir: Path, cfg: RunConfig) -> None:
    """``RUN/config.json`` and ``RUN/manifest.json``, created only if absent."""
    from dist_decode.data import Store

    store = Store.open(plan.store_path)
    manifest = {
        "store": str(plan.store_path.resolve()),
        "store_manifest_sha256": _sha256(plan.store_path / "manifest.json"),
        "folds": {str(i): str(s) for i, s in enumerate(store.sites)},
        "git_commit": _git_commit(),
        "versions": _versions(),
        "created_by": "dist_decode.train",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _link_json(run_dir / "config.json", cfg.to_dict())
    _link_json(run_dir / "manifest.json", manifest)


def _link_json(path: Path, obj: Any) -> None:
    """Create ``path`` with JSON ``obj`` unless it exists (hard-link of a complete temp file: atomic, no overwrite)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


#: train.* fields that do not change the trained weights: a restart may change them
_RESUME_FREE = {"log_every", "checkpoint_every", "keep_checkpoints", "val_every", "feature_samples"}


def check_fold_config(fold_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume a fold whose ``config.json`` differs from ``cfg`` in anything that shapes training.

    Compared: ``seed`` and the ``data``, ``model``, ``loss`` and ``train`` sections, except the
    bookkeeping fields in ``_RESUME_FREE``; other stages' sections (rsa, maps, ...) may differ.
    """
    f = fold_dir / "config.json"
    if not f.is_file():
        return
    a, b = RunConfig.from_json(f).to_dict(), cfg.to_dict()
    diff = [f"seed: {a['seed']!r} -> {b['seed']!r}"] if a["seed"] != b["seed"] else []
    for sec in ("data", "model", "loss", "train"):
        for k in sorted(set(a[sec]) | set(b[sec])):
            if sec == "train" and k in _RESUME_FREE:
                continue
            if a[sec].get(k) != b[sec].get(k):
                diff.append(f"{sec}.{k}: {a[sec].get(k)!r} -> {b[sec].get(k)!r}")
    if diff:
        raise ValueError(f"{f}: this fold was started with a different config ({'; '.join(diff)}); "
                         "use a new --run-dir or the original settings")
