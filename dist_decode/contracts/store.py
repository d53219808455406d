"""``STORE/manifest.json``: the contract between ``data_prep.pack`` (writer) and every reader of a store.

The manifest is written last by the packer (its presence marks a complete store). Its ``loso_ineligible`` entry is
a list of ``{"site": ..., "reason": ...}``: sites whose subjects train every fold but that cannot be held out.
:data:`COMPATIBLE_FIELDS` are the fields two stores must share for a model trained on one to read the other
(``dist_decode.apply``): :func:`compatibility_diff` names those that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: Version of the store layout; the packer writes it, readers refuse any other.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "grid", "sites", "shards", "counts", "columns", "labels")


def manifest_path(store: str | os.PathLike) -> Path:
    """``STORE/manifest.json`` (``store`` may also be the manifest itself)."""
    p = Path(store)
    return p if p.name == MANIFEST else p / MANIFEST


def read_manifest(store: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a packed store.

    Raises
    ------
    FileNotFoundError
        No manifest (naming how to make one).
    ValueError
        Not JSON, not an object, a required key missing, another schema version, or no sites.
    """
    path = manifest_path(store)
    if not path.is_file():
        raise FileNotFoundError(f"no store at {path.parent}: {path} not found (build one with python -m data_prep.pack "
                                "--cat12-root COHORT --participants COHORT/participants.tsv --out STORE)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"damaged store manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"damaged store manifest {path}: not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"damaged store manifest {path}: missing key(s) {missing}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"store {path.parent} has schema_version {manifest['schema_version']}, this reader reads "
                         f"{SCHEMA_VERSION}")
    sites = manifest["sites"]
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
        raise ValueError(f"{path}: 'sites' must be a non-empty list of site names, got {sites!r}")
    return manifest


def ineligible_sites(manifest: dict[str, Any]) -> dict[str, str]:
    """Site -> reason for every site of the store that cannot be held out."""
    return {str(e["site"]): str(e["reason"]) for e in manifest.get("loso_ineligible") or []}


def fold_sites(manifest: dict[str, Any]) -> list[str]:
    """The sites that are LOSO folds (held out one at a time), in store order."""
    bad = ineligible_sites(manifest)
    return [s for s in manifest["sites"] if s not in bad]


def manifest_sha256(store: str | os.PathLike) -> str:
    """sha256 of the store's manifest file: the identity of the store's contents (checksums included)."""
    return hashlib.sha256(manifest_path(store).read_bytes()).hexdigest()


#: Manifest fields (dotted paths) that must agree for a run trained on one store to be applied to another: the grid
#: (shape, voxel-to-MNI affine, voxel size), how the brain mask was made, the stored dtype, and the image modality
#: when the packer records one. A field absent from both manifests agrees.
COMPATIBLE_FIELDS = ("grid.shape", "grid.affine", "grid.voxel_mm", "mask.threshold", "storage.dtype", "modality")
#: Tolerance (mm) of affine and voxel-size comparisons (JSON round trips of floats).
GRID_TOLERANCE_MM = 1e-4
_ABSENT = object()


def field(manifest: dict[str, Any], dotted: str) -> Any:
    """The value of a dotted manifest field (``grid.shape``), or a sentinel when absent."""
    v: Any = manifest
    for key in dotted.split("."):
        if not isinstance(v, dict) or key not in v:
            return _ABSENT
        v = v[key]
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= GRID_TOLERANCE_MM
    return a == b


def compatibility(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :data:`COMPATIBLE_FIELDS` a manifest has (absent fields left out)."""
    return {f: v for f in COMPATIBLE_FIELDS if (v := field(manifest, f)) is not _ABSENT}


def compatibility_diff(reference: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """``field: reference value != other value`` for every :data:`COMPATIBLE_FIELDS` entry that differs.

    Parameters
    ----------
    reference, other : dict
        Store manifests (:func:`read_manifest`), e.g. a run's store and a new cohort's.
    """
    out = []
    for f in COMPATIBLE_FIELDS:
        a, b = field(reference, f), field(other, f)
        if not _same(a, b):
            show = lambda v: "absent" if v is _ABSENT else json.dumps(v)  # noqa: E731
            out.append(f"{f}: {show(a)} != {show(b)}")
    return out
