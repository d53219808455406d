"""The RSA CLI end to end: run mode on a real packed store + fold features, table mode, errors, re-runs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_decode.config import RunConfig
from dist_decode.contracts import features as features_contract

REPO = Path(__file__).resolve().parents[1]
KEYS = {"scope", "space", "variable", "kind", "n", "tau_a", "tau_b", "p", "p_fwe", "null_q025", "null_q50",
        "null_q975", "marked"}


def rsa_cli(*args: str, mpi: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dist_decode.rsa", "--no-progress", *args]
    if mpi:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(mpi), *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def make_run(tiny_store: Path, root: Path, permutations: int = 199) -> Path:
    """A run directory whose folds hold features of the real store's subjects (C carries age)."""
    from dist_decode.data import Store

    store = Store.open(tiny_store)
    run = root / "run"
    cfg = RunConfig()
    cfg.rsa.permutations = permutations
    cfg.rsa.block_size = 50
    cfg.to_json(run / "config.json")
    (run / "manifest.json").write_text(json.dumps({"store": str(tiny_store),
                                                   "folds": {str(k): s for k, s in enumerate(store.sites)}}))
    ph = store.phenotypes
    rng = np.random.default_rng(0)
    n = store.n
    for k, site in enumerate(store.sites):
        split = np.where(store.site_of == site, "test", np.where(np.arange(n) % 5 == 0, "val", "train"))
        c = rng.normal(size=(n, 4)) * 0.3
        c[:, 0] += ph["age"] / 10.0  # planted: C encodes age
        s = rng.normal(size=(n, 3))
        K = 3
        d = run / "folds" / site
        d.mkdir(parents=True)
        features_contract.write(d / features_contract.FILE, features_contract.FoldFeatures(
            participant_id=store.participant_ids, site=store.site_of, diagnosis=ph["diagnosis"], split=split,
            c_mean=c, s_mean=s, c_samples=c[:, None] + 0.05 * rng.normal(size=(n, K, 4)),
            s_samples=s[:, None] + 0.05 * rng.normal(size=(n, K, 3)), attrs={"fold": k, "site": site}))
        (d / "DONE").write_text(json.dumps({"steps": 1}))  # the fold's completion file
    return run


def test_run_mode_outputs_and_rerun(tiny_store: Path, tmp_path: Path):
    from dist_decode.data import Store

    run = make_run(tiny_store, tmp_path)
    res = rsa_cli("--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    doc = json.loads((run / "rsa" / "rsa.json").read_text())
    assert set(doc) >= {"config", "seed", "permutations", "ranks", "results"}
    assert doc["permutations"] == 199 and doc["ranks"] == 1 and doc["seed"] == RunConfig().seed
    rows = doc["results"]
    assert all(KEYS <= set(r) for r in rows)
    store = Store.open(tiny_store)
    scopes = {r["scope"] for r in rows}
    assert scopes == set(store.sites) | {"pooled"}
    ph = store.phenotypes
    for site in store.sites:
        at = store.site_of == site
        age = {r["space"]: r for r in rows if r["scope"] == site and r["variable"] == "age"}
        assert age["C"]["n"] == int((at & np.isfinite(ph["age"])).sum())  # C: every held-out subject
        assert age["S"]["n"] == int((at & store.is_patient & np.isfinite(ph["age"])).sum())  # S: patients only
        panss = [r for r in rows if r["scope"] == site and r["variable"] == "panss_total"]
        n_panss = int((at & store.is_patient & np.isfinite(ph["panss_total"])).sum())
        assert all(r["n"] == n_panss for r in panss)  # patients only (controls have no PANSS anyway)
    # pooled = stratified sum of the per-site numerators
    for space in ("S", "C"):
        for var in ("age", "sex"):
            parts = [r for r in rows if r["scope"] != "pooled" and r["space"] == space and r["variable"] == var]
            pooled = [r for r in rows if r["scope"] == "pooled" and r["space"] == space and r["variable"] == var]
            assert len(pooled) == 1
            assert pooled[0]["S"] == sum(r["S"] for r in parts)
            assert pooled[0]["n"] == sum(r["n"] for r in parts)
    pc = next(r for r in rows if r["scope"] == "pooled" and r["space"] == "C" and r["variable"] == "age")
    assert pc["tau_a"] > 0.2 and pc["p"] == pytest.approx(1 / 200) and pc["p_fwe"] <= 0.01 and pc["marked"]
    ps = next(r for r in rows if r["scope"] == "pooled" and r["space"] == "S" and r["variable"] == "age")
    assert ps["p"] > 0.01 and not ps["marked"]
    with open(run / "rsa" / "rsa.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == len(rows) and KEYS <= set(csv_rows[0])
    null = np.load(run / "rsa" / "null.npz")
    assert null["null"].shape == (199, len(rows)) and null["null"].dtype == np.int64
    assert "p_FWE" in (run / "rsa" / "rsa.txt").read_text()
    # re-run skips finished work; --force recomputes the same bytes
    before = (run / "rsa" / "rsa.csv").read_bytes()
    mtime = (run / "rsa" / "rsa.json").stat().st_mtime_ns
    again = rsa_cli("--run-dir", str(run))
    assert again.returncode == 0 and (run / "rsa" / "rsa.json").stat().st_mtime_ns == mtime
    assert "already done" in again.stderr
    # --patients-only-spaces '' analyses S over everyone again
    every = rsa_cli("--run-dir", str(run), "--force", "--patients-only-spaces", "")
    assert every.returncode == 0, every.stderr
    rows2 = json.loads((run / "rsa" / "rsa.json").read_text())["results"]
    s_age = next(r for r in rows2 if r["scope"] == store.sites[0] and r["space"] == "S" and r["variable"] == "age")
    assert s_age["n"] == int(((store.site_of == store.sites[0]) & np.isfinite(ph["age"])).sum())
    forced = rsa_cli("--run-dir", str(run), "--force", "--use-samples")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run / "rsa" / "rsa.json").read_text())["config"]["use_samples"] is True
    assert (run / "rsa" / "rsa.csv").read_bytes() != before


@pytest.mark.mpi
def test_run_mode_two_mpi_ranks_equal_one(tiny_store: Path, tmp_path: Path):
    one = make_run(tiny_store, tmp_path / "a", permutations=150)
    two = make_run(tiny_store, tmp_path / "b", permutations=150)
    assert rsa_cli("--run-dir", str(one)).returncode == 0
    res = rsa_cli("--run-dir", str(two), "--expect-ranks", "2", mpi=2)
    assert res.returncode == 0, res.stderr
    assert json.loads((two / "rsa" / "rsa.json").read_text())["ranks"] == 2
    assert (one / "rsa" / "rsa.csv").read_bytes() == (two / "rsa" / "rsa.csv").read_bytes()
    assert np.load(one / "rsa" / "null.npz")["null"].tobytes() == np.load(two / "rsa" / "null.npz")["null"].tobytes()


def test_run_mode_missing_fold_features_is_a_clear_error(tiny_store: Path, tmp_path: Path):
    run = make_run(tiny_store, tmp_path, permutations=9)
    (run / "folds" / "siteB" / "features.h5").rename(run / "features-of-B.h5")  # finished fold, features gone
    res = rsa_cli("--run-dir", str(run))
    assert res.returncode == 2
    assert "siteB" in res.stderr and "features.h5" in res.stderr and "Traceback" not in res.stderr
    (run / "folds" / "siteB" / "DONE").unlink()  # a fold not trained yet
    res = rsa_cli("--run-dir", str(run))
    assert res.returncode == 2 and "siteB" in res.stderr and "not trained" in res.stderr
    assert not (run / "rsa" / "rsa.json").exists()
    res = rsa_cli("--run-dir", str(run), "--allow-missing-folds")
    assert res.returncode == 0, res.stderr
    doc = json.loads((run / "rsa" / "rsa.json").read_text())
    assert doc["missing_folds"] == ["siteB"] and "siteB" not in doc["sites"] and len(doc["sites"]) == 3
    assert {r["scope"] for r in doc["results"]} == set(doc["sites"]) | {"pooled"}


@pytest.fixture()
def table(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(5)
    n = 40
    ids = [f"sub-{i:03d}" for i in range(n)]
    age = rng.integers(18, 60, n).astype(float)
    x = rng.normal(size=(n, 5))
    x[:, 0] += age / 8
    with h5py.File(tmp_path / "F.h5", "w") as f:
        f.create_dataset("participant_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f["mine"] = x
        f["samples"] = x[None] + rng.normal(size=(4, n, 5)) * 0.1
        f["labels"] = np.arange(7)  # not a feature space: skipped
    lines = ["participant_id\tage\tsex\tsite\tdiagnosis\tpanss_total"]
    for i in range(n):
        dx = "SZ" if i % 2 else "HC"
        lines.append(f"{ids[::-1][i]}\t{'n/a' if ids[::-1][i] == 'sub-003' else age[n - 1 - i]}\t"
                     f"{'MF'[i % 2 == 0 and i % 3 == 0]}\t{'ab'[i % 2]}\t{dx}\t{60 + i if dx == 'SZ' else 'n/a'}")
    (tmp_path / "P.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path / "F.h5", tmp_path / "P.tsv"


def test_table_mode(table, tmp_path: Path):
    f, p = table
    out = tmp_path / "out"
    res = rsa_cli("--features", str(f), "--phenotypes", str(p), "--variables",
                  "age:continuous,sex:categorical,panss_total:continuous", "--patients-only", "panss_total",
                  "--out", str(out), "--permutations", "99", "--seed", "4", "--fwe", "minP",
                  "--distance", "correlation")
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "rsa.json").read_text())
    rows = {(r["space"], r["variable"]): r for r in doc["results"]}
    assert set(rows) == {(s, v) for s in ("mine", "samples") for v in ("age", "sex", "panss_total")}
    assert rows[("mine", "age")]["n"] == 39 and rows[("mine", "panss_total")]["n"] == 20
    assert doc["seed"] == 4 and doc["config"]["fwe"] == "minP" and doc["config"]["distance"] == "correlation"
    assert all(r["p_fwe"] >= r["p"] for r in doc["results"])
    assert "age" in res.stdout  # readable table printed


def test_table_mode_errors(table, tmp_path: Path):
    f, p = table
    res = rsa_cli("--features", str(f), "--phenotypes", str(p), "--variables", "iq:continuous",
                  "--out", str(tmp_path / "o"), "--permutations", "9")
    assert res.returncode == 2 and "'iq'" in res.stderr and "Traceback" not in res.stderr
    res = rsa_cli("--features", str(f), "--phenotypes", str(p), "--variables", "age:ordinal",
                  "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "age:ordinal" in res.stderr
    res = rsa_cli("--features", str(tmp_path / "nope.h5"), "--phenotypes", str(p), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "nope.h5" in res.stderr
    short = tmp_path / "short.tsv"
    short.write_text("\n".join(p.read_text().splitlines()[:10]) + "\n")
    res = rsa_cli("--features", str(f), "--phenotypes", str(short), "--variables", "age:continuous",
                  "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "have no phenotypes" in res.stderr
    assert not (tmp_path / "o" / "rsa.json").exists()


def test_a_full_disk_fails_clearly_and_a_rerun_finishes(table, tmp_path: Path):
    """A real ENOSPC (a private tmpfs, tests/small_fs.py) while the results are written: exit 2 with an error naming
    the file and the full disk, no traceback, no temporary file, no ``rsa.json`` (the analysis is not taken for
    finished); with room again the same command finishes."""
    from small_fs import full_then_room

    f, p = table
    cmd = (f"{sys.executable} -m dist_decode.rsa --no-progress --features {f} --phenotypes {p} "
           f"--variables age:continuous,sex:categorical --out $FS/out --permutations 99")
    got = full_then_room(tmp_path, "mkdir $FS/out", cmd, after=f"cp -r $FS/out {tmp_path}/out")
    assert got["full_rc"] == "2", got["full_err"][-2000:]
    assert f"disk full: could not write the RSA results {tmp_path / 'fs'}/out/" in got["full_err"], got["full_err"]
    assert "No space left on device" in got["full_err"] and "Traceback" not in got["full_err"]
    assert got["full_tmp"] == "" and "rsa.json" not in got["full_files"]
    assert got["again_rc"] == "0", got["again_err"][-2000:]
    assert len(json.loads((tmp_path / "out" / "rsa.json").read_text())["results"]) == 4
