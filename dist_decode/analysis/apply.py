"""The numbers of a run applied to a new cohort: ``OUT/analysis/analysis.json`` (``python -m dist_decode.apply``).

The report (:mod:`dist_decode.report.apply`) renders them; nothing else computes them.

* ``cohort``: the new store's sites and counts, exclusions; ``compatibility``: the grid fields both stores share
  and how much the new store's brain mask overlaps the run's (the models' mask, used for every map);
* ``models``: per fold model, on the new cohort: subjects encoded, mean reconstruction error (masked MSE, model
  units) beside the same model's on its own held-out site, and the SZ/HC separability (AUC of a whitened
  logistic regression, recovery.Whitening) of the new subjects' S and C posterior means, (a) ``auc_s``/``auc_c``:
  stratified k-fold cross-validated within the new cohort, (b) ``auc_s_transfer``/``auc_c_transfer``: trained on
  the model's own training subjects (the run's ``features.h5``) and applied to the new cohort;
* ``maps``: per new site the patients mapped and the mean effect map's extremes (of the mean over models); per
  model the correlation, inside the brain mask, of its per-site mean effect maps with the mean over the models
  (agreement between models);
* ``rsa``: whether the RSA ran (the report renders ``rsa/rsa.json`` itself).

``inputs`` fingerprints what it read, so a later call knows whether it is up to date.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dist_decode.analysis import saved_if_current
from dist_decode.analysis.folds import cohort_summary
from dist_decode.analysis.recovery import cv_auc, transfer_auc
from dist_decode.contracts import features as features_contract
from dist_decode.contracts.apply import ApplyDir
from dist_decode.fsutil import atomic_write_json, read_json

log = logging.getLogger("dist_decode.analysis")
SCHEMA = 1


def inputs_fingerprint(out: ApplyDir, models: list[str]) -> str:
    """Hash of the names, sizes and mtimes of every file the analysis reads, and of this code."""
    h = hashlib.sha256()
    paths = [out.manifest_path, out.completion("maps"), out.completion("rsa")]
    for m in models:
        paths += [out.completion("model", m), out.fold_dir(m) / features_contract.FILE]
    paths += sorted((out.path / "maps").glob("**/mean_effect.nii.gz"))
    for p in paths:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(out.path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if np.size(x) else None


def model_rows(out: ApplyDir, run, run_store, store, models: list[str], seed: int) -> list[dict[str, Any]]:
    """One row per fold model (see the module docstring)."""
    new_patient = np.asarray(store.is_patient, bool)
    run_patients = {str(p) for p, pat in zip(run_store.participant_ids, run_store.is_patient) if pat}
    rows = []
    for k, m in enumerate(models):
        done = read_json(out.completion("model", m))
        if done is None:
            rows.append({"model": m, "status": "not applied"})
            continue
        trained = read_json(run.fold_dir(m) / "DONE") or {}
        row: dict[str, Any] = {"model": m, "status": "done", "n_parameters": trained.get("n_parameters"),
                               "steps": trained.get("steps")}
        try:
            f = features_contract.read(out.fold_dir(m) / features_contract.FILE, split="apply", samples=False)
        except (FileNotFoundError, ValueError) as exc:
            row["status"] = f"done (features.h5 unreadable: {exc})"
            rows.append(row)
            continue
        pat = new_patient[np.asarray(f.index, np.int64)]
        row.update(n=len(f), n_patients=int(pat.sum()), n_controls=int((~pat).sum()))
        if f.recon_error is not None:
            err = np.asarray(f.recon_error, float)
            row.update(recon_error=_mean(err), recon_error_patients=_mean(err[pat]),
                       recon_error_controls=_mean(err[~pat]))
        own = None
        try:
            own = features_contract.read(run.fold_dir(m) / features_contract.FILE, samples=False)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("model %s: the run's own features are unreadable (%s); no transfer AUC", m, exc)
        if own is not None and own.recon_error is not None and (own.split == "test").any():
            row["recon_error_run_heldout"] = _mean(np.asarray(own.recon_error, float)[own.split == "test"])
        cv_seed = int(np.random.SeedSequence([seed, 31337, 7, k]).generate_state(1)[0])
        for space in ("S", "C"):
            x = f.space(space)
            row[f"auc_{space.lower()}"] = cv_auc(x, pat, cv_seed)
            if own is not None:
                tr = own.split != "test"
                y = np.array([p in run_patients for p in own.participant_id[tr]])
                row[f"auc_{space.lower()}_transfer"] = transfer_auc(own.space(space)[tr], y, x, pat)
        rows.append(row)
    return rows


def _load(path: Path) -> np.ndarray | None:
    return np.asarray(nib.load(str(path)).dataobj, np.float64) if path.is_file() else None


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else None


def maps_numbers(out: ApplyDir, mask: np.ndarray) -> dict[str, Any]:
    """Per new site the patients mapped and the extremes of the mean effect; per model its agreement with the mean.

    Reads ``maps/maps.json`` and the site mean maps the maps stage wrote (nothing is decoded here).
    """
    from dist_decode.maps.pipeline import safe_name

    summary = read_json(out.completion("maps"))
    if not isinstance(summary, dict):
        return {"status": "missing", "reason": "maps/maps.json not found (python -m dist_decode.apply --stage maps)"}
    sites, agreement = [], []
    per_model: dict[str, list[float]] = {m: [] for m in summary.get("models", [])}
    for site, info in (summary.get("sites") or {}).items():
        mean = _load(out.path / "maps" / "sites" / safe_name(site) / "mean_effect.nii.gz")
        row: dict[str, Any] = {"site": site, "n_patients": info.get("n_patients")}
        if mean is not None:
            v = mean[mask]
            row.update(mean_effect_min=float(v.min()), mean_effect_max=float(v.max()),
                       mean_abs_effect=float(np.abs(v).mean()))
            for m in per_model:
                mm = _load(out.path / "maps" / "models" / safe_name(m) / "sites" / safe_name(site) / "mean_effect.nii.gz")
                r = _corr(mm[mask], v) if mm is not None else None
                row[f"r {m}"] = r
                if r is not None:
                    per_model[m].append(r)
        sites.append(row)
    for m, rs in per_model.items():
        agreement.append({"model": m, "r_with_mean": float(np.mean(rs)) if rs else None, "sites": len(rs)})
    return {"status": "ok", "n_patients": summary.get("n_patients"), "models": summary.get("models"),
            "kind": (summary.get("key") or {}).get("subjects", {}).get("kind"), "sites": sites,
            "agreement": agreement, "sites_without_patients": summary.get("sites_without_patients", []),
            "config": summary.get("config")}


def analyse_apply(out_dir: str | Path, force: bool = False) -> dict:
    """Compute and write ``OUT/analysis/analysis.json`` unless it is up to date; returns its content."""
    out = ApplyDir(out_dir)
    manifest = out.manifest()
    models = list(manifest["models"])
    key = inputs_fingerprint(out, models)
    path = out.completion("analysis")
    old = None if force else saved_if_current(path, key, SCHEMA)
    if old is not None:
        return old
    run = out.run()
    cfg = run.config()
    run_store = run.store()
    store = out.store()
    cohort = cohort_summary(store)
    for r in cohort["sites"]:
        r.pop("held out", None)  # LOSO notions of the run's store, not of a new cohort
    cohort.pop("ineligible", None)
    run_mask = np.asarray(run_store.mask, bool)
    new_mask = np.asarray(store.mask, bool)
    inter = int((run_mask & new_mask).sum())
    compat = {"fields": manifest.get("compatible", {}), "run_store": manifest.get("run_store"),
              "mask_voxels_run": int(run_mask.sum()), "mask_voxels_new": int(new_mask.sum()),
              "mask_dice": round(2.0 * inter / max(1, int(run_mask.sum() + new_mask.sum())), 4)}
    rows = model_rows(out, run, run_store, store, models, cfg.seed)
    rsa = read_json(out.completion("rsa"))
    rsa_status = ({"status": "missing", "reason": "rsa/rsa.json not found"} if not isinstance(rsa, dict) else
                  {"status": rsa.get("status", "ok"), "reason": rsa.get("reason"), "rows": len(rsa.get("results", []))})
    data = {"schema": SCHEMA, "inputs": key, "out": str(out.path.resolve()), "run": manifest["run"],
            "store": manifest["store"], "seed": cfg.seed, "cohort": cohort, "compatibility": compat,
            "models": {"rows": rows, "missing": manifest.get("models_missing", []),
                       "n_done": sum(r["status"] == "done" for r in rows)},
            "maps": maps_numbers(out, run_mask), "rsa": rsa_status}
    data = json.loads(json.dumps(data, default=str).replace("NaN", "null"))
    atomic_write_json(path, data)
    log.info("wrote %s (%d models)", path, len(rows))
    return data
