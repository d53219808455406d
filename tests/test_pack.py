"""data_prep.pack: store layout, lossless round trip, options, resume, verify, and every bad input."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import nibabel as nib
import numpy as np
import pytest
import torch

from data_prep import pack as packmod
from data_prep.pack import pack, verify
from data_prep.synth import synthesize
from dist_decode.data import Store, VolumeDataset, loso_split

SMALL = dict(preset="tiny", sites=2, subjects_per_site=4, voxel_mm=12.0, poor_quality_fraction=0.0,
             n_jobs=1, progress=False, jacobian=False)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """2 sites x 4 subjects (2 SZ / 2 HC each) on a 12 mm grid, no poor-quality subjects."""
    return synthesize(tmp_path_factory.mktemp("small") / "cohort", seed=1, **SMALL)


@pytest.fixture
def cohort(small_cohort, tmp_path):
    """A private copy of the small cohort that a test may damage."""
    return Path(shutil.copytree(small_cohort, tmp_path / "cohort"))


def _pack(cohort, out, **kw):
    kw.setdefault("n_jobs", 1)
    return pack(cohort, cohort / "participants.tsv", out, progress=False, **kw)


def _ids(cohort):
    return [ln.split("\t")[0] for ln in (cohort / "participants.tsv").read_text().splitlines()[1:]]


def _mwp1(cohort, pid):
    return cohort / pid / "mri" / f"mwp1{pid}.nii.gz"


def _edit_tsv(cohort, fn):
    lines = [ln.split("\t") for ln in (cohort / "participants.tsv").read_text().splitlines()]
    fn(lines)
    (cohort / "participants.tsv").write_text("\n".join("\t".join(ln) for ln in lines) + "\n")


def _reasons(manifest):
    return {e["participant_id"]: e["reason"] for e in manifest["excluded"]}


# -------------------------------------------------------------------------------------------------
# Happy path
# -------------------------------------------------------------------------------------------------


def test_store_layout_and_manifest(tiny_store, tiny_cohort):
    m = json.loads((tiny_store / "manifest.json").read_text())
    for key in ("schema_version", "grid", "sites", "shards", "counts", "loso_ineligible", "excluded", "columns",
                "storage", "mask", "options", "sources", "created", "ground_truth"):
        assert key in m, key
    assert m["schema_version"] == 1
    assert m["grid"]["shape"] == [29, 35, 29] and m["grid"]["voxel_mm"] == 6.0
    assert m["ground_truth"] == str(tiny_cohort.resolve() / "ground_truth")
    assert [s["file"] for s in m["shards"]] == [f"shards/{s}-0.h5" for s in m["sites"]]
    assert m["storage"]["codec"] == "blosc-lz4" and m["storage"]["dtype"] == "float32"
    assert m["columns"]["age"] == "numeric" and m["columns"]["sex"] == "text" and m["columns"]["iqr"] == "numeric"
    # QC removed exactly the planted poor-quality subjects; the ground truth is not "unlisted".
    scores = [ln.split("\t") for ln in (tiny_cohort / "ground_truth" / "scores.tsv").read_text().splitlines()]
    col = scores[0].index("poor_quality")
    poor = {r[0] for r in scores[1:] if r[col] == "1"}
    assert poor and set(_reasons(m)) == poor
    assert all("QC: CAT12 IQR" in r for r in _reasons(m).values())
    assert sum(sum(c.values()) for c in m["counts"].values()) == m["n_subjects"] == 40 - len(poor)
    assert m["loso_ineligible"] == []
    # One grid, nothing resampled; per subject the file used; the cohort is the whole table; participants.json read.
    assert m["grids"]["store"]["description"] == "29x35x29 at 6 mm (CAT12 12.8+ box)" and len(m["grids"]["found"]) == 1
    assert m["grids"]["resampling"]["n_subjects"] == 0 and len(m["subjects"]) == m["n_subjects"]
    pid = next(iter(m["subjects"]))
    assert m["subjects"][pid] == {"file": str(_mwp1(tiny_cohort.resolve(), pid)), "session": None, "not_used": [],
                                  "report": str(tiny_cohort.resolve() / pid / "report" / f"cat_{pid}.xml"),
                                  "resampled": None}
    assert sum(len(v) for v in m["cohort"].values()) == 40 and m["labels"]["levels"]["SZ"].startswith("schizophrenia")
    assert m["qc"] == {"min_iqr_rating": 60.0, "missing_qc": "keep", "unrated": []}
    mask = nib.load(tiny_store / "mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8 and mask.shape == (29, 35, 29)
    assert np.asarray(mask.dataobj).sum() == m["mask"]["n_voxels"] > 0

    s = m["shards"][0]
    with h5py.File(tiny_store / s["file"], "r") as h5:
        vols = h5["volumes"]
        assert vols.shape == (s["n"], 29, 35, 29) and vols.chunks == (1, 29, 35, 29) and vols.dtype == np.float32
        assert "32001" in str(vols._filters)  # Blosc
        ids = h5["participant_id"].asstr()[...]
        assert h5["age"].dtype == np.float64 and h5["diagnosis"].asstr()[0] in ("SZ", "HC")
        np.testing.assert_allclose(h5.attrs["affine"][:3], [[-6, 0, 0, 84], [0, 6, 0, -120], [0, 0, 6, -72]])
        assert list(h5.attrs["shape"]) == [29, 35, 29]
        for i, pid in enumerate(ids):
            ref = np.asarray(nib.load(_mwp1(tiny_cohort, pid)).dataobj, np.float32)
            np.testing.assert_array_equal(vols[i], ref)  # lossless
            assert h5["checksums"].asstr()[i] == packmod.volume_checksum(ref)
        # TIV and IQR come from the CAT12 report.
        tiv = float(open(tiny_cohort / ids[0] / "report" / f"cat_{ids[0]}.xml").read().split("<vol_TIV>")[1].split("<")[0])
        assert h5["tiv_ml"][0] == pytest.approx(tiv)
    assert packmod.sha256_file(tiny_store / s["file"]) == s["sha256"]
    assert verify(tiny_store, progress=False) == []


def test_flat_mri_layout_uncompressed(cohort, tmp_path):
    """CAT12 run on a folder of T1s writes DIR/mri/ and DIR/report/: the same store results."""
    flat = tmp_path / "flat"
    (flat / "mri").mkdir(parents=True)
    (flat / "report").mkdir()
    for pid in _ids(cohort):
        img = nib.load(_mwp1(cohort, pid))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), flat / "mri" / f"mwp1{pid}.nii")
        shutil.copy(cohort / pid / "report" / f"cat_{pid}.xml", flat / "report")
    shutil.copy(cohort / "participants.tsv", flat)
    a, b = _pack(cohort, tmp_path / "a"), _pack(flat, tmp_path / "b")
    assert a["counts"] == b["counts"] and b["excluded"] == [] and b["ground_truth"] is None
    sa, sb = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    for i in range(sa.n):
        np.testing.assert_array_equal(sa.read(i), sb.read(i))
    np.testing.assert_array_equal(sa.phenotypes["tiv_ml"], sb.phenotypes["tiv_ml"])


def test_bids_style_names_and_parallel(cohort, tmp_path):
    """mwp1<id>_T1w.nii.gz (CAT12 keeps the T1 file name) is found; parallel readers give the same store."""
    pid = _ids(cohort)[0]
    _mwp1(cohort, pid).rename(cohort / pid / "mri" / f"mwp1{pid}_T1w.nii.gz")
    (cohort / pid / "report" / f"cat_{pid}.xml").rename(cohort / pid / "report" / f"cat_{pid}_T1w.xml")
    m1 = _pack(cohort, tmp_path / "s1", n_jobs=1)
    m2 = _pack(cohort, tmp_path / "s2", n_jobs=2)
    assert m1["excluded"] == [] and m1["n_subjects"] == 8
    assert [s["sha256"] for s in m1["shards"]] != [] and Store.open(tmp_path / "s1").phenotypes["tiv_ml"][0] > 0
    for s1, s2 in zip(m1["shards"], m2["shards"]):
        with h5py.File(tmp_path / "s1" / s1["file"]) as a, h5py.File(tmp_path / "s2" / s2["file"]) as b:
            assert list(a["checksums"].asstr()) == list(b["checksums"].asstr())


def test_subject_folder_with_any_t1_name_and_ambiguous_files(cohort, tmp_path):
    """Inside DIR/<id>/ the only mwp1 file is the subject's whatever the T1 was called; one scan as .nii and .nii.gz
    is an error (the same scan twice: no rule can tell which is right)."""
    a, b = _ids(cohort)[:2]
    _mwp1(cohort, a).rename(cohort / a / "mri" / "mwp1T1_0001.nii.gz")
    m = _pack(cohort, tmp_path / "s")
    assert m["excluded"] == [] and m["n_subjects"] == 8
    img = nib.load(_mwp1(cohort, b))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), cohort / b / "mri" / f"mwp1{b}.nii")
    with pytest.raises(ValueError, match=f"subject {b}: the same scan twice .*mwp1{b}.nii and .*mwp1{b}.nii.gz"):
        _pack(cohort, tmp_path / "t")


def test_float16_gzip_and_shard_cap(cohort, tmp_path):
    m = _pack(cohort, tmp_path / "s", dtype="float16", codec="gzip", gzip_level=6, max_shard_subjects=3)
    assert [s["n"] for s in m["shards"]] == [3, 1, 3, 1]
    assert [s["file"] for s in m["shards"]][:2] == ["shards/siteA-0.h5", "shards/siteA-1.h5"]
    err = m["storage"]["float16_max_error"]
    assert 0 < err < 1e-3 and m["storage"]["lossless"] is False
    with h5py.File(tmp_path / "s" / m["shards"][0]["file"]) as h5:
        assert h5["volumes"].dtype == np.float16 and h5["volumes"].compression == "gzip"
    st = Store.open(tmp_path / "s")
    assert st.n == 8 and list(st.sites) == ["siteA", "siteB"]
    for i in range(st.n):
        ref = np.asarray(nib.load(_mwp1(cohort, st.participant_ids[i])).dataobj, np.float32)
        vol = st.read(i)
        assert vol.dtype == np.float32 and np.abs(vol - ref).max() <= err
    assert verify(tmp_path / "s", progress=False) == []
    raw = VolumeDataset(tmp_path / "s", [0, 1], raw=True)[1]["x"]
    assert raw.dtype == torch.float16
    torch.testing.assert_close(raw.float(), VolumeDataset(tmp_path / "s", [0, 1])[1]["x"], rtol=0, atol=0)


def test_qc_threshold_is_configurable(cohort, tmp_path):
    pid = _ids(cohort)[2]
    xml = cohort / pid / "report" / f"cat_{pid}.xml"
    text = xml.read_text()
    old = text.split("<IQR>")[1].split("<")[0]
    xml.write_text(text.replace(f"<IQR>{old}<", "<IQR>5.5000<"))
    m = _pack(cohort, tmp_path / "a")
    assert "QC: CAT12 IQR 5.50 = 50.0% is below the threshold 60%" in _reasons(m)[pid]
    assert _pack(cohort, tmp_path / "b", min_iqr_rating=45)["excluded"] == []
    assert _pack(cohort, tmp_path / "c", min_iqr_rating=None)["n_subjects"] == 8
    (cohort / pid / "report" / f"cat_{pid}.xml").write_text("<S><subjectmeasures>")
    assert "cannot parse CAT12 report" in _reasons(_pack(cohort, tmp_path / "d"))[pid]


# -------------------------------------------------------------------------------------------------
# Resume, atomicity, verification
# -------------------------------------------------------------------------------------------------


def test_interrupted_run_resumes(cohort, tmp_path):
    out = tmp_path / "s"
    pid_b = [p for p in _ids(cohort) if p.startswith("sub-B")][0]
    good = _mwp1(cohort, pid_b).read_bytes()
    _mwp1(cohort, pid_b).write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=pid_b):  # strict: stops in the second shard
        _pack(cohort, out, strict=True)
    assert (out / "shards" / "siteA-0.h5").is_file()
    assert not (out / "shards" / "siteB-0.h5").exists() and not (out / "manifest.json").exists()
    assert not list((out / "shards").glob(".*tmp*"))  # no half-written shard left behind
    assert (out / "pack-in-progress.json").is_file()  # the cohort being packed: another one is refused
    other = synthesize(tmp_path / "other", seed=5, **{**SMALL, "sites": 3})
    with pytest.raises(ValueError, match=r"holds the store of another cohort \(sites added: siteC; 4 subject"):
        _pack(other, out)
    kept = (out / "shards" / "siteA-0.h5").stat().st_mtime_ns
    (out / "shards" / ".siteB-0.h5.tmp-999.h5").write_bytes(b"leftover of a killed run")
    _mwp1(cohort, pid_b).write_bytes(good)
    m = _pack(cohort, out, strict=True)
    assert (out / "shards" / "siteA-0.h5").stat().st_mtime_ns == kept  # finished shard reused
    assert m["n_subjects"] == 8 and not list((out / "shards").glob(".*tmp*"))
    assert not (out / "pack-in-progress.json").exists() and m["cohort"] == {
        "siteA": [p for p in _ids(cohort) if p.startswith("sub-A")], "siteB": [p for p in _ids(cohort) if p.startswith("sub-B")]}
    manifest_text = (out / "manifest.json").read_text()
    assert _pack(cohort, out, strict=True) == m  # a no-op re-run keeps the manifest byte for byte
    assert (out / "manifest.json").read_text() == manifest_text
    # Changing an input rebuilds exactly the shard that depends on it.
    img = nib.load(_mwp1(cohort, pid_b))
    halved = np.asarray(img.dataobj) * np.float32(0.5)
    nib.save(nib.Nifti1Image(halved, img.affine), _mwp1(cohort, pid_b))
    m2 = _pack(cohort, out)
    assert (out / "shards" / "siteA-0.h5").stat().st_mtime_ns == kept
    assert m2["shards"][1]["sha256"] != m["shards"][1]["sha256"]
    st = Store.open(out)
    np.testing.assert_array_equal(st.read(st.index_of(pid_b)), halved)
    # Re-packing with other shard options leaves no shard of the old layout behind.
    _pack(cohort, out, max_shard_subjects=3)
    assert (out / "shards" / "siteA-1.h5").is_file()
    _pack(cohort, out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["siteA-0.h5", "siteB-0.h5"]
    assert verify(out, progress=False) == []


def _store_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_out_holding_another_cohort_is_refused_or_overwritten(cohort, tmp_path, caplog):
    """--out with the store of another cohort is refused before any work, naming the difference, and left intact;
    --overwrite replaces it; a folder that is not a store is never written into."""
    out = tmp_path / "s"
    _pack(cohort, out)
    before = _store_bytes(out)
    other = synthesize(tmp_path / "other", seed=5, **{**SMALL, "sites": 3})
    with pytest.raises(ValueError, match=r"--out .* holds the store of another cohort \(sites added: siteC; 4 subject\(s\) "
                                         r"added \(sub-C0001, sub-C0002, sub-C0003, \.\.\.\)\); pass --overwrite"):
        _pack(other, out)
    ids = _ids(cohort)
    _edit_tsv(cohort, lambda L: L[1].__setitem__(1, "siteB"))
    with pytest.raises(ValueError, match=rf"1 subject\(s\) moved to another site \({ids[0]}: siteA -> siteB\)"):
        _pack(cohort, out)
    _edit_tsv(cohort, lambda L: L[1].__setitem__(1, "siteA"))
    _edit_tsv(cohort, lambda L: L.__delitem__(slice(5, 9)))  # drop siteB's rows
    with pytest.raises(ValueError, match=r"\(sites removed: siteB; 4 subject\(s\) removed \(sub-B0001, sub-B0002, "):
        _pack(cohort, out)
    assert _store_bytes(out) == before and verify(out, progress=False) == []

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert packmod.main(["--cat12-root", str(other), "--out", str(out), "--overwrite", "--jobs", "1",
                             "--no-progress"]) == 0
    assert "replacing the store of another cohort" in caplog.text
    m = json.loads((out / "manifest.json").read_text())
    assert m["sites"] == ["siteA", "siteB", "siteC"] and m["n_subjects"] == 12
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["siteA-0.h5", "siteB-0.h5", "siteC-0.h5"]
    st = Store.open(out)
    np.testing.assert_array_equal(st.read(0), np.asarray(nib.load(_mwp1(other, st.participant_ids[0])).dataobj))
    assert verify(out, progress=False) == []

    listing = sorted(p.relative_to(cohort) for p in cohort.rglob("*"))
    with pytest.raises(ValueError, match=r"--out .*cohort is not a store and not empty \(holds ground_truth, "
                                         r"participants.json, participants.tsv, sub-A0001, sub-A0002\); the packer"):
        _pack(other, cohort, overwrite=True)
    assert sorted(p.relative_to(cohort) for p in cohort.rglob("*")) == listing
    (tmp_path / "note.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a store and not empty \\(is a file\\)"):
        _pack(other, tmp_path / "note.txt")


def test_missing_qc_rating_is_kept_or_excluded_never_silent(cohort, tmp_path, caplog):
    """A report without IQR and a missing report: kept with a warning (default) or excluded (--missing-qc exclude);
    listed in qc.unrated either way."""
    a, b = _ids(cohort)[:2]
    xml_a = cohort / a / "report" / f"cat_{a}.xml"
    xml_a.write_text(re.sub(r"\s*<IQR>[^<]*</IQR>", "", xml_a.read_text()))
    (cohort / b / "report" / f"cat_{b}.xml").unlink()
    problems = {a: f"{xml_a} has no qualityratings/IQR", b: f"no report/cat_{b}.xml beside {cohort / b / 'mri'}"}
    with caplog.at_level(logging.WARNING):
        m = _pack(cohort, tmp_path / "keep")
    assert m["n_subjects"] == 8 and m["excluded"] == [] and m["qc"]["missing_qc"] == "keep"
    assert m["qc"]["unrated"] == [{"participant_id": p, "file": str(_mwp1(cohort, p)), "problem": problems[p],
                                   "kept": True} for p in (a, b)]
    assert "2 subject(s) have no CAT12 IQR rating and are kept unrated (--missing-qc keep" in caplog.text
    st = Store.open(tmp_path / "keep")
    ia, ib = st.index_of(a), st.index_of(b)
    assert np.isnan(st.phenotypes["iqr"][[ia, ib]]).all() and np.isfinite(st.phenotypes["tiv_ml"][ia])
    assert np.isnan(st.phenotypes["tiv_ml"][ib])

    assert packmod.main(["--cat12-root", str(cohort), "--out", str(tmp_path / "excl"), "--jobs", "1", "--no-progress",
                         "--missing-qc", "exclude"]) == 0
    m = json.loads((tmp_path / "excl" / "manifest.json").read_text())
    assert _reasons(m) == {p: f"QC: no IQR rating ({problems[p]}); --missing-qc exclude" for p in (a, b)}
    assert [u["kept"] for u in m["qc"]["unrated"]] == [False, False] and m["n_subjects"] == 6

    caplog.clear()
    m = _pack(cohort, tmp_path / "noqc", min_iqr_rating=None, missing_qc="exclude")  # no QC: nothing to miss
    assert m["n_subjects"] == 8 and len(m["qc"]["unrated"]) == 2 and "kept unrated" not in caplog.text
    with pytest.raises(ValueError, match="missing_qc 'maybe'"):
        _pack(cohort, tmp_path / "bad", missing_qc="maybe")


def test_verify_detects_damage(tiny_store, tmp_path, caplog):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    assert packmod.main(["--verify", str(store), "--no-progress"]) == 0
    shard = store / json.loads((store / "manifest.json").read_text())["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    problems = verify(store, progress=False)
    assert any("sha256 differs" in p for p in problems)
    assert any("volume" in p and ("checksum mismatch" in p or "unreadable" in p) for p in problems)
    caplog.clear()
    assert packmod.main(["--verify", str(store), "--no-progress"]) == 1
    assert "damaged" in caplog.text
    (store / "manifest.json").unlink()
    assert verify(store, progress=False) == [f"{store / 'manifest.json'}: missing"]


# -------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the subject/file/column, or a listed exclusion
# -------------------------------------------------------------------------------------------------


def test_truncated_and_unreadable_nifti(cohort, tmp_path):
    a, b = _ids(cohort)[:2]
    raw = _mwp1(cohort, a).read_bytes()
    _mwp1(cohort, a).write_bytes(raw[: len(raw) // 3])  # truncated gzip stream
    _mwp1(cohort, b).write_bytes(b"this is not a NIfTI file at all" * 20)
    m = _pack(cohort, tmp_path / "s")
    r = _reasons(m)
    assert f"cannot read {_mwp1(cohort, a)}" in r[a] and f"cannot read {_mwp1(cohort, b)}" in r[b]
    assert m["n_subjects"] == 6
    with pytest.raises(ValueError, match=f"subject {b}: cannot read"):
        _pack(cohort, tmp_path / "strict", strict=True)


def test_other_shape_and_affine_are_resampled(cohort, tmp_path):
    """A cropped volume and one shifted by 3 mm are on other grids: resampled and recorded (or one error with
    --no-resample); a volume whose grey matter lies outside the store grid is excluded, naming the file."""
    a, b, c = _ids(cohort)[:3]
    affine = nib.load(_mwp1(cohort, a)).affine
    orig = {pid: np.asarray(nib.load(_mwp1(cohort, pid)).dataobj, np.float32) for pid in (a, b, c)}
    nib.save(nib.Nifti1Image(orig[a][:-1], affine), _mwp1(cohort, a))
    for pid, dx in ((b, 3.0), (c, 500.0)):
        shifted = affine.copy()
        shifted[0, 3] += dx
        nib.save(nib.Nifti1Image(orig[pid], shifted), _mwp1(cohort, pid))
    m = _pack(cohort, tmp_path / "s")
    r = _reasons(m)
    assert list(r) == [c] and str(_mwp1(cohort, c)) in r[c]
    assert "only 0.0% of its grey matter lies inside the store grid 15x18x15 at 12 mm (CAT12 12.8+ box)" in r[c]
    assert m["grids"]["store"]["description"] == "15x18x15 at 12 mm (CAT12 12.8+ box)"
    assert m["subjects"][a]["resampled"]["from"] == "14x18x15 at 12 mm (origin 84, -120, -72)"
    assert m["subjects"][b]["resampled"]["from"] == "15x18x15 at 12 mm (origin 87, -120, -72)"
    assert m["subjects"][_ids(cohort)[3]]["resampled"] is None and m["grids"]["resampling"]["n_subjects"] == 2
    st = Store.open(tmp_path / "s")
    va = st.read(st.index_of(a))
    np.testing.assert_allclose(va[:-1], orig[a][:-1], atol=1e-6)  # same voxels: values unchanged
    assert (va[-1] == 0).all()
    rec = m["subjects"][b]["resampled"]
    assert rec["gm_ml_store"] == pytest.approx(rec["gm_ml_source"], rel=0.03)  # a density: no voxel-volume factor
    vb = st.read(st.index_of(b))
    assert not np.allclose(vb, orig[b]) and np.corrcoef(vb.ravel(), orig[b].ravel())[0, 1] > 0.8
    with pytest.raises(ValueError, match=r"--no-resample: 3 subject\(s\) are not on the store grid 15x18x15 at 12 mm "
                                         r"\(CAT12 12.8\+ box\); grids found \(sites, subjects\): 15x18x15 at 12 mm "
                                         r"\(CAT12 12.8\+ box\): siteA \(1\), siteB \(4\); 14x18x15"):
        _pack(cohort, tmp_path / "strict", resample=False)
    assert not (tmp_path / "strict").exists()
    with pytest.raises(ValueError, match=f"subject {c}: .*only 0.0%"):
        _pack(cohort, tmp_path / "strict", strict=True)


def test_nan_and_inf_voxels(cohort, tmp_path):
    a, b = _ids(cohort)[:2]
    for pid, bad in ((a, np.nan), (b, np.inf)):
        img = nib.load(_mwp1(cohort, pid))
        data = np.asarray(img.dataobj).copy()
        data[5, 5, 5] = bad
        nib.save(nib.Nifti1Image(data, img.affine), _mwp1(cohort, pid))
    r = _reasons(_pack(cohort, tmp_path / "s"))
    assert "1 NaN and 0 infinite voxels" in r[a] and "0 NaN and 1 infinite voxels" in r[b]


def test_subject_in_table_but_not_on_disk(cohort, tmp_path):
    pid = _ids(cohort)[3]
    shutil.rmtree(cohort / pid)
    m = _pack(cohort, tmp_path / "s")
    assert f"in participants.tsv but no mwp1{pid}*.nii[.gz] found" in _reasons(m)[pid] and m["n_subjects"] == 7
    with pytest.raises(ValueError, match=f"subject {pid}: in participants.tsv but no"):
        _pack(cohort, tmp_path / "strict", strict=True)


def test_subject_on_disk_but_not_in_table(cohort, tmp_path):
    pid = _ids(cohort)[3]
    _edit_tsv(cohort, lambda lines: lines.pop(4))
    m = _pack(cohort, tmp_path / "s")
    assert "is on disk but subject" in _reasons(m)[pid] and "not in participants.tsv" in _reasons(m)[pid]
    assert list(_reasons(m)) == [pid]  # ground_truth/ is not mistaken for a subject
    with pytest.raises(ValueError, match=f"subject {pid}: .* on disk"):
        _pack(cohort, tmp_path / "strict", strict=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda L: L.append(list(L[1])), r"duplicate participant_id 'sub-A0001' on lines 2 and 10"),
        (lambda L: L[3].__setitem__(2, "schizo"), r"'schizo' first on line 4 \(subject sub-A0003\)"),
        (lambda L: L[2].__setitem__(3, "forty"), r"line 3: subject sub-A0002: column 'age' must be numeric.*'forty'"),
        (lambda L: [row.pop(2) for row in L], r"missing required column 'diagnosis'"),
        (lambda L: L[5].__setitem__(1, "n/a"), r"line 6: subject sub-B0001 has no site"),
        (lambda L: L[5].pop(), r"line 6: 6 fields, header has 7"),
    ],
    ids=["duplicate-id", "unknown-diagnosis", "non-numeric-age", "missing-column", "missing-site", "short-row"],
)
def test_bad_participants_table(cohort, tmp_path, edit, message):
    _edit_tsv(cohort, edit)
    with pytest.raises(ValueError, match=message):
        _pack(cohort, tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_missing_table_and_root(cohort, tmp_path):
    with pytest.raises(FileNotFoundError, match="participants table not found"):
        pack(cohort, tmp_path / "none.tsv", tmp_path / "s", progress=False)
    with pytest.raises(FileNotFoundError, match="CAT12 output folder not found"):
        pack(tmp_path / "nope", cohort / "participants.tsv", tmp_path / "s", progress=False)


def test_site_without_controls_or_patients(tmp_path, caplog):
    cohort = synthesize(tmp_path / "c", seed=2, **{**SMALL, "sites": 3, "subjects_per_site": [4, 3, 3],
                                                    "patients_per_site": [2, 3, 0]})
    with caplog.at_level(logging.WARNING):
        m = _pack(cohort, tmp_path / "s")
    inel = {e["site"]: e["reason"] for e in m["loso_ineligible"]}
    assert "no controls (HC)" in inel["siteB"] and "no patients (SZ)" in inel["siteC"] and "siteA" not in inel
    assert "site siteB: no controls" in caplog.text
    assert m["sites"] == ["siteA", "siteB", "siteC"]  # still training data
    st = Store.open(tmp_path / "s")
    assert loso_split(st, 0).site == "siteA"
    with pytest.raises(ValueError, match="fold 1: site 'siteB' cannot be a LOSO test site: no controls"):
        loso_split(st, 1)
    with pytest.raises(ValueError, match="siteC"):
        loso_split(st, 2)


def test_cli(cohort, tmp_path, caplog, capsys):
    assert packmod.main(["--cat12-root", str(cohort), "--out", str(tmp_path / "s"), "--jobs", "1",
                         "--no-progress", "--site-order", "siteB,siteA", "--float16"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["sites"] == ["siteB", "siteA"] and m["storage"]["dtype"] == "float16"
    _edit_tsv(cohort, lambda L: L[3].__setitem__(2, "XX"))
    assert packmod.main(["--cat12-root", str(cohort), "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "'XX' first on line 4" in caplog.text and "--patient-label LABEL" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        packmod.main(["--help"])
    assert exc.value.code == 0
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_bad_options(cohort, tmp_path):
    with pytest.raises(ValueError, match="codec 'zip'"):
        _pack(cohort, tmp_path / "s", codec="zip")
    with pytest.raises(ValueError, match="site_order"):
        _pack(cohort, tmp_path / "s", site_order=["siteA", "siteQ"])


def test_a_full_disk_fails_clearly_and_leaves_only_finished_shards(tiny_cohort, tiny_store, tmp_path):
    """A real ENOSPC (a private tmpfs, tests/small_fs.py) while the second shard is written: exit 2 with an error
    naming the shard and the full disk, no temporary file, no manifest (the store is not taken for complete), the
    finished first shard kept; with space again the same command resumes and the store equals the reference."""
    import subprocess
    import sys

    from small_fs import run_on_small_fs

    shard = (tiny_store / "shards" / "siteA-0.h5").stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    cmd = f"{sys.executable} -m data_prep.pack --cat12-root {tiny_cohort} --out $FS/store --jobs 1 --no-progress"
    res = run_on_small_fs(tmp_path / "fs", f"""
        leave {shard + 300_000}          # the first shard fits, the second does not
        {cmd} 2> {out}/full.err; echo $? > {out}/full.rc
        (cd $FS/store && find . -type f | sort) > {out}/full.files
        unfill
        {cmd} 2> {out}/again.err; echo $? > {out}/again.rc
        cp -r $FS/store {out}/store
    """, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert res.returncode == 0, res.stderr
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err[-2000:]
    assert f"disk full: could not write the shard {tmp_path / 'fs'}/store/shards/siteB-0.h5" in err, err[-2000:]
    assert "No space left on device" in err and "Traceback" not in err
    assert (out / "full.files").read_text().split() == ["./pack-in-progress.json", "./shards/siteA-0.h5"]
    again = (out / "again.err").read_text()
    assert (out / "again.rc").read_text().strip() == "0", again[-2000:]
    assert "keeping finished shard shards/siteA-0.h5" in again
    assert verify(out / "store", progress=False) == []
    new, ref = Store.open(out / "store"), Store.open(tiny_store)
    assert list(new.participant_ids) == list(ref.participant_ids)
    for k in range(0, len(ref.participant_ids), 7):
        np.testing.assert_array_equal(new.read(k), ref.read(k))
    assert subprocess.run(["mountpoint", "-q", str(tmp_path / "fs")]).returncode != 0  # nothing left mounted here
