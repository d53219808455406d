"""Finding scans in every CAT12 layout, choosing one session per subject, diagnosis labels and participants.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep import discover
from data_prep import pack as packmod
from data_prep.pack import pack
from data_prep.synth import synthesize
from dist_decode.data import Store

SMALL = dict(preset="tiny", sites=3, subjects_per_site=4, voxel_mm=12.0, poor_quality_fraction=0.0, n_jobs=1,
             progress=False, jacobian=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """3 sites x 4 subjects (2 SZ / 2 HC each), 12 mm, plain layout."""
    return synthesize(tmp_path_factory.mktemp("src") / "cohort", seed=4, **SMALL)


def _ids(cohort):
    return [ln.split("\t")[0] for ln in (cohort / "participants.tsv").read_text().splitlines()[1:]]


def _volume(cohort, pid):
    return np.asarray(nib.load(cohort / pid / "mri" / f"mwp1{pid}.nii.gz").dataobj, np.float32)


def _put(source, pid, mri: Path, label: str, scale: float = 1.0, iqr: str | None = None, gz: bool = True) -> Path:
    """Write ``pid``'s scan as ``mri/mwp1<label>`` (times ``scale``) with its report beside ``mri/``."""
    img = nib.load(source / pid / "mri" / f"mwp1{pid}.nii.gz")
    mri.mkdir(parents=True, exist_ok=True)
    out = mri / f"mwp1{label}.nii{'.gz' if gz else ''}"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * np.float32(scale), img.affine), out)
    text = (source / pid / "report" / f"cat_{pid}.xml").read_text()
    if iqr is not None:
        old = text.split("<IQR>")[1].split("<")[0]
        text = text.replace(f"<IQR>{old}<", f"<IQR>{iqr}<")
    (mri.parent / "report").mkdir(exist_ok=True)
    (mri.parent / "report" / f"cat_{label}.xml").write_text(text)
    return out


@pytest.fixture
def mixed(source, tmp_path):
    """One root mixing every layout: siteA plain ``<id>/mri/``, siteB flat ``mri/`` (.nii), siteC BIDS derivatives
    with sessions (a later session holds the scan at half intensity, so the stored volume tells which was packed)."""
    root = tmp_path / "mixed"
    a, b, c = [[p for p in _ids(source) if p.startswith(f"sub-{s}")] for s in "ABC"]
    for pid in a:
        _put(source, pid, root / pid / "mri", pid)
    for pid in b:
        _put(source, pid, root / "mri", pid, gz=False)
    c1, c2, c3, c4 = c
    _put(source, c1, root / c1 / "ses-01" / "anat" / "mri", f"{c1}_ses-01_T1w")
    _put(source, c1, root / c1 / "ses-02" / "anat" / "mri", f"{c1}_ses-02_T1w", scale=0.5)
    _put(source, c2, root / c2 / "ses-01" / "mri", f"{c2}_ses-01_T1w")
    _put(source, c2, root / c2 / "ses-02" / "mri", f"{c2}_ses-02_T1w", scale=0.5)
    _put(source, c3, root / c3 / "anat" / "mri", f"{c3}_T1w")
    _put(source, c4, root / c4 / "ses-10" / "anat" / "mri", f"{c4}_ses-10_T1w", scale=0.5)
    _put(source, c4, root / c4 / "ses-2" / "anat" / "mri", f"{c4}_ses-2_T1w")
    shutil.copy(source / "participants.tsv", root)
    shutil.copy(source / "participants.json", root)
    return root


def _pack(root, out, **kw):
    return pack(root, root / "participants.tsv", out, progress=False, n_jobs=1, **kw)


def test_mixed_layouts_and_sessions(mixed, source, tmp_path):
    """Every layout in one root; with several sessions the first in natural order (ses-2 before ses-10) is packed,
    the others are recorded as not used; one table row and one stored volume per subject."""
    m = _pack(mixed, tmp_path / "s")
    assert m["excluded"] == [] and m["n_subjects"] == 12
    st = Store.open(tmp_path / "s")
    assert sorted(st.participant_ids) == sorted(_ids(source))
    for i, pid in enumerate(st.participant_ids):  # the first session is the unscaled scan everywhere
        np.testing.assert_array_equal(st.read(i), _volume(source, pid))
    assert np.isfinite(st.phenotypes["tiv_ml"]).all() and np.isfinite(st.phenotypes["iqr"]).all()  # every report found
    subj = m["subjects"]
    c1, c2, c3, c4 = (p for p in _ids(source) if p.startswith("sub-C"))
    assert subj[c1]["file"] == str(mixed / c1 / "ses-01" / "anat" / "mri" / f"mwp1{c1}_ses-01_T1w.nii.gz")
    assert subj[c1]["report"] == str(mixed / c1 / "ses-01" / "anat" / "report" / f"cat_{c1}_ses-01_T1w.xml")
    assert subj[c1]["session"] == "01" and subj[c2]["session"] == "01" and subj[c4]["session"] == "2"
    assert subj[c1]["not_used"] == [{
        "file": str(mixed / c1 / "ses-02" / "anat" / "mri" / f"mwp1{c1}_ses-02_T1w.nii.gz"), "session": "02",
        "reason": f"an earlier scan was chosen (mwp1{c1}_ses-01_T1w.nii.gz)"}]
    assert [u["session"] for u in subj[c4]["not_used"]] == ["10"]
    assert subj[c3]["session"] is None and subj[c3]["not_used"] == []
    b1 = next(p for p in _ids(source) if p.startswith("sub-B"))
    assert subj[b1]["file"] == str(mixed / "mri" / f"mwp1{b1}.nii") and subj[b1]["session"] is None


def test_session_choice_by_qc_and_by_flag(mixed, source, tmp_path, caplog):
    """A first session failing QC falls back to the next; --session picks one (ses- prefix optional) and leaves
    subjects without sessions alone; a subject without that session is excluded naming the sessions it has."""
    c1, c2, c3, c4 = (p for p in _ids(source) if p.startswith("sub-C"))
    _put(source, c1, mixed / c1 / "ses-01" / "anat" / "mri", f"{c1}_ses-01_T1w", iqr="5.5000")
    m = _pack(mixed, tmp_path / "qc")
    assert m["excluded"] == [] and m["subjects"][c1]["session"] == "02"
    assert m["subjects"][c1]["not_used"][0]["reason"] == "QC: CAT12 IQR 5.50 = 50.0% is below the threshold 60%"
    st = Store.open(tmp_path / "qc")
    np.testing.assert_array_equal(st.read(st.index_of(c1)), _volume(source, c1) * np.float32(0.5))

    assert packmod.main(["--cat12-root", str(mixed), "--out", str(tmp_path / "s2"), "--jobs", "1", "--no-progress",
                         "--session", "ses-02"]) == 0
    m2 = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    st2 = Store.open(tmp_path / "s2")
    for pid in (c1, c2):
        assert m2["subjects"][pid]["session"] == "02"
        np.testing.assert_array_equal(st2.read(st2.index_of(pid)), _volume(source, pid) * np.float32(0.5))
    assert m2["subjects"][c2]["not_used"][0]["reason"] == "session 01 not selected (--session 02)"
    assert m2["subjects"][c3]["session"] is None and st2.n == 11  # no sessions: unaffected
    reasons = {e["participant_id"]: e["reason"] for e in m2["excluded"]}
    assert reasons == {c4: "no scan of session 02 (sessions found: 2, 10)"}

    # The same scan in two CAT12 runs (anat/mri and mri) is ambiguous: one error, nothing written.
    _put(source, c3, mixed / c3 / "mri", f"{c3}_T1w")
    with pytest.raises(ValueError, match=f"subject {c3}: the same scan twice .*{c3}/anat/mri/mwp1{c3}_T1w.nii.gz and "
                                         f".*{c3}/mri/mwp1{c3}_T1w.nii.gz"):
        _pack(mixed, tmp_path / "amb")
    assert not (tmp_path / "amb").exists()


def test_find_scans_owners_sessions_and_depth(tmp_path):
    """Owner = longest id prefix of the label (an id without sub- owns sub-<id>_*); sessions from the name or a
    ses-* folder; BIDS derivatives six levels down; ground_truth/ ignored; files of unknown subjects grouped."""
    files = [
        "derivatives/cat12/sub-01/ses-1/anat/mri/mwp1sub-01_ses-1_T1w.nii.gz",
        "derivatives/cat12/sub-01/ses-pre/anat/mri/mwp1sub-01_T1w.nii.gz",  # session from the folder
        "mri/mwp1a.nii", "mri/mwp1a_b_T1w.nii", "mri/mwp1sub-99_ses-1_T1w.nii.gz", "mri/mwp1sub-99_ses-2_T1w.nii.gz",
        "ground_truth/mri/mwp1a.nii.gz", "x/mri/notmwp1a.nii",
    ]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).touch()
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "cat_a.xml").touch()
    d = discover.find_scans(tmp_path, ["01", "a", "a_b", "sub-03"])
    assert [(s.session, s.label) for s in d.scans["01"]] == [("1", "sub-01_ses-1_T1w"), ("pre", "sub-01_T1w")]
    assert [s.label for s in d.scans["a"]] == ["a"] and d.scans["a"][0].report == tmp_path / "report" / "cat_a.xml"
    assert [s.label for s in d.scans["a_b"]] == ["a_b_T1w"] and d.scans["a_b"][0].report is None
    assert d.missing == ["sub-03"]
    assert list(d.unlisted) == ["sub-99"] and len(d.unlisted["sub-99"]) == 2
    with pytest.raises(FileNotFoundError, match="CAT12 output folder not found"):
        discover.find_scans(tmp_path / "nope", ["a"])


def _relabel(root, mapping):
    lines = [ln.split("\t") for ln in (root / "participants.tsv").read_text().splitlines()]
    col = lines[0].index("diagnosis")
    for row in lines[1:]:
        row[col] = mapping.get(row[0], mapping.get(row[col], row[col]))
    (root / "participants.tsv").write_text("\n".join("\t".join(r) for r in lines) + "\n")


def test_unknown_labels_list_every_value_and_the_flags(source, tmp_path, caplog):
    """Labels other than --patient-label/--control-label: one error listing every distinct value (with its
    participants.json description and count) and the flags; with the right flags the cohort packs and the Levels
    are recorded."""
    root = Path(shutil.copytree(source, tmp_path / "cohort"))
    ids = _ids(root)
    _relabel(root, {"SZ": "SCZ", "HC": "CTRL"})
    _relabel(root, {ids[5]: "BD"})
    meta = json.loads((root / "participants.json").read_text())
    meta["diagnosis"]["Levels"] = {"SCZ": "schizophrenia", "CTRL": "healthy control", "BD": "bipolar disorder"}
    (root / "participants.json").write_text(json.dumps(meta))
    assert packmod.main(["--cat12-root", str(root), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    text = caplog.text
    assert "column 'diagnosis' holds value(s) matching neither --patient-label 'SZ' nor --control-label 'HC'" in text
    assert "'SCZ' first on line 2" in text or "'SCZ' first on line 3" in text
    assert f"'BD' first on line 7 (subject {ids[5]})" in text
    assert "Values found: 'BD' = bipolar disorder (1 subject), 'CTRL' = healthy control (" in text
    assert "'SCZ' = schizophrenia (" in text and "Pass --patient-label LABEL and --control-label LABEL" in text
    assert not (tmp_path / "s").exists()

    _relabel(root, {ids[5]: "CTRL"})
    assert packmod.main(["--cat12-root", str(root), "--out", str(tmp_path / "s"), "--no-progress", "--jobs", "1",
                         "--patient-label", "SCZ", "--control-label", "CTRL"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["labels"]["patient"] == "SCZ" and m["labels"]["levels"]["BD"] == "bipolar disorder"
    assert m["participants_json"]["age"]["Units"] == "year"
    assert set(m["counts"]["siteA"]) == {"SCZ", "CTRL"}
    st = Store.open(tmp_path / "s")
    assert st.is_patient.sum() == sum(c["SCZ"] for c in m["counts"].values()) > 0

    (root / "participants.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"participants.json: not valid JSON"):
        _pack(root, tmp_path / "t", patient_label="SCZ", control_label="CTRL")
    (root / "participants.json").write_text(json.dumps({"diagnosis": {"Levels": ["SCZ", "CTRL"]}}))
    with pytest.raises(ValueError, match=r"participants.json: column 'diagnosis': 'Levels' must be an object"):
        _pack(root, tmp_path / "t", patient_label="SCZ", control_label="CTRL")
    (root / "participants.json").unlink()
    assert _pack(root, tmp_path / "t", patient_label="SCZ", control_label="CTRL")["participants_json"] is None
