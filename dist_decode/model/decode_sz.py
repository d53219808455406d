"""DECODE-SZ: a contrastive VAE with a common (C) and a specific (S) 3D-CNN encoder and a shared decoder.

* C encodes every subject, S encodes patients (and controls only for the pull-to-zero term).
* Controls are decoded from ``[c, 0]``, patients from ``[c, s]``; the zeros are built here, so a control's
  S-encoder output can never reach the decoder.
* ``route="additive"`` (default): ``decode(c, s) = common(c) + salient(s)``, where the salient branch has no bias
  anywhere, so ``salient(0) == 0`` exactly: ``decode(c, 0)`` *is* the healthy twin and ``salient(s)`` is the
  subject's schizophrenia-specific map. ``route="joint"`` is one decoder of ``[c, s]`` (the 2022 design).
* ``encoder="linear"`` (default): strided convolutions without normalisation or activation. A linear S encoder
  that maps every control to ~0 (the control-S penalty) must ignore every direction controls vary along, so it
  cannot carry age or shape factors for patients either (docs/science.md measures this).
  ``encoder="dense"``: also linear, but one dense layer from every brain voxel of the encoder grid, so its
  read-out can weight each voxel on its own. A convolutional read-out applies the same few filters in every
  block of the coarsest grid and cannot express a focal weight map (on the *weak* cohort a ridge on its 1,280
  features reaches tau 0.75 against 0.86 on the voxels it reads; docs/science.md).
* ``decoder="dense"``: one dense layer from the latents onto every voxel of ``mask`` (3-4 mm grids);
  ``decoder="conv"``: dense onto the coarsest grid, then x2 upsampling convolutions (the full 1.5 mm grid).
* ``specific_readout="decoder"``: after training, :meth:`DecodeSZ.encode_specific` returns the closed-form
  posterior of s under the trained salient branch (:mod:`dist_decode.model.readout`) instead of the S encoder's
  output; the encoder still trains the model and sets that posterior's prior. ``specific_readout_input``: what
  that posterior reads, the volume itself or the residual after the healthy twin.
* ``common_readout="decoder"``: after training, :meth:`DecodeSZ.common_features` returns the healthy twin's
  coordinates on the principal axes of the trained common branch (:mod:`dist_decode.model.readout`) instead of
  the C encoder's means. Twins and maps still decode the C encoder's latents (:meth:`encode_common`).
* The network works on any grid: encoder inputs are zero-padded to a multiple of ``2**len(channels)`` (after an
  optional resampling to ``encoder_grid``) and conv-decoder outputs cropped back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
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

ENCODERS = ("linear", "nonlinear", "dense")
DECODERS = ("dense", "conv")
ROUTES = ("additive", "joint")
ACTIVATIONS = ("linear", "silu")
READOUTS = ("encoder", "decoder")
READOUT_INPUTS = ("volume", "residual")


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
        Width of the dense layer (nonlinear encoders only; a linear encoder goes straight to the heads).
    latent : int
        Posterior dimension.
    groups : int
        GroupNorm groups (nonlinear encoders only).
    linear : bool
        No normalisation and no activation: the posterior mean is a linear map of the input.
    """

    def __init__(self, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int, latent: int,
                 groups: int, linear: bool = False) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c_in = 1
        for c in channels:
            stages.append(nn.Conv3d(c_in, c, 3, stride=2, padding=1) if linear else ConvBlock(c_in, c, 2, groups))
            c_in = c
        stages.append(nn.Conv3d(c_in, bottleneck, 1))
        if not linear:
            stages += [group_norm(bottleneck, groups), nn.SiLU()]
        self.features = nn.Sequential(*stages)
        flat = bottleneck * math.prod(p // 2 ** len(channels) for p in padded)
        if linear:
            self.dense: nn.Module = nn.Flatten()
            self.head = GaussianHead(flat, latent)
        else:
            self.dense = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.SiLU())
            self.head = GaussianHead(hidden, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.dense(self.features(x)))


class DenseEncoder(nn.Module):
    """One dense layer from the ``mask`` voxels of the (padded) encoder grid to a diagonal Gaussian posterior.

    Parameters
    ----------
    mask : bool Tensor (X, Y, Z)
        Voxels the encoder reads, on the grid of its (padded) input.
    latent : int
        Posterior dimension.
    """

    def __init__(self, mask: torch.Tensor, latent: int) -> None:
        super().__init__()
        self.register_buffer("index", mask.bool().flatten().nonzero().squeeze(1), persistent=False)
        self.head = GaussianHead(int(self.index.numel()), latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x.flatten(1).index_select(1, self.index))


def encoder_mask(mask: torch.Tensor, enc_grid: Sequence[int], pads: list[tuple[int, int]]) -> torch.Tensor:
    """The brain ``mask`` on the padded encoder grid: every voxel the resampled input has brain signal in."""
    m = mask.float()[None, None]
    if tuple(mask.shape) != tuple(enc_grid):
        m = F.interpolate(m, size=tuple(enc_grid), mode="trilinear", align_corners=False)
    return pad_to(m, pads)[0, 0] > 0


def dense_mask(grid: Sequence[int], encoder: str, decoder: str, mask: torch.Tensor | None,
               readout: bool = False) -> torch.Tensor | None:
    """The brain mask a dense encoder or decoder (or a decoder read-out of S or C) needs (a copy), or None when
    nothing needs one.

    Raises
    ------
    ValueError
        When a part that needs it has no mask of ``grid``.
    """
    if encoder != "dense" and decoder != "dense" and not readout:
        return None
    if mask is None or tuple(mask.shape) != tuple(grid):
        raise ValueError(f"a dense encoder or decoder, or a decoder read-out of S or C, needs the brain mask of "
                         f"the grid {tuple(grid)}")
    return mask.bool().clone()


def make_encoder(kind: str, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int,
                 latent: int, groups: int, mask: torch.Tensor | None) -> nn.Module:
    """The encoder of ``model.encoder`` ``kind``: a dense read-out of ``mask`` or an :class:`Encoder3D`."""
    if kind == "dense":
        return DenseEncoder(mask, latent)
    return Encoder3D(padded, channels, bottleneck, hidden, latent, groups, kind == "linear")


class DenseDecoder(nn.Module):
    """One dense layer from the latents onto the ``mask`` voxels of the grid (zero elsewhere).

    With ``bias=False`` the output is exactly 0 at a zero input.
    """

    def __init__(self, latent: int, mask: torch.Tensor, bias: bool = True) -> None:
        super().__init__()
        self.shape = tuple(int(v) for v in mask.shape)
        self.register_buffer("index", mask.bool().flatten().nonzero().squeeze(1), persistent=False)
        self.dense = nn.Linear(latent, int(self.index.numel()), bias=bias)
        nn.init.normal_(self.dense.weight, std=0.01)
        if bias:
            nn.init.zeros_(self.dense.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.dense(z)
        out = y.new_zeros((z.shape[0], math.prod(self.shape))).index_copy(1, self.index, y)
        return out.view((z.shape[0], 1) + self.shape)


class ConvDecoder(nn.Module):
    """Dense layers to a coarse feature map, then x2 upsampling convolutions to the padded grid.

    No normalisation layers; with ``bias=False`` and an activation that maps 0 to 0 (``linear``, ``silu``) the
    output is exactly 0 at a zero input.
    """

    def __init__(self, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int, latent: int,
                 bias: bool = True, activation: str = "linear") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.decoder_activation {activation!r}: expected one of {list(ACTIVATIONS)}")
        act = (lambda: nn.SiLU()) if activation == "silu" else (lambda: nn.Identity())
        self.coarse = tuple(p // 2 ** len(channels) for p in padded)
        self.bottleneck = bottleneck
        self.dense = nn.Sequential(nn.Linear(latent, hidden, bias=bias), act(),
                                   nn.Linear(hidden, bottleneck * math.prod(self.coarse), bias=bias), act())
        rev = list(channels)[::-1]
        stages: list[nn.Module] = [nn.Conv3d(bottleneck, rev[0], 1, bias=bias), act()]
        for c_in, c_out in zip(rev, rev[1:] + [max(4, rev[-1] // 2)]):
            stages += [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
                       nn.Conv3d(c_in, c_out, 3, padding=1, bias=bias), act()]
        stages.append(nn.Conv3d(max(4, rev[-1] // 2), 1, 3, padding=1, bias=bias))
        self.features = nn.Sequential(*stages)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(self.dense(z).view(z.shape[0], self.bottleneck, *self.coarse))


class JointDecoder(nn.Module):
    """The 2022-style decoder of ``[c, s]``: dense to a coarse map, GroupNorm/SiLU upsampling stages."""

    def __init__(self, padded: Sequence[int], channels: Sequence[int], bottleneck: int, hidden: int, latent: int,
                 groups: int, output: str) -> None:
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
        if output not in ("softplus", "linear"):
            raise ValueError(f"model.output {output!r}: expected 'linear' or 'softplus'")
        # softplus: non-negative like raw grey-matter density (only without site centring)
        self.act: nn.Module = nn.Softplus() if output == "softplus" else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dense(z).view(z.shape[0], self.bottleneck, *self.coarse)
        return self.act(self.features(h))


def encoder_grid(grid: Sequence[int], voxel_mm: float, encoder_voxel_mm: float) -> tuple[int, int, int]:
    """The encoders' grid: ``grid`` resampled from ``voxel_mm`` to ``encoder_voxel_mm`` (same field of view)."""
    if not encoder_voxel_mm or not voxel_mm or encoder_voxel_mm <= voxel_mm:
        return tuple(int(g) for g in grid)  # type: ignore[return-value]
    return tuple(max(4, int(round(g * voxel_mm / encoder_voxel_mm))) for g in grid)  # type: ignore[return-value]


class DecodeSZ(nn.Module):
    """The DECODE-SZ contrastive VAE.

    Parameters
    ----------
    grid : tuple of int
        Volume shape the model reads and writes (the store grid, or ``data.grid``).
    latent_common, latent_specific : int
        Dimensions of C and S.
    channels : sequence of int
        Encoder stage widths (each stage halves the grid); the conv decoder mirrors them.
    bottleneck : int
        Channels of the coarsest feature map.
    hidden : int
        Width of the dense layers.
    groups : int
        GroupNorm groups (nonlinear encoders, joint decoder).
    output : {"linear", "softplus"}
        Output activation of the joint decoder.
    input_scale : float
        Store units per network unit (1 for normalised inputs).
    encoder : {"linear", "nonlinear", "dense"}
    encoder_grid : tuple of int, optional
        Resample the encoders' input to this grid first (default: ``grid``).
    decoder : {"dense", "conv"}
    decoder_activation : {"linear", "silu"}
    route : {"additive", "joint"}
    mask : bool Tensor, optional
        Brain mask of ``grid``; required by the dense decoder (it predicts these voxels only), the dense
        encoder (it reads them) and the decoder read-out.
    specific_readout : {"encoder", "decoder"}
        Where :meth:`encode_specific` takes S from after training: the S encoder, or the closed-form posterior
        of the trained salient decoder (:mod:`dist_decode.model.readout`; fitted by :meth:`set_readout`, needs
        the additive route and a linear salient branch). Training always uses the S encoder.
    specific_readout_input : {"volume", "residual"}
        What the decoder read-out of S reads (:meth:`readout_input`): ``volume``, the volume itself (anything in
        the span of the training controls' volumes under a flat prior, c not estimated); ``residual``, the volume
        minus the twin decoded from the C encoder's mean (that estimate of c plugged in).
    common_readout_salient_noise : bool
        Fit the decoder read-out of C in the image metric of a patient's volume around its twin, the noise level
        plus the salient branch's prior variance (:mod:`dist_decode.model.readout`), so that twin differences
        the salient branch could produce count little in C's distances; else in the plain image metric. : {"encoder", "decoder"}
        Where :meth:`common_features` takes C's features from after training: the C encoder's posterior, or the
        twin's coordinates on the common branch's principal axes (fitted by :meth:`set_common_readout`; same
        needs). Training, twins and maps always use the C encoder.
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
        output: str = "linear",
        input_scale: float = 1.0,
        encoder: str = "linear",
        encoder_grid: Sequence[int] | None = None,
        decoder: str = "conv",
        decoder_activation: str = "linear",
        route: str = "additive",
        mask: torch.Tensor | None = None,
        specific_readout: str = "encoder",
        common_readout: str = "encoder",
        specific_readout_input: str = "residual",
        common_readout_salient_noise: bool = False,
    ) -> None:
        super().__init__()
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"grid {grid!r}: expected three positive sizes")
        for name, value, choices in (("encoder", encoder, ENCODERS), ("decoder", decoder, DECODERS),
                                     ("route", route, ROUTES), ("specific_readout", specific_readout, READOUTS),
                                     ("common_readout", common_readout, READOUTS),
                                     ("specific_readout_input", specific_readout_input, READOUT_INPUTS)):
            if value not in choices:
                raise ValueError(f"model.{name} {value!r}: expected one of {list(choices)}")
        if decoder == "dense" and route != "additive":
            raise ValueError("model.decoder 'dense' needs model.route 'additive'")
        for name, value in (("specific_readout", specific_readout), ("common_readout", common_readout)):
            if value == "decoder" and route != "additive":
                raise ValueError(f"model.{name} 'decoder' needs model.route 'additive'")
        self.grid = tuple(int(g) for g in grid)
        self.enc_grid = tuple(int(g) for g in (encoder_grid or grid))
        self.latent_common, self.latent_specific = latent_common, latent_specific
        self.route = route
        enc_padded = padded_shape(self.enc_grid, len(channels))
        self._enc_pads = pad_amounts(self.enc_grid, enc_padded)
        readout = "decoder" in (specific_readout, common_readout)
        brain = dense_mask(self.grid, encoder, decoder, mask, readout=readout)
        if brain is not None:
            self.register_buffer("mask", brain)
        self.specific_readout, self.common_readout = specific_readout, common_readout
        self.specific_readout_input = specific_readout_input
        self.common_readout_salient_noise = bool(common_readout_salient_noise)
        if readout:
            self.register_buffer("readout_index", brain.flatten().nonzero().squeeze(1), persistent=False)
        if common_readout == "decoder":
            # the fitted C read-out: its first common_readout_rank rows (zeros until set_common_readout)
            dc = latent_common
            self.register_buffer("common_readout_weight", torch.zeros(dc, dc))
            self.register_buffer("common_readout_offset", torch.zeros(dc))
            self.register_buffer("common_readout_rank", torch.tensor(0.0))  # float: every engine casts it alike
        if specific_readout == "decoder":
            # the fitted read-out (zeros until set_readout; saved with the weights in model_final.pt)
            n_mask, ds = int(brain.sum()), latent_specific
            self.register_buffer("readout_weight", torch.zeros(ds, n_mask))
            self.register_buffer("readout_offset", torch.zeros(n_mask))
            self.register_buffer("readout_logvar", torch.zeros(ds))
            self.register_buffer("readout_fitted", torch.tensor(0.0))  # float: every engine casts it alike
        enc_mask = encoder_mask(brain, self.enc_grid, self._enc_pads) if encoder == "dense" else None
        self.common = make_encoder(encoder, enc_padded, channels, bottleneck, hidden, latent_common, groups, enc_mask)
        self.specific = make_encoder(encoder, enc_padded, channels, bottleneck, hidden, latent_specific, groups,
                                     enc_mask)
        dec_padded = padded_shape(self.grid, len(channels))
        self._dec_pads = pad_amounts(self.grid, dec_padded)
        if route == "joint":
            self.decoder = JointDecoder(dec_padded, channels, bottleneck, hidden, latent_common + latent_specific,
                                        groups, output)
        elif decoder == "dense":
            self.common_decoder = DenseDecoder(latent_common, mask, bias=True)
            self.salient_decoder = DenseDecoder(latent_specific, mask, bias=False)
        else:
            self.common_decoder = ConvDecoder(dec_padded, channels, bottleneck, hidden, latent_common, True,
                                              decoder_activation)
            self.salient_decoder = ConvDecoder(dec_padded, channels, bottleneck, hidden, latent_specific, False,
                                               decoder_activation)
        self._dense = route == "additive" and decoder == "dense"
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    # -- the API used by the analysis stages ----------------------------------------------------------
    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-3:]) != self.grid:
            raise ValueError(f"volume grid {tuple(x.shape[-3:])} does not match the model grid {self.grid}")
        if x.ndim == 4:
            x = x.unsqueeze(1)
        return x / self.input_scale

    def _encoder_input(self, xin: torch.Tensor) -> torch.Tensor:
        if self.enc_grid != self.grid:
            xin = F.interpolate(xin, size=self.enc_grid, mode="trilinear", align_corners=False)
        return pad_to(xin, self._enc_pads)

    def encode_common(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of C for volumes ``x`` (N, 1, X, Y, Z)."""
        return self.common(self._encoder_input(self._prep(x)))

    def common_features(self, c: torch.Tensor) -> torch.Tensor:
        """C's features for C-encoder latents ``c`` (N, dc) or samples (..., dc): ``c`` itself, or with
        ``common_readout="decoder"`` the twin's coordinates on the used principal axes (N, k), k <= dc.

        Raises
        ------
        RuntimeError
            When the decoder read-out is configured but not fitted yet (the trainer fits it after training).
        """
        if self.common_readout == "encoder":
            return c
        rank = int(self.common_readout_rank)
        if not rank:
            raise RuntimeError("the decoder read-out of C is not fitted (the trainer fits it when the fold "
                               "finishes: dist_decode.model.readout)")
        return (c - self.common_readout_offset) @ self.common_readout_weight[:rank].T

    def set_common_readout(self, readout) -> None:
        """Install a fitted :class:`~dist_decode.model.readout.CommonReadout`."""
        if self.common_readout != "decoder":
            raise ValueError("set_common_readout needs model.common_readout 'decoder'")
        rank, dc = readout.weight.shape
        if dc != self.latent_common or not 1 <= rank <= dc:
            raise ValueError(f"C read-out weight of shape {(rank, dc)}, expected (k, {self.latent_common}) with "
                             f"1 <= k <= {self.latent_common}")
        self.common_readout_weight.zero_()
        self.common_readout_weight[:rank].copy_(readout.weight)
        self.common_readout_offset.copy_(readout.offset)
        self.common_readout_rank.fill_(float(rank))

    def common_normalized(self, c: torch.Tensor) -> torch.Tensor:
        """The common branch alone, ``decode(c, 0)`` in network units (additive route)."""
        if self.route != "additive":
            raise ValueError("the common branch is defined for model.route 'additive' only")
        return self._branch(self.common_decoder, c)

    def encode_specific(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of S for volumes ``x`` (N, 1, X, Y, Z): from the S encoder, or from the
        fitted decoder read-out (``specific_readout="decoder"``).

        Raises
        ------
        RuntimeError
            When the decoder read-out is configured but not fitted yet (the trainer fits it after training).
        """
        if self.specific_readout == "encoder":
            return self.encode_specific_encoder(x)
        if not float(self.readout_fitted):
            raise RuntimeError("the decoder read-out of S is not fitted (the trainer fits it when the fold "
                               "finishes: dist_decode.model.readout)")
        mu = (self.readout_input(x) - self.readout_offset) @ self.readout_weight.T
        return mu, self.readout_logvar.expand_as(mu)

    def common_residual(self, x: torch.Tensor, c_mu: torch.Tensor | None = None) -> torch.Tensor:
        """What the common branch leaves of volumes ``x``: ``x - decode(c_mean, 0)`` on the read-out's mask
        voxels, network units (N, V); the input of the decoder read-out. ``c_mu``: the C encoder's means of ``x``
        when the caller has them already."""
        if c_mu is None:
            c_mu, _ = self.encode_common(x)
        twin = self.decode_normalized(c_mu, c_mu.new_zeros(len(c_mu), self.latent_specific))
        return (self._prep(x) - twin).flatten(1).index_select(1, self.readout_index)

    def readout_input(self, x: torch.Tensor, c_mu: torch.Tensor | None = None) -> torch.Tensor:
        """What the decoder read-out of S reads of volumes ``x`` (N, V), network units on its mask voxels: the
        volume itself (``specific_readout_input="volume"``) or :meth:`common_residual` (``"residual"``, which
        takes ``c_mu`` as it does)."""
        if self.specific_readout_input == "residual":
            return self.common_residual(x, c_mu)
        return self._prep(x).flatten(1).index_select(1, self.readout_index)

    def encode_specific_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mu, logvar)`` of the S encoder for volumes ``x`` (N, 1, X, Y, Z)."""
        return self.specific(self._encoder_input(self._prep(x)))

    def set_readout(self, readout) -> None:
        """Install a fitted :class:`~dist_decode.model.readout.SalientReadout`."""
        if self.specific_readout != "decoder":
            raise ValueError("set_readout needs model.specific_readout 'decoder'")
        if tuple(readout.weight.shape) != tuple(self.readout_weight.shape):
            raise ValueError(f"read-out weight of shape {tuple(readout.weight.shape)}, expected "
                             f"{tuple(self.readout_weight.shape)}")
        self.readout_weight.copy_(readout.weight)
        self.readout_offset.copy_(readout.offset)
        self.readout_logvar.copy_(readout.logvar)
        self.readout_fitted.fill_(1.0)

    def _branch(self, module: nn.Module, z: torch.Tensor) -> torch.Tensor:
        out = module(z)
        return out if self._dense else crop_to(out, self._dec_pads)

    def decode_normalized(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Decoder output in network units, on the grid."""
        if self.route == "joint":
            return crop_to(self.decoder(torch.cat([c, s], dim=1)), self._dec_pads)
        return self._branch(self.common_decoder, c) + self._branch(self.salient_decoder, s)

    def decode(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Volumes (N, 1, X, Y, Z) from latents ``c`` (N, dc) and ``s`` (N, ds); ``s = 0`` gives the healthy twin."""
        return self.decode_normalized(c, s) * self.input_scale

    def salient(self, s: torch.Tensor) -> torch.Tensor:
        """The specific map ``decode(c, s) - decode(c, 0)`` of the additive route (independent of c)."""
        return self.salient_normalized(s) * self.input_scale

    def salient_normalized(self, s: torch.Tensor) -> torch.Tensor:
        """:meth:`salient` in network units."""
        if self.route != "additive":
            raise ValueError("the salient map is defined for model.route 'additive' only")
        return self._branch(self.salient_decoder, s)

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
            Volumes (normalised model input).
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
        enc_in = self._encoder_input(xin)
        out = contrastive_pass(enc_in, patient, self.common, self.specific, self.latent_specific,
                               self.decode_normalized, generator, control_s)
        out["x"] = xin
        return out
