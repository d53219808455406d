"""The properties the DECODE-SZ design relies on (docs/science.md), on real modules with random tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dist_decode.analysis.recovery import GOALS, goal_table, maps_recovery, met, rdm_tau
from dist_decode.config import RunConfig, override, profile_config
from dist_decode.maps.group import half_max_extent
from dist_decode.model import DecodeSZ, build_model, decode_sz_loss, mmd_unbiased
from dist_decode.model.loss import eigen_noise_variance

GRID = (17, 19, 15)
TINY = dict(channels=(4, 8, 8), bottleneck=4, hidden=16, groups=4)


def _mask() -> torch.Tensor:
    m = torch.zeros(GRID, dtype=torch.bool)
    m[2:-2, 3:-3, 2:-2] = True
    return m


@pytest.mark.parametrize("decoder", ["dense", "conv"])
def test_decode_c_zero_is_exactly_the_twin_and_the_salient_map_is_the_difference(decoder):
    torch.manual_seed(0)
    m = DecodeSZ(GRID, 5, 3, decoder=decoder, mask=_mask(), **TINY)
    with torch.no_grad():  # a trained-looking salient branch: no parameter is left at its initial zero
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c, s = torch.randn(4, 5), torch.randn(4, 3)
    with torch.no_grad():
        assert torch.count_nonzero(m.salient(torch.zeros(4, 3))) == 0  # exactly zero: no bias anywhere
        twin = m.decode(c, torch.zeros(4, 3))
        recon = m.decode(c, s)
        c2 = torch.randn(4, 5)
        # the specific map does not depend on c: the same s changes any twin by the same map
        assert torch.allclose(recon - twin, m.salient(s), atol=1e-5)
        assert torch.allclose(m.decode(c2, s) - m.decode(c2, torch.zeros(4, 3)), m.salient(s), atol=1e-5)
        assert not torch.allclose(recon, twin)
        if decoder == "dense":  # nothing outside the brain mask
            assert torch.count_nonzero(recon[:, :, ~_mask()]) == 0


def test_controls_are_decoded_as_their_twin():
    torch.manual_seed(1)
    m = DecodeSZ(GRID, 5, 3, decoder="dense", mask=_mask(), **TINY)
    with torch.no_grad():
        for p in m.salient_decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(4, 1, *GRID)
        out = m(x, torch.tensor([True, True, False, False]), torch.Generator().manual_seed(0))
        # same batch composition as the forward pass, so the same matmul kernels: bitwise equal
        twin = m.decode(out["c"], torch.zeros(4, 3))
        assert torch.equal(out["x_hat"][2:], twin[2:])
        assert torch.equal(out["s_dec"][2:], torch.zeros(2, 3))


def test_linear_encoders_are_affine_maps_of_the_volume():
    torch.manual_seed(2)
    lin = DecodeSZ(GRID, 5, 3, encoder="linear", **TINY)
    non = DecodeSZ(GRID, 5, 3, encoder="nonlinear", **TINY)
    a, b = torch.randn(3, 1, *GRID), torch.randn(3, 1, *GRID)
    zero = torch.zeros(3, 1, *GRID)
    with torch.no_grad():
        for m, affine in ((lin, True), (non, False)):
            for enc in (m.encode_common, m.encode_specific):
                lhs = enc(0.3 * a + 0.7 * b)[0]
                rhs = 0.3 * enc(a)[0] + 0.7 * enc(b)[0]
                assert torch.allclose(lhs, rhs, atol=1e-4) == affine
                # and (affine) the map of a sum is the sum of the maps, minus the constant
                assert torch.allclose(enc(a + b)[0], enc(a)[0] + enc(b)[0] - enc(zero)[0], atol=1e-4) == affine


def test_dense_encoders_read_every_brain_voxel_on_its_own():
    """``model.encoder="dense"``: affine, a weight per brain voxel of the (resampled) encoder grid, blind outside it."""
    torch.manual_seed(3)
    mask = _mask()
    m = DecodeSZ(GRID, 5, 3, encoder="dense", decoder="dense", mask=mask, **TINY)
    assert m.common.index.numel() == int(mask.sum())  # no resampling: one input per mask voxel
    a, b, zero = torch.randn(3, 1, *GRID), torch.randn(3, 1, *GRID), torch.zeros(3, 1, *GRID)
    with torch.no_grad():
        for enc in (m.encode_common, m.encode_specific):
            assert torch.allclose(enc(0.3 * a + 0.7 * b)[0], 0.3 * enc(a)[0] + 0.7 * enc(b)[0], atol=1e-5)
            # each brain voxel has its own weight vector: two neighbours' unit impulses give different read-outs
            inside = [(8, 9, 7), (8, 9, 8)]
            reads = []
            for v in inside:
                x = zero.clone()
                x[(slice(None), 0) + v] = 1.0
                reads.append(enc(x)[0] - enc(zero)[0])
            assert not torch.allclose(reads[0], reads[1]) and reads[0].abs().sum() > 0
            x = zero.clone()
            x[:, 0, 0, 0, 0] = 1.0  # outside the brain: not read
            assert torch.equal(enc(x)[0], enc(zero)[0])
    # at a coarser encoder grid it reads the resampled mask, and a saved model rebuilds from its own state
    cfg = override(RunConfig(), ['model.encoder="dense"', 'model.decoder="dense"', "model.encoder_voxel_mm=6",
                                 'model.specific_readout="encoder"',
                                 "model.channels=[4, 8, 8]", "model.bottleneck=4", "model.hidden=16",
                                 "model.norm_groups=4"])
    m = build_model(cfg, GRID, mask=mask, voxel_mm=3.0)
    assert m.enc_grid == (8, 10, 8) and 0 < m.specific.index.numel() < int(mask.sum())
    state = m.state_dict()
    again = build_model(cfg, GRID, mask=state["mask"], voxel_mm=3.0)
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again.encode_specific(a)[0], m.encode_specific(a)[0])
    with pytest.raises(ValueError, match="needs the brain mask"):
        DecodeSZ(GRID, 5, 3, encoder="dense", decoder="conv", **TINY)


def test_mmd_is_zero_when_the_groups_match_and_grows_with_their_difference():
    g = torch.Generator().manual_seed(3)

    def mean_mmd(shift: float, scale: float = 1.0, reps: int = 300) -> float:
        vals = []
        for _ in range(reps):
            a = torch.randn(8, 6, generator=g) * scale
            b = torch.randn(8, 6, generator=g) * scale
            b[:, 0] += shift * scale
            vals.append(float(mmd_unbiased(a, b)))
        return float(np.mean(vals))

    same = mean_mmd(0.0)
    assert abs(same) < 0.02  # unbiased: no pull towards a collapsed C when the groups already match
    assert mean_mmd(1.0) > 0.1 > same
    assert mean_mmd(2.0) > mean_mmd(1.0)
    # independent of the latents' scale (the kernel width follows the batch)
    assert abs(mean_mmd(1.0, scale=50.0) - mean_mmd(1.0)) < 0.05
    assert float(mmd_unbiased(torch.randn(1, 6), torch.randn(5, 6))) == 0.0  # too few to estimate


def test_c_matching_term_pulls_patient_and_control_c_together():
    torch.manual_seed(4)
    cfg = profile_config("cpu", ["loss.control_s_weight=0"])
    m = DecodeSZ(GRID, 4, 2, decoder="dense", mask=_mask(), **TINY)
    x = torch.randn(8, 1, *GRID)
    patient = torch.tensor([True] * 4 + [False] * 4)
    out = m(x, patient, torch.Generator().manual_seed(0))
    out["c_mu"] = out["c_mu"].detach().clone()
    out["c_mu"][:4, 0] += 3.0  # the patients' C carries "diagnosis"
    out["c_mu"].requires_grad_(True)
    total, terms = decode_sz_loss(out, _mask(), cfg.loss, None, noise_var=1.0)
    off = override(cfg, ['loss.match_c="none"'])
    total_off, terms_off = decode_sz_loss(out, _mask(), off.loss, None, noise_var=1.0)
    assert float(terms["match_c"]) > 0.1 and float(terms_off["match_c"]) == 0.0
    assert float((total - total_off).detach()) == pytest.approx(cfg.loss.match_weight * 8 * float(terms["match_c"]), rel=1e-4)
    # the matching term's gradient moves the patients' first C coordinate down and the controls' up
    grad = torch.autograd.grad(total - total_off, out["c_mu"])[0]
    assert float(grad[:4, 0].sum()) > 0 > float(grad[4:, 0].sum())


def test_eigen_noise_level_separates_factors_from_noise():
    rng = np.random.default_rng(5)
    n, v, sigma = 60, 4000, 0.5
    factors = rng.normal(size=(n, 3)) @ rng.normal(size=(3, v)) * 2.0
    x = torch.from_numpy(factors + rng.normal(0, sigma, (n, v)))
    level = eigen_noise_variance(x)
    # white noise of variance sigma^2 in v voxels puts n - 1 eigenvalues near sigma^2 v / (n - 1)
    assert level == pytest.approx(sigma ** 2 * v / (n - 1), rel=0.15)
    z = x - x.mean(0)
    top = np.sort(np.linalg.eigvalsh((z @ z.T / (n - 1)).numpy()))[::-1]
    assert (top[:3] > 20 * level).all() and top[4] < 1.5 * level  # only the 3 factors are worth a latent
    # from a subset, rescaled to the whole training set
    assert eigen_noise_variance(x[:30], 60) == pytest.approx(level, rel=0.25)
    with pytest.raises(ValueError, match="too few"):
        eigen_noise_variance(x[:2])


def test_half_max_extent_keeps_each_clusters_core():
    grid = np.indices((40, 20, 20)).astype(float)
    r1 = np.sqrt((grid[0] - 10) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - 10) ** 2)
    r2 = np.sqrt((grid[0] - 30) ** 2 + (grid[1] - 10) ** 2 + (grid[2] - 10) ** 2)
    effect = -1.0 * np.exp(-r1 ** 2 / 18) - 0.3 * np.exp(-r2 ** 2 / 18)  # a strong and a weak loss
    t = effect * 40
    significant = np.abs(t) > 1.0  # power reaches far into the tails of both
    keep = half_max_extent(significant, t, effect, 0.5)
    half1 = r1 <= np.sqrt(2 * 9 * np.log(2))  # the half-maximum radius of exp(-r^2 / (2 * 9))
    half2 = r2 <= np.sqrt(2 * 9 * np.log(2))
    assert keep[half1].all() and keep[half2].all()  # the weak region keeps its own core
    assert not keep[significant & ~(half1 | half2)].any()
    assert significant.sum() > 3 * keep.sum()
    with pytest.raises(ValueError):
        half_max_extent(significant, t, effect, 1.5)


def test_unsmoothed_extent_finds_a_narrow_effects_own_width_under_smoothing():
    """A narrow and a broad Gaussian loss, both smoothed with an 8 mm FWHM kernel: the plain half maximum of the
    smoothed map is much wider than the narrow loss's own half-maximum region; undoing the smoothing in the widths
    recovers each loss's own region, and changes little for the broad one."""
    from scipy import ndimage

    voxel = 2.0
    grid = np.indices((60, 30, 30)).astype(float) * voxel
    sig_narrow, sig_broad, k = 3.0, 9.0, 8.0 / np.sqrt(8 * np.log(2))  # mm
    r1 = np.sqrt((grid[0] - 30) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    r2 = np.sqrt((grid[0] - 90) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    raw = -np.exp(-r1 ** 2 / (2 * sig_narrow ** 2)) - 0.5 * np.exp(-r2 ** 2 / (2 * sig_broad ** 2))
    effect = ndimage.gaussian_filter(raw, k / voxel)
    t = effect / np.abs(effect).max() * 50
    significant = np.abs(t) > 0.5
    own = [r <= s * np.sqrt(2 * np.log(2)) for r, s in ((r1, sig_narrow), (r2, sig_broad))]  # half max, unsmoothed
    plain = half_max_extent(significant, t, effect, 0.5)
    unsmoothed = half_max_extent(significant, t, effect, 0.5, smoothing_fwhm_mm=8.0, voxel_mm=(voxel,) * 3)
    near = [r1 < 25, r2 < 45]

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(plain & near[0], own[0]) < 0.6 and (plain & near[0]).sum() > 2.5 * own[0].sum()  # 3x as wide
    assert dice(plain & near[1], own[1]) > 0.85  # the broad loss is widened a little
    for region, where in zip(own, near):  # both exact when written (Dice 1.0)
        assert dice(unsmoothed & where, region) > 0.9, dice(unsmoothed & where, region)
    # without smoothing to undo, the same as the plain extent
    np.testing.assert_array_equal(half_max_extent(significant, t, effect, 0.5, 0.0, (voxel,) * 3), plain)


def test_the_unsmoothed_extent_leaves_a_displacement_at_its_half_maximum():
    """A modulated map keeps the mass a displacement moves: a contraction is a loss with a ring of gain around it.
    Smoothed at 8 mm, such a loss is already narrowed by its ring, so the unsmoothed extent must not cut it
    further; a density loss of the same width (no ring) is cut to its own width."""
    from scipy import ndimage

    from dist_decode.maps.group import RING_SHARE, counter_ring_share

    voxel = 2.0
    grid = np.indices((60, 30, 30)).astype(float) * voxel
    s = 4.0  # mm
    r1 = np.sqrt((grid[0] - 30) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    r2 = np.sqrt((grid[0] - 90) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    gauss = lambda r, w: np.exp(-r ** 2 / (2 * w ** 2))  # noqa: E731
    # the displacement: a loss and a twice as wide gain of the same mass; the density loss: the loss alone
    raw = -gauss(r1, s) + gauss(r1, 2 * s) / 8 - gauss(r2, s)
    assert abs(raw[r1 < 40].sum()) < 0.02 * gauss(r1, s).sum()  # the displacement's mass balances
    effect = ndimage.gaussian_filter(raw, 8.0 / np.sqrt(8 * np.log(2)) / voxel)
    t = effect / np.abs(effect).max() * 50
    significant = np.abs(t) > 2.0
    labels, n = ndimage.label(significant & (t < 0), structure=np.ones((3, 3, 3)))
    assert n == 2
    share = counter_ring_share(labels, n, -effect, 12.0, (voxel,) * 3)
    disp, dens = labels[30 // 2, 15, 15] - 1, labels[90 // 2, 15, 15] - 1
    assert share[disp] > 4 * RING_SHARE and share[dens] < 0.01 * RING_SHARE
    plain = half_max_extent(significant, t, effect, 0.5)
    unsmoothed = half_max_extent(significant, t, effect, 0.5, smoothing_fwhm_mm=8.0, voxel_mm=(voxel,) * 3)
    near = [r1 < 25, r2 < 25]
    np.testing.assert_array_equal(unsmoothed & near[0], plain & near[0])  # the displacement keeps its half max
    assert (unsmoothed & near[1]).sum() < 0.6 * (plain & near[1]).sum()  # the density loss is cut to its width


def test_recovery_metrics_and_goals():
    rng = np.random.default_rng(6)
    f = rng.normal(size=(20, 2))
    assert rdm_tau(f @ np.array([[2.0, 0.0], [0.0, 2.0]]), f) == pytest.approx(1.0)  # an isometry up to scale
    assert abs(rdm_tau(rng.normal(size=(20, 2)), f)) < 0.2
    assert rdm_tau(f[:3], f[:3]) is None  # too few subjects
    assert met("S~specific", 0.8) and not met("S~specific", 0.7)
    assert met("S~common", -0.04) and not met("S~common", -0.06)
    assert met("C diagnosis AUC", 0.55) and met("maps flagged / planted", 2.0) is True
    assert met("S~specific", None) is None and set(GOALS) >= {"maps Dice", "C~common"}
    truth = np.zeros((10, 10, 10), bool)
    truth[2:5, 2:5, 2:5] = True
    ov = np.zeros((10, 10, 10), int)
    ov[2:5, 2:5, 2:5] = 4
    ov[6:8, 6:8, 6:8] = 1  # one site only: below the consistent-site threshold
    r = maps_recovery(ov, truth, np.ones_like(truth))
    assert r["threshold"] == 2 and r["maps Dice"] == 1.0 and r["maps flagged / planted"] == 1.0
    assert "dice_ceiling" not in r  # no planted effect given
    rows = goal_table([{"S~specific": 0.8, "S~common": 0.0, "C~common": 0.7, "C~specific": 0.1,
                        "C diagnosis AUC": 0.5, "oracle specific~common": 0.02}], r)
    verdict = {row["metric"]: row["met"] for row in rows}
    assert verdict["S~specific"] and not verdict["C~common"] and not verdict["C~specific"] and verdict["maps Dice"]
    assert rows[0]["se"] is None  # one site: no standard error
    two = goal_table([{"S~specific": 0.8}, {"S~specific": 0.6}], r)
    assert two[0]["value"] == pytest.approx(0.7) and two[0]["se"] == pytest.approx(0.1)  # sd 0.1414 / sqrt(2)


def test_profiles_share_the_methods():
    gpu, cpu = RunConfig(), profile_config("cpu")
    for sec, keys in (("data", ("proportional_scaling", "smooth_fwhm_mm", "site_gain", "site_center", "site_reference")),
                      ("model", ("encoder", "route")),
                      ("loss", ("noise", "match_c", "control_s_weight", "gamma_tc"))):
        for k in keys:
            assert getattr(getattr(gpu, sec), k) == getattr(getattr(cpu, sec), k), f"{sec}.{k}"
    assert gpu.model.decoder == "conv" and cpu.model.decoder == "dense"
    with pytest.raises(ValueError, match="unknown profile"):
        profile_config("tpu")
    m = build_model(cpu, GRID, mask=_mask(), voxel_mm=3.0)
    assert m.enc_grid == (8, 10, 8)  # the encoders see a 6 mm resampling of the 3 mm grid


def _readout_model(seed: int) -> DecodeSZ:
    """A dense DECODE-SZ whose common branch is zero (twin = 0, residual = volume, so either read-out input gives
    the same) and whose salient patterns are random, so the read-out's input is known exactly."""
    torch.manual_seed(seed)
    m = DecodeSZ(GRID, 5, 3, decoder="dense", mask=_mask(), specific_readout="decoder", **TINY)
    with torch.no_grad():
        m.common_decoder.dense.weight.zero_()
        m.salient_decoder.dense.weight.normal_()
    return m.eval()


def test_the_decoder_readout_is_the_closed_form_posterior_and_blind_to_what_controls_show():
    """``model.specific_readout="decoder"``: s = R (x - mu0), R = (W P W^T + sigma^2 Lambda^-1)^-1 W P, with P
    the projection off the training controls' span: nothing a training control varies along moves S, and a
    planted salient effect is read back."""
    from dist_decode.model.readout import fit_salient_readout

    m = _readout_model(4)
    mask = _mask()
    idx = mask.flatten().nonzero().squeeze(1)
    V = idx.numel()
    g = torch.Generator().manual_seed(5)
    span = torch.randn(6, V, generator=g)  # what controls (and patients) vary along
    w = m.salient(torch.eye(3)).flatten(1)[:, idx]

    def volumes(n, patient):
        r = torch.randn(n, 6, generator=g) @ span + 0.05 * torch.randn(n, V, generator=g)
        s = torch.randn(n, 3, generator=g) if patient else torch.zeros(n, 3)
        x = torch.zeros(n, 1, *GRID)
        x.view(n, -1)[:, idx] = r + s @ w + 0.3  # 0.3: a common offset the controls' mean takes away
        return x, s

    xc, _ = volumes(40, False)
    xp, _ = volumes(40, True)
    x = torch.cat([xc, xp])
    patient = torch.arange(80) >= 40
    with pytest.raises(RuntimeError, match="not fitted"):
        m.encode_specific(x[:2])
    noise = 0.05 ** 2
    batches = [(x[k:k + 16], patient[k:k + 16]) for k in range(0, 80, 16)]
    ro = fit_salient_readout(m, batches, noise)
    assert (ro.n_controls, ro.n_patients) == (40, 40) and ro.span_rank == 39
    # the closed form, with P formed explicitly (small V)
    r = x.view(80, -1)[:, idx].double()
    dev = r[:40] - r[:40].mean(0)
    u, sv, vt = torch.linalg.svd(dev, full_matrices=False)
    basis = vt[sv > 1e-6 * sv.max()]
    p = torch.eye(V, dtype=torch.float64) - basis.T @ basis
    with torch.no_grad():
        s_enc = m.encode_specific_encoder(x[40:])[0].double()
    lam = torch.cov(s_enc.T)
    lam = lam + 1e-6 * lam.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    a = w.double() @ p @ w.double().T + noise * torch.linalg.inv(lam)
    want = torch.linalg.solve(a, w.double() @ p)
    assert torch.allclose(ro.weight.double(), want.float().double(), rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert torch.allclose(ro.offset.double(), r[:40].mean(0), atol=1e-5)
    # blind to every training control's deviation
    assert (ro.weight.double() @ dev.T).abs().max() < 1e-3 * (ro.weight.double() @ (w.double().T)).abs().max()
    # accumulated over voxel blocks (large grids) it is the same map
    from dist_decode.model import readout as readout_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readout_module, "VOXEL_CHUNK", 97)
        blocked = fit_salient_readout(m, batches, noise)
    assert torch.allclose(blocked.weight, ro.weight, rtol=1e-4, atol=1e-6 * float(ro.weight.abs().max()))
    m.set_readout(ro)
    # new patients: the same span variation plus a planted salient effect, read back
    xn, s_true = volumes(30, True)
    with torch.no_grad():
        s_hat = m.encode_specific(xn)[0]
        moved = m.encode_specific(xn + 2.0 * torch.zeros_like(xn).view(30, -1).index_copy(
            1, idx, span[:1].expand(30, -1)).view_as(xn))[0]
    for k in range(3):
        assert np.corrcoef(s_hat[:, k].numpy(), s_true[:, k].numpy())[0, 1] > 0.9
    assert torch.allclose(moved, s_hat, atol=1e-3 * float(s_hat.abs().max()))
    # saved and rebuilt, it reads the same
    cfg = override(RunConfig(), ['model.decoder="dense"', "model.latent_common=5", "model.latent_specific=3",
                                 "model.channels=[4, 8, 8]", "model.bottleneck=4", "model.hidden=16",
                                 "model.norm_groups=4", 'model.common_readout="encoder"'])
    again = build_model(cfg, GRID, mask=mask)
    again.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval().encode_specific(xn)[0], s_hat)


def test_the_readout_of_the_volume_needs_no_estimate_of_c_and_the_residual_one_plugs_it_in():
    """``model.specific_readout_input``: "volume" (the default) reads each volume with the controls' span under a
    flat prior, so neither the C encoder nor the common branch moves S; "residual" reads ``x - decode(c_mean, 0)``
    (the earlier behaviour), so S follows the common branch."""
    from dist_decode.model.readout import fit_salient_readout

    idx = _mask().flatten().nonzero().squeeze(1)
    g = torch.Generator().manual_seed(11)
    x = torch.zeros(60, 1, *GRID)
    x.view(60, -1)[:, idx] = torch.randn(60, idx.numel(), generator=g) + 0.2
    patient = torch.arange(60) % 2 == 1
    batches = [(x[k:k + 16], patient[k:k + 16]) for k in range(0, 60, 16)]

    def fitted(seed: int, common_seed: int, read: str):
        m = _readout_model(seed)
        m.specific_readout_input = read
        torch.manual_seed(common_seed)  # another common branch and C encoder, same salient branch and S encoder
        with torch.no_grad():
            # a common branch that also decodes along the salient patterns (as trained ones partly do)
            sal = m.salient_decoder.dense.weight
            m.common_decoder.dense.weight.copy_(sal @ torch.randn(sal.shape[1], m.latent_common))
            for p in m.common.parameters():
                p.normal_(0.0, 0.05)
        ro = fit_salient_readout(m, batches, 0.1)
        m.set_readout(ro)
        with torch.no_grad():
            return m, ro, m.encode_specific(x)[0]

    (_, a, s_a), (_, b, s_b) = fitted(4, 1, "volume"), fitted(4, 2, "volume")
    assert torch.allclose(a.weight, b.weight, atol=1e-5 * float(a.weight.abs().max())) and torch.equal(a.offset, b.offset)
    assert torch.allclose(s_a, s_b, atol=1e-4 * float(s_a.abs().max()))
    assert torch.allclose(a.offset.double(), x.view(60, -1)[~patient][:, idx].double().mean(0), atol=1e-5)
    (m1, c, s_c), (_, d, s_d) = fitted(4, 1, "residual"), fitted(4, 2, "residual")
    with torch.no_grad():
        resid = m1.common_residual(x)
    assert torch.allclose(c.offset.double(), resid[~patient].double().mean(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(s_c, (resid - c.offset) @ c.weight.T, atol=1e-5 * float(s_c.abs().max()))
    assert (s_c - s_d).abs().max() > 0.1 * s_c.abs().max()
    # a saved config without the field reads the residual, as runs did before it
    saved = RunConfig().to_dict()
    del saved["model"]["specific_readout_input"]
    assert RunConfig.from_saved_dict(saved).model.specific_readout_input == "residual"
    assert RunConfig().model.specific_readout_input == "volume"
    with pytest.raises(ValueError, match="specific_readout_input"):
        DecodeSZ(GRID, 5, 3, decoder="dense", mask=_mask(), specific_readout="decoder",
                 specific_readout_input="twin", **TINY)


def _common_readout_model(seed: int, scale: torch.Tensor | None = None) -> DecodeSZ:
    """A dense DECODE-SZ with random common patterns and a spread-out C encoder; ``scale`` reparametrises its C
    latent space (encoder output k times 1/scale_k, decoder pattern k times scale_k: the same twins)."""
    torch.manual_seed(seed)
    m = DecodeSZ(GRID, 5, 3, decoder="dense", mask=_mask(), common_readout="decoder", **TINY)
    with torch.no_grad():
        m.common_decoder.dense.weight.normal_()
        m.common_decoder.dense.bias.normal_()
        m.common.head.mu.weight.mul_(20.0)
        if scale is not None:
            m.common_decoder.dense.weight.mul_(scale[None, :])
            m.common.head.mu.weight.div_(scale[:, None])
            m.common.head.mu.bias.div_(scale)
    return m.eval()


def test_the_common_readout_is_the_twin_on_its_principal_axes_at_the_prior_scale():
    """``model.common_readout="decoder"``: C's features are the twin's deviation on the principal axes of the
    training twins that decode more than the noise level, each divided by sqrt(d_i + sigma^2), so that their
    variance is the pPCA posterior's d/(d + sigma^2) whatever scale the optimiser left each latent direction at;
    the twins themselves (decode(c, 0), the maps' input) do not change."""
    from dist_decode.model.readout import fit_common_readout

    m = _common_readout_model(7)
    idx = _mask().flatten().nonzero().squeeze(1)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(60, 1, *GRID, generator=g)
    batches = [(x[k:k + 16], torch.zeros(len(x[k:k + 16]), dtype=torch.bool)) for k in range(0, 60, 16)]
    with torch.no_grad():
        c = m.encode_common(x)[0]
        twins = m.common_normalized(c).flatten(1)[:, idx].double()
    # the explicit construction (small V): principal axes of the training twins
    dev = twins - twins.mean(0)
    d, axes = torch.linalg.eigh(dev.T @ dev / (len(dev) - 1))
    d, axes = d.flip(0)[:5], axes.flip(1)[:, :5]
    noise = float((d[2] * d[3]).sqrt())  # between the 3rd and 4th axes: 3 axes decode more than the noise
    with pytest.raises(RuntimeError, match="not fitted"):
        m.common_features(c)
    ro = fit_common_readout(m, batches, noise)
    assert ro.weight.shape == (3, 5) and ro.n_subjects == 60
    assert torch.allclose(ro.variances.double(), d, rtol=1e-3, atol=1e-6 * float(d[0]))
    m.set_common_readout(ro)
    with torch.no_grad():
        f = m.common_features(c).double()
    want = dev @ axes[:, :3] / (d[:3] + noise).sqrt()
    for k in range(3):  # each axis up to its sign
        sign = float(torch.sign((f[:, k] * want[:, k]).sum()))
        assert torch.allclose(sign * f[:, k], want[:, k], atol=1e-3 * float(want[:, k].abs().max()))
    assert torch.allclose(f.var(0), d[:3] / (d[:3] + noise), rtol=1e-3)
    # blind to the scale (and so the optimiser's history) of each latent direction: the same twins, the same C
    other = _common_readout_model(7, scale=torch.tensor([4.0, 0.25, 1.0, 9.0, 0.5]))
    with torch.no_grad():
        c2 = other.encode_common(x)[0]
        assert torch.allclose(other.common_normalized(c2), m.common_normalized(c), atol=1e-3)
    other.set_common_readout(fit_common_readout(other, batches, noise))
    with torch.no_grad():
        f2 = other.common_features(c2).double()
    d_f, d_f2 = torch.cdist(f, f), torch.cdist(f2, f2)  # the RSA reads distances: identical
    assert torch.allclose(d_f2, d_f, atol=1e-3 * float(d_f.max()))
    assert torch.cdist(c2, c2).sub(torch.cdist(c, c)).abs().max() > 0.1 * torch.cdist(c, c).max()  # raw C differs
    # posterior samples go through the same map; saved and rebuilt, it reads the same
    assert m.common_features(c[None].expand(2, -1, -1)).shape == (2, 60, 3)
    cfg = override(RunConfig(), ['model.decoder="dense"', "model.latent_common=5", "model.latent_specific=3",
                                 "model.channels=[4, 8, 8]", "model.bottleneck=4", "model.hidden=16",
                                 "model.norm_groups=4", 'model.specific_readout="encoder"'])
    again = build_model(cfg, GRID, mask=_mask())
    again.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval().common_features(c), m.common_features(c))
    # a C that decodes nothing above the noise keeps its strongest axis
    assert len(fit_common_readout(m, batches, float(d[0]) * 10).weight) == 1
    # the full-grid (gpu profile) branch: a conv decoder without activations is affine, so it has a read-out too
    conv = DecodeSZ(GRID, 5, 3, decoder="conv", mask=_mask(), common_readout="decoder", **TINY).eval()
    conv_ro = fit_common_readout(conv, batches, 1e-12)
    assert 1 <= len(conv_ro.weight) <= 5 and torch.isfinite(conv_ro.weight).all()
    with pytest.raises(ValueError, match="at least 3 subjects"):
        fit_common_readout(m, [(x[:2], None)], noise)
    with pytest.raises(ValueError, match="positive noise"):
        fit_common_readout(m, batches, 0.0)


def test_the_common_readout_in_the_patients_noise_discounts_what_the_salient_branch_decodes():
    """``model.common_readout_salient_noise``: C's axes in the metric sigma^2 Wc Sigma^-1 Wc^T with
    Sigma = sigma^2 I + Ws^T Lambda Ws (the patients' noise around their twin): a common direction whose pattern is
    a salient one counts little in C's features; the others count as before."""
    from dist_decode.model.readout import common_patterns, fit_common_readout, salient_patterns

    u = torch.randn(int(_mask().sum()), generator=torch.Generator().manual_seed(3))
    u = u / u.norm()

    def model(salient_noise: bool) -> DecodeSZ:
        m = _common_readout_model(7)
        m.common_readout_salient_noise = salient_noise
        with torch.no_grad():
            m.salient_decoder.dense.weight.normal_()
            m.salient_decoder.dense.weight[:, 0] = u  # a salient pattern ...
            m.common_decoder.dense.weight[:, 0] = u  # ... that common direction 0 decodes too
            m.specific.head.mu.weight[0].mul_(1e3)  # the patients' s_0 varies far more than the noise
        return m

    g = torch.Generator().manual_seed(8)
    x = torch.randn(60, 1, *GRID, generator=g)
    patient = torch.arange(60) % 2 == 0
    batches = [(x[k:k + 16], patient[k:k + 16]) for k in range(0, 60, 16)]
    plain, noisy = model(False), model(True)
    with torch.no_grad():
        c = plain.encode_common(x)[0].double()
        s = plain.encode_specific_encoder(x[patient])[0].double()
        wc, ws = common_patterns(plain), salient_patterns(plain)
    noise = float(c[:, 0].var()) / 10  # direction 0 decodes 10x the noise in the plain metric
    ro_plain, ro = fit_common_readout(plain, batches, noise), fit_common_readout(noisy, batches, noise)
    # the explicit metric (small V)
    lam = torch.cov(s.T)
    lam = lam + 1e-6 * lam.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    sigma = noise * torch.eye(wc.shape[1], dtype=torch.float64) + ws.T @ lam @ ws
    gram = noise * wc @ torch.linalg.solve(sigma, wc.T)
    gv, gq = torch.linalg.eigh(0.5 * (gram + gram.T))
    g_half = (gq * gv.clamp_min(0).sqrt()) @ gq.T
    want = torch.linalg.eigvalsh(g_half @ torch.cov(c.T) @ g_half).flip(0).clamp_min(0)
    assert torch.allclose(ro.variances.double(), want, rtol=1e-3, atol=1e-6 * float(want[0]))
    # direction 0 decodes below the patients' noise: its axis drops out, and moving c along it hardly moves C;
    # along another direction C moves as before
    assert len(ro.weight) == len(ro_plain.weight) - 1
    e0, e1 = torch.eye(5)[0], torch.eye(5)[1]
    assert (ro.weight @ e0).norm() < 0.1 * (ro_plain.weight @ e0).norm()
    assert (ro.weight @ e1).norm() == pytest.approx(float((ro_plain.weight @ e1).norm()), rel=0.2)
    with pytest.raises(ValueError, match="common_readout_salient_noise"):
        fit_common_readout(noisy, [(x, torch.zeros(60, dtype=torch.bool))], noise)
    # the default since 2026-12-02; a config saved before the field gets the plain metric
    assert RunConfig().model.common_readout_salient_noise is True
    saved = RunConfig().to_dict()
    del saved["model"]["common_readout_salient_noise"]
    assert RunConfig.from_saved_dict(saved).model.common_readout_salient_noise is False


def test_the_diagnosis_auc_finds_a_low_variance_direction_in_any_basis():
    """C diagnosis AUC: a diagnosis difference in a low-variance direction mixed into high-variance columns (as
    in the C encoder's raw means) is found, and rotating or rescaling the features does not change the AUC."""
    from dist_decode.analysis.recovery import cv_auc

    rng = np.random.default_rng(3)
    n = 60
    y = np.arange(n) % 2 == 0
    z = np.c_[rng.normal(0, 5.0, (n, 4)), rng.normal(0, 0.1, n) + 0.15 * y]  # diagnosis: direction 5, sd 0.1
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    x = z @ q.T  # every column mixes the strong directions and the weak one
    auc = cv_auc(x, y, 0)
    assert auc > 0.75
    other = x @ np.linalg.qr(rng.normal(size=(5, 5)))[0] * np.array([1.0, 10.0, 0.1, 3.0, 1.0])
    assert abs(cv_auc(other, y, 0) - auc) < 1e-6
    assert cv_auc(rng.normal(size=(n, 5)), y, 0) < 0.75
    assert cv_auc(np.ones((n, 2)), y, 0) == 0.5  # no variance: chance


def test_feature_space_c_is_the_readout_when_the_file_has_one(tmp_path: Path):
    from dist_decode.contracts import features as features_contract

    n = 4
    base = dict(participant_id=np.array([f"sub-{i}" for i in range(n)]), site=np.array(["A"] * n),
                diagnosis=np.array(["SZ", "HC"] * 2), split=np.array(["test"] * n),
                c_mean=np.arange(n * 5, dtype=np.float32).reshape(n, 5), s_mean=np.zeros((n, 3), np.float32),
                c_samples=np.ones((n, 2, 5), np.float32))
    old = features_contract.read(features_contract.write(tmp_path / "old.h5", features_contract.FoldFeatures(**base)))
    assert np.array_equal(old.space("C"), base["c_mean"]) and old.space_datasets("C") == ("c_mean", "c_samples")
    read = np.full((n, 2), 3.0, np.float32)
    new = features_contract.read(features_contract.write(tmp_path / "new.h5", features_contract.FoldFeatures(
        **base, c_readout_mean=read, c_readout_samples=np.zeros((n, 2, 2), np.float32))))
    assert np.array_equal(new.space("C"), read) and new.space("C", samples=True).shape == (2, n, 2)
    assert np.array_equal(new.c_mean, base["c_mean"])  # the decoder's own latents stay (the maps decode them)
    assert new.take(np.array([0, 2])).space("C").shape == (2, 2)


def test_the_decoder_readout_needs_a_linear_salient_branch_and_the_eigen_noise():
    from dist_decode.model.readout import salient_patterns

    for field, other, branch in (("specific_readout", "common_readout", "linear in s"),
                                 ("common_readout", "specific_readout", "linear in c")):
        assert getattr(RunConfig().model, field) == "decoder" == getattr(profile_config("cpu").model, field)
        off = f'model.{other}="encoder"'
        with pytest.raises(ValueError, match=f"model.{field}.*{branch}"):
            override(RunConfig(), ['model.decoder_activation="silu"', off])
        with pytest.raises(ValueError, match=f"model.{field}.*route 'additive'"):
            override(RunConfig(), ['model.route="joint"', off])
        with pytest.raises(ValueError, match=f"model.{field}.*loss.noise 'eigen'"):
            override(RunConfig(), ['loss.noise="fixed"', off])
    both = ['model.specific_readout="encoder"', 'model.common_readout="encoder"']
    assert override(RunConfig(), ['model.route="joint"', *both]).model.route == "joint"
    # a conv branch with SiLU (the config refuses it with a decoder read-out) has no closed form
    from dist_decode.model.readout import common_patterns

    for field, branch, patterns, match in (("specific_readout", "salient_decoder", salient_patterns, "not linear in s"),
                                           ("common_readout", "common_decoder", common_patterns, "not linear in c")):
        m = DecodeSZ(GRID, 5, 3, decoder="conv", decoder_activation="silu", mask=_mask(), **{field: "decoder"},
                     **TINY)
        with torch.no_grad():
            for p in getattr(m, branch).parameters():
                p.add_(0.3 * torch.randn_like(p))
        with pytest.raises(ValueError, match=match):
            patterns(m)
    # a config saved before the read-out existed keeps the encoder
    saved = RunConfig().to_dict()
    del saved["model"]["specific_readout"], saved["model"]["common_readout"]
    old = RunConfig.from_saved_dict(saved).model
    assert old.specific_readout == "encoder" == old.common_readout


def test_planted_half_max_is_the_ceiling_of_a_half_maximum_map():
    """The planted effect's own half-maximum region: per planted region, in its direction; its Dice with the
    1-sigma cores is what a map that recovers each effect's half maximum exactly scores."""
    from dist_decode.analysis.recovery import planted_half_max

    shape = (40, 40, 40)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    r2a = ((x - np.array([10.0, 10, 10])[:, None, None, None]) ** 2).sum(0)
    r2b = ((x - np.array([28.0, 28, 28])[:, None, None, None]) ** 2).sum(0)
    sa, sb = 3.0, 2.0
    # a loss (peak -0.2) and a weaker gain (peak +0.05): each region's half maximum is relative to its own peak
    effect = -0.2 * np.exp(-r2a / (2 * sa ** 2)) + 0.05 * np.exp(-r2b / (2 * sb ** 2))
    # a ring of gain around the loss (a displacement's moved tissue) is not part of the loss's half maximum
    effect += 0.03 * np.exp(-((np.sqrt(r2a) - 3 * sa) ** 2) / 2)
    cores = (r2a <= sa ** 2) | (r2b <= sb ** 2)
    mask = np.ones(shape, bool)
    half = planted_half_max(effect, cores, mask)
    radius = np.sqrt(2 * np.log(2))  # the half maximum of a Gaussian, in sigmas
    expect = (r2a <= (radius * sa) ** 2 + 1e-9) | (r2b <= (radius * sb) ** 2 + 1e-9)
    assert (half ^ expect).sum() <= 0.03 * expect.sum()  # the ring's small gain shifts a few edge voxels
    assert not half[(np.sqrt(r2a) > 2 * sa) & (r2a < r2b)].any()  # no voxel of the loss's ring
    ov = half.astype(int) * 3
    r = maps_recovery(ov, cores, mask, None, effect)
    assert r["dice_half_max"] == 1.0 and r["planted_half_max"] == int(half.sum())
    assert r["dice_ceiling"] == pytest.approx(r["maps Dice"]) and 0.6 < r["dice_ceiling"] < 0.8
    # a map of the cores alone scores 1 against the cores and the ceiling against the half maximum
    r2 = maps_recovery(cores.astype(int) * 3, cores, mask, None, effect)
    assert r2["maps Dice"] == 1.0 and r2["dice_half_max"] == pytest.approx(r["dice_ceiling"])
    # outside the brain mask nothing counts
    assert not planted_half_max(effect, cores, np.zeros(shape, bool)).any()


def test_the_counter_ring_share_discounts_what_noise_puts_around_a_cluster():
    """Patients' maps of a small, weak density loss plus smooth noise: the noise's gains around the loss read as
    a counter-ring (share over 5 %); counted only beyond one standard error of the mean, they do not, while a
    displacement's ring in the same noise stays above 5 %. The extent follows: the density loss is cut to its
    unsmoothed width only with the noise discounted, the displacement keeps its half maximum."""
    from scipy import ndimage

    from dist_decode.maps.group import RING_SHARE, counter_ring_share, site_group_map

    voxel, n = 3.0, 12
    grid = np.indices((40, 20, 20)).astype(float) * voxel
    r1 = np.sqrt((grid[0] - 30) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    r2 = np.sqrt((grid[0] - 90) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 30) ** 2)
    gauss = lambda r, w: np.exp(-r ** 2 / (2 * w ** 2))  # noqa: E731
    s, k = 4.0, 8.0 / np.sqrt(8 * np.log(2)) / voxel
    raw = 0.12 * (-gauss(r1, s) + gauss(r1, 2 * s) / 8 - gauss(r2, s))  # a displacement, a density loss
    rng = np.random.default_rng(3)
    maps = np.stack([ndimage.gaussian_filter(raw + 0.15 * rng.normal(size=raw.shape), k) for _ in range(n)])
    mask = np.ones(raw.shape, bool)
    gm = site_group_map(maps, mask, "fwe", 0.05, 200, np.random.default_rng(0), 8.0, (voxel,) * 3)
    significant = gm.binary > 0
    labels, m = ndimage.label(significant & (gm.t < 0), structure=np.ones((3, 3, 3)))
    disp, dens = labels[10, 10, 10] - 1, labels[30, 10, 10] - 1
    assert disp >= 0 and dens >= 0 and disp != dens
    raw_share = counter_ring_share(labels, m, -gm.mean, 12.0, (voxel,) * 3)
    net_share = counter_ring_share(labels, m, -gm.mean, 12.0, (voxel,) * 3, se=gm.se)
    assert raw_share[dens] > RING_SHARE and net_share[dens] < 0.5 * RING_SHARE  # noise, not a ring
    assert net_share[disp] > 2 * RING_SHARE and net_share[disp] <= raw_share[disp]  # a ring beyond the noise
    args = (significant, gm.t, gm.mean, 0.5, 8.0, (voxel,) * 3)
    measured = half_max_extent(*args, tested=gm.mean)
    net = half_max_extent(*args, tested=gm.mean, tested_se=gm.se)
    plain = half_max_extent(significant, gm.t, gm.mean, 0.5)
    near_disp, near_dens = r1 < 25, r2 < 25
    np.testing.assert_array_equal(net & near_disp, plain & near_disp)  # the displacement keeps its half max
    np.testing.assert_array_equal(measured & near_dens, plain & near_dens)  # noise taken for a ring: as wide
    assert (net & near_dens).sum() < 0.8 * (plain & near_dens).sum()  # the loss cut towards its own width
    # the default since 2026-12-03; a run saved before the field keeps the share as measured
    assert RunConfig().maps.counter_ring_noise is True
    saved = RunConfig().to_dict()
    del saved["maps"]["counter_ring_noise"]
    assert RunConfig.from_saved_dict(saved).maps.counter_ring_noise is False
