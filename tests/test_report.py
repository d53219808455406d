"""The report on a tiny complete run (real maps and RSA stages) and on partial runs; HTML rendering checks."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

from dist_decode.config import RunConfig
from dist_decode.maps.pipeline import run_maps
from dist_decode.report.build import build_report
from planted_runs import make_run, planted_loader, raw_cfg

ENV = dict(os.environ)  # conftest.py sets the threads


def _cfg() -> RunConfig:
    # the default density maps; FDR, as 5 patients per site allow no FWE p-value below 2/32
    cfg = raw_cfg(threshold="fdr")
    rsa = cfg.rsa.__class__(**{**cfg.rsa.__dict__, "permutations": 200, "block_size": 100})
    return cfg.replace(rsa=rsa)


@pytest.fixture(scope="module")
def full_run(tiny_store, tmp_path_factory):
    """A complete tiny run: 4 finished folds, the maps stage and the real RSA CLI."""
    root = tmp_path_factory.mktemp("report_full")
    run = make_run(root, tiny_store, cfg=_cfg())
    run_maps(run, load_model=planted_loader(tiny_store, "density"), progress=False)
    res = subprocess.run([sys.executable, "-m", "dist_decode.rsa", "--run-dir", str(run), "--no-progress"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return run


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables += 1


def _check_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes the whole image: a truncated or corrupt PNG raises here
    assert img.format == "PNG" and img.width > 100 and img.height > 50
    arr = np.asarray(img.convert("L"), float)
    assert arr.std() > 5  # not a blank canvas
    return img


def _figures_of(index: Path) -> list[bytes]:
    parser = _Images()
    parser.feed(index.read_text())
    out = []
    for src in parser.srcs:
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,")
            out.append(base64.b64decode(src.split(",", 1)[1]))
        else:
            path = index.parent / src
            assert path.is_file(), f"figure {src} referenced by the HTML is missing"
            out.append(path.read_bytes())
    return out


def test_report_on_complete_run(full_run):
    index = build_report(full_run)
    out = full_run / "report"
    assert index == out / "index.html" and index.is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["missing"] == []
    # Cohort: four sites, the QC exclusion of the tiny cohort is reported.
    c = data["cohort"]
    assert c["status"] == "ok" and c["n_sites"] == 4 and len(c["excluded"]) == 1
    # Folds: every fold done with held-out n, reconstruction error, AUCs, parameter counts.
    folds = data["folds"]["folds"]
    assert [f["status"] for f in folds] == ["done"] * 4
    for f in folds:
        assert f["n_test"] == f["n_test_patients"] + f["n_test_controls"] and f["n_test"] >= 9
        assert 0 < f["recon_error_test"] < 0.01
        # The fixture's S features separate patients (s0 in [0.6, 1]) from controls (0); C is noise.
        assert f["auc_s"] == 1.0 and f["auc_s_transfer"] == 1.0 and 0 <= f["auc_c"] <= 1
        assert f["n_parameters"] == 1234567 and f["anchor_parameters"] == 202_434_754
        assert f["fewer_than_anchor_pct"] == pytest.approx(100 * (1 - 1234567 / 202_434_754), abs=0.01)
    # RSA rows straight from rsa.json: the seed's criterion as the RSA stage marked it (the report recomputes nothing)
    rsa = data["rsa"]
    assert rsa["status"] == "ok" and rsa["permutations"] == 200
    assert {r["space"] for r in rsa["rows"]} == {"S", "C"}
    assert rsa["criterion"] == {"tau": 0.025, "p": 0.01}
    for r in rsa["rows"]:
        if r["tau_a"] is not None and r["p"] is not None:
            assert r["marked"] == (abs(r["tau_a"]) > 0.025 and r["p"] < 0.01)
    # the numbers come from the analysis stage's file
    analysis = json.loads((full_run / "analysis" / "analysis.json").read_text())
    assert analysis["folds"]["folds"] == data["folds"]["folds"] and analysis["recovery"] == {
        k: v for k, v in data["recovery"].items() if k != "goal_rows"}
    # Maps, Dice and clusters.
    m = data["maps"]
    assert m["status"] == "ok" and m["n_sites"] == 4 and m["overlap_max"] == 4 and m["clusters"]
    assert len(m["dice"]["matrix"]) == 4
    # Ground-truth recovery: every metric beside its goal, per fold and overall; the overlap hits the planted regions.
    rec = data["recovery"]
    assert rec["status"] == "ok" and len(rec["folds"]) == 4
    goals = {g["metric"]: g for g in rec["goals"]}
    assert set(goals) >= {"S~specific", "S~common", "C~common", "C~specific", "C diagnosis AUC", "maps Dice",
                          "maps flagged / planted"}
    for name in ("S~specific", "C~common", "C diagnosis AUC", "maps Dice"):
        g = goals[name]
        assert g["goal"] and isinstance(g["met"], bool) and g["value"] is not None
    for f in rec["folds"]:  # the fixture's folds: C is noise
        assert f["n_patients"] in (4, 5) and -1 <= f["C~common"] <= 1  # one siteC patient fails QC
    rm = rec["maps"]
    assert rm["threshold"] == 2 and rm["planted"] > 0 and set(rm["dice_by_min_sites"]) == {"1", "2", "3", "4"}
    # the planted decoder's atrophy is one small blob inside one of the planted regions: most flagged voxels are
    # planted ones (|A and B| from the Dice), though they cover a small part of all planted regions
    both = rm["maps Dice"] * (rm["flagged"] + rm["planted"]) / 2
    assert rm["flagged"] > 0 and both > 0.5 * rm["flagged"] and rm["maps flagged / planted"] < 1
    # the planted effect's own half maximum: the reference of the maps' extent, and the Dice it caps
    assert rm["planted_half_max"] > 0 and 0.3 < rm["dice_ceiling"] < 1 and 0 < rm["dice_half_max"] < 1
    # CSVs and figures beside the HTML.
    for name in ("folds.csv", "cohort.csv", "rsa.csv", "clusters.csv", "dice.csv", "recovery.csv",
                 "recovery_folds.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 20, name
    assert set(data["figures"]) >= {"folds", "loss", "overlap_slices", "overlap_glass", "dice"}
    assert any(k.startswith("rsa_") for k in data["figures"])
    for rel in data["figures"].values():
        _check_png((out / rel).read_bytes())
    # The HTML is self-contained: every figure is embedded and decodes as a valid, non-blank PNG.
    html = index.read_text()
    figs = _figures_of(index)
    assert len(figs) == len(data["figures"])
    for png in figs:
        _check_png(png)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for heading in ("Cohort", "Leave-one-site-out folds", "Representational similarity analysis",
                    "Schizophrenia-specific maps", "Ground-truth recovery", "Provenance"):
        assert heading in html
    assert "0123456789abcdef" in html  # the run's git commit (provenance)
    assert "NOT MET" in html or ">met<" in html  # each recovery goal is plainly marked
    from dist_decode.report.build import fmt
    assert f"Dice {fmt(rm['dice_ceiling'])} with the planted regions" in html  # the maps Dice's ceiling, stated
    # the RSA section says where the S features came from (the run's config)
    decoder = RunConfig.from_saved(full_run / "config.json").model.specific_readout == "decoder"
    assert "S features:" in html and ("closed-form" in html) == decoder and ("S encoder" in html) != decoder
    saved = RunConfig.from_saved(full_run / "config.json").model
    assert ("read from its volume" in html) == (decoder and saved.specific_readout_input == "volume")
    assert ("after the healthy twin" in html) == (decoder and saved.specific_readout_input == "residual")
    c_decoder = saved.common_readout == "decoder"
    assert "C features:" in html and ("healthy twin on the" in html) == c_decoder
    assert ("C encoder's posterior means" in html) != c_decoder
    assert ("the noise plus the salient branch's variance" in html) == (c_decoder and saved.common_readout_salient_noise)


def test_report_skips_unchanged_inputs_and_rebuilds_on_change(full_run):
    index = build_report(full_run)
    stamp = index.stat().st_mtime_ns
    assert build_report(full_run).stat().st_mtime_ns == stamp
    done = full_run / "folds" / "siteA" / "DONE"
    info = json.loads(done.read_text())
    done.write_text(json.dumps({**info, "wall_s": 2.5}))
    build_report(full_run)
    data = json.loads((full_run / "report" / "report.json").read_text())
    assert data["folds"]["folds"][0]["wall_s"] == 2.5


def test_report_on_partial_run(tiny_store, tmp_path):
    # Two folds finished, one still training (folder without DONE), one not started; no maps, no RSA.
    run = make_run(tmp_path, tiny_store, sites=["siteA", "siteB"])
    (run / "folds" / "siteC").mkdir()
    res = subprocess.run([sys.executable, "-m", "dist_decode.report", "--run-dir", str(run)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((run / "report" / "report.json").read_text())
    status = {f["site"]: f["status"] for f in data["folds"]["folds"]}
    assert status == {"siteA": "done", "siteB": "done", "siteC": "in progress", "siteD": "missing"}
    missing = " | ".join(data["missing"])
    assert "fold siteC (in progress)" in missing and "fold siteD (missing)" in missing
    assert "rsa/rsa.json not found" in missing and "maps/overlap.nii.gz not found" in missing
    assert data["rsa"]["status"] == data["maps"]["status"] == "missing"
    html = (run / "report" / "index.html").read_text()
    assert "This run is incomplete" in html and "siteD" in html
    for png in _figures_of(run / "report" / "index.html"):
        _check_png(png)
    # Maps of the two finished folds only: the report says which sites the overlap covers.
    run_maps(run, cfg=_cfg(), workers=1, load_model=planted_loader(tiny_store, "density"), progress=False)
    build_report(run)
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["maps"]["status"] == "ok" and data["maps"]["sites"] == ["siteA", "siteB"]
    assert data["maps"]["sites_missing_fold"] == ["siteC", "siteD"]
    assert "overlap_slices" in data["figures"]


def test_report_with_damaged_fold_file(tiny_store, tmp_path):
    run = make_run(tmp_path, tiny_store, sites=["siteA", "siteB"])
    (run / "folds" / "siteB" / "features.h5").write_bytes(b"not hdf5")
    build_report(run)
    data = json.loads((run / "report" / "report.json").read_text())
    status = {f["site"]: f["status"] for f in data["folds"]["folds"]}
    assert status["siteA"] == "done" and status["siteB"].startswith("done (features.h5 unreadable")
    assert any(m.startswith("fold siteB: features.h5 unreadable") for m in data["missing"])


def test_report_without_store(tiny_store, tmp_path):
    # The store is gone (e.g. the run was copied to a laptop): the report still builds, from the saved analysis.
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    run = make_run(tmp_path, store, sites=["siteA"])
    shutil.rmtree(store)
    with pytest.raises(ValueError, match="analysis cannot run.*none was saved"):
        build_report(run)
    shutil.copytree(tiny_store, store)
    build_report(run)
    shutil.rmtree(store)
    build_report(run, force=True)
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["missing"][0].startswith("analysis not updated") and "store" in data["missing"][0]
    assert data["cohort"]["status"] == "ok" and data["cohort"]["n_sites"] == 4
    assert data["folds"]["folds"][0]["status"] == "done" and data["folds"]["folds"][0]["auc_s"] == 1.0


def test_report_cli_errors(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dist_decode.report", "--run-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2 and "run directory not found" in res.stderr and "Traceback" not in res.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(full_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required under CI (scripts/install_test_deps.sh installs it)")
        pytest.skip("chromium not installed (run scripts/install_test_deps.sh)")
    index = build_report(full_run)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,4000"]
    res = subprocess.run([browser, *flags, f"--screenshot={shot}", index.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"), float)
    assert img.std() > 10  # not blank
    # Figures rendered: the overlap maps use the 'hot' colormap and the Dice map viridis, so the page must show
    # saturated colour, which text and tables (black, grey, pale backgrounds) never have.
    sat = img.max(axis=2) - img.min(axis=2)
    assert (sat > 100).mean() > 0.002
    dom = subprocess.run([browser, *flags, "--dump-dom", index.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    assert len(re.findall(r"<img[^>]+src=\"data:image/png;base64,", dom.stdout)) == \
        len(json.loads((full_run / "report" / "report.json").read_text())["figures"])


def test_a_full_disk_fails_clearly_and_a_rerun_builds_the_report(full_run, tmp_path):
    """A real ENOSPC (tests/small_fs.py) while the report of a complete run is written: exit 2 naming the file and
    the full disk, no traceback, no temporary file, no ``index.html``; with room again the report is built."""
    from small_fs import full_then_room

    cmd = f"{sys.executable} -m dist_decode.report --run-dir $FS/run"
    got = full_then_room(tmp_path, f"cp -r {full_run} $FS/run && rm -rf $FS/run/report $FS/run/analysis", cmd,
                         leave=4096, after=f"ls $FS/run/report > {tmp_path}/listing")
    assert got["full_rc"] == "2", got["full_err"][-2000:]
    assert f"disk full: could not write the report (or the analysis it brings up to date) {tmp_path / 'fs'}/run/" \
        in got["full_err"], got["full_err"]
    assert "No space left on device" in got["full_err"] and "Traceback" not in got["full_err"]
    assert got["full_tmp"] == "" and "index.html" not in got["full_files"]
    assert got["again_rc"] == "0", got["again_err"][-2000:]
    assert "index.html" in (tmp_path / "listing").read_text().split()
