"""The planner (``python -m launch.plan``) against a hand-computed calibration, its CLI errors, and the calibration
that ``benchmarks/bench_scale.py`` writes being one the planner reads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_decode.config import profile_config
from dist_decode.contracts import calibration as cal_contract
from dist_decode.contracts.store import SCHEMA_VERSION as STORE_SCHEMA
from launch.plan import main as plan_main
from launch.plan import project

ROOT = Path(__file__).resolve().parents[1]


def made_up_calibration() -> dict:
    """Round unit costs on a 10x10x10 grid (the expected hours below are worked out by hand from them)."""
    return {
        "schema_version": cal_contract.SCHEMA_VERSION,
        "machine": {"hostname": "test", "cpu_model": "made up", "cores": 2},
        "units": {
            "pack_s_per_subject": 0.5, "store_mb_per_volume": 2.0, "pack_grid": [10, 10, 10],
            "train_s_per_step": {"fp32": 8.0, "bf16": 4.0}, "train_batch_size": 2, "train_grid": [10, 10, 10],
            "train_threads": 1, "train_s_to_first_step": 10.0, "normalise_s_per_subject": 1.0,
            "gpu_s_per_step": {"fp32": None, "bf16": None},
            "syn_s_per_registration": 30.0, "syn_grid": [10, 10, 10],
            "group_s_per_patient": 0.5, "group_grid": [10, 10, 10],
            "rsa_s_per_1000_permutations_per_rank": {"1": 20.0, "2": 21.0}, "rsa_n": 101, "rsa_tests": 8,
        },
        "peak_rss_mb": {"demo": {"pack": 50, "train": 900, "syn": 400, "group": 100, "rsa": 200},
                        "paper": {"pack": 100, "train": 2000, "syn": 500, "group": 1000, "rsa": 300}},
        "scales": {"paper": {"subjects": 100, "largest_site_patients": 10}},
    }


def made_up_manifest() -> dict:
    """Four sites of 10 SZ + 10 HC on a 20x10x10 grid (twice the calibration grid's voxels)."""
    sites = ["A", "B", "C", "D"]
    return {"schema_version": STORE_SCHEMA, "grid": {"shape": [20, 10, 10]}, "sites": sites, "shards": [],
            "counts": {s: {"SZ": 10, "HC": 10} for s in sites}, "columns": {}, "labels": {"patient_label": "SZ"},
            "n_subjects": 80, "loso_ineligible": []}


SETTINGS = ["train.steps=100", "train.batch_size=4", 'train.precision="bf16"', 'maps.kind="jacobian"',
            "rsa.permutations=1000", "rsa.block_size=100"]
CLUSTER = dict(nodes=2, gpus_per_fold=2, gpus_per_node=4, cpus_per_node=10, cpus_per_task=4, gpu_speedup=100.0,
               cpu_thread_efficiency=0.5, allreduce_overhead=0.05, forward_fraction=0.25, report_s=60.0)


def test_projection_matches_hand_computed_hours():
    plan = project(made_up_manifest(), profile_config("gpu", SETTINGS), made_up_calibration(), [0, 1, 2, 3],
                   **CLUSTER)
    by = {s.name: s for s in plan.stages}
    # pack: 80 subjects x 0.5 s x 2 (voxels) = 80 CPU-s over 4 processes
    assert by["pack"].wall_s == pytest.approx(20.0)
    assert by["pack"].cpu_h == pytest.approx(80 / 3600)
    # train: per volume 4 s / 2 x 2 = 4 s; GPU step 4 x 4 / 100 = 0.16 s, x 1.05 all-reduce = 0.168 s; 100 steps.
    # setup (normalisation 1 s x 80 x 2 + start 10 s x 2) / (4 threads x 0.5) = 90 s; export 80 x 4 x 0.25 / 100
    # = 0.8 s -> 107.6 s per fold; 4 folds of 2 GPUs on 2 nodes x 4 GPUs: one wave.
    fold = 90 + 100 * 0.168 + 0.8
    assert by["train (one fold)"].wall_s == pytest.approx(fold)
    assert by["train (4 folds)"].wall_s == pytest.approx(fold)
    assert by["train (4 folds)"].gpu_h == pytest.approx(4 * fold * 2 / 3600)
    assert by["train (4 folds)"].cpu_h == pytest.approx(4 * fold * 4 * 2 / 3600)
    # maps: 40 patients x 2 registrations x 30 s x 2 = 4800 CPU-s over 20 cores; group tests 0.5 s x 2 per patient,
    # 40 CPU-s, the sites side by side: the largest (10 patients) adds 10 s
    assert by["maps"].wall_s == pytest.approx(4800 / 20 + 10)
    assert by["maps"].cpu_h == pytest.approx(4840 / 3600)
    assert by["maps"].peak_mb == pytest.approx(1000)
    # rsa: 20 s x 1000/1000 x (4 x 190 pairs / 5050) x (8 / 8 tests) over min(20 cores, 10 blocks) ranks
    rsa_cpu = 20 * 760 / 5050
    assert by["rsa"].cpu_h == pytest.approx(rsa_cpu / 3600)
    assert by["rsa"].wall_s == pytest.approx(rsa_cpu / 10)
    assert by["rsa"].tasks == 10
    assert plan.total_wall_s == pytest.approx(20 + fold + 250 + 60)
    assert plan.dominant == "maps"
    assert any("NO GPU FIGURE" in a and "100x" in a for a in plan.assumptions)


def test_measured_gpu_step_replaces_the_assumption_and_cpu_cluster_uses_threads():
    man, cal = made_up_manifest(), made_up_calibration()
    cfg = profile_config("gpu", SETTINGS)
    gpu = project(man, cfg, cal, [0, 1, 2, 3], **{**CLUSTER, "gpus_per_fold": 1}, gpu_step_s=0.5)
    step = {s.name: s for s in gpu.stages}["train (one fold)"]
    assert "100 steps x 0.5 s" in step.note
    assert step.wall_s == pytest.approx(90 + 100 * 0.5 + 80 * 0.5 / 4 * 0.25)  # export: the measured step's forward
    assert not any("NO GPU FIGURE" in a for a in gpu.assumptions)
    # CPU-only: bf16 per volume 4 s x batch 4 / (4 threads x 0.5) = 8 s per step; 10 cores // 4 = 2 folds per node
    cpu = project(man, cfg, cal, [0, 1, 2, 3], **{**CLUSTER, "gpus_per_fold": 0})
    by = {s.name: s for s in cpu.stages}
    fold = 90 + 100 * 8.0 + 80 * 4 * 0.25 / 2
    assert by["train (one fold)"].wall_s == pytest.approx(fold)
    assert by["train (4 folds)"].wall_s == pytest.approx(fold)  # 2 nodes x 2 folds: one wave
    assert by["train (4 folds)"].gpu_h == 0
    assert cpu.dominant == "train (4 folds)"


def test_a_model_other_than_the_calibrated_one_is_said_plainly():
    # the calibration's step is the gpu profile's model; the cpu profile's (dense decoder, 6 mm linear encoders)
    # costs far less per voxel: the plan must not pass the scaled figure off as a projection for it
    man, cal = made_up_manifest(), made_up_calibration()
    same = project(man, profile_config("gpu", SETTINGS), cal, [0, 1], **{**CLUSTER, "gpus_per_fold": 0})
    assert not any("ANOTHER MODEL" in a for a in same.assumptions)
    other = project(man, profile_config("cpu", SETTINGS), cal, [0, 1], **{**CLUSTER, "gpus_per_fold": 0})
    said = [a for a in other.assumptions if "ANOTHER MODEL" in a]
    assert len(said) == 1 and "model.decoder" in said[0] and "model.encoder_voxel_mm" in said[0]
    cal["units"]["train_profile"] = "cpu"  # a calibration of the cpu profile's model fits it, not the gpu one
    assert not any("ANOTHER MODEL" in a for a in project(man, profile_config("cpu", SETTINGS), cal, [0, 1],
                                                         **{**CLUSTER, "gpus_per_fold": 0}).assumptions)


def _write(tmp_path: Path, cal: dict | None = None, manifest: dict | None = None) -> tuple[Path, Path]:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    (store / "manifest.json").write_text(json.dumps(manifest or made_up_manifest()))
    calf = tmp_path / "calibration.json"
    calf.write_text(json.dumps(cal or made_up_calibration()))
    return store, calf


def test_cli_prints_every_stage_and_the_assumptions(tmp_path, capsys):
    store, calf = _write(tmp_path)
    rc = plan_main(["--store", str(store), "--calibration", str(calf), "--gpus-per-fold", "4", "--nodes", "8",
                    "--folds", "0,3"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("pack", "train (one fold)", "train (2 folds)", "maps", "rsa", "report", "dominant stage:",
                 "NO GPU FIGURE", "GPU-h", "CPU-h"):
        assert name in out, name


@pytest.mark.parametrize("damage, field", [
    (lambda c: c.update(schema_version=0), "schema_version"),
    (lambda c: c["units"].pop("syn_s_per_registration"), "units.syn_s_per_registration"),
    (lambda c: c.pop("peak_rss_mb"), "peak_rss_mb"),
    (lambda c: c["units"]["train_s_per_step"].update(fp32=-1), "units.train_s_per_step.fp32"),
])
def test_cli_names_the_file_and_the_field_of_a_bad_calibration(tmp_path, capsys, damage, field):
    cal = made_up_calibration()
    damage(cal)
    store, calf = _write(tmp_path, cal)
    assert plan_main(["--store", str(store), "--calibration", str(calf)]) == 2
    err = capsys.readouterr().err
    assert str(calf) in err and field in err


def test_cli_errors_for_missing_inputs(tmp_path, capsys):
    store, calf = _write(tmp_path)
    assert plan_main(["--store", str(tmp_path / "nowhere"), "--calibration", str(calf)]) == 2
    assert str(tmp_path / "nowhere" / "manifest.json") in capsys.readouterr().err
    assert plan_main(["--store", str(store), "--calibration", str(tmp_path / "none.json")]) == 2
    assert str(tmp_path / "none.json") in capsys.readouterr().err
    assert plan_main(["--store", str(store), "--calibration", str(calf), "--folds", "9"]) == 2
    assert plan_main(["--store", str(store), "--calibration", str(calf), "--gpus-per-fold", "8",
                      "--gpus-per-node", "4", "--nodes", "1"]) == 2
    assert "a fold needs 8 GPUs" in capsys.readouterr().err
    help_out = subprocess.run([sys.executable, "-m", "launch.plan", "--help"], capture_output=True, text=True,
                              cwd=ROOT)
    assert help_out.returncode == 0 and "--gpu-step-s" in help_out.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_bench_scale_writes_a_calibration_the_planner_reads(tmp_path, capsys):
    """A tiny real run of every stage of the benchmark (6 mm, 3 training steps), then the planner on its store."""
    calf = tmp_path / "calibration.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--work", str(tmp_path / "w"), "--scales",
           "tiny", "--synth-args", "--set subjects_per_site=6", "--train-steps", "3", "--train-batch", "2",
           "--syn-pairs", "1", "--rsa-permutations", "40", "--subset-subjects", "12", "--subset-patients", "3",
           "--calibration", str(calf)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    cal = cal_contract.read_calibration(calf)
    u = cal["units"]
    assert u["train_grid"] == [29, 35, 29] and u["train_batch_size"] == 2
    assert u["normalise_s_per_subject"] is not None  # parsed from the trainer's log (0.1 s resolution: 0.0 at 6 mm)
    assert u["gpu_s_per_step"]["bf16"] is None  # measured on a CPU: no GPU figure is invented
    assert set(cal["peak_rss_mb"]["tiny"]) == {"pack", "train", "syn", "group", "rsa", "pack_subset", "group_subset"}
    assert cal["scales"]["tiny"]["subset_subjects"] < cal["scales"]["tiny"]["subjects"]
    assert all(v > 0 for v in cal["peak_rss_mb"]["tiny"].values())
    assert cal["stages"]["tiny"]["rsa"]["identical_results"] is True
    for key in ("hostname", "cpu_model", "cores", "memory_gb", "torch", "date_utc"):
        assert cal["machine"][key]
    # a re-run reuses every cached stage and rewrites the same units
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "run:" not in again.stderr
    assert cal_contract.read_calibration(calf)["units"] == u
    assert plan_main(["--store", str(tmp_path / "w" / "stores" / "tiny"), "--calibration", str(calf),
                      "--gpus-per-fold", "0"]) == 0
    assert "dominant stage:" in capsys.readouterr().out
