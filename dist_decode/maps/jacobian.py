"""Healthy-twin Jacobians: ANTsPy SyN from the twin to the reconstruction, and the log Jacobian determinant.

Convention (checked by ``tests/test_maps.py``): the twin is the *fixed* image and the reconstruction the *moving*
one, so the forward warp maps twin space onto patient space and its Jacobian determinant is
``volume(recon) / volume(twin)``: ``log J < 0`` where the patient has less tissue than their healthy twin
(atrophy), ``> 0`` where it has more. This is the sign of the planted ``specific_effect.nii.gz`` of synthetic
cohorts. (Registering recon as fixed, as in the 2022 anchor's notebook, gives the reciprocal, i.e. the opposite
sign.) The map lives on the twin's grid, which is the store's MNI grid.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes

from dist_decode.config import MapsConfig

# ITK reads this when its first filter is built: one thread per worker process, as the pool does the parallelism.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


_MAPS_DEFAULTS = MapsConfig()


@dataclass(frozen=True)
class SynSettings:
    """How one twin-to-recon registration is run.

    Parameters
    ----------
    transform : {"SyNOnly", "SyN"}
        ``SyNOnly`` starts from the identity (both images already share the MNI grid, and an affine stage would
        absorb global atrophy); ``SyN`` adds ANTs' default affine stage first.
    iterations : tuple of int
        SyN iterations per resolution level, coarse to fine (ANTsPy's ``reg_iterations``).
    metric : str
        SyN similarity metric (``mattes`` or ``CC``).
    flow_sigma, total_sigma : float
        Gaussian smoothing (voxels) of the SyN update field and of the total field (ANTs defaults 3 and 0).
    seed : int
        ITK's sampling seed; with one thread, the same seed gives the same map.
    """

    # Defaults come from MapsConfig so a direct call and a pipeline run register the same way.
    transform: str = _MAPS_DEFAULTS.syn_transform
    iterations: tuple[int, ...] = tuple(_MAPS_DEFAULTS.syn_iterations)
    metric: str = _MAPS_DEFAULTS.syn_metric
    flow_sigma: float = _MAPS_DEFAULTS.syn_flow_sigma
    total_sigma: float = _MAPS_DEFAULTS.syn_total_sigma
    seed: int = 0


def log_jacobian(twin: np.ndarray, recon: np.ndarray, affine: np.ndarray,
                 settings: SynSettings = SynSettings()) -> np.ndarray:
    """Log Jacobian determinant of the SyN deformation from ``twin`` to ``recon``.

    Parameters
    ----------
    twin, recon : ndarray, shape (X, Y, Z)
        Decoded healthy twin ``decoder([c, 0])`` and reconstruction ``decoder([c, s])`` on one grid.
    affine : ndarray, shape (4, 4)
        The grid's voxel-to-MNI affine; only the voxel sizes are used (a rotation or flip of the axes leaves
        the determinant unchanged).
    settings : SynSettings
        Registration settings.

    Returns
    -------
    ndarray, float32, shape (X, Y, Z)
        ``log(volume(recon) / volume(twin))`` per voxel of the twin grid.

    Raises
    ------
    ValueError
        When the two volumes differ in shape, are not 3-D, or are not finite.
    """
    import ants  # heavy import, only in the processes that register

    twin = np.ascontiguousarray(twin, dtype=np.float32)
    recon = np.ascontiguousarray(recon, dtype=np.float32)
    if twin.ndim != 3 or twin.shape != recon.shape:
        raise ValueError(f"twin {twin.shape} and recon {recon.shape} must be 3-D volumes of one shape")
    if not (np.isfinite(twin).all() and np.isfinite(recon).all()):
        raise ValueError("twin or recon contains NaN/inf values")
    spacing = tuple(float(v) for v in voxel_sizes(affine))
    fixed = ants.from_numpy(twin, spacing=spacing)
    moving = ants.from_numpy(recon, spacing=spacing)
    # ANTsPy writes its transforms to files; keep them in a private folder that is always removed.
    workdir = tempfile.mkdtemp(prefix="dd-syn-")
    try:
        kwargs = dict(
            fixed=fixed,
            moving=moving,
            type_of_transform=settings.transform,
            reg_iterations=tuple(settings.iterations),
            syn_metric=settings.metric,
            flow_sigma=float(settings.flow_sigma),
            total_sigma=float(settings.total_sigma),
            outprefix=str(Path(workdir) / "tx_"),
            random_seed=int(settings.seed),
        )
        if settings.transform == "SyNOnly":
            kwargs["initial_transform"] = "identity"
        reg = ants.registration(**kwargs)
        warp = next(t for t in reg["fwdtransforms"] if t.endswith(("Warp.nii.gz", "Warp.nii")))
        logj = ants.create_jacobian_determinant_image(fixed, warp, do_log=True).numpy()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return np.nan_to_num(logj.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
