"""End to end with the real trainer: train one tiny fold, then the maps and report CLIs on its model_final.pt."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dist_decode.data import Store

ENV = dict(os.environ)  # conftest.py sets the threads and DeepSpeed variables


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_trained_fold_maps_and_report(tiny_store, tmp_path):
    run = tmp_path / "run"
    _run("dist_decode.train", "--store", str(tiny_store), "--fold", "1", "--run-dir", str(run), "--steps", "3",
         "--set", "train.feature_samples=2", "--set", "train.checkpoint_every=100")
    store = Store.open(tiny_store)
    site = store.sites[1]
    assert (run / "folds" / site / "DONE").is_file()
    # Per-fold maps as the launcher pipelines them (--fold K behind fold K), then the combining step.
    bad = subprocess.run([sys.executable, "-m", "dist_decode.maps", "--run-dir", str(run), "--fold", "0"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "has not finished training" in bad.stderr and "Traceback" not in bad.stderr
    _run("dist_decode.maps", "--run-dir", str(run), "--fold", "1", "--workers", "2", "--no-progress",
         "--set", "maps.syn_iterations=[20,10,0]")
    assert (run / "maps" / "sites" / site / "group.json").is_file()
    assert not (run / "maps" / "overlap.nii.gz").exists()
    combined = _run("dist_decode.maps", "--run-dir", str(run), "--combine", "--set", "maps.syn_iterations=[20,10,0]")
    assert "wrote" in combined.stderr and "overlap.nii.gz" in combined.stderr
    n_pat = int(((np.asarray(store.site_of) == site) & np.asarray(store.is_patient)).sum())
    maps = sorted((run / "maps" / "subjects" / site).glob("*_effect.nii.gz"))
    assert len(maps) == n_pat
    for p in maps:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj)
        assert img.shape == store.grid_shape and np.allclose(img.affine, store.affine)
        assert np.isfinite(data).all() and np.abs(data).max() > 0
    summary = json.loads((run / "maps" / "maps.json").read_text())
    assert summary["sites"] == [site] and set(summary["sites_missing_fold"]) == set(store.sites) - {site}
    ov = nib.load(str(run / "maps" / "overlap.nii.gz"))
    assert ov.shape == store.grid_shape and int(np.asarray(ov.dataobj).max()) <= 1
    _run("dist_decode.report", "--run-dir", str(run))
    data = json.loads((run / "report" / "report.json").read_text())
    fold = next(f for f in data["folds"]["folds"] if f["site"] == site)
    assert fold["status"] == "done" and fold["n_parameters"] > 0 and fold["recon_error_test"] > 0
    assert fold["fewer_than_anchor_pct"] > 90
    assert fold["final_train_loss"] > 0 and fold["final_val_loss"] > 0 and "loss" in data["figures"]
    assert data["maps"]["status"] == "ok" and data["rsa"]["status"] == "missing"
    assert len(data["missing"]) >= 3  # the other folds and the RSA
