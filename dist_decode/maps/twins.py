"""Reconstructions and healthy twins of held-out patients, decoded from a fold's saved latent features.

``recon = decoder([c, s])`` and ``twin = decoder([c, 0])``: the twin keeps the subject's common (shared with
controls) features and drops the schizophrenia-specific ones. Latents come from ``features.h5`` (posterior means,
or the saved posterior samples), so nothing is re-encoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FEATURE_KEYS = ("participant_id", "site", "diagnosis", "split", "c_mean", "s_mean")


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


def _strings(ds: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]


def read_held_out(features_path: str | Path, patient_ids: set[str], use_samples: bool = False,
                  n_samples: int = 10) -> HeldOut:
    """Read the held-out (``split == "test"``) patients of one fold's ``features.h5``.

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
    FileNotFoundError
        If the file is missing.
    ValueError
        Naming the file and dataset when a dataset is missing or not row-aligned.
    """
    path = Path(features_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: fold features not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with h5:
        need = FEATURE_KEYS + (("c_samples", "s_samples") if use_samples else ())
        missing = [k for k in need if k not in h5]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {missing}")
        pid = _strings(h5["participant_id"])
        split = _strings(h5["split"])
        n = len(pid)
        for k in need:
            if h5[k].shape[0] != n:
                raise ValueError(f"{path}: dataset {k!r} has {h5[k].shape[0]} rows, participant_id has {n}")
        rows = [i for i in range(n) if split[i] == "test" and pid[i] in patient_ids]
        idx = np.asarray(rows, dtype=int)
        if use_samples:
            k = max(1, min(int(n_samples), h5["c_samples"].shape[1]))
            c = h5["c_samples"][()][idx, :k] if rows else np.zeros((0, k, h5["c_samples"].shape[2]))
            s = h5["s_samples"][()][idx, :k] if rows else np.zeros((0, k, h5["s_samples"].shape[2]))
        else:
            c = h5["c_mean"][()][idx][:, None] if rows else np.zeros((0, 1, h5["c_mean"].shape[1]))
            s = h5["s_mean"][()][idx][:, None] if rows else np.zeros((0, 1, h5["s_mean"].shape[1]))
    return HeldOut([pid[i] for i in rows], np.asarray(c, np.float32), np.asarray(s, np.float32))


def resample_to(volumes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample (n, X, Y, Z) volumes onto ``shape`` (the store grid) when the model's grid differs.

    Uses :func:`dist_decode.data.resample_volume` (the inverse of the mapping the trainer applied) when the data
    module provides it, else trilinear interpolation of the voxel grid onto the target box.
    """
    volumes = np.asarray(volumes, np.float32)
    if tuple(volumes.shape[1:]) == tuple(shape):
        return volumes
    try:
        from dist_decode.data import resample_volume  # the trainer's own grid mapping
    except ImportError:  # pragma: no cover - only before the data module exists
        resample_volume = None
    out = []
    for v in volumes:
        if resample_volume is not None:
            out.append(np.asarray(resample_volume(v, tuple(shape)), np.float32))
        else:
            from scipy import ndimage

            zoom = [t / s for t, s in zip(shape, v.shape)]
            out.append(ndimage.zoom(v, zoom, order=1, grid_mode=True, mode="nearest").astype(np.float32))
    return np.stack(out)


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
    import torch

    with torch.no_grad():
        ct = torch.as_tensor(np.asarray(c, np.float32))
        st = torch.as_tensor(np.asarray(s, np.float32))
        recon = model.decode(ct, st).float().cpu().numpy()[:, 0]
        twin = model.decode(ct, torch.zeros_like(st)).float().cpu().numpy()[:, 0]
    return resample_to(recon, shape), resample_to(twin, shape)
