"""The store grid: name the grids of a cohort's mwp1 files, choose one, resample subjects onto it.

Subjects processed with different CAT12 releases (bounding box 12 of 12.8+ vs the SPM box of 12.7) or output
resolutions (1 mm vs 1.5 mm) are put on one store grid:

* **Default** (``auto``): the CAT12 12.8+ grid (bounding box 12 at any isotropic voxel size; the most common such
  grid) when any packed subject is on one, else the most common grid.
* **Values.** ``mwp1`` is a density: millilitres of (modulated) grey matter per millilitre of voxel, so the total
  GM volume is ``sum x voxel volume``. A density is resampled as it is -- no factor for the change of voxel
  volume (that factor would be right for an amount per voxel and would scale the total GM by the ratio of the
  voxel volumes). Resampling is trilinear (``nibabel.processing.resample_from_to``, order 1: values stay >= 0
  and the background stays exactly 0); when the store voxel is larger along an axis, the map is first smoothed
  (``nibabel.processing.smooth_image``, FWHM ``sqrt(store^2 - source^2)`` mm) so that each store voxel
  averages its footprint instead of aliasing. The total GM volume is kept up to interpolation error, which the
  packer records per subject (``gm_ml_source``, ``gm_ml_store``); it is not renormalised.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep import anatomy

#: Two affines closer than this (mm, every element) are the same grid.
ATOL_MM = 1e-3
#: A subject of which less than this fraction of the grey matter lies inside the store grid is excluded.
MIN_GM_INSIDE = 0.99
#: Recorded in the plan hash: a change of the method rebuilds resampled shards.
METHOD = "nibabel.processing: smooth_image(FWHM sqrt(store^2 - source^2) where coarser) + resample_from_to(order=1)"


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape and affine. Grids compare by the affine rounded to :data:`ATOL_MM` (``affine_key``);
    ``affine`` is the exact affine of the file it was read from."""

    shape: tuple[int, ...]
    affine_key: tuple[float, ...]
    exact: tuple[float, ...] = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, shape: tuple[int, ...], affine: np.ndarray) -> Grid:
        """The grid of ``shape`` and a 4x4 ``affine``."""
        a = np.asarray(affine, np.float64).ravel()
        steps = np.round(a / ATOL_MM)
        return cls(tuple(int(s) for s in shape), tuple(round(float(v) * ATOL_MM, 6) + 0.0 for v in steps),
                   tuple(float(v) for v in a))

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 affine (float64)."""
        return np.asarray(self.exact, np.float64).reshape(4, 4)

    @property
    def voxel_mm(self) -> tuple[float, ...]:
        """Voxel size per axis (mm)."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))

    @property
    def voxel_ml(self) -> float:
        """Voxel volume in millilitres."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def cat12_box(self) -> str | None:
        """``"12.8"`` or ``"12.7"`` when this is a CAT12 output grid of that bounding box, else None."""
        vox = self.voxel_mm
        if len(self.shape) != 3 or max(vox) - min(vox) > ATOL_MM:
            return None
        for box in anatomy.BOXES:
            if Grid.of(*anatomy.cat12_grid(round(vox[0], 4), box)) == self:
                return box
        return None

    def describe(self) -> str:
        """E.g. ``113x137x113 at 1.5 mm (CAT12 12.8+ box)``."""
        vox = self.voxel_mm
        size = f"{vox[0]:g} mm" if max(vox) - min(vox) <= ATOL_MM else "x".join(f"{v:g}" for v in vox) + " mm"
        box = self.cat12_box()
        where = {"12.8": "CAT12 12.8+ box", "12.7": "CAT12 12.7 box"}.get(box or "", "origin " + ", ".join(
            f"{v:g}" for v in self.affine[:3, 3]))
        return f"{'x'.join(str(s) for s in self.shape)} at {size} ({where})"

    def to_json(self) -> dict:
        """``{"shape", "affine", "voxel_mm", "cat12_box", "description"}``."""
        return {"shape": list(self.shape), "affine": self.affine.tolist(), "voxel_mm": list(self.voxel_mm),
                "cat12_box": self.cat12_box(), "description": self.describe()}


def _most_common(grids: list[Grid]) -> Grid:
    """The most common grid (ties: the first seen)."""
    counts = Counter(grids)
    best = max(counts.values())
    return next(g for g in grids if counts[g] == best)


def choose(grids: dict[str, Grid], site_of: dict[str, str], spec: str = "auto") -> Grid:
    """Return the store grid.

    Parameters
    ----------
    grids : dict
        participant_id -> grid of the scan packed for that subject (in table order).
    site_of : dict
        participant_id -> site.
    spec : str
        ``auto`` (the rule in the module docstring); ``cat12`` / ``cat12:VOXEL_MM`` (the CAT12 12.8+ grid,
        default 1.5 mm: 113x137x113); ``cat12.7:VOXEL_MM`` (the 12.7 box); ``site:NAME`` (the most common grid
        of that site's subjects); or the path of a NIfTI whose grid to use.

    Raises
    ------
    ValueError
        An unknown site, a malformed voxel size, or a file that is not a 3-D NIfTI.
    """
    found = list(grids.values())
    if spec == "auto":
        cat12 = [g for g in found if g.cat12_box() == "12.8"]
        return _most_common(cat12 or found)
    for prefix, box in (("cat12.7", "12.7"), ("cat12", "12.8")):
        if spec == prefix or spec.startswith(prefix + ":"):
            text = spec[len(prefix) + 1:] or "1.5"
            try:
                vox = float(text)
                return Grid.of(*anatomy.cat12_grid(vox, box))
            except ValueError as exc:
                raise ValueError(f"--grid {spec}: {text!r} is not a positive voxel size in mm ({exc})") from None
    if spec.startswith("site:"):
        site = spec[5:]
        mine = [g for pid, g in grids.items() if site_of[pid] == site]
        if not mine:
            raise ValueError(f"--grid {spec}: no packed subject of site {site!r} (sites: "
                             f"{', '.join(sorted({site_of[p] for p in grids}))})")
        return _most_common(mine)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--grid {spec}: expected auto, cat12[:VOXEL_MM], cat12.7[:VOXEL_MM], site:NAME or an "
                         "existing NIfTI file")
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for files it cannot read
        raise ValueError(f"--grid {spec}: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"--grid {spec}: {path} is not a 3-D volume (shape {shape})")
    return Grid.of(shape, img.affine)


def table(grids: dict[str, Grid], site_of: dict[str, str]) -> list[tuple[Grid, dict[str, int]]]:
    """Every grid found with its sites and subject counts, most subjects first."""
    by_grid: dict[Grid, Counter] = {}
    for pid, g in grids.items():
        by_grid.setdefault(g, Counter())[site_of[pid]] += 1
    return sorted(((g, dict(c)) for g, c in by_grid.items()), key=lambda t: -sum(t[1].values()))


def listing(grids: dict[str, Grid], site_of: dict[str, str]) -> str:
    """One line per grid: ``29x35x29 at 6 mm (CAT12 12.8+ box): siteA (4), siteC (5)``."""
    return "; ".join(f"{g.describe()}: " + ", ".join(f"{s} ({n})" for s, n in sites.items())
                     for g, sites in table(grids, site_of))


def gm_ml(data: np.ndarray, grid: Grid) -> float:
    """Total grey matter (ml) of an mwp1 map: sum x voxel volume."""
    return float(np.sum(data, dtype=np.float64)) * grid.voxel_ml


def inside_fraction(data: np.ndarray, source: Grid, target: Grid) -> float:
    """Fraction of the map's total (grey matter) whose voxel centres lie inside the target grid's field of view."""
    idx = np.nonzero(data)
    total = float(np.sum(data[idx], dtype=np.float64))
    if total <= 0:
        return 1.0
    ijk = np.vstack([np.asarray(idx, np.float64), np.ones((1, len(idx[0])))])
    t = np.linalg.solve(target.affine, source.affine @ ijk)[:3]
    n = np.asarray(target.shape[:3], np.float64)[:, None]
    inside = ((t >= -0.5) & (t <= n - 0.5)).all(0)
    return float(np.sum(data[idx][inside], dtype=np.float64)) / total


def antialias_fwhm(source: Grid, target: Grid) -> np.ndarray:
    """Per source axis, the FWHM (mm) that widens a source voxel to the store voxel along that axis (0 if finer)."""
    a_src, a_tgt = source.affine[:3, :3], target.affine[:3, :3]
    src_vox = np.sqrt((a_src**2).sum(0))
    dirs = a_src / src_vox  # unit world direction of each source axis
    tgt_vox = 1.0 / np.linalg.norm(np.linalg.solve(a_tgt, dirs), axis=0)  # store voxel extent along each direction
    return np.sqrt(np.clip(tgt_vox**2 - src_vox**2, 0.0, None))


def resample(data: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Resample an mwp1 density map onto ``target`` (rule in the module docstring); float32."""
    import nibabel as nib
    from nibabel.processing import resample_from_to, smooth_image

    img = nib.Nifti1Image(np.asarray(data, np.float32), source.affine)
    fwhm = antialias_fwhm(source, target)
    if (fwhm > 1e-3).any():
        img = smooth_image(img, fwhm, mode="constant", cval=0.0)
    out = resample_from_to(img, (target.shape, target.affine), order=1, mode="constant", cval=0.0)
    return np.ascontiguousarray(np.asarray(out.dataobj, np.float32))
