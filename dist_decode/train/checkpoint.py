"""Fold checkpoints: DeepSpeed engine state + discriminator + per-rank RNG states, resumable in place.

Layout::

    FOLD/checkpoints/step000200/   DeepSpeed files (model, optimizer partitions, LR scheduler),
                                   client state (step, discriminator and its optimiser, wall time)
                                   and rng_rank<r>.pt (torch / numpy / python RNG of each rank)
    FOLD/checkpoints/latest        the tag of the newest *complete* checkpoint

``latest`` is written by rank 0 only after every rank has finished writing (barrier) and is
replaced atomically, so a job killed while saving resumes from the previous checkpoint.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_decode.fsutil import atomic_write_text

log = logging.getLogger(__name__)


def tag_of(step: int) -> str:
    """Checkpoint tag of ``step`` (zero-padded so tags sort by step)."""
    return f"step{step:09d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """Tag named in ``ckpt_dir/latest`` when that checkpoint exists, else ``None``."""
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank: int, keep: int = 2) -> str:
    """Save a checkpoint of ``step`` on every rank (collective), then mark it ``latest`` and prune.

    Parameters
    ----------
    engine : deepspeed.DeepSpeedEngine
    ckpt_dir : Path
    step : int
        Number of completed optimiser steps.
    client_state : dict
        Extra state stored with the model (identical on every rank).
    rank : int
    keep : int
        Most recent checkpoints to keep (older ones are deleted by rank 0).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, step=step), save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        atomic_write_text(ckpt_dir / "latest", tag + "\n")
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(0, len(tags) - max(1, keep))]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: Path, rank: int) -> dict[str, Any] | None:
    """Restore the ``latest`` checkpoint into ``engine`` (collective); its client state, or ``None``."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng = Path(ckpt_dir) / tag / f"rng_rank{rank}.pt"
    if rng.is_file():  # absent when resuming with a different world size
        _set_rng_state(torch.load(rng, weights_only=False))
    return client
