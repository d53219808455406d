"""Fold training end to end: real DeepSpeed on CPU (gloo), real ranks, real signals, the tiny store."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dist_decode.config import RunConfig, override
from dist_decode.contracts import features as features_contract
from dist_decode.train.distributed import StopFlag, first_host, free_port, setup_env
from dist_decode.normalise import model_inputs
from dist_decode.train import deepspeed_config
from dist_decode.train.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
FOLD = 1  # holds out the tiny store's second site
# tiny model and few steps: a 2-rank fold takes a few seconds plus imports (enough steps to signal one mid-run)
STEPS = 40
ARGS = ["--fold", str(FOLD), "--steps", str(STEPS), "--set", "train.batch_size=2", "--set", "model.channels=[8,16,16]",
        "--set", "model.hidden=32", "--set", "train.checkpoint_every=4", "--set", "train.log_every=4",
        "--set", "train.feature_samples=3", "--set", "loss.gamma_tc=10", "--precision", "fp32", "--seed", "7"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    env.update(extra)
    return env


def _srun_like(store: Path, run_dir: Path, port: int, log_dir: Path, **extra: str) -> list[subprocess.Popen]:
    """Start 2 ranks the way ``srun --ntasks 2`` does (SLURM variables only)."""
    procs = []
    for r in range(2):
        env = _env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
                   SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), **extra)
        log = open(log_dir / f"rank{r}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_decode.train", "--store", str(store),
                                       "--run-dir", str(run_dir), *ARGS], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def reference_run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank fold under torchrun; returns the run directory."""
    run_dir = tmp_path_factory.mktemp("ref_run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dist_decode.train", "--store", str(tiny_store), "--run-dir", str(run_dir), *ARGS]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir


def _site(store: Path) -> str:
    from dist_decode.data import Store

    return Store.open(store).sites[FOLD]


def test_two_rank_deepspeed_fold_writes_every_output(reference_run: Path, tiny_store: Path):
    from dist_decode.data import Store, loso_split
    from dist_decode.model import DecodeSZ, load_fold_model

    store = Store.open(tiny_store)
    fold_dir = reference_run / "folds" / store.sites[FOLD]
    for name in ("config.json", "deepspeed.json", "metrics.jsonl", "model_final.pt", "features.h5", "DONE"):
        assert (fold_dir / name).is_file(), name
    assert (reference_run / "config.json").is_file()
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["folds"][str(FOLD)] == store.sites[FOLD] and len(manifest["store_manifest_sha256"]) == 64
    assert manifest["versions"]["deepspeed"]

    cfg = RunConfig.from_json(fold_dir / "config.json")
    assert cfg.seed == 7 and cfg.train.steps == STEPS and cfg.model.channels == (8, 16, 16)
    ds = json.loads((fold_dir / "deepspeed.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is False

    done = json.loads((fold_dir / "DONE").read_text())
    assert done["steps"] == STEPS and done["world_size"] == 2 and done["model"] == "decode_sz"
    n_params = done["n_parameters"]

    recs = [json.loads(line) for line in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "info" and recs[0]["n_parameters"] == n_params
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for key in ("total", "recon", "kl_c_patients", "kl_s_patients", "kl_c_controls", "tc", "control_s", "disc_loss",
                "lr", "volumes_per_s", "data_wait_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert [r["step"] for r in recs if r["kind"] == "val"] == list(range(4, STEPS + 1, 4))  # each checkpoint

    split = loso_split(store, FOLD, cfg.data.val_fraction, cfg.seed)
    with h5py.File(fold_dir / "features.h5", "r") as f:
        n = len(split.train) + len(split.val) + len(split.test)
        assert n == store.n
        sp = f["split"].asstr()[...]
        assert (sp == "train").sum() == len(split.train) and (sp == "val").sum() == len(split.val)
        assert set(f["site"].asstr()[sp == "test"]) == {store.sites[FOLD]}
        assert store.sites[FOLD] not in set(f["site"].asstr()[sp != "test"])
        rows = f["index"][...]
        assert list(f["participant_id"].asstr()[...]) == list(store.participant_ids[rows])
        assert f["c_mean"].shape == (n, 16) and f["s_logvar"].shape == (n, 16)
        assert f["c_samples"].shape == (n, 3, 16) and f["s_samples"].shape == (n, 3, 16)
        assert np.all(np.isfinite(f["recon_error"][...])) and np.all(f["recon_error"][...] > 0)
        assert f.attrs["n_parameters"] == n_params and f.attrs["site"] == store.sites[FOLD]
        c_mean, s_mean, s_logvar = f["c_mean"][...], f["s_mean"][...], f["s_logvar"][...]
        c_read, c_read_samples = f["c_readout_mean"][...], f["c_readout_samples"][...]
        c_samples = f["c_samples"][...]

    # the analysis stages' loader gives back the same model (fp32, CPU, eval, no DeepSpeed)
    model, cfg2 = load_fold_model(fold_dir)
    assert isinstance(model, DecodeSZ) and not model.training and cfg2 == cfg
    assert model.grid == store.grid_shape
    x = model_inputs(reference_run, store, cfg, rows[:3])  # normalised with the run's normalisation.h5
    assert (reference_run / "normalisation.h5").is_file()
    with torch.no_grad():
        mu, _ = model.encode_common(x)
        twin = model.decode(mu, torch.zeros(3, cfg.model.latent_specific))
        s_mu, _ = model.encode_specific(x)
        s_enc, _ = model.encode_specific_encoder(x)
    assert np.allclose(mu.numpy(), c_mean[:3], atol=1e-5)
    assert twin.shape == (3, 1, *store.grid_shape)
    # S comes from the salient decoder's read-out, fitted when the fold finished and saved with the weights
    assert cfg.model.specific_readout == "decoder" and float(model.readout_fitted) == 1.0
    assert np.allclose(s_mu.numpy(), s_mean[:3], atol=1e-4 * max(1.0, float(np.abs(s_mean).max())))
    assert not np.allclose(s_mu.numpy(), s_enc.numpy(), atol=1e-3)
    assert np.all(s_logvar == s_logvar[0])  # one posterior covariance for every subject
    # C's features come from the common decoder's read-out: a linear map of the C encoder's means and samples,
    # fitted on the training subjects (unit-ish variance there on every kept axis); the twin still decodes c_mean
    assert cfg.model.common_readout == "decoder"
    k = int(model.common_readout_rank)
    assert 1 <= k <= cfg.model.latent_common and c_read.shape == (n, k) and c_read_samples.shape == (n, 3, k)
    with torch.no_grad():
        expect = model.common_features(torch.from_numpy(c_mean)).numpy()
        expect_samples = model.common_features(torch.from_numpy(c_samples)).numpy()
    assert np.allclose(c_read, expect, atol=1e-4) and np.allclose(c_read_samples, expect_samples, atol=1e-4)
    var = c_read[sp == "train"].var(0)
    assert np.all(var > 0) and np.all(var < 1.0 + 1e-3)
    feats = features_contract.read(fold_dir / "features.h5")
    assert np.array_equal(feats.space("C"), c_read.astype(np.float64))


@pytest.mark.slow
def test_resume_after_sigterm_reproduces_the_uninterrupted_run(reference_run: Path, tiny_store: Path,
                                                                tmp_path: Path):
    """SIGTERM to ONE rank mid-run: both ranks agree, checkpoint, exit 143; the restart ends bitwise equal."""
    run_dir = tmp_path / "run"
    fold_dir = run_dir / "folds" / _site(tiny_store)
    metrics = fold_dir / "metrics.jsonl"
    procs = _srun_like(tiny_store, run_dir, free_port(), tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.is_file() and '"step": 3,' in metrics.read_text():
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "run ended before the signal could be sent"
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 is signalled
    codes = _wait(procs)
    logs = "".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [143, 143], logs[-3000:]
    assert not (fold_dir / "DONE").exists()
    latest = (fold_dir / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step"))
    assert 3 <= stopped < STEPS

    procs = _srun_like(tiny_store, run_dir, free_port(), tmp_path)
    codes = _wait(procs)
    logs = (tmp_path / "rank0.log").read_text()
    assert codes == [0, 0], logs[-3000:]
    assert "resumed from" in logs and f"at step {stopped}" in logs

    ref = torch.load(reference_run / "folds" / _site(tiny_store) / "model_final.pt", weights_only=False)
    new = torch.load(fold_dir / "model_final.pt", weights_only=False)
    assert ref["state_dict"].keys() == new["state_dict"].keys()
    for k in ref["state_dict"]:  # bitwise: same data order, same noise, deterministic gloo reductions
        assert torch.equal(ref["state_dict"][k], new["state_dict"][k]), k
    for k in ref["discriminator"]:
        assert torch.equal(ref["discriminator"][k], new["discriminator"][k]), k
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # records past the checkpoint were not duplicated


def test_rerunning_a_finished_fold_does_nothing(reference_run: Path, tiny_store: Path, caplog):
    done = reference_run / "folds" / _site(tiny_store) / "DONE"
    before = done.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dist_decode.train"):
        code = main(["--store", str(tiny_store), "--run-dir", str(reference_run), *ARGS])
    assert code == 0
    assert "already done" in caplog.text
    assert done.stat().st_mtime_ns == before
    assert "RANK" not in os.environ  # returned before touching the process environment


@pytest.mark.parametrize("zero", [0, 2])
def test_single_plain_process_bf16(tiny_store: Path, tmp_path: Path, zero: int):
    """No launcher at all (world size 1, DeepSpeed's MPI discovery avoided), bf16, ZeRO 0 and 2."""
    cmd = [sys.executable, "-m", "dist_decode.train", "--store", str(tiny_store), "--run-dir", str(tmp_path),
           "--fold", "0", "--steps", "3", "--set", "train.batch_size=4", "--set", "model.channels=[8,16,16]",
           "--set", "model.hidden=32", "--set", "train.checkpoint_every=2", "--set", "train.feature_samples=2",
           "--precision", "bf16", "--zero-stage", str(zero)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    from dist_decode.data import Store

    fold_dir = tmp_path / "folds" / Store.open(tiny_store).sites[0]
    done = json.loads((fold_dir / "DONE").read_text())
    assert done["world_size"] == 1 and done["precision"] == "bf16" and done["zero_stage"] == zero
    assert json.loads((fold_dir / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    with h5py.File(fold_dir / "features.h5", "r") as f:
        assert np.all(np.isfinite(f["s_samples"][...]))
    assert "parameters" in res.stderr and "already done" not in res.stderr
    w = torch.load(fold_dir / "model_final.pt", weights_only=False)["state_dict"]["common.head.mu.weight"]
    assert w.dtype == torch.float32
    # ZeRO >= 1 keeps fp32 master weights and model_final.pt gets them; ZeRO 0 saves the bf16 weights
    assert torch.equal(w.to(torch.bfloat16).float(), w) == (zero == 0)


def test_clear_errors_for_bad_store_fold_and_site(tiny_store: Path, tiny_cohort: Path, tmp_path: Path, capsys):
    from dist_decode.data import Store

    assert main(["--store", str(tmp_path / "nope"), "--fold", "0", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no store at" in err and "nope" in err and "data_prep.pack" in err
    assert main(["--store", str(tiny_store), "--fold", "9", "--run-dir", str(tmp_path / "r")]) == 2
    assert "fold 9 out of range" in capsys.readouterr().err
    assert main(["--store", str(tiny_store), "--fold", "0", "--run-dir", str(tmp_path / "r"),
                 "--set", "train.colour=1"]) == 2
    assert "unknown config field" in capsys.readouterr().err
    # a fold started with another config is not silently resumed with this one
    site0 = Store.open(tiny_store).sites[0]
    (tmp_path / "r2" / "folds" / site0).mkdir(parents=True)
    override(RunConfig(), ["model.hidden=64"]).to_json(tmp_path / "r2" / "folds" / site0 / "config.json")
    assert main(["--store", str(tiny_store), "--fold", "0", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "model.hidden: 64 -> 256" in capsys.readouterr().err

    # a store whose last site has controls only
    from data_prep.pack import pack

    lines = (tiny_cohort / "participants.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    site_col, dx_col = head.index("site"), head.index("diagnosis")
    last = Store.open(tiny_store).sites[-1]
    out = [lines[0]]
    for ln in lines[1:]:
        cells = ln.split("\t")
        if cells[site_col] == last:
            cells[dx_col] = "HC"
        out.append("\t".join(cells))
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("\n".join(out) + "\n")
    store2 = tmp_path / "store_hc_only"
    pack(tiny_cohort, tsv, store2, progress=False, n_jobs=1)
    k = Store.open(store2).sites.index(last)
    assert main(["--store", str(store2), "--fold", str(k), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert last in err and "cannot be a LOSO test site" in err
    assert not (tmp_path / "r").exists()


def test_launcher_environments_are_resolved():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    d = setup_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == (3, 4, 1, 2, "slurm")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 123456 % 30000)
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1"
    # a batch script's own process (no srun step) is a single process, not rank 0 of 4
    d = setup_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})
    assert (d.world_size, d.launcher) == (1, "single")
    # torchrun / submitit exports win
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    d = setup_env(env)
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "env")
    env = {}
    d = setup_env(env)
    assert (d.world_size, env["MASTER_ADDR"]) == (1, "127.0.0.1") and int(env["MASTER_PORT"]) > 0
    assert first_host("cn001") == "cn001" and first_host("a[1-3,5],b2") == "a1"


def test_deepspeed_config_is_derived_from_the_typed_config():
    cfg = override(RunConfig(), ["train.zero_stage=2", "train.batch_size=6", "train.gradient_clipping=0.5"])
    ds = deepspeed_config(cfg, 4, "bf16")
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["train_batch_size"] == 24
    assert ds["gradient_clipping"] == 0.5 and "optimizer" not in ds  # client AdamW: no FusedAdam JIT
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(override(cfg, ["train.zero_stage=3"]), 1, "fp32")
    with pytest.raises(ValueError, match="batch_size"):
        deepspeed_config(override(cfg, ["train.batch_size=3"]), 1, "fp32")


def test_the_encoders_learn_at_their_own_rate_through_the_schedule():
    """train.encoder_lr_scale: every parameter in exactly one group; Adam's first step moves the encoders' weights
    by lr * scale and the rest by lr; the schedule keeps the ratio."""
    from dist_decode.config import profile_config
    from dist_decode.model import build_model
    from dist_decode.train.engine import lr_lambda, param_groups

    grid = (17, 19, 15)
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[2:-2, 3:-3, 2:-2] = True
    cfg = profile_config("cpu", ['model.encoder="dense"', "train.encoder_lr_scale=0.1", 'train.lr_schedule="cosine"',
                                 "train.steps=10"])
    torch.manual_seed(0)
    model = build_model(cfg, grid, mask=mask, voxel_mm=3.0)
    groups = param_groups(model, cfg.train.lr, cfg.train.encoder_lr_scale)
    ids = [id(q) for g in groups for q in g["params"]]
    assert sorted(ids) == sorted(id(q) for q in model.parameters())  # each parameter once
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    x = torch.randn(4, 1, *grid)
    out = model(x, torch.tensor([True, True, False, False]), torch.Generator().manual_seed(0))
    (out["x_hat"] - out["x"]).pow(2).sum().backward()
    opt.step()
    step = {n: (q.detach() - before[n]).abs().max().item() for n, q in model.named_parameters()}
    assert step["specific.head.mu.weight"] == pytest.approx(1e-4, rel=1e-3)
    assert step["common.head.mu.weight"] == pytest.approx(1e-4, rel=1e-3)
    assert step["salient_decoder.dense.weight"] == pytest.approx(1e-3, rel=1e-3)
    for _ in range(5):
        sched.step()
    enc_lr, rest_lr = sched.get_last_lr()
    assert rest_lr < cfg.train.lr and enc_lr == pytest.approx(0.1 * rest_lr)
    # the default is one group, as before the option existed (earlier runs' optimizer checkpoints still load)
    assert len(param_groups(model, 1e-3, 1.0)) == 1


def test_metrics_are_trimmed_to_the_resumed_checkpoint(tmp_path: Path):
    from dist_decode.train.loop import Metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "info", "step": 0}] + [{"kind": "train", "step": s} for s in range(1, 7)] + \
        [{"kind": "val", "step": 4}, {"kind": "info", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "st')  # killed mid-line
    Metrics(path, enabled=True).trim(4)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [("info", 0)] + [("train", s) for s in range(1, 5)] + [("val", 4)]


def test_stop_flag_records_preemption_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as stop:
        assert not stop.raised
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@... before the time limit
        time.sleep(0.05)
        assert stop.raised and stop.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first
        time.sleep(0.05)
        assert stop.signum == signal.SIGUSR1
    assert StopFlag.exit_code(signal.SIGUSR1) == 138 and StopFlag.exit_code(signal.SIGTERM) == 143
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_jit_build_lock_left_by_a_killed_process_is_cleared_but_a_live_builder_is_waited_for(tmp_path, monkeypatch):
    from dist_decode.train.distributed import _exclusive_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()  # torch's FileBaton file from a builder that was killed: nobody holds our fcntl lock
    with _exclusive_build("deepspeed_shm_comm"):
        assert not stale.exists()
    # a live builder (another process holding the fcntl lock) is waited for, its files left alone
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "open(sys.argv[2], 'w').close(); print('held', flush=True); time.sleep(1.5)"),
        str(stale.parent / "dist_decode.lock"), str(stale)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with _exclusive_build("deepspeed_shm_comm"):
        waited = time.monotonic() - t0
    holder.wait()
    assert waited > 0.5, "entered while another process held the build lock"


#: One plain process, 6 steps, checkpoints at 3 and 6 (both kept): the reference of the checkpoint fault tests.
SIX = ["--fold", "0", "--steps", "6", "--set", "train.batch_size=4", "--set", "model.channels=[8,16,16]",
       "--set", "model.hidden=32", "--set", "train.checkpoint_every=3", "--set", "train.feature_samples=2"]


def _six(store: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "dist_decode.train", "--store", str(store), "--run-dir", str(run_dir), *SIX]


@pytest.fixture(scope="module")
def six_step_run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted :data:`SIX` run (read-only: copy it before damaging it); returns the run directory."""
    run_dir = tmp_path_factory.mktemp("six_step_run")
    res = subprocess.run(_six(tiny_store, run_dir), env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def _final_weights(fold_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fold_dir / "model_final.pt", weights_only=False)["state_dict"]


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_resumes_to_the_same_model(
        six_step_run: Path, tiny_store: Path, tmp_path: Path):
    """A checkpoint cut short (full disk, copy cut short) fails its checksum; the fold resumes from the one before
    and, resuming bitwise, ends with exactly the weights of the undamaged run."""
    from dist_decode.data import Store
    from dist_decode.train import checkpoint

    run_dir = Path(shutil.copytree(six_step_run, tmp_path / "run"))
    fold_dir = run_dir / "folds" / Store.open(tiny_store).sites[0]
    ckpts = fold_dir / "checkpoints"
    assert checkpoint.latest_tag(ckpts) == "step000000006" and checkpoint.damage(ckpts / "step000000006") is None
    before = _final_weights(fold_dir)
    # cut the newest checkpoint's largest file short, and make the fold run again
    big = max((p for p in (ckpts / "step000000006").rglob("*") if p.is_file() and p.name != checkpoint.CHECKSUMS),
              key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    assert "bytes" in checkpoint.damage(ckpts / "step000000006")
    assert checkpoint.intact_tag(ckpts) == "step000000003"
    for name in ("DONE", "model_final.pt", "features.h5"):
        (fold_dir / name).unlink()
    # and a save cut short by a killed rank: newer than `latest`, never loaded, removed on resume
    (ckpts / "step000000009").mkdir()
    (ckpts / "step000000009" / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    res = subprocess.run(_six(tiny_store, run_dir), env=_env(), capture_output=True, text=True, timeout=240,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is damaged" in res.stderr and "resumed from" in res.stderr and "step000000003" in res.stderr
    assert f"removing the unfinished checkpoint {ckpts / 'step000000009'}" in res.stderr
    assert not (ckpts / "step000000009").exists()
    after = _final_weights(fold_dir)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint.damage(ckpts / checkpoint.latest_tag(ckpts)) is None


def test_a_full_disk_while_checkpointing_fails_clearly_and_the_previous_checkpoint_resumes(
        six_step_run: Path, tiny_store: Path, tmp_path: Path):
    """A real ENOSPC (a private tmpfs, tests/small_fs.py) while the step-6 checkpoint is written: exit 2 with an
    error naming the checkpoint and the full disk, the unfinished checkpoint removed, ``latest`` still step 3 and
    intact; with space again the fold resumes from step 3 and ends with bitwise the weights of the reference."""
    from dist_decode.data import Store
    from dist_decode.train import checkpoint
    from small_fs import run_on_small_fs

    site = Store.open(tiny_store).sites[0]
    ref_fold = six_step_run / "folds" / site
    # the run as a job killed after its step-3 checkpoint leaves it (metrics past step 3 are trimmed on resume)
    state = Path(shutil.copytree(six_step_run, tmp_path / "state"))
    fold = state / "folds" / site
    shutil.rmtree(fold / "checkpoints" / "step000000006")
    for name in ("DONE", "model_final.pt", "features.h5"):
        (fold / name).unlink()
    (fold / "checkpoints" / "latest").write_text("step000000003\n")
    size = sum(f.stat().st_size for f in (fold / "checkpoints" / "step000000003").rglob("*") if f.is_file())
    out = tmp_path / "out"
    out.mkdir()
    cmd = " ".join(_six(tiny_store, Path("$FS/run")))
    res = run_on_small_fs(tmp_path / "fs", f"""
        cp -r {state} $FS/run
        leave {size // 2}                 # room for half a checkpoint
        {cmd} 2> {out}/full.err; echo $? > {out}/full.rc
        cp -r $FS/run {out}/after_full
        unfill
        {cmd} 2> {out}/again.err; echo $? > {out}/again.rc
        cp -r $FS/run {out}/run
    """, env=_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert res.returncode == 0, res.stderr
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err[-3000:]
    assert (f"error: disk full: could not write the checkpoint {tmp_path / 'fs'}/run/folds/{site}/checkpoints/"
            "step000000006 (No space left on device") in err, err[-3000:]
    assert "Traceback" not in err
    ckpts = out / "after_full" / "folds" / site / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step")) == ["step000000003"]
    assert checkpoint.latest_tag(ckpts) == "step000000003" and checkpoint.damage(ckpts / "step000000003") is None
    assert not (out / "after_full" / "folds" / site / "DONE").exists()
    again = (out / "again.err").read_text()
    assert (out / "again.rc").read_text().strip() == "0", again[-3000:]
    assert "resumed from" in again and "at step 3" in again
    before, after = _final_weights(ref_fold), _final_weights(out / "run" / "folds" / site)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_file_size_limit_while_checkpointing_is_reported_like_a_full_disk(tmp_path: Path):
    """EFBIG (``RLIMIT_FSIZE``; EDQUOT, a quota, takes the same path) from DeepSpeed's own torch checkpoint engine
    becomes the same clear error as ENOSPC, with plenty of free space left (so not by the free-space fallback):
    the engine's saves go through Python files, which keep the errno that torch's C++ writer drops."""
    import resource

    code = f"""
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from dist_decode.fsutil import DiskFull, disk_full_errors
from dist_decode.train.checkpoint import _save_through_python_files

class Engine:
    checkpoint_engine = TorchCheckpointEngine()

_save_through_python_files(Engine)
try:
    with disk_full_errors({str(tmp_path / 'step1')!r}, "the checkpoint"):
        Engine.checkpoint_engine.save({{"w": torch.zeros(100_000)}}, {str(tmp_path / 'model.pt')!r})
except DiskFull as exc:
    print("errno", exc.errno, "|", exc)
"""
    res = subprocess.run([sys.executable, "-c", code], env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"errno 27 | disk full: could not write the checkpoint {tmp_path / 'step1'} (File too large;" in res.stdout, \
        res.stdout + res.stderr[-2000:]
