"""launch: the stage graph, fold selection, the SLURM helper CLIs, and the demo/launcher on the local
submitit executor with the real stage entry points (no SLURM needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.slurmctl import parse_scontrol
from launch.stages import build_plan, fold_array_spec, parse_folds, read_store_sites

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FAST = ["data.grid=null", "train.steps=6", "train.checkpoint_every=3", "model.channels=[4, 8]", "model.hidden=16",
        "train.batch_size=4", "train.feature_samples=2", "rsa.permutations=200", "rsa.block_size=100"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def _manifest(tmp_path: Path, sites: list[str], ineligible=()) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "grid": {}, "shards": [], "counts": {}, "columns": {}, "labels": {},
        "sites": sites, "loso_ineligible": [{"site": s, "reason": "no patients"} for s in ineligible]}))
    return store


# -- fold selection and the stage graph ----------------------------------------------------------------
def test_parse_folds_all_skips_ineligible_sites_and_lists_accept_ranges() -> None:
    sites = ["A", "B", "C", "D", "E"]
    assert parse_folds("all", sites, {"C": "no patients"}) == [0, 1, 3, 4]
    assert parse_folds("0,3-4", sites, {}) == [0, 3, 4]
    with pytest.raises(ValueError, match="fold 7 out of range; the store has 5 sites"):
        parse_folds("7", sites, {})
    with pytest.raises(ValueError, match="site C.*no patients"):
        parse_folds("2", sites, {"C": "no patients"})
    with pytest.raises(ValueError, match="'x' is not a fold index"):
        parse_folds("0,x", sites, {})


def test_fold_array_spec_compresses_runs() -> None:
    assert fold_array_spec([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7-8"
    assert fold_array_spec([4]) == "4"


def test_read_store_sites_names_the_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "manifest.json")):
        read_store_sites(tmp_path / "nope")
    store = _manifest(tmp_path, ["A", "B", "C"], ["B"])
    assert read_store_sites(store) == (["A", "B", "C"], {"B": "no patients"})


def test_plan_chains_folds_maps_rsa_analysis_and_report(tmp_path: Path) -> None:
    store = _manifest(tmp_path, ["A", "B", "C"])
    run = tmp_path / "run"
    stages = build_plan(store, run, [0, 2], ["A", "B", "C"], tasks_per_fold=2, rsa_ranks=3,
                        train_args=["--set", "train.steps=5"])
    by = {s.name: s for s in stages}
    assert by["fold-2"].args[:6] == ["--store", str(store.absolute()), "--fold", "2", "--run-dir", str(run.absolute())]
    assert by["fold-2"].args[-2:] == ["--set", "train.steps=5"] and by["fold-2"].ntasks == 2
    assert by["fold-2"].done == run.absolute() / "folds" / "C" / "DONE"
    assert by["rsa"].mpi and by["rsa"].ntasks == 3 and set(by["rsa"].deps) == {"fold-0", "fold-2"}
    assert by["rsa"].done == run.absolute() / "rsa" / "rsa.json"
    maps_parts = [s for s in stages if s.kind == "maps_fold"]
    assert maps_parts and all(set(s.deps) <= {"fold-0", "fold-2"} for s in maps_parts)
    assert set(by["maps"].deps) == {s.name for s in maps_parts}
    assert by["maps"].done == run.absolute() / "maps" / "overlap.nii.gz"
    assert by["rsa"].args[-2:] == ["--expect-ranks", "3"]
    assert set(by["analysis"].deps) == {"maps", "rsa"} and by["report"].deps == ["analysis"]
    assert by["analysis"].done == run.absolute() / "analysis" / "analysis.json"
    names = [s.name for s in stages]
    for st in stages:  # dependency order: every stage after what it needs
        assert all(names.index(d) < names.index(st.name) for d in st.deps)
    # the per-subject split: maps-K shards after every fold, then the group step
    sharded = {s.name: s for s in build_plan(store, run, [0, 2], ["A", "B", "C"], maps_split="subject",
                                             maps_jobs=3)}
    assert [sharded[f"maps-{k}"].args[-4:] for k in range(3)] == [
        ["--shard", f"{k}/3", "--workers", "1"] for k in range(3)]
    assert sharded["maps"].args[-2:] == ["--stage", "group"] and set(sharded["maps-1"].deps) == {"fold-0", "fold-2"}


def test_parse_scontrol_keeps_values_with_spaces() -> None:
    line = ("JobId=12 JobName=dd-fold-0 JobState=CANCELLED Reason=DependencyNeverSatisfied Dependency=afterok:11(failed)"
            " Requeue=1 Restarts=2 ExitCode=0:0 Command=/bin/echo a b StdOut=/tmp/x.out")
    rec = parse_scontrol(line)[0]
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "2" and rec["Command"] == "/bin/echo a b"


# -- CLIs ---------------------------------------------------------------------------------------------
def test_stages_cli_array_and_check_fold_exit_codes(tmp_path: Path) -> None:
    store = _manifest(tmp_path, ["A", "B", "C", "D"], ["C"])
    run = lambda *a: subprocess.run([PY, "-m", "launch.stages", *a], capture_output=True, text=True, env=_env())  # noqa: E731
    assert run("array", "--store", str(store)).stdout.strip() == "0-1,3"
    assert run("check-fold", "--store", str(store), "--fold", "1").returncode == 0
    res = run("check-fold", "--store", str(store), "--fold", "2")
    assert res.returncode == 1 and "site C cannot be held out: no patients" in res.stdout
    res = run("check-fold", "--store", str(store), "--fold", "6")
    assert res.returncode == 1 and "no fold 6" in res.stdout
    res = run("check-fold", "--store", str(tmp_path / "missing"), "--fold", "0")
    assert res.returncode == 2 and "no store at" in res.stderr


def test_submit_rejects_bad_folds_without_traceback(tmp_path: Path) -> None:
    store = _manifest(tmp_path, ["A", "B"])
    res = subprocess.run([PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(tmp_path / "r"),
                          "--folds", "5", "--cluster", "local"], capture_output=True, text=True, env=_env())
    assert res.returncode == 2
    assert "fold 5 out of range; the store has 2 sites" in res.stderr and "Traceback" not in res.stderr


def test_dry_run_prints_the_commands_and_submits_nothing(tmp_path: Path) -> None:
    store = _manifest(tmp_path, ["A", "B"])
    run = tmp_path / "r"
    res = subprocess.run([PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--cluster", "local",
                          "--dry-run"], capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr
    assert "-m dist_decode.train --store" in res.stdout and "-m dist_decode.report --run-dir" in res.stdout
    assert not run.exists()


# -- the demo on the local executor, with a failing fold, then a re-run ---------------------------------
@pytest.mark.slow
def test_demo_local_failing_fold_then_rerun_finishes_only_the_rest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [PY, "-m", "launch.demo", "--preset", "tiny", "--seed", "5", "--cohort", str(tmp_path / "cohort"),
           "--store", str(tmp_path / "store"), "--run-dir", str(run), "--cluster", "local", "--folds", "0,1"]
    for item in FAST:
        cmd += ["--set", item]
    # fold 1 cannot create its folder (a file is in the way): its job fails, everything after it is not run
    blocker = run / "folds" / "siteB"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way\n")
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert first.returncode == 1, first.stdout + first.stderr[-3000:]
    assert "fold-1" in first.stderr and "FAILED" in first.stderr
    assert not (run / "report" / "index.html").exists()
    status = subprocess.run([PY, "-m", "launch.status", "--run-dir", str(run)], capture_output=True, text=True,
                            env=_env())
    assert status.returncode == 1
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert " failed " in rows["fold-1"] and " not run " in rows["report"] and "fold-1 failed" in rows["rsa"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["data"]["grid"] is None
    done_before = {s: (run / "folds" / s / "DONE").stat().st_mtime_ns for s in ("siteA",)}

    blocker.unlink()
    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    report = run / "report" / "index.html"
    assert report.is_file() and f"open {report}" in second.stdout
    assert {s: (run / "folds" / s / "DONE").stat().st_mtime_ns for s in done_before} == done_before
    assert (run / "rsa" / "rsa.json").is_file() and (run / "maps" / "overlap.nii.gz").is_file()
    assert (run / "folds" / "siteB" / "DONE").is_file() and not (run / "folds" / "siteC").exists()
    jobs = json.loads((run / "launch" / "jobs.json").read_text())["jobs"]
    assert {j["cluster"] for j in jobs.values()} == {"local"}

    third = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert third.returncode == 0
    assert "RUNNING" not in third.stderr  # nothing left to run
