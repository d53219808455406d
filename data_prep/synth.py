"""Synthesize a multi-site CAT12 cohort with planted, known effects: ``python -m data_prep.synth``.

The output looks exactly like a CAT12 12.8+ run, so the packer can be pointed at real data unchanged::

    OUT/participants.tsv, OUT/participants.json
    OUT/<participant_id>/mri/mwp1<participant_id>.nii.gz      modulated normalised GM, float32
    OUT/<participant_id>/mri/wj_<participant_id>.nii.gz       Jacobian determinant (optional)
    OUT/<participant_id>/report/cat_<participant_id>.xml      vol_TIV, IQR, ...
    OUT/ground_truth/                                         planted effects (never inside a subject folder)

Each subject is the real MNI152 GM map (nilearn) pulled back through a smooth, subject-specific
deformation and modulated by its Jacobian determinant (as CAT12 modulation does), then given its
site's scanner effects. The deformation sums common effects present in everybody (age, several
random shape factors; head size enters as a global TIV scaling) and, in patients only, the
schizophrenia-specific atrophy of fixed regions times a per-patient severity that correlates with
PANSS total. See ``docs/data.md`` and ``OUT/ground_truth/README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import anatomy
from dist_decode.fsutil import atomic_write_json, atomic_write_text, save_nifti

log = logging.getLogger("data_prep.synth")

GROUND_TRUTH = "ground_truth"
PATIENT, CONTROL = "SZ", "HC"


@dataclass
class Preset:
    """Size and effect strengths of a synthetic cohort.

    Parameters
    ----------
    site_sizes : list of int
        Subjects per site.
    site_patients : list of int
        Patients (SZ) per site; the rest are controls (HC).
    voxel_mm : float
        Isotropic voxel size of the CAT12 grid (bounding box 12).
    site_names : list of str or None
        Site labels (default ``siteA``, ``siteB``, ...).
    n_common : int
        Number of random smooth common shape factors.
    common_blobs : int
        Gaussian potentials per common factor.
    common_log_j : float
        Peak |log J| of one common blob at unit score.
    specific_log_j : float
        log J at the centre of each schizophrenia region at unit severity (negative = atrophy).
    age_log_j : float
        log J per decade of age at the centre of each ageing region.
    severity_sd : float
        Standard deviation of patient severity (gamma distributed, mean 1).
    panss_severity_r : float
        Correlation of PANSS total with severity.
    poor_quality_fraction : float
        Share of subjects scanned with poor quality (low CAT12 IQR rating, extra noise and blur).
    missing_fraction : float
        Share of ``n/a`` in education_years and (patients') panss_total.
    jacobian : bool
        Also write ``mri/wj_<id>.nii.gz``.
    specific_kind : {"shape", "density"}
        How the schizophrenia-specific effect is planted: ``shape`` is a smooth atrophic deformation
        (modulated, so the mwp1 map loses tissue through the Jacobian); ``density`` lowers grey-matter
        density in place (no displacement, nothing in ``wj_``), ``exp(severity * specific_log_j * g(x))``
        with ``g`` a unit-peak Gaussian per region.
    specific_regions : {"sz", "random"}
        ``sz``: the eight anatomically plausible regions of :data:`anatomy.SZ_REGIONS`; ``random``:
        ``n_specific_regions`` centres drawn on grey matter from the seed.
    n_specific_regions : int
        Number of regions when ``specific_regions="random"``.
    specific_sigma_scale : float
        Multiplies every region's width (size of the planted effect).
    n_specific : int
        Independent specific factors (subtypes of severity): the regions are dealt round-robin to the
        factors and every patient draws one severity per factor.
    site_gain_sd : float
        SD of each site's global intensity scale (mean 1).
    site_fwhm_max_mm : float
        Each site's extra smoothing FWHM is uniform in [0, this].
    site_noise_max : float
        Each site's noise SD is uniform in [0.005, this].
    site_bias_max : float
        Each site's bias-field amplitude is uniform in [0.02, this].
    site_grids : dict or None
        ``{site: [box, voxel_mm]}``: write that site's files on another CAT12 grid, box ``"12.8"`` (bounding box
        12) or ``"12.7"`` (the SPM box of CAT12 <= 12.7), as if it had been processed with another CAT12 release
        or output resolution. Its subjects are the same people as on the cohort grid: every effect is a
        function of MNI coordinates, evaluated on the site's grid (only the voxel noise differs). The ground
        truth stays on the cohort grid.
    """

    site_sizes: list[int]
    site_patients: list[int]
    voxel_mm: float
    site_names: list[str] | None = None
    n_common: int = 4
    common_blobs: int = 6
    common_log_j: float = 0.08
    specific_log_j: float = -0.15
    age_log_j: float = -0.03
    severity_sd: float = 0.35
    panss_severity_r: float = 0.7
    poor_quality_fraction: float = 0.05
    missing_fraction: float = 0.03
    jacobian: bool = True
    specific_kind: str = "shape"
    specific_regions: str = "sz"
    n_specific_regions: int = 6
    specific_sigma_scale: float = 1.0
    n_specific: int = 1
    site_gain_sd: float = 0.06
    site_fwhm_max_mm: float = 6.0
    site_noise_max: float = 0.03
    site_bias_max: float = 0.06
    site_grids: dict[str, list] | None = None

    def names(self) -> list[str]:
        """Return the site labels."""
        if self.site_names is not None:
            return list(self.site_names)
        return [f"site{chr(ord('A') + k)}" if k < 26 else f"site{k:02d}" for k in range(len(self.site_sizes))]


PRESETS: dict[str, Preset] = {
    # 4 sites x 10 (5 SZ / 5 HC), 6 mm (29x35x29): synthesize + pack in seconds.
    "tiny": Preset([10, 10, 10, 10], [5, 5, 5, 5], 6.0, n_common=3, common_blobs=4),
    # 8 sites, 20-30 subjects each, 3 mm (57x69x57): the whole pipeline on a 2-core CPU in minutes.
    "demo": Preset([30, 28, 27, 25, 24, 22, 21, 20], [15, 14, 14, 12, 12, 11, 11, 10], 3.0),
    # The seed cohort: 8 unequal sites, 1,250 subjects (641 SZ / 609 HC), CAT12's 1.5 mm grid.
    "paper": Preset(
        [236, 198, 182, 165, 149, 128, 104, 88], [124, 98, 96, 82, 79, 63, 55, 44], 1.5, jacobian=False
    ),
    # Planted variants that differ from the demo in the kind, place and size of the effect and in the site
    # effects; the science benchmark (benchmarks/bench_science.py) reports every metric on each of them.
    # A modulated density loss at six random grey-matter places, 4 mm, 14-22 patients per site, strong sites.
    "density": Preset(
        [34, 30, 38, 28, 40, 33, 29, 36], [16, 14, 19, 14, 22, 17, 15, 18], 4.0, specific_kind="density",
        specific_regions="random", n_specific_regions=6, specific_log_j=-0.2, site_gain_sd=0.1,
        site_fwhm_max_mm=8.0, site_noise_max=0.04,
    ),
    # Small shape effects (60 % of the demo's widths) at four random places, 3 mm.
    "small": Preset(
        [30, 28, 27, 25, 24, 22, 21, 20], [15, 14, 14, 12, 12, 11, 11, 10], 3.0, specific_regions="random",
        n_specific_regions=4, specific_sigma_scale=0.6, specific_log_j=-0.25,
    ),
    # The demo's regions under much stronger scanner differences (gain, bias, smoothing, noise), 3 mm.
    "sites": Preset(
        [30, 28, 27, 25, 24, 22, 21, 20], [15, 14, 14, 12, 12, 11, 11, 10], 3.0, site_gain_sd=0.15,
        site_fwhm_max_mm=10.0, site_noise_max=0.05, site_bias_max=0.12,
    ),
    # Two independent specific factors (subtypes of severity) of larger density losses, 4 mm.
    "two-factor": Preset(
        [34, 30, 38, 28, 40, 33, 29, 36], [16, 14, 19, 14, 22, 17, 15, 18], 4.0, specific_kind="density",
        specific_regions="random", n_specific_regions=6, specific_sigma_scale=1.3, n_specific=2,
        specific_log_j=-0.2,
    ),
    # Held-out checks, added after the maps' variance smoothing was chosen on "small" and run once each:
    # weak, narrow density losses at five random places (half the density cohort's depth), moderate sites, 3 mm.
    "weak": Preset(
        [30, 28, 27, 25, 24, 22, 21, 20], [15, 14, 14, 12, 12, 11, 11, 10], 3.0, specific_kind="density",
        specific_regions="random", n_specific_regions=5, specific_sigma_scale=0.8, specific_log_j=-0.12,
        site_gain_sd=0.1, site_fwhm_max_mm=8.0, site_noise_max=0.04,
    ),
    # Held-out check added 2026-12-02 after the maps' gain-ring extent rule was chosen on the seven above, run once:
    # density losses in the demo's eight anatomical regions (its places, the other kind), moderate sites, 3 mm.
    "density-sz": Preset(
        [30, 28, 27, 25, 24, 22, 21, 20], [15, 14, 14, 12, 12, 11, 11, 10], 3.0, specific_kind="density",
        site_gain_sd=0.1, site_fwhm_max_mm=8.0, site_noise_max=0.04,
    ),
    # Held-out check added 2026-12-02 after C's read-out in the patients' noise was chosen (on density-sz among
    # others), run once: broad shape effects at eight random places, 4 mm, moderate sites.
    "shape-wide": Preset(
        [34, 30, 38, 28, 40, 33, 29, 36], [16, 14, 19, 14, 22, 17, 15, 18], 4.0, specific_regions="random",
        n_specific_regions=8, specific_sigma_scale=1.2, site_gain_sd=0.1, site_fwhm_max_mm=8.0, site_noise_max=0.04,
    ),
    # Held-out check added 2026-12-03 after the counter-ring's noise floor was chosen (on small, weak and
    # density-sz), run once: density losses at seven random places under noisy, biased scanners, other site sizes.
    "density-noisy": Preset(
        [26, 32, 24, 28, 22, 30, 25, 27], [12, 16, 11, 15, 10, 14, 12, 13], 3.0, specific_kind="density",
        specific_regions="random", n_specific_regions=7, specific_log_j=-0.15, site_gain_sd=0.12,
        site_noise_max=0.05, site_bias_max=0.1,
    ),
    # Unequal sites (14-45 subjects, 6-30 patients) with noisy scanners; broad shape effects at three random
    # places, 3 mm.
    "unbalanced": Preset(
        [45, 16, 38, 20, 30, 14, 26, 18], [30, 6, 12, 14, 10, 7, 20, 6], 3.0, specific_regions="random",
        n_specific_regions=3, specific_sigma_scale=1.2, site_gain_sd=0.1, site_noise_max=0.05,
        site_bias_max=0.1,
    ),
}

SPECIFIC_KINDS = ("shape", "density")
SPECIFIC_REGION_SETS = ("sz", "random")


def resolve_preset(preset: str, voxel_mm: float | None = None, **overrides: Any) -> Preset:
    """Return the named preset with overrides applied.

    Parameters
    ----------
    preset : str
        A key of :data:`PRESETS`: "tiny", "demo", "paper", or a planted variant "density", "small", "sites", "weak",
        "unbalanced", "two-factor", "density-sz", "shape-wide", "density-noisy".
    voxel_mm : float or None
        Overrides the preset's grid.
    **overrides
        Any :class:`Preset` field, plus the shortcuts ``sites`` (number of sites, or a list of
        names), ``subjects_per_site`` (int or list) and ``patients_per_site`` (int or list; default
        half of each site, rounded down).

    Raises
    ------
    ValueError
        On an unknown preset or override, or inconsistent site sizes.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = dataclasses.replace(PRESETS[preset])
    known = {f.name for f in dataclasses.fields(Preset)}
    sites = overrides.pop("sites", None)
    per_site = overrides.pop("subjects_per_site", None)
    patients = overrides.pop("patients_per_site", None)
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown synth option(s) {sorted(unknown)}; known: {sorted(known | {'sites', 'subjects_per_site', 'patients_per_site'})}")
    p = dataclasses.replace(p, **overrides)
    if voxel_mm is not None:
        p.voxel_mm = float(voxel_mm)
    n_sites = len(p.site_sizes)
    if sites is not None:
        if isinstance(sites, int):
            n_sites = sites
            p.site_names = None
        else:
            p.site_names = [str(s) for s in sites]
            n_sites = len(p.site_names)
    if sites is not None or per_site is not None:
        if per_site is None:
            per_site = int(round(np.mean(p.site_sizes)))
        p.site_sizes = [int(per_site)] * n_sites if np.isscalar(per_site) else [int(v) for v in per_site]
        if patients is None:
            p.site_patients = [n // 2 for n in p.site_sizes]
    if patients is not None:
        n = len(p.site_sizes)
        p.site_patients = [int(patients)] * n if np.isscalar(patients) else [int(v) for v in patients]
    if len(p.site_sizes) != len(p.site_patients) or len(p.names()) != len(p.site_sizes):
        raise ValueError(
            f"site lists disagree: {len(p.site_sizes)} sizes, {len(p.site_patients)} patient counts, "
            f"{len(p.names())} names"
        )
    for name, n, k in zip(p.names(), p.site_sizes, p.site_patients):
        if not 0 <= k <= n or n < 1:
            raise ValueError(f"site {name}: {k} patients among {n} subjects is impossible")
    if p.specific_kind not in SPECIFIC_KINDS:
        raise ValueError(f"specific_kind {p.specific_kind!r}: choose from {list(SPECIFIC_KINDS)}")
    if p.specific_regions not in SPECIFIC_REGION_SETS:
        raise ValueError(f"specific_regions {p.specific_regions!r}: choose from {list(SPECIFIC_REGION_SETS)}")
    n_regions = len(anatomy.SZ_REGIONS) if p.specific_regions == "sz" else p.n_specific_regions
    if not 1 <= p.n_specific <= n_regions:
        raise ValueError(f"n_specific {p.n_specific}: needs 1..{n_regions} (one region per factor at least)")
    if not p.specific_sigma_scale > 0:
        raise ValueError(f"specific_sigma_scale {p.specific_sigma_scale}: must be positive")
    for site, spec in (p.site_grids or {}).items():
        if site not in p.names():
            raise ValueError(f"site_grids: unknown site {site!r} (sites: {', '.join(p.names())})")
        if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] in anatomy.BOXES
                and isinstance(spec[1], (int, float)) and spec[1] > 0):
            raise ValueError(f"site_grids[{site!r}] = {spec!r}: expected [box, voxel_mm] with box in "
                             f"{sorted(anatomy.BOXES)} and a positive voxel size")
    return p


# ---------------------------------------------------------------------------------------------
# The cohort table: who is who (cheap; drawn in the parent process)
# ---------------------------------------------------------------------------------------------


def _sites_table(p: Preset, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Draw each site's scanner effects and population."""
    rows = []
    for name in p.names():
        rows.append(
            {
                "site": name,
                "intensity_scale": float(np.clip(rng.normal(1.0, p.site_gain_sd), 1 - p.site_gain_sd * 10 / 3,
                                                  1 + p.site_gain_sd * 10 / 3)),
                "smooth_fwhm_mm": float(rng.uniform(0.0, p.site_fwhm_max_mm)),
                "noise_sd": float(rng.uniform(0.005, p.site_noise_max)),
                "bias_amplitude": float(rng.uniform(0.02, p.site_bias_max)),
                "age_mean": float(rng.uniform(28.0, 42.0)),
            }
        )
    return rows


def _subjects_table(p: Preset, sites: list[dict[str, Any]], rng: np.random.Generator,
                    rng_extra: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """Draw demographics, clinical scores, latent effect scores and quality of every subject.

    ``rng_extra`` draws the severities of specific factors 2..n (its own stream, so a one-factor cohort is
    the same whatever the other options).
    """
    if p.n_specific > 1 and rng_extra is None:
        raise ValueError("several specific factors need rng_extra")
    subjects = []
    shape_k = 1.0 / p.severity_sd**2  # gamma with mean 1 and sd severity_sd

    for s, n, n_pat in zip(sites, p.site_sizes, p.site_patients):
        dx = np.array([PATIENT] * n_pat + [CONTROL] * (n - n_pat))
        rng.shuffle(dx)
        for i, d in enumerate(dx):
            patient = d == PATIENT
            male = rng.random() < (0.65 if patient else 0.5)
            age = float(np.clip(rng.normal(s["age_mean"] + (1.0 if patient else 0.0), 9.0), 18.0, 65.0))
            tiv = float(np.clip(rng.normal(1550.0 if male else 1400.0, 110.0), 1100.0, 1950.0))
            edu = float(np.clip(rng.normal(12.5 if patient else 14.0, 2.5), 6.0, 22.0))
            sev = float(rng.gamma(shape_k, 1.0 / shape_k)) if patient else 0.0
            z = (sev - 1.0) / p.severity_sd
            extra = [float(rng_extra.gamma(shape_k, 1.0 / shape_k)) if patient else 0.0 for _ in range(p.n_specific - 1)]
            if extra:  # PANSS follows the mean severity over the factors
                z = (np.mean([sev] + extra) - 1.0) / (p.severity_sd / np.sqrt(p.n_specific))
            eps = rng.normal()
            r = p.panss_severity_r
            panss = float(np.clip(np.round(75.0 + 18.0 * (r * z + np.sqrt(1 - r * r) * eps)), 30, 210))
            poor = bool(rng.random() < p.poor_quality_fraction)
            iqr = float(rng.uniform(4.6, 6.0) if poor else np.clip(rng.normal(2.0, 0.35), 1.0, 3.4))
            common = rng.normal(size=p.n_common).tolist()
            edu_missing = rng.random() < p.missing_fraction
            panss_missing = rng.random() < p.missing_fraction
            subjects.append(
                {
                    "participant_id": f"sub-{s['site'].removeprefix('site')}{i + 1:04d}",
                    "site": s["site"],
                    "diagnosis": str(d),
                    "age": round(age, 1),
                    "sex": "M" if male else "F",
                    "education_years": None if edu_missing else round(edu),
                    "panss_total": int(panss) if patient and not panss_missing else None,
                    "specific_severity": round(sev, 5),
                    "specific": [round(v, 5) for v in [sev] + extra],
                    "common": [round(c, 5) for c in common],
                    "tiv_ml": round(tiv, 2),
                    "iqr": round(iqr, 4),
                    "poor_quality": poor,
                }
            )
    ids = [s["participant_id"] for s in subjects]
    if len(set(ids)) != len(ids):
        raise ValueError("site labels produce clashing participant ids; give sites distinct names")
    return subjects


# ---------------------------------------------------------------------------------------------
# Effect fields (shared by every subject; built once, inherited by forked workers)
# ---------------------------------------------------------------------------------------------


@dataclass
class Draws:
    """The random parts of the effects, in MNI millimetres (independent of any grid).

    Attributes
    ----------
    common : list of list of Blob
        The blobs of each common shape factor.
    specific : list of tuple of Blob
        The regions of each specific factor.
    bias : dict
        site -> (blobs of its bias field, the field's peak |value| on the cohort grid).
    """

    common: list[list[anatomy.Blob]]
    specific: list[tuple[anatomy.Blob, ...]]
    bias: dict[str, tuple[list[anatomy.Blob], float]]


@dataclass
class Fields:
    """Everything a worker needs to render subjects: grid, base anatomy and unit effect bases."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    voxel_mm: float
    base: np.ndarray
    xyz: np.ndarray
    specific: list[anatomy.DeformationBasis | anatomy.DensityBasis]
    specific_blobs: list[tuple[anatomy.Blob, ...]]
    age: anatomy.DeformationBasis
    common: list[anatomy.DeformationBasis]
    bias: dict[str, np.ndarray] = field(default_factory=dict)


def _bias_field(blobs: list[anatomy.Blob], xyz: np.ndarray) -> np.ndarray:
    """Sum of the bias blobs' Gaussians on the coordinates ``xyz`` (before normalisation)."""
    field_ = np.zeros(xyz.shape[1:], np.float32)
    for b in blobs:
        d = xyz - np.asarray(b.center, np.float32)[:, None, None, None]
        field_ += b.amplitude * np.exp(-(d**2).sum(0) / (2 * b.sigma**2))
    return field_


def draw_effects(p: Preset, sites: list[dict[str, Any]], seed: int) -> Draws:
    """Draw the common factors, the specific regions and each site's bias blobs (centres on the cohort grid)."""
    shape, affine = anatomy.cat12_grid(p.voxel_mm)
    xyz = anatomy.world_coords(shape, affine)
    brain = xyz[:, anatomy.base_gm(p.voxel_mm) > 0.2]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    common = [anatomy.random_blobs(rng, p.common_blobs, brain) for _ in range(p.n_common)]
    blobs = specific_region_blobs(p, brain, seed)
    groups = [tuple(blobs[k::p.n_specific]) for k in range(p.n_specific)]  # regions dealt round-robin to factors
    bias = {}
    for s in sites:
        b = anatomy.random_blobs(rng, 4, brain, sigma_range=(40.0, 70.0))
        bias[s["site"]] = (b, max(float(np.abs(_bias_field(b, xyz)).max()), 1e-6))
    return Draws(common, groups, bias)


def fields_on_grid(p: Preset, sites: list[dict[str, Any]], draws: Draws, voxel_mm: float, box: str = "12.8") -> Fields:
    """Evaluate the base anatomy, the effect bases and the bias fields of ``draws`` on a CAT12 grid."""
    shape, affine = anatomy.cat12_grid(voxel_mm, box)
    xyz = anatomy.world_coords(shape, affine)
    if p.specific_kind == "shape":
        specific = [anatomy.blob_basis(g, xyz, p.specific_log_j) for g in draws.specific]
    else:
        specific = [anatomy.density_basis(g, xyz, p.specific_log_j) for g in draws.specific]
    bias = {}
    for s in sites:
        blobs, peak = draws.bias[s["site"]]
        bias[s["site"]] = np.exp(s["bias_amplitude"] * (_bias_field(blobs, xyz) / peak)).astype(np.float32)
    return Fields(
        shape=shape,
        affine=affine,
        voxel_mm=float(voxel_mm),
        base=anatomy.base_gm(float(voxel_mm), box),
        xyz=xyz,
        specific=specific,
        specific_blobs=draws.specific,
        age=anatomy.blob_basis(anatomy.AGE_REGIONS, xyz, p.age_log_j),
        common=[anatomy.blob_basis(b, xyz, p.common_log_j) for b in draws.common],
        bias=bias,
    )


def build_fields(p: Preset, sites: list[dict[str, Any]], seed: int) -> Fields:
    """Build the cohort grid, base anatomy, the planted effect bases and each site's bias field."""
    return fields_on_grid(p, sites, draw_effects(p, sites, seed), p.voxel_mm)


def site_fields(p: Preset, sites: list[dict[str, Any]], seed: int) -> tuple[Fields, dict[str, Fields]]:
    """The cohort-grid fields and, for each site of ``p.site_grids``, the same effects on the site's grid."""
    draws = draw_effects(p, sites, seed)
    cohort = fields_on_grid(p, sites, draws, p.voxel_mm)
    own = {site: fields_on_grid(p, sites, draws, float(vox), box) for site, (box, vox) in (p.site_grids or {}).items()}
    return cohort, own


def specific_region_blobs(p: Preset, brain_xyz: np.ndarray, seed: int) -> list[anatomy.Blob]:
    """The planted regions: the anatomical set, or ``n_specific_regions`` random grey-matter centres, widths scaled.

    Random centres are at least two widths apart, so the regions stay distinct, and come from their own seed
    stream (the rest of the cohort does not depend on them).
    """
    if p.specific_regions == "sz":
        blobs = list(anatomy.SZ_REGIONS)
    else:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4,)))
        blobs = []
        names = anatomy.random_region_names()
        for _ in range(10000):
            if len(blobs) == p.n_specific_regions:
                break
            c = brain_xyz[:, rng.integers(brain_xyz.shape[1])].astype(float)
            sigma = float(rng.uniform(7.0, 11.0))
            if all(np.linalg.norm(c - np.asarray(b.center)) > 2.0 * (sigma + b.sigma) * p.specific_sigma_scale
                   for b in blobs):
                blobs.append(anatomy.Blob(tuple(round(float(v), 1) for v in c), sigma, 1.0,
                                          f"random region {len(blobs) + 1} ({names(c)})"))
        if len(blobs) < p.n_specific_regions:
            raise ValueError(f"could not place {p.n_specific_regions} distinct random regions; use fewer or smaller")
    return [dataclasses.replace(b, sigma=b.sigma * p.specific_sigma_scale) for b in blobs]


def age_score(age: float) -> float:
    """Return the age effect's score: decades from 40 years."""
    return (age - 40.0) / 10.0


def render_subject(f: Fields, subj: dict[str, Any], site: dict[str, Any], seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one subject's mwp1 and Jacobian determinant.

    The subject's deformation ``x -> x + u(x)`` sums the unit bases times the subject's scores;
    ``mwp1(x) = GM(x + u(x)) * det(I + grad u) * TIV / 1500`` (mass-preserving pull-back, i.e.
    CAT12-style modulation), times a density loss ``exp(sum severity * log_density)`` for ``density``
    specific effects, then the site's intensity scale, bias field, smoothing and noise.

    Returns
    -------
    mwp1, jacobian : ndarray float32
        ``jacobian`` includes the global TIV scaling, so ``mwp1 = warped GM x jacobian`` before
        the scanner effects.
    """
    from scipy import ndimage

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3, index)))
    scores = [(f.age, age_score(subj["age"]))]
    scores += list(zip(f.common, subj["common"]))
    density = np.zeros(f.shape, np.float32)
    for basis, sev in zip(f.specific, subj["specific"]):
        if sev <= 0:
            continue
        if isinstance(basis, anatomy.DensityBasis):
            density += np.float32(sev) * basis.log_density
        else:
            scores.append((basis, sev))
    disp = np.zeros_like(f.xyz)
    hess = np.zeros((6, *f.shape), np.float32)
    for basis, z in scores:
        disp += np.float32(z) * basis.disp
        hess += np.float32(z) * basis.hess
    jac = np.clip(anatomy.jacobian_det(hess), 0.05, None) * np.float32(subj["tiv_ml"] / anatomy.REFERENCE_TIV_ML)
    # World -> voxel coordinates of the displaced points (the affine is diagonal).
    scale = np.diag(f.affine)[:3].astype(np.float32)[:, None, None, None]
    ijk = (f.xyz + disp - f.affine[:3, 3].astype(np.float32)[:, None, None, None]) / scale
    warped = ndimage.map_coordinates(f.base, ijk, order=1, mode="constant", cval=0.0)
    vol = warped * jac * np.exp(density) * np.float32(site["intensity_scale"]) * f.bias[site["site"]]
    fwhm = site["smooth_fwhm_mm"] + (4.0 if subj["poor_quality"] else 0.0)
    if fwhm > 0:
        vol = ndimage.gaussian_filter(vol, fwhm / 2.3548 / f.voxel_mm, mode="constant")
    support = ndimage.gaussian_filter(warped, 0.5) > 1e-3
    noise = site["noise_sd"] + (0.04 if subj["poor_quality"] else 0.0)
    vol = vol + rng.normal(0.0, noise, f.shape).astype(np.float32)
    vol = np.where(support, np.clip(vol, 0.0, None), 0.0).astype(np.float32)
    return vol, jac.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------


def cat_xml(subj: dict[str, Any], gm_ml: float) -> str:
    """Return a ``report/cat_<id>.xml`` with the fields CAT12 12.8+ writes that matter here."""
    tiv = subj["tiv_ml"]
    csf = 0.22 * tiv
    wm = max(tiv - gm_ml - csf, 0.0)
    iqr = subj["iqr"]
    # CAT12: IQR = rms([NCR_mark res_RMS_mark], 8); keep both marks near the IQR.
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<S>\n"
        "  <software>\n    <version_cat>12.9</version_cat>\n    <revision_cat>2558</revision_cat>\n  </software>\n"
        "  <subjectmeasures>\n"
        f"    <vol_TIV>{tiv:.4f}</vol_TIV>\n"
        f"    <vol_abs_CGW>[{csf:.4f} {gm_ml:.4f} {wm:.4f} 0 0]</vol_abs_CGW>\n"
        f"    <vol_rel_CGW>[{csf / tiv:.6f} {gm_ml / tiv:.6f} {wm / tiv:.6f} 0 0]</vol_rel_CGW>\n"
        "  </subjectmeasures>\n"
        "  <qualityratings>\n"
        f"    <NCR>{iqr * 1.02:.4f}</NCR>\n    <ICR>{1.5:.4f}</ICR>\n    <res_RMS>{iqr * 0.98:.4f}</res_RMS>\n"
        f"    <IQR>{iqr:.4f}</IQR>\n"
        "  </qualityratings>\n"
        "</S>\n"
    )


PARTICIPANT_COLUMNS = ["participant_id", "site", "diagnosis", "age", "sex", "education_years", "panss_total"]

PARTICIPANTS_JSON = {
    "participant_id": {"Description": "Unique participant label (BIDS)."},
    "site": {"Description": "Acquisition site / scanner; the unit of leave-one-site-out cross-validation."},
    "diagnosis": {
        "Description": "Clinical group.",
        "Levels": {"SZ": "schizophrenia (patient)", "HC": "healthy control"},
    },
    "age": {"Description": "Age at scan.", "Units": "year"},
    "sex": {"Description": "Sex.", "Levels": {"M": "male", "F": "female"}},
    "education_years": {"Description": "Years of formal education.", "Units": "year"},
    "panss_total": {
        "Description": "PANSS total score (30 items x 1-7), patients only; n/a for controls.",
        "Units": "score (30-210)",
    },
}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return str(v)


def write_tsv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    """Write a tab-separated table atomically (``n/a`` for missing values)."""
    lines = ["\t".join(columns)] + ["\t".join(_fmt(v) for v in r) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


GT_README = """# Ground truth of a synthetic CAT12 cohort (data_prep.synth)

Not part of the CAT12 layout; the packer ignores this folder.

- `scores.tsv`: one row per subject: `specific_severity` (0 for controls; the patient's multiple of
  the unit schizophrenia effect; with several specific factors `specific_<k>`, one per factor), `common_<k>` (score of common shape factor k, N(0,1)), `age_score`
  ((age - 40) / 10, the multiple of `age_effect.nii.gz`), `tiv_ml`, `iqr` (CAT12 IQR mark, 1 best, 6 worst),
  `poor_quality` (1 = scanned with extra noise/blur and a low IQR rating), site scanner parameters.
- `specific_effect.nii.gz`: the planted schizophrenia-specific effect at unit severity (all factors): {effect}
  (negative = local atrophy). `specific_effect_<k>.nii.gz` per factor when there are several.
- `specific_regions.nii.gz`: binary mask of the planted regions (the core of each region, |x - c| <= sigma,
  {core}): {regions}.
- `common_<k>.nii.gz`: log Jacobian of common factor k at unit score; `age_effect.nii.gz`: per decade.
- `base_gm.nii.gz`: the base anatomy (nilearn MNI152 GM map on this grid, scaled to {gm_ml:.0f} ml).
- `sites.tsv`: each site's scanner effects (intensity scale, smoothing FWHM, noise SD, bias amplitude).
- `synth.json`: the exact preset and seed; re-running with the same values resumes, others are refused.

Subject model: mwp1(x) = GM(x + u(x)) * det(I + grad u(x)) * TIV/{tiv_ref:.0f} (* exp(severity * log density
loss) for a density effect), then site intensity scale,
bias field, Gaussian smoothing and noise. `wj_<id>.nii.gz` is det(I + grad u) * TIV/{tiv_ref:.0f}.
u = sum over effects of score * grad(phi), phi a sum of Gaussian potentials.
"""


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

_WORK: dict[str, Any] = {}


def _subject_paths(out: Path, pid: str) -> tuple[Path, Path, Path]:
    return (
        out / pid / "mri" / f"mwp1{pid}.nii.gz",
        out / pid / "mri" / f"wj_{pid}.nii.gz",
        out / pid / "report" / f"cat_{pid}.xml",
    )


def _do_subject(index: int) -> int:
    """Render and write subject ``index`` (skipped when its files already exist)."""
    w = _WORK
    subj = w["subjects"][index]
    out: Path = w["out"]
    mwp1, wj, xml = _subject_paths(out, subj["participant_id"])
    if mwp1.exists() and xml.exists() and (wj.exists() or not w["jacobian"]):
        return index
    f: Fields = w["site_fields"].get(subj["site"], w["fields"])
    vol, jac = render_subject(f, subj, w["sites"][subj["site"]], w["seed"], index)
    if w["jacobian"]:
        save_nifti(wj, jac, f.affine)
    gm_ml = float(vol.sum()) * f.voxel_mm**3 / 1000.0
    xml.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(xml, cat_xml(subj, gm_ml))
    save_nifti(mwp1, vol, f.affine)  # last: its presence marks the subject done
    return index


def _worker_init() -> None:
    """Pool worker: the default SIGTERM action (the CLI's handler, inherited through fork, raises SystemExit, which
    can leave a worker blocked in the pool's queue lock and ``Pool.terminate`` waiting for it forever)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_partial_files(out: Path, pids: set[str]) -> None:
    """Remove the temporary files (``.NAME.tmp-PID...``, :func:`dist_decode.fsutil.atomic_path`) of these processes."""
    for f in Path(out).rglob(".*.tmp-*"):
        pid = f.name.split(".tmp-", 1)[1].split(".", 1)[0]
        if pid in pids:
            f.unlink(missing_ok=True)


def synthesize(
    out: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    voxel_mm: float | None = None,
    n_jobs: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Synthesize a CAT12-layout cohort with planted effects.

    Parameters
    ----------
    out : path
        Cohort folder (created). Re-running with the same settings resumes; other settings raise.
    preset : str
        A key of :data:`PRESETS`: "tiny", "demo", "paper", or a planted variant "density", "small", "sites", "weak",
        "unbalanced", "two-factor", "density-sz", "shape-wide", "density-noisy".
        Cohort size and grid.
    seed : int
        Root seed of every random draw.
    voxel_mm : float or None
        Overrides the preset's voxel size.
    n_jobs : int or None
        Worker processes (None = all cores; 1 = in this process).
    progress : bool
        Show a tqdm progress bar.
    **overrides
        See :func:`resolve_preset` (``sites=``, ``subjects_per_site=``, ``patients_per_site=``,
        any :class:`Preset` field).

    Returns
    -------
    Path
        ``out``.
    """
    from tqdm import tqdm

    out = Path(out)
    p = resolve_preset(preset, voxel_mm, **overrides)
    gt = out / GROUND_TRUTH
    settings = {"preset": preset, "seed": int(seed), "params": dataclasses.asdict(p)}
    settings["params"]["site_names"] = p.names()
    if p.site_grids is None:  # keep synth.json of one-grid cohorts as it was before site_grids existed
        del settings["params"]["site_grids"]
    if (gt / "synth.json").exists():
        old = json.loads((gt / "synth.json").read_text())
        if old != settings:
            raise ValueError(
                f"{out} holds a cohort synthesized with other settings ({gt / 'synth.json'}); "
                "choose another --out or delete it"
            )
    if (out / "participants.tsv").exists() and (gt / "scores.tsv").exists():
        log.info("%s is complete; nothing to do", out)
        return out

    rng_sites = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    rng_subj = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    rng_extra = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(5,)))
    sites = _sites_table(p, rng_sites)
    subjects = _subjects_table(p, sites, rng_subj, rng_extra)
    log.info(
        "synthesizing %d subjects (%d SZ) at %d sites on a %s grid at %g mm into %s",
        len(subjects), sum(p.site_patients), len(sites), anatomy.cat12_grid(p.voxel_mm)[0], p.voxel_mm, out,
    )
    fields, own_grids = site_fields(p, sites, seed)
    for site, (box, vox) in (p.site_grids or {}).items():
        log.info("site %s is written on the CAT12 %s box at %g mm (%s)", site, box, vox, own_grids[site].shape)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(gt / "synth.json", settings)
    _write_ground_truth(gt, fields, p, sites)

    _WORK.clear()
    _WORK.update(
        subjects=subjects, sites={s["site"]: s for s in sites}, fields=fields, site_fields=own_grids, out=out,
        seed=int(seed), jacobian=p.jacobian,
    )
    n_jobs = (os.cpu_count() or 1) if n_jobs is None else max(1, int(n_jobs))
    todo = range(len(subjects))
    bar = tqdm(total=len(subjects), desc="synth", unit="subj", disable=not progress)
    try:
        if n_jobs == 1 or len(subjects) < 2:
            for i in todo:
                _do_subject(i)
                bar.update()
        else:
            # fork: workers inherit the (large, read-only) effect fields without pickling them. Workers die at
            # once on SIGTERM (no handler that could stall the pool's terminate in its queue lock); the partial
            # files they leave are removed here. Done: close/join.
            with mp.get_context("fork").Pool(n_jobs, initializer=_worker_init) as pool:
                workers = {str(c.pid) for c in mp.active_children()}
                try:
                    for _ in pool.imap_unordered(_do_subject, todo, chunksize=1):
                        bar.update()
                except BaseException:
                    pool.terminate()
                    _remove_partial_files(out, workers)
                    raise
                pool.close()
                pool.join()
    finally:
        bar.close()
        _WORK.clear()

    specific_cols = ["specific_severity"] if p.n_specific == 1 else [f"specific_{k + 1}" for k in range(p.n_specific)]
    write_tsv(
        gt / "scores.tsv",
        ["participant_id", "site", "diagnosis", *specific_cols]
        + [f"common_{k + 1}" for k in range(p.n_common)]
        + ["age_score", "tiv_ml", "iqr", "poor_quality", "panss_total"],
        [
            [s["participant_id"], s["site"], s["diagnosis"], *s["specific"], *s["common"],
             round(age_score(s["age"]), 5), s["tiv_ml"], s["iqr"], int(s["poor_quality"]), s["panss_total"]]
            for s in subjects
        ],
    )
    atomic_write_json(out / "participants.json", PARTICIPANTS_JSON)
    write_tsv(out / "participants.tsv", PARTICIPANT_COLUMNS, [[s[c] for c in PARTICIPANT_COLUMNS] for s in subjects])
    log.info("wrote %s (%d subjects) and %s", out / "participants.tsv", len(subjects), gt)
    return out


def _write_ground_truth(gt: Path, f: Fields, p: Preset, sites: list[dict[str, Any]]) -> None:
    """Write the planted effect maps, the regions mask, site parameters and the README."""
    gt.mkdir(parents=True, exist_ok=True)
    effects = [b.log_effect(1.0) for b in f.specific]
    save_nifti(gt / "specific_effect.nii.gz", np.sum(effects, axis=0), f.affine)
    if len(effects) > 1:
        for k, e in enumerate(effects):
            save_nifti(gt / f"specific_effect_{k + 1}.nii.gz", e, f.affine)
    blobs = [b for g in f.specific_blobs for b in g]
    save_nifti(gt / "specific_regions.nii.gz", anatomy.region_mask(tuple(blobs), f.xyz).astype(np.uint8), f.affine)
    save_nifti(gt / "age_effect.nii.gz", f.age.log_jacobian(1.0), f.affine)
    for k, b in enumerate(f.common):
        save_nifti(gt / f"common_{k + 1}.nii.gz", b.log_jacobian(1.0), f.affine)
    save_nifti(gt / "base_gm.nii.gz", f.base, f.affine)
    cols = list(sites[0])
    write_tsv(gt / "sites.tsv", cols, [[round(s[c], 5) if isinstance(s[c], float) else s[c] for c in cols] for s in sites])
    regions = "; ".join(
        (f"factor {k + 1}: " if len(f.specific_blobs) > 1 else "")
        + ", ".join(f"{b.name} ({b.center[0]:g}, {b.center[1]:g}, {b.center[2]:g}; sigma {b.sigma:.3g} mm)" for b in g)
        for k, g in enumerate(f.specific_blobs))
    if p.specific_kind == "shape":
        effect = "the log Jacobian determinant of the planted deformation"
        core = "where the atrophy is at least 40 % of its peak; it fades to zero at sqrt(3) sigma"
    else:
        effect = "the log of the planted grey-matter density ratio (a loss in place, no displacement)"
        core = "where the density loss is at least 61 % of its peak"
    atomic_write_text(
        gt / "README.md",
        GT_README.format(regions=regions, effect=effect, core=core, gm_ml=anatomy.BASE_GM_ML,
                         tiv_ref=anatomy.REFERENCE_TIV_ML),
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from dist_decode.cli import setup_logging

    ap = argparse.ArgumentParser(
        prog="python -m data_prep.synth",
        description="Synthesize a multi-site CAT12 cohort (mwp1, wj_, cat_*.xml, participants.tsv) with planted "
        "common, site and schizophrenia-specific effects and their ground truth.",
    )
    ap.add_argument("--out", required=True, type=Path, help="cohort folder to write (resumes if it exists)")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="cohort size and grid (default demo)")
    ap.add_argument("--seed", type=int, default=0, help="root seed of every random draw (default 0)")
    ap.add_argument("--voxel-mm", type=float, default=None, help="override the preset's voxel size (mm)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--jacobian", action=argparse.BooleanOptionalAction, default=None,
                    help="write mri/wj_<id>.nii.gz (default: on for tiny/demo, off for paper)")
    ap.add_argument("--specific-log-j", type=float, default=None,
                    help="log Jacobian at the centre of each SZ region at unit severity (default -0.15)")
    ap.add_argument("--poor-quality-fraction", type=float, default=None, help="share of low-IQR subjects (default 0.05)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="any preset field, value parsed as JSON, e.g. --set specific_kind='\"density\"' or "
                    "--set n_specific=2 (repeatable; see docs/data.md for the fields)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    from data_prep.pack import _exit_on_sigterm

    _exit_on_sigterm()
    overrides: dict[str, Any] = {}
    if args.jacobian is not None:
        overrides["jacobian"] = args.jacobian
    if args.specific_log_j is not None:
        overrides["specific_log_j"] = args.specific_log_j
    if args.poor_quality_fraction is not None:
        overrides["poor_quality_fraction"] = args.poor_quality_fraction
    for item in args.sets:
        key, sep, raw = item.partition("=")
        if not sep:
            log.error("--set %r: expected FIELD=VALUE", item)
            return 2
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw  # a bare word such as density
    try:
        synthesize(args.out, args.preset, args.seed, args.voxel_mm, args.jobs, progress=not args.no_progress, **overrides)
    except (ValueError, FileNotFoundError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
