"""Per-fold numbers: held-out counts, reconstruction error, how well S and C separate diagnosis, size, time.

The AUCs are those of a logistic regression on whitened posterior means (the same in any basis of the features:
:class:`~dist_decode.analysis.recovery.Whitening`): cross-validated within the held-out site (``auc_s``,
``auc_c``), and trained on the training sites then applied to the held-out site (``..._transfer``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from dist_decode.analysis.recovery import cv_auc, transfer_auc
from dist_decode.contracts import features as features_contract
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import read_json
from dist_decode.model import ANCHOR_N_PARAMETERS


def read_metrics(path: Path) -> dict[str, list]:
    """Training and validation totals per step from a fold's ``metrics.jsonl`` (unreadable lines skipped)."""
    out: dict[str, list] = {"train_step": [], "train_total": [], "val_step": [], "val_total": [], "volumes_per_s": []}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log is still useful
        kind, total = rec.get("kind"), rec.get("total")
        if total is None or "step" not in rec:
            continue
        if kind == "val":
            out["val_step"].append(rec["step"])
            out["val_total"].append(float(total))
        elif kind == "train":
            out["train_step"].append(rec["step"])
            out["train_total"].append(float(total))
            if rec.get("volumes_per_s") is not None:
                out["volumes_per_s"].append(float(rec["volumes_per_s"]))
    return out


def fold_rows(run: RunDir, patient_ids: set[str], seed: int) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """One row per LOSO fold of ``run`` (unfinished folds say so), and each finished fold's loss curves."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict] = {}
    for k, site in enumerate(run.folds()):
        fdir = run.fold_dir(site)
        done = read_json(fdir / "DONE")
        if done is None:
            rows.append({"site": site, "status": "in progress" if fdir.is_dir() else "missing"})
            continue
        row: dict[str, Any] = {"site": site, "status": "done", "model": done.get("model"),
                               "steps": done.get("steps"), "wall_s": done.get("wall_s"),
                               "world_size": done.get("world_size"), "n_parameters": done.get("n_parameters")}
        if row["n_parameters"]:
            row["anchor_parameters"] = ANCHOR_N_PARAMETERS
            row["fewer_than_anchor_pct"] = round(100.0 * (1 - row["n_parameters"] / ANCHOR_N_PARAMETERS), 2)
        try:
            f = features_contract.read(fdir / features_contract.FILE, samples=False)
        except (FileNotFoundError, ValueError) as exc:  # one damaged fold must not sink the whole analysis
            row["status"] = f"done (features.h5 unreadable: {exc})"
            rows.append(row)
            continue
        test, train = f.split == "test", f.split != "test"
        pat = np.array([p in patient_ids for p in f.participant_id])
        row.update(n_test=int(test.sum()), n_test_patients=int((test & pat).sum()),
                   n_test_controls=int((test & ~pat).sum()), n_train=int((f.split == "train").sum()))
        if f.recon_error is not None:
            err = np.asarray(f.recon_error, float)
            row["recon_error_test"] = float(err[test].mean()) if test.any() else None
            tr = f.split == "train"
            row["recon_error_train"] = float(err[tr].mean()) if tr.any() else None
        cv_seed = int(np.random.SeedSequence([seed, 31337, k]).generate_state(1)[0])
        for space in ("S", "C"):
            x = f.space(space)
            row[f"auc_{space.lower()}"] = cv_auc(x[test], pat[test], cv_seed)
            row[f"auc_{space.lower()}_transfer"] = transfer_auc(x[train], pat[train], x[test], pat[test])
        curve = read_metrics(fdir / "metrics.jsonl")
        if curve["train_step"]:
            row["final_train_loss"] = curve["train_total"][-1]
            if curve["volumes_per_s"]:
                row["volumes_per_s"] = float(np.mean(curve["volumes_per_s"]))
        if curve["val_step"]:
            row["final_val_loss"] = curve["val_total"][-1]
        curves[site] = curve
        rows.append(row)
    return rows, curves


def cohort_summary(store) -> dict[str, Any]:
    """Sites, group counts, exclusions and the sites that cannot be held out, from the store manifest."""
    m = store.manifest
    counts = m.get("counts", {})
    rows = []
    for site in store.sites:
        c = counts.get(site, {})
        rows.append({"site": site, **{str(k): int(v) for k, v in c.items()}, "total": int(sum(c.values())),
                     "held out": "no: " + store.ineligible[site] if site in store.ineligible else "yes"})
    excluded = m.get("excluded", []) or []
    reasons: dict[str, int] = {}
    for e in excluded:  # counted by kind: a subject's own figures (its IQR) would make every reason unique
        r = re.sub(r"IQR [\d.]+ = [\d.]+% is below", "IQR below", e.get("reason", "unspecified"))
        reasons[r] = reasons.get(r, 0) + 1
    return {"status": "ok", "sites": rows, "n_sites": len(rows), "n_subjects": int(sum(r["total"] for r in rows)),
            "excluded": excluded, "excluded_by_reason": reasons, "ineligible": store.ineligible,
            "ground_truth": bool(store.ground_truth)}
