"""One rank's training loop of a fold: DeepSpeed engine, TC discriminator, checkpoints, final outputs.

Used through :func:`dist_decode.train.train_fold`; see that module and docs/training.md.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_decode import normalise
from dist_decode.config import RunConfig
from dist_decode.data import grid_voxel_mm as data_voxel_mm
from dist_decode.fold import FoldPlan, write_run_files
from dist_decode.fsutil import atomic_path, atomic_write_json
from dist_decode.model.loss import eigen_noise_variance, mask_index
from dist_decode.normalise import NormaliseSettings

log = logging.getLogger("dist_decode.train")


class FoldInterrupted(RuntimeError):
    """Training stopped by SIGTERM/SIGUSR1 after writing a checkpoint; ``exit_code`` = 128 + signum."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.exit_code = signum, step, 128 + int(signum)
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint written, re-run to resume")



# -- configuration -----------------------------------------------------------------------------------

def resolve_precision(cfg: RunConfig, on_gpu: bool) -> str:
    """``fp32`` or ``bf16`` from ``train.precision`` (``auto``: bf16 on GPU, fp32 on CPU)."""
    p = cfg.train.precision
    if p not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision {p!r}: expected 'auto', 'fp32' or 'bf16'")
    if p == "auto":
        return "bf16" if on_gpu else "fp32"
    return p


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON of a fold, derived from the typed config (written to ``deepspeed.json``).

    The optimiser is a client ``torch.optim.AdamW`` passed to ``deepspeed.initialize`` (a
    config-defined optimiser JIT-compiles FusedAdam for minutes on CPU), so it is not listed here.
    """
    t = cfg.train
    if t.zero_stage not in (0, 1, 2):
        raise ValueError(f"train.zero_stage {t.zero_stage}: expected 0, 1 or 2")
    if t.batch_size < 2 or t.batch_size % 2:
        raise ValueError(f"train.batch_size {t.batch_size}: expected an even number >= 2 (half patients, half controls)")
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "gradient_clipping": t.gradient_clipping,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: RunConfig):
    """Multiplier of ``train.lr`` at each step: linear warm-up, then constant or cosine to 0."""
    t = cfg.train
    if t.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"train.lr_schedule {t.lr_schedule!r}: expected 'constant' or 'cosine'")

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        return 1.0

    return f


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """Seed of the reparameterisation noise of (step, rank): a resumed run draws the same noise."""
    s = np.random.SeedSequence([int(seed), int(stream), int(step), int(rank)]).generate_state(1, dtype=np.uint64)[0]
    return int(s) & 0x7FFF_FFFF_FFFF_FFFF


class FoldTrainer:
    """State of one fold's training on one rank."""

    def __init__(self, plan: FoldPlan, run_dir: Path, cfg: RunConfig) -> None:
        from dist_decode import distributed

        self.plan, self.run_dir, self.cfg = plan, run_dir, cfg
        self.env = distributed.setup_env()
        self.threads = distributed.set_threads(self.env)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.t_start = time.time()

    # .. setup ..
    def _setup(self) -> None:
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator

        from dist_decode import distributed
        from dist_decode.data import Store
        from dist_decode.model import build_discriminator, build_model, count_parameters, loss_kind, model_grid

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
        self.ds_config = deepspeed_config(cfg, self.world, self.precision)
        self.kind = loss_kind(cfg)

        self.store = Store.open(plan.store_path)
        self.grid = model_grid(cfg, self.store.grid_shape)
        self.resample = None if tuple(self.grid) == tuple(self.store.grid_shape) else tuple(self.grid)
        self.voxel_mm = data_voxel_mm(self.store, self.grid)
        self.mask = self._mask()
        self.mask_index = mask_index(self.mask)
        settings = NormaliseSettings.from_config(cfg.data)
        self.transform = None
        if settings.active:
            if cfg.model.name == "anchor2022":
                raise ValueError("model anchor2022 reads raw volumes scaled to [0, 1] (its sigmoid output): set "
                                 "data.proportional_scaling='none', data.smooth_fwhm_mm=0, data.site_gain=false "
                                 "and data.site_center=false")
            self.normaliser = normalise.ensure(self.run_dir, self.store, settings, progress=self.rank == 0)
            self.transform = self.normaliser.transform(self.resample).to(self.device)
        self.cache = self._build_cache()
        scale = 1.0 if self.transform is not None else (cfg.model.input_scale or self._estimate_scale())
        self.noise_var = self._noise_var() if cfg.loss.noise == "eigen" and self.kind == "decode_sz" else None

        if self.rank == 0:
            plan.fold_dir.mkdir(parents=True, exist_ok=True)
            write_run_files(plan, self.run_dir, cfg)
            if not (plan.fold_dir / "config.json").is_file():
                cfg.to_json(plan.fold_dir / "config.json")
            atomic_write_json(plan.fold_dir / "deepspeed.json", self.ds_config)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg, self.grid, scale, self.mask.cpu(), self.voxel_mm)
        self.disc = build_discriminator(cfg)
        self.n_parameters = count_parameters(model) + (count_parameters(self.disc) if self.disc else 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if self.disc is not None:
            self.disc.to(self.device)
            # FactorVAE's discriminator optimiser settings (Kim & Mnih 2018)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.loss.disc_lr, betas=(0.5, 0.9))
        log.info(
            "fold %d (%s): model %s on grid %s, %s parameters%s; %d train / %d val / %d test subjects; "
            "world size %d (%s), %s, ZeRO %d, %d threads/rank, inputs %s%s",
            plan.fold, plan.site, cfg.model.name, "x".join(map(str, self.grid)), f"{self.n_parameters:,}",
            " (incl. TC discriminator)" if self.disc else "", len(plan.train), len(plan.val), len(plan.test),
            self.world, self.env.launcher, self.precision, cfg.train.zero_stage, self.threads,
            "normalised" + (" (cached in memory)" if self.cache is not None else "") if self.transform is not None
            else f"raw (input_scale {scale:.4g})",
            f", noise variance {self.noise_var:.4g}" if self.noise_var is not None else "",
        )

    def _mask(self):
        import torch

        mask = np.asarray(self.store.mask, dtype=bool)
        if self.resample is not None:
            from dist_decode.data import resample_volume

            mask = np.asarray(resample_volume(mask.astype(np.float32), self.resample)) > 0.5
        return torch.from_numpy(mask).to(self.device)

    def _estimate_scale(self) -> float:
        """Store units per network unit from up to 16 evenly spaced training volumes (same on every rank).

        DECODE-SZ: the 99.9th percentile of brain voxels (mwp1 density, so the network sees ~[0, 1]).
        Anchor: the maximum (its sigmoid output cannot exceed 1).
        """
        from dist_decode.data import VolumeDataset

        idx = self.plan.train[np.linspace(0, len(self.plan.train) - 1, min(16, len(self.plan.train))).astype(int)]
        ds = VolumeDataset(self.plan.store_path, idx, grid=self.resample)
        m = self.mask.cpu().numpy()
        vals = np.concatenate([np.asarray(ds[j]["x"])[0][m] for j in range(len(ds))])
        scale = float(vals.max() if self.cfg.model.name == "anchor2022" else np.percentile(vals, 99.9))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"store {self.plan.store_path}: training volumes of fold {self.plan.fold} are empty "
                             f"inside the mask (scale {scale}); set model.input_scale")
        return scale

    def _build_cache(self):
        """The fold's normalised volumes in memory (train, val, test rows), or None (``data.cache``)."""
        import torch

        mode = self.cfg.data.cache
        if mode not in ("auto", "memory", "none"):
            raise ValueError(f"data.cache {mode!r}: expected 'auto', 'memory' or 'none'")
        if self.transform is None or mode == "none":
            return None
        rows = np.concatenate([self.plan.train, self.plan.val, self.plan.test]).astype(np.int64)
        nbytes = len(rows) * int(np.prod(self.grid)) * 4
        if mode == "auto" and nbytes > 2 * 2 ** 30:
            return None
        out = torch.empty((len(rows), 1) + tuple(self.grid), dtype=torch.float32, device=self.device)
        loader = self._loader(rows, batch_size=16)
        k = 0
        with torch.no_grad():
            for batch in loader:
                x = self.inputs(batch)
                out[k:k + x.shape[0]] = x
                k += x.shape[0]
        return {"rows": rows, "x": out, "position": {int(r): j for j, r in enumerate(rows)}}

    def inputs(self, batch) -> "torch.Tensor":
        """Model input of a loader batch: normalised on the device (or raw, for unnormalised runs)."""
        import torch

        x = batch["x"].to(self.device, non_blocking=True)
        if self.transform is None:
            return x.float()
        idx = batch["index"].numpy()
        factor = torch.from_numpy(self.normaliser.factor[idx]).to(self.device)
        site = torch.from_numpy(self.normaliser.site_index[idx]).to(self.device)
        return self.transform(x, factor, site)

    def cached(self, rows: np.ndarray) -> "torch.Tensor":
        """Normalised volumes of store rows from the cache."""
        pos = [self.cache["position"][int(r)] for r in rows]
        return self.cache["x"][pos]

    def _noise_var(self) -> float:
        """``loss.noise_scale`` x :func:`~dist_decode.model.loss.eigen_noise_variance` of the training volumes
        (inside the mask; up to 256 evenly spaced training subjects, rescaled to the whole training set)."""
        import torch

        train = np.sort(self.plan.train)
        take = train[np.unique(np.linspace(0, len(train) - 1, min(256, len(train))).round().astype(int))]
        if self.cache is not None:
            x = self.cached(take)
        else:
            x = torch.cat([self.inputs(b) for b in self._loader(take, batch_size=16)])
        try:
            level = eigen_noise_variance(x[:, 0][:, self.mask], len(train))
        except ValueError as exc:
            raise ValueError(f"fold {self.plan.fold}: {exc}") from exc
        return float(self.cfg.loss.noise_scale) * level

    def _loader(self, indices: np.ndarray, batch_sampler=None, batch_size: int | None = None):
        import torch

        from dist_decode.data import VolumeDataset

        # on GPU, float16 stores travel as float16 (half the bytes) and are cast on the device; normalised runs
        # resample after normalising (on the device), raw runs in the dataset
        grid = None if self.transform is not None else self.resample
        ds = VolumeDataset(self.plan.store_path, indices, grid=grid, raw=self.on_gpu and grid is None)
        nw = self.cfg.data.num_workers
        kw: dict[str, Any] = dict(num_workers=nw, pin_memory=self.on_gpu)
        if nw:
            kw.update(persistent_workers=False, prefetch_factor=4)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, **kw)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, **kw)

    # .. one step ..
    def _loss(self, out):
        from dist_decode.model import anchor_loss, decode_sz_loss

        if self.kind == "anchor2022":
            return anchor_loss(out, self.cfg.loss)
        total, terms = decode_sz_loss(out, self.mask_index, self.cfg.loss, self.disc, self.noise_var)
        if "q_joint" in out:  # the anchor trained with the DECODE-SZ loss: its own discriminator is unused
            total = total + 0.0 * (out["q_joint"].sum() + out["q_shuffled"].sum())
        return total, terms

    def _disc_step(self, out) -> float:
        """One step of the TC discriminator's own optimiser; gradients averaged over ranks."""
        import torch
        import torch.distributed as dist

        from dist_decode.model import discriminator_loss

        self.disc_opt.zero_grad(set_to_none=False)
        pidx = out["patient_index"]
        value = 0.0
        if pidx.numel() >= 2:
            dl = discriminator_loss(self.disc, out["c"][pidx], out["s"])
            dl.backward()
            value = float(dl.detach())
        for p in self.disc.parameters():
            if p.grad is None:  # fewer than two patients on this rank: contribute zeros
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.disc.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        if self.world > 1:
            dist.all_reduce(flat)
            flat /= self.world
        off = 0
        for g in grads:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        self.disc_opt.step()
        return value

    def _client_state(self, wall: float) -> dict[str, Any]:
        state: dict[str, Any] = {"wall_s": wall, "n_parameters": self.n_parameters}
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    # .. main loop ..
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self._cleanup_shm()

    def _cleanup_shm(self) -> None:
        """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (the deepspeed launcher leaves
        ~66 MB per rank in /dev/shm otherwise); the mapping stays valid until the process exits."""
        addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{self.rank}"):
            f.unlink(missing_ok=True)

    def _run(self) -> Path:
        import torch
        import torch.distributed as dist
        from tqdm import tqdm

        from dist_decode import checkpoint
        from dist_decode.data import BalancedBatchSampler
        from dist_decode.distributed import StopFlag

        self._setup()
        cfg, plan, t = self.cfg, self.plan, self.cfg.train
        ckpt_dir = plan.fold_dir / "checkpoints"
        client = checkpoint.load(self.engine, ckpt_dir, self.rank)
        start, wall_before = 0, 0.0
        if client is not None:
            start, wall_before = int(client["step"]), float(client.get("wall_s", 0.0))
            if self.disc is not None:
                self.disc.load_state_dict(client["disc"])
                self.disc_opt.load_state_dict(client["disc_opt"])
            log.info("fold %d (%s): resumed from %s at step %d", plan.fold, plan.site,
                     ckpt_dir / checkpoint.tag_of(start), start)
        metrics_path = plan.fold_dir / "metrics.jsonl"
        if self.rank == 0:
            self._trim_metrics(metrics_path, start)
            self._write_metric(metrics_path, {
                "kind": "info", "step": start, "n_parameters": self.n_parameters, "model": cfg.model.name,
                "grid": list(self.grid), "world_size": self.world, "precision": self.precision,
                "zero_stage": t.zero_stage, "resumed": client is not None,
            })

        is_patient = np.asarray(self.store.is_patient, dtype=bool)[plan.train]
        sampler = BalancedBatchSampler(is_patient, t.batch_size, cfg.seed, self.rank, self.world,
                                       start_step=start, steps=max(0, t.steps - start))
        control_s = self.kind == "decode_sz" and cfg.loss.control_s_weight > 0
        sleep_s = float(os.environ.get("DIST_DECODE_STEP_SLEEP", "0") or 0)  # test hook: widens signal windows
        val_every = t.val_every or t.checkpoint_every
        step, last_ckpt = start, start
        t_run = self.t_start  # wall time of this segment includes setup and loading
        with StopFlag() as stop:
            it = None if self.cache is not None else iter(self._loader(plan.train, batch_sampler=sampler))
            bar = tqdm(total=t.steps, initial=start, desc=f"fold {plan.fold} {plan.site}", unit="step",
                       disable=self.rank != 0, mininterval=2, dynamic_ncols=True)
            while step < t.steps:
                t0 = time.perf_counter()
                if it is None:  # the same positions the loader would yield for this step
                    pos = np.asarray(sampler.batch(step), dtype=np.int64)
                    x = self.cached(plan.train[pos]).to(self.dtype)
                    patient = torch.from_numpy(is_patient[pos]).to(self.device)
                else:
                    batch = next(it)
                    x = self.inputs(batch).to(self.dtype)
                    patient = batch["patient"].to(self.device).bool()
                t_data = time.perf_counter() - t0
                gen = torch.Generator(device=self.device).manual_seed(step_seed(cfg.seed, step, self.rank))
                self.engine.train()
                out = self.engine(x, patient, generator=gen, control_s=control_s)
                loss, terms = self._loss(out)
                self.engine.backward(loss)
                self.engine.step()
                disc_loss = self._disc_step(out) if self.disc is not None else 0.0
                if self.on_gpu:
                    torch.cuda.synchronize()
                names = sorted(terms)
                vec = torch.cat([torch.stack([terms[k].float().reshape(()) for k in names]).to(self.device),
                                 torch.tensor([disc_loss, t_data, float(stop.raised)], device=self.device)])
                if self.world > 1:
                    dist.all_reduce(vec)  # sums: averages below; the stop flag is > 0 if any rank was signalled
                vec = vec.cpu().tolist()
                stop_now = vec[-1] > 0
                step += 1
                if sleep_s:
                    time.sleep(sleep_s)
                dt = time.perf_counter() - t0
                rec = {"kind": "train", "step": step, **{k: vec[i] / self.world for i, k in enumerate(names)},
                       "disc_loss": vec[-3] / self.world, "lr": self.scheduler.get_last_lr()[0],
                       "step_s": dt, "data_wait_s": vec[-2] / self.world,
                       "volumes_per_s": t.batch_size * self.world / dt, **self._memory()}
                if self.rank == 0:
                    self._write_metric(metrics_path, rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['total']:.4g}", refresh=False)
                    if step % max(1, t.log_every) == 0 or step == t.steps:
                        log.info("fold %d step %d/%d loss %.5g recon %.5g tc %.3g lr %.3g %.2f vol/s data-wait %.0f%%",
                                 plan.fold, step, t.steps, rec["total"], rec["recon"], rec.get("tc", 0.0), rec["lr"],
                                 rec["volumes_per_s"], 100 * rec["data_wait_s"] / max(dt, 1e-9))
                if step % val_every == 0 and step < t.steps:
                    self._validate(metrics_path, step)
                if stop_now or step % t.checkpoint_every == 0 or step == t.steps:
                    checkpoint.save(self.engine, ckpt_dir, step, self._client_state(wall_before + time.time() - t_run),
                                    self.rank, t.keep_checkpoints)
                    last_ckpt = step
                if stop_now:
                    bar.close()
                    signum = stop.signum or 15  # ranks not signalled themselves report SIGTERM
                    log.warning("fold %d (%s): stopped after step %d (checkpoint %s); exit %d to be requeued",
                                plan.fold, plan.site, step, checkpoint.tag_of(last_ckpt), 128 + signum)
                    raise FoldInterrupted(signum, step)
            bar.close()
        if start < t.steps or not (plan.fold_dir / "model_final.pt").is_file():
            self._validate(metrics_path, step)
        wall = wall_before + time.time() - t_run
        self._finish(wall)
        return plan.fold_dir

    def _memory(self) -> dict[str, float]:
        """Peak memory of this rank so far: resident set (MiB) and, on GPU, allocated device memory."""
        import resource

        import torch

        mem = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
        if self.on_gpu and torch.cuda.is_available():
            mem["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return mem

    def _validate(self, metrics_path: Path, step: int) -> None:
        """Loss terms on this rank's share of the validation subjects, averaged over all of them."""
        import torch
        import torch.distributed as dist

        if not len(self.plan.val):
            return
        mine = self.plan.val[self.rank::self.world]
        self.engine.eval()
        sums: dict[str, float] = {}
        n_local = 0
        with torch.no_grad():
            if len(mine):
                for b, (x, patient) in enumerate(self._batches(mine, self.cfg.train.batch_size)):
                    x = x.to(self.dtype)
                    gen = torch.Generator(device=self.device).manual_seed(
                        step_seed(self.cfg.seed, b, self.rank, stream=1))
                    out = self.engine(x, patient, generator=gen, control_s=self.kind == "decode_sz"
                                      and self.cfg.loss.control_s_weight > 0)
                    _, terms = self._loss(out)
                    nb = x.shape[0]
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * nb
                    n_local += nb
        names = sorted(self._term_names())  # identical on every rank, even one without val subjects
        vec = torch.tensor([sums.get(k, 0.0) for k in names] + [float(n_local)], dtype=torch.float64,
                           device=self.device)  # NCCL reduces device tensors only
        if self.world > 1:
            dist.all_reduce(vec)
        vec = vec.cpu()
        n = max(1.0, float(vec[-1]))
        if self.rank == 0:
            rec = {"kind": "val", "step": step, "n": int(vec[-1]), **{k: float(vec[i]) / n for i, k in enumerate(names)}}
            self._write_metric(metrics_path, rec)
            log.info("fold %d step %d validation loss %.5g (n=%d)", self.plan.fold, step, rec.get("total", float("nan")),
                     rec["n"])

    def _batches(self, rows: np.ndarray, batch_size: int):
        """``(model input, patient flags)`` of ``rows`` in order, from the cache or the store."""
        import torch

        if self.cache is not None:
            flags = np.asarray(self.store.is_patient, dtype=bool)
            for k in range(0, len(rows), batch_size):
                r = rows[k:k + batch_size]
                yield self.cached(r), torch.from_numpy(flags[r]).to(self.device)
            return
        for batch in self._loader(rows, batch_size=batch_size):
            yield self.inputs(batch), batch["patient"].to(self.device).bool()

    def _term_names(self) -> list[str]:
        if self.kind == "anchor2022":
            return ["disc", "kl", "recon", "tc", "total"]
        return ["control_s", "kl_c_controls", "kl_c_patients", "kl_s_patients", "match_c", "recon",
                "recon_controls", "recon_patients", "tc", "total"]

    def _finish(self, wall: float) -> None:
        """model_final.pt, features.h5 and DONE (rank 0), in that order."""
        import torch
        import torch.distributed as dist

        from dist_decode.features import extract_features
        from dist_decode.model import build_model

        plan, cfg = self.plan, self.cfg
        dist.barrier()
        if self.rank == 0:
            state = self._final_state_dict()
            blob = {"config": cfg.to_dict(), "state_dict": state, "grid": list(self.grid),
                    "voxel_mm": self.voxel_mm, "model": cfg.model.name, "n_parameters": self.n_parameters,
                    "steps": cfg.train.steps, "noise_var": self.noise_var, "normalised": self.transform is not None,
                    "discriminator": self.disc.state_dict() if self.disc is not None else None}
            with atomic_path(plan.fold_dir / "model_final.pt") as tmp:
                torch.save(blob, tmp)
            # features with a fresh fp32 copy: exactly what load_fold_model gives the analysis stages
            model = build_model(cfg, self.grid, mask=self.mask.cpu(), voxel_mm=self.voxel_mm)
            model.load_state_dict(state)
            model = model.float().eval().to(self.device)
            rows = np.concatenate([np.sort(plan.train), np.sort(plan.val), np.sort(plan.test)]).astype(np.int64)
            split = np.array(["train"] * len(plan.train) + ["val"] * len(plan.val) + ["test"] * len(plan.test))
            meta = {"index": rows, "split": split, **self._subject_meta(rows)}
            bs = max(1, cfg.train.batch_size)
            batches = ((x, p, torch.from_numpy(rows[k * bs:(k + 1) * bs]))
                       for k, (x, p) in enumerate(self._batches(rows, bs)))
            extract_features(model, batches, meta, self.mask, cfg.train.feature_samples, cfg.seed,
                             plan.fold_dir / "features.h5",
                             {"fold": plan.fold, "site": plan.site, "model": cfg.model.name,
                              "n_parameters": self.n_parameters, "grid": list(self.grid),
                              "seed": cfg.seed, "steps": cfg.train.steps,
                              "noise_var": self.noise_var if self.noise_var is not None else float("nan")},
                             self.device)
            done = {"steps": cfg.train.steps, "wall_s": round(wall, 3), "n_parameters": self.n_parameters,
                    "noise_var": self.noise_var,
                    "model": cfg.model.name, "world_size": self.world, "fold": plan.fold, "site": plan.site,
                    "precision": self.precision, "zero_stage": cfg.train.zero_stage,
                    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_json(plan.fold_dir / "DONE", done)
            log.info("fold %d (%s): done in %.1f s (%s parameters) -> %s", plan.fold, plan.site, wall,
                     f"{self.n_parameters:,}", plan.fold_dir)
        dist.barrier()

    def _final_state_dict(self) -> dict[str, Any]:
        """fp32 weights for ``model_final.pt``.

        With bf16 and ZeRO >= 1 the fp32 master weights are merged from the final checkpoint's
        optimizer partitions (DeepSpeed's ``zero_to_fp32``); otherwise (fp32, or bf16 with ZeRO 0)
        the engine's module weights, cast to fp32.
        """
        from dist_decode import checkpoint

        if self.precision == "bf16" and self.cfg.train.zero_stage >= 1:
            try:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                sd = get_fp32_state_dict_from_zero_checkpoint(
                    str(self.plan.fold_dir / "checkpoints"), tag=checkpoint.tag_of(self.cfg.train.steps))
                if set(sd) == set(self.engine.module.state_dict()):
                    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                            for k, v in sd.items()}
                log.warning("fp32 master weights incomplete in the final checkpoint; saving the bf16 weights")
            except Exception as exc:  # an unexpected checkpoint layout must not lose a finished fold
                log.warning("could not merge fp32 master weights (%s); saving the bf16 weights", exc)
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.engine.module.state_dict().items()}

    def _subject_meta(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        st = self.store
        pid = np.asarray(st.participant_ids)[rows]
        site = np.asarray(st.site_of)[rows]
        col = st.manifest.get("labels", {}).get("diagnosis_column", "diagnosis")
        if col in st.phenotypes:
            diag = np.asarray(st.phenotypes[col]).astype(str)[rows]
        else:
            diag = np.where(np.asarray(st.is_patient, dtype=bool)[rows], "patient", "control")
        return {"participant_id": pid, "site": site, "diagnosis": diag}

    @staticmethod
    def _trim_metrics(path: Path, step: int) -> None:
        """Drop records past the checkpoint we resume from (they will be recomputed identically)."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the job was killed
                continue
            if rec.get("step", 0) <= step and not (rec.get("kind") == "info" and rec.get("step", 0) == step):
                keep.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in keep))

    @staticmethod
    def _write_metric(path: Path, rec: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
