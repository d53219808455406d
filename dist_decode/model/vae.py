"""The plain single-encoder VAE: the control experiment of the published DECODE-SZ study.

One encoder for every subject and one decoder, with the same blocks, latent size (``latent_common +
latent_specific``) and parameter budget as :class:`~dist_decode.model.DecodeSZ`, and no notion of diagnosis.
It shares the DECODE-SZ interface so the trainer and the analysis stages run it unchanged: its latent space
is reported as C (``encode_common``), and S is empty (zero dimensions).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_decode.model.blocks import crop_to, pad_amounts, pad_to, padded_shape, reparameterize
from dist_decode.model.decode_sz import ConvDecoder, DenseDecoder, dense_mask, encoder_mask, make_encoder


class PlainVAE(nn.Module):
    """A single-encoder VAE of ``latent`` dimensions (see the module docstring for the arguments' meaning)."""

    name = "vae"

    def __init__(self, grid: Sequence[int], latent: int = 32, channels: Sequence[int] = (16, 32, 64, 96, 128),
                 bottleneck: int = 16, hidden: int = 256, groups: int = 8, input_scale: float = 1.0,
                 encoder: str = "linear", encoder_grid: Sequence[int] | None = None, decoder: str = "conv",
                 decoder_activation: str = "linear", mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.enc_grid = tuple(int(g) for g in (encoder_grid or grid))
        self.latent_common, self.latent_specific = int(latent), 0
        enc_padded = padded_shape(self.enc_grid, len(channels))
        self._enc_pads = pad_amounts(self.enc_grid, enc_padded)
        brain = dense_mask(self.grid, encoder, decoder, mask)
        if brain is not None:
            self.register_buffer("mask", brain)
        enc_mask = encoder_mask(brain, self.enc_grid, self._enc_pads) if encoder == "dense" else None
        self.encoder = make_encoder(encoder, enc_padded, channels, bottleneck, hidden, latent, groups, enc_mask)
        dec_padded = padded_shape(self.grid, len(channels))
        self._dec_pads = pad_amounts(self.grid, dec_padded)
        self._dense = decoder == "dense"
        if self._dense:
            self.decoder = DenseDecoder(latent, mask, bias=True)
        else:
            self.decoder = ConvDecoder(dec_padded, channels, bottleneck, hidden, latent, True, decoder_activation)
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.grid:
            raise ValueError(f"volume grid {tuple(x.shape[-3:])} does not match the model grid {self.grid}")
        return (x.unsqueeze(1) if x.ndim == 4 else x) / self.input_scale

    def _encoder_input(self, xin: torch.Tensor) -> torch.Tensor:
        if self.enc_grid != self.grid:
            xin = F.interpolate(xin, size=self.enc_grid, mode="trilinear", align_corners=False)
        return pad_to(xin, self._enc_pads)

    def encode_common(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of the VAE's one latent space."""
        return self.encoder(self._encoder_input(self._prep(x)))

    def encode_specific(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No specific space: ``(N, 0)`` empty posteriors."""
        z = x.new_zeros((x.shape[0], 0))
        return z, z

    def decode(self, c: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """Volumes from the latent ``c`` (``s`` is ignored: the VAE has no specific space)."""
        out = self.decoder(c)
        return (out if self._dense else crop_to(out, self._dec_pads)) * self.input_scale

    def forward(self, x: torch.Tensor, patient: torch.Tensor, generator: torch.Generator | None = None,
                control_s: bool = False) -> dict[str, torch.Tensor]:
        """Same output contract as :meth:`DecodeSZ.forward` (S entries are empty)."""
        xin = self._prep(x)
        mu, logvar = self.encoder(self._encoder_input(xin))
        z = reparameterize(mu, logvar, generator)
        pidx = torch.nonzero(patient, as_tuple=False).flatten()
        cidx = torch.nonzero(~patient, as_tuple=False).flatten()
        empty = mu.new_zeros((pidx.numel(), 0))
        out = self.decoder(z)
        x_hat = out if self._dense else crop_to(out, self._dec_pads)
        return {"x": xin, "x_hat": x_hat, "c_mu": mu, "c_logvar": logvar, "c": z, "s_mu": empty,
                "s_logvar": empty, "s": empty, "s_dec": mu.new_zeros((x.shape[0], 0)),
                "patient_index": pidx, "control_index": cidx}
