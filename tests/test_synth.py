"""data_prep.synth: CAT12 layout, planted effects and their ground truth, determinism, resume."""
from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest

from data_prep import anatomy, synth

SMALL = dict(preset="tiny", sites=2, subjects_per_site=4, voxel_mm=12.0, progress=False)


def _table(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_cat12_grid():
    shape, aff = anatomy.cat12_grid(1.5)
    assert shape == (113, 137, 113)
    np.testing.assert_array_equal(aff[:3], [[-1.5, 0, 0, 84], [0, 1.5, 0, -120], [0, 0, 1.5, -72]])
    assert anatomy.cat12_grid(3.0)[0] == (57, 69, 57)
    assert anatomy.cat12_grid(6.0)[0] == (29, 35, 29)
    # The last voxel centre lies on the far edge of the bounding box.
    shape, aff = anatomy.cat12_grid(3.0)
    np.testing.assert_allclose((aff @ np.array([*(s - 1 for s in shape), 1.0]))[:3], [-84, 84, 96])
    with pytest.raises(ValueError):
        anatomy.cat12_grid(0)
    # CAT12 <= 12.7 wrote the SPM box: 121x145x121 at 1.5 mm.
    shape, aff = anatomy.cat12_grid(1.5, "12.7")
    assert shape == (121, 145, 121)
    np.testing.assert_array_equal(aff[:3], [[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72]])
    with pytest.raises(ValueError, match="bounding box '12.6'"):
        anatomy.cat12_grid(1.5, "12.6")


def test_site_on_another_grid_is_the_same_people(tmp_path):
    """site_grids writes a site on another CAT12 grid; the other sites are unchanged and its subjects are the same
    people (same report values, same total grey matter up to discretisation)."""
    kw = dict(SMALL, voxel_mm=8.0, jacobian=False, n_jobs=1, poor_quality_fraction=0.0)
    a = synth.synthesize(tmp_path / "a", seed=3, **kw)
    b = synth.synthesize(tmp_path / "b", seed=3, site_grids={"siteB": ["12.7", 6.0]}, **kw)
    assert json.loads((b / "ground_truth" / "synth.json").read_text())["params"]["site_grids"] == {"siteB": ["12.7", 6.0]}
    assert "site_grids" not in json.loads((a / "ground_truth" / "synth.json").read_text())["params"]
    for row in _table(a / "participants.tsv"):
        pid = row["participant_id"]
        ia, ib = nib.load(a / pid / "mri" / f"mwp1{pid}.nii.gz"), nib.load(b / pid / "mri" / f"mwp1{pid}.nii.gz")
        xa, xb = ((a if d == "a" else b) / pid / "report" / f"cat_{pid}.xml" for d in "ab")
        assert ET.parse(xa).find("subjectmeasures/vol_TIV").text == ET.parse(xb).find("subjectmeasures/vol_TIV").text
        if row["site"] == "siteA":
            np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
            continue
        assert ib.shape == (31, 37, 31) and ia.shape == (22, 26, 22)
        np.testing.assert_array_equal(ib.affine[:3], [[-6, 0, 0, 90], [0, 6, 0, -126], [0, 0, 6, -72]])
        gm = [float(np.asarray(i.dataobj, np.float64).sum()) * abs(np.linalg.det(i.affine[:3, :3])) / 1000 for i in (ia, ib)]
        assert gm[1] == pytest.approx(gm[0], rel=0.01)  # measured within 0.4 %
    with pytest.raises(ValueError, match="site_grids: unknown site 'siteQ'"):
        synth.resolve_preset("tiny", site_grids={"siteQ": ["12.7", 6.0]})
    with pytest.raises(ValueError, match=r"site_grids\['siteA'\]"):
        synth.resolve_preset("tiny", site_grids={"siteA": ["12.5", 6.0]})


def test_tiny_cohort_layout(tiny_cohort):
    rows = _table(tiny_cohort / "participants.tsv")
    assert list(rows[0]) == ["participant_id", "site", "diagnosis", "age", "sex", "education_years", "panss_total"]
    assert len(rows) == 40
    sites = sorted({r["site"] for r in rows})
    assert len(sites) == 4
    for s in sites:  # balanced per site
        dx = [r["diagnosis"] for r in rows if r["site"] == s]
        assert dx.count("SZ") == dx.count("HC") == 5
    assert {r["sex"] for r in rows} <= {"M", "F"}
    assert all(r["panss_total"] == "n/a" for r in rows if r["diagnosis"] == "HC")
    assert all(30 <= float(r["panss_total"]) <= 210 for r in rows if r["panss_total"] != "n/a")
    meta = json.loads((tiny_cohort / "participants.json").read_text())
    assert set(meta) == set(rows[0]) and meta["diagnosis"]["Levels"].keys() == {"SZ", "HC"}

    pid = rows[0]["participant_id"]
    img = nib.load(tiny_cohort / pid / "mri" / f"mwp1{pid}.nii.gz")
    assert img.shape == (29, 35, 29) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, anatomy.cat12_grid(6.0)[1])
    data = np.asarray(img.dataobj)
    assert data.min() == 0.0 and (data == 0).mean() > 0.4 and 0.3 < data.max() < 1.5  # background exactly 0
    wj = np.asarray(nib.load(tiny_cohort / pid / "mri" / f"wj_{pid}.nii.gz").dataobj)
    assert wj.shape == data.shape and (wj > 0).all()
    root = ET.parse(tiny_cohort / pid / "report" / f"cat_{pid}.xml").getroot()
    assert root.tag == "S"
    assert 1000 < float(root.find("subjectmeasures/vol_TIV").text) < 2000
    assert 0.5 <= float(root.find("qualityratings/IQR").text) <= 6.5

    # Ground truth beside the subjects, never inside a subject folder.
    gt = tiny_cohort / "ground_truth"
    for name in ("scores.tsv", "specific_effect.nii.gz", "specific_regions.nii.gz", "common_1.nii.gz", "README.md"):
        assert (gt / name).is_file(), name
    subject_files = [p for p in tiny_cohort.rglob("*") if p.is_file() and p.parts[-3].startswith("sub-")]
    assert all(p.parent.name in ("mri", "report") for p in subject_files)
    assert len(subject_files) == 40 * 3


def test_ground_truth_effects(tiny_cohort):
    gt = tiny_cohort / "ground_truth"
    scores = {r["participant_id"]: r for r in _table(gt / "scores.tsv")}
    assert {"specific_severity", "common_1", "common_3", "tiv_ml", "iqr", "site", "diagnosis"} <= set(next(iter(scores.values())))
    effect = np.asarray(nib.load(gt / "specific_effect.nii.gz").dataobj)
    regions = np.asarray(nib.load(gt / "specific_regions.nii.gz").dataobj).astype(bool)
    assert effect.min() < -0.1 and effect[regions].mean() < -0.05  # atrophy in the planted regions
    assert regions.any() and regions.mean() < 0.2
    # Planted regions are where anatomists expect them: left and right superior temporal gyrus.
    aff_inv = np.linalg.inv(anatomy.cat12_grid(6.0)[1])
    for xyz in ((-56, -18, 4), (58, -16, 4)):
        i, j, k = np.round(aff_inv @ [*xyz, 1])[:3].astype(int)
        assert regions[i, j, k] and effect[i, j, k] < -0.1

    # The specific effect exists only in patients and scales with severity: regress each subject's
    # log Jacobian (minus TIV scaling) on the unit maps; the specific coefficient recovers severity.
    common = [np.asarray(nib.load(gt / f"common_{k}.nii.gz").dataobj).ravel() for k in (1, 2, 3)]
    age = np.asarray(nib.load(gt / "age_effect.nii.gz").dataobj).ravel()
    design = np.column_stack([effect.ravel(), *common, age])
    est, true = [], []
    for pid, s in scores.items():
        wj = np.asarray(nib.load(tiny_cohort / pid / "mri" / f"wj_{pid}.nii.gz").dataobj).ravel()
        y = np.log(wj) - np.log(float(s["tiv_ml"]) / anatomy.REFERENCE_TIV_ML)
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        est.append(coef[0])
        true.append(float(s["specific_severity"]))
        if s["diagnosis"] == "HC":
            assert float(s["specific_severity"]) == 0 and abs(coef[0]) < 0.1
        else:
            assert float(s["specific_severity"]) > 0
    assert np.corrcoef(est, true)[0, 1] > 0.95


def test_cohort_table_statistics():
    """Severity correlates with PANSS; controls are independent people; some subjects are poor quality."""
    p = synth.resolve_preset("paper")
    rng = np.random.default_rng(0)
    sites = synth._sites_table(p, rng)
    subjects = synth._subjects_table(p, sites, rng)
    assert len(subjects) == 1250
    assert sum(s["diagnosis"] == "SZ" for s in subjects) == 641
    assert len({s["site"] for s in subjects}) == 8 and len(set(p.site_sizes)) == 8
    pat = [s for s in subjects if s["diagnosis"] == "SZ" and s["panss_total"] is not None]
    r = np.corrcoef([s["specific_severity"] for s in pat], [s["panss_total"] for s in pat])[0, 1]
    assert 0.55 < r < 0.85
    poor = [s for s in subjects if s["poor_quality"]]
    assert 0.02 < len(poor) / 1250 < 0.09 and all(s["iqr"] > 4.5 for s in poor)
    assert all(s["iqr"] < 3.5 for s in subjects if not s["poor_quality"])
    common = np.array([s["common"] for s in subjects])
    dx = np.array([s["diagnosis"] for s in subjects])
    assert abs(common[dx == "SZ"].mean() - common[dx == "HC"].mean()) < 0.2  # common factors shared
    assert len({tuple(c) for c in common}) == 1250  # nobody is a twin of anybody
    males = np.array([s["sex"] == "M" for s in subjects])
    tiv = np.array([s["tiv_ml"] for s in subjects])
    assert tiv[males].mean() > tiv[~males].mean() + 80


def test_presets_and_overrides():
    assert synth.resolve_preset("demo").voxel_mm == 3.0 and len(synth.resolve_preset("demo").site_sizes) == 8
    assert all(20 <= n <= 30 for n in synth.resolve_preset("demo").site_sizes)
    p = synth.resolve_preset("tiny", voxel_mm=12, sites=3, subjects_per_site=[4, 5, 6], patients_per_site=[4, 0, 3])
    assert p.site_sizes == [4, 5, 6] and p.site_patients == [4, 0, 3] and p.voxel_mm == 12.0
    assert synth.resolve_preset("tiny", sites=["x", "y"]).names() == ["x", "y"]
    with pytest.raises(ValueError, match="unknown preset"):
        synth.resolve_preset("huge")
    with pytest.raises(ValueError, match="unknown synth option"):
        synth.resolve_preset("tiny", colour=1)
    with pytest.raises(ValueError, match="impossible"):
        synth.resolve_preset("tiny", sites=2, subjects_per_site=3, patients_per_site=4)


def _volumes(root):
    return {p.relative_to(root).as_posix(): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_deterministic_parallel_and_resume(tmp_path):
    a = synth.synthesize(tmp_path / "a", seed=7, n_jobs=1, **SMALL)
    b = synth.synthesize(tmp_path / "b", seed=7, n_jobs=2, **SMALL)
    c = synth.synthesize(tmp_path / "c", seed=8, n_jobs=1, **SMALL)
    va, vb, vc = _volumes(a), _volumes(b), _volumes(c)
    assert va.keys() == vb.keys() and len(va) > 8
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k])
    assert (a / "participants.tsv").read_text() == (b / "participants.tsv").read_text()
    assert any(not np.array_equal(va[k], vc[k]) for k in va if k.startswith("sub-"))

    # Resume: a missing subject is rebuilt identically; finished files are not rewritten.
    pid = _table(a / "participants.tsv")[0]["participant_id"]
    victim = a / pid / "mri" / f"mwp1{pid}.nii.gz"
    other = next(p for p in a.rglob("mwp1*.nii.gz") if p != victim)
    mtime = other.stat().st_mtime_ns
    victim.unlink()
    (a / "participants.tsv").unlink()
    synth.synthesize(a, seed=7, n_jobs=1, **SMALL)
    np.testing.assert_array_equal(np.asarray(nib.load(victim).dataobj), va[victim.relative_to(a).as_posix()])
    assert other.stat().st_mtime_ns == mtime
    assert not list(a.rglob(".*tmp*"))
    with pytest.raises(ValueError, match="other settings"):
        synth.synthesize(a, seed=8, n_jobs=1, **SMALL)


def test_cli(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path / "cli"), "--preset", "tiny", "--voxel-mm", "12", "--seed", "3",
                       "--jobs", "1", "--no-jacobian", "--no-progress"]) == 0
    rows = _table(tmp_path / "cli" / "participants.tsv")
    assert len(rows) == 40
    pid = rows[0]["participant_id"]
    assert (tmp_path / "cli" / pid / "mri" / f"mwp1{pid}.nii.gz").is_file()
    assert not (tmp_path / "cli" / pid / "mri" / f"wj_{pid}.nii.gz").exists()
    assert nib.load(tmp_path / "cli" / pid / "mri" / f"mwp1{pid}.nii.gz").shape == (15, 18, 15)
    with pytest.raises(SystemExit) as exc:
        synth.main(["--help"])
    assert exc.value.code == 0
    # A clear error, non-zero exit, no traceback.
    assert synth.main(["--out", str(tmp_path / "cli"), "--preset", "tiny", "--voxel-mm", "12", "--seed", "4",
                       "--jobs", "1", "--no-jacobian", "--no-progress"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_sigterm_stops_workers_and_resume_completes(tmp_path):
    """scancel/kill: the CLI exits 143 at once, leaves no partial file, and a re-run finishes the cohort."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cohort"
    cmd = [sys.executable, "-m", "data_prep.synth", "--out", str(out), "--preset", "tiny", "--voxel-mm", "3",
           "--jobs", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list(out.glob("sub-*/mri/mwp1*.nii.gz"))) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    done = list(out.glob("sub-*/mri/mwp1*.nii.gz"))
    assert 3 <= len(done) < 40 and not (out / "participants.tsv").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert synth.main(cmd[3:]) == 0
    assert len(list(out.glob("sub-*/mri/mwp1*.nii.gz"))) == 40 and (out / "participants.tsv").is_file()
    for p in out.glob("sub-*/mri/mwp1*.nii.gz"):
        assert np.isfinite(np.asarray(nib.load(p).dataobj)).all()


def test_planted_variants_density_places_sizes_and_factors(tmp_path):
    """The variant cohorts differ from the demo in kind, place and size of the effect and in the site effects."""
    p = synth.resolve_preset("density", voxel_mm=8.0)
    assert p.specific_kind == "density" and p.specific_regions == "random" and p.site_gain_sd == 0.1
    sites = synth._sites_table(p, np.random.default_rng(0))
    subjects = synth._subjects_table(p, sites, np.random.default_rng(1), np.random.default_rng(2))
    f = synth.build_fields(p, sites, seed=3)
    assert len(f.specific) == 1 and isinstance(f.specific[0], anatomy.DensityBasis)
    blobs = f.specific_blobs[0]
    assert len(blobs) == 6 and all(b.name.startswith("random region") for b in blobs)
    for a in blobs:  # distinct places
        for b in blobs:
            if a is not b:
                assert np.linalg.norm(np.subtract(a.center, b.center)) > 2 * (a.sigma + b.sigma)
    # A density loss is in place: same deformation (wj_), density lower by exactly exp(sev * log_density)
    patient = next(s for s in subjects if s["diagnosis"] == "SZ")
    healthy = {**patient, "specific": [0.0], "specific_severity": 0.0}
    flat = {**sites[0], "smooth_fwhm_mm": 0.0, "noise_sd": 0.0, "bias_amplitude": 0.0}
    f.bias[flat["site"]] = np.ones(f.shape, np.float32)
    vol_p, jac_p = synth.render_subject(f, patient, flat, 0, 0)
    vol_h, jac_h = synth.render_subject(f, healthy, flat, 0, 0)
    np.testing.assert_array_equal(jac_p, jac_h)
    inside = vol_h > 1e-3
    ratio = np.log(vol_p[inside] / vol_h[inside])
    np.testing.assert_allclose(ratio, patient["specific"][0] * f.specific[0].log_density[inside], atol=1e-4)
    assert ratio.min() < -0.1
    # Two factors: regions dealt to factors, one severity each, and a score column per factor
    p2 = synth.resolve_preset("two-factor", voxel_mm=8.0)
    subj2 = synth._subjects_table(p2, synth._sites_table(p2, np.random.default_rng(0)), np.random.default_rng(1),
                                  np.random.default_rng(2))
    sz = [s for s in subj2 if s["diagnosis"] == "SZ"]
    assert all(len(s["specific"]) == 2 and min(s["specific"]) > 0 for s in sz)
    assert abs(np.corrcoef([s["specific"][0] for s in sz], [s["specific"][1] for s in sz])[0, 1]) < 0.3
    # Smaller effects: widths scaled
    small = synth.build_fields(synth.resolve_preset("small", voxel_mm=8.0), sites, seed=3)
    assert all(6.0 * 0.6 <= b.sigma <= 11.0 * 0.6 for b in small.specific_blobs[0])
    with pytest.raises(ValueError, match="specific_kind"):
        synth.resolve_preset("demo", specific_kind="texture")
    with pytest.raises(ValueError, match="n_specific"):
        synth.resolve_preset("demo", n_specific=9)


def test_variant_ground_truth_files(tmp_path):
    out = synth.synthesize(tmp_path / "c", preset="tiny", seed=1, voxel_mm=12.0, sites=2, subjects_per_site=4,
                           progress=False, n_jobs=1, specific_kind="density", specific_regions="random",
                           n_specific_regions=4, n_specific=2)
    gt = out / "ground_truth"
    rows = _table(gt / "scores.tsv")
    assert "specific_1" in rows[0] and "specific_2" in rows[0] and "specific_severity" not in rows[0]
    total = np.asarray(nib.load(gt / "specific_effect.nii.gz").dataobj)
    parts = [np.asarray(nib.load(gt / f"specific_effect_{k}.nii.gz").dataobj) for k in (1, 2)]
    np.testing.assert_allclose(total, parts[0] + parts[1], atol=1e-6)
    assert (np.asarray(nib.load(gt / "specific_regions.nii.gz").dataobj) > 0).any()
    readme = (gt / "README.md").read_text()
    assert "density ratio" in readme and "factor 2:" in readme
