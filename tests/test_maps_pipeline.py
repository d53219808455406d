"""The maps stage end to end on a tiny packed store: a planted specific effect must land where it was planted."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import nibabel as nib
import numpy as np
import pytest

from dist_decode.data import Store
from dist_decode.maps.pipeline import resolve_shard, run_maps
from planted_runs import make_run, planted_centre, planted_loader, poster_cfg, raw_cfg


@pytest.fixture(scope="module")
def store_path(tiny_store):
    """The session's tiny packed store (tests/conftest.py): 4 sites x 10, 6 mm grid, with ground truth."""
    return tiny_store


_cfg = poster_cfg


def test_planted_effect_is_found_where_planted(tmp_path, store_path):
    store = Store.open(store_path)
    run = make_run(tmp_path, store_path, cfg=_cfg())
    result = run_maps(run, workers=2, load_model=planted_loader(store_path), progress=False)
    out = run / "maps"
    centre = planted_centre(store)
    # Every held-out patient has a log Jacobian map on the store grid with the store affine: atrophy at the centre.
    n_patients = int(np.asarray(store.is_patient).sum())
    maps = sorted((out / "subjects").rglob("*_effect.nii.gz"))
    assert len(maps) == n_patients == result["subjects"]["computed"]
    assert len(sorted((out / "subjects").rglob("*_deviation.nii.gz"))) == n_patients
    img = nib.load(str(maps[0]))
    assert img.shape == store.grid_shape and np.allclose(img.affine, store.affine)
    assert np.asarray(img.dataobj)[centre] < -0.05
    # Each site's thresholded group map flags the centre with a negative (atrophy) t.
    for site in store.sites:
        g = json.loads((out / "sites" / site / "group.json").read_text())
        assert g["status"] == "ok" and g["n"] == int((np.asarray(store.site_of) == site)[store.is_patient].sum())
        assert np.asarray(nib.load(str(out / "sites" / site / "binary.nii.gz")).dataobj)[centre] == 1
        assert np.asarray(nib.load(str(out / "sites" / site / "signed.nii.gz")).dataobj)[centre] < 0
    # The overlap heatmap peaks at the planted centre with every site, and the top cluster is there.
    ov = nib.load(str(out / "overlap.nii.gz"))
    ovd = np.asarray(ov.dataobj)
    assert ov.shape == store.grid_shape and ovd.max() == len(store.sites) and ovd[centre] == len(store.sites)
    mask = np.asarray(store.mask) > 0
    dist = np.linalg.norm(np.indices(mask.shape) - np.array(centre)[:, None, None, None], axis=0)
    full = ovd == len(store.sites)
    assert full[(dist <= 2) & mask].mean() > 0.8  # the planted contraction (sigma 1.6 voxels)
    assert full[(dist > 5) & mask].mean() < 0.25 * full[(dist <= 2) & mask].mean()  # ... and little far away
    with open(out / "clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # The ring of compensating expansion around a contraction forms its own (expansion) cluster.
    top = next(r for r in rows if r["sign"] == "atrophy")
    assert int(top["max_sites"]) == len(store.sites) and float(top["mean_t"]) < 0
    peak = np.array([int(top["peak_i"]), int(top["peak_j"]), int(top["peak_k"])])
    assert np.abs(peak - np.array(centre)).max() <= 2
    mni = (store.affine @ np.r_[centre, 1])[:3]
    assert np.linalg.norm(np.array([float(top[k]) for k in ("peak_x", "peak_y", "peak_z")]) - mni) <= 2 * 6 * 1.8
    assert top["label_aal"] and top["label_neuromorphometrics"]
    with open(out / "dice.csv", newline="") as fh:
        dice_rows = list(csv.reader(fh))
    assert dice_rows[0] == ["site"] + list(store.sites)
    assert all(float(v) > 0.05 for row in dice_rows[1:] for v in row[1:])  # every pair shares the planted core
    summary = json.loads((out / "maps.json").read_text())
    assert summary["sites"] == list(store.sites) and summary["sites_missing_fold"] == []


def test_resume_partial_folds_and_shards(tmp_path, store_path):
    store = Store.open(store_path)
    sites = list(store.sites)
    run = make_run(tmp_path, store_path, sites=sites[:2], cfg=_cfg())
    loader = planted_loader(store_path)
    # Two "array tasks" register disjoint halves; the group part waits until every map exists.
    r0 = run_maps(run, shard=(0, 2), stage="jacobians", load_model=loader, progress=False)
    assert not (run / "maps" / "overlap.nii.gz").exists()
    r1 = run_maps(run, shard=(1, 2), stage="jacobians", load_model=loader, progress=False)
    total = r0["subjects"]["subjects_total"]
    assert r0["subjects"]["computed"] + r1["subjects"]["computed"] == total
    assert abs(r0["subjects"]["computed"] - r1["subjects"]["computed"]) <= 1
    res = run_maps(run, stage="group", load_model=loader, progress=False)
    assert res["missing_folds"] == sites[2:]
    assert json.loads((run / "maps" / "maps.json").read_text())["sites"] == sites[:2]
    # Re-running skips everything.
    stamp = (run / "maps" / "overlap.nii.gz").stat().st_mtime_ns
    again = run_maps(run, load_model=loader, progress=False)
    assert again["subjects"]["computed"] == 0 and again["subjects"]["skipped"] == total
    assert (run / "maps" / "overlap.nii.gz").stat().st_mtime_ns == stamp
    # A third fold finishes: only its patients are registered, and the overlap is rebuilt over three sites.
    make_run(tmp_path, store_path, sites=[sites[2]], cfg=_cfg())
    more = run_maps(run, load_model=loader, progress=False)
    assert more["subjects"]["computed"] == int((np.asarray(store.site_of)[store.is_patient] == sites[2]).sum())
    assert json.loads((run / "maps" / "maps.json").read_text())["sites"] == sites[:3]
    # Changed registration settings are refused rather than mixed with the old maps.
    with pytest.raises(ValueError, match="--force"):
        run_maps(run, cfg=_cfg(syn_iterations=(10, 0)), load_model=loader, progress=False)


def test_two_shards_then_the_group_step_equal_the_unsplit_run(tmp_path, store_path):
    """Registrations split over 2 shards (as 2 SLURM array tasks or srun tasks run them), then one combining
    step: every subject map, site map and the overlap are bit-identical to one unsplit run."""
    store = Store.open(store_path)
    sites = list(store.sites)[:1]  # 5 patients: shards of 3 and 2
    cfg = _cfg(threshold="fwe", permutations=200)
    whole = make_run(tmp_path / "whole", store_path, sites=sites, cfg=cfg)
    split = make_run(tmp_path / "split", store_path, sites=sites, cfg=cfg)
    loader = planted_loader(store_path)
    run_maps(whole, load_model=loader, progress=False)
    for k in range(2):
        run_maps(split, shard=(k, 2), stage="jacobians", load_model=loader, progress=False)
    run_maps(split, stage="group", load_model=loader, progress=False)
    files = sorted(p.relative_to(whole / "maps") for p in (whole / "maps").rglob("*.nii.gz"))
    assert len(files) > 5 and files == sorted(p.relative_to(split / "maps") for p in (split / "maps").rglob("*.nii.gz"))
    for rel in files:
        a = np.asarray(nib.load(str(whole / "maps" / rel)).dataobj)
        b = np.asarray(nib.load(str(split / "maps" / rel)).dataobj)
        np.testing.assert_array_equal(a, b, err_msg=str(rel))
    for name in ("clusters.csv", "dice.csv"):
        assert (whole / "maps" / name).read_text() == (split / "maps" / name).read_text()


def test_samples_fwe_and_determinism(tmp_path, store_path):
    store = Store.open(store_path)
    site = store.sites[0]
    cfg = _cfg(use_samples=True, n_samples=2, threshold="fwe", permutations=200)
    run_a = make_run(tmp_path / "a", store_path, sites=[site], cfg=cfg)
    run_b = make_run(tmp_path / "b", store_path, sites=[site], cfg=cfg)
    loader = planted_loader(store_path)
    res = run_maps(run_a, load_model=loader, progress=False)
    assert res["subjects"]["computed"] == 5
    # Same inputs and seed: identical subject maps (checked on one subject) and group maps.
    pid = sorted((run_a / "maps" / "subjects" / site).glob("*_effect.nii.gz"))[0].name
    shutil.copytree(run_a / "maps" / "subjects", run_b / "maps" / "subjects")
    (run_b / "maps" / "subjects" / site / pid).unlink()
    run_maps(run_b, load_model=loader, progress=False)
    g = json.loads((run_a / "maps" / "sites" / site / "group.json").read_text())
    assert g["method"] == "fwe" and g["permutations"] == 32 and g["exact"]  # 5 patients: all 2**5 flips
    assert "32 sign patterns" in g["warning"]
    for rel in (f"subjects/{site}/{pid}", f"sites/{site}/t.nii.gz", f"sites/{site}/p.nii.gz",
                f"sites/{site}/binary.nii.gz"):
        a = np.asarray(nib.load(str(run_a / "maps" / rel)).dataobj)
        b = np.asarray(nib.load(str(run_b / "maps" / rel)).dataobj)
        np.testing.assert_array_equal(a, b)
    centre = planted_centre(store)
    assert np.asarray(nib.load(str(run_a / "maps" / "sites" / site / "t.nii.gz")).dataobj)[centre] < 0


def test_density_maps_find_a_planted_loss_against_the_observed_volumes(tmp_path, store_path):
    """The default maps: density effect and deviation maps, a sign-flip FWE test of the deviations, half maximum."""
    store = Store.open(store_path)
    assert raw_cfg().maps.threshold == "fwe"
    # 5 patients per site have 32 sign patterns, so no FWE p-value can be below 2/32: use FDR here
    cfg = raw_cfg(threshold="fdr")
    assert cfg.maps.kind == "auto" and cfg.maps.test_on == "deviation" and cfg.maps.extent == "half_max"
    run = make_run(tmp_path, store_path, cfg=cfg)
    result = run_maps(run, load_model=planted_loader(store_path, "density"), progress=False)
    assert result["subjects"]["kind"] == "density"
    out = run / "maps"
    centre = planted_centre(store)
    mask = np.asarray(store.mask) > 0
    site = store.sites[0]
    pid = next(p for p, s, pat in zip(store.participant_ids, store.site_of, store.is_patient) if s == site and pat)
    eff = np.asarray(nib.load(str(out / "subjects" / site / f"{pid}_effect.nii.gz")).dataobj)
    dev = np.asarray(nib.load(str(out / "subjects" / site / f"{pid}_deviation.nii.gz")).dataobj)
    # log(recon / twin) and log(observed / twin): a loss at the centre of exactly the planted size, 0 far away
    sev = 0.3 * float(np.asarray(h5py_value(run / "folds" / site / "features.h5", "s_mean", pid))[0])
    assert sev > 0.15 and eff[centre] == pytest.approx(-sev, abs=1e-4) and dev[centre] == pytest.approx(-sev, abs=1e-4)
    far = np.linalg.norm(np.indices(mask.shape) - np.array(centre)[:, None, None, None], axis=0) > 8
    assert np.abs(eff[far & mask]).max() < 1e-3 and np.abs(dev[far & mask]).max() < 1e-3
    assert np.count_nonzero(eff[~mask]) == 0  # maps live inside the brain mask
    for s in store.sites:
        binary = np.asarray(nib.load(str(out / "sites" / s / "binary.nii.gz")).dataobj) > 0
        assert binary[centre] and not binary[far].any()
        g = json.loads((out / "sites" / s / "group.json").read_text())
        assert g["method"] == "fdr" and g["n_kept"] < g["n_significant"]  # the half-maximum extent trims
    ov = np.asarray(nib.load(str(out / "overlap.nii.gz")).dataobj)
    assert ov[centre] == len(store.sites)


def h5py_value(path, key, pid):
    import h5py

    with h5py.File(path, "r") as f:
        ids = list(f["participant_id"].asstr()[...])
        return f[key][ids.index(pid)]


def test_resolve_shard(monkeypatch):
    assert resolve_shard(None) == (0, 1) and resolve_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1-2"):
        with pytest.raises(ValueError, match="shard"):
            resolve_shard(bad)
    for key in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_shard("auto") == (1, 3)
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert resolve_shard("auto") == (1, 2)


def test_cli_errors_are_clear(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "dist_decode.maps", "--run-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "run directory not found" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "run").mkdir()
    res = subprocess.run([sys.executable, "-m", "dist_decode.maps", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "manifest.json" in res.stderr


def test_a_full_disk_in_the_group_step_fails_clearly_and_a_rerun_finishes(tmp_path, store_path):
    """A real ENOSPC (tests/small_fs.py) while the group step writes the site maps: exit 2 naming the file and the
    full disk, no traceback, no temporary file, no overlap map; with room again ``--combine`` finishes."""
    from small_fs import full_then_room

    store = Store.open(store_path)
    run = make_run(tmp_path / "src", store_path, sites=list(store.sites)[:2], cfg=_cfg(threshold="fdr"))
    run_maps(run, stage="jacobians", load_model=planted_loader(store_path), progress=False)
    cmd = f"{sys.executable} -m dist_decode.maps --run-dir $FS/run --combine --no-progress"
    got = full_then_room(tmp_path, f"cp -r {run} $FS/run", cmd, leave=4096,
                         after=f"ls $FS/run/maps > {tmp_path}/listing")
    assert got["full_rc"] == "2", got["full_err"][-2000:]
    assert f"disk full: could not write the maps {tmp_path / 'fs'}/run/maps/" in got["full_err"], got["full_err"]
    assert "No space left on device" in got["full_err"] and "Traceback" not in got["full_err"]
    assert got["full_tmp"] == "" and "overlap.nii.gz" not in got["full_files"]
    assert got["again_rc"] == "0", got["again_err"][-2000:]
    assert "overlap.nii.gz" in (tmp_path / "listing").read_text().split()
