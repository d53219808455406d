"""``RUN/folds/<site>/features.h5``: the latent features of every subject of one LOSO fold.

Rows: the fold's training subjects, then validation, then the held-out site (``split`` = ``train`` / ``val`` /
``test``), each in store order. A fold model applied to a new cohort (``dist_decode.apply``) writes the same file for
every subject of the new store, in store order, with ``split`` = ``apply`` (and the attributes ``applied_to``,
``run``). Datasets (row-aligned)::

    participant_id, site, diagnosis, split     strings
    index                                      int64, the subject's row in the store
    c_mean, c_logvar, s_mean, s_logvar         float32 (n, dc) / (n, ds): posterior means and log-variances
    c_samples, s_samples                       float32 (n, K, d): posterior samples
    c_readout_mean, c_readout_samples          float32 (n, k) / (n, K, k), optional: C's features from the decoder
                                               read-out (``model.common_readout = "decoder"``), the same linear
                                               map of c_mean and c_samples
    recon_error                                float32 (n,): masked mean squared error of the reconstruction

and attributes ``fold``, ``site``, ``model``, ``n_parameters``, ``grid``, ``seed``, ``steps`` (+ ``noise_var``).
The trainer writes it (:func:`write`); the RSA, maps, analysis and report stages read it (:func:`read`).
Feature space ``C`` (what the RSA and the analyses read, :meth:`FoldFeatures.space`) is the read-out when the file
has one, else ``c_mean``; the maps decode ``c_mean`` / ``c_samples`` (the decoder's own latents) either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_decode.fsutil import atomic_path, disk_full_errors, open_hdf5

FILE = "features.h5"
TEXT = ("participant_id", "site", "diagnosis", "split")
ARRAYS = ("c_mean", "c_logvar", "s_mean", "s_logvar", "c_samples", "s_samples", "recon_error", "c_readout_mean",
          "c_readout_samples")
REQUIRED = TEXT + ("c_mean", "s_mean")
#: Feature spaces: name -> (posterior means, posterior samples) datasets, first the preferred pair when present.
SPACES = {"S": (("s_mean", "s_samples"),), "C": (("c_readout_mean", "c_readout_samples"), ("c_mean", "c_samples"))}


@dataclass
class FoldFeatures:
    """The content of one ``features.h5`` (or a subset of its rows)."""

    participant_id: np.ndarray
    site: np.ndarray
    diagnosis: np.ndarray
    split: np.ndarray
    c_mean: np.ndarray
    s_mean: np.ndarray
    index: np.ndarray | None = None
    c_logvar: np.ndarray | None = None
    s_logvar: np.ndarray | None = None
    c_samples: np.ndarray | None = None
    s_samples: np.ndarray | None = None
    recon_error: np.ndarray | None = None
    c_readout_mean: np.ndarray | None = None
    c_readout_samples: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.participant_id))

    def take(self, rows: np.ndarray) -> "FoldFeatures":
        """The subset of ``rows`` (indices or a boolean mask), every dataset alike."""
        rows = np.asarray(rows)
        out = {f.name: (getattr(self, f.name)[rows] if isinstance(getattr(self, f.name), np.ndarray) else
                        getattr(self, f.name)) for f in fields(self)}
        return replace(self, **out)

    def held_out(self) -> "FoldFeatures":
        """The held-out site's subjects (``split == "test"``)."""
        return self.take(self.split == "test")

    def space_datasets(self, name: str) -> tuple[str, str]:
        """The (means, samples) datasets feature space ``name`` reads."""
        pairs = SPACES[name]
        return next((pair for pair in pairs if getattr(self, pair[0]) is not None), pairs[-1])

    def space(self, name: str, samples: bool = False) -> np.ndarray:
        """Feature space ``S`` or ``C``: posterior means (n, d) or samples arranged (K, n, d); C is the decoder
        read-out when the file has one."""
        mean_key, samples_key = self.space_datasets(name)
        if not samples:
            return np.asarray(getattr(self, mean_key), np.float64)
        x = getattr(self, samples_key)
        if x is None:
            raise ValueError(f"space {name}: no posterior samples were read")
        return np.transpose(np.asarray(x, np.float64), (1, 0, 2))


def write(path: str | os.PathLike, features: FoldFeatures) -> Path:
    """Write ``features`` atomically."""
    path = Path(path)
    str_dt = h5py.string_dtype()
    with disk_full_errors(path, "the features"), atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for k in TEXT:
                f.create_dataset(k, data=np.asarray([str(v) for v in getattr(features, k)], dtype=object),
                                 dtype=str_dt)
            if features.index is not None:
                f.create_dataset("index", data=np.asarray(features.index, np.int64))
            for k in ARRAYS:
                v = getattr(features, k)
                if v is not None:
                    f.create_dataset(k, data=np.asarray(v, np.float32))
            for k, v in features.attrs.items():
                f.attrs[k] = v
    return path


def read(path: str | os.PathLike, split: str | None = None, samples: bool = True) -> FoldFeatures:
    """Read a fold's features (all rows, or those of one ``split``).

    Parameters
    ----------
    path : path
        ``features.h5``.
    split : {"train", "val", "test", "apply"}, optional
    samples : bool
        Also read the posterior samples (the largest datasets).

    Raises
    ------
    FileNotFoundError
        No such file (naming the fold).
    ValueError
        Not HDF5, a required dataset missing, datasets of different lengths, or no row in ``split``.
    """
    path = Path(path)
    with open_hdf5(path, f"{path} not found: fold {path.parent.name} has no features (train it first)") as f:
        missing = [k for k in REQUIRED if k not in f]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {missing}")
        n = f["participant_id"].shape[0]
        keys = [k for k in TEXT + ("index",) + ARRAYS if k in f and (samples or not k.endswith("_samples"))]
        for k in keys:
            if f[k].shape[0] != n:
                raise ValueError(f"{path}: dataset {k!r} has {f[k].shape[0]} rows, participant_id has {n}")
        data: dict[str, Any] = {}
        for k in keys:
            data[k] = f[k].asstr()[...].astype(str) if k in TEXT else f[k][...]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    out = FoldFeatures(**data, attrs=attrs)
    if split is not None:
        out = out.take(out.split == split)
        if not len(out):
            raise ValueError(f"{path}: no {split!r} subjects")
    return out
