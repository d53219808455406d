"""The SLURM routes on the project's real single-node SLURM (scripts/slurm_up.sh).

Skipped when SLURM is not up, unless CI=true (then they fail). Jobs are followed by polling
``squeue``/``scontrol`` every 0.25 s (``sbatch --wait`` polls at 2/10/42 s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurmctl

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

#: A fold of the tiny cohort in a few seconds (batch 4: the trainer needs >= 2 patients per batch).
FAST = ["train.steps=6", "train.checkpoint_every=3", "model.channels=[4, 8]", "model.hidden=16",
        "train.batch_size=4", "train.feature_samples=2", "rsa.permutations=200", "rsa.block_size=100"]


@pytest.fixture(scope="module")
def slurm() -> None:
    if slurmctl.slurm_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("SLURM is not up under CI=true: scripts/run_tests.sh should have started it (scripts/slurm_up.sh)")
    pytest.skip("SLURM is not up; start it with: bash scripts/slurm_up.sh")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", DD_REPO=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed 3-site cohort (8 subjects each, 4 patients, 8 mm grid) from the real data_prep code."""
    from data_prep.pack import pack
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("slurm_data")
    synthesize(root / "cohort", "tiny", seed=3, voxel_mm=8.0, progress=False, site_sizes=[8, 8, 8],
               site_patients=[4, 4, 4], poor_quality_fraction=0.0)
    pack(root / "cohort", root / "cohort" / "participants.tsv", root / "store")
    return root / "store"


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``store`` but its third site has controls only: the packer marks it ``loso_ineligible``."""
    from data_prep.pack import pack
    from data_prep.synth import synthesize

    root = tmp_path_factory.mktemp("slurm_mixed")
    synthesize(root / "cohort", "tiny", seed=3, voxel_mm=8.0, progress=False, site_sizes=[8, 8, 8],
               site_patients=[4, 4, 0], poor_quality_fraction=0.0)
    pack(root / "cohort", root / "cohort" / "participants.tsv", root / "store", progress=False)
    return root / "store"


def _config(path: Path, extra: list[str] = ()) -> Path:
    from dist_decode.config import RunConfig, override

    override(RunConfig(), FAST + list(extra)).to_json(path)
    return path


def _wait_jobs(job_ids: list[str], timeout: float) -> None:
    """Poll squeue until none of the jobs (or array tasks) is queued or running."""
    deadline = time.monotonic() + timeout
    ids = ",".join(job_ids)
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T"], capture_output=True, text=True)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(0.25)
    pytest.fail(f"jobs {ids} still queued/running after {timeout:.0f} s:\n{_diagnose(job_ids)}")


def _diagnose(job_ids: list[str]) -> str:
    """What SLURM says about stuck jobs (reasons, node state, the controller's last lines); then cancels them."""
    cmds = [["squeue", "-o", "%i %j %T %M %r"], ["sinfo", "-N", "-o", "%N %T %C %E"],
            ["tail", "-n", "15", "/var/log/slurm/slurmctld.log"]]
    text = "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in cmds)
    subprocess.run(["scancel", *job_ids])
    return text


def _start_requeued(job: str, timeout: float) -> None:
    """Wait until a requeued job is PENDING again, then start it now rather than after SLURM's requeue delay.

    slurmd rejects a job whose credential was issued in the same second as the revocation of its previous run
    ("Killing non-startable batch job: Job credential revoked"), so the new start waits for the next second.
    """
    deadline = time.monotonic() + timeout
    while slurmctl.job_state(job) != "PENDING":
        assert time.monotonic() < deadline, slurmctl.job_info(job)
        time.sleep(0.25)
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)


def _sites(store: Path) -> list[str]:
    return json.loads((store / "manifest.json").read_text())["sites"]


def test_slurm_up_is_idempotent_and_srun_pmi2_gives_one_mpi_world(slurm: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh")], check=True, capture_output=True)
    assert time.monotonic() - t0 < 10, "slurm_up.sh on a running cluster must be a quick no-op"
    script = tmp_path / "mpi.sh"
    out = tmp_path / "mpi.out"
    script.write_text(
        "#!/bin/bash\n#SBATCH --ntasks=2 --cpus-per-task=1\n"
        f"srun --mpi=pmi2 {PY} -c \"from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(f'size={c.size} rank={c.rank} sum={c.allreduce(c.rank + 1)}')\"\n")
    jid = subprocess.run(["sbatch", "--parsable", "-o", str(out), str(script)], check=True, capture_output=True,
                         text=True, env=_env()).stdout.strip()
    _wait_jobs([jid], 60)
    assert slurmctl.job_state(jid) == "COMPLETED"
    lines = sorted(out.read_text().split())
    assert "size=2" in lines and "rank=0" in lines and "rank=1" in lines and lines.count("sum=3") == 2


def test_sbatch_loso_array_route_end_to_end(slurm: None, mixed_store: Path, tmp_path: Path) -> None:
    """slurm/submit_all.sh: the fold array (2 srun ranks per fold), maps, RSA (srun --mpi=pmi2), report, on a store
    whose third site has controls only (no fold of its own, no extra flag anywhere)."""
    store = mixed_store
    run = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.json")
    # a torch JIT build lock left by a fold killed while DeepSpeed built its shm op: no fold may hang on it
    stale = Path(_env()["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.touch()
    res = subprocess.run(["bash", str(REPO / "slurm" / "submit_all.sh")], capture_output=True, text=True,
                         env=_env(DD_STORE=str(store), DD_RUN_DIR=str(run), DD_CONFIG=str(cfg), DD_FOLD_TASKS="2"),
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(array 0-1)" in res.stderr, res.stderr
    fold, maps, rsa, report = res.stdout.split()
    _wait_jobs([fold, maps, rsa, report], 240)
    for jid in (maps, rsa, report):
        assert slurmctl.job_state(jid) == "COMPLETED", (jid, (run / "launch" / "slurm").iterdir())
    sites = _sites(store)
    for site in sites[:2]:
        done = json.loads((run / "folds" / site / "DONE").read_text())
        assert done["world_size"] == 2, f"fold {site} did not run with the 2 srun ranks of its task"
    assert not (run / "folds" / sites[2]).exists()
    assert json.loads((run / "rsa" / "rsa.json").read_text())["sites"] == sites[:2]
    assert (run / "maps" / "overlap.nii.gz").is_file()
    rsa_log = next((run / "launch" / "slurm").glob("dd-rsa-*.out")).read_text()
    assert "2 rank(s)" in rsa_log, rsa_log[-2000:]
    assert (run / "rsa" / "rsa.json").is_file()
    assert (run / "report" / "index.html").is_file()
    assert not stale.exists()
    fold_log = "".join(p.read_text() for p in (run / "launch" / "slurm").glob("dd-fold-*.out"))
    assert "left by a build that was killed" in fold_log, fold_log[-2000:]


def test_launch_submit_slurm_failing_fold_blocks_report_and_rerun_completes_the_rest(
        slurm: None, store: Path, tmp_path: Path) -> None:
    """launch.submit --cluster slurm: fold 1 cannot write its folder -> everything downstream is not run and
    launch.status says so; after fixing it the same command finishes only what is missing."""
    run = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.json")
    sites = _sites(store)
    blocker = run / "folds" / sites[1]
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory: makes fold 1 fail\n")
    cmd = [PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--folds", "all",
           "--cluster", "slurm", "--config", str(cfg), "--wait", "--poll", "0.25"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert first.returncode == 1, first.stdout + first.stderr
    assert not (run / "report" / "index.html").exists()
    status = subprocess.run([PY, "-m", "launch.status", "--run-dir", str(run)], capture_output=True, text=True,
                            env=_env())
    assert status.returncode == 1, status.stdout
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line.strip()}
    assert " failed " in rows["fold-1"], status.stdout
    assert " not run " in rows["report"] and "upstream" in rows["report"], status.stdout
    others = [k for k in range(len(sites)) if k != 1]
    for k in others:
        assert " done " in rows[f"fold-{k}"], status.stdout
    before = {k: (run / "folds" / sites[k] / "DONE").stat().st_mtime_ns for k in others}
    jobs_before = json.loads((run / "launch" / "jobs.json").read_text())["jobs"]

    blocker.unlink()
    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (run / "report" / "index.html").is_file()
    assert "report: " + str(run / "report" / "index.html") in second.stdout
    after = {k: (run / "folds" / sites[k] / "DONE").stat().st_mtime_ns for k in others}
    assert after == before, "finished folds must not be trained again"
    jobs_after = json.loads((run / "launch" / "jobs.json").read_text())["jobs"]
    assert jobs_after["fold-0"]["job_id"] == jobs_before["fold-0"]["job_id"]
    assert jobs_after["fold-1"]["job_id"] != jobs_before["fold-1"]["job_id"]
    assert (run / "folds" / sites[1] / "DONE").is_file()


def test_launch_submit_slurm_store_with_a_controls_only_site_reports_why_it_was_not_held_out(
        slurm: None, mixed_store: Path, tmp_path: Path) -> None:
    """launch.submit --folds all on a store with a controls-only site: no fold and no extra flag for it, its subjects
    train every fold, every stage finishes, and the report says which site was not held out and why."""
    store = mixed_store
    sites = _sites(store)
    reason = {e["site"]: e["reason"] for e in json.loads((store / "manifest.json").read_text())["loso_ineligible"]}
    assert list(reason) == [sites[2]] and "no patients" in reason[sites[2]]
    run = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.json")
    res = subprocess.run([PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--folds", "all",
                          "--cluster", "slurm", "--config", str(cfg), "--wait", "--poll", "0.25"],
                         capture_output=True, text=True, env=_env(), timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    plan = json.loads((run / "launch" / "plan.json").read_text())
    assert sorted(s["name"] for s in plan["stages"] if s["kind"] == "fold") == ["fold-0", "fold-1"]
    rsa_stage = next(s for s in plan["stages"] if s["kind"] == "rsa")
    assert "--allow-missing-folds" not in rsa_stage["argv"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["folds"] == {"0": sites[0], "1": sites[1]} and manifest["not_held_out"] == reason
    assert not (run / "folds" / sites[2]).exists()
    # the controls-only site trains every fold (train or validation rows of each fold's features)
    from dist_decode.contracts import features

    for site in sites[:2]:
        f = features.read(run / "folds" / site / "features.h5", samples=False)
        assert (f.site[f.split != "test"] == sites[2]).sum() == 8 and set(f.site[f.split == "test"]) == {site}
    rsa = json.loads((run / "rsa" / "rsa.json").read_text())
    assert rsa["sites"] == sites[:2] and rsa["missing_folds"] == []
    maps = json.loads((run / "maps" / "maps.json").read_text())
    assert maps["sites_missing_fold"] == [] and sites[2] not in maps["sites"]
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    assert analysis["cohort"]["ineligible"] == reason and analysis["folds"]["missing"] == []
    row = next(r for r in analysis["cohort"]["sites"] if r["site"] == sites[2])
    assert row["held out"] == f"no: {reason[sites[2]]}"
    html = (run / "report" / "index.html").read_text()
    assert f"Sites not held out (their subjects train every fold): <b>{sites[2]}</b> ({reason[sites[2]]})" in html
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["missing"] == [], report["missing"]


def test_scontrol_requeue_of_a_running_fold_resumes_from_its_checkpoint(
        slurm: None, store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.json", ["train.steps=100", "train.checkpoint_every=5"])
    site = _sites(store)[0]
    res = subprocess.run([PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--folds", "0",
                          "--cluster", "slurm", "--config", str(cfg), "--maps-split", "none"],
                         capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr
    jobs = json.loads((run / "launch" / "jobs.json").read_text())["jobs"]
    fold_job = jobs["fold-0"]["job_id"]
    # submitting again while the jobs are queued/running reuses them instead of submitting twice
    again = subprocess.run([PY, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--folds", "0",
                            "--cluster", "slurm", "--config", str(cfg), "--maps-split", "none"],
                           capture_output=True, text=True, env=_env())
    assert again.returncode == 0 and "already queued" in again.stderr, again.stderr
    assert json.loads((run / "launch" / "jobs.json").read_text())["jobs"] == jobs
    ckpts = run / "folds" / site / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and any(p.name.startswith("step") for p in ckpts.iterdir())):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert not (run / "folds" / site / "DONE").exists(), "fold finished before it could be requeued"
        time.sleep(0.25)
    subprocess.run(["scontrol", "requeue", fold_job], check=True)
    # SLURM holds a requeued batch job back (BeginTime) for a while; let it start right away.
    _start_requeued(fold_job, 60)
    _wait_jobs([fold_job], 180)
    subprocess.run(["scancel", *[j["job_id"] for j in jobs.values()]])  # the rest of the chain is tested elsewhere
    info = slurmctl.job_info(fold_job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    records = [json.loads(line) for line in (run / "folds" / site / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("kind") == "info"]
    assert starts[0]["resumed"] is False
    assert any(r["resumed"] and r["step"] > 0 for r in starts[1:]), starts
    assert json.loads((run / "folds" / site / "DONE").read_text())["steps"] == 100


def test_time_limit_warning_checkpoints_and_requeues_the_plain_sbatch_fold(
        slurm: None, store: Path, tmp_path: Path) -> None:
    """slurm/loso_array.sh: the time-limit warning (SLURM's --signal=B:USR1, sent here with scancel --batch) makes
    launch.runner checkpoint the fold (SIGUSR1 through srun) and requeue the task, which resumes and finishes."""
    run = tmp_path / "run"
    cfg = _config(tmp_path / "cfg.json", ["train.steps=150", "train.checkpoint_every=5"])
    site = _sites(store)[0]
    logs = tmp_path / "logs"
    logs.mkdir()
    jid = subprocess.run(["sbatch", "--parsable", "--array=0", "--ntasks=1", "-o", str(logs / "%x-%A_%a.out"),
                          str(REPO / "slurm" / "loso_array.sh")], capture_output=True, text=True, check=True,
                         env=_env(DD_STORE=str(store), DD_RUN_DIR=str(run), DD_CONFIG=str(cfg)),
                         cwd=tmp_path).stdout.strip()
    task = f"{jid}_0"
    ckpts = run / "folds" / site / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and any(p.name.startswith("step") for p in ckpts.iterdir())):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert not (run / "folds" / site / "DONE").exists(), "fold finished before the warning could be sent"
        time.sleep(0.25)
    subprocess.run(["scancel", "--batch", "--signal=USR1", task], check=True)
    _start_requeued(task, 90)
    _wait_jobs([jid], 180)
    info = slurmctl.job_info(task)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    out = next(logs.glob("dd-fold-*.out")).read_text()
    assert "time limit near: SIGUSR1 -> checkpoint, then requeue" in out and "requeueing job" in out, out[-3000:]
    records = [json.loads(line) for line in (run / "folds" / site / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("kind") == "info"]
    assert starts[0]["resumed"] is False and any(r["resumed"] and r["step"] > 0 for r in starts[1:]), starts
    assert json.loads((run / "folds" / site / "DONE").read_text())["steps"] == 150


def _rank_pid(task: str, rank: int, timeout: float = 30) -> int:
    """PID of global rank ``rank`` of the first ``srun`` step of a running job (``scontrol listpids``)."""
    job = subprocess.run(["squeue", "-h", "-j", task, "-o", "%A"], capture_output=True, text=True).stdout.strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
        for line in out.splitlines()[1:]:  # PID JOBID STEPID LOCALID GLOBALID
            cols = line.split()
            if len(cols) == 5 and cols[2] == "0" and cols[4] == str(rank):
                return int(cols[0])
        time.sleep(0.25)
    pytest.fail(f"no rank {rank} in job {task}: {out}")


def test_a_rank_killed_with_sigkill_fails_its_fold_job_and_the_requeued_job_resumes_to_the_same_model(
        slurm: None, store: Path, tmp_path: Path) -> None:
    """slurm/loso_array.sh, 2 srun ranks: SIGKILL to rank 1 mid-run (no handler, no checkpoint). srun
    --kill-on-bad-exit ends rank 0 (blocked in a gloo collective with the dead rank otherwise) and the task ends
    FAILED within seconds; requeued, it resumes from the last complete checkpoint and ends with bitwise the weights
    of an uninterrupted run of the same route."""
    from dist_decode.train import checkpoint

    cfg = _config(tmp_path / "cfg.json", ["train.steps=32", "train.checkpoint_every=4"])
    site = _sites(store)[0]
    logs = tmp_path / "logs"
    logs.mkdir()

    def submit(run: Path) -> str:
        return subprocess.run(["sbatch", "--parsable", "--array=0", "-o", str(logs / f"{run.name}-%A_%a.out"),
                               str(REPO / "slurm" / "loso_array.sh")], capture_output=True, text=True, check=True,
                              env=_env(DD_STORE=str(store), DD_RUN_DIR=str(run), DD_CONFIG=str(cfg)),
                              cwd=tmp_path).stdout.strip()

    ref_job = submit(tmp_path / "ref")  # runs first (the node has room for one 2-rank fold at a time)
    jid = submit(tmp_path / "run")
    task = f"{jid}_0"
    fold = tmp_path / "run" / "folds" / site
    deadline = time.monotonic() + 240
    while checkpoint.latest_tag(fold / "checkpoints") is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(_rank_pid(task, 1), signal.SIGKILL)
    _wait_jobs([task], 60)
    failed_after = time.monotonic() - t0
    info = slurmctl.job_info(task)
    log = next(logs.glob("run-*.out")).read_text()
    assert info["JobState"] == "FAILED", (info, log[-3000:])
    assert failed_after < 30, f"the job took {failed_after:.1f} s to fail after its rank 1 was killed"
    assert "task 1: Killed" in log, log[-3000:]
    assert not (fold / "DONE").exists(), "the fold finished before its rank was killed"
    last = checkpoint.latest_tag(fold / "checkpoints")
    assert checkpoint.damage(fold / "checkpoints" / last) is None
    print(f"SIGKILL to rank 1: job {task} FAILED {failed_after:.2f} s later; last checkpoint {last}")

    subprocess.run(["scontrol", "requeue", task], check=True)
    _start_requeued(task, 60)
    _wait_jobs([task, ref_job], 240)
    info = slurmctl.job_info(task)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    assert slurmctl.job_state(f"{ref_job}_0") == "COMPLETED"
    records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("kind") == "info"]
    assert [r["step"] for r in starts] == [0, int(last.removeprefix("step"))], starts
    assert [r["step"] for r in records if r.get("kind") == "train"] == list(range(1, 33))
    import torch

    ref = torch.load(tmp_path / "ref" / "folds" / site / "model_final.pt", weights_only=False)
    new = torch.load(fold / "model_final.pt", weights_only=False)
    for part in ("state_dict", "discriminator"):  # no discriminator without loss.gamma_tc: both None
        ref_part, new_part = ref[part] or {}, new[part] or {}
        assert ref_part.keys() == new_part.keys()
        assert all(torch.equal(ref_part[k], new_part[k]) for k in ref_part), part
