"""Maps components on constructed arrays: SyN twin Jacobians, group thresholds, overlap, Dice, clusters, atlas."""
from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np
import pytest
from scipy import ndimage, stats

from dist_decode.maps.group import fdr_bh, one_sample_t, signflip_maxt, site_group_map
from dist_decode.maps.jacobian import SynSettings, log_jacobian
from dist_decode.maps.overlap import Atlas, cluster_table, dice, dice_matrix, overlap_count

SHAPE = (40, 48, 40)
VOX = 4.0
AFFINE = np.array([[-VOX, 0, 0, 78.0], [0, VOX, 0, -112.0], [0, 0, VOX, -70.0], [0, 0, 0, 1.0]])


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    """The nilearn MNI152 grey-matter template on a tiny 4 mm grid (shipped with nilearn: no download)."""
    from nilearn import datasets, image

    gm = datasets.load_mni152_gm_template(resolution=2)
    img = image.resample_img(gm, target_affine=AFFINE, target_shape=SHAPE, interpolation="continuous",
                             force_resample=True, copy_header=True)
    vol = img.get_fdata().astype(np.float32)
    vol[vol < 1e-3] = 0
    return vol


def contract(vol: np.ndarray, centre, amount: float, sigma: float = 3.0) -> np.ndarray:
    """Warp ``vol`` with a smooth local contraction around ``centre`` (voxels): tissue there shrinks."""
    grid = np.indices(vol.shape).astype(float)
    c = np.asarray(centre, float)[:, None, None, None]
    d = grid - c
    w = np.exp(-(d ** 2).sum(0) / (2 * sigma ** 2))
    return ndimage.map_coordinates(vol, c + d * (1 + amount * w), order=1).astype(np.float32)


def test_log_jacobian_sign_and_locality(base):
    centre = (14, 30, 22)
    recon = contract(base, centre, 0.35)
    logj = log_jacobian(base, recon, AFFINE, SynSettings(seed=1))
    assert logj.shape == SHAPE and logj.dtype == np.float32
    ball = np.zeros(SHAPE, bool)
    ball[centre] = True
    ball = ndimage.binary_dilation(ball, iterations=2)
    far = np.ones(SHAPE, bool)
    far[4:26, 20:42, 12:34] = False
    # Atrophy in the reconstruction relative to the twin: J < 1 (log J < 0) where the contraction was planted.
    assert logj[ball].mean() < -0.1
    assert logj[centre] < -0.15
    # ... and J ~ 1 away from it.
    assert np.abs(logj[far]).mean() < 0.03
    # Expansion has the opposite sign (swap the roles of twin and recon).
    back = log_jacobian(recon, base, AFFINE, SynSettings(seed=1))
    assert back[ball].mean() > 0.1


def test_log_jacobian_identity_and_determinism(base):
    same = log_jacobian(base, base, AFFINE, SynSettings(seed=3))
    assert np.abs(same).mean() < 2e-3 and np.abs(same).max() < 0.05  # metric sampling noise only
    recon = contract(base, (25, 20, 20), 0.3)
    a = log_jacobian(base, recon, AFFINE, SynSettings(seed=3))
    b = log_jacobian(base, recon, AFFINE, SynSettings(seed=3))
    np.testing.assert_array_equal(a, b)


def test_log_jacobian_rejects_bad_input(base):
    with pytest.raises(ValueError, match="one shape"):
        log_jacobian(base, base[:-1], AFFINE)
    bad = base.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        log_jacobian(base, bad, AFFINE)


def test_fdr_bh_matches_scipy():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=900), rng.uniform(0, 1e-3, size=100)])
    sig, cut = fdr_bh(p, 0.05)
    adj = stats.false_discovery_control(p, method="bh")
    np.testing.assert_array_equal(sig, adj <= 0.05)
    assert cut == p[sig].max()
    none, cut0 = fdr_bh(rng.uniform(0.5, 1, size=100), 0.05)
    assert not none.any() and cut0 == 0.0


def test_one_sample_t_matches_scipy():
    x = np.random.default_rng(1).normal(0.2, 1, size=(12, 50))
    _, t = one_sample_t(x)
    np.testing.assert_allclose(t, stats.ttest_1samp(x, 0).statistic)


def _planted_stack(n=16, seed=0, effect=-0.07, noise=0.03, noise_sigma_vox=0.0):
    """log J stack: noise everywhere (white, or Gaussian-smoothed with ``noise_sigma_vox`` like real maps) plus a
    planted atrophy block; returns stack, mask, truth."""
    rng = np.random.default_rng(seed)
    shape = (20, 22, 18)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    truth = np.zeros(shape, bool)
    truth[5:10, 6:11, 5:9] = True
    if noise_sigma_vox > 0:
        x = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), noise_sigma_vox) for _ in range(n)])
        x = (x / x[:, mask].std() * noise).astype(np.float32)
    else:
        x = rng.normal(0, noise, size=(n,) + shape).astype(np.float32)
    x[:, truth] += effect
    return x, mask, truth


@pytest.mark.parametrize("method", ["fdr", "fwe"])
def test_site_group_map_finds_planted_block(method):
    x, mask, truth = _planted_stack()
    gm = site_group_map(x, mask, method, 0.05, permutations=500, rng=np.random.default_rng(5))
    found = gm.binary.astype(bool)
    assert found[truth].mean() > 0.9
    assert found[mask & ~truth].mean() < 0.01
    assert (gm.signed[found & truth] < 0).all()  # atrophy keeps its sign
    assert not found[~mask].any() and (gm.p[~mask] == 1).all()
    assert gm.info["n_significant"] == int(found.sum())
    assert gm.info["t_threshold"] is not None and gm.info["t_threshold"] > 2


def test_fwe_controls_family_wise_error_under_null():
    # Pure noise: the maxT threshold must flag no voxel in most data sets (FWE 0.05 => expect ~1 of 20).
    hits = 0
    for seed in range(20):
        x, mask, _ = _planted_stack(n=10, seed=100 + seed, effect=0.0)
        gm = site_group_map(x, mask, "fwe", 0.05, permutations=200, rng=np.random.default_rng(seed))
        hits += gm.info["n_significant"] > 0
    assert hits <= 4


def test_pseudo_t_keeps_fwe_under_the_null_and_finds_what_a_plain_t_misses_with_ten_patients():
    # The default statistic (variance smoothed 8 mm): with 10 patients a plain t's FWE threshold sits near
    # |t| 8.8 (the max over voxels whose variance is small by chance); the pseudo-t's near 4.6.
    hits = 0
    for seed in range(20):
        x, mask, _ = _planted_stack(10, 100 + seed, 0.0, noise_sigma_vox=1.0)
        gm = site_group_map(x, mask, "fwe", 0.05, permutations=200, rng=np.random.default_rng(seed),
                            variance_fwhm_mm=8.0, voxel_mm=(2.0, 2.0, 2.0))
        hits += gm.info["n_significant"] > 0
    assert hits <= 4
    for seed in range(2):
        x, mask, truth = _planted_stack(10, seed, -0.06, noise_sigma_vox=1.0)
        found = {}
        for fwhm in (0.0, 8.0):
            gm = site_group_map(x, mask, "fwe", 0.05, permutations=500, rng=np.random.default_rng(seed),
                                variance_fwhm_mm=fwhm, voxel_mm=(2.0, 2.0, 2.0))
            found[fwhm] = gm.binary.astype(bool)
            assert found[fwhm][mask & ~truth].mean() < 0.01
        assert found[8.0][truth].mean() > 0.8 and found[0.0][truth].mean() < 0.5
        assert gm.info["variance_smoothing_mm"] == 8.0


def test_signflip_maxt_first_entry_is_observed():
    x = np.random.default_rng(2).normal(size=(8, 30))
    null = signflip_maxt(x, 50, np.random.default_rng(0))
    _, t = one_sample_t(x)
    assert null.shape == (50,)
    assert np.isclose(null[0], np.abs(t).max())
    # 2**5 = 32 <= 100 requested: every sign pattern exactly once; t and -t pair up.
    small = x[:5]
    exact = signflip_maxt(small, 100, np.random.default_rng(0))
    assert exact.shape == (32,)
    _, t5 = one_sample_t(small)
    assert np.isclose(exact[0], np.abs(t5).max()) and np.isclose(exact[-1], exact[0])
    assert np.isclose(np.sort(exact)[::2], np.sort(exact)[1::2]).all()


def test_site_group_map_validates():
    x, mask, _ = _planted_stack(n=2)
    with pytest.raises(ValueError, match="at least 3"):
        site_group_map(x, mask)
    x, mask, _ = _planted_stack(n=5)
    with pytest.raises(ValueError, match="does not match"):
        site_group_map(x, mask[:-1])
    with pytest.raises(ValueError, match="unknown threshold"):
        site_group_map(x, mask, "bonferroni")
    with pytest.raises(ValueError, match="random generator"):
        site_group_map(x, mask, "fwe")


def test_overlap_dice_and_clusters():
    shape = (30, 30, 30)
    aff = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -30], [0, 0, 2.0, -30], [0, 0, 0, 1]])
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    c = np.zeros(shape, bool)
    a[5:10, 5:10, 5:10] = True           # 125 voxels
    b[7:12, 5:10, 5:10] = True           # overlaps a on 3 x 5 x 5 = 75
    c[20:24, 20:24, 20:24] = True        # separate blob, 64 voxels
    ov = overlap_count({"A": a, "B": b, "C": c})
    assert ov.dtype == np.uint8 and ov.max() == 2 and (ov == 2).sum() == 75
    assert dice(a, b) == pytest.approx(2 * 75 / 250)
    assert np.isnan(dice(np.zeros(3), np.zeros(3)))
    names, mat = dice_matrix({"A": a, "B": b, "C": c})
    assert names == ["A", "B", "C"] and mat[0, 1] == mat[1, 0] and mat[0, 0] == 1 and mat[0, 2] == 0
    signed = {"A": np.where(a, -4.0, 0.0), "B": np.where(b, -3.0, 0.0), "C": np.where(c, 5.0, 0.0)}
    signed["A"][12, 5:10, 5:10] = 6.0  # expansion touching A's atrophy: clustered separately
    rows = cluster_table(signed, aff, min_sites=1, min_voxels=10)
    assert [r["cluster"] for r in rows] == [1, 2, 3]
    first, second, third = rows
    assert first["max_sites"] == 2 and first["size_voxels"] == 125 + 50 and first["sites"] == "A;B"
    assert first["sign"] == "atrophy" and 7 <= first["peak_i"] < 10 and first["mean_t"] < 0
    assert second["sites"] == "C" and second["sign"] == "expansion" and second["size_mm3"] == 64 * 8.0
    assert third["sign"] == "expansion" and third["size_voxels"] == 25 and third["mean_t"] == 6.0
    x, y, z = (aff @ np.r_[first["peak_i"], first["peak_j"], first["peak_k"], 1])[:3]
    assert (first["peak_x"], first["peak_y"], first["peak_z"]) == (x, y, z)
    assert [r["size_voxels"] for r in cluster_table(signed, aff, min_sites=2)] == [75]
    assert cluster_table({"A": np.zeros(shape)}, aff) == []


def test_atlas_labels_offline():
    aal = Atlas.load("aal")
    assert aal.label_at((-38, -22, 56)) == "Precentral_L"
    assert aal.label_at((30, -4, -20)) == "Amygdala_R"
    assert aal.label_at((0, 0, 200)) == "unlabelled"
    nmm = Atlas.load("neuromorphometrics")
    assert "precentral" in nmm.label_at((-38, -22, 56)).lower()
    with pytest.raises(ValueError, match="not a labelled atlas"):
        Atlas.load("harvard_oxford")


def test_group_step_streams_subject_maps_and_matches_the_stacked_test(tmp_path):
    """The maps stage's group step reads one subject map at a time: its result equals the full-stack test, and its
    peak allocation stays well below one (n, X, Y, Z) stack of the site's maps (it held two before)."""
    import tracemalloc

    from nibabel.affines import voxel_sizes

    from dist_decode.fsutil import save_nifti
    from dist_decode.maps.group import site_group_test, smooth_maps
    from dist_decode.maps.pipeline import site_test_input

    rng = np.random.default_rng(3)
    n, shape = 40, (30, 36, 30)
    mask = np.zeros(shape, bool)
    mask[8:22, 9:27, 8:22] = True
    maps = {w: rng.normal(0, 0.03, (n,) + shape).astype(np.float32) * mask for w in ("effect", "deviation")}
    maps["deviation"][:, 10:16, 12:18, 10:16] -= 0.04
    paths = {w: [tmp_path / f"p{i}_{w}.nii.gz" for i in range(n)] for w in maps}
    for w, files in paths.items():
        for f, m in zip(files, maps[w]):
            save_nifti(f, m, AFFINE)
    stack = {w: smooth_maps(maps[w], 6.0, voxel_sizes(AFFINE)) for w in maps}

    tracemalloc.start()
    x, means = site_test_input(paths, "deviation", mask, 6.0, AFFINE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the (n, mask voxels) matrix plus a fixed number of volumes; one float32 stack of the maps is 10 MB here
    assert peak < x.nbytes + 12 * np.prod(shape) * 8 < n * np.prod(shape) * 4
    np.testing.assert_allclose(x, stack["deviation"][:, mask].astype(np.float64), rtol=0, atol=0)
    for w in maps:
        np.testing.assert_allclose(means[w], stack[w].mean(axis=0), rtol=1e-5, atol=1e-7)

    streamed = site_group_test(x, mask, "fwe", 0.05, 200, np.random.default_rng(1))
    stacked = site_group_map(stack["deviation"], mask, "fwe", 0.05, 200, np.random.default_rng(1))
    for field in ("t", "p", "binary", "signed"):
        np.testing.assert_array_equal(getattr(streamed, field), getattr(stacked, field))
    assert streamed.info == stacked.info and streamed.info["n_significant"] > 0
    with pytest.raises(ValueError, match="do not match the mask"):
        site_group_test(x[:, :-1], mask)
