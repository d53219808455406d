"""Latent features of every subject of a fold -> ``FOLD/features.h5`` (the contract in docs/architecture.md).

Rows: the fold's training subjects, then validation, then the held-out site (``split`` = train / val /
test), each in store order. Posterior samples are drawn from a generator seeded by (run seed,
subject's store index), so they do not depend on batch composition, world size or device.
``recon_error`` is the masked mean squared error in store units of the reconstruction from the
posterior means: ``decode(c_mean, s_mean)`` for patients, ``decode(c_mean, 0)`` for controls.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from dist_decode.fsutil import atomic_path

log = logging.getLogger(__name__)


def subject_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of the posterior samples of subject ``index`` (store order)."""
    state = np.random.SeedSequence([int(seed), 0xFEA7, int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _strings(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    batches,
    meta: dict[str, np.ndarray],
    mask: torch.Tensor,
    samples: int,
    seed: int,
    out_path: Path,
    attrs: dict[str, Any],
    device: torch.device | str = "cpu",
) -> Path:
    """Encode every subject of ``loader`` and write ``out_path`` atomically.

    Parameters
    ----------
    model : DecodeSZ or AnchorCVAE2022
        fp32, eval mode, on ``device``.
    batches : iterable
        Yields ``(x, patient, index)`` batches (model input, bool flags, store indices) in the row order of
        ``meta``.
    meta : dict
        Row-aligned ``participant_id``, ``site``, ``diagnosis``, ``split`` and ``index`` arrays.
    mask : bool Tensor (X, Y, Z)
        Brain mask on the model grid.
    samples : int
        Posterior samples K per subject.
    seed : int
    out_path : Path
    attrs : dict
        HDF5 attributes (``fold``, ``site``, ``model``, ``n_parameters``, ...).
    """
    n = len(meta["participant_id"])
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("c_mean", "c_logvar", "s_mean", "s_logvar", "c_samples", "s_samples",
                                          "recon_error", "index")}
    m = mask.to(device).flatten()
    for x, patient, index in tqdm(batches, desc=f"features {attrs.get('site', '')}", unit="batch", mininterval=5,
                                  leave=False):
        x = x.to(device, torch.float32)
        patient = patient.to(device).bool()
        c_mu, c_lv = model.encode_common(x)
        s_mu, s_lv = model.encode_specific(x)
        s_dec = torch.where(patient[:, None], s_mu, torch.zeros_like(s_mu))
        x_hat = model.decode(c_mu, s_dec)
        err = ((x_hat - x).flatten(1)[:, m] ** 2).mean(dim=1)
        cs, ss = [], []
        for j, idx in enumerate(index.tolist()):
            g = subject_generator(seed, idx, device)
            eps_c = torch.randn((samples, c_mu.shape[1]), generator=g, device=device)
            eps_s = torch.randn((samples, s_mu.shape[1]), generator=g, device=device)
            cs.append(c_mu[j] + torch.exp(0.5 * c_lv[j]) * eps_c)
            ss.append(s_mu[j] + torch.exp(0.5 * s_lv[j]) * eps_s)
        for k, v in (("c_mean", c_mu), ("c_logvar", c_lv), ("s_mean", s_mu), ("s_logvar", s_lv),
                     ("c_samples", torch.stack(cs)), ("s_samples", torch.stack(ss)), ("recon_error", err),
                     ("index", index)):
            cols[k].append(v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy())
    data = {k: np.concatenate(v) for k, v in cols.items()}
    if len(data["index"]) != n or not np.array_equal(data["index"], np.asarray(meta["index"])):
        raise RuntimeError("feature rows are not aligned with the fold's subject list (loader must not shuffle)")
    str_dt = h5py.string_dtype()
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k in ("participant_id", "site", "diagnosis", "split"):
                f.create_dataset(k, data=_strings(meta[k]), dtype=str_dt)
            f.create_dataset("index", data=data["index"].astype(np.int64))
            for k in ("c_mean", "c_logvar", "s_mean", "s_logvar", "c_samples", "s_samples", "recon_error"):
                f.create_dataset(k, data=data[k].astype(np.float32))
            for k, v in attrs.items():
                f.attrs[k] = v
    log.info("wrote %s (%d subjects, K=%d)", out_path, n, samples)
    return out_path
