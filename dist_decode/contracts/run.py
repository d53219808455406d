"""A run directory: its identity, its one config, its folds and every stage's completion file.

::

    RUN/manifest.json      the store the run is bound to (path + sha256 of its manifest), its LOSO folds (fold index
                           -> held-out site; sites that cannot be held out are listed apart, with the reason),
                           provenance
    RUN/config.json        the run's one RunConfig; every stage reads it
    RUN/normalisation.h5   input normalisation statistics (dist_decode.normalise)
    RUN/folds/<site>/      one LOSO fold; DONE marks it finished
    RUN/maps/              overlap.nii.gz marks the maps stage finished
    RUN/rsa/               rsa.json marks the RSA finished
    RUN/analysis/          analysis.json marks the analysis finished
    RUN/report/            index.html marks the report finished

A run is bound to one store and one config when its first stage starts (:func:`bind`): a later stage or submission
with another store, or with settings that differ from ``config.json``, is refused before any work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dist_decode import provenance
from dist_decode.config import RunConfig, override, profile_config
from dist_decode.contracts import store as store_contract
from dist_decode.fsutil import create_once, read_json

#: Stage -> completion file, relative to the run directory (``{site}``: the fold's held-out site).
COMPLETION = {
    "fold": "folds/{site}/DONE",
    "maps": "maps/overlap.nii.gz",
    "rsa": "rsa/rsa.json",
    "analysis": "analysis/analysis.json",
    "report": "report/index.html",
}
#: train.* fields that do not change the trained weights: a run may resume with other values.
RESUME_FREE = {"log_every", "checkpoint_every", "keep_checkpoints", "val_every", "feature_samples"}


class StageDir:
    """Paths shared by the directories whose stages leave completion files (a run, an apply output).

    Subclasses set :attr:`COMPLETION` (stage -> file relative to the directory; ``{site}`` for per-fold stages).
    """

    COMPLETION: dict[str, str] = {}

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def fold_dir(self, site: str) -> Path:
        """Outputs of fold ``site`` (of the fold model that held ``site`` out)."""
        return self.path / "folds" / site

    def completion(self, stage: str, site: str | None = None) -> Path:
        """The completion file of ``stage`` (a per-fold stage needs the site)."""
        rel = self.COMPLETION[stage]
        if "{site}" in rel:
            if site is None:
                raise ValueError(f"stage {stage!r} is per fold: give the site")
            rel = rel.format(site=site)
        return self.path / rel

    def done(self, stage: str, site: str | None = None) -> bool:
        return self.completion(stage, site).is_file()


class RunDir(StageDir):
    """Paths and identity of a run directory (nothing is read until asked)."""

    COMPLETION = COMPLETION

    # .. paths ..
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    # .. identity ..
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (FileNotFoundError naming the run when it is not a started run)."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: run directory not found")
        m = read_json(self.manifest_path)
        if not isinstance(m, dict) or "store" not in m:
            raise FileNotFoundError(f"{self.manifest_path}: run manifest not found or unreadable (train at least "
                                    "one fold first)")
        return m

    def config(self) -> RunConfig:
        """The run's ``config.json`` (validated)."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path}: the run has no config (train at least one fold first)")
        try:
            return RunConfig.from_saved(self.config_path)
        except ValueError as exc:
            raise ValueError(f"{self.config_path}: {exc}") from exc

    def store_path(self) -> Path:
        """The store the run is bound to (relative paths are relative to the run directory)."""
        p = Path(self.manifest()["store"])
        return p if p.is_absolute() or p.exists() else self.path / p

    def store(self):
        """The run's store, checked against the hash recorded when the run was bound.

        Raises
        ------
        ValueError
            When the store's manifest changed since (the run's results belong to the old contents).
        """
        from dist_decode.data import Store  # torch and h5py: only for the stages that read volumes, not the launcher

        m = self.manifest()
        store = Store.open(self.store_path())
        want = m.get("store_manifest_sha256")
        have = store_contract.manifest_sha256(store.path)
        if want and want != have:
            raise ValueError(f"store {store.path} changed since run {self.path} was made (manifest sha256 {have[:12]}, "
                             f"the run has {want[:12]}); use the original store or a new run directory")
        return store

    def folds(self) -> list[str]:
        """The run's LOSO folds: the store's sites that can be held out, in fold order."""
        return store_contract.fold_sites(store_contract.read_manifest(self.store_path()))

    def done_folds(self) -> list[str]:
        return [s for s in self.folds() if self.done("fold", s)]


def resolve_config(run: RunDir, config: str | os.PathLike | None = None, profile: str | None = None,
                   overrides: list[str] | None = None) -> RunConfig:
    """The config a stage of ``run`` uses.

    A new run: ``config`` or ``profile`` (default ``gpu``) plus ``overrides``. A run with a ``config.json``: that
    config; asking for other settings is refused (a run keeps one config), except ``train`` bookkeeping fields
    (:data:`RESUME_FREE`).

    Raises
    ------
    ValueError, FileNotFoundError
        Both ``config`` and ``profile``, a missing ``config`` file, or settings that differ from the run's (naming
        the fields).
    """
    overrides = list(overrides or [])
    if config and profile:
        raise ValueError("give --config or --profile, not both")
    if config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
        wanted = override(RunConfig.from_json(config), overrides)
    else:
        wanted = profile_config(profile or "gpu", overrides)
    if not run.config_path.is_file():
        return wanted
    have = run.config()
    if config or profile or overrides:
        diff = config_diff(have, wanted)
        if diff:
            raise ValueError(f"{run.config_path} exists with other settings ({'; '.join(diff)}); a run keeps one "
                             "config: use a new --run-dir, or drop --config/--profile/--set to continue this run")
    return have


def config_diff(a: RunConfig, b: RunConfig, ignore_resume_free: bool = True) -> list[str]:
    """``section.field: old -> new`` for every field that differs (train bookkeeping fields left out)."""
    da, db = a.to_dict(), b.to_dict()
    out = [f"seed: {da['seed']!r} -> {db['seed']!r}"] if da["seed"] != db["seed"] else []
    for sec in da:
        if not isinstance(da[sec], dict):
            continue
        for k in sorted(set(da[sec]) | set(db[sec])):
            if ignore_resume_free and sec == "train" and k in RESUME_FREE:
                continue
            if da[sec].get(k) != db[sec].get(k):
                out.append(f"{sec}.{k}: {da[sec].get(k)!r} -> {db[sec].get(k)!r}")
    return out


def bind(run: RunDir, store_path: str | os.PathLike, cfg: RunConfig, created_by: str) -> None:
    """Bind ``run`` to a store and a config: write ``manifest.json`` and ``config.json`` if absent, else check them.

    Safe when several fold jobs start at once: each file is created complete (hard link of a finished temporary
    file) or not at all, and every later caller checks what is there.

    Raises
    ------
    ValueError
        The run is bound to another store (naming both), or its config differs from ``cfg`` (naming the fields).
    """
    store_path = Path(store_path).resolve()
    manifest = store_contract.read_manifest(store_path)
    digest = store_contract.manifest_sha256(store_path)
    fold_sites = set(store_contract.fold_sites(manifest))
    run.path.mkdir(parents=True, exist_ok=True)
    create_once(run.config_path, cfg.to_json() + "\n")
    create_once(run.manifest_path, json.dumps({
        "store": str(store_path), "store_manifest_sha256": digest,
        "folds": {str(i): s for i, s in enumerate(manifest["sites"]) if s in fold_sites},
        "not_held_out": store_contract.ineligible_sites(manifest),
        "git_commit": provenance.git_commit(), "versions": provenance.versions(), "created_by": created_by,
        "created_utc": provenance.now_utc()}, indent=2) + "\n")
    m = run.manifest()
    if m.get("store_manifest_sha256") not in (None, digest):
        raise ValueError(f"run {run.path} is bound to store {m['store']} (manifest sha256 "
                         f"{str(m['store_manifest_sha256'])[:12]}), not {store_path} ({digest[:12]}); use a new "
                         "run directory for another cohort")
    diff = config_diff(run.config(), cfg)
    if diff:
        raise ValueError(f"{run.config_path} exists with other settings ({'; '.join(diff)}); use a new run "
                         "directory or the run's own config")
