"""Feature and model RDMs as condensed upper triangles (``scipy.spatial.distance.pdist`` order)."""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist

DISTANCES = ("euclidean", "correlation")
KINDS = ("continuous", "categorical")


def feature_rdm(features: np.ndarray, distance: str = "euclidean") -> np.ndarray:
    """Condensed feature RDM from posterior means ``(n, d)`` or averaged over samples ``(K, n, d)``.

    Parameters
    ----------
    features : ndarray, shape (n, d) or (K, n, d)
        One row per subject; with a leading sample axis the RDM is the mean of the per-sample RDMs.
    distance : {"euclidean", "correlation"}
        Euclidean distance, or correlation distance ``1 - r`` between subjects' feature vectors.

    Returns
    -------
    ndarray, shape (n (n - 1) / 2,)
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"features must be (n, d) or (K, n, d), got shape {np.shape(features)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if distance == "correlation" and x.shape[2] < 2:
        raise ValueError("correlation distance needs at least 2 feature dimensions")
    out = np.zeros(x.shape[1] * (x.shape[1] - 1) // 2)
    for sample in x:
        out += pdist(sample, metric=distance)
    out /= x.shape[0]
    if not np.isfinite(out).all():
        raise ValueError("feature RDM is not finite (constant feature vectors with correlation distance?)")
    return out


def subset_rdm(rdm: np.ndarray, n: int, members: np.ndarray) -> np.ndarray:
    """The condensed RDM of the subjects ``members`` (sorted indices) taken from a condensed RDM of ``n``."""
    members = np.asarray(members)
    if members.size == n:
        return rdm
    i, j = np.triu_indices(members.size, k=1)
    a, b = members[i], members[j]
    # condensed index of (a, b), a < b
    return rdm[n * a - a * (a + 1) // 2 + (b - a - 1)]


def missing_mask(values: np.ndarray) -> np.ndarray:
    """True where a phenotype value is missing (NaN, or an empty / ``n/a`` / ``nan`` string)."""
    v = np.asarray(values)
    if v.dtype.kind in "fc":
        return ~np.isfinite(v)
    if v.dtype.kind in "iub":
        return np.zeros(v.shape, bool)
    s = np.char.strip(np.char.lower(v.astype(str)))
    return np.isin(s, ["", "n/a", "na", "nan", "none"])


def model_values(values: np.ndarray, kind: str, name: str = "variable") -> np.ndarray:
    """Validated subject values of a model: float for continuous, str labels for categorical."""
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {KINDS}, got {kind!r}")
    v = np.asarray(values)
    if kind == "continuous":
        try:
            return v.astype(np.float64)
        except ValueError as exc:
            raise ValueError(f"{name}: continuous variable has non-numeric values ({exc})") from exc
    if v.dtype.kind == "f":
        # 0.0/1.0 codes: label by the value itself
        return np.array([repr(float(x)) for x in v])
    return v.astype(str)
