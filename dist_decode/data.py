"""Read a packed store (``data_prep.pack``): LOSO folds, a lazy torch Dataset, balanced batches.

::

    store = Store.open("STORE")
    split = loso_split(store, fold=0)                  # site store.sites[0] held out
    ds = VolumeDataset(store.path, split.train)        # picklable; opens HDF5 lazily per worker
    sampler = BalancedBatchSampler(ds.is_patient, batch_size=8, seed=1, rank=r, world_size=w)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2)

HDF5 handles are never shared across processes: every process (DataLoader worker, MPI rank)
opens the shards itself on first read, and a handle inherited through ``fork`` is dropped.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter with h5py)
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.affines import voxel_sizes

from dist_decode.contracts import store as store_contract



class Store:
    """A packed store of mwp1 volumes (read-only).

    Use :meth:`Store.open`. Global row order: shards in manifest order, rows in shard order.

    Attributes
    ----------
    path : Path
        The store folder.
    manifest : dict
        ``manifest.json``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._mask: np.ndarray | None = None
        self._load_index()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Open a store from its folder (or its ``manifest.json``).

        Raises
        ------
        FileNotFoundError
            No manifest, or a shard listed in it is missing.
        ValueError
            The manifest is not valid JSON, lacks a required key, or has another schema version.
        """
        manifest = store_contract.read_manifest(path)
        path = store_contract.manifest_path(path).parent
        for s in manifest["shards"]:
            if not (path / s["file"]).is_file():
                raise FileNotFoundError(f"store {path}: shard {s['file']} listed in the manifest is missing")
        return cls(path.resolve(), manifest)

    def _load_index(self) -> None:
        columns = self.manifest["columns"]
        parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
        ids, shard_of, row_of = [], [], []
        for k, s in enumerate(self.manifest["shards"]):
            path = self.path / s["file"]
            try:
                with h5py.File(path, "r") as h5:
                    n = int(h5["volumes"].shape[0])
                    if n != int(s["n"]):
                        raise ValueError(f"store {self.path}: shard {s['file']} has {n} volumes, manifest says {s['n']}")
                    ids.append(h5["participant_id"].asstr()[...])
                    for col, kind in columns.items():
                        ds = h5[col]
                        parts[col].append(ds.asstr()[...] if kind == "text" else ds[...].astype(np.float64))
            except (OSError, KeyError) as exc:
                raise ValueError(f"store {self.path}: cannot read shard {s['file']}: {exc}") from exc
            shard_of.append(np.full(n, k, np.int32))
            row_of.append(np.arange(n, dtype=np.int64))
        self._ids = np.concatenate(ids).astype(str) if ids else np.zeros(0, str)
        self._shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self._row_of = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)
        self._pheno = {
            c: (np.concatenate(v).astype(str) if columns[c] == "text" else np.concatenate(v)) for c, v in parts.items()
        }
        labels = self.manifest["labels"]
        self._is_patient = self._pheno[labels.get("diagnosis_column", "diagnosis")] == labels["patient"]
        self._site_of = self._pheno[labels.get("site_column", "site")].astype(str)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        """Sites in LOSO fold order (fold k holds out ``sites[k]``)."""
        return list(self.manifest["sites"])

    @property
    def n(self) -> int:
        """Number of subjects."""
        return int(self._ids.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Volume shape (X, Y, Z)."""
        return tuple(int(v) for v in self.manifest["grid"]["shape"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-MNI affine (4, 4)."""
        return np.asarray(self.manifest["grid"]["affine"], dtype=np.float64)

    @property
    def voxel_mm(self) -> float:
        """Voxel size in mm."""
        return float(self.manifest["grid"]["voxel_mm"])

    @property
    def mask(self) -> np.ndarray:
        """Brain mask of the store's grid, bool (X, Y, Z)."""
        if self._mask is None:
            mfile = self.manifest.get("mask", {}).get("file", "mask.nii.gz")
            self._mask = np.asarray(nib.load(str(self.path / mfile)).dataobj) > 0
        return self._mask

    @property
    def participant_ids(self) -> np.ndarray:
        """Participant ids in global row order (str array)."""
        return self._ids

    @property
    def phenotypes(self) -> dict[str, np.ndarray]:
        """Every participants.tsv column (+ tiv_ml, iqr), row-aligned: float64 (NaN = n/a) or str."""
        return self._pheno

    @property
    def is_patient(self) -> np.ndarray:
        """True for patients (bool, global row order)."""
        return self._is_patient

    @property
    def site_of(self) -> np.ndarray:
        """Site of each subject (str, global row order)."""
        return self._site_of

    @property
    def ineligible(self) -> dict[str, str]:
        """Site -> reason, for the sites that cannot be held out (they train every fold)."""
        return store_contract.ineligible_sites(self.manifest)

    @property
    def fold_sites(self) -> list[str]:
        """The sites that are LOSO folds, in fold order."""
        return store_contract.fold_sites(self.manifest)

    @property
    def ground_truth(self) -> Path | None:
        """The synthetic cohort's ground-truth folder, or None (real data)."""
        gt = self.manifest.get("ground_truth")
        return Path(gt) if gt else None

    @property
    def patient_label(self) -> str:
        """Diagnosis value of patients."""
        return str(self.manifest["labels"]["patient"])

    @property
    def control_label(self) -> str:
        """Diagnosis value of controls."""
        return str(self.manifest["labels"]["control"])

    def index_of(self, participant_id: str) -> int:
        """Global index of a participant (KeyError naming it when absent)."""
        hits = np.flatnonzero(self._ids == participant_id)
        if hits.size == 0:
            raise KeyError(f"participant {participant_id!r} is not in store {self.path}")
        return int(hits[0])

    # -- volumes -------------------------------------------------------------------------------
    def _entry(self, k: int):
        if os.getpid() != self._pid:  # forked: never use the parent's HDF5 handles
            self._handles = {}
            self._pid = os.getpid()
        entry = self._handles.get(k)
        if entry is None:
            h5 = h5py.File(self.path / self.manifest["shards"][k]["file"], "r")
            entry = self._handles[k] = (h5, h5["volumes"])  # the dataset is cached: a lookup costs ~30 us
        return entry

    def read(self, i: int) -> np.ndarray:
        """Return volume ``i`` (global index) as float32 (X, Y, Z).

        Raises
        ------
        IndexError
            Naming the index and the valid range.
        """
        out = self.read_raw(i)
        if out.dtype == np.float32:
            return out
        # torch's vectorised half->float conversion is ~4x faster than numpy's astype.
        return torch.from_numpy(out).float().numpy()

    def read_raw(self, i: int) -> np.ndarray:
        """Return volume ``i`` in its stored dtype (float16 stores: cast on the device instead)."""
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"volume index {i} out of range 0..{self.n - 1} of store {self.path}")
        _, dset = self._entry(int(self._shard_of[i]))
        return dset[int(self._row_of[i])]

    def close(self) -> None:
        """Close the HDF5 handles this process opened."""
        if os.getpid() == self._pid:
            for h5, *_ in self._handles.values():
                try:
                    h5.close()
                except Exception:
                    pass
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, n={self.n}, sites={self.sites}, grid={self.grid_shape})"


# ---------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldSplit:
    """Global indices of one LOSO fold.

    Attributes
    ----------
    fold : int
    site : str
        The held-out (test) site.
    train, val, test : ndarray of int
        Sorted global indices; test is the whole held-out site.
    """

    fold: int
    site: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def loso_split(store: Store, fold: int, val_fraction: float = 0.15, seed: int = 0) -> FoldSplit:
    """Leave-one-site-out fold ``fold``: test = site ``store.sites[fold]``; the other sites are
    split into train/validation stratified by site and diagnosis.

    For each diagnosis, ``round(val_fraction * n)`` subjects (at least one when ``val_fraction > 0``
    and the group has two or more) go to validation, allocated to sites in proportion to their
    size (largest remainder, ties broken by the seed), then drawn at random within each stratum.

    Raises
    ------
    ValueError
        ``fold`` out of range (naming the range), the held-out site lacks patients or controls
        (naming the site), or ``val_fraction`` not in [0, 1).
    """
    sites = store.sites
    if not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < len(sites):
        raise ValueError(f"fold {fold!r} out of range: store {store.path} has folds 0..{len(sites) - 1} ({len(sites)} sites)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    fold = int(fold)
    site = sites[fold]
    if site in store.ineligible:
        raise ValueError(f"fold {fold}: site {site!r} cannot be a LOSO test site: {store.ineligible[site]}")
    test_mask = store.site_of == site
    if not (store.is_patient[test_mask].any() and (~store.is_patient[test_mask]).any()):
        raise ValueError(f"fold {fold}: site {site!r} cannot be a LOSO test site: it lacks patients or controls")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(fold,)))
    val: list[np.ndarray] = []
    train_sites = [s for s in sites if s != site]
    for group in (True, False):
        strata = [np.flatnonzero((store.site_of == s) & (store.is_patient == group)) for s in train_sites]
        sizes = np.array([len(x) for x in strata], float)
        total = int(sizes.sum())
        want = int(round(val_fraction * total))
        if val_fraction > 0 and total >= 2:
            want = max(want, 1)
        quota = val_fraction * sizes if total == 0 else want * sizes / total
        take = np.floor(quota).astype(int)
        rest = want - int(take.sum())
        if rest > 0:
            # Largest remainder; random tie-break so no site is favoured systematically.
            order = np.lexsort((rng.random(len(sizes)), -(quota - take)))
            for j in order[:rest]:
                take[j] += 1
        for members, k in zip(strata, take):
            if k > 0:
                val.append(rng.choice(members, size=min(int(k), len(members)), replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.flatnonzero(~test_mask), val_idx)
    return FoldSplit(fold, site, train_idx.astype(np.int64), val_idx.astype(np.int64),
                     np.flatnonzero(test_mask).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Torch dataset, sampler, resampling
# ---------------------------------------------------------------------------------------------


def grid_voxel_mm(store: Store, grid: Sequence[int]) -> float:
    """Mean voxel size (mm) of ``grid`` spanning the store's field of view (the store's own when equal)."""
    vox = np.asarray(voxel_sizes(store.affine), float)
    return float(np.mean(vox * np.asarray(store.grid_shape, float) / np.asarray(grid, float)))


def resample_volume(vol, grid: Sequence[int]):
    """Trilinearly resample a volume to ``grid`` (corners aligned to the voxel grid's extent).

    Parameters
    ----------
    vol : ndarray or torch.Tensor
        (X, Y, Z), (C, X, Y, Z) or (N, C, X, Y, Z).
    grid : sequence of 3 int

    Returns
    -------
    Same type and number of dimensions as ``vol``, float32 (or the tensor's floating dtype).
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3:
        raise ValueError(f"grid must have 3 sizes, got {grid}")
    is_numpy = isinstance(vol, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)) if is_numpy else vol
    nd = t.dim()
    if nd not in (3, 4, 5):
        raise ValueError(f"expected a 3-, 4- or 5-D volume, got shape {tuple(t.shape)}")
    if tuple(t.shape[-3:]) == grid:
        return vol
    x = t.reshape((1,) * (5 - nd) + tuple(t.shape))
    if not x.is_floating_point():
        x = x.float()
    y = F.interpolate(x, size=grid, mode="trilinear", align_corners=False)
    y = y.reshape(tuple(t.shape[:-3]) + grid)
    return y.numpy() if is_numpy else y


class VolumeDataset:
    """A torch map-style Dataset of store volumes.

    Picklable and fork-safe: it holds only the store path and indices; each process opens the
    store (and its HDF5 shards) lazily on first access.

    Parameters
    ----------
    store_path : path or Store
        The store folder.
    indices : sequence of int
        Global indices; dataset position j is subject ``indices[j]``.
    grid : sequence of 3 int or None
        Resample every volume to this grid (trilinear); ``None`` keeps the store's grid.
    raw : bool
        Return ``x`` in the stored dtype (float16 for a float16 store, half the bytes through the
        DataLoader's shared memory; cast on the device) instead of float32. Ignored with ``grid``.

    Items are dicts ``{"x": float32 tensor (1, X, Y, Z), "patient": bool, "index": int}``.
    """

    def __init__(self, store_path: str | os.PathLike | Store, indices: Sequence[int], grid: Sequence[int] | None = None,
                 raw: bool = False):
        if isinstance(store_path, Store):
            store_path = store_path.path
        self.store_path = Path(store_path)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.grid = tuple(int(g) for g in grid) if grid is not None else None
        self.raw = bool(raw)
        self._store: Store | None = None
        self._pid = -1
        n = self.store.n
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"indices out of range 0..{n - 1} of store {self.store_path}")

    @property
    def store(self) -> Store:
        """This process's :class:`Store` (opened on first use, reopened after fork)."""
        if self._store is None or self._pid != os.getpid():
            self._store = Store.open(self.store_path)
            self._pid = os.getpid()
        return self._store

    @property
    def is_patient(self) -> np.ndarray:
        """Patient flag per dataset position (for :class:`BalancedBatchSampler`)."""
        return self.store.is_patient[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, j: int) -> dict[str, Any]:
        if not -len(self) <= int(j) < len(self):
            raise IndexError(f"dataset position {j} out of range 0..{len(self) - 1}")
        i = int(self.indices[int(j)])
        store = self.store
        if self.grid is not None:
            vol = resample_volume(store.read(i), self.grid)
        else:
            vol = store.read_raw(i) if self.raw else store.read(i)
        return {"x": torch.from_numpy(np.ascontiguousarray(vol))[None], "patient": bool(store.is_patient[i]), "index": i}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        state["_pid"] = -1
        return state


class BalancedBatchSampler:
    """Batches with half patients and half controls, reproducible from any step and world size.

    Step ``s`` draws a global batch of ``batch_size * world_size / 2`` patients and as many
    controls (without replacement within the step when the group is large enough) from
    ``np.random.default_rng(SeedSequence(seed, spawn_key=(s,)))``; rank ``r`` takes patients and
    controls ``[r*b/2, (r+1)*b/2)``. So a restart at ``start_step`` continues the same sequence and
    the global batch depends only on the global batch size, not on how it is split over ranks.

    Parameters
    ----------
    is_patient : array of bool
        Patient flag per dataset position.
    batch_size : int
        Positions per rank and step (even, >= 2).
    seed : int
    rank, world_size : int
    start_step : int
        First step to yield (resume from a checkpoint at this step).
    steps : int or None
        Number of batches to yield, steps ``start_step .. start_step + steps - 1``; ``None`` = one
        epoch of patients, ``ceil(n_patients / (global batch / 2))``. ``len(sampler) == steps``.
    """

    def __init__(self, is_patient, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, steps: int | None = None):
        flags = np.asarray(is_patient, dtype=bool).reshape(-1)
        self.patients = np.flatnonzero(flags)
        self.controls = np.flatnonzero(~flags)
        if self.patients.size == 0 or self.controls.size == 0:
            raise ValueError(
                f"a balanced batch needs patients and controls; got {self.patients.size} patients and "
                f"{self.controls.size} controls"
            )
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size {batch_size} must be even and >= 2 (half patients, half controls)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step {start_step} must be >= 0")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.start_step = int(start_step)
        half_global = self.batch_size * self.world_size // 2
        self.steps = int(steps) if steps is not None else math.ceil(self.patients.size / half_global)
        if self.steps < 0:
            raise ValueError(f"steps {steps} must be >= 0")

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (patients, controls) dataset positions of the global batch at ``step``."""
        half = self.batch_size * self.world_size // 2
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(step),)))
        p = rng.choice(self.patients, size=half, replace=half > self.patients.size)
        c = rng.choice(self.controls, size=half, replace=half > self.controls.size)
        return p, c

    def batch(self, step: int) -> list[int]:
        """Return this rank's positions at ``step`` (patients first, then controls)."""
        p, c = self.global_batch(step)
        h = self.batch_size // 2
        lo, hi = self.rank * h, (self.rank + 1) * h
        return [int(v) for v in p[lo:hi]] + [int(v) for v in c[lo:hi]]

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step, self.start_step + self.steps):
            yield self.batch(s)

    def __len__(self) -> int:
        return self.steps
