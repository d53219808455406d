"""Permutation p-values and family-wise correction (max-T, single-step minP) on integer statistics.

Columns of a null matrix are tests (model x feature space); rows are permutations, the same subject
relabelling for every column of a row, which is what makes the max/min over a row a valid family-wise
null (Westfall & Young 1993). p-values use the Phipson & Smyth (2010) ``(1 + #) / (B + 1)`` form.
"""
from __future__ import annotations

import numpy as np

ALTERNATIVES = ("two-sided", "greater", "less")
FWE_METHODS = ("maxT", "minP")


def _check(alternative: str, fwe: str | None = None) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if fwe is not None and fwe not in FWE_METHODS:
        raise ValueError(f"fwe must be one of {FWE_METHODS}, got {fwe!r}")


def exceed(null: np.ndarray, observed: np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """Per-column count of null rows at least as extreme as ``observed`` (integer comparisons).

    Parameters
    ----------
    null : ndarray (B, T) int64
    observed : ndarray (T,) int64
    alternative : {"two-sided", "greater", "less"}
        ``|S_b| >= |S_obs|``, ``S_b >= S_obs`` or ``S_b <= S_obs``.
    """
    _check(alternative)
    null = np.asarray(null)
    observed = np.asarray(observed)
    if alternative == "two-sided":
        hit = np.abs(null) >= np.abs(observed)
    elif alternative == "greater":
        hit = null >= observed
    else:
        hit = null <= observed
    return hit.sum(axis=0).astype(np.int64)


def p_values(counts: np.ndarray, permutations: int) -> np.ndarray:
    """``(1 + count) / (B + 1)``."""
    return (1.0 + np.asarray(counts, dtype=np.float64)) / (permutations + 1.0)


def _oriented(x: np.ndarray, alternative: str) -> np.ndarray:
    """Map statistics so that larger is more extreme."""
    if alternative == "two-sided":
        return np.abs(x)
    return x if alternative == "greater" else -x


def fwe_maxt(null: np.ndarray, observed: np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """Family-wise p-values by the max statistic of the standardised tests.

    Each column is divided by its permutation null SD (binary and graded models, and different feature
    spaces, have different null scales); columns with a zero SD (constant model) never win the max.
    """
    _check(alternative)
    null = np.asarray(null, dtype=np.float64)
    obs = np.asarray(observed, dtype=np.float64)
    sd = np.sqrt(np.mean(null**2, axis=0))  # the null of S is centred on 0 exactly
    with np.errstate(divide="ignore", invalid="ignore"):
        z_null = np.where(sd > 0, null / sd, -np.inf if alternative != "two-sided" else 0.0)
        z_obs = np.where(sd > 0, obs / sd, 0.0)
    zmax = _oriented(z_null, alternative).max(axis=1)
    zo = _oriented(z_obs, alternative)
    # columns whose observed z is -inf-like (zero sd) get p = 1
    p = (1.0 + (zmax[:, None] >= zo[None, :]).sum(axis=0)) / (null.shape[0] + 1.0)
    p[sd == 0] = 1.0
    return p


def fwe_minp(null: np.ndarray, observed: np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """Family-wise p-values by single-step minP: per-row p-values from each column's null, min over columns.

    Scale-free, so preferable when tests differ in tie structure.
    """
    _check(alternative)
    null = np.asarray(null)
    b, t = null.shape
    x = _oriented(null.astype(np.float64), alternative)
    xo = _oriented(np.asarray(observed, dtype=np.float64), alternative)
    pmin = np.full(b, np.inf)
    p_obs = np.empty(t)
    for k in range(t):
        col = np.sort(x[:, k])
        # p of a value v within its column: #{null >= v} / B
        p_rows = (b - np.searchsorted(col, x[:, k], side="left")) / b
        pmin = np.minimum(pmin, p_rows)
        p_obs[k] = (b - np.searchsorted(col, xo[k], side="left")) / b
    return (1.0 + (pmin[:, None] <= p_obs[None, :]).sum(axis=0)) / (b + 1.0)


def fwe_correct(null: np.ndarray, observed: np.ndarray, method: str = "maxT",
                alternative: str = "two-sided") -> np.ndarray:
    """Family-wise corrected p-values over all columns (``method`` ``"maxT"`` or ``"minP"``)."""
    _check(alternative, method)
    if method == "maxT":
        return fwe_maxt(null, observed, alternative)
    return fwe_minp(null, observed, alternative)
