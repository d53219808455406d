"""The 2022 anchor: the contrastive VAE of Aglinskas, Hartshorne & Anzellotti (Science 2022) at 64^3.

A faithful PyTorch restatement of ``get_MRI_CVAE_3D`` (github.com/Aglinskas/pub-CVAE-MRI-ASD,
Notebooks/make_models2.py):
two unshared encoders (z = common, s = specific) Conv3D(64, k3, s2) -> Conv3D(128, k3, s2) ->
Dense(128) -> Dense(16) mean / log-variance; a decoder Dense(128) -> Dense(16^3*128) ->
Conv3DTranspose(32, s2) -> Conv3DTranspose(16, s2) -> Conv3DTranspose(1, s1, sigmoid); and a
one-layer total-correlation discriminator Dense(1, sigmoid) on ``[s, z]`` (33 parameters).
Total 202,434,754 parameters. Keras ``padding='same'`` is reproduced exactly: stride-2 convolutions
pad 0 before / 1 after, stride-2 transposed convolutions drop the last voxel of the full output.
Kernels use Keras' default Glorot-uniform initialisation and zero biases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_decode.model.blocks import contrastive_pass

ANCHOR_GRID = (64, 64, 64)
ANCHOR_N_PARAMETERS = 202_434_754


class _SameConv3d(nn.Conv3d):
    """Keras Conv3D(k3, stride 2, padding='same') on even sizes: pad 0 before, 1 after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1, 0, 1)))


class _SameConvT3d(nn.ConvTranspose3d):
    """Keras Conv3DTranspose(k3, stride 2, padding='same'): full output minus its last voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        return y[..., :-1, :-1, :-1]


class AnchorEncoder(nn.Module):
    """One anchor encoder (67,336,224 parameters at latent 16)."""

    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        self.conv1 = _SameConv3d(1, 64, 3, stride=2)
        self.conv2 = _SameConv3d(64, 128, 3, stride=2)
        self.dense = nn.Linear(16 ** 3 * 128, 128)
        self.mu = nn.Linear(128, latent)
        self.logvar = nn.Linear(128, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = F.relu(self.dense(h.flatten(1)))
        return self.mu(h), self.logvar(h)


class AnchorDecoder(nn.Module):
    """The anchor decoder (67,762,273 parameters at latent 16+16)."""

    def __init__(self, latent: int = 32) -> None:
        super().__init__()
        self.dense1 = nn.Linear(latent, 128)
        self.dense2 = nn.Linear(128, 16 ** 3 * 128)
        self.up1 = _SameConvT3d(128, 32, 3, stride=2)
        self.up2 = _SameConvT3d(32, 16, 3, stride=2)
        self.out = nn.ConvTranspose3d(16, 1, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.dense2(F.relu(self.dense1(z)))).view(z.shape[0], 128, 16, 16, 16)
        h = F.relu(self.up2(F.relu(self.up1(h))))
        return torch.sigmoid(self.out(h))


class AnchorCVAE2022(nn.Module):
    """Aglinskas et al. 2022 CVAE (same interface as :class:`~dist_decode.model.DecodeSZ`).

    Parameters
    ----------
    latent_common, latent_specific : int
        16 and 16 in the published model.
    input_scale : float
        Store units per network unit; the anchor expects intensities in [0, 1] (sigmoid output), so
        the trainer sets it to the maximum of the training volumes.
    """

    name = "anchor2022"

    def __init__(self, latent_common: int = 16, latent_specific: int = 16, input_scale: float = 1.0) -> None:
        super().__init__()
        self.grid = ANCHOR_GRID
        self.latent_common, self.latent_specific = latent_common, latent_specific
        self.z_encoder = AnchorEncoder(latent_common)
        self.s_encoder = AnchorEncoder(latent_specific)
        self.decoder = AnchorDecoder(latent_common + latent_specific)
        self.discriminator = nn.Linear(latent_common + latent_specific, 1)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.xavier_uniform_(m.weight)  # Keras glorot_uniform
                nn.init.zeros_(m.bias)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.grid:
            raise ValueError(
                f"volume grid {tuple(x.shape[-3:])} does not match the anchor grid {self.grid}; "
                "resample with dist_decode.data.resample_volume"
            )
        return (x.unsqueeze(1) if x.ndim == 4 else x) / self.input_scale

    def encode_common(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of z (common) for volumes in store units at 64^3."""
        return self.z_encoder(self._prep(x))

    def encode_specific(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of s (specific) for volumes in store units at 64^3."""
        return self.s_encoder(self._prep(x))

    def decode_normalized(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Decoder output in [0, 1] (network units)."""
        return self.decoder(torch.cat([c, s], dim=1))

    def decode(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Volumes (N, 1, 64, 64, 64) in store units."""
        return self.decode_normalized(c, s) * self.input_scale

    def discriminate(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Published squashed discriminator score ``(sigmoid(D[s, z]) + 0.1) * 0.85`` in (0.085, 0.935)."""
        return (torch.sigmoid(self.discriminator(torch.cat([s, z], dim=1))) + 0.1) * 0.85

    def forward(
        self,
        x: torch.Tensor,
        patient: torch.Tensor,
        generator: torch.Generator | None = None,
        control_s: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Same contract as :meth:`DecodeSZ.forward`: controls decoded from ``[z, 0]``, patients from ``[z, s]``."""
        xin = self._prep(x)
        out = contrastive_pass(xin, patient, self.z_encoder, self.s_encoder, self.latent_specific,
                               self.decode_normalized, generator, control_s)
        out["x"] = xin
        c, s, pidx = out["c"], out["s"], out["patient_index"]
        # the published TC terms need the in-model discriminator on (s, z) pairs of patients
        zp = c[pidx]
        half = max(1, s.shape[0] // 2)
        out["q_joint"] = self.discriminate(s, zp)
        out["q_shuffled"] = self.discriminate(s, torch.roll(zp, half, dims=0))
        return out
