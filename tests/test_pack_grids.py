"""Cohorts on several grids: the store grid rule, --grid, --no-resample, and a resampled site that lines up.

The reference is the same site written natively on the store grid: ``data_prep.synth``'s ``site_grids`` renders
the same people on the CAT12 12.7 box at 4 mm (the 1 mm -> 1.5 mm ratio of real outputs), so comparing the
packed site with its native rendering measures the resampling, not a copy of it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import nibabel as nib
import numpy as np
import pytest

from data_prep import anatomy, grids
from data_prep.pack import pack
from data_prep.synth import synthesize
from dist_decode.data import Store

# Little voxel noise: the comparison measures resampling; the scanner's iid noise differs between two renderings.
KW = dict(preset="tiny", sites=2, subjects_per_site=4, voxel_mm=6.0, poor_quality_fraction=0.0, n_jobs=1,
          progress=False, jacobian=False, site_noise_max=0.006)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """native: both sites on the 6 mm CAT12 12.8+ grid; mixed: the same cohort with siteB on the 12.7 box at 4 mm."""
    d = tmp_path_factory.mktemp("grids")
    native = synthesize(d / "native", seed=1, **KW)
    mixed = synthesize(d / "mixed", seed=1, site_grids={"siteB": ["12.7", 4.0]}, **KW)
    return native, mixed


def _pack(cohort, out, **kw):
    kw.setdefault("n_jobs", 1)
    return pack(cohort, cohort / "participants.tsv", out, progress=False, **kw)


def _site(cohort, site):
    return [ln.split("\t")[0] for ln in (cohort / "participants.tsv").read_text().splitlines()[1:]
            if ln.split("\t")[1] == site]


def _agreement(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1]), float(np.abs(a[mask] - b[mask]).mean() / a[mask].mean())


def test_resampled_site_lines_up_with_its_native_rendering(cohorts, tmp_path):
    native, mixed = cohorts
    _pack(native, tmp_path / "native")
    mm = _pack(mixed, tmp_path / "mixed")
    assert mm["grids"]["store"]["description"] == "29x35x29 at 6 mm (CAT12 12.8+ box)"  # the 12.8+ grid wins the tie
    assert [(g["description"], g["sites"]) for g in mm["grids"]["found"]] == [
        ("29x35x29 at 6 mm (CAT12 12.8+ box)", {"siteA": 4}), ("46x55x46 at 4 mm (CAT12 12.7 box)", {"siteB": 4})]
    assert mm["excluded"] == [] and mm["grids"]["resampling"]["n_subjects"] == 4
    sn, sm = Store.open(tmp_path / "native"), Store.open(tmp_path / "mixed")
    mask = sn.mask
    for pid in _site(native, "siteA"):  # the site already on the store grid is stored as it is
        assert mm["subjects"][pid]["resampled"] is None
        np.testing.assert_array_equal(sm.read(sm.index_of(pid)), sn.read(sn.index_of(pid)))
    for pid in _site(native, "siteB"):
        rec = mm["subjects"][pid]["resampled"]
        assert rec["from"] == "46x55x46 at 4 mm (CAT12 12.7 box)"
        ref, got = sn.read(sn.index_of(pid)), sm.read(sm.index_of(pid))
        r, diff = _agreement(ref, got, mask)
        # measured r 0.989-0.990, mean |diff| 3.8-4.0 % of the mean; without the anti-aliasing 0.982 and 5.4 %
        assert r > 0.985 and diff < 0.045, (pid, r, diff)
        # mwp1 is a density: total GM (sum x voxel volume) is kept, no voxel-volume factor (that would be x 3.4)
        assert rec["gm_ml_store"] == pytest.approx(rec["gm_ml_source"], rel=0.01)  # measured +0.4 %
        assert grids.gm_ml(got, sm_grid := grids.Grid.of(sm.grid_shape, sm.affine)) == pytest.approx(
            grids.gm_ml(ref, sm_grid), rel=0.01)
        # The bound can fail: the same volume one voxel off (6 mm) is far outside it (measured r 0.53, 30 %).
        r_off, diff_off = _agreement(ref, np.roll(got, 1, axis=0), mask)
        assert r_off < 0.9 and diff_off > 0.2, (r_off, diff_off)
    ids = _site(native, "siteB")
    mean_n = np.mean([sn.read(sn.index_of(p)) for p in ids], axis=0)
    mean_m = np.mean([sm.read(sm.index_of(p)) for p in ids], axis=0)
    assert _agreement(mean_n, mean_m, mask)[0] > 0.985  # measured 0.991
    # Parallel readers resample identically; a re-run keeps the finished shards and their resampling records.
    par = _pack(mixed, tmp_path / "par", n_jobs=2)
    for a, b in zip(mm["shards"], par["shards"]):
        with h5py.File(tmp_path / "mixed" / a["file"]) as ha, h5py.File(tmp_path / "par" / b["file"]) as hb:
            assert list(ha["checksums"].asstr()) == list(hb["checksums"].asstr())
    assert par["subjects"] == mm["subjects"]
    mtimes = [(tmp_path / "mixed" / s["file"]).stat().st_mtime_ns for s in mm["shards"]]
    assert _pack(mixed, tmp_path / "mixed") == mm
    assert [(tmp_path / "mixed" / s["file"]).stat().st_mtime_ns for s in mm["shards"]] == mtimes


def test_no_resample_refuses_listing_grids_and_sites(cohorts, tmp_path):
    _, mixed = cohorts
    with pytest.raises(ValueError) as exc:
        _pack(mixed, tmp_path / "s", resample=False)
    msg = str(exc.value)
    assert msg.startswith("--no-resample: 4 subject(s) are not on the store grid 29x35x29 at 6 mm (CAT12 12.8+ box)")
    assert ("grids found (sites, subjects): 29x35x29 at 6 mm (CAT12 12.8+ box): siteA (4); "
            "46x55x46 at 4 mm (CAT12 12.7 box): siteB (4)") in msg
    assert "Drop --no-resample" in msg and "--grid" in msg
    assert not (tmp_path / "s").exists()


def test_grid_option(cohorts, tmp_path):
    """--grid site:NAME, a NIfTI file, cat12:MM; a bad spec is an error naming the choices."""
    _, mixed = cohorts
    m = _pack(mixed, tmp_path / "b", grid="site:siteB")
    assert m["grids"]["store"]["description"] == "46x55x46 at 4 mm (CAT12 12.7 box)"
    assert m["grid"]["shape"] == [46, 55, 46] and m["grids"]["resampling"]["n_subjects"] == 4
    st = Store.open(tmp_path / "b")
    for pid in _site(mixed, "siteB"):
        assert m["subjects"][pid]["resampled"] is None
        ref = np.asarray(nib.load(mixed / pid / "mri" / f"mwp1{pid}.nii.gz").dataobj, np.float32)
        np.testing.assert_array_equal(st.read(st.index_of(pid)), ref)
    for pid in _site(mixed, "siteA"):  # upsampled 6 -> 4 mm: no smoothing needed, total GM kept
        rec = m["subjects"][pid]["resampled"]
        assert rec["from"] == "29x35x29 at 6 mm (CAT12 12.8+ box)"
        assert rec["gm_ml_store"] == pytest.approx(rec["gm_ml_source"], rel=0.01)
    pid = _site(mixed, "siteB")[0]
    by_file = _pack(mixed, tmp_path / "f", grid=str(mixed / pid / "mri" / f"mwp1{pid}.nii.gz"))
    assert by_file["grids"]["store"] == m["grids"]["store"]
    assert _pack(mixed, tmp_path / "c", grid="cat12:6")["grids"]["store"]["description"] == \
        "29x35x29 at 6 mm (CAT12 12.8+ box)"
    for spec, message in (("site:siteQ", "no packed subject of site 'siteQ'"), ("cat12:x", "'x' is not a positive"),
                          ("nowhere.nii", "expected auto, cat12")):
        with pytest.raises(ValueError, match=f"--grid {spec}: {message}"):
            _pack(mixed, tmp_path / "bad", grid=spec)


def test_store_grid_rule():
    """auto: the CAT12 12.8+ grid when any subject has it (most common such), else the most common grid."""
    g127_4, g127_6 = (grids.Grid.of(*anatomy.cat12_grid(v, "12.7")) for v in (4.0, 6.0))
    g128_6 = grids.Grid.of(*anatomy.cat12_grid(6.0))
    site = {k: "s" for k in "abcd"}
    assert grids.choose({"a": g127_6, "b": g127_4, "c": g127_4}, site) == g127_4
    assert grids.choose({"a": g127_6, "b": g127_4, "c": g127_4, "d": g128_6}, site) == g128_6
    assert grids.choose({"a": g127_6, "b": g127_4}, site) == g127_6  # tie: first seen
    assert grids.Grid.of(*anatomy.cat12_grid(1.5)).describe() == "113x137x113 at 1.5 mm (CAT12 12.8+ box)"
    assert grids.Grid.of(*anatomy.cat12_grid(1.5, "12.7")).describe() == "121x145x121 at 1.5 mm (CAT12 12.7 box)"
    other = np.diag([1.0, 1.0, 1.2, 1.0])
    assert grids.Grid.of((10, 10, 10), other).describe() == "10x10x10 at 1x1x1.2 mm (origin 0, 0, 0)"
    assert grids.Grid.of((10, 10, 10), other + 4e-4) == grids.Grid.of((10, 10, 10), other)  # within 1e-3 mm


def test_12_7_box_at_the_same_voxel_size_is_exact(cohorts, tmp_path):
    """At one voxel size the 12.7 box is the 12.8+ box plus whole voxels (6 mm of margin): resampling is exact."""
    native, _ = cohorts
    root = Path(shutil.copytree(native, tmp_path / "cohort"))
    shape, affine = anatomy.cat12_grid(6.0, "12.7")
    for pid in _site(root, "siteB"):
        f = root / pid / "mri" / f"mwp1{pid}.nii.gz"
        data = np.asarray(nib.load(f).dataobj, np.float32)
        padded = np.pad(data, ((1, 1), (1, 1), (0, 2)))  # x +-90 vs +-84, y -126..90 vs -120..84, z top 108 vs 96
        assert padded.shape == shape
        nib.save(nib.Nifti1Image(padded, affine), f)
    m = _pack(root, tmp_path / "s")
    st = Store.open(tmp_path / "s")
    for pid in _site(root, "siteB"):
        assert m["subjects"][pid]["resampled"]["from"] == "31x37x31 at 6 mm (CAT12 12.7 box)"
        orig = np.asarray(nib.load(native / pid / "mri" / f"mwp1{pid}.nii.gz").dataobj, np.float32)
        np.testing.assert_allclose(st.read(st.index_of(pid)), orig, rtol=0, atol=1e-6)
        assert m["subjects"][pid]["resampled"]["gm_ml_store"] == pytest.approx(
            m["subjects"][pid]["resampled"]["gm_ml_source"], abs=1e-3)
