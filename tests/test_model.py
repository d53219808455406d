"""The DECODE-SZ model, the 2022 anchor and their losses (real modules, random tensors)."""
from __future__ import annotations

import math

import pytest
import torch

from dist_decode.config import RunConfig, override
from dist_decode.model import (
    ANCHOR_N_PARAMETERS,
    DECODE_SZ_BUDGET,
    AnchorCVAE2022,
    DecodeSZ,
    TCDiscriminator,
    anchor_loss,
    build_discriminator,
    build_model,
    count_parameters,
    decode_sz_loss,
    discriminator_loss,
)
from dist_decode.model.blocks import crop_to, pad_amounts, pad_to, padded_shape
from dist_decode.model.loss import kl_normal

FULL_GRID = (113, 137, 113)


def _full_grid_mask() -> torch.Tensor:
    """A brain-sized box mask of the full grid (the default model's S read-out keeps one weight per mask voxel,
    a buffer, not a parameter)."""
    m = torch.zeros(FULL_GRID, dtype=torch.bool)
    m[15:-15, 20:-20, 15:-15] = True
    return m
TINY = dict(channels=(4, 8, 8), bottleneck=4, hidden=32, groups=4)


def test_default_model_within_budget_at_full_grid():
    cfg = RunConfig()
    model = build_model(cfg, FULL_GRID, mask=_full_grid_mask())
    assert build_discriminator(cfg) is None  # the TC term is off by default (docs/science.md)
    n = count_parameters(model) + count_parameters(TCDiscriminator(32, cfg.model.discriminator_hidden))
    print(f"DECODE-SZ default at {FULL_GRID}: {n:,} parameters ({n / ANCHOR_N_PARAMETERS:.2%} of the anchor)")
    assert DECODE_SZ_BUDGET == 10_121_737
    assert n <= DECODE_SZ_BUDGET
    assert n <= 54_657_384  # the seed paper's "73 % fewer" claim


def test_anchor_has_exactly_the_published_parameter_count():
    torch.manual_seed(0)
    m = AnchorCVAE2022()
    assert count_parameters(m) == ANCHOR_N_PARAMETERS == 202_434_754
    assert count_parameters(m.z_encoder) == count_parameters(m.s_encoder) == 67_336_224
    assert count_parameters(m.decoder) == 67_762_273
    assert count_parameters(m.discriminator) == 33
    # one cheap forward at 64^3 (no training: 202 M parameters): Keras 'same' shapes, sigmoid range
    m.input_scale.fill_(2.0)
    x = torch.rand(2, 1, 64, 64, 64) * 2.0
    with torch.no_grad():
        out = m(x, torch.tensor([True, False]), torch.Generator().manual_seed(0))
        terms = anchor_loss(out, RunConfig().loss)[1]
        twin = m.decode(out["c"], out["s_dec"])
    assert out["x_hat"].shape == (2, 1, 64, 64, 64)
    assert 0.0 <= float(out["x_hat"].min()) and float(out["x_hat"].max()) <= 1.0
    assert float(twin.max()) <= 2.0  # back in store units
    assert 0.085 <= float(out["q_joint"].min()) and float(out["q_joint"].max()) <= 0.935
    assert all(math.isfinite(float(v)) for v in terms.values())


@pytest.mark.parametrize("grid", [(29, 35, 29), (33, 40, 31), (64, 64, 64)])
def test_decode_sz_runs_on_odd_grids(grid):
    m = DecodeSZ(grid, 8, 8, **TINY)
    x = torch.rand(4, 1, *grid)
    out = m(x, torch.tensor([True, True, False, False]), torch.Generator().manual_seed(1), control_s=True)
    assert out["x_hat"].shape == x.shape
    assert m.encode_common(x)[0].shape == (4, 8) and m.encode_specific(x)[1].shape == (4, 8)
    assert m.decode(out["c"], out["s_dec"]).shape == x.shape


def test_decode_sz_runs_at_full_cat12_grid_without_code_change():
    m = DecodeSZ(FULL_GRID, 4, 4, channels=(4, 4, 4, 4, 4), bottleneck=2, hidden=8, groups=2)
    with torch.no_grad():
        out = m(torch.rand(2, 1, *FULL_GRID), torch.tensor([True, False]))
    assert out["x_hat"].shape == (2, 1, *FULL_GRID)


def test_pad_and_crop_round_trip():
    grid = (29, 35, 29)
    target = padded_shape(grid, 3)
    assert target == (32, 40, 32)
    pads = pad_amounts(grid, target)
    x = torch.rand(2, 1, *grid)
    assert torch.equal(crop_to(pad_to(x, pads), pads), x)


def test_kl_normal_matches_torch_distributions():
    torch.manual_seed(0)
    mu, lv = torch.randn(5, 3), torch.randn(5, 3)
    for s0 in (1.0, 0.1):
        q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
        p = torch.distributions.Normal(torch.zeros(3), torch.full((3,), s0))
        ref = torch.distributions.kl_divergence(q, p).sum(1)
        assert torch.allclose(kl_normal(mu, lv, s0), ref, atol=1e-5)


def _tiny_setup(control_s_weight=1.0):
    torch.manual_seed(0)
    cfg = override(RunConfig(), [f"loss.control_s_weight={control_s_weight}"])
    grid = (17, 19, 15)
    m = DecodeSZ(grid, 6, 5, **TINY)
    x = torch.rand(6, 1, *grid)
    patient = torch.tensor([True, True, True, False, False, False])
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[2:-2, 2:-2, 2:-2] = True
    return cfg, m, x, patient, mask


def test_controls_specific_code_never_reaches_the_decoder():
    cfg, m, x, patient, mask = _tiny_setup()
    disc = TCDiscriminator(11)
    out = m(x, patient, torch.Generator().manual_seed(3), control_s=True)
    ctl = out["control_index"]
    # the decoder received exact zeros for the controls
    assert torch.equal(out["s_dec"][ctl], torch.zeros(3, 5))
    # and no gradient path from the controls' S posterior to their reconstruction
    rec_ctl = ((out["x_hat"][ctl] - out["x"][ctl]) ** 2)[:, :, mask].sum()
    g = torch.autograd.grad(rec_ctl, [out["s_ctl_mu"], out["s_ctl_logvar"]], allow_unused=True, retain_graph=True)
    assert all(v is None or torch.count_nonzero(v) == 0 for v in g)
    # ... while the pull-to-zero term does act on it (the option works)
    total, terms = decode_sz_loss(out, mask, cfg.loss, disc, noise_var=1.0)
    g_total = torch.autograd.grad(total, out["s_ctl_mu"], retain_graph=True)[0]
    assert torch.count_nonzero(g_total) > 0 and float(terms["control_s"]) > 0
    # changing the S encoder changes the patients' reconstructions but not the controls'
    before = out["x_hat"].detach().clone()
    with torch.no_grad():
        for p in m.specific.parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = m(x, patient, torch.Generator().manual_seed(3), control_s=True)["x_hat"]
    assert torch.equal(after[ctl], before[ctl])
    assert not torch.allclose(after[out["patient_index"]], before[out["patient_index"]])
    # controls are decoded from [c, 0] exactly as decode() does for a healthy twin
    twin = m.decode_normalized(out["c"][ctl].detach(), torch.zeros(3, 5))
    assert torch.allclose(twin, before[ctl], atol=1e-6)


def test_decode_sz_loss_terms_and_weights():
    cfg, m, x, patient, mask = _tiny_setup(control_s_weight=0.0)
    cfg = override(cfg, ["loss.gamma_tc=10"])
    disc = TCDiscriminator(11)
    out = m(x, patient, torch.Generator().manual_seed(4), control_s=False)
    total, t = decode_sz_loss(out, mask, cfg.loss, disc, noise_var=0.25)
    n = x.shape[0]
    expect = t["recon"] + cfg.loss.beta * (t["kl_c_patients"] + t["kl_s_patients"] + t["kl_c_controls"]) \
        + cfg.loss.gamma_tc * t["tc"] + cfg.loss.match_weight * n * t["match_c"]
    assert torch.allclose(total.detach(), expect, rtol=1e-5)
    assert float(t["control_s"]) == 0.0 and float(t["tc"]) != 0.0 and float(t["match_c"]) != 0.0
    # the Gaussian likelihood: half the masked squared error over the noise variance, per subject
    se = ((out["x_hat"] - out["x"]) ** 2)[:, :, mask].sum() / n
    assert torch.allclose(t["recon"], 0.5 * se.detach() / 0.25, rtol=1e-5)
    # reconstruction counts only mask voxels: changing voxels outside the mask changes nothing
    x2 = out["x"].clone()
    x2[:, :, ~mask] += 5.0
    out2 = dict(out, x=x2)
    assert torch.allclose(decode_sz_loss(out2, mask, cfg.loss, disc, 0.25)[1]["recon"], t["recon"])
    with pytest.raises(ValueError, match="noise variance"):
        decode_sz_loss(out, mask, cfg.loss, disc)
    total.backward()
    assert all(p.grad is None for p in disc.parameters())  # the VAE loss never trains the discriminator
    assert m.common.head.mu.weight.grad is not None and m.specific.head.mu.weight.grad is not None


def test_tc_discriminator_detects_dependence_between_c_and_s():
    torch.manual_seed(0)

    def trained_tc(dependent: bool) -> float:
        disc = TCDiscriminator(8, 32)
        opt = torch.optim.Adam(disc.parameters(), lr=3e-3, betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            c = torch.randn(64, 4, generator=g)
            s = c + 0.1 * torch.randn(64, 4, generator=g) if dependent else torch.randn(64, 4, generator=g)
            opt.zero_grad()
            discriminator_loss(disc, c, s).backward()
            opt.step()
        c = torch.randn(512, 4, generator=g)
        s = c + 0.1 * torch.randn(512, 4, generator=g) if dependent else torch.randn(512, 4, generator=g)
        with torch.no_grad():
            return float(disc(torch.cat([c, s], 1)).mean())

    assert trained_tc(True) > 1.0  # density-ratio estimate of TC: clearly positive when s copies c
    assert abs(trained_tc(False)) < 0.3


def test_anchor_loss_matches_the_published_formula():
    torch.manual_seed(0)
    cfg = RunConfig().loss
    n, d = 4, 3
    out = {
        "x": torch.rand(n, 1, 4, 4, 4), "x_hat": torch.rand(n, 1, 4, 4, 4),
        "c_mu": torch.randn(n, d), "c_logvar": torch.randn(n, d) * 0.1,
        "s_mu": torch.randn(2, d), "s_logvar": torch.randn(2, d) * 0.1,
        "q_joint": torch.tensor([[0.6], [0.3]]), "q_shuffled": torch.tensor([[0.2], [0.5]]),
        "patient_index": torch.tensor([0, 1]), "control_index": torch.tensor([2, 3]),
    }
    total, t = anchor_loss(out, cfg)
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    rec = (mse(out["x_hat"][:2], out["x"][:2]) + mse(out["x_hat"][2:], out["x"][2:])) * 64
    kl = lambda m, v: -0.5 * (1 + v - m ** 2 - v.exp()).sum(1)  # noqa: E731
    kls = float((kl(out["c_mu"][:2], out["c_logvar"][:2]) + kl(out["s_mu"], out["s_logvar"])
                 + kl(out["c_mu"][2:], out["c_logvar"][2:])).mean())
    q, qb = out["q_joint"], out["q_shuffled"]
    tc = float(torch.log(q / (1 - q)).mean())
    disc = float((-torch.log(q) - torch.log(1 - qb)).mean())
    assert math.isclose(float(total), rec + kls + 100 * tc + disc, rel_tol=1e-5)
    assert math.isclose(float(t["tc"]), tc, rel_tol=1e-6)


def test_unknown_model_and_loss_are_clear_errors():
    with pytest.raises(ValueError, match="model.name"):
        build_model(override(RunConfig(), ["model.name=nope"]), (8, 8, 8))
    with pytest.raises(ValueError, match="anchor2022 runs at"):
        build_model(override(RunConfig(), ["model.name=anchor2022"]), (29, 35, 29))
    with pytest.raises(ValueError, match="needs model.name 'anchor2022'"):
        build_discriminator(override(RunConfig(), ["loss.kind=anchor2022"]))


def test_readme_states_the_parameter_counts():
    """The counts the README quotes are the models' own (default at the full grid, cpu profile at the demo grid)."""
    import re
    from pathlib import Path

    from dist_decode.config import profile_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"The default model has \*\*([\d,]+) parameters\*\* at the full CAT12 grid", readme)
    assert quoted, "README: the default model's parameter count sentence is missing"
    assert int(quoted.group(1).replace(",", "")) == count_parameters(build_model(RunConfig(), FULL_GRID, mask=_full_grid_mask()))
    demo = re.search(r"the `cpu` profile has \*\*([\d,]+) parameters\*\* at the demo's 3 mm grid", readme)
    assert demo, "README: the cpu profile's parameter count sentence is missing"
    grid = (57, 69, 57)
    mask = torch.zeros(grid, dtype=torch.bool)
    # the dense decoder predicts the brain-mask voxels: the demo store's mask has 64,098
    mask.view(-1)[:64098] = True
    m = build_model(profile_config("cpu"), grid, mask=mask, voxel_mm=3.0)
    assert int(demo.group(1).replace(",", "")) == count_parameters(m)
    anchor = re.search(r"\*\*([\d.]+) %\*\* of the anchor", readme)
    assert anchor and float(anchor.group(1)) == round(100 * count_parameters(build_model(RunConfig(), FULL_GRID, mask=_full_grid_mask()))
                                                      / ANCHOR_N_PARAMETERS, 2)
