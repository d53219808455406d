"""DECODE-SZ: a contrastive VAE with a common (C) and a specific (S) 3D-CNN encoder and one decoder.

* C encodes every subject, S encodes patients (and controls only for the optional pull-to-zero term).
* The decoder receives ``[c, s]`` for patients and ``[c, 0]`` for controls; the zeros are built
  here, so a control's S-encoder output can never reach the decoder.
* The network works on any grid: inputs are zero-padded to a multiple of ``2**len(channels)`` and
  outputs cropped back. A 1x1x1 convolution narrows the last feature map to ``bottleneck`` channels
  before the dense head; this keeps the full-grid model at ~2.7 M parameters (the 2022 anchor
  spends 99.7 % of its 202 M parameters in flatten<->dense layers).
* Volumes enter and leave in the store's units (mwp1 grey-matter density); ``input_scale`` (a
  buffer, part of the state dict) maps them to ~[0, 1] inside the network.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dist_decode.model.blocks import (
    ConvBlock,
    GaussianHead,
    UpBlock,
    contrastive_pass,
    crop_to,
    group_norm,
    pad_amounts,
    pad_to,
    padded_shape,
)


class Encoder3D(nn.Module):
    """Strided 3D-CNN encoder to a diagonal Gaussian posterior.

    Parameters
    ----------
    padded : tuple of int
        Input shape after padding (multiple of ``2**len(channels)``).
    channels : sequence of int
        Width of each stride-2 stage.
    bottleneck : int
        Channels of the last feature map before flattening.
    hidden : int
        Width of the dense layer.
    latent : int
        Posterior dimension.
    groups : int
        GroupNorm groups.
    """

    def __init__(
        self, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int, latent: int, groups: int
    ) -> None:
        super().__init__()
        stages, c_in = [], 1
        for c in channels:
            stages.append(ConvBlock(c_in, c, stride=2, groups=groups))
            c_in = c
        stages += [nn.Conv3d(c_in, bottleneck, 1), group_norm(bottleneck, groups), nn.SiLU()]
        self.features = nn.Sequential(*stages)
        coarse = [p // 2 ** len(channels) for p in padded]
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(bottleneck * math.prod(coarse), hidden), nn.SiLU())
        self.head = GaussianHead(hidden, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.dense(self.features(x)))


class Decoder3D(nn.Module):
    """Dense layer to a coarse feature map, then x2 upsampling stages mirroring the encoder."""

    def __init__(
        self, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int, latent: int,
        groups: int, output: str,
    ) -> None:
        super().__init__()
        self.coarse = tuple(p // 2 ** len(channels) for p in padded)
        self.bottleneck = bottleneck
        self.dense = nn.Sequential(
            nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, bottleneck * math.prod(self.coarse)), nn.SiLU()
        )
        rev = list(channels)[::-1]
        stages = [nn.Conv3d(bottleneck, rev[0], 1), group_norm(rev[0], groups), nn.SiLU()]
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            stages.append(UpBlock(c_in, c_out, groups))
        last = max(4, rev[-1] // 2)
        stages += [UpBlock(rev[-1], last, groups), nn.Conv3d(last, 1, 3, padding=1)]
        self.features = nn.Sequential(*stages)
        if output == "softplus":
            # non-negative like grey-matter density, and unbounded above (modulated values exceed 1)
            self.act: nn.Module = nn.Softplus()
        elif output == "linear":
            self.act = nn.Identity()
        else:
            raise ValueError(f"model.output {output!r}: expected 'softplus' or 'linear'")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dense(z).view(z.shape[0], self.bottleneck, *self.coarse)
        return self.act(self.features(h))


class DecodeSZ(nn.Module):
    """The DECODE-SZ contrastive VAE.

    Parameters
    ----------
    grid : tuple of int
        Volume shape the model reads and writes (the store grid, or ``data.grid``).
    latent_common, latent_specific : int
        Dimensions of C and S.
    channels : sequence of int
        Encoder stage widths (each stage halves the grid).
    bottleneck : int
        Channels of the coarsest feature map.
    hidden : int
        Width of the dense layers.
    groups : int
        GroupNorm groups.
    output : {"softplus", "linear"}
        Output activation.
    input_scale : float
        Store units per network unit (volumes are divided by it on the way in, multiplied on the way out).
    """

    name = "decode_sz"

    def __init__(
        self,
        grid: Sequence[int],
        latent_common: int = 16,
        latent_specific: int = 16,
        channels: Sequence[int] = (16, 32, 64, 96, 128),
        bottleneck: int = 16,
        hidden: int = 256,
        groups: int = 8,
        output: str = "softplus",
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid {grid!r}: expected three positive sizes")
        self.grid = tuple(int(g) for g in grid)
        self.latent_common, self.latent_specific = latent_common, latent_specific
        padded = padded_shape(self.grid, len(channels))
        self._pads = pad_amounts(self.grid, padded)
        self.common = Encoder3D(padded, channels, bottleneck, hidden, latent_common, groups)
        self.specific = Encoder3D(padded, channels, bottleneck, hidden, latent_specific, groups)
        self.decoder = Decoder3D(padded, channels, bottleneck, hidden, latent_common + latent_specific, groups, output)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    # -- the API used by the analysis stages (volumes in store units) --------------------------------
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.grid:
            raise ValueError(f"volume grid {tuple(x.shape[-3:])} does not match the model grid {self.grid}")
        if x.ndim == 4:
            x = x.unsqueeze(1)
        return pad_to(x / self.input_scale, self._pads)

    def encode_common(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of C for volumes ``x`` (N, 1, X, Y, Z) in store units."""
        return self.common(self._prep(x))

    def encode_specific(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of S for volumes ``x`` (N, 1, X, Y, Z) in store units."""
        return self.specific(self._prep(x))

    def decode_normalized(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Decoder output in network units (store units / ``input_scale``), cropped to the grid."""
        return crop_to(self.decoder(torch.cat([c, s], dim=1)), self._pads)

    def decode(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Volumes (N, 1, X, Y, Z) in store units from latents ``c`` (N, dc) and ``s`` (N, ds).

        Pass ``s = torch.zeros(N, ds)`` for the healthy twin / a control.
        """
        return self.decode_normalized(c, s) * self.input_scale

    # -- training -------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        patient: torch.Tensor,
        generator: torch.Generator | None = None,
        control_s: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One training pass over a mixed batch.

        Parameters
        ----------
        x : Tensor (N, 1, X, Y, Z)
            Volumes in store units.
        patient : bool Tensor (N,)
            True for patients.
        generator : torch.Generator, optional
            Source of the reparameterisation noise (seeded per step and rank by the trainer).
        control_s : bool
            Also encode the controls with S (for the pull-to-zero loss term). Never decoded.

        Returns
        -------
        dict
            ``x`` and ``x_hat`` (network units, on the grid), ``c_mu``/``c_logvar``/``c`` for all N,
            ``s_mu``/``s_logvar``/``s`` for the patients, ``s_ctl_mu``/``s_ctl_logvar`` for the
            controls when ``control_s``, and ``s_dec`` (N, ds), the S input the decoder received.
        """
        xin = self._prep(x)
        out = contrastive_pass(xin, patient, self.common, self.specific, self.latent_specific,
                               self.decode_normalized, generator, control_s)
        out["x"] = crop_to(xin, self._pads)
        return out
