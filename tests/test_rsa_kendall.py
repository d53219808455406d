"""Exactness of the Kendall code and the permutation engines against brute force, scipy and rsatoolbox."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau

from dist_decode.rsa import run_rsa
from dist_decode.rsa.kendall import (BITWORD_LEVELS, CategoricalEngine, GradedEngine, kendall, make_engine,
                                     model_vector)
from dist_decode.rsa.permutation import block_rng, perm_block, restrict


def brute_s(x: np.ndarray, y: np.ndarray) -> int:
    """Concordant minus discordant pairs by the O(m^2) definition."""
    dx = np.sign(np.subtract.outer(x, x))
    dy = np.sign(np.subtract.outer(y, y))
    return int((dx * dy).sum()) // 2


def rsatoolbox_tau_a(x: np.ndarray, y: np.ndarray) -> float:
    from rsatoolbox.rdm import RDMs, compare

    return float(compare(RDMs(x[None]), RDMs(y[None]), method="tau-a")[0, 0])


@pytest.fixture(scope="module")
def tied():
    """Heavily tied data in both RDMs: integer-rounded features, ages with 6 levels."""
    rng = np.random.default_rng(7)
    n = 28
    data = pdist(np.round(rng.normal(size=(n, 2)) * 1.5))  # many tied distances
    age = rng.integers(20, 26, n).astype(float)
    sex = rng.integers(0, 2, n)
    group3 = rng.integers(0, 3, n)
    smooth = pdist(rng.normal(size=(n, 3)))  # no ties
    return n, data, smooth, age, sex, group3


def test_tau_matches_brute_force_scipy_and_rsatoolbox(tied):
    n, data, smooth, age, sex, group3 = tied
    assert np.unique(data).size < data.size / 5  # really tied
    for d in (data, smooth):
        for values, kind in ((age, "continuous"), (sex, "categorical"), (group3, "categorical")):
            model = model_vector(values, kind)
            res = kendall(d, model)
            assert res.s == brute_s(d, model)
            assert res.tau_a == pytest.approx(rsatoolbox_tau_a(d, model), abs=1e-15)
            assert res.tau_b == pytest.approx(kendalltau(d, model)[0], abs=1e-14)


@pytest.mark.parametrize("which", ["tied-data", "smooth-data"])
def test_engines_equal_brute_force_per_permutation(tied, which):
    n, data, smooth, age, sex, group3 = tied
    d = data if which == "tied-data" else smooth
    rng = np.random.default_rng(1)
    perms = np.array([rng.permutation(n) for _ in range(25)])
    continuous = rng.normal(size=n)  # n distinct values -> many levels (Fenwick / large-K paths)
    for values, kind in ((age, "continuous"), (sex, "categorical"), (group3, "categorical"),
                         (continuous, "continuous")):
        ref = [brute_s(d, model_vector(values[p], kind)) for p in perms]
        engines = [GradedEngine(d, values, kind)]
        if kind == "categorical":
            engines.append(CategoricalEngine(d, values))
        for eng in engines:
            assert eng.statistics(perms).tolist() == ref, (type(eng).__name__, kind)
            assert eng.statistics(np.arange(n)[None])[0] == brute_s(d, model_vector(values, kind))


def test_bitword_kernel_with_many_levels_and_words():
    """Smooth data over > 64 cells per word boundary and K up to the bit-word limit."""
    rng = np.random.default_rng(3)
    n = 70
    d = pdist(rng.normal(size=(n, 4)))
    for levels in (2, 48, 300):
        values = rng.integers(0, levels, n).astype(float)
        eng = GradedEngine(d, values, "continuous")
        assert eng.n_levels <= BITWORD_LEVELS
        perms = np.array([rng.permutation(n) for _ in range(6)])
        ref = [brute_s(d, model_vector(values[p], "continuous")) for p in perms]
        assert eng.statistics(perms).tolist() == ref


def test_same_permutations_give_same_p_values_as_naive_rsatoolbox_loop():
    """run_rsa's p-values equal a naive loop of rsatoolbox tau-a calls over the same permutations."""
    from rsatoolbox.rdm import RDMs, compare
    from rsatoolbox.rdm.rdms import permute_rdms

    rng = np.random.default_rng(11)
    n = 24
    x = rng.normal(size=(n, 3))
    age = rng.integers(18, 40, n).astype(float)
    x[:, 0] += age / 10
    age[5] = np.nan  # one subject dropped for age only
    sex = rng.choice(np.array(["F", "M"]), n)
    site = np.repeat(["a", "b"], n // 2)
    B, seed, block = 120, 9, 50
    for strata in (None, site):
        rows = run_rsa({"X": x}, {"age": age, "sex": sex}, [("age", "continuous"), ("sex", "categorical")],
                       permutations=B, seed=seed, block_size=block, strata=strata)
        order = np.argsort(site, kind="stable") if strata is not None else np.arange(n)
        segments = [(0, n // 2), (n // 2, n)] if strata is not None else None
        perms = np.concatenate([perm_block(block_rng(seed, (0,), b), s, n, segments)
                                for b, s in enumerate([50, 50, 20])])
        for row, (name, values, kind) in zip(rows, [("age", age, "continuous"), ("sex", sex, "categorical")]):
            vals = values[order]
            members = np.flatnonzero(~np.isnan(vals)) if kind == "continuous" else np.arange(n)
            local = restrict(perms, members, n)
            data = RDMs(pdist(x[order][members])[None])
            model = RDMs(model_vector(vals[members], kind)[None])
            obs = float(compare(data, model, method="tau-a")[0, 0])
            null = np.array([float(compare(data, permute_rdms(model, p.astype(int)), method="tau-a")[0, 0])
                             for p in local])
            p_naive = (1 + np.sum(np.abs(null) >= np.abs(obs) - 1e-12)) / (B + 1)
            assert row["tau_a"] == pytest.approx(obs, abs=1e-15)
            assert row["p"] == p_naive, (name, strata is not None)
            assert row["n"] == members.size


def test_make_engine_picks_gemm_for_few_groups(tied):
    n, data, smooth, age, sex, group3 = tied
    assert isinstance(make_engine(smooth, sex, "categorical"), CategoricalEngine)
    assert isinstance(make_engine(smooth, age, "continuous"), GradedEngine)
    assert isinstance(make_engine(smooth, np.arange(n), "categorical"), GradedEngine)
