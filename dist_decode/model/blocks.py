"""Building blocks shared by the models: grid padding/cropping, conv stages, Gaussian heads.

The DECODE-SZ network downsamples by 2 per stage, so its input is zero-padded to a multiple of
``2**depth`` on every axis and its output cropped back; odd grids such as CAT12's 113x137x113 need
no special case. mwp1 volumes are zero outside the brain, so zero padding adds no artificial edges.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def padded_shape(grid: Sequence[int], depth: int) -> tuple[int, ...]:
    """Smallest shape >= ``grid`` whose every axis is a multiple of ``2**depth``."""
    m = 2 ** depth
    return tuple(int(math.ceil(g / m) * m) for g in grid)


def pad_amounts(grid: Sequence[int], target: Sequence[int]) -> list[tuple[int, int]]:
    """Per-axis (before, after) zero padding that centres ``grid`` inside ``target``."""
    out = []
    for g, t in zip(grid, target):
        total = t - g
        if total < 0:
            raise ValueError(f"grid {tuple(grid)} is larger than the padded shape {tuple(target)}")
        out.append((total // 2, total - total // 2))
    return out


def pad_to(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad the last three axes of ``x`` by ``pads`` ((before, after) for X, Y, Z)."""
    if not any(b or a for b, a in pads):
        return x
    flat = []
    for b, a in reversed(pads):  # F.pad lists the last axis first
        flat += [b, a]
    return F.pad(x, flat)


def crop_to(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Undo :func:`pad_to`: crop the last three axes."""
    sl = [slice(None)] * (x.ndim - 3)
    for b, a in pads:
        sl.append(slice(b, x.shape[len(sl)] - a))
    return x[tuple(sl)]


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``.

    GroupNorm rather than BatchNorm: per-rank batches are small (a few volumes) and the statistics
    must not depend on the world size or on the patient/control mix of a batch.
    """
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ConvBlock(nn.Sequential):
    """Conv3d (k3) -> GroupNorm -> SiLU; ``stride=2`` halves every axis."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 8) -> None:
        super().__init__(
            nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
            group_norm(c_out, groups),
            nn.SiLU(),
        )


class UpBlock(nn.Sequential):
    """Nearest x2 upsampling -> ConvBlock (avoids the checkerboard of transposed convolutions)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 8) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvBlock(c_in, c_out, 1, groups))


class GaussianHead(nn.Module):
    """Dense layer to the mean and log-variance of a diagonal Gaussian posterior.

    The log-variance is clamped to [-12, 8] so ``exp`` cannot overflow in bf16 early in training.
    """

    def __init__(self, c_in: int, latent: int) -> None:
        super().__init__()
        self.mu = nn.Linear(c_in, latent)
        self.logvar = nn.Linear(c_in, latent)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``mu + exp(logvar/2) * eps`` with ``eps`` from ``generator`` (reproducible per step)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32).to(mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def contrastive_pass(
    xin: torch.Tensor,
    patient: torch.Tensor,
    common: nn.Module,
    specific: nn.Module,
    latent_specific: int,
    decode_normalized,
    generator: torch.Generator | None = None,
    control_s: bool = False,
) -> dict[str, torch.Tensor]:
    """The contrastive routing shared by every model: c for all subjects, s for patients only.

    Controls are decoded from ``[c, 0]`` and patients from ``[c, s]``. ``index_copy`` writes only the
    patient rows of the decoder's S input, so no control S value (or its gradient path) can enter the
    decoder. ``xin`` is the network-units input; the caller adds model-specific outputs.
    """
    c_mu, c_logvar = common(xin)
    c = reparameterize(c_mu, c_logvar, generator)
    pidx = torch.nonzero(patient, as_tuple=False).flatten()
    cidx = torch.nonzero(~patient, as_tuple=False).flatten()
    s_mu, s_logvar = specific(xin[pidx])
    s = reparameterize(s_mu, s_logvar, generator)
    s_dec = torch.zeros(xin.shape[0], latent_specific, dtype=c.dtype, device=c.device).index_copy(0, pidx, s)
    out = {
        "x_hat": decode_normalized(c, s_dec),
        "c_mu": c_mu, "c_logvar": c_logvar, "c": c,
        "s_mu": s_mu, "s_logvar": s_logvar, "s": s, "s_dec": s_dec,
        "patient_index": pidx, "control_index": cidx,
    }
    if control_s and cidx.numel():
        out["s_ctl_mu"], out["s_ctl_logvar"] = specific(xin[cidx])
    return out


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())
