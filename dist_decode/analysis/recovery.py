"""Recovery of planted truth: how well a run on a synthetic cohort finds what was put in.

For each held-out site (one LOSO fold), on its held-out patients:

* ``S~specific``: Kendall tau-a between the S-space RDM (Euclidean, posterior means) and the RDM of the planted
  specific factors (``specific_*`` columns of ``ground_truth/scores.tsv``: one severity per factor);
* ``S~common``: the same against the planted common factors (``common_*`` shape factors and ``age_score``);
* ``C~common`` and ``C~specific``: the same for C;
* ``C diagnosis AUC``: cross-validated SZ/HC AUC of a logistic regression on C within the held-out site;
* the **oracle** ``specific~common``: the same tau between the two truth RDMs themselves. Patients of one small
  site are not independent draws of both factor sets, so this is the floor that even a perfect model shows as
  cross-talk (``S~common``, ``C~specific``).

Across sites, the maps: the overlap count at the consistent-site threshold ``ceil(max / 2)`` against
``ground_truth/specific_regions.nii.gz`` inside the store mask (Dice and flagged / planted volume), and against
the planted effect's own half-maximum region, whose Dice with the regions is the ceiling of a half-maximum map.

:data:`GOALS` are the targets of issue 9 (docs/science.md); :func:`goal_table` marks each met or not.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nilearn.image import resample_to_img
from scipy import ndimage
from scipy.spatial.distance import pdist
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline

from dist_decode.contracts import features as features_contract
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import read_json
from dist_decode.rsa.kendall import tau_a

#: metric -> (comparison, target). ``abs<=`` compares the absolute value.
GOALS: dict[str, tuple[str, float]] = {
    "S~specific": (">=", 0.75),
    "S~common": ("abs<=", 0.05),
    "C~common": (">=", 0.75),
    "C~specific": ("abs<=", 0.05),
    "C diagnosis AUC": ("<=", 0.60),
    "maps Dice": (">=", 0.6),
    "maps flagged / planted": ("<=", 3.0),
}
MIN_PATIENTS = 4


# -- ground truth ------------------------------------------------------------------------------------------------
def read_truth(gt_dir: str | Path) -> dict[str, Any]:
    """The planted factors of a synthetic cohort.

    Returns
    -------
    dict
        ``participant_id`` (list), ``specific`` (n, k1), ``common`` (n, k2) float arrays, ``specific_names``,
        ``common_names``.

    Raises
    ------
    FileNotFoundError, ValueError
        No ``scores.tsv``, or one without ``participant_id`` or without specific / common columns.
    """
    path = Path(gt_dir) / "scores.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    cols = list(rows[0]) if rows else []
    if "participant_id" not in cols:
        raise ValueError(f"{path}: no participant_id column")
    spec = [c for c in cols if c.startswith("specific")]
    com = [c for c in cols if c.startswith("common")] + [c for c in cols if c == "age_score"]
    if not spec or not com:
        raise ValueError(f"{path}: needs specific_* and common_* (or age_score) columns; has {cols}")

    def num(v: str) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    return {"participant_id": [r["participant_id"] for r in rows],
            "specific": np.array([[num(r[c]) for c in spec] for r in rows], float),
            "common": np.array([[num(r[c]) for c in com] for r in rows], float),
            "specific_names": spec, "common_names": com}


def rdm_tau(features: np.ndarray, factors: np.ndarray) -> float | None:
    """Kendall tau-a between the Euclidean RDMs of two row-aligned tables (None below 4 rows or no variation)."""
    features, factors = np.asarray(features, float), np.asarray(factors, float)
    if features.shape[0] < MIN_PATIENTS or features.shape[1] == 0:
        return None
    a, b = pdist(features), pdist(factors)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(tau_a(a, b))


class Whitening(BaseEstimator, TransformerMixin):
    """Centre and whiten features on the subjects it is fitted to (principal axes, each scaled to unit variance;
    directions without variance dropped).

    Why not a per-column standardisation: a penalised classifier of standardised columns depends on the feature
    basis. A latent space whose diagnosis signal lies in a low-variance direction mixed into high-variance columns
    then looks free of diagnosis (the C encoder's raw means did: docs/science.md). After whitening, every direction
    is penalised alike, so the AUC is the same in any basis of the same features.
    """

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> "Whitening":
        x = np.asarray(x, float)
        self.mean_ = x.mean(0)
        _, sv, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        keep = sv > 1e-8 * sv.max() if sv.size and sv.max() > 0 else np.zeros(len(sv), bool)
        if not keep.any():  # no variance at all: one constant feature (the classifier then scores chance)
            keep[:1] = True
            sv = np.where(keep, 1.0, sv)
        self.projection_ = vt[keep].T / (sv[keep] / math.sqrt(max(1, len(x) - 1)))
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, float) - self.mean_) @ self.projection_


def diagnosis_classifier():
    """Whitening, then a logistic regression: the classifier of every diagnosis AUC."""
    return make_pipeline(Whitening(), LogisticRegression(max_iter=2000))


def cv_auc(x: np.ndarray, y: np.ndarray, seed: int) -> float | None:
    """Stratified cross-validated AUC of :func:`diagnosis_classifier` (None if a class has < 2 cases)."""
    y = np.asarray(y, bool)
    k = int(min(5, y.sum(), (~y).sum()))
    if k < 2 or np.asarray(x).shape[1] == 0:
        return None
    clf = diagnosis_classifier()
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**31)
    score = cross_val_predict(clf, x, y, cv=cv, method="decision_function")
    return float(roc_auc_score(y, score))


def transfer_auc(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float | None:
    """AUC on the held-out site of a classifier trained on the training sites' subjects."""
    if ytr.all() or not ytr.any() or yte.all() or not yte.any() or np.asarray(xtr).shape[1] == 0:
        return None
    clf = diagnosis_classifier().fit(xtr, ytr)
    return float(roc_auc_score(yte, clf.decision_function(xte)))


# -- per fold ----------------------------------------------------------------------------------------------------
def fold_recovery(pids: np.ndarray, patient: np.ndarray, c: np.ndarray, s: np.ndarray, truth: dict[str, Any],
                  seed: int = 0) -> dict[str, Any]:
    """Recovery metrics of one held-out site (see the module docstring).

    Parameters
    ----------
    pids : array of str
        Held-out subjects.
    patient : bool array
    c, s : ndarray (n, dc), (n, ds)
        Posterior means.
    truth : dict
        :func:`read_truth`.
    seed : int
        Seed of the cross-validation split.
    """
    index = {p: i for i, p in enumerate(truth["participant_id"])}
    known = np.array([p in index for p in pids])
    rows = np.array([index[p] for p in np.asarray(pids)[known]], int)
    patient = np.asarray(patient, bool)[known]
    c, s = np.asarray(c, float)[known], np.asarray(s, float)[known]
    spec, com = truth["specific"][rows], truth["common"][rows]
    p = patient
    ok = np.isfinite(spec).all(1) & np.isfinite(com).all(1)
    pp = p & ok
    out = {"n": int(known.sum()), "n_patients": int(p.sum()),
           "S~specific": rdm_tau(s[pp], spec[pp]), "S~common": rdm_tau(s[pp], com[pp]),
           "C~common": rdm_tau(c[pp], com[pp]), "C~specific": rdm_tau(c[pp], spec[pp]),
           "C~common (all subjects)": rdm_tau(c[ok], com[ok]),
           "oracle specific~common": rdm_tau(spec[pp], com[pp]),
           "C diagnosis AUC": cv_auc(c, p, seed), "S diagnosis AUC": cv_auc(s, p, seed)}
    return out


# -- maps --------------------------------------------------------------------------------------------------------
def planted_half_max(planted_effect: np.ndarray, truth_mask: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """The planted effect's own half-maximum region: each voxel where the planted effect, in its region's
    direction, reaches half that region's peak.

    Each voxel belongs to the planted region (a connected component of ``truth_mask``) whose core is nearest; a
    region's direction and peak are those of its most extreme core voxel. This is what a map that reports each
    effect's width at half maximum (the maps' extent, docs/maps.md) would flag if it recovered the planted effect
    exactly, so for a planted density change (what the density maps measure) its Dice with ``truth_mask`` is
    the ceiling of the maps' Dice on this grid. The synthetic cores are the regions' 1-sigma balls: a Gaussian
    density loss's half maximum reaches 1.18 sigma (on a 3 mm grid the shell between them can hold as many voxel
    centres as the core). A planted shape change is a log Jacobian, which falls to half its peak inside 1 sigma
    (its core is where it reaches 40 %) and which a density map sees through the tissue it moves: there the
    figure is a reference, not a bound.
    """
    effect = np.asarray(planted_effect, float)
    mask = np.asarray(brain_mask, bool)
    truth = np.asarray(truth_mask, bool) & mask
    labels, n = ndimage.label(truth, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(truth.shape, bool)
    _, nearest = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = labels[tuple(nearest)]  # the label of each voxel's nearest core voxel
    index = np.arange(1, n + 1)
    lo = np.asarray(ndimage.minimum(effect, labels, index), float)
    hi = np.asarray(ndimage.maximum(effect, labels, index), float)
    peak = np.concatenate([[0.0], np.where(-lo >= hi, lo, hi)])  # signed peak of each region (label 0 unused)
    directed = effect * np.sign(peak[owner])
    return mask & (np.abs(peak[owner]) > 0) & (directed >= 0.5 * np.abs(peak[owner]))


def maps_recovery(overlap: np.ndarray, truth_mask: np.ndarray, brain_mask: np.ndarray,
                  mean_effect: np.ndarray | None = None, planted_effect: np.ndarray | None = None) -> dict[str, Any]:
    """The overlap map against the planted regions (inside the brain mask).

    Returns
    -------
    dict
        ``threshold`` (ceil(max / 2) sites), ``flagged``, ``planted`` voxels, ``maps Dice``,
        ``maps flagged / planted``, ``dice_by_min_sites``, and, with ``planted_effect``: ``dice_half_max`` (the
        flagged map against the planted effect's own half-maximum region, :func:`planted_half_max`) and
        ``dice_ceiling`` (that region against the planted regions: the Dice of a map that recovered each planted
        effect's half maximum exactly); with ``mean_effect`` too: ``corr_mean_effect_vs_planted``.
    """
    ov = np.asarray(overlap, float)
    mask = np.asarray(brain_mask, bool)
    truth = np.asarray(truth_mask, bool) & mask
    top = int(ov.max())
    k = max(1, math.ceil(top / 2))
    flagged = (ov >= k) & mask

    def dice(a: np.ndarray, b: np.ndarray) -> float | None:
        total = int(a.sum() + b.sum())
        return None if total == 0 else 2.0 * float((a & b).sum()) / total

    out: dict[str, Any] = {
        "overlap_max": top, "threshold": k, "flagged": int(flagged.sum()), "planted": int(truth.sum()),
        "maps Dice": dice(flagged, truth) if top > 0 else 0.0,
        "maps flagged / planted": float(flagged.sum()) / max(1, int(truth.sum())),
        "dice_by_min_sites": {str(j): dice((ov >= j) & mask, truth) for j in range(1, max(top, 1) + 1)},
    }
    if planted_effect is not None:
        half = planted_half_max(planted_effect, truth, mask)
        out["planted_half_max"] = int(half.sum())
        out["dice_half_max"] = dice(flagged, half) if top > 0 else 0.0
        out["dice_ceiling"] = dice(half, truth)
    if mean_effect is not None and planted_effect is not None:
        e, m = np.asarray(planted_effect, float)[mask], np.asarray(mean_effect, float)[mask]
        out["corr_mean_effect_vs_planted"] = float(np.corrcoef(e, m)[0, 1]) if e.std() > 0 and m.std() > 0 else None
    return out


# -- summary -----------------------------------------------------------------------------------------------------
def met(metric: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the goal of ``metric`` (None when undefined)."""
    if value is None or not np.isfinite(value) or metric not in GOALS:
        return None
    op, target = GOALS[metric]
    if op == ">=":
        return bool(value >= target)
    if op == "<=":
        return bool(value <= target)
    return bool(abs(value) <= target)


def goal_table(folds: list[dict[str, Any]], maps: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per goal: the mean over folds (maps: across sites), the goal, met or not, the folds used."""
    rows = []
    for metric in ("S~specific", "S~common", "C~common", "C~specific", "C diagnosis AUC"):
        vals = [f[metric] for f in folds if f.get(metric) is not None]
        value = float(np.mean(vals)) if vals else None
        # the standard error over the held-out sites: a site of 5-30 patients moves a tau by 0.1-0.2 by itself
        se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None
        rows.append({"metric": metric, "value": value, "goal": _goal_text(metric), "met": met(metric, value),
                     "folds": len(vals), "se": se, "min": float(np.min(vals)) if vals else None,
                     "max": float(np.max(vals)) if vals else None})
    oracle = [f["oracle specific~common"] for f in folds if f.get("oracle specific~common") is not None]
    for metric in ("maps Dice", "maps flagged / planted"):
        value = (maps or {}).get(metric)
        rows.append({"metric": metric, "value": value, "goal": _goal_text(metric), "met": met(metric, value),
                     "folds": (maps or {}).get("sites"), "se": None, "min": None, "max": None})
    rows.append({"metric": "oracle specific~common (floor of the cross-talk rows)",
                 "value": float(np.mean(oracle)) if oracle else None, "goal": "", "met": None,
                 "folds": len(oracle), "se": None, "min": None, "max": None})
    return rows


def _goal_text(metric: str) -> str:
    op, target = GOALS[metric]
    return {">=": f">= {target:g}", "<=": f"<= {target:g}", "abs<=": f"|.| <= {target:g}"}[op]


# -- a run -------------------------------------------------------------------------------------------------------
def run_recovery(run: RunDir, store, seed: int) -> dict[str, Any]:
    """Every recovery metric of a run whose store has ground truth.

    Parameters
    ----------
    run : RunDir
    store : dist_decode.data.Store
        The run's store.
    seed : int
        The run's seed (cross-validation splits).

    Returns
    -------
    dict
        ``status``, ``folds`` (per held-out site), ``maps``, ``goals`` (:func:`goal_table`), ``ground_truth``.
    """
    gt = store.ground_truth
    if not gt:
        return {"status": "not_applicable", "reason": "the cohort has no ground truth (real data)"}
    try:
        truth = read_truth(gt)
    except (FileNotFoundError, ValueError) as exc:
        return {"status": "missing", "reason": str(exc)}
    patients = {str(p) for p, pat in zip(store.participant_ids, np.asarray(store.is_patient)) if pat}
    folds = []
    for k, site in enumerate(run.folds()):
        if not run.done("fold", site):
            continue
        try:
            f = features_contract.read(run.fold_dir(site) / features_contract.FILE, split="test", samples=False)
        except (FileNotFoundError, ValueError) as exc:  # reported in the fold table; the others still count
            folds.append({"site": site, "status": f"features.h5 unreadable: {exc}"})
            continue
        patient = np.array([p in patients for p in f.participant_id])
        r = fold_recovery(f.participant_id, patient, f.space("C"), f.space("S"), truth,
                          int(np.random.SeedSequence([seed, 4242, k]).generate_state(1)[0]))
        folds.append({"site": site, "status": "ok", **r})
    maps = None
    ov_path = run.path / "maps" / "overlap.nii.gz"
    reg_path = Path(gt) / "specific_regions.nii.gz"
    if ov_path.is_file() and reg_path.is_file():
        ov_img = nib.load(str(ov_path))
        reg = _on_grid(reg_path, ov_img, "nearest") > 0
        eff_path = Path(gt) / "specific_effect.nii.gz"
        means = [np.asarray(nib.load(str(p)).dataobj, float)
                 for p in sorted((run.path / "maps" / "sites").glob("*/mean_effect.nii.gz"))]
        planted = _on_grid(eff_path, ov_img, "continuous") if eff_path.is_file() else None
        maps = maps_recovery(np.asarray(ov_img.dataobj), reg, np.asarray(store.mask, bool),
                             np.mean(means, axis=0) if means else None, planted)
        maps["sites"] = (read_json(run.path / "maps" / "maps.json") or {}).get("n_sites")
    ok = [f for f in folds if f["status"] == "ok"]
    return {"status": "ok" if ok else "missing", "ground_truth": str(gt), "folds": folds, "maps": maps,
            "goals": goal_table(ok, maps),
            "subjects": "held-out patients of each site (C diagnosis AUC: every held-out subject)",
            "reason": None if ok else "no finished fold with readable features"}


def _on_grid(path: Path, ref_img, interpolation: str) -> np.ndarray:
    """A ground-truth image on the grid of ``ref_img`` (resampled with nilearn when the grids differ)."""
    img = nib.load(str(path))
    if img.shape[:3] != ref_img.shape[:3] or not np.allclose(img.affine, ref_img.affine, atol=1e-3):
        img = resample_to_img(img, ref_img, interpolation=interpolation, force_resample=True, copy_header=True)
    return np.asarray(img.dataobj, float)
