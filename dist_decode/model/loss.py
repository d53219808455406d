"""Loss of the contrastive VAE (DECODE-SZ variant and the published 2022 anchor variant).

DECODE-SZ loss (``loss.kind = "decode_sz"``), per step, averaged over the subjects of a rank's batch::

    recon   masked squared error over the mask voxels / (2 sigma^2)         Gaussian likelihood, loss.noise
    + beta * (KL[q(c|patient)] + KL[q(s|patient)] + KL[q(c|control)])      standard-normal priors
    + gamma_tc * TC                                                       FactorVAE density-ratio estimate
    + control_s_weight * KL[q(s|control) || N(0, control_s_prior_std^2)]  pulls controls' S to zero
    + match_weight * n * MMD^2(c_mean | patients, c_mean | controls)      keeps diagnosis out of C

``sigma^2`` is the ``eigen`` noise level the trainer estimates once per fold (``loss.noise = "eigen"``), or the
old fixed reduction (``"fixed"``: sum over voxels, i.e. sigma^2 = 1/2, or their mean with ``recon="mean"``).
The MMD is the unbiased (U-statistic) estimate with Gaussian kernels at several multiples of the batch's
median squared distance: zero in expectation when the two groups' C distributions match, whatever its
scale, so it pushes neither towards a collapsed C nor towards any particular spread.

TC is the mean logit of a separate discriminator ``D`` on patients' ``[c, s]`` samples:
``log D/(1-D)`` estimates ``log q(c,s) / q(c)q(s)`` (Kim & Mnih 2018). ``D`` has its own optimiser
and is trained to tell joint pairs from pairs whose ``s`` was shuffled across patients
(:func:`discriminator_loss`); the VAE sees ``D`` with frozen (detached) weights.

Anchor loss (``loss.kind = "anchor2022"``, github.com/Aglinskas/pub-CVAE-MRI-ASD make_models2.py): unmasked
``(mse_patients + mse_controls) * 64^3`` + beta * mean KL + anchor_gamma * mean TC + DISC, the
discriminator being the anchor's own 33-parameter layer trained by the same optimiser.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, prior_std: float = 1.0) -> torch.Tensor:
    """KL( N(mu, exp(logvar)) || N(0, prior_std^2) ), summed over latent dims -> (N,)."""
    mu, logvar = mu.float(), logvar.float()
    v0 = prior_std ** 2
    return 0.5 * torch.sum((logvar.exp() + mu ** 2) / v0 - 1.0 - logvar + math.log(v0), dim=1)


def mask_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the ``True`` voxels of a boolean mask (index_select is much faster than boolean indexing)."""
    return mask.flatten().nonzero().squeeze(1) if mask.dtype == torch.bool else mask


def masked_sq_error(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Per-subject squared error over the ``mask`` voxels -> (N,); ``reduce`` "sum" or "mean".

    ``mask`` is a boolean grid or its :func:`mask_index`.
    """
    idx = mask_index(mask)
    d = (x_hat.float() - x.float()).flatten(1).index_select(1, idx)
    se = (d * d).sum(dim=1)
    return se / idx.numel() if reduce == "mean" else se


def gaussian_nll(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, noise_var: float) -> torch.Tensor:
    """Per-subject ``0.5 * sum over mask voxels of (x_hat - x)^2 / noise_var`` -> (N,) (constants dropped)."""
    return 0.5 * masked_sq_error(x_hat, x, mask, "sum") / float(noise_var)


def eigen_noise_variance(x: torch.Tensor, n_total: int | None = None) -> float:
    """The median eigenvalue of the covariance of ``n`` volumes ``x`` (n, V): the level of pure noise directions.

    The covariance of ``n`` subjects has ``n - 1`` non-zero eigenvalues; with a few factors of real variation
    the rest are noise, so the median is the noise level a direction must exceed to be distinguishable from
    noise with this many subjects (used as the Gaussian likelihood's variance, a latent direction is worth
    encoding exactly when it explains more). ``n_total`` rescales the estimate from a subset of ``n`` subjects
    to the ``n_total`` a model learns from: the sample-noise level falls as ``1 / (n - 1)``.

    Raises
    ------
    ValueError
        With fewer than 3 volumes.
    """
    z = x.double().flatten(1)
    n = z.shape[0]
    if n < 3:
        raise ValueError(f"{n} volumes are too few to estimate the noise level (need 3)")
    z = z - z.mean(0)
    ev = torch.linalg.eigvalsh(z @ z.T / (n - 1)).flip(0)[: n - 1]
    scale = (n - 1) / max(1, (n_total or n) - 1)
    return float(ev.median()) * scale


def mmd_unbiased(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Unbiased squared MMD between samples ``a`` (n, d) and ``b`` (m, d), n, m >= 2.

    Gaussian kernels ``exp(-|x - y|^2 / (2 s^2 h))`` summed over ``scales`` s, with ``h`` the (detached) median
    squared distance of the pooled batch: the estimate does not depend on the scale of the latents.
    """
    a, b = a.float(), b.float()
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        return a.new_zeros(())
    with torch.no_grad():
        pooled = torch.cat([a, b])
        h = torch.cdist(pooled, pooled).pow(2).median().clamp_min(1e-8)

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, y).pow(2) / h
        return sum(torch.exp(-d / (2.0 * s * s)) for s in scales)

    kaa, kbb = k(a, a), k(b, b)
    return ((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
            - 2.0 * k(a, b).mean())


class TCDiscriminator(nn.Module):
    """MLP telling joint ``[c, s]`` pairs from pairs with ``s`` shuffled (logit > 0 = joint)."""

    def __init__(self, dims: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dims, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def discriminator_loss(disc: TCDiscriminator, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``disc`` on joint pairs (label 1) vs ``s`` rolled by one patient (label 0).

    Inputs are detached: this loss trains only the discriminator. Needs at least two patients.
    """
    c, s = c.detach().float(), s.detach().float()
    joint = disc(torch.cat([c, s], dim=1))
    shuffled = disc(torch.cat([c, torch.roll(s, 1, dims=0)], dim=1))
    return 0.5 * (
        F.binary_cross_entropy_with_logits(joint, torch.ones_like(joint))
        + F.binary_cross_entropy_with_logits(shuffled, torch.zeros_like(shuffled))
    )


def decode_sz_loss(
    out: dict[str, torch.Tensor], mask: torch.Tensor, cfg, disc: TCDiscriminator | None,
    noise_var: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DECODE-SZ loss from a model forward ``out`` (see the module docstring).

    Parameters
    ----------
    out : dict
        Output of ``model.forward``.
    mask : bool Tensor (X, Y, Z)
        Brain mask on the model grid.
    cfg : LossConfig
    disc : TCDiscriminator or None
        Used with frozen weights for the TC term; ``None`` or ``gamma_tc == 0`` skips TC.
    noise_var : float, optional
        The ``eigen`` noise variance (required when ``cfg.noise == "eigen"``).

    Returns
    -------
    total : Tensor
        Scalar to back-propagate.
    terms : dict of str to float
        Every term (unweighted), for metrics.
    """
    pidx, cidx = out["patient_index"], out["control_index"]
    if cfg.noise == "eigen":
        if noise_var is None:
            raise ValueError("loss.noise 'eigen' needs the fold's noise variance")
        rec = gaussian_nll(out["x_hat"], out["x"], mask, noise_var)
    elif cfg.noise == "fixed":
        rec = masked_sq_error(out["x_hat"], out["x"], mask, cfg.recon)
    else:
        raise ValueError(f"loss.noise {cfg.noise!r}: expected 'eigen' or 'fixed'")
    n = max(1, rec.shape[0])
    kl_c = kl_normal(out["c_mu"], out["c_logvar"])
    kl_s = kl_normal(out["s_mu"], out["s_logvar"])
    # per-subject means of each term; patients contribute c and s, controls c only
    recon = rec.sum() / n
    kl_c_pat = kl_c[pidx].sum() / n
    kl_c_ctl = kl_c[cidx].sum() / n
    kl_s_pat = kl_s.sum() / n
    total = recon + cfg.beta * (kl_c_pat + kl_s_pat + kl_c_ctl)
    terms = {
        "recon": recon.detach(), "recon_patients": rec[pidx].sum().detach() / max(1, pidx.numel()),
        "recon_controls": rec[cidx].sum().detach() / max(1, cidx.numel()),
        "kl_c_patients": kl_c_pat.detach(), "kl_s_patients": kl_s_pat.detach(), "kl_c_controls": kl_c_ctl.detach(),
    }
    tc = torch.zeros((), device=recon.device)
    if disc is not None and cfg.gamma_tc and pidx.numel():
        z = torch.cat([out["c"][pidx].float(), out["s"].float()], dim=1)
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        tc = functional_call(disc, frozen, (z,)).mean()
        total = total + cfg.gamma_tc * tc
    terms["tc"] = tc.detach()
    pull = torch.zeros((), device=recon.device)
    if cfg.control_s_weight and "s_ctl_mu" in out:
        pull = kl_normal(out["s_ctl_mu"], out["s_ctl_logvar"], cfg.control_s_prior_std).sum() / n
        total = total + cfg.control_s_weight * pull
    terms["control_s"] = pull.detach()
    match = torch.zeros((), device=recon.device)
    if cfg.match_c == "mmd" and cfg.match_weight and pidx.numel() >= 2 and cidx.numel() >= 2:
        match = mmd_unbiased(out["c_mu"][pidx], out["c_mu"][cidx])
        total = total + cfg.match_weight * n * match
    terms["match_c"] = match.detach()
    terms["total"] = total.detach()
    return total, terms


def anchor_loss(out: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Published 2022 loss (see the module docstring); ``out`` from :class:`AnchorCVAE2022`.

    Keras adds a scalar REC, per-pair KL (B,) and per-pair TC/DISC (B, 1) and takes the mean of the
    broadcast sum, which equals the sum of the means computed here.
    """
    pidx, cidx = out["patient_index"], out["control_index"]
    x, xh = out["x"].float(), out["x_hat"].float()
    vox = math.prod(x.shape[-3:])
    rec_t = F.mse_loss(xh[pidx], x[pidx]) if pidx.numel() else x.new_zeros(())
    rec_b = F.mse_loss(xh[cidx], x[cidx]) if cidx.numel() else x.new_zeros(())
    recon = (rec_t + rec_b) * vox
    kl_c = kl_normal(out["c_mu"], out["c_logvar"])
    kl_s = kl_normal(out["s_mu"], out["s_logvar"])
    kl = (kl_c[pidx].mean() + kl_s.mean() + kl_c[cidx].mean()) if pidx.numel() and cidx.numel() else kl_c.mean()
    q, qb = out["q_joint"].float(), out["q_shuffled"].float()
    if q.numel():
        tc = torch.log(q / (1 - q)).mean()
        disc = (-torch.log(q) - torch.log(1 - qb)).mean()
    else:  # a validation batch without patients
        tc = disc = x.new_zeros(())
    disc_w = cfg.anchor_gamma if cfg.anchor_disc_scale_by_gamma else 1.0
    total = recon + cfg.beta * kl + cfg.anchor_gamma * tc + disc_w * disc
    terms = {"recon": recon.detach(), "kl": kl.detach(), "tc": tc.detach(), "disc": disc.detach(),
             "total": total.detach()}
    return total, terms
