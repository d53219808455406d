"""Per-site group maps of schizophrenia-specific variation: a voxelwise one-sample test of log J.

For the held-out patients of one site, each voxel's log Jacobians are tested against 0 (no difference between
patient and healthy twin) with a one-sample t-test. Two error-controlled thresholds are offered:

``fdr``
    Benjamini-Hochberg false-discovery rate at ``q`` over the in-mask voxels, two-sided parametric p-values.
``fwe``
    Family-wise error by sign-flipping permutations with the maximum |t| statistic (Nichols & Holmes 2002):
    under H0 (log J symmetric about 0) each patient's map may be negated; the ``1 - alpha`` quantile of the
    maximum |t| over voxels is the threshold. Exact for any spatial correlation, and needs no Gaussian data.
    With ``variance_fwhm_mm`` the statistic is SnPM's pseudo-t, whose variance is smoothed over neighbouring
    voxels (in the observed data and in every permutation alike): with the 7-15 patients of one held-out site,
    a plain t's maximum over tens of thousands of voxels is dominated by voxels whose variance happens to be
    tiny, and the FWE threshold climbs out of reach (docs/science.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage, stats

from dist_decode.normalise import gaussian_kernels, smooth


@dataclass
class GroupMap:
    """Result of one site's test; every array is a full grid volume (zero outside the mask).

    Attributes
    ----------
    n : int
        Patients in the test.
    mean : ndarray
        Mean log J.
    t : ndarray
        One-sample t statistic.
    p : ndarray
        Two-sided p-value (parametric for ``fdr``, permutation maxT-adjusted for ``fwe``); 1 outside the mask.
    signed : ndarray
        ``t`` where significant, else 0 (negative = atrophy relative to the twin).
    binary : ndarray of uint8
        1 where significant.
    se : ndarray
        The standard error of the mean that ``t`` divides by (from the smoothed variance for the pseudo-t).
    info : dict
        Method, level, the |t| threshold actually applied, number of significant voxels.
    """

    n: int
    mean: np.ndarray
    t: np.ndarray
    p: np.ndarray
    signed: np.ndarray
    binary: np.ndarray
    se: np.ndarray
    info: dict = field(default_factory=dict)


def one_sample_t(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and one-sample t statistic (against 0) of each column of ``data`` (n, V); t = 0 where sd = 0."""
    n = data.shape[0]
    mean = data.mean(axis=0)
    sd = data.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, mean / (sd / np.sqrt(n)), 0.0)
    return mean, t


def fdr_bh(p: np.ndarray, q: float) -> tuple[np.ndarray, float]:
    """Benjamini-Hochberg: which p-values are discoveries at FDR ``q`` (scipy's adjusted p-values <= q), and the
    largest discovered p-value (0 if none)."""
    p = np.asarray(p, float)
    if p.size == 0:
        return np.zeros(0, bool), 0.0
    sig = stats.false_discovery_control(p, method="bh") <= q
    return sig, float(p[sig].max()) if sig.any() else 0.0


class VarianceSmoother:
    """Gaussian smoothing of per-voxel values inside a mask, normalised at the mask's edge (SnPM).

    ``smoother(values)`` with ``values`` (k, V) over the mask voxels returns the smoothed (k, V).
    """

    def __init__(self, mask: np.ndarray, fwhm_mm: float, voxel_mm) -> None:
        self.mask = np.asarray(mask, bool)
        self.index = torch.from_numpy(np.flatnonzero(self.mask))
        self.kernels = gaussian_kernels(fwhm_mm, voxel_mm)
        weight = smooth(torch.from_numpy(self.mask.astype(np.float32))[None, None], self.kernels)
        self.weight = weight.flatten()[self.index].clamp_min(1e-6)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.asarray(values, np.float32))
        vol = torch.zeros((v.shape[0], self.mask.size), dtype=torch.float32)
        vol[:, self.index] = v
        out = smooth(vol.view((v.shape[0], 1) + self.mask.shape), self.kernels).flatten(1)[:, self.index]
        return (out / self.weight).double().numpy()


def _t(mean: np.ndarray, var: np.ndarray, n: int, smoother: VarianceSmoother | None) -> np.ndarray:
    """(pseudo-)t of means and variances (k, V); 0 where the variance is 0."""
    return _t_se(mean, var, n, smoother)[0]


def _t_se(mean: np.ndarray, var: np.ndarray, n: int,
          smoother: VarianceSmoother | None) -> tuple[np.ndarray, np.ndarray]:
    """(pseudo-)t of means and variances (k, V), and the standard errors it divides by; t = 0 where the
    variance is 0."""
    if smoother is not None:
        var = smoother(var)
    se = np.sqrt(np.maximum(var, 0) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, mean / se, 0.0), se


def signflip_maxt(data: np.ndarray, permutations: int, rng: np.random.Generator,
                  chunk: int = 64, smoother: VarianceSmoother | None = None) -> np.ndarray:
    """Null distribution of max |t| over voxels under random sign flips of the subjects' maps.

    The sum of squares of each voxel does not change under sign flips, so each permutation only needs the
    flipped means: ``B x n`` sign matrix times the ``n x V`` data, in chunks to bound memory. With a
    ``smoother`` the statistic is the pseudo-t of the smoothed variance (smoothed in every permutation).

    Returns
    -------
    ndarray, shape (permutations,) or (2**n,)
        The first entry is the unflipped data (the observed statistic belongs to its own null). When
        ``2**n <= permutations`` all sign patterns are enumerated once (exact test).
    """
    n = data.shape[0]
    data = np.asarray(data, dtype=np.float64)  # no copy of a float64 matrix (the maps stage passes one)
    ss = (data ** 2).sum(axis=0)
    if 2 ** n <= permutations:
        # Few subjects: enumerate every sign pattern (an exact test) instead of sampling.
        codes = np.arange(2 ** n)
        signs = np.where((codes[:, None] >> np.arange(n)[None, :]) & 1, -1.0, 1.0)  # code 0 = identity
    else:
        signs = rng.choice(np.array([-1.0, 1.0]), size=(permutations, n))
        signs[0] = 1.0
    permutations = signs.shape[0]
    out = np.empty(permutations)
    for start in range(0, permutations, chunk):
        s = signs[start:start + chunk]
        mean = s @ data / n
        var = (ss[None, :] - n * mean ** 2) / (n - 1)
        out[start:start + chunk] = np.abs(_t(mean, var, n, smoother)).max(axis=1)
    return out


def smooth_maps(maps: np.ndarray, fwhm_mm: float, voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """Gaussian smoothing of each (X, Y, Z) map of a stack (n, X, Y, Z); ``fwhm_mm <= 0`` returns the input."""
    if fwhm_mm <= 0:
        return maps
    sigma = [fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / v for v in voxel_mm]
    return np.stack([ndimage.gaussian_filter(m, sigma) for m in maps]).astype(np.float32)


def site_group_map(logj: np.ndarray, mask: np.ndarray, method: str = "fdr", level: float = 0.05,
                   permutations: int = 1000, rng: np.random.Generator | None = None,
                   variance_fwhm_mm: float = 0.0, voxel_mm=(1.0, 1.0, 1.0)) -> GroupMap:
    """Voxelwise one-sample test of log J across one site's patients, thresholded with error control.

    Parameters
    ----------
    logj : ndarray, shape (n, X, Y, Z)
        The patients' log Jacobian maps.
    mask : ndarray, shape (X, Y, Z)
        Voxels to test (non-zero = inside).
    method : {"fdr", "fwe"}
        Benjamini-Hochberg FDR on parametric p-values, or sign-flip permutation maxT FWE.
    level : float
        q for ``fdr``, alpha for ``fwe``.
    permutations : int
        Sign-flip permutations for ``fwe``.
    rng : numpy Generator
        Source of the sign flips (required for ``fwe``).
    variance_fwhm_mm : float
        ``fwe`` only: smooth the variance with this FWHM (mm) into SnPM's pseudo-t (0 = a plain t).
    voxel_mm : tuple of float
        Voxel sizes of the grid (for ``variance_fwhm_mm``).

    Raises
    ------
    ValueError
        Fewer than 3 maps, a shape mismatch, an unknown method or a level outside (0, 1).
    """
    logj = np.asarray(logj, np.float32)
    mask = np.asarray(mask) > 0
    if logj.ndim != 4 or logj.shape[1:] != mask.shape:
        raise ValueError(f"log J stack {logj.shape} does not match mask {mask.shape}")
    return site_group_test(logj[:, mask], mask, method, level, permutations, rng, variance_fwhm_mm, voxel_mm)


def site_group_test(x: np.ndarray, mask: np.ndarray, method: str = "fdr", level: float = 0.05,
                    permutations: int = 1000, rng: np.random.Generator | None = None,
                    variance_fwhm_mm: float = 0.0, voxel_mm=(1.0, 1.0, 1.0)) -> GroupMap:
    """:func:`site_group_map` on the in-mask values only: ``x`` (n, V) holds each patient's map at the ``mask``
    voxels (in ``np.flatnonzero`` order).

    The maps stage builds ``x`` one subject map at a time (:func:`dist_decode.maps.pipeline.site_test_input`), so
    its memory is one (n, V) float64 matrix (the sign-flip test needs every patient's values at once) instead of
    full-grid stacks. Same parameters, errors and result as :func:`site_group_map`.
    """
    mask = np.asarray(mask) > 0
    # one float64 copy serves the t statistic and the permutations (no copy when x is float64 already)
    xd = np.asarray(x, dtype=np.float64)
    if xd.ndim != 2 or xd.shape[1] != int(mask.sum()):
        raise ValueError(f"in-mask values {xd.shape} do not match the mask's {int(mask.sum())} voxels")
    n = xd.shape[0]
    if n < 3:
        raise ValueError(f"a one-sample test needs at least 3 patients, got {n}")
    if method not in ("fdr", "fwe"):
        raise ValueError(f"unknown threshold method {method!r}; use 'fdr' or 'fwe'")
    if not 0 < level < 1:
        raise ValueError(f"threshold level must lie in (0, 1), got {level}")
    mean, t = one_sample_t(xd)
    var = xd.var(axis=0, ddof=1)
    se = np.sqrt(var / n)
    info: dict = {"method": method, "level": level, "n": n, "voxels_tested": int(mask.sum())}
    smoother = None
    if method == "fwe" and variance_fwhm_mm > 0:
        smoother = VarianceSmoother(mask, variance_fwhm_mm, voxel_mm)
        t, se = (v[0] for v in _t_se(mean[None], var[None], n, smoother))
        info["variance_smoothing_mm"] = float(variance_fwhm_mm)
    if method == "fdr":
        p = 2.0 * stats.t.sf(np.abs(t), df=n - 1)
        sig, pcut = fdr_bh(p, level)
        info["p_threshold"] = pcut
        info["t_threshold"] = float(np.abs(t[sig]).min()) if sig.any() else None
    else:
        if rng is None:
            raise ValueError("method 'fwe' needs a random generator for the sign flips")
        if 2 ** n < 40:
            # With so few sign patterns the smallest attainable p-value is 2 / 2**n (t and -t tie in |t|).
            info["warning"] = f"only {2 ** n} sign patterns with n={n}; the smallest FWE p is {2 / 2 ** n:.3g}"
        null = signflip_maxt(xd, permutations, rng, smoother=smoother)
        b = null.size
        tcut = float(np.quantile(null, 1.0 - level, method="higher"))
        # The null holds the identity flip, so #(null >= |t|) / B is a valid p-value (never 0).
        ranked = np.sort(null)
        p = (b - np.searchsorted(ranked, np.abs(t), side="left")) / b
        p = np.maximum(p, 1.0 / b)
        sig = np.abs(t) > tcut
        info.update(permutations=b, exact=bool(b == 2 ** n), t_threshold=tcut)
    info["n_significant"] = int(sig.sum())
    info["n_negative"] = int((sig & (t < 0)).sum())
    info["n_positive"] = int((sig & (t > 0)).sum())

    def full(values: np.ndarray, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
        vol = np.full(mask.shape, fill, dtype=dtype)
        vol[mask] = values
        return vol

    return GroupMap(
        n=n,
        mean=full(mean),
        t=full(t),
        p=full(p, fill=1.0),
        signed=full(np.where(sig, t, 0.0)),
        binary=full(sig, dtype=np.uint8),
        se=full(se),
        info=info,
    )


#: Highest cut of an unsmoothed extent: a cluster no wider than the smoothing keeps the top of its peak.
UNSMOOTHED_MAX_CUT = 0.9
#: A displacement's counter-ring: within this many FWHMs of the smoothing around a cluster, ...
RING_FWHMS = 1.5
#: ... opposite-signed mass of at least this share of the cluster's own sign (chosen on the seven planted cohorts
#: of docs/science.md: 77-96 % of the size-weighted loss clusters of the shape cohorts have one, 0-5 % of the
#: density cohorts').
RING_SHARE = 0.05
#: With the tested mean's standard error known, opposite-signed values count only beyond this many of them.
RING_NOISE_SE = 1.0


def counter_ring_share(labels: np.ndarray, n: int, directed: np.ndarray, radius_mm: float,
                       voxel_mm=(1.0, 1.0, 1.0), se: np.ndarray | None = None) -> np.ndarray:
    """For each cluster ``1..n`` of ``labels``: the opposite-signed mass of ``directed`` (the map times the
    cluster's sign) within ``radius_mm`` of the cluster, over its same-signed mass there (n,).

    A modulated map keeps the mass a displacement moves: a contraction is a loss with a ring of gain around it
    (the tissue it moved), so this share is large; a density loss removes mass, and it is near zero.

    With ``se`` (the standard error of ``directed``, a mean over patients), the opposite-signed mass counts only
    beyond :data:`RING_NOISE_SE` standard errors at each voxel. The opposite-signed part of a mean of pure noise
    has the expectation ``0.40 se`` per voxel (``0.08 se`` beyond one standard error); summed over a 12 mm
    neighbourhood that is a fixed amount, which weighs most beside a small or weak loss: there it gave shares of
    5-12 % on planted density losses (docs/science.md, *Map variants*). A displacement's ring stands above the
    noise and loses one standard error per voxel.
    """
    vox = np.asarray(voxel_mm, float)
    pad = np.ceil(radius_mm / vox).astype(int) + 1
    share = np.zeros(n)
    for k, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - p), min(dim, s.stop + p)) for s, p, dim in zip(box, pad, labels.shape))
        dist = ndimage.distance_transform_edt(labels[box] != k + 1, sampling=vox)
        within = dist <= radius_mm
        near = directed[box][within]
        same = np.clip(near, 0, None).sum()
        floor = 0.0 if se is None else RING_NOISE_SE * np.asarray(se[box], float)[within]
        opposite = np.clip(-near - floor, 0, None).sum()
        share[k] = opposite / same if same > 0 else 0.0
    return share


def half_max_extent(significant: np.ndarray, t: np.ndarray, effect: np.ndarray, fraction: float = 0.5,
                    smoothing_fwhm_mm: float = 0.0, voxel_mm=(1.0, 1.0, 1.0),
                    tested: np.ndarray | None = None, tested_se: np.ndarray | None = None) -> np.ndarray:
    """The part of each significant cluster where the effect reaches ``fraction`` of the cluster's peak.

    A test's significant region grows with its power (more patients, a stronger effect); the extent of an
    effect is better described by its width at half maximum. Clusters are the 26-connected components of
    significant voxels with one sign of ``t``; within one, a voxel is kept when its ``effect`` in the cluster's
    direction is at least ``fraction`` times the largest such effect in the cluster.

    With ``smoothing_fwhm_mm`` (the smoothing the maps went through, e.g. the inputs'), the extent is that of the
    effect *before* the smoothing: a Gaussian effect of width ``s`` smoothed by a Gaussian of width ``k`` has the
    width ``o = sqrt(s^2 + k^2)``, and its level ``fraction`` of the peak lies, in the smoothed map, at the level
    ``fraction ** (1 - k^2 / o^2)``. ``o`` is measured per cluster from the volume where its effect is above half
    its peak (a sphere of radius ``o * sqrt(2 ln 2)``); a narrow effect, widened most by the smoothing, is cut
    highest (at most :data:`UNSMOOTHED_MAX_CUT`), a broad one at ``fraction`` as without it. A cluster with a
    counter-ring in the ``tested`` map (:func:`counter_ring_share` within :data:`RING_FWHMS` smoothing widths at
    least :data:`RING_SHARE`) is a displacement, not a Gaussian loss: its smoothed loss is already narrowed by the
    smoothed ring, so it keeps ``fraction`` (docs/science.md, *Map variants*).

    Parameters
    ----------
    significant : bool ndarray (X, Y, Z)
    t : ndarray (X, Y, Z)
        The test statistic (its sign gives each cluster's direction).
    effect : ndarray (X, Y, Z)
        The mean effect map.
    fraction : float
        In (0, 1).
    smoothing_fwhm_mm : float
        FWHM (mm) of the smoothing to undo in the widths (0: the extent of the map as it is).
    voxel_mm : 3 floats
        Voxel size (mm).
    tested : ndarray (X, Y, Z), optional
        The mean of the tested maps, where counter-rings are looked for (default ``effect``).
    tested_se : ndarray (X, Y, Z), optional
        The standard error of ``tested``: the counter-ring share then discounts the opposite-signed mass that
        noise alone gives (:func:`counter_ring_share`); without it the share is taken as measured.

    Returns
    -------
    bool ndarray (X, Y, Z)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"extent fraction {fraction} must lie in (0, 1)")
    k2 = (smoothing_fwhm_mm / math.sqrt(8 * math.log(2))) ** 2  # the smoothing's variance (mm^2)
    voxel_mm3 = float(np.prod(np.asarray(voxel_mm, float)))
    significant = np.asarray(significant, bool)
    keep = np.zeros(significant.shape, bool)
    for sign in (-1.0, 1.0):
        sel = significant & (np.sign(t) == sign)
        labels, n = ndimage.label(sel, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        directed = np.asarray(effect, float) * sign
        peak = np.asarray(ndimage.maximum(directed, labels, index=np.arange(1, n + 1)), float)
        level = np.full(n, fraction)
        if k2 > 0:
            above = sel & (directed >= 0.5 * np.maximum(peak, 0)[np.maximum(labels - 1, 0)])
            half_volume = ndimage.sum(above, labels, index=np.arange(1, n + 1)) * voxel_mm3  # mm^3
            o2 = ((3 * half_volume / (4 * math.pi)) ** (2 / 3)) / (2 * math.log(2))  # radius^2 / (2 ln 2)
            level = np.minimum(fraction ** np.clip(1 - k2 / np.maximum(o2, 1e-12), 0, 1), UNSMOOTHED_MAX_CUT)
            ring = counter_ring_share(labels, n, np.asarray(effect if tested is None else tested, float) * sign,
                                      RING_FWHMS * smoothing_fwhm_mm, voxel_mm, tested_se)
            level[ring >= RING_SHARE] = fraction
        cut = np.zeros(n + 1)
        cut[1:] = np.where(peak > 0, level * peak, np.inf)
        keep |= sel & (directed >= cut[labels])
    return keep
