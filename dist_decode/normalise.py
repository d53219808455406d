"""Input normalisation of a run, and the one owner of ``RUN/normalisation.h5``.

Every volume the models see goes through the same four steps, computed on the store grid:

1. **proportional scaling**: times ``reference / TIV`` (CAT12 ``vol_TIV``) or ``reference / total GM``, where
   ``reference`` is the store's median, so a large head does not pass for more grey matter everywhere;
2. **smoothing**: a Gaussian of ``smooth_fwhm_mm`` (as in voxel-based morphometry; voxel noise otherwise
   dominates the differences between subjects);
3. **site gain**: divided by the site's mean total relative to the mean over sites (a scanner's global
   intensity scale);
4. **site centring**: minus the site's voxelwise mean;

then divided by one global ``scale`` (the pooled standard deviation inside the brain mask), so the network sees
unit-variance inputs. Steps 3 and 4 use only each site's own volumes, so they apply to a held-out site and to any
later subject in exactly the same way: its controls (``site_reference="controls"``, the default: the site's healthy
reference, so its share of patients does not change what is removed; a site with fewer than :data:`MIN_REFERENCE`
controls falls back to all its subjects), or all of them (``"all"``: no labels).

The statistics are computed in one streaming pass over the store (:meth:`Normaliser.compute`) and kept in
``RUN/normalisation.h5`` (:func:`ensure`, under a file lock so concurrent fold jobs compute them once). The
same numbers map a decoded volume back to grey-matter density units of its site (:meth:`Normaliser.density`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import voxel_sizes
from torch import nn
from tqdm import tqdm

from dist_decode.config import SAVED_BEFORE_FIELD
from dist_decode.contracts.store import manifest_sha256
from dist_decode.fsutil import atomic_path, disk_full_errors

log = logging.getLogger(__name__)

FILE = "normalisation.h5"
SCHEMA = 1
PROPORTIONAL = ("tiv", "gm", "none")
SITE_REFERENCES = ("all", "controls")
#: Fewest controls a site's reference statistics are taken from; below it, all the site's subjects.
MIN_REFERENCE = 3
#: A spread of the sites' patient shares above which ``site_reference="all"`` is warned about.
UNEVEN_SHARE = 0.3
#: Positive floor of a site mean (density units) when turning decoded volumes into a density ratio.
DENSITY_FLOOR = 1e-3


@dataclass(frozen=True)
class NormaliseSettings:
    """The normalisation steps of ``RunConfig.data`` (see the module docstring)."""

    proportional_scaling: str = "tiv"
    smooth_fwhm_mm: float = 8.0
    site_gain: bool = True
    site_center: bool = True
    site_reference: str = "controls"

    @classmethod
    def from_config(cls, data_cfg) -> "NormaliseSettings":
        s = cls(str(data_cfg.proportional_scaling), float(data_cfg.smooth_fwhm_mm), bool(data_cfg.site_gain),
                bool(data_cfg.site_center), str(data_cfg.site_reference))
        s.validate()
        return s

    def validate(self) -> None:
        """Raise ValueError naming the field for a value outside its choices."""
        if self.proportional_scaling not in PROPORTIONAL:
            raise ValueError(f"data.proportional_scaling {self.proportional_scaling!r}: expected one of "
                             f"{list(PROPORTIONAL)}")
        if not self.smooth_fwhm_mm >= 0:
            raise ValueError(f"data.smooth_fwhm_mm {self.smooth_fwhm_mm!r}: expected >= 0")
        if self.site_reference not in SITE_REFERENCES:
            raise ValueError(f"data.site_reference {self.site_reference!r}: expected one of {list(SITE_REFERENCES)}")

    @property
    def active(self) -> bool:
        """False when every step is off: the models then see raw store volumes (the 2022 recipe)."""
        return (self.proportional_scaling != "none" or self.smooth_fwhm_mm > 0 or self.site_gain
                or self.site_center)

    def to_dict(self) -> dict:
        return {"proportional_scaling": self.proportional_scaling, "smooth_fwhm_mm": self.smooth_fwhm_mm,
                "site_gain": self.site_gain, "site_center": self.site_center, "site_reference": self.site_reference}


def reference_subjects(store, settings: NormaliseSettings, site_index: np.ndarray,
                       n_sites: int) -> tuple[np.ndarray, list[str]]:
    """Which subjects each site's gain and mean come from, and the sites that fell back to all their subjects.

    ``site_reference="all"``: everyone. ``"controls"``: each site's controls (``store.is_patient`` false); a site
    with fewer than :data:`MIN_REFERENCE` of them uses all its subjects (logged).
    """
    everyone = np.ones(len(site_index), bool)
    if settings.site_reference == "all":
        if settings.site_center or settings.site_gain:
            share = [float(np.mean(np.asarray(store.is_patient, bool)[site_index == k]))
                     for k in range(n_sites) if (site_index == k).any()]
            if share and max(share) - min(share) > UNEVEN_SHARE:
                log.warning("the sites' shares of patients range from %.0f %% to %.0f %%: centring each site on all "
                            "its subjects removes more of the patients' effect where they are many; consider "
                            "data.site_reference=controls (docs/science.md, the unbalanced cohort)",
                            100 * min(share), 100 * max(share))
        return everyone, []
    controls = ~np.asarray(store.is_patient, bool)
    fallback = []
    for k in range(n_sites):
        here = site_index == k
        if here.any() and int((controls & here).sum()) < MIN_REFERENCE:
            fallback.append(str(store.sites[k]))
            log.warning("site %s has %d control(s) (< %d): its normalisation statistics come from all its %d "
                        "subjects", store.sites[k], int((controls & here).sum()), MIN_REFERENCE, int(here.sum()))
    use_all = np.isin(np.asarray(store.site_of).astype(str), fallback)
    return controls | use_all, fallback


# -- smoothing ---------------------------------------------------------------------------------------------------
def gaussian_kernels(fwhm_mm: float, voxel_mm: Sequence[float]) -> list[torch.Tensor]:
    """Normalised 1-D Gaussian kernels (one per axis, truncated at 4 sigma) for a FWHM in mm."""
    out = []
    for v in voxel_mm:
        sigma = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / float(v)
        r = max(1, int(math.ceil(4.0 * sigma)))
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        out.append((k / k.sum()).float())
    return out


def band_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, n) matrix of a 1-D convolution with ``kernel`` over ``n`` samples, zero beyond the ends."""
    r = kernel.numel() // 2
    i = torch.arange(n)
    diff = i[None, :] - i[:, None] + r  # column - row + radius: the kernel tap of each pair
    inside = (diff >= 0) & (diff < kernel.numel())
    return torch.where(inside, kernel[diff.clamp(0, kernel.numel() - 1)], torch.zeros(()))


def smooth(x: torch.Tensor, kernels: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """Separable Gaussian smoothing of ``x`` (N, 1, X, Y, Z), zero outside the volume (brain maps are 0 there).

    Each axis is a product with a banded matrix (BLAS), several times faster on CPU than a 3-D convolution with
    a 1-D kernel and identical in result.
    """
    if not kernels:
        return x
    v = x[:, 0]
    for axis, k in enumerate(kernels):
        m = band_matrix(k.to(torch.float64).cpu(), v.shape[axis + 1]).to(x.device, x.dtype)
        v = torch.tensordot(v, m, dims=([axis + 1], [1])).movedim(-1, axis + 1)
    return v[:, None].contiguous()


# -- the statistics ----------------------------------------------------------------------------------------------
@dataclass
class Normaliser:
    """Normalisation statistics of one store (see the module docstring).

    Attributes
    ----------
    settings : NormaliseSettings
    sites : list of str
        Sites in the order of ``site_mean`` / ``site_gain``.
    site_mean : ndarray (n_sites, X, Y, Z) or None
        Voxelwise site means after scaling, smoothing and gain (None without site centring).
    site_gain : ndarray (n_sites,)
    reference : float
        Proportional-scaling reference (median TIV or total GM, ml; 1 without scaling).
    scale : float
        Global divisor (pooled within-site SD inside the mask).
    participant_id : ndarray of str
        Store subjects, in store order.
    factor : ndarray (n,)
        Per subject: ``reference / TIV / site gain`` (what the smoothed volume is multiplied by).
    site_index : ndarray (n,) of int
        Per subject: row of ``site_mean``.
    voxel_mm : tuple of float
        Voxel sizes of the store grid.
    store_hash : str
        sha256 of the store's ``manifest.json``.
    site_total_mean : float or None
        The mean over sites of the site totals (ml), the divisor of ``site_gain``: a new cohort's site gains are
        relative to its trained run's (None in files written before it was recorded).
    sites_referenced_on_all : list of str
        With ``site_reference="controls"``: the sites with too few controls, whose statistics came from all their
        subjects.
    """

    settings: NormaliseSettings
    sites: list[str]
    site_mean: np.ndarray | None
    site_gain: np.ndarray
    reference: float
    scale: float
    participant_id: np.ndarray
    factor: np.ndarray
    site_index: np.ndarray
    voxel_mm: tuple[float, float, float]
    store_hash: str
    site_total_mean: float | None = None
    sites_referenced_on_all: list[str] = field(default_factory=list)

    # .. computing ..
    @classmethod
    def compute(cls, store, settings: NormaliseSettings, reference: float | None = None,
                scale: float | None = None, progress: bool = True,
                site_total_mean: float | None = None) -> "Normaliser":
        """One streaming pass over ``store``.

        Parameters
        ----------
        store : dist_decode.data.Store
        settings : NormaliseSettings
        reference, scale, site_total_mean : float, optional
            Reuse a trained run's reference, scale and mean site total (a new cohort must land in the units the
            model learned: :meth:`applied_to`); by default all come from ``store``. Site means and gains always come
            from each site's own volumes, as for a held-out site.

        Raises
        ------
        ValueError
            Naming the subjects whose TIV is missing when ``proportional_scaling="tiv"``.
        """
        settings.validate()
        n = store.n
        mask = np.asarray(store.mask, bool)
        vox = tuple(float(v) for v in voxel_sizes(store.affine))
        vox_ml = float(np.prod(vox)) / 1000.0
        kernels = gaussian_kernels(settings.smooth_fwhm_mm, vox) if settings.smooth_fwhm_mm > 0 else None
        sites = [str(s) for s in store.sites]
        site_of = np.asarray(store.site_of).astype(str)
        site_index = np.array([sites.index(s) for s in site_of], dtype=np.int64)
        if settings.proportional_scaling == "tiv":
            tiv = np.asarray(store.phenotypes.get("tiv_ml", np.full(n, np.nan)), float)
            bad = np.flatnonzero(~(np.isfinite(tiv) & (tiv > 0)))
            if bad.size:
                ids = ", ".join(str(store.participant_ids[i]) for i in bad[:5])
                raise ValueError(f"store {store.path}: {bad.size} subject(s) have no TIV (vol_TIV of cat_*.xml), "
                                 f"e.g. {ids}; set data.proportional_scaling to 'gm' or 'none'")
        t_mask = torch.from_numpy(mask)
        order = np.argsort(site_index, kind="stable")  # site by site: one shard open at a time

        def volumes(desc: str):
            for i in tqdm(order, desc=desc, unit="subj", disable=not progress, mininterval=2):
                yield int(i), torch.from_numpy(np.ascontiguousarray(store.read(int(i)), np.float32))

        if settings.proportional_scaling == "tiv":
            measure = tiv
        elif settings.proportional_scaling == "gm":  # total grey matter needs a first (read-only) pass
            measure = np.zeros(n)
            for i, x in volumes("total grey matter"):
                measure[i] = float(x[t_mask].double().sum()) * vox_ml
            if np.any(measure <= 0):
                i = int(np.flatnonzero(measure <= 0)[0])
                raise ValueError(f"store {store.path}: subject {store.participant_ids[i]} has no grey matter "
                                 "inside the brain mask; cannot scale it proportionally")
        else:
            measure = np.ones(n)
        ref = float(np.median(measure)) if reference is None else float(reference)
        w = ref / measure  # proportional factor per subject
        counts = np.bincount(site_index, minlength=len(sites))
        in_ref, fallback = reference_subjects(store, settings, site_index, len(sites))
        ref_counts = np.bincount(site_index[in_ref], minlength=len(sites))
        s1 = np.zeros((len(sites),) + mask.shape, np.float64)  # per site: sum of w v, sum of (w v)^2
        s2 = np.zeros_like(s1)
        r1 = np.zeros_like(s1) if settings.site_reference != "all" else s1  # per site: sum of w v, reference only
        total = np.zeros(n)  # per subject: total of w v inside the mask (ml)
        with torch.no_grad():
            for i, x in volumes("normalisation statistics"):
                v = smooth(x[None, None], kernels)[0, 0].double() * w[i]
                total[i] = float(v[t_mask].sum()) * vox_ml
                vn = v.numpy()
                s1[site_index[i]] += vn
                s2[site_index[i]] += vn * vn
                if r1 is not s1 and in_ref[i]:
                    r1[site_index[i]] += vn
        site_total = np.array([total[in_ref & (site_index == k)].mean() if ref_counts[k] else 0.0
                               for k in range(len(sites))])
        if site_total_mean is None:
            site_total_mean = float(site_total[counts > 0].mean())
        gain = site_total / site_total_mean if settings.site_gain else np.ones(len(sites))
        gain = np.where(counts > 0, gain, 1.0)
        nk = np.maximum(counts, 1)[:, None, None, None]
        g = gain[:, None, None, None]
        mean = r1 / (np.maximum(ref_counts, 1)[:, None, None, None] * g)  # site reference mean after scaling, gain
        if settings.site_center:
            if r1 is s1:
                ss = s2 / g ** 2 - nk * mean ** 2  # within-site sum of squares per voxel
            else:  # sum of squares about the site's reference mean
                ss = s2 / g ** 2 - 2 * mean * s1 / g + nk * mean ** 2
        else:
            ss = s2 / g ** 2
        if scale is None:
            scale = float(np.sqrt(max(ss[:, mask].sum(), 1e-30) / (n * mask.sum())))
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"store {store.path}: the volumes do not vary inside the brain mask (scale {scale})")
        return cls(
            settings=settings, sites=sites,
            site_mean=mean.astype(np.float32) if settings.site_center else None,
            site_gain=gain.astype(np.float64), reference=ref, scale=float(scale),
            participant_id=np.asarray(store.participant_ids).astype(str),
            factor=(w / gain[site_index]).astype(np.float64), site_index=site_index, voxel_mm=vox,
            store_hash=store_hash(store.path), site_total_mean=float(site_total_mean),
            sites_referenced_on_all=fallback,
        )

    # .. files ..
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (HDF5: arrays as datasets, the rest as attributes)."""
        path = Path(path)
        # no chunk cache: after a failed write (a full disk) HDF5 2.0 segfaults retrying a cached chunk at close
        with disk_full_errors(path, "the normalisation statistics"), atomic_path(path) as tmp:
            with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
                f.attrs["schema"] = SCHEMA
                f.attrs["settings"] = json.dumps(self.settings.to_dict(), sort_keys=True)
                f.attrs["sites"] = json.dumps(self.sites)
                f.attrs["reference"] = self.reference
                f.attrs["scale"] = self.scale
                f.attrs["voxel_mm"] = list(self.voxel_mm)
                f.attrs["store_manifest_sha256"] = self.store_hash
                if self.site_total_mean is not None:
                    f.attrs["site_total_mean"] = self.site_total_mean
                f.attrs["sites_referenced_on_all"] = json.dumps(self.sites_referenced_on_all)
                f.attrs["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                f.create_dataset("site_gain", data=self.site_gain)
                f.create_dataset("factor", data=self.factor)
                f.create_dataset("site_index", data=self.site_index)
                f.create_dataset("participant_id", data=self.participant_id.astype(object),
                                 dtype=h5py.string_dtype())
                if self.site_mean is not None:
                    f.create_dataset("site_mean", data=self.site_mean, compression="gzip", compression_opts=1,
                                     chunks=(1,) + self.site_mean.shape[1:])
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Normaliser":
        """Read a file written by :meth:`save`.

        Raises
        ------
        FileNotFoundError, ValueError
            Missing file, or one of another schema / damaged (naming the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no normalisation statistics")
        try:
            with h5py.File(path, "r") as f:
                if int(f.attrs.get("schema", -1)) != SCHEMA:
                    raise ValueError(f"{path}: normalisation schema {f.attrs.get('schema')}, expected {SCHEMA}")
                # files from before site_reference existed: what runs did then
                before = SAVED_BEFORE_FIELD[("data", "site_reference")]
                settings = NormaliseSettings(**{"site_reference": before, **json.loads(f.attrs["settings"])})
                return cls(
                    settings=settings, sites=list(json.loads(f.attrs["sites"])),
                    site_mean=f["site_mean"][...] if "site_mean" in f else None,
                    site_gain=f["site_gain"][...], reference=float(f.attrs["reference"]),
                    scale=float(f.attrs["scale"]), participant_id=f["participant_id"].asstr()[...].astype(str),
                    factor=f["factor"][...], site_index=f["site_index"][...],
                    voxel_mm=tuple(float(v) for v in f.attrs["voxel_mm"]),
                    store_hash=str(f.attrs["store_manifest_sha256"]),
                    site_total_mean=(float(f.attrs["site_total_mean"]) if "site_total_mean" in f.attrs else None),
                    sites_referenced_on_all=json.loads(f.attrs.get("sites_referenced_on_all", "[]")),
                )
        except (OSError, KeyError) as exc:
            raise ValueError(f"{path}: damaged normalisation statistics ({exc})") from exc

    # .. a new cohort in a trained run's units ..
    def run_site_total_mean(self, mask: np.ndarray) -> float | None:
        """The mean site total (ml) the site gains are relative to: the recorded one, else (files written before
        it was recorded) recovered from the site means and gains inside the run store's brain ``mask``.

        Raises
        ------
        ValueError
            When it was not recorded and cannot be recovered (site gain without site centring).
        """
        if self.site_total_mean is not None or not self.settings.site_gain:
            return self.site_total_mean
        if self.site_mean is None:
            raise ValueError("the run's normalisation.h5 predates the recorded mean site total and has no site means "
                             "to recover it from; recompute it with this version (a new run directory)")
        vox_ml = float(np.prod(self.voxel_mm)) / 1000.0
        present = np.bincount(self.site_index, minlength=len(self.sites)) > 0
        m = np.asarray(mask, bool)
        totals = np.array([float(self.site_mean[k][m].sum(dtype=np.float64)) * float(self.site_gain[k]) * vox_ml
                           for k in range(len(self.sites))])
        return float(totals[present].mean())

    def applied_to(self, store, mask: np.ndarray, progress: bool = True) -> "Normaliser":
        """Statistics of another store (a new cohort) in this run's units: the same settings, proportional-scaling
        reference, global scale and mean site total; each new site's mean and gain from its own volumes, exactly
        as a held-out site's. ``mask``: the run store's brain mask (see :meth:`run_site_total_mean`)."""
        return Normaliser.compute(store, self.settings, reference=self.reference, scale=self.scale,
                                  progress=progress, site_total_mean=self.run_site_total_mean(mask))

    # .. using it ..
    def kernels(self) -> list[torch.Tensor] | None:
        s = self.settings.smooth_fwhm_mm
        return gaussian_kernels(s, self.voxel_mm) if s > 0 else None

    def transform(self, grid: Sequence[int] | None = None) -> "NormaliseTransform":
        """The torch module that normalises raw store volumes (see :class:`NormaliseTransform`)."""
        return NormaliseTransform(self, grid)

    def density(self, z: np.ndarray, site_index: int) -> np.ndarray:
        """Normalised volume(s) ``z`` (..., X, Y, Z on the store grid) -> smoothed, TIV-scaled grey-matter density
        of site ``site_index`` (the units in which ``log(recon / twin)`` is a log density ratio)."""
        mean = self.site_mean[site_index] if self.site_mean is not None else 0.0
        return (np.asarray(z, np.float32) * np.float32(self.scale) + mean) * np.float32(self.site_gain[site_index])


class NormaliseTransform(nn.Module):
    """Raw store volumes -> normalised model input, on whatever device the batch lives on.

    ``forward(x, factor, site_index)`` with ``x`` (N, 1, X, Y, Z) raw mwp1 on the store grid, ``factor`` (N,)
    from :attr:`Normaliser.factor` and ``site_index`` (N,) returns ``(smooth(x) * factor - site_mean) / scale``,
    resampled to ``grid`` when given. The statistics are buffers (they move with ``.to(device)``).
    """

    def __init__(self, normaliser: Normaliser, grid: Sequence[int] | None = None) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        ks = normaliser.kernels() or []
        for a, k in enumerate(ks):
            self.register_buffer(f"kernel{a}", k)
        self.n_kernels = len(ks)
        mean = normaliser.site_mean
        self.register_buffer("site_mean", torch.from_numpy(mean)[:, None] if mean is not None else torch.zeros(0))
        self.scale = float(normaliser.scale)

    def forward(self, x: torch.Tensor, factor: torch.Tensor, site_index: torch.Tensor) -> torch.Tensor:
        x = x.float()
        ks = [getattr(self, f"kernel{a}") for a in range(self.n_kernels)]
        v = smooth(x, ks) * factor.to(x.device, torch.float32).view(-1, 1, 1, 1, 1)
        if self.site_mean.numel():
            v = v - self.site_mean[site_index.to(x.device).long()]
        v = v / self.scale
        if self.grid is not None and tuple(v.shape[-3:]) != self.grid:
            v = F.interpolate(v, size=self.grid, mode="trilinear", align_corners=False)
        return v


def model_inputs(run_dir: str | os.PathLike, store, cfg, rows: Sequence[int],
                 grid: Sequence[int] | None = None) -> torch.Tensor:
    """What a fold model of ``run_dir`` reads for the store ``rows``: (N, 1, *grid) float32.

    Normalised with the run's ``normalisation.h5`` when the run normalises its inputs (raw store volumes
    otherwise, e.g. the 2022 anchor's recipe), then resampled to ``grid`` (the model's) when it differs from the
    store's. This is exactly the trainer's input pipeline, for the analysis stages.
    """
    rows = [int(r) for r in rows]
    x = torch.from_numpy(np.stack([np.asarray(store.read(r), np.float32) for r in rows]))[:, None]
    settings = NormaliseSettings.from_config(cfg.data)
    if settings.active and cfg.model.name != "anchor2022":
        norm = Normaliser.load(Path(run_dir) / FILE)
        pos = {p: i for i, p in enumerate(norm.participant_id)}
        ids = [str(store.participant_ids[r]) for r in rows]
        missing = [p for p in ids if p not in pos]
        if missing:
            raise KeyError(f"{Path(run_dir) / FILE} has no statistics for {missing[:3]} (another store?)")
        idx = np.array([pos[p] for p in ids])
        with torch.no_grad():
            x = norm.transform(grid)(x, torch.from_numpy(norm.factor[idx]), torch.from_numpy(norm.site_index[idx]))
    elif grid is not None and tuple(x.shape[-3:]) != tuple(grid):
        x = F.interpolate(x, size=tuple(int(g) for g in grid), mode="trilinear", align_corners=False)
    return x


# -- the run's file ----------------------------------------------------------------------------------------------
def store_hash(store_path: str | os.PathLike) -> str:
    """sha256 of a store's ``manifest.json`` (the identity of its contents; :mod:`dist_decode.contracts.store`)."""
    return manifest_sha256(store_path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(run_dir: str | os.PathLike, store, settings: NormaliseSettings, progress: bool = True,
           like: tuple[Normaliser, np.ndarray] | None = None) -> Normaliser:
    """The run's normalisation statistics: read ``RUN/normalisation.h5``, or compute and write it once.

    Concurrent callers (fold jobs, ranks) serialise on a lock file; the first computes, the others read.

    Parameters
    ----------
    run_dir : path
        The directory of ``normalisation.h5`` (a run, or a ``dist_decode.apply`` output).
    like : (Normaliser, mask), optional
        A trained run's statistics and its store's brain mask: ``store`` is a new cohort, normalised in that run's
        units (:meth:`Normaliser.applied_to`).

    Raises
    ------
    ValueError
        When the existing file was made from another store, with other settings or (``like``) in other units
        (naming both).
    """
    path = Path(run_dir) / FILE
    with _locked(Path(run_dir) / f".{FILE}.lock"):
        if path.is_file():
            norm = Normaliser.load(path)
            _check(norm, path, store, settings)
            if like is not None and (norm.reference, norm.scale) != (like[0].reference, like[0].scale):
                raise ValueError(f"{path} was computed in other units (reference {norm.reference:.6g}, scale "
                                 f"{norm.scale:.6g}) than the run's ({like[0].reference:.6g}, {like[0].scale:.6g}); "
                                 "use a new output directory")
            return norm
        t0 = time.perf_counter()
        if like is None:
            norm = Normaliser.compute(store, settings, progress=progress)
        else:
            norm = like[0].applied_to(store, like[1], progress=progress)
        norm.save(path)
        log.info("normalisation statistics of %d subjects at %d sites -> %s (%.1f s)", store.n, len(norm.sites),
                 path, time.perf_counter() - t0)
        return norm


def _check(norm: Normaliser, path: Path, store, settings: NormaliseSettings) -> None:
    if norm.settings != settings:
        raise ValueError(f"{path} was computed with {norm.settings.to_dict()}, the config asks for "
                         f"{settings.to_dict()}; use a new run directory")
    h = store_hash(store.path)
    if norm.store_hash != h:
        raise ValueError(f"{path} belongs to another store (manifest sha256 {norm.store_hash[:12]}, "
                         f"{store.path} has {h[:12]}); use a new run directory")
