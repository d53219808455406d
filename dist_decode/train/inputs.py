"""A fold's model inputs: normalised store volumes, from an in-memory cache or through a DataLoader.

Normalised runs read raw store volumes and normalise each batch on the device with the run's statistics
(:mod:`dist_decode.normalise`), resampling to the model grid last; runs without normalisation (the 2022 anchor's
recipe) resample in the dataset and divide by ``input_scale`` inside the model. With ``data.cache`` the fold's
normalised volumes are computed once and kept in memory; both paths give the same batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dist_decode import normalise
from dist_decode.config import RunConfig
from dist_decode.data import BalancedBatchSampler, Store, VolumeDataset, grid_voxel_mm, resample_volume
from dist_decode.model import model_grid
from dist_decode.model.loss import eigen_noise_variance, mask_index
from dist_decode.normalise import NormaliseSettings
from dist_decode.train.plan import FoldPlan

#: Largest fold cache ``data.cache = "auto"`` keeps in memory.
CACHE_LIMIT_BYTES = 2 * 2 ** 30


class FoldInputs:
    """The inputs of one fold on one rank.

    Attributes
    ----------
    grid : tuple of int
        The model grid; ``voxel_mm`` its voxel size.
    mask : bool Tensor
        The brain mask on the model grid (on the device); ``mask_index`` its flat indices.
    input_scale : float
        Store units per network unit (1 for normalised inputs).
    """

    def __init__(self, plan: FoldPlan, cfg: RunConfig, run_dir: Path, device: torch.device, on_gpu: bool,
                 progress: bool) -> None:
        self.plan, self.cfg, self.device, self.on_gpu = plan, cfg, device, on_gpu
        self.store = Store.open(plan.store_path)
        self.grid = model_grid(cfg, self.store.grid_shape)
        self.resample = None if tuple(self.grid) == tuple(self.store.grid_shape) else tuple(self.grid)
        self.voxel_mm = grid_voxel_mm(self.store, self.grid)
        mask = np.asarray(self.store.mask, dtype=bool)
        if self.resample is not None:
            mask = np.asarray(resample_volume(mask.astype(np.float32), self.resample)) > 0.5
        self.mask = torch.from_numpy(mask).to(device)
        self.mask_index = mask_index(self.mask)
        self.is_patient = np.asarray(self.store.is_patient, dtype=bool)
        settings = NormaliseSettings.from_config(cfg.data)
        self.normaliser = None
        self.transform = None
        if settings.active:
            if cfg.model.name == "anchor2022":
                raise ValueError("model anchor2022 reads raw volumes scaled to [0, 1] (its sigmoid output): set "
                                 "data.proportional_scaling='none', data.smooth_fwhm_mm=0, data.site_gain=false "
                                 "and data.site_center=false")
            self.normaliser = normalise.ensure(run_dir, self.store, settings, progress=progress)
            self.transform = self.normaliser.transform(self.resample).to(device)
        self.cache = self._build_cache()
        self.input_scale = 1.0 if self.transform is not None else (cfg.model.input_scale or self._estimate_scale())

    @property
    def description(self) -> str:
        if self.transform is None:
            return f"raw (input_scale {self.input_scale:.4g})"
        return "normalised" + (" (cached in memory)" if self.cache is not None else "")

    # .. batches ..
    def loader(self, rows: np.ndarray, batch_sampler=None, batch_size: int | None = None):
        """A DataLoader of store ``rows`` (raw volumes; see :meth:`model_input`)."""
        # on GPU, float16 stores travel as float16 (half the bytes) and are cast on the device; normalised runs
        # resample after normalising (on the device), raw runs in the dataset
        grid = None if self.transform is not None else self.resample
        ds = VolumeDataset(self.plan.store_path, rows, grid=grid, raw=self.on_gpu and grid is None)
        nw = self.cfg.data.num_workers
        kw: dict[str, Any] = dict(num_workers=nw, pin_memory=self.on_gpu)
        if nw:
            kw.update(persistent_workers=False, prefetch_factor=4)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, **kw)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, **kw)

    def model_input(self, batch: dict) -> torch.Tensor:
        """Model input of a loader batch: normalised on the device (or raw, for unnormalised runs)."""
        x = batch["x"].to(self.device, non_blocking=True)
        if self.transform is None:
            return x.float()
        idx = batch["index"].numpy()
        factor = torch.from_numpy(self.normaliser.factor[idx]).to(self.device)
        site = torch.from_numpy(self.normaliser.site_index[idx]).to(self.device)
        return self.transform(x, factor, site)

    def cached(self, rows: np.ndarray) -> torch.Tensor:
        """Normalised volumes of store rows from the cache."""
        pos = [self.cache["position"][int(r)] for r in rows]
        return self.cache["x"][pos]

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(model input, patient flags)`` of ``rows`` in order, from the cache or the store."""
        if self.cache is not None:
            for k in range(0, len(rows), batch_size):
                r = rows[k:k + batch_size]
                yield self.cached(r), torch.from_numpy(self.is_patient[r]).to(self.device)
            return
        for batch in self.loader(rows, batch_size=batch_size):
            yield self.model_input(batch), batch["patient"].to(self.device).bool()

    def training_batches(self, sampler: BalancedBatchSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches of ``sampler``'s steps, in order (the same positions from the cache or a loader)."""
        train = self.plan.train
        if self.cache is None:
            for batch in self.loader(train, batch_sampler=sampler):
                yield self.model_input(batch), batch["patient"].to(self.device).bool()
            return
        patient = self.is_patient[train]
        for pos in sampler:
            pos = np.asarray(pos, dtype=np.int64)
            yield self.cached(train[pos]), torch.from_numpy(patient[pos]).to(self.device)

    # .. statistics ..
    def noise_var(self, noise_scale: float) -> float:
        """``noise_scale`` x :func:`~dist_decode.model.loss.eigen_noise_variance` of the training volumes
        (inside the mask; up to 256 evenly spaced training subjects, rescaled to the whole training set)."""
        train = np.sort(self.plan.train)
        take = train[np.unique(np.linspace(0, len(train) - 1, min(256, len(train))).round().astype(int))]
        if self.cache is not None:
            x = self.cached(take)
        else:
            x = torch.cat([self.model_input(b) for b in self.loader(take, batch_size=16)])
        try:
            level = eigen_noise_variance(x[:, 0][:, self.mask], len(train))
        except ValueError as exc:
            raise ValueError(f"fold {self.plan.fold}: {exc}") from exc
        return float(noise_scale) * level

    def _build_cache(self) -> dict | None:
        """The fold's normalised volumes in memory (train, val, test rows), or None (``data.cache``)."""
        mode = self.cfg.data.cache
        if self.transform is None or mode == "none":
            return None
        rows = np.concatenate([self.plan.train, self.plan.val, self.plan.test]).astype(np.int64)
        if mode == "auto" and len(rows) * int(np.prod(self.grid)) * 4 > CACHE_LIMIT_BYTES:
            return None
        out = torch.empty((len(rows), 1) + tuple(self.grid), dtype=torch.float32, device=self.device)
        k = 0
        with torch.no_grad():
            for batch in self.loader(rows, batch_size=16):
                x = self.model_input(batch)
                out[k:k + x.shape[0]] = x
                k += x.shape[0]
        return {"rows": rows, "x": out, "position": {int(r): j for j, r in enumerate(rows)}}

    def _estimate_scale(self) -> float:
        """Store units per network unit from up to 16 evenly spaced training volumes (same on every rank).

        DECODE-SZ: the 99.9th percentile of brain voxels (mwp1 density, so the network sees ~[0, 1]).
        Anchor: the maximum (its sigmoid output cannot exceed 1).
        """
        train = self.plan.train
        idx = train[np.linspace(0, len(train) - 1, min(16, len(train))).astype(int)]
        ds = VolumeDataset(self.plan.store_path, idx, grid=self.resample)
        m = self.mask.cpu().numpy()
        vals = np.concatenate([np.asarray(ds[j]["x"])[0][m] for j in range(len(ds))])
        scale = float(vals.max() if self.cfg.model.name == "anchor2022" else np.percentile(vals, 99.9))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"store {self.plan.store_path}: training volumes of fold {self.plan.fold} are empty "
                             f"inside the mask (scale {scale}); set model.input_scale")
        return scale
