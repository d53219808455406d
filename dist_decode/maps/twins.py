"""Reconstructions and healthy twins of held-out patients, decoded from a fold's saved latent features.

``recon = decoder([c, s])`` and ``twin = decoder([c, 0])``: the twin keeps the subject's common (shared with
controls) features and drops the schizophrenia-specific ones. Latents come from ``features.h5`` (posterior means,
or the saved posterior samples), so nothing is re-encoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_decode.contracts import features as features_contract
from dist_decode.data import resample_volume


@dataclass
class HeldOut:
    """Held-out patients of one fold and their latents.

    Attributes
    ----------
    participant_id : list of str
    c, s : ndarray, shape (n, K, d)
        Latents per subject; K = 1 for posterior means, else the first K posterior samples.
    """

    participant_id: list[str]
    c: np.ndarray
    s: np.ndarray


def read_held_out(features_path: str | Path, patient_ids: set[str], use_samples: bool = False,
                  n_samples: int = 10) -> HeldOut:
    """The held-out (``split == "test"``) patients of one fold's ``features.h5``.

    Parameters
    ----------
    features_path : path
        ``RUN/folds/<site>/features.h5``.
    patient_ids : set of str
        Participant ids of all patients in the store (the store decides who is a patient).
    use_samples : bool
        Use up to ``n_samples`` posterior samples (``c_samples``/``s_samples``) instead of the means.
    n_samples : int
        How many saved samples to decode per subject when ``use_samples``.

    Raises
    ------
    FileNotFoundError, ValueError
        From :func:`dist_decode.contracts.features.read` (naming the file).
    """
    f = features_contract.read(features_path, samples=use_samples)
    f = f.take((f.split == "test") & np.array([p in patient_ids for p in f.participant_id], dtype=bool))
    if use_samples:
        if f.c_samples is None or f.s_samples is None:
            raise ValueError(f"{features_path}: no posterior samples (c_samples / s_samples)")
        k = max(1, min(int(n_samples), f.c_samples.shape[1]))
        c, s = f.c_samples[:, :k], f.s_samples[:, :k]
    else:
        c, s = f.c_mean[:, None], f.s_mean[:, None]
    return HeldOut([str(p) for p in f.participant_id], np.asarray(c, np.float32), np.asarray(s, np.float32))


def resample_to(volumes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample (n, X, Y, Z) volumes onto ``shape`` (the store grid) when the model's grid differs, with the
    trainer's own grid mapping (:func:`dist_decode.data.resample_volume`)."""
    volumes = np.asarray(volumes, np.float32)
    if tuple(volumes.shape[1:]) == tuple(shape):
        return volumes
    return np.stack([np.asarray(resample_volume(v, tuple(shape)), np.float32) for v in volumes])


def decode_pairs(model, c: np.ndarray, s: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode reconstructions ``decoder([c, s])`` and twins ``decoder([c, 0])`` on the store grid.

    Parameters
    ----------
    model : torch.nn.Module
        A fold model with ``decode(c, s) -> (N, 1, X, Y, Z)``, in eval mode.
    c, s : ndarray, shape (N, dc) and (N, ds)
        Common and specific latents.
    shape : tuple of int
        Store grid; outputs on another model grid are resampled onto it.

    Returns
    -------
    recon, twin : ndarray, float32, shape (N, *shape)
    """
    with torch.no_grad():
        ct = torch.as_tensor(np.asarray(c, np.float32))
        st = torch.as_tensor(np.asarray(s, np.float32))
        recon = model.decode(ct, st).float().cpu().numpy()[:, 0]
        twin = model.decode(ct, torch.zeros_like(st)).float().cpu().numpy()[:, 0]
    return resample_to(recon, shape), resample_to(twin, shape)
