"""The training loop of one fold on one rank: set up, resume, step, validate, checkpoint, finish.

SIGTERM / SIGUSR1 (SLURM preemption, requeue, the launcher's time-limit warning) make every rank checkpoint at
the next step boundary and stop with :class:`FoldInterrupted` (exit status 128 + signal), so a requeued job
resumes bitwise from that checkpoint (model, optimizer, LR schedule, discriminator, sampler position, RNGs).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from dist_decode.config import RunConfig
from dist_decode.data import BalancedBatchSampler
from dist_decode.fsutil import atomic_path, atomic_write_json, disk_full_errors
from dist_decode.model import build_model, loss_kind
from dist_decode.model.readout import fit_readouts
from dist_decode.train import checkpoint, distributed
from dist_decode.train.engine import build_engine, resolve_precision
from dist_decode.train.export import extract_features, final_state_dict, save_model
from dist_decode.train.inputs import FoldInputs
from dist_decode.train.plan import FoldPlan, plan_fold
from dist_decode.train.step import Stepper
from dist_decode.train.validate import validate

log = logging.getLogger("dist_decode.train")


class FoldInterrupted(RuntimeError):
    """Training stopped by SIGTERM/SIGUSR1 after writing a checkpoint; ``exit_code`` = 128 + signum."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.exit_code = signum, step, 128 + int(signum)
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint written, re-run to resume")


def train_fold(store: str | os.PathLike, fold: int, run_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    """Train (or resume, or skip) fold ``fold`` of ``store`` into ``run_dir/folds/<site>``.

    Works in any process that torchrun, srun, the deepspeed launcher or submitit started (their environment is
    read by :func:`dist_decode.train.distributed.setup_env`) and in a plain process.

    Raises
    ------
    FileNotFoundError, ValueError
        Bad store, fold, run directory or config (before any process group is created).
    FoldInterrupted
        After checkpointing on SIGTERM/SIGUSR1.
    """
    loss_kind(cfg)  # validates loss.kind against model.name early
    plan = plan_fold(store, fold, run_dir, cfg)
    done = plan.fold_dir / "DONE"
    if done.is_file():
        log.info("fold %d (%s): already done (%s)", plan.fold, plan.site, done)
        return plan.fold_dir
    return FoldTrainer(plan, Path(run_dir), cfg).run()


class FoldTrainer:
    """One fold's training on one rank."""

    def __init__(self, plan: FoldPlan, run_dir: Path, cfg: RunConfig) -> None:
        self.plan, self.run_dir, self.cfg = plan, run_dir, cfg
        self.env = distributed.setup_env()
        self.threads = distributed.set_threads(self.env)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.t_start = time.time()

    def run(self) -> Path:
        try:
            return self._run()
        finally:
            distributed.cleanup_shm(self.rank)

    # .. set up ..
    def _setup(self) -> None:
        cfg, plan = self.cfg, self.plan
        distributed.init_process_group()
        acc = get_accelerator()
        self.on_gpu = acc.device_name() not in ("cpu",)
        if self.on_gpu:
            acc.set_device(self.env.local_rank)
            self.device = torch.device(acc.device_name(self.env.local_rank))
            torch.backends.cudnn.benchmark = True  # fixed volume shapes: let cuDNN pick the fastest 3D kernels
        else:
            self.device = torch.device("cpu")
        self.precision = resolve_precision(cfg, self.on_gpu)
        self.inputs = FoldInputs(plan, cfg, self.run_dir, self.device, self.on_gpu, progress=self.rank == 0)
        noise_var = (self.inputs.noise_var(cfg.loss.noise_scale)
                     if cfg.loss.noise == "eigen" and loss_kind(cfg) == "decode_sz" else None)
        self.parts = build_engine(cfg, self.inputs.grid, self.inputs.input_scale, self.inputs.mask,
                                  self.inputs.voxel_mm, self.world, self.precision, self.device)
        self.stepper = Stepper(cfg, self.parts, self.inputs.mask_index, noise_var, self.rank, self.world,
                               self.device)
        if self.rank == 0:
            plan.fold_dir.mkdir(parents=True, exist_ok=True)
            if not (plan.fold_dir / "config.json").is_file():
                cfg.to_json(plan.fold_dir / "config.json")
            atomic_write_json(plan.fold_dir / "deepspeed.json", self.parts.ds_config)
        log.info(
            "fold %d (%s): model %s on grid %s, %s parameters%s; %d train / %d val / %d test subjects; "
            "world size %d (%s), %s, ZeRO %d, %d threads/rank, inputs %s%s",
            plan.fold, plan.site, cfg.model.name, "x".join(map(str, self.inputs.grid)),
            f"{self.parts.n_parameters:,}", " (incl. TC discriminator)" if self.parts.disc else "", len(plan.train),
            len(plan.val), len(plan.test), self.world, self.env.launcher, self.precision, cfg.train.zero_stage,
            self.threads, self.inputs.description,
            f", noise variance {noise_var:.4g}" if noise_var is not None else "",
        )

    def _client_state(self, wall: float) -> dict[str, Any]:
        state: dict[str, Any] = {"wall_s": wall, "n_parameters": self.parts.n_parameters}
        if self.parts.disc is not None:
            state["disc"] = self.parts.disc.state_dict()
            state["disc_opt"] = self.parts.disc_opt.state_dict()
        return state

    def _resume(self) -> tuple[int, float]:
        """Restore the latest checkpoint (if any): the step and wall time it was taken at."""
        client = checkpoint.load(self.parts.engine, self.plan.fold_dir / "checkpoints", self.rank)
        if client is None:
            return 0, 0.0
        if self.parts.disc is not None:
            self.parts.disc.load_state_dict(client["disc"])
            self.parts.disc_opt.load_state_dict(client["disc_opt"])
        step = int(client["step"])
        log.info("fold %d (%s): resumed from %s at step %d", self.plan.fold, self.plan.site,
                 self.plan.fold_dir / "checkpoints" / checkpoint.tag_of(step), step)
        return step, float(client.get("wall_s", 0.0))

    # .. the loop ..
    def _run(self) -> Path:
        self._setup()
        cfg, plan, t = self.cfg, self.plan, self.cfg.train
        ckpt_dir = plan.fold_dir / "checkpoints"
        start, wall_before = self._resume()
        metrics = Metrics(plan.fold_dir / "metrics.jsonl", enabled=self.rank == 0)
        metrics.trim(start)
        metrics.write({"kind": "info", "step": start, "n_parameters": self.parts.n_parameters,
                       "model": cfg.model.name, "grid": list(self.inputs.grid), "world_size": self.world,
                       "precision": self.precision, "zero_stage": t.zero_stage, "resumed": start > 0})
        is_patient = self.inputs.is_patient[plan.train]
        sampler = BalancedBatchSampler(is_patient, t.batch_size, cfg.seed, self.rank, self.world,
                                       start_step=start, steps=max(0, t.steps - start))
        val_every = t.val_every or t.checkpoint_every
        step, last_ckpt = start, start
        t_run = self.t_start  # wall time of this segment includes setup and loading
        with distributed.StopFlag() as stop:
            batches = self.inputs.training_batches(sampler)
            bar = tqdm(total=t.steps, initial=start, desc=f"fold {plan.fold} {plan.site}", unit="step",
                       disable=self.rank != 0, mininterval=2, dynamic_ncols=True)
            while step < t.steps:
                t0 = time.perf_counter()
                x, patient = next(batches)
                x = x.to(self.parts.dtype)
                rec, stop_now = self.stepper.step(x, patient, step, stop.raised, time.perf_counter() - t0)
                step += 1
                dt = time.perf_counter() - t0
                rec = {"kind": "train", "step": step, **rec, "lr": self.parts.scheduler.get_last_lr()[-1],
                       "step_s": dt, "volumes_per_s": t.batch_size * self.world / dt, **self._memory()}
                metrics.write(rec)
                if self.rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['total']:.4g}", refresh=False)
                    if step % t.log_every == 0 or step == t.steps:
                        log.info("fold %d step %d/%d loss %.5g recon %.5g tc %.3g lr %.3g %.2f vol/s data-wait %.0f%%",
                                 plan.fold, step, t.steps, rec["total"], rec["recon"], rec.get("tc", 0.0), rec["lr"],
                                 rec["volumes_per_s"], 100 * rec["data_wait_s"] / max(dt, 1e-9))
                if step % val_every == 0 and step < t.steps:
                    self._validate(metrics, step)
                if stop_now or step % t.checkpoint_every == 0 or step == t.steps:
                    checkpoint.save(self.parts.engine, ckpt_dir, step,
                                    self._client_state(wall_before + time.time() - t_run), self.rank,
                                    t.keep_checkpoints)
                    last_ckpt = step
                if stop_now:
                    bar.close()
                    signum = stop.signum or 15  # ranks not signalled themselves report SIGTERM
                    log.warning("fold %d (%s): stopped after step %d (checkpoint %s); exit %d to be requeued",
                                plan.fold, plan.site, step, checkpoint.tag_of(last_ckpt), 128 + signum)
                    raise FoldInterrupted(signum, step)
            bar.close()
        if start < t.steps or not (plan.fold_dir / "model_final.pt").is_file():
            self._validate(metrics, step)
        self._finish(wall_before + time.time() - t_run)
        return plan.fold_dir

    def _validate(self, metrics: "Metrics", step: int) -> None:
        rec = validate(self.stepper, self.inputs, self.plan.val, step, self.cfg.train.batch_size, self.parts.dtype)
        if rec is not None and self.rank == 0:
            metrics.write(rec)
            log.info("fold %d step %d validation loss %.5g (n=%d)", self.plan.fold, step,
                     rec.get("total", float("nan")), rec["n"])

    def _memory(self) -> dict[str, float]:
        """Peak memory of this rank so far: resident set (MiB) and, on GPU, allocated device memory."""
        mem = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if self.on_gpu and torch.cuda.is_available():
            mem["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return mem

    def _finish(self, wall: float) -> None:
        """model_final.pt, features.h5 and DONE (rank 0), in that order."""
        plan = self.plan
        dist.barrier()
        if self.rank == 0:
            # every output is atomic: a full disk leaves no half-written file and no DONE, and a re-run redoes this
            with disk_full_errors(plan.fold_dir, "the final outputs (model_final.pt, features.h5, DONE) in"):
                self._write_outputs(wall)
        dist.barrier()

    def _write_outputs(self, wall: float) -> None:
        """Rank 0's part of :meth:`_finish`."""
        plan, cfg, inputs = self.plan, self.cfg, self.inputs
        state = final_state_dict(self.parts.engine, plan.fold_dir, cfg.train.steps, self.precision,
                                 cfg.train.zero_stage)
        noise_var = self.stepper.noise_var
        # features with a fresh fp32 copy: exactly what load_fold_model gives the analysis stages
        model = build_model(cfg, inputs.grid, mask=inputs.mask.cpu(), voxel_mm=inputs.voxel_mm)
        model.load_state_dict(state)
        model = model.float().eval().to(self.device)
        read_s = getattr(model, "specific_readout", "encoder") == "decoder"
        read_c = getattr(model, "common_readout", "encoder") == "decoder"
        if read_s or read_c:
            # one pass over the training subjects fits both read-outs; they are buffers, saved with the weights
            s_read, c_read = fit_readouts(model, inputs.batches(np.sort(plan.train), cfg.train.batch_size), noise_var,
                                          what=f"fold {plan.fold}'s training subjects", salient=read_s, common=read_c)
            if s_read is not None:
                model.set_readout(s_read)
                log.info("fold %d (%s): S read from the salient decoder (%d training controls span %d directions, "
                         "prior from %d training patients)", plan.fold, plan.site, s_read.n_controls,
                         s_read.span_rank, s_read.n_patients)
            if c_read is not None:
                model.set_common_readout(c_read)
                rank = len(c_read.weight)
                ratios = ", ".join(f"{float(v) / noise_var:.3g}" for v in c_read.variances[:rank + 1])
                if float(c_read.variances[0]) <= noise_var:
                    log.warning("fold %d (%s): no axis of the common branch decodes more than the noise level; "
                                "C's features keep its strongest axis only", plan.fold, plan.site)
                log.info("fold %d (%s): C read from the common decoder%s, %d axes (twin variance / noise: %s)",
                         plan.fold, plan.site, " in the patients' noise" if model.common_readout_salient_noise
                         else "", rank, ratios)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_model(plan.fold_dir / "model_final.pt", {
            "config": cfg.to_dict(), "state_dict": state, "grid": list(inputs.grid), "voxel_mm": inputs.voxel_mm,
            "model": cfg.model.name, "n_parameters": self.parts.n_parameters, "steps": cfg.train.steps,
            "noise_var": noise_var, "normalised": inputs.transform is not None,
            "discriminator": self.parts.disc.state_dict() if self.parts.disc is not None else None})
        rows = np.concatenate([np.sort(plan.train), np.sort(plan.val), np.sort(plan.test)]).astype(np.int64)
        split = np.array(["train"] * len(plan.train) + ["val"] * len(plan.val) + ["test"] * len(plan.test))
        meta = {"index": rows, "split": split, **self._subject_meta(rows)}
        bs = cfg.train.batch_size
        batches = ((x, p, torch.from_numpy(rows[k * bs:(k + 1) * bs]))
                   for k, (x, p) in enumerate(inputs.batches(rows, bs)))
        extract_features(model, batches, meta, inputs.mask_index, cfg.train.feature_samples, cfg.seed,
                         plan.fold_dir / "features.h5",
                         {"fold": plan.fold, "site": plan.site, "model": cfg.model.name,
                          "n_parameters": self.parts.n_parameters, "grid": list(inputs.grid),
                          "seed": cfg.seed, "steps": cfg.train.steps,
                          "noise_var": noise_var if noise_var is not None else float("nan")},
                         self.device)
        atomic_write_json(plan.fold_dir / "DONE", {
            "steps": cfg.train.steps, "wall_s": round(wall, 3), "n_parameters": self.parts.n_parameters,
            "noise_var": noise_var, "model": cfg.model.name, "world_size": self.world, "fold": plan.fold,
            "site": plan.site, "precision": self.precision, "zero_stage": cfg.train.zero_stage,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log.info("fold %d (%s): done in %.1f s (%s parameters) -> %s", plan.fold, plan.site, wall,
                 f"{self.parts.n_parameters:,}", plan.fold_dir)

    def _subject_meta(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        st = self.inputs.store
        pid = np.asarray(st.participant_ids)[rows]
        site = np.asarray(st.site_of)[rows]
        col = st.manifest.get("labels", {}).get("diagnosis_column", "diagnosis")
        if col in st.phenotypes:
            diag = np.asarray(st.phenotypes[col]).astype(str)[rows]
        else:
            diag = np.where(np.asarray(st.is_patient, dtype=bool)[rows], "patient", "control")
        return {"participant_id": pid, "site": site, "diagnosis": diag}


class Metrics:
    """``metrics.jsonl``: one JSON record per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, rec: dict[str, Any]) -> None:
        if self.enabled:  # a line cut by a full disk is dropped by trim() on resume
            with disk_full_errors(self.path, "the training metrics"), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def trim(self, step: int) -> None:
        """Drop records past the checkpoint we resume from (they will be recomputed identically)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the job was killed
                continue
            if rec.get("step", 0) <= step and not (rec.get("kind") == "info" and rec.get("step", 0) == step):
                keep.append(line)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))
