"""``dist_decode.apply`` and ``launch.apply``: a tiny run trained by the real trainer, applied to a new cohort packed
by the real packer on the same grid (other site names), and refused on stores that its models cannot read."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dist_decode.contracts import features
from dist_decode.data import Store

PY = sys.executable
ENV = dict(os.environ)  # conftest.py sets the threads and DeepSpeed variables
#: A fold of an 8 mm cohort in a few seconds (as tests/test_slurm.py).
FAST = ["train.steps=6", "train.checkpoint_every=3", "model.channels=[4, 8]", "model.hidden=16",
        "train.batch_size=4", "train.feature_samples=2", "rsa.permutations=200", "rsa.block_size=100"]
pytestmark = pytest.mark.slow


def _pack(root: Path, name: str, voxel_mm: float, seed: int, **synth) -> Path:
    from data_prep.pack import pack
    from data_prep.synth import synthesize

    synthesize(root / name, "tiny", seed=seed, voxel_mm=voxel_mm, progress=False, poor_quality_fraction=0.0, **synth)
    pack(root / name, root / name / "participants.tsv", root / f"{name}-store", progress=False)
    return root / f"{name}-store"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-site run (both folds trained, 6 steps), a new 2-site cohort on its grid, and one on a 6 mm grid."""
    from dist_decode.config import RunConfig, override

    root = tmp_path_factory.mktemp("apply")
    store = _pack(root, "train", 8.0, 3, site_sizes=[8, 8], site_patients=[4, 4])
    new = _pack(root, "new", 8.0, 11, sites=["siteX", "siteY"], subjects_per_site=8)
    coarse = _pack(root, "new6", 6.0, 11, sites=["siteX"], subjects_per_site=8)
    cfg = root / "cfg.json"
    override(RunConfig(), FAST).to_json(cfg)
    run = root / "run"
    procs = [subprocess.Popen([PY, "-m", "dist_decode.train", "--store", str(store), "--fold", str(k), "--run-dir",
                               str(run), "--config", str(cfg)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    return {"root": root, "store": store, "new": new, "coarse": coarse, "run": run}


def _apply(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "dist_decode.apply", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_apply_a_run_to_a_new_cohort_locally(trained: dict[str, Path], tmp_path: Path) -> None:
    run, new = trained["run"], trained["new"]
    out = tmp_path / "out"
    res = _apply("--run-dir", str(run), "--store", str(new), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    store = Store.open(new)
    models = Store.open(trained["store"]).sites
    assert json.loads((out / "manifest.json").read_text())["models"] == models
    patients = np.asarray(store.is_patient, bool)
    ids = np.asarray(store.participant_ids).astype(str)
    for m in models:
        f = features.read(out / "folds" / m / "features.h5")
        assert set(f.split) == {"apply"} and list(f.participant_id) == list(ids)
        assert list(f.index) == list(range(store.n)) and set(f.site) == {"siteX", "siteY"}
        assert f.attrs["site"] == m and f.c_samples.shape == (store.n, 2, 16)
        assert np.isfinite(f.c_mean).all() and np.isfinite(f.s_mean).all() and np.isfinite(f.recon_error).all()
        assert (out / "folds" / m / "DONE").is_file()
    # maps of every new patient, per model and their mean over the models: finite, on the store grid
    for pid, site in zip(ids[patients], np.asarray(store.site_of)[patients]):
        for what in ("effect", "deviation"):
            per_model = []
            for m in models:
                img = nib.load(str(out / "maps" / "models" / m / site / f"{pid}_{what}.nii.gz"))
                assert img.shape == store.grid_shape and np.allclose(img.affine, store.affine)
                per_model.append(np.asarray(img.dataobj, np.float64))
                assert np.isfinite(per_model[-1]).all() and np.abs(per_model[-1]).max() > 0
            mean = np.asarray(nib.load(str(out / "maps" / "mean" / site / f"{pid}_{what}.nii.gz")).dataobj)
            assert np.isfinite(mean).all() and np.allclose(mean, np.mean(per_model, axis=0), atol=1e-6)
    for site in ("siteX", "siteY"):
        assert np.isfinite(np.asarray(nib.load(str(out / "maps" / "sites" / site / "mean_effect.nii.gz")).dataobj)).all()
    rsa = json.loads((out / "rsa" / "rsa.json").read_text())
    assert rsa["mode"] == "apply" and rsa["models"] == models and rsa["results"]
    assert {r["model"] for r in rsa["results"]} == set(models)
    assert {f"{m}:pooled" for m in models} <= {r["scope"] for r in rsa["results"]}
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    rows = analysis["models"]["rows"]
    assert [r["model"] for r in rows] == models and all(r["status"] == "done" and r["n"] == store.n for r in rows)
    assert all(r["recon_error"] > 0 and r["recon_error_run_heldout"] > 0 for r in rows)
    assert analysis["compatibility"]["fields"]["grid.shape"] == list(store.grid_shape)
    assert 0.9 < analysis["compatibility"]["mask_dice"] <= 1.0
    assert [r["site"] for r in analysis["maps"]["sites"]] == ["siteX", "siteY"]
    html = (out / "report" / "index.html").read_text()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["missing"] == [] and "siteX" in html and "models" in report["figures"]
    assert "http://" not in html and "https://" not in html and "<script" not in html

    # idempotent: a re-run does nothing; another store into the same OUT is refused before any work
    before = {m: (out / "folds" / m / "DONE").stat().st_mtime_ns for m in models}
    again = _apply("--run-dir", str(run), "--store", str(new), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "already applied" in again.stderr, again.stderr[-2000:]
    assert {m: (out / "folds" / m / "DONE").stat().st_mtime_ns for m in models} == before
    other = tmp_path / "other-store"
    shutil.copytree(new, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another packing"
    (other / "manifest.json").write_text(json.dumps(manifest))
    refused = _apply("--run-dir", str(run), "--store", str(other), "--out", str(out))
    assert refused.returncode == 2 and "belongs to another run or store" in refused.stderr
    assert "store_manifest_sha256" in refused.stderr and "Traceback" not in refused.stderr


def test_apply_refuses_a_store_its_models_cannot_read(trained: dict[str, Path], tmp_path: Path) -> None:
    run = trained["run"]
    out = tmp_path / "out"
    res = _apply("--run-dir", str(run), "--store", str(trained["coarse"]), "--out", str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "grid.shape: [22, 26, 22] != [29, 35, 29]" in res.stderr and "grid.voxel_mm: 8.0 != 6.0" in res.stderr
    assert not out.exists(), "nothing may be written for a refused store"
    # same grid, other preprocessing fields of the manifest: each is named
    other = tmp_path / "float16-store"
    shutil.copytree(trained["new"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["storage"]["dtype"] = "float16"
    manifest["mask"]["threshold"] = 0.2
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = _apply("--run-dir", str(run), "--store", str(other), "--out", str(out))
    assert res.returncode == 2 and 'storage.dtype: "float32" != "float16"' in res.stderr, res.stderr
    assert "mask.threshold: 0.1 != 0.2" in res.stderr and not out.exists()
    # the launcher refuses it the same way, before queueing anything
    launched = subprocess.run([PY, "-m", "launch.apply", "--run-dir", str(run), "--store", str(trained["coarse"]),
                               "--out", str(out), "--cluster", "local"], capture_output=True, text=True, env=ENV)
    assert launched.returncode == 2 and "grid.voxel_mm" in launched.stderr and not out.exists()


def test_a_new_site_is_normalised_like_a_held_out_site(trained: dict[str, Path], tmp_path: Path) -> None:
    """Applied to the run's own store, every model gives exactly the features the trainer wrote: a site's statistics
    come from its own volumes, in the run's units, whether it was held out or is new."""
    run, store = trained["run"], trained["store"]
    out = tmp_path / "self"
    res = _apply("--run-dir", str(run), "--store", str(store), "--out", str(out), "--stage", "model", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    for m in Store.open(store).sites:
        own = features.read(run / "folds" / m / "features.h5")
        applied = features.read(out / "folds" / m / "features.h5")
        pos = {p: i for i, p in enumerate(applied.participant_id)}
        rows = [pos[p] for p in own.participant_id]
        for key in ("c_mean", "s_mean", "c_samples", "s_samples", "recon_error"):
            np.testing.assert_allclose(getattr(applied, key)[rows], getattr(own, key), atol=2e-5, err_msg=key)


def test_launch_apply_runs_one_job_per_model_then_the_shared_stages(trained: dict[str, Path], tmp_path: Path) -> None:
    run, new = trained["run"], trained["new"]
    out = tmp_path / "out"
    cmd = [PY, "-m", "launch.apply", "--run-dir", str(run), "--store", str(new), "--out", str(out),
           "--cluster", "local", "--max-parallel", "2"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=ENV)
    assert dry.returncode == 0 and not out.exists(), dry.stderr
    assert "apply-0 " in dry.stdout and "--stage model --model 1" in dry.stdout
    assert "apply-report [todo] ntasks=1 after=apply-analysis" in dry.stdout
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    plan = json.loads((out / "launch" / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == ["apply-0", "apply-1", "apply-maps", "apply-rsa", "apply-analysis",
                                                   "apply-report"]
    assert next(s for s in plan["stages"] if s["name"] == "apply-maps")["deps"] == ["apply-0", "apply-1"]
    assert (out / "report" / "index.html").is_file() and f"report: {out / 'report' / 'index.html'}" in res.stdout
    status = subprocess.run([PY, "-m", "launch.status", "--run-dir", str(out)], capture_output=True, text=True,
                            env=ENV)
    assert status.returncode == 0 and status.stdout.count(" done ") == 6, status.stdout
