"""Encode subjects with a trained fold model and write their latent features (``features.h5``).

Used by the trainer for a fold's own subjects (:mod:`dist_decode.train.export`) and by ``dist_decode.apply`` for a
new cohort. Posterior samples are drawn from a generator seeded by (run seed, subject's store index), so they do
not depend on batch composition, world size or device. ``recon_error`` is the masked mean squared error (model
units) of the reconstruction from the posterior means: ``decode(c_mean, s_mean)`` for patients,
``decode(c_mean, 0)`` for controls. A model with the decoder read-out of C (``common_readout="decoder"``) also
gets ``c_readout_mean`` / ``c_readout_samples``: the read-out of the same means and samples.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from dist_decode.contracts import features as features_contract

log = logging.getLogger(__name__)


def subject_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of the posterior samples of subject ``index`` (store order)."""
    state = np.random.SeedSequence([int(seed), 0xFEA7, int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterable, meta: dict[str, np.ndarray],
                     mask_index: torch.Tensor, samples: int, seed: int, out_path: Path, attrs: dict[str, Any],
                     device: torch.device | str = "cpu", progress: bool = True) -> Path:
    """Encode every subject and write ``out_path`` (:mod:`dist_decode.contracts.features`).

    Parameters
    ----------
    model : torch.nn.Module
        fp32, eval mode, on ``device``.
    batches : iterable
        ``(x, patient, index)`` batches (model input, bool flags, store indices) in the row order of ``meta``.
    meta : dict
        Row-aligned ``participant_id``, ``site``, ``diagnosis``, ``split`` and ``index`` arrays.
    mask_index : Tensor
        Flat indices of the brain mask on the model grid.
    samples : int
        Posterior samples K per subject.
    seed : int
        Run seed (posterior samples of subject ``index``: :func:`subject_generator`).
    out_path : path
        The ``features.h5`` to write (atomically).
    attrs : dict
        Its attributes.
    progress : bool
        Show a tqdm bar.
    """
    read_c = getattr(model, "common_readout", "encoder") == "decoder"
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "c_mean", "c_logvar", "s_mean", "s_logvar", "c_samples", "s_samples", "recon_error", "index")
        + (("c_readout_mean", "c_readout_samples") if read_c else ())}
    idx_mask = mask_index.to(device)
    for x, patient, index in tqdm(batches, desc=f"features {attrs.get('site', '')}", unit="batch", mininterval=5,
                                  leave=False, disable=not progress):
        x = x.to(device, torch.float32)
        patient = patient.to(device).bool()
        c_mu, c_lv = model.encode_common(x)
        s_mu, s_lv = model.encode_specific(x)
        x_hat = model.decode(c_mu, torch.where(patient[:, None], s_mu, torch.zeros_like(s_mu)))
        err = ((x_hat - x).flatten(1).index_select(1, idx_mask) ** 2).mean(dim=1)
        cs, ss = [], []
        for j, idx in enumerate(index.tolist()):
            g = subject_generator(seed, idx, device)
            cs.append(c_mu[j] + torch.exp(0.5 * c_lv[j]) * torch.randn((samples, c_mu.shape[1]), generator=g,
                                                                        device=device))
            ss.append(s_mu[j] + torch.exp(0.5 * s_lv[j]) * torch.randn((samples, s_mu.shape[1]), generator=g,
                                                                        device=device))
        out = {"c_mean": c_mu, "c_logvar": c_lv, "s_mean": s_mu, "s_logvar": s_lv, "c_samples": torch.stack(cs),
               "s_samples": torch.stack(ss), "recon_error": err, "index": index}
        if read_c:
            out["c_readout_mean"] = model.common_features(c_mu)
            out["c_readout_samples"] = model.common_features(out["c_samples"])
        for k, v in out.items():
            cols[k].append(v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy())
    data = {k: np.concatenate(v) for k, v in cols.items()}
    if not np.array_equal(data["index"], np.asarray(meta["index"])):
        raise RuntimeError("feature rows are not aligned with the fold's subject list (batches must not shuffle)")
    features_contract.write(out_path, features_contract.FoldFeatures(
        participant_id=meta["participant_id"], site=meta["site"], diagnosis=meta["diagnosis"], split=meta["split"],
        attrs=attrs, **data))
    log.info("wrote %s (%d subjects, K=%d)", out_path, len(data["index"]), samples)
    return out_path
