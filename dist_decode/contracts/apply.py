"""An apply directory: a trained run applied to a new cohort (``python -m dist_decode.apply``).

::

    OUT/manifest.json            the run (path + sha256 of its manifest.json and config.json) and the new store
                                 (path + sha256 of its manifest.json) it belongs to, the grid fields both stores share
    OUT/normalisation.h5         the new cohort's normalisation statistics in the run's units (dist_decode.normalise)
    OUT/folds/<site>/features.h5 every new subject encoded by the run's fold model <site> (split "apply";
                                 dist_decode.contracts.features); DONE marks the model finished (after its maps)
    OUT/maps/                    maps.json marks the maps finished
    OUT/rsa/                     rsa.json marks the RSA finished
    OUT/analysis/                analysis.json marks the analysis finished
    OUT/report/                  index.html marks the report finished

An apply directory is bound to one run and one store when its first stage starts (:func:`bind`): a later stage with
another run or store is refused before any work, and so is a store that a model of the run cannot read (another
grid, mask threshold, dtype or modality than the run's store: :func:`dist_decode.contracts.store.compatibility_diff`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dist_decode import provenance
from dist_decode.contracts import store as store_contract
from dist_decode.contracts.run import RunDir, StageDir
from dist_decode.fsutil import create_once, read_json

#: Stage -> completion file, relative to the apply directory (``{site}``: the model's held-out site in the run).
COMPLETION = {
    "model": "folds/{site}/DONE",
    "maps": "maps/maps.json",
    "rsa": "rsa/rsa.json",
    "analysis": "analysis/analysis.json",
    "report": "report/index.html",
}
#: The ``split`` of every row of an applied model's ``features.h5``.
SPLIT = "apply"
#: Manifest keys that identify what an apply directory belongs to (a re-run must match them).
IDENTITY = ("run", "run_manifest_sha256", "run_config_sha256", "store", "store_manifest_sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ApplyDir(StageDir):
    """Paths and identity of an apply directory (nothing is read until asked)."""

    COMPLETION = COMPLETION

    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (FileNotFoundError naming the directory when it was never bound)."""
        m = read_json(self.manifest_path)
        if not isinstance(m, dict) or not all(k in m for k in IDENTITY):
            raise FileNotFoundError(f"{self.manifest_path}: no apply manifest (run python -m dist_decode.apply "
                                    "--run-dir RUN --store STORE --out OUT first)")
        return m

    def run(self) -> RunDir:
        return RunDir(self.manifest()["run"])

    def store_path(self) -> Path:
        return Path(self.manifest()["store"])

    def store(self):
        """The new cohort's store, checked against the hash recorded when the directory was bound."""
        from dist_decode.data import Store

        m = self.manifest()
        store = Store.open(m["store"])
        have = store_contract.manifest_sha256(store.path)
        if have != m["store_manifest_sha256"]:
            raise ValueError(f"store {store.path} changed since {self.path} was made (manifest sha256 {have[:12]}, "
                             f"recorded {m['store_manifest_sha256'][:12]}); use a new --out")
        return store

    def models(self) -> list[str]:
        """The run's fold models applied here (their held-out sites, in fold order)."""
        return list(self.manifest()["models"])

    def done_models(self) -> list[str]:
        return [s for s in self.models() if self.done("model", s)]


def identity(run: RunDir, store_path: str | os.PathLike) -> dict[str, Any]:
    """What an apply directory of ``run`` on ``store_path`` is bound to, with every check that needs no volume.

    Raises
    ------
    FileNotFoundError
        Not a started run, a run without a finished fold, the run's own store is gone (its manifest is what the new
        store is compared with), or no store at ``store_path``.
    ValueError
        The run's store changed since the run was made, or the new store differs from it in a field of
        :data:`dist_decode.contracts.store.COMPATIBLE_FIELDS` (naming each).
    """
    run_manifest = run.manifest()
    run.config()
    run_store = run.store_path()
    try:
        run_store_manifest = store_contract.read_manifest(run_store)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"the store of run {run.path} is needed (its grid, mask and normalisation are what "
                                f"the models read): {exc}") from exc
    want = run_manifest.get("store_manifest_sha256")
    if want and store_contract.manifest_sha256(run_store) != want:
        raise ValueError(f"store {run_store} changed since run {run.path} was made; use the original store")
    new_manifest = store_contract.read_manifest(store_path)
    new = store_contract.manifest_path(store_path).parent.resolve()
    diff = store_contract.compatibility_diff(run_store_manifest, new_manifest)
    if diff:
        raise ValueError(f"store {new} cannot be read by the models of run {run.path}: it differs from the run's "
                         f"store {run_store} in {'; '.join(diff)} (run's != new); pack the new cohort onto the "
                         "run's grid with the same settings (python -m data_prep.pack)")
    models = run.done_folds()
    if not models:
        raise FileNotFoundError(f"run {run.path} has no finished fold (no folds/<site>/DONE): nothing to apply")
    return {"run": str(run.path.resolve()), "run_manifest_sha256": _sha256(run.manifest_path),
            "run_config_sha256": _sha256(run.config_path), "store": str(new),
            "store_manifest_sha256": store_contract.manifest_sha256(new), "run_store": str(run_store),
            "run_store_manifest_sha256": store_contract.manifest_sha256(run_store), "models": models,
            "models_missing": [s for s in run.folds() if s not in models],
            "compatible": store_contract.compatibility(new_manifest)}


def bind(out: ApplyDir, run: RunDir, store_path: str | os.PathLike, created_by: str) -> dict[str, Any]:
    """Bind ``out`` to ``run`` and a new store: write ``manifest.json`` if absent, else check it. Returns it.

    Safe when several jobs start at once (the manifest is created complete or not at all). A later call with more
    finished folds in the run keeps the models recorded first (a new directory applies the others).

    Raises
    ------
    FileNotFoundError, ValueError
        From :func:`identity`; or ``out`` belongs to another run, run config or store (naming what differs).
    """
    want = identity(run, store_path)
    out.path.mkdir(parents=True, exist_ok=True)
    create_once(out.manifest_path, json.dumps({
        **want, "git_commit": provenance.git_commit(), "versions": provenance.versions(), "created_by": created_by,
        "created_utc": provenance.now_utc()}, indent=2) + "\n")
    have = out.manifest()
    diff = [f"{k}: {have[k]} != {want[k]}" for k in IDENTITY if have[k] != want[k]]
    if diff:
        raise ValueError(f"{out.manifest_path} belongs to another run or store ({'; '.join(diff)}; recorded != "
                         "asked); use a new --out")
    return have
