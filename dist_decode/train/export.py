"""What a finished fold leaves behind: ``model_final.pt``, ``features.h5`` and, last, ``DONE``.

``model_final.pt`` holds fp32 weights (with bf16 and ZeRO >= 1 the fp32 master weights are merged from the final
checkpoint's optimizer partitions), the config, the grid and the fold's noise level; :func:`dist_decode.model.
load_fold_model` rebuilds the model from it. The features are computed with that same fp32 model.

Posterior samples are drawn from a generator seeded by (run seed, subject's store index), so they do not depend
on batch composition, world size or device. ``recon_error`` is the masked mean squared error (model units) of the
reconstruction from the posterior means: ``decode(c_mean, s_mean)`` for patients, ``decode(c_mean, 0)`` for
controls.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tqdm import tqdm

from dist_decode.contracts import features as features_contract
from dist_decode.fsutil import atomic_path
from dist_decode.train import checkpoint

log = logging.getLogger("dist_decode.train")


def final_state_dict(engine, fold_dir: Path, steps: int, precision: str, zero_stage: int) -> dict[str, Any]:
    """fp32 weights of the trained model (see the module docstring)."""
    if precision == "bf16" and zero_stage >= 1:
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(fold_dir / "checkpoints"), tag=checkpoint.tag_of(steps))
            if set(sd) == set(engine.module.state_dict()):
                return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                        for k, v in sd.items()}
            log.warning("fp32 master weights incomplete in the final checkpoint; saving the bf16 weights")
        except Exception as exc:  # an unexpected checkpoint layout must not lose a finished fold
            log.warning("could not merge fp32 master weights (%s); saving the bf16 weights", exc)
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in engine.module.state_dict().items()}


def save_model(path: Path, blob: dict[str, Any]) -> None:
    """Write ``model_final.pt`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def subject_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator of the posterior samples of subject ``index`` (store order)."""
    state = np.random.SeedSequence([int(seed), 0xFEA7, int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterable, meta: dict[str, np.ndarray],
                     mask_index: torch.Tensor, samples: int, seed: int, out_path: Path, attrs: dict[str, Any],
                     device: torch.device | str = "cpu") -> Path:
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
    """
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "c_mean", "c_logvar", "s_mean", "s_logvar", "c_samples", "s_samples", "recon_error", "index")}
    idx_mask = mask_index.to(device)
    for x, patient, index in tqdm(batches, desc=f"features {attrs.get('site', '')}", unit="batch", mininterval=5,
                                  leave=False):
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
        for k, v in (("c_mean", c_mu), ("c_logvar", c_lv), ("s_mean", s_mu), ("s_logvar", s_lv),
                     ("c_samples", torch.stack(cs)), ("s_samples", torch.stack(ss)), ("recon_error", err),
                     ("index", index)):
            cols[k].append(v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy())
    data = {k: np.concatenate(v) for k, v in cols.items()}
    if not np.array_equal(data["index"], np.asarray(meta["index"])):
        raise RuntimeError("feature rows are not aligned with the fold's subject list (batches must not shuffle)")
    features_contract.write(out_path, features_contract.FoldFeatures(
        participant_id=meta["participant_id"], site=meta["site"], diagnosis=meta["diagnosis"], split=meta["split"],
        attrs=attrs, **data))
    log.info("wrote %s (%d subjects, K=%d)", out_path, len(data["index"]), samples)
    return out_path
