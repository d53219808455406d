"""Fold checkpoints: DeepSpeed engine state + discriminator + per-rank RNG states, resumable in place.

Layout::

    FOLD/checkpoints/step000200/   DeepSpeed files (model, optimizer partitions, LR scheduler),
                                   client state (step, discriminator and its optimiser, wall time)
                                   and rng_rank<r>.pt (torch / numpy / python RNG of each rank)
    FOLD/checkpoints/latest        the tag of the newest *complete* checkpoint

``latest`` is written by rank 0 only after every rank has finished writing (barrier) and is
replaced atomically, so a job killed while saving resumes from the previous checkpoint. Before that, rank 0
records the sha256 of every file of the checkpoint in ``step.../CHECKSUMS.json``: on resume a checkpoint whose files
are missing, truncated or altered (a full disk, a bad block, a copy cut short) is detected and the newest intact
older one is used instead (``train.keep_checkpoints`` >= 2 keeps one).

A full disk while saving raises :class:`dist_decode.fsutil.DiskFull` naming the checkpoint; the unfinished
``step...`` folder is removed (it was never ``latest``), so the previous checkpoint stays the one a re-run resumes
from. Unfinished folders left by a rank killed while saving (newer than ``latest``) are removed on resume.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dist_decode.fsutil import DiskFull, atomic_write_json, atomic_write_text, disk_full_errors, read_json

log = logging.getLogger(__name__)

#: Per-checkpoint file of the sha256 of every other file in it (written last, by rank 0).
CHECKSUMS = "CHECKSUMS.json"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(tag_dir: Path) -> None:
    """Record the sha256 and size of every file of a finished checkpoint."""
    tag_dir = Path(tag_dir)
    sums = {str(p.relative_to(tag_dir)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in _files(tag_dir)}
    atomic_write_json(tag_dir / CHECKSUMS, sums)


def damage(tag_dir: Path) -> str | None:
    """Why the checkpoint in ``tag_dir`` cannot be trusted (a file missing, cut short or altered), else ``None``.

    A checkpoint written before checksums were recorded has no ``CHECKSUMS.json`` and is trusted as it is.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return "missing"
    sums = read_json(tag_dir / CHECKSUMS)
    if sums is None:
        return "unreadable CHECKSUMS.json" if (tag_dir / CHECKSUMS).exists() else None
    for rel, want in sums.items():
        f = tag_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def intact_tag(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that is intact: ``latest`` unless damaged, else the newest intact older one."""
    ckpt_dir = Path(ckpt_dir)
    newest = latest_tag(ckpt_dir)
    if newest is None:
        return None
    tags = sorted((p.name for p in ckpt_dir.iterdir()
                   if p.is_dir() and p.name.startswith("step") and p.name <= newest), reverse=True)
    for tag in tags:
        why = damage(ckpt_dir / tag)
        if why is None:
            return tag
        log.warning("checkpoint %s is damaged (%s); trying the one before", ckpt_dir / tag, why)
    raise RuntimeError(f"{ckpt_dir}: every checkpoint is damaged; remove the folder to train this fold from scratch")


@contextlib.contextmanager
def _discarded_if_disk_full(ckpt_dir: Path, tag: str) -> Iterator[None]:
    """Writes of checkpoint ``tag``: a full disk raises :class:`DiskFull` naming it, after its unfinished folder is
    removed (the other ranks fail with it: srun --kill-on-bad-exit, a lost peer)."""
    try:
        with disk_full_errors(ckpt_dir / tag, "the checkpoint"):
            yield
    except DiskFull:
        discard_unfinished(ckpt_dir, tag)
        raise


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
    _save_through_python_files(engine)
    with _discarded_if_disk_full(ckpt_dir, tag):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(client_state, step=step),
                               save_latest=False)
        with open(ckpt_dir / tag / f"rng_rank{rank}.pt", "wb") as fh:
            torch.save(_rng_state(), fh)
    dist.barrier()
    if rank == 0:
        with _discarded_if_disk_full(ckpt_dir, tag):
            write_checksums(ckpt_dir / tag)
            atomic_write_text(ckpt_dir / "latest", tag + "\n")
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(0, len(tags) - max(1, keep))]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def _save_through_python_files(engine) -> None:
    """Make DeepSpeed's torch checkpoint engine hand ``torch.save`` a Python file instead of a path.

    Given a path, torch's C++ zip writer reports a full disk, an exceeded quota or file size limit only as
    ``unexpected pos N vs M``; through a Python file the ``OSError`` (ENOSPC, EDQUOT, EFBIG) stays the cause, and
    :func:`dist_decode.fsutil.is_disk_full` can tell a full disk from a bug. Other engines are left alone.
    """
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce).__name__ != "TorchCheckpointEngine" or getattr(ce, "_dist_decode_files", False):
        return

    def save(state_dict, path: str) -> None:
        with open(path, "wb") as fh:
            torch.save(state_dict, fh, _use_new_zipfile_serialization=ce.zipfile_serialization)

    ce.save = save
    ce._dist_decode_files = True


def discard_unfinished(ckpt_dir: Path, tag: str | None = None) -> list[str]:
    """Remove checkpoint folders that never became ``latest``: ``tag``, or every one newer than ``latest``.

    They are the remains of a save cut short (a full disk, a rank killed while saving). Never loaded anyway, they
    take the space and, once ``latest`` moves past them, would look like finished older checkpoints.
    Returns the tags removed.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    newest = latest_tag(ckpt_dir) or ""
    if not newest and (ckpt_dir / "latest").exists():
        return []  # `latest` names a folder that is gone: leave everything as it is for a person to look at
    if tag is not None:
        tags = [tag] if tag != newest and (ckpt_dir / tag).is_dir() else []
    else:
        tags = sorted(p.name for p in ckpt_dir.iterdir()
                      if p.is_dir() and p.name.startswith("step") and p.name > newest)
    for t in tags:
        log.warning("removing the unfinished checkpoint %s", ckpt_dir / t)
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    return tags


def load(engine, ckpt_dir: Path, rank: int) -> dict[str, Any] | None:
    """Restore the newest intact checkpoint into ``engine`` (collective); its client state, or ``None``.

    Rank 0 removes unfinished checkpoints, checks the checksums, and every rank loads the tag it chose.
    """
    if rank == 0:
        discard_unfinished(ckpt_dir)
    choice = [intact_tag(ckpt_dir) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    tag = choice[0]
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
