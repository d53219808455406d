"""Supervised ceilings of the recovery metrics: what a linear read-out *trained on the truth* reaches per cohort.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ceiling.py --workdir /tmp/science --cohorts small,weak

The unsupervised model never sees the planted factors. To know whether a miss (say S~specific 0.70 against the goal
of 0.75) is the method's or the cohort's, this fits, per LOSO fold, a ridge regression (``RidgeCV``, generalised
cross-validation over ``ALPHAS``) from the run's own normalised inputs (``dist_decode.normalise.model_inputs``: TIV
scaling, smoothing, per-site gain and centring, exactly what the encoders read, on the store's grid inside its
mask) to the planted factors of the training sites' subjects:

* *specific*: trained on the training sites' patients, to their planted ``specific_*`` severities;
* *common*: trained on every training-site subject, to the planted ``common_*`` factors and ``age_score``.

It predicts the held-out site's patients and scores the predictions with the same statistic as the recovery
metrics (:func:`dist_decode.analysis.recovery.rdm_tau`: Kendall tau-a between Euclidean RDMs), mean over folds:
the ``ridge S~specific`` and ``ridge C~common`` ceilings. The issue's own reference: a supervised ridge reached
~0.82 on its density cohort.

The same read-out fitted on the run's own latent features instead of the volumes (the fold's ``features.h5``:
training-site subjects' posterior means -> planted factors, scored on the held-out patients) says whether a space
*holds* the factors even where its own geometry does not match theirs: ``S read-out`` and ``C read-out``. (The
recovery metrics compare distances in the space as it is; an unsupervised space weights each factor by how much
image variance it explains, which the planted factors' scales need not follow.)

What the S encoder can read: ``ridge S encoder reads`` is the same ridge fitted on what the S encoder's linear
head receives (the fold's trained model: for the convolutional encoder its flattened features, for the dense
encoder the brain voxels of its input grid), and ``ridge encoder input`` the ridge on the encoder's whole input
(the normalised volumes resampled to ``model.encoder_voxel_mm``). If the first stays below the second, the encoder's
architecture, not its training, caps S.

What the trained decoder knows: ``salient mean map`` scores each held-out patient's residual after the common
branch (``x - common(c)``, c from the C encoder) on the salient decoder's mean patient map (``salient(mean s of
the training patients)``), both taken off the span of the training controls' residuals. A read-out set by the
decoder (fitted to all patients together) instead of the S encoder; one direction, so it cannot hold two factors.

How C's space is read: ``C~common whitened`` (and ``C~specific whitened``, its cross-talk) is the metric with
C's held-out posterior means whitened in C's active subspace first (principal directions of the training-site
subjects' posterior means holding more than 1 % of their variance, each scaled to unit variance): every direction
C uses at equal weight, as the planted factors are, instead of in proportion to its image variance.
``S~specific whitened``: the same for S (fitted on the training-site patients).

What labels alone allow: ``diagnosis direction`` is the held-out patients' score on a linear discriminant of
diagnosis (shrinkage LDA on the training sites' inputs, in their first 100 principal components), scored against
the planted severity. ``patients off the control span`` is another labels-only direction: the training patients'
mean minus the training controls' mean, with its projection on the span of the training controls' deviations
removed (what patients have on average and no control shows). Neither knows the severities; where they reach the
ridge, the labels alone point to the severity and an unsupervised S could too.

Reads the ``full`` run of each cohort made by ``bench_science.py`` (same workdir);
writes ``WORKDIR/ceiling.json`` (one entry per cohort and run variant) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dist_decode.analysis.recovery import GOALS, read_truth, rdm_tau  # noqa: E402
from dist_decode.contracts import features as features_contract  # noqa: E402
from dist_decode.contracts.run import RunDir  # noqa: E402
from dist_decode.model import load_fold_model  # noqa: E402
from dist_decode.normalise import model_inputs  # noqa: E402

ALPHAS = np.logspace(-1, 6, 29)
#: the run's own metrics (from science.json) shown beside the ceilings
RUN_METRICS = ("S~specific", "C~common")
#: the printed table's columns, in order
COLUMNS = ("S~specific", "S read-out", "ridge S~specific", "ridge encoder input", "ridge S encoder reads",
           "diagnosis direction", "patients off the control span", "C~common", "C read-out", "ridge C~common",
           "C~common whitened", "C~specific whitened", "S~specific whitened", "salient mean map")
log = logging.getLogger("bench_ceiling")


def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """RidgeCV (GCV over :data:`ALPHAS`) on standardised targets; predictions for ``x_test``."""
    from sklearn.linear_model import RidgeCV

    mu, sd = y_train.mean(0), y_train.std(0) + 1e-12
    model = RidgeCV(alphas=ALPHAS).fit(x_train, (y_train - mu) / sd)
    return model.predict(x_test).reshape(len(x_test), -1)


def diagnosis_direction(x_train: np.ndarray, patient_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Scores of ``x_test`` on a shrinkage LDA of patients vs controls in the training data's first 100 PCs."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    pca = PCA(n_components=min(100, len(x_train) - 1), random_state=0).fit(x_train)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(pca.transform(x_train), patient_train)
    return lda.decision_function(pca.transform(x_test))[:, None]


def encoder_reads(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(what the S encoder's head reads, the encoder's whole input) for volumes ``x`` (n, X, Y, Z) of a fold's
    ``model``."""
    import torch

    from dist_decode.model.decode_sz import DenseEncoder

    enc = model.specific
    heads, inputs = [], []
    with torch.no_grad():
        for start in range(0, len(x), 32):
            # the model's own input path (scaling, resampling to the encoder grid, padding)
            e = model._encoder_input(model._prep(torch.from_numpy(x[start:start + 32]).float()))
            flat = e.flatten(1)
            heads.append(flat.index_select(1, enc.index) if isinstance(enc, DenseEncoder)
                         else enc.dense(enc.features(e)))
            inputs.append(flat)
    return torch.cat(heads).double().numpy(), torch.cat(inputs).double().numpy()


def off_span(controls: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``direction`` without its projection on the span of the ``controls``' deviations from their mean."""
    _, sv, vt = np.linalg.svd(controls - controls.mean(0), full_matrices=False)
    span = vt[sv > 1e-6 * sv.max()]
    return direction - span.T @ (span @ direction)


def off_control_span(x_train: np.ndarray, patient_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Scores of ``x_test`` on the patients' mean difference from the controls, off the controls' span."""
    controls = x_train[~patient_train]
    return (x_test @ off_span(controls, x_train[patient_train].mean(0) - controls.mean(0)))[:, None]


def salient_mean_map(model, x: np.ndarray, train_patients: np.ndarray, train_controls: np.ndarray,
                     test: np.ndarray) -> np.ndarray:
    """Scores of the ``test`` rows of volumes ``x`` (n, X, Y, Z) on a fold ``model``'s salient mean map (module
    docstring)."""
    import torch

    if not hasattr(model, "salient"):
        raise ValueError("the salient mean map needs the additive DECODE-SZ model")
    idx = torch.from_numpy(np.flatnonzero(np.asarray(model.mask).ravel()))
    with torch.no_grad():
        rows = np.flatnonzero(train_patients | train_controls | test)
        xt = torch.from_numpy(x[rows]).float()
        c, _ = model.encode_common(xt)
        s, _ = model.encode_specific(xt)
        twin = model.decode(c, torch.zeros_like(s)).flatten(1).index_select(1, idx).double().numpy()
        resid = xt.flatten(1).index_select(1, idx).double().numpy() - twin
        at = {r: k for k, r in enumerate(rows)}
        pick = lambda m: np.array([at[r] for r in np.flatnonzero(m)])  # noqa: E731
        mean_map = model.salient(s[pick(train_patients)].mean(0, keepdim=True)).flatten(1).index_select(1, idx)
    ctl = resid[pick(train_controls)]
    direction = off_span(ctl, mean_map.double().numpy()[0])
    return ((resid[pick(test)] - ctl.mean(0)) @ direction)[:, None]


def whitener(x_train: np.ndarray, min_share: float = 0.01):
    """Map to the whitened active subspace of ``x_train`` (principal directions above ``min_share`` of the
    variance, each scaled to unit variance)."""
    mu = x_train.mean(0)
    _, sv, vt = np.linalg.svd(x_train - mu, full_matrices=False)
    keep = sv ** 2 > min_share * (sv ** 2).sum()
    scale = sv[keep] / np.sqrt(len(x_train) - 1)
    return lambda x: (x - mu) @ vt[keep].T / scale


def cohort_ceiling(run_path: Path) -> dict:
    """Per-fold and mean ridge ceilings of one run (see the module docstring)."""
    run = RunDir(run_path)
    cfg = run.config()
    store = run.store()
    truth = read_truth(store.ground_truth)
    pos = {p: i for i, p in enumerate(truth["participant_id"])}
    pids = [str(p) for p in store.participant_ids]
    rows = np.flatnonzero([p in pos for p in pids])  # store rows with planted truth
    t_rows = np.array([pos[pids[r]] for r in rows])
    spec_all, com_all = truth["specific"], truth["common"]  # truth rows
    patients = {str(p) for p, x in zip(store.participant_ids, store.is_patient) if x}
    patient_of = np.array([p in patients for p in truth["participant_id"]])
    spec, com, patient = spec_all[t_rows], com_all[t_rows], patient_of[t_rows]  # store rows
    site = np.asarray(store.site_of)[rows]
    mask = np.asarray(store.mask, bool)
    volumes = model_inputs(run_path, store, cfg, rows).numpy()[:, 0]
    x = volumes[:, mask]
    folds = []
    for held in run.folds():
        test, train = site == held, site != held
        tp, trp = test & patient, train & patient
        pred_s = ridge_predict(x[trp], spec[trp], x[tp])
        pred_c = ridge_predict(x[train], com[train], x[tp])
        latents = []  # (C, S, truth rows) of the fold's training-site and held-out subjects
        for split in ("train", "test"):
            f = features_contract.read(run.fold_dir(held) / features_contract.FILE, split=split, samples=False)
            latents.append((f.space("C"), f.space("S"), np.array([pos[str(p)] for p in f.participant_id])))
        (c_tr, s_tr, i_tr), (c_te, s_te, i_te) = latents
        pat_tr, pat_te = patient_of[i_tr], patient_of[i_te]
        model, _ = load_fold_model(run.fold_dir(held))
        smm = salient_mean_map(model, volumes, trp, train & ~patient, tp)
        reads, enc_in = encoder_reads(model, volumes)
        c_white = whitener(c_tr)(c_te[pat_te])
        s_white = whitener(s_tr[pat_tr])(s_te[pat_te])
        folds.append({"site": held, "n_patients": int(tp.sum()),
                      "ridge S encoder reads": rdm_tau(ridge_predict(reads[trp], spec[trp], reads[tp]), spec[tp]),
                      "ridge encoder input": rdm_tau(ridge_predict(enc_in[trp], spec[trp], enc_in[tp]), spec[tp]),
                      "ridge S~specific": rdm_tau(pred_s, spec[tp]), "ridge C~common": rdm_tau(pred_c, com[tp]),
                      "diagnosis direction": rdm_tau(diagnosis_direction(x[train], patient[train], x[tp]), spec[tp]),
                      "patients off the control span": rdm_tau(off_control_span(x[train], patient[train], x[tp]),
                                                               spec[tp]),
                      "S read-out": rdm_tau(ridge_predict(s_tr[pat_tr], spec_all[i_tr][pat_tr], s_te[pat_te]),
                                            spec_all[i_te][pat_te]),
                      "salient mean map": rdm_tau(smm, spec[tp]),
                      "C~common whitened": rdm_tau(c_white, com_all[i_te][pat_te]),
                      "C~specific whitened": rdm_tau(c_white, spec_all[i_te][pat_te]),
                      "S~specific whitened": rdm_tau(s_white, spec_all[i_te][pat_te]),
                      "C read-out": rdm_tau(ridge_predict(c_tr, com_all[i_tr], c_te[pat_te]) * com_all[i_tr].std(0),
                                            com_all[i_te][pat_te])})
        log.info("%s: %s", held, folds[-1])
    mean = {k: float(np.mean([f[k] for f in folds if f[k] is not None]))
            for k in folds[0] if k not in ("site", "n_patients")}
    return {"run": str(run_path), "voxels": int(mask.sum()), "folds": folds, **mean}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="bench_science.py's workdir")
    ap.add_argument("--cohorts", required=True, help="comma-separated cohorts with a full run in WORKDIR/runs")
    ap.add_argument("--variant", default="full", help="which run of each cohort supplies the normalised inputs")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    out = args.workdir / "ceiling.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    science = json.loads((args.workdir / "science.json").read_text())
    for cohort in [c.strip() for c in args.cohorts.split(",") if c.strip()]:
        run = args.workdir / "runs" / cohort / args.variant.replace(" ", "-")
        if not (run / "config.json").is_file():
            ap.error(f"{run}: no run (make it with bench_science.py --cohorts {cohort} --variants {args.variant!r})")
        results[f"{cohort} / {args.variant}"] = {"cohort": cohort, "variant": args.variant, **cohort_ceiling(run)}
        out.write_text(json.dumps(results, indent=1))
    print("| cohort | run | " + " | ".join(COLUMNS) + " |")
    print("|---" * (2 + len(COLUMNS)) + "|")
    for r in results.values():
        got = next((s["metrics"] for s in science if s["cohort"] == r["cohort"] and s["variant"] == r["variant"]
                    and s.get("folds", "all") == "all"), {})
        cells = [{**r, **{k: got.get(k) for k in RUN_METRICS}}.get(k) for k in COLUMNS]
        print(f"| {r['cohort']} | {r['variant']} | "
              + " | ".join(f"{float('nan') if v is None else v:.2f}" for v in cells) + " |")
    print(f"(goals: S~specific >= {GOALS['S~specific'][1]}, C~common >= {GOALS['C~common'][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
