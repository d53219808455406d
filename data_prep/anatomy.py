"""Grid, base anatomy and smooth deformation fields for the synthetic CAT12 cohort.

Everything here is deterministic: the CAT12 output grid for a voxel size, the real MNI152
grey-matter probability map bundled with nilearn resampled onto that grid, and analytic
displacement fields built from Gaussian potentials (``u = grad(phi)``), whose Jacobian
``I + Hessian(phi)`` is exact on any grid, however coarse.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: CAT12 >= 12.8 bounding box (``cat.extopts.bb = 12``), MNI millimetres, (min, max) per axis.
CAT12_BBOX = ((-84.0, 84.0), (-120.0, 84.0), (-72.0, 96.0))

#: The SPM bounding box CAT12 <= 12.7 wrote (``bb = 16``): 121x145x121 at 1.5 mm.
CAT12_BBOX_127 = ((-90.0, 90.0), (-126.0, 90.0), (-72.0, 108.0))

#: Bounding boxes by the CAT12 release that writes them.
BOXES = {"12.8": CAT12_BBOX, "12.7": CAT12_BBOX_127}

#: Total grey-matter volume (ml) of the base anatomy at the reference TIV.
BASE_GM_ML = 650.0

#: The reference TIV (ml) at which a subject's modulated GM equals the base anatomy.
REFERENCE_TIV_ML = 1500.0


def cat12_grid(voxel_mm: float, box: str = "12.8") -> tuple[tuple[int, int, int], np.ndarray]:
    """Return the shape and affine CAT12 writes at ``voxel_mm`` (LAS like CAT12).

    Parameters
    ----------
    voxel_mm : float
        Isotropic voxel size in millimetres (1.5 gives CAT12's 113x137x113 default grid).
    box : {"12.8", "12.7"}
        ``"12.8"``: bounding box 12 of CAT12 >= 12.8; ``"12.7"``: the SPM box of CAT12 <= 12.7 (121x145x121 at
        1.5 mm, affine ``[[-1.5,0,0,90],[0,1.5,0,-126],[0,0,1.5,-72]]``).

    Returns
    -------
    shape : tuple of int
        Voxels per axis: ``floor(extent / voxel_mm) + 1``.
    affine : ndarray, shape (4, 4)
        ``[[-v,0,0,84],[0,v,0,-120],[0,0,v,-72],[0,0,0,1]]``: the first axis runs right to left.
    """
    if not voxel_mm > 0:
        raise ValueError(f"voxel size must be positive, got {voxel_mm!r}")
    if box not in BOXES:
        raise ValueError(f"bounding box {box!r}: choose from {sorted(BOXES)}")
    bbox = BOXES[box]
    shape = tuple(int(np.floor((hi - lo) / voxel_mm + 1e-6)) + 1 for lo, hi in bbox)
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = (bbox[0][1], bbox[1][0], bbox[2][0])
    return shape, affine  # type: ignore[return-value]


def world_coords(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Return the MNI coordinates (mm) of every voxel centre, shape ``(3, X, Y, Z)`` float32."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ idx + affine[:3, 3:4]
    return xyz.reshape((3, *shape)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def base_gm(voxel_mm: float, box: str = "12.8") -> np.ndarray:
    """Return nilearn's MNI152 GM probability map on the CAT12 grid, scaled to :data:`BASE_GM_ML`.

    The 1 mm template is first smoothed with a Gaussian matched to the target voxel (so coarse
    grids average rather than alias), then sampled trilinearly at the grid's voxel centres.
    Values below 1e-3 are set to exactly 0, as CAT12's background is.

    Parameters
    ----------
    voxel_mm : float
        Target voxel size.
    box : {"12.8", "12.7"}
        Bounding box of the grid (:data:`BOXES`).

    Returns
    -------
    ndarray, float32, shape of :func:`cat12_grid`
        GM density (fraction of the voxel), read-only.
    """
    from nibabel.affines import voxel_sizes
    from nilearn.datasets import load_mni152_gm_template
    from scipy import ndimage

    shape, affine = cat12_grid(voxel_mm, box)
    img = load_mni152_gm_template(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    src_vox = voxel_sizes(img.affine)
    sigma = [max(voxel_mm**2 - v**2, 0.0) ** 0.5 / 2.3548 / v for v in src_vox]
    if max(sigma) > 0.3:
        data = ndimage.gaussian_filter(data, sigma, mode="constant")
    xyz = world_coords(shape, affine).reshape(3, -1).astype(np.float64)
    ijk = np.linalg.solve(img.affine, np.vstack([xyz, np.ones((1, xyz.shape[1]))]))[:3]
    out = ndimage.map_coordinates(data, ijk, order=1, mode="constant", cval=0.0).reshape(shape)
    out[out < 1e-3] = 0.0
    out *= BASE_GM_ML / (out.sum() * voxel_mm**3 / 1000.0)
    out = out.astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Blob:
    """A Gaussian potential ``phi = a * s^2 * exp(-|x-c|^2 / (2 s^2))`` in MNI millimetres.

    Its displacement ``grad(phi)`` points towards the centre for ``a > 0``; the Jacobian
    determinant at the centre is ``(1 - a)^3``, so ``a > 0`` is local atrophy (log J ~ -3a).
    """

    center: tuple[float, float, float]
    sigma: float
    amplitude: float
    name: str = ""


#: Anatomically plausible schizophrenia regions (MNI mm): bilateral superior temporal gyrus,
#: insula, thalamus, and medial prefrontal / anterior cingulate cortex, with their Gaussian widths.
SZ_REGIONS: tuple[Blob, ...] = (
    Blob((-56.0, -18.0, 4.0), 10.0, 1.0, "left superior temporal gyrus"),
    Blob((58.0, -16.0, 4.0), 10.0, 1.0, "right superior temporal gyrus"),
    Blob((-38.0, 4.0, 2.0), 8.0, 1.0, "left insula"),
    Blob((40.0, 6.0, 0.0), 8.0, 1.0, "right insula"),
    Blob((0.0, 44.0, 14.0), 11.0, 1.0, "medial prefrontal cortex"),
    Blob((0.0, 30.0, 22.0), 9.0, 1.0, "anterior cingulate cortex"),
    Blob((-10.0, -18.0, 8.0), 6.0, 1.0, "left thalamus"),
    Blob((10.0, -18.0, 8.0), 6.0, 1.0, "right thalamus"),
)

#: Age-related atrophy: frontal and temporal cortex, hippocampi, periventricular tissue.
AGE_REGIONS: tuple[Blob, ...] = (
    Blob((-30.0, 30.0, 30.0), 18.0, 1.0, "left dorsolateral prefrontal"),
    Blob((30.0, 30.0, 30.0), 18.0, 1.0, "right dorsolateral prefrontal"),
    Blob((-26.0, -22.0, -14.0), 10.0, 1.0, "left hippocampus"),
    Blob((26.0, -22.0, -14.0), 10.0, 1.0, "right hippocampus"),
    Blob((0.0, -10.0, 18.0), 14.0, 1.0, "periventricular"),
)


@dataclass
class DeformationBasis:
    """Displacement and Hessian fields of one unit-amplitude effect, sampled on a grid (float32).

    Attributes
    ----------
    disp : ndarray, shape (3, X, Y, Z)
        Displacement in MNI mm at unit score.
    hess : ndarray, shape (6, X, Y, Z)
        The displacement gradient (symmetric: xx, yy, zz, xy, xz, yz) at unit score.
    """

    disp: np.ndarray
    hess: np.ndarray

    def log_jacobian(self, score: float = 1.0) -> np.ndarray:
        """Return log det(I + score * grad u) of this effect alone (float32)."""
        return np.log(np.clip(jacobian_det(score * self.hess), 1e-6, None)).astype(np.float32)

    log_effect = log_jacobian  # the planted effect in the common unit of a log ratio of tissue


@dataclass
class DensityBasis:
    """A grey-matter density change in place (no displacement), at unit score.

    Attributes
    ----------
    log_density : ndarray, shape (X, Y, Z)
        ``log(mwp1 after / mwp1 before)`` at unit score (negative = loss).
    """

    log_density: np.ndarray

    def log_effect(self, score: float = 1.0) -> np.ndarray:
        """Return the log density ratio of this effect at ``score`` (float32)."""
        return (np.float32(score) * self.log_density).astype(np.float32)


def density_basis(blobs: tuple[Blob, ...] | list[Blob], xyz: np.ndarray, log_peak: float) -> DensityBasis:
    """Sum of unit-peak Gaussians ``amp * exp(-|x - c|^2 / (2 sigma^2))`` times ``log_peak`` (a log density ratio)."""
    out = np.zeros(xyz.shape[1:], np.float32)
    for b in blobs:
        d = xyz - np.asarray(b.center, np.float32)[:, None, None, None]
        out += np.float32(log_peak * b.amplitude) * np.exp(-(d**2).sum(0) / (2.0 * b.sigma**2)).astype(np.float32)
    return DensityBasis(out)


def random_region_names():
    """A function naming an MNI point by its hemisphere and lobe-level position (for random regions)."""

    def name(c) -> str:
        x, y, z = (float(v) for v in c)
        side = "left" if x < -2 else "right" if x > 2 else "midline"
        ap = "frontal" if y > 0 else "parietal" if y > -60 and z > 20 else "temporal" if y > -60 else "occipital"
        return f"{side} {ap}"

    return name


def blob_basis(blobs: tuple[Blob, ...] | list[Blob], xyz: np.ndarray, log_j_peak: float) -> DeformationBasis:
    """Sum the displacement/Hessian fields of ``blobs`` on the coordinates ``xyz`` (3, X, Y, Z).

    Each blob's amplitude is rescaled so that, alone, it produces ``log_j_peak * blob.amplitude``
    at its centre (``a = 1 - exp(log_j_peak * amp / 3)``), i.e. negative = atrophy.
    """
    disp = np.zeros(xyz.shape, np.float32)
    hess = np.zeros((6, *xyz.shape[1:]), np.float32)
    for b in blobs:
        a = float(-np.expm1(log_j_peak * b.amplitude / 3.0))
        d = xyz - np.asarray(b.center, np.float32)[:, None, None, None]
        r2 = (d**2).sum(0)
        e = np.exp(-r2 / (2.0 * b.sigma**2)).astype(np.float32)
        # phi = a s^2 e  ->  grad phi = -a d e ;  Hess phi = a e (d d^T / s^2 - I)
        disp -= a * d * e
        s2 = b.sigma**2
        hess[0] += a * e * (d[0] * d[0] / s2 - 1.0)
        hess[1] += a * e * (d[1] * d[1] / s2 - 1.0)
        hess[2] += a * e * (d[2] * d[2] / s2 - 1.0)
        hess[3] += a * e * d[0] * d[1] / s2
        hess[4] += a * e * d[0] * d[2] / s2
        hess[5] += a * e * d[1] * d[2] / s2
    return DeformationBasis(disp, hess)


def jacobian_det(hess: np.ndarray) -> np.ndarray:
    """Return det(I + H) for symmetric H given as (xx, yy, zz, xy, xz, yz) fields."""
    a, b, c = 1.0 + hess[0], 1.0 + hess[1], 1.0 + hess[2]
    d, e, f = hess[3], hess[4], hess[5]
    return a * (b * c - f * f) - d * (d * c - f * e) + e * (d * f - b * e)


def random_blobs(rng: np.random.Generator, n: int, brain_xyz: np.ndarray, sigma_range=(14.0, 26.0)) -> list[Blob]:
    """Draw ``n`` blobs centred on random brain voxels with random widths and signs."""
    pick = rng.choice(brain_xyz.shape[1], size=n, replace=False)
    blobs = []
    for j in pick:
        blobs.append(
            Blob(
                tuple(float(v) for v in brain_xyz[:, j]),
                float(rng.uniform(*sigma_range)),
                float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)),
            )
        )
    return blobs


def region_mask(blobs: tuple[Blob, ...], xyz: np.ndarray) -> np.ndarray:
    """Return the union of the cores of ``blobs`` (``|x - c| <= sigma``, where log J is at least 40 % of
    its peak; the contraction fades to zero at ``sqrt(3) * sigma``)."""
    mask = np.zeros(xyz.shape[1:], bool)
    for b in blobs:
        d = xyz - np.asarray(b.center, np.float32)[:, None, None, None]
        mask |= (d**2).sum(0) <= b.sigma**2
    return mask
