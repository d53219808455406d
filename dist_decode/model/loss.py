"""Loss of the contrastive VAE (DECODE-SZ variant and the published 2022 anchor variant).

DECODE-SZ loss (``loss.kind = "decode_sz"``), per step, averaged over the subjects of a rank's batch::

    recon   masked squared error over store.mask voxels (sum, or mean with loss.recon="mean")
    + beta * (KL[q(c|patient)] + KL[q(s|patient)] + KL[q(c|control)])      standard-normal priors
    + gamma_tc * TC                                                       FactorVAE density-ratio estimate
    + control_s_weight * KL[q(s|control) || N(0, control_s_prior_std^2)]  pulls controls' S to zero

TC is the mean logit of a separate discriminator ``D`` on patients' ``[c, s]`` samples:
``log D/(1-D)`` estimates ``log q(c,s) / q(c)q(s)`` (Kim & Mnih 2018). ``D`` has its own optimiser
and is trained to tell joint pairs from pairs whose ``s`` was shuffled across patients
(:func:`discriminator_loss`); the VAE sees ``D`` with frozen (detached) weights.

Anchor loss (``loss.kind = "anchor2022"``, pub-CVAE-MRI-ASD make_models2.py): unmasked
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


def masked_sq_error(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Per-subject squared error over the ``mask`` voxels -> (N,); ``reduce`` "sum" or "mean"."""
    d = (x_hat.float() - x.float()).flatten(1)[:, mask.flatten()]
    se = (d * d).sum(dim=1)
    return se / mask.sum() if reduce == "mean" else se


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
    out: dict[str, torch.Tensor], mask: torch.Tensor, cfg, disc: TCDiscriminator | None
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

    Returns
    -------
    total : Tensor
        Scalar to back-propagate.
    terms : dict of str to float
        Every term (unweighted), for metrics.
    """
    pidx, cidx = out["patient_index"], out["control_index"]
    rec = masked_sq_error(out["x_hat"], out["x"], mask, cfg.recon)
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
