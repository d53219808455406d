"""Protect what exists at the packer's ``--out``: a store of another cohort, or a folder that is not a store.

A store's cohort is its participants.tsv as ``participant_id -> site`` (every row, packed or excluded). The
packer writes it to ``STORE/pack-in-progress.json`` before the first shard, and to the manifest (``cohort``)
at the end, when it removes the in-progress file. So an interrupted pack is recognised and resumed, and an
``--out`` holding another cohort's store is refused before any work, naming the difference (sites and subjects
added, removed or moved), unless ``overwrite`` is given; a non-empty folder that is not a store is always
refused. Overwriting removes only the store's own files, the manifest first.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dist_decode.fsutil import atomic_write_json

log = logging.getLogger("data_prep.guard")

IN_PROGRESS = "pack-in-progress.json"
MANIFEST = "manifest.json"
MASK = "mask.nii.gz"

#: participant_id -> site (None where an older store does not say).
Cohort = dict[str, "str | None"]


def by_site(cohort: dict[str, str]) -> dict[str, list[str]]:
    """``{site: [participant ids]}`` in first-seen order (the manifest's ``cohort`` entry)."""
    out: dict[str, list[str]] = {}
    for pid, site in cohort.items():
        out.setdefault(site, []).append(pid)
    return out


def _from_by_site(entry: dict[str, list[str]]) -> Cohort:
    return {pid: site for site, ids in entry.items() for pid in ids}


def _shard_cohort(shards: list[Path]) -> Cohort:
    """Subjects named inside shard files (packed and excluded), with their sites."""
    import h5py
    import hdf5plugin  # noqa: F401

    out: Cohort = {}
    for path in shards:
        try:
            with h5py.File(path, "r") as h5:
                site = str(h5.attrs.get("site", "")) or None
                for pid in h5["participant_id"].asstr()[...]:
                    out[str(pid)] = site
                for e in json.loads(h5.attrs.get("excluded", "[]")):
                    out.setdefault(str(e["participant_id"]), site)
        except (OSError, KeyError, ValueError) as exc:  # an unreadable leftover says nothing about the cohort
            log.debug("cannot read %s (it is rewritten or removed): %s", path, exc)
    return out


def existing(out: Path) -> tuple[str, Cohort, bool]:
    """What is at ``out``.

    Returns
    -------
    kind : {"none", "store", "other"}
        Nothing (missing or empty folder), a store (complete or interrupted), or something else.
    cohort : dict
        The store's cohort (empty unless ``kind == "store"``).
    complete : bool
        Whether the cohort is known in full (False: only the subjects inside the shards of an interrupted
        or older store).
    """
    if not out.exists():
        return "none", {}, True
    if not out.is_dir():
        return "other", {}, True
    entries = list(out.iterdir())
    if not entries:
        return "none", {}, True
    shards = sorted((out / "shards").glob("*.h5")) if (out / "shards").is_dir() else []
    for name in (IN_PROGRESS, MANIFEST):
        path = out / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "other", {}, True
            if not isinstance(data, dict) or data.get("tool") != "data_prep.pack":
                return "other", {}, True
            if isinstance(data.get("cohort"), dict):
                return "store", _from_by_site(data["cohort"]), True
            return "store", _shard_cohort(shards), False  # a manifest of a packer without the cohort entry
    if shards or [p.name for p in entries] == ["shards"]:  # an interrupted pack of an older packer, or nothing yet
        return "store", _shard_cohort(shards), False
    return "other", {}, True


def difference(old: Cohort, new: dict[str, str], complete: bool = True) -> str:
    """What differs between two cohorts, e.g. ``sites added: siteC; 3 subjects removed (sub-A0001, ...)``.

    Empty when they are the same cohort. With ``complete=False`` ``old`` lists only some subjects, so subjects
    and sites of ``new`` missing from it are not differences.
    """
    def some(ids: list[str]) -> str:
        return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")

    parts = []
    old_sites = {s for s in old.values() if s is not None}
    new_sites = set(new.values())
    if complete and new_sites - old_sites:
        parts.append("sites added: " + ", ".join(sorted(new_sites - old_sites)))
    if old_sites - new_sites:
        parts.append("sites removed: " + ", ".join(sorted(old_sites - new_sites)))
    added = [p for p in new if p not in old]
    removed = [p for p in old if p not in new]
    moved = [p for p in new if p in old and old[p] is not None and old[p] != new[p]]
    if complete and added:
        parts.append(f"{len(added)} subject(s) added ({some(added)})")
    if removed:
        parts.append(f"{len(removed)} subject(s) removed ({some(removed)})")
    if moved:
        parts.append(f"{len(moved)} subject(s) moved to another site ("
                     + ", ".join(f"{p}: {old[p]} -> {new[p]}" for p in moved[:3]) + (", ..." if len(moved) > 3 else "")
                     + ")")
    return "; ".join(parts)


def check(out: Path, cohort: dict[str, str], overwrite: bool = False) -> None:
    """Refuse an ``--out`` that holds another cohort's store (unless ``overwrite``) or anything but a store.

    With ``overwrite`` a store of another cohort is removed (:func:`remove_store`). The same cohort passes: its
    finished shards are resumed.

    Raises
    ------
    ValueError
        Naming ``out`` and the difference (or what is there), and the way out.
    """
    kind, old, complete = existing(out)
    if kind == "none":
        return
    if kind == "other":
        what = "is a file" if not out.is_dir() else "holds " + ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise ValueError(f"--out {out} is not a store and not empty ({what}); the packer writes only into a new or "
                         "empty folder or an existing store: choose another --out")
    diff = difference(old, cohort, complete)
    if not diff:
        return
    if not overwrite:
        raise ValueError(f"--out {out} holds the store of another cohort ({diff}); pass --overwrite to replace it, "
                         "or choose another --out")
    log.warning("replacing the store of another cohort at %s (%s)", out, diff)
    remove_store(out)


def remove_store(out: Path) -> None:
    """Remove a store's own files (manifest first, so it never looks complete half-removed); nothing else."""
    for name in (MANIFEST, IN_PROGRESS, MASK):
        (out / name).unlink(missing_ok=True)
    shards = out / "shards"
    if shards.is_dir():
        for f in sorted(shards.glob("*.h5")) + sorted(shards.glob(".*.tmp-*")):
            f.unlink()


def mark_in_progress(out: Path, cohort: dict[str, str], sources: dict[str, str]) -> None:
    """Record the cohort being packed into ``out`` (read by :func:`existing` if the run is interrupted)."""
    atomic_write_json(out / IN_PROGRESS, {"tool": "data_prep.pack", "cohort": by_site(cohort), "sources": sources})


def done(out: Path) -> None:
    """Remove the in-progress record once the manifest is written."""
    (out / IN_PROGRESS).unlink(missing_ok=True)
