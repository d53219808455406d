"""Exactness of the Kendall code and the permutation engines against brute force, scipy and rsatoolbox."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau

from dist_decode.rsa import run_rsa
from dist_decode.rsa.kendall import (BITWORD_LEVELS, CategoricalEngine, GradedEngine, kendall, make_engine,
                                     model_vector, tie_pairs)
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


def scipy_s(x: np.ndarray, y: np.ndarray) -> int:
    """``S`` from ``scipy.stats.kendalltau`` (tau-b) through tau-a = tau-b sqrt((P - x_ties)(P - y_ties)) / P."""
    p = x.size * (x.size - 1) // 2
    tau_b = kendalltau(x, y)[0]
    return int(np.rint(tau_b * np.sqrt(float(p - tie_pairs(x)) * float(p - tie_pairs(y)))))


def _decimal_ages(rng: np.random.Generator, n: int, ties: bool) -> np.ndarray:
    """Ages with decimals: with ties, 2 decimals and repeated ages (tied |x_i - x_j| and zero cells) and
    exactly tied differences that float rounding separates or not; without, all distinct."""
    if ties:
        age = np.round(rng.uniform(18, 40, n), 2)
        age[rng.choice(n, n // 4, replace=False)] = age[rng.choice(n, n // 4)]
        return age
    return rng.uniform(18, 66, n)


@pytest.mark.parametrize("ties", [True, False], ids=["tied-ages", "distinct-ages"])
def test_tree_kernel_equals_scipy_per_permutation_within_strata(ties):
    """Decimal ages (more than 512 model levels): the tree kernel's S equals scipy's and the O(m^2) count on
    every permutation drawn within strata."""
    rng = np.random.default_rng(21 if ties else 22)
    n = 64
    age = _decimal_ages(rng, n, ties)
    data = pdist(rng.normal(size=(n, 4)))
    eng = GradedEngine(data, age, "continuous")
    assert eng.kernel == "tree4" and eng.n_levels > BITWORD_LEVELS
    assert (eng.y_ties > 0) == ties
    segments = [(0, 20), (20, 45), (45, n)]
    perms = np.concatenate([np.arange(n)[None], perm_block(block_rng(5, (0,), 0), 14, n, segments)])
    got = eng.statistics(perms)
    for p, s in zip(perms, got):
        model = model_vector(age[p], "continuous")
        assert s == scipy_s(data, model) == brute_s(data, model)


@pytest.mark.parametrize("top, cells, depth", [(64, 65535, 1), (2, 65535, 2), (1, 65535, 3), (64, 10, 3)])
def test_tree_kernel_depths_and_bucket_caps(monkeypatch, top, cells, depth):
    """Every tree depth (depth 3: trees bucket by bucket over regions), and top buckets closed by the cell
    cap (more of them than TREE_TOP even at the deepest tree), give the exact S."""
    mod = sys.modules["dist_decode.rsa.kendall"]  # the module (dist_decode.rsa re-exports the function)
    monkeypatch.setattr(mod, "TREE_TOP", top)
    monkeypatch.setattr(mod, "TREE_CELLS", cells)
    rng = np.random.default_rng(30 + depth)
    n = 48
    age = rng.uniform(0, 1, n)
    data = pdist(rng.normal(size=(n, 3)))
    eng = GradedEngine(data, age, "continuous")
    assert eng.kernel == "tree4" and eng.depth == depth and eng.regions == (depth == 3)
    if cells < 65535:
        assert eng.n_top > top  # buckets closed by the cell cap: more than the level cap would need
    perms = np.array([rng.permutation(n) for _ in range(9)])
    assert eng.statistics(perms).tolist() == [brute_s(data, model_vector(age[p], "continuous")) for p in perms]


def test_wide_codes_few_levels_use_four_lanes():
    """More than 256 distinct values but at most 512 levels: the tree kernel without count trees."""
    rng = np.random.default_rng(40)
    n = 320
    age = rng.permutation(n).astype(float) * 0.5  # 320 codes, 320 levels
    data = pdist(rng.normal(size=(n, 3)))
    eng = GradedEngine(data, age, "continuous")
    assert eng.kernel == "tree4" and eng.depth == 0 and eng.n_codes > 256
    perms = np.array([rng.permutation(n) for _ in range(5)])
    assert eng.statistics(perms).tolist() == [kendall(data, model_vector(age[p], "continuous")).s for p in perms]


def test_decimal_ages_p_values_equal_naive_scipy_loop_within_strata():
    """run_rsa on decimal ages (tree kernel) within strata and with a missing subject: p-values equal a
    naive loop of scipy kendalltau calls over the same permutations."""
    rng = np.random.default_rng(12)
    n = 60
    x = rng.normal(size=(n, 3))
    age = np.round(rng.uniform(18, 40, n), 2)
    age[:6] = age[6:12]  # tied ages
    x[:, 0] += age / 10
    age[7] = np.nan
    site = np.repeat(["a", "b", "c"], n // 3)
    B, seed, block = 60, 3, 25
    rows = run_rsa({"X": x}, {"age": age}, [("age", "continuous")], permutations=B, seed=seed,
                   block_size=block, strata=site)
    segments = [(0, 20), (20, 40), (40, 60)]
    perms = np.concatenate([perm_block(block_rng(seed, (0,), b), s, n, segments) for b, s in enumerate([25, 25, 10])])
    members = np.flatnonzero(~np.isnan(age))
    local = restrict(perms, members, n)
    data = pdist(x[members])
    vals = age[members]
    assert GradedEngine(data, vals, "continuous").kernel == "tree4"
    obs = scipy_s(data, model_vector(vals, "continuous"))
    null = np.array([scipy_s(data, model_vector(vals[p], "continuous")) for p in local])
    assert rows[0]["S"] == obs
    assert rows[0]["p"] == (1 + np.sum(np.abs(null) >= abs(obs))) / (B + 1)


def test_lightly_tied_data_use_fast_kernels_with_tie_correction(tied):
    """A data RDM with a few tied cells keeps the bit-word / tree kernels (plus the exact correction over
    its tied pairs); heavily tied data keep the tie-group sweeps."""
    rng = np.random.default_rng(50)
    n = 56
    data = pdist(np.round(rng.normal(size=(n, 2)), 2))
    assert 0 < tie_pairs(data) <= data.size
    perms = np.array([rng.permutation(n) for _ in range(8)])
    for values, kernel in ((rng.integers(20, 60, n).astype(float), "bitword4"),
                           (np.round(rng.uniform(18, 40, n), 2), "tree4")):
        eng = GradedEngine(data, values, "continuous")
        assert eng.kernel == kernel and eng.tie_starts is not None
        assert eng.statistics(perms).tolist() == [brute_s(data, model_vector(values[p], "continuous"))
                                                  for p in perms]
    heavy = tied[1]
    assert GradedEngine(heavy, tied[3], "continuous").kernel in ("flat", "fenwick")
