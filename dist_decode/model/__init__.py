"""Models of dist-decode: the DECODE-SZ contrastive VAE, the plain VAE baseline and the 2022 anchor.

Both share one interface used by the trainer and the analysis stages:

* ``model.grid`` -- the (X, Y, Z) grid the model reads and writes;
* ``model.encode_common(x)`` / ``model.encode_specific(x)`` -> ``(mu, logvar)`` for volumes
  ``x`` (N, 1, X, Y, Z) in store units;
* ``model.decode(c, s)`` -> volumes (N, 1, X, Y, Z) in store units (``s = 0`` gives the healthy twin);
* ``model(x, patient, generator, control_s)`` -> the dict the losses in :mod:`.loss` consume.

:func:`load_fold_model` rebuilds a trained fold's model from ``model_final.pt`` (CPU, eval mode).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dist_decode.config import RunConfig
from dist_decode.model.anchor2022 import ANCHOR_GRID, ANCHOR_N_PARAMETERS, AnchorCVAE2022
from dist_decode.model.blocks import count_parameters
from dist_decode.model.decode_sz import DecodeSZ, encoder_grid
from dist_decode.model.loss import TCDiscriminator, anchor_loss, decode_sz_loss, discriminator_loss, mmd_unbiased
from dist_decode.model.vae import PlainVAE

__all__ = [
    "ANCHOR_GRID", "ANCHOR_N_PARAMETERS", "AnchorCVAE2022", "DecodeSZ", "PlainVAE", "TCDiscriminator",
    "anchor_loss", "build_model", "build_discriminator", "count_parameters", "decode_sz_loss",
    "discriminator_loss", "load_fold_model", "loss_kind", "mmd_unbiased", "model_grid", "DECODE_SZ_BUDGET",
]

#: Parameter budget of the default DECODE-SZ model at the full CAT12 grid: 5 % of the anchor.
DECODE_SZ_BUDGET = ANCHOR_N_PARAMETERS * 5 // 100


def model_grid(cfg, store_grid: Sequence[int]) -> tuple[int, int, int]:
    """Grid the model of ``cfg`` runs at: 64^3 for the anchor, else ``data.grid`` or the store grid."""
    if cfg.model.name == "anchor2022":
        return ANCHOR_GRID
    return tuple(int(g) for g in (cfg.data.grid or store_grid))  # type: ignore[return-value]


def build_model(cfg, grid: Sequence[int], input_scale: float = 1.0, mask: torch.Tensor | None = None,
                voxel_mm: float | None = None) -> nn.Module:
    """Build the model named by ``cfg.model.name`` for ``grid``.

    Parameters
    ----------
    cfg : RunConfig
    grid : tuple of int
        The data grid the model reads and writes.
    input_scale : float
        Store units per network unit (1 for normalised inputs).
    mask : bool Tensor, optional
        Brain mask of ``grid`` (the dense decoder predicts these voxels).
    voxel_mm : float, optional
        Voxel size of ``grid`` (for ``model.encoder_voxel_mm``).

    Raises
    ------
    ValueError
        For an unknown model name or a grid the anchor does not support.
    """
    m = cfg.model
    enc_grid = encoder_grid(grid, voxel_mm or 0.0, m.encoder_voxel_mm)
    if m.name == "decode_sz":
        return DecodeSZ(
            grid, m.latent_common, m.latent_specific, m.channels, m.bottleneck, m.hidden, m.norm_groups,
            m.output, input_scale, m.encoder, enc_grid, m.decoder, m.decoder_activation, m.route, mask,
            m.specific_readout, m.common_readout, m.specific_readout_input, m.common_readout_salient_noise,
        )
    if m.name == "vae":
        return PlainVAE(grid, m.latent_common + m.latent_specific, m.channels, m.bottleneck, m.hidden,
                        m.norm_groups, input_scale, m.encoder, enc_grid, m.decoder, m.decoder_activation, mask)
    if m.name == "anchor2022":
        if tuple(grid) != ANCHOR_GRID:
            raise ValueError(f"model anchor2022 runs at {ANCHOR_GRID}, not {tuple(grid)} (set data.grid=[64,64,64])")
        return AnchorCVAE2022(m.latent_common, m.latent_specific, input_scale)
    raise ValueError(f"model.name {m.name!r}: expected 'decode_sz', 'vae' or 'anchor2022'")


def loss_kind(cfg) -> str:
    """Resolve ``loss.kind``: ``auto`` is the model's own loss."""
    kind = cfg.loss.kind
    if kind == "auto":
        kind = "anchor2022" if cfg.model.name == "anchor2022" else "decode_sz"
    if kind not in ("decode_sz", "anchor2022"):
        raise ValueError(f"loss.kind {cfg.loss.kind!r}: expected 'auto', 'decode_sz' or 'anchor2022'")
    if kind == "anchor2022" and cfg.model.name != "anchor2022":
        raise ValueError("loss.kind 'anchor2022' needs model.name 'anchor2022' (it uses the anchor's discriminator)")
    return kind


def build_discriminator(cfg) -> TCDiscriminator | None:
    """The separate TC discriminator of the DECODE-SZ loss (``None`` for the published anchor loss)."""
    if loss_kind(cfg) != "decode_sz" or not cfg.loss.gamma_tc or cfg.model.name == "vae":
        return None
    return TCDiscriminator(cfg.model.latent_common + cfg.model.latent_specific, cfg.model.discriminator_hidden)


def load_fold_model(fold_dir: str | os.PathLike):
    """Load a trained fold's model from ``fold_dir/model_final.pt`` (CPU, fp32, eval mode, no DeepSpeed).

    Returns
    -------
    model : DecodeSZ or AnchorCVAE2022
    cfg : dist_decode.config.RunConfig

    Raises
    ------
    FileNotFoundError
        When the fold has no ``model_final.pt`` (training not finished).
    """
    path = Path(fold_dir) / "model_final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no final model (is the fold trained? its DONE file marks completion)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    cfg = RunConfig.from_saved_dict(blob["config"])
    state = blob["state_dict"]
    model = build_model(cfg, blob["grid"], mask=state.get("mask"), voxel_mm=blob.get("voxel_mm"))
    model.load_state_dict(state)
    return model.float().eval(), cfg
