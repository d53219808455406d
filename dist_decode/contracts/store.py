"""``STORE/manifest.json``: the contract between ``data_prep.pack`` (writer) and every reader of a store.

The manifest is written last by the packer (its presence marks a complete store). Its ``loso_ineligible`` entry is
a list of ``{"site": ..., "reason": ...}``: sites whose subjects train every fold but that cannot be held out.
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
