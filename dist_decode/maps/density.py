"""Where the maps live: the store grid, in each site's grey-matter density units.

A fold model decodes normalised volumes (``dist_decode.normalise``) on its own grid. :class:`MapSpace` brings
them back to the store grid and to density units (smoothed, TIV-scaled mwp1 of the subject's site), and gives
the same for a patient's *observed* volume, so that

* the **effect** map ``log(recon / twin)`` is the decoder's estimate of the patient's specific change, and
* the **deviation** map ``log(observed / twin)`` is how the patient's own data differ from the healthy twin,

both as log density ratios (``-0.1`` = 10 % less grey matter than the twin). Runs without normalisation (the
2022 anchor's recipe) decode raw store units, which are densities already.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dist_decode.normalise import DENSITY_FLOOR, FILE, Normaliser, NormaliseSettings, model_inputs


class MapSpace:
    """Observed volumes and density conversion of one run on its store's grid.

    Parameters
    ----------
    run_dir : path
        The directory whose ``normalisation.h5`` holds ``store``'s statistics (read when the run normalises its
        inputs): the run directory, or a ``dist_decode.apply`` output for a new cohort.
    store : dist_decode.data.Store
    cfg : RunConfig
    """

    def __init__(self, run_dir: str | os.PathLike, store, cfg) -> None:
        self.run_dir, self.store, self.cfg = Path(run_dir), store, cfg
        self.shape = tuple(int(v) for v in store.grid_shape)
        settings = NormaliseSettings.from_config(cfg.data)
        self.norm: Normaliser | None = None
        if settings.active and cfg.model.name != "anchor2022":
            self.norm = Normaliser.load(Path(run_dir) / FILE)
        self._site_of = {str(p): int(i) for p, i in zip(store.participant_ids, np.arange(store.n))}

    def index(self, pid: str) -> int:
        """Store row of a participant (KeyError naming it when absent)."""
        if pid not in self._site_of:
            raise KeyError(f"participant {pid!r} is not in store {self.store.path}")
        return self._site_of[pid]

    def observed(self, pids: list[str]) -> np.ndarray:
        """The participants' volumes as the model saw them, on the store grid (normalised; raw store units
        without normalisation)."""
        return model_inputs(self.run_dir, self.store, self.cfg, [self.index(p) for p in pids])[:, 0].numpy()

    def density(self, z: np.ndarray, pid: str) -> np.ndarray:
        """Volume(s) of participant ``pid`` in model units -> grey-matter density of the participant's site."""
        if self.norm is None:
            return np.asarray(z, np.float32)
        return self.norm.density(z, int(self.norm.site_index[self.index(pid)]))


def log_ratio(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``log(a / b)`` inside ``mask`` (both floored at a small positive density), 0 outside."""
    out = np.zeros(np.shape(a), np.float32)
    m = np.broadcast_to(np.asarray(mask, bool), out.shape)
    out[m] = np.log(np.maximum(np.asarray(a)[m], DENSITY_FLOOR) / np.maximum(np.asarray(b)[m], DENSITY_FLOOR))
    return out
