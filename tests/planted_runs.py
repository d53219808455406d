"""Builders shared by the maps and report tests (no tests here): a tiny run on the ``tiny_store`` fixture.

The run's folds are written in the exact ``features.h5`` / ``DONE`` format of docs/architecture.md. Two decoders
with a known specific effect stand in for a trained model:

* :class:`PlantedDecoder` (the poster's SyN recipe, :func:`poster_cfg`): ``decode(c, s)`` returns the cohort's
  mean anatomy contracted around a known point by an amount proportional to ``s[:, 0]``, so the healthy twin
  ``decode(c, 0)`` is undeformed and every patient's reconstruction carries a known local atrophy;
* :class:`ObservedDecoder` (density maps against the observed volumes): ``decode(c, s)`` is the subject's own
  store volume (``c[:, -1]`` holds its store row), with grey matter *added* around the point for ``s = 0``, so the
  patient's observed volume shows a loss against its healthy twin there and nowhere else.

The maps stage must find the effect there. Both read raw store volumes (a run without normalisation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from dist_decode.config import RunConfig
from dist_decode.contracts import features as features_contract


def planted_centre(store) -> tuple[int, int, int]:
    """Voxel of the strongest planted schizophrenia effect (the minimum of the ground truth's log J)."""
    import nibabel as nib

    eff = np.asarray(nib.load(str(Path(store.ground_truth) / "specific_effect.nii.gz")).dataobj)
    return tuple(int(v) for v in np.unravel_index(int(np.argmin(eff)), eff.shape))


class PlantedDecoder:
    """A decoder with a known specific effect at ``centre``.

    ``decode(c, s)``: the base anatomy, warped by a subject-specific common deformation (local expansions or
    contractions of +-``common`` at three fixed off-centre points, scaled by ``c[:, :3]``, present in twin and
    reconstruction alike), then contracted around ``centre`` by ``strength * s[:, 0]`` (0 for the twin).
    """

    def __init__(self, base: np.ndarray, centre, strength: float = 0.5, sigma: float = 1.6,
                 common: float = 0.25):
        self.base = base.astype(np.float32)
        self.grid = base.shape
        self.centre = np.asarray(centre, float)
        self.strength, self.sigma, self.common = strength, sigma, common
        shape = np.array(base.shape, float)
        # Three common-effect points on the far side of the brain from the planted centre.
        self.others = [shape * f for f in ((0.3, 0.35, 0.5), (0.7, 0.4, 0.45), (0.5, 0.7, 0.6))]
        self._grid = np.indices(base.shape).astype(float)

    def _field(self, centre, amount, sigma):
        d = self._grid - np.asarray(centre, float)[:, None, None, None]
        w = np.exp(-(d ** 2).sum(0) / (2 * sigma ** 2))
        return d * (amount * w)  # displacement (sampling farther out = local contraction for amount > 0)

    def decode(self, c, s):
        import torch

        c = np.asarray(c, float)
        s = np.asarray(s, float)
        out = []
        for ci, si in zip(c, s):
            disp = sum(self._field(o, self.common * np.tanh(ci[k]), 2.0) for k, o in enumerate(self.others))
            disp = disp + self._field(self.centre, self.strength * si[0], self.sigma)
            out.append(ndimage.map_coordinates(self.base, self._grid + disp, order=1))
        return torch.as_tensor(np.stack(out)[:, None].astype(np.float32))


RAW = {"proportional_scaling": "none", "smooth_fwhm_mm": 0.0, "site_gain": False, "site_center": False}


def raw_cfg(**maps) -> RunConfig:
    """A config whose models read raw store volumes, with ``maps`` overrides (in-process registration)."""
    cfg = RunConfig()
    return cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, **RAW}),
                       maps=cfg.maps.__class__(**{**cfg.maps.__dict__, "workers": 1, **maps}))


def poster_cfg(**maps) -> RunConfig:
    """The poster's recipe: SyN twin -> recon log Jacobians, tested themselves, FDR, every significant voxel.

    On the 6 mm grid SyN also iterates at full resolution with a 1.5-voxel update smoothing (ANTs' defaults would
    smooth over ~18 mm and blur the planted effect)."""
    return raw_cfg(**{"kind": "jacobian", "test_on": "effect", "extent": "significant", "threshold": "fdr",
                      "syn_iterations": (40, 20, 10), "syn_flow_sigma": 1.5, **maps})


class ObservedDecoder:
    """Decodes each subject's own store volume (``c[:, -1]`` = its store row, ``c[:, -2]`` = its severity ``u``):
    ``decode(c, s) = volume * exp(strength * (u - s[:, 0]) * g)`` with ``g`` a unit Gaussian of width ``sigma``
    voxels around ``centre``. The reconstruction (``s = u``) is the observed volume; the healthy twin (``s = 0``)
    has ``exp(strength * u * g)`` times its grey matter, so the patient shows a loss of ``strength * u`` there."""

    def __init__(self, store, centre, strength: float = 0.3, sigma: float = 1.6):
        self.store = store
        self.grid = tuple(store.grid_shape)
        d = np.indices(self.grid).astype(float) - np.asarray(centre, float)[:, None, None, None]
        self.g = np.exp(-(d ** 2).sum(0) / (2 * sigma ** 2)).astype(np.float32)
        self.strength = strength

    def decode(self, c, s):
        import torch

        out = []
        for ci, si in zip(np.asarray(c, float), np.asarray(s, float)):
            vol = self.store.read(int(round(ci[-1])))
            out.append(vol * np.exp(self.strength * (ci[-2] - si[0]) * self.g))
        return torch.as_tensor(np.stack(out)[:, None].astype(np.float32))


def make_run(root: Path, store_path: Path, sites: list[str] | None = None, seed: int = 0,
             cfg: RunConfig | None = None) -> Path:
    """A run directory whose folds ``sites`` (default all) are finished, with planted-effect latents.

    Patients get ``s[:, 0]`` in [0.6, 1.0] (specific severity), controls 0; ``c`` is noise and two last
    coordinates, the subject's severity and store row (for :class:`ObservedDecoder`).
    """
    from dist_decode.data import Store

    store = Store.open(store_path)
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    cfg = cfg or raw_cfg()
    cfg.to_json(run / "config.json")
    (run / "manifest.json").write_text(json.dumps({
        "store": str(store_path), "folds": {str(k): s for k, s in enumerate(store.sites)},
        "git_commit": "0123456789abcdef", "versions": {"torch": "2.13.0"}}))
    rng = np.random.default_rng(seed)
    ids = np.asarray(store.participant_ids).astype(str)
    site_of = np.asarray(store.site_of).astype(str)
    pat = np.asarray(store.is_patient, bool)
    dx = np.where(pat, "SZ", "HC")
    n, dc, ds, k = len(ids), 4, 3, 3
    for fold, site in enumerate(store.sites):
        if sites is not None and site not in sites:
            continue
        fdir = run / "folds" / site
        fdir.mkdir(parents=True, exist_ok=True)
        split = np.where(site_of == site, "test", np.where(rng.uniform(size=n) < 0.2, "val", "train"))
        c_mean = rng.normal(size=(n, dc)).astype(np.float32)
        s_mean = np.zeros((n, ds), np.float32)
        s_mean[pat, 0] = rng.uniform(0.6, 1.0, size=pat.sum())
        s_mean[pat, 1:] = rng.normal(0, 0.3, size=(pat.sum(), ds - 1))
        # the last two C coordinates: the subject's severity and store row (read by ObservedDecoder)
        extra = np.stack([s_mean[:, 0], np.arange(n, dtype=np.float32)], axis=1)
        noisy = c_mean[:, None] + 0.05 * rng.normal(size=(n, k, dc)).astype(np.float32)
        features_contract.write(fdir / features_contract.FILE, features_contract.FoldFeatures(
            participant_id=ids, site=site_of, diagnosis=dx, split=split, index=np.arange(n),
            c_mean=np.hstack([c_mean, extra]), s_mean=s_mean, c_logvar=np.full((n, dc + 2), -2.0, np.float32),
            s_logvar=np.full((n, ds), -2.0, np.float32),
            c_samples=np.concatenate([noisy, np.repeat(extra[:, None], k, axis=1)], axis=2),
            s_samples=s_mean[:, None] + np.where(pat[:, None, None], 0.05, 0.0) * rng.normal(size=(n, k, ds)),
            recon_error=rng.uniform(0.001, 0.01, size=n).astype(np.float32),
            attrs={"fold": fold, "site": site, "model": "decode_sz", "n_parameters": 1234567}))
        (fdir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 10, "total": 1.0}) + "\n")
        (fdir / "DONE").write_text(json.dumps({"steps": 10, "wall_s": 1.5, "n_parameters": 1234567,
                                               "model": "decode_sz", "world_size": 1}))
    return run


def planted_loader(store_path: Path, kind: str = "deformation"):
    """``load_model`` for the maps stage: the same decoder for every fold (``deformation``: PlantedDecoder,
    ``density``: ObservedDecoder)."""
    from dist_decode.data import Store

    store = Store.open(store_path)
    if kind == "density":
        dec = ObservedDecoder(store, planted_centre(store))
    else:
        base = np.mean([store.read(i) for i in range(len(store.participant_ids))], axis=0)
        dec = PlantedDecoder(base, planted_centre(store))
    return lambda fold_dir: (dec, raw_cfg())
