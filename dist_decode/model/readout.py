"""The read-outs of a trained DECODE-SZ model from its decoder: S as the posterior mean of s in closed form, C as
the healthy twin's coordinates on the common branch's principal axes.

S read-out
----------

Why. The S encoder is fitted patient by patient; the salient decoder's patterns are fitted to all patients
together. On planted cohorts with weak, narrow or few-patient effects the decoder's patterns point to the planted
severity more reliably than the encoder does (docs/science.md, *S read from the decoder*). With an additive route
and a linear salient branch, the exact posterior of s under the trained decoder is a linear map of the volume, so
the encoder can be replaced by it after training. The encoder stays: training needs it (amortised inference), and
its posterior means over the training patients set the prior below.

The model, for a subject's volume ``x`` on the brain-mask voxels (network units)::

    x = mu0 + W^T s + u + e

* ``W`` (ds, V): the salient decoder's patterns, ``salient(e_k)`` for each unit vector ``e_k``;
* ``mu0``: the training controls' mean volume;
* ``u``: anything in the span of the training controls' deviations from it, under a flat prior (what a control
  can show says nothing about s: site, scanner and the common anatomy, c included without estimating it);
* ``e ~ N(0, sigma^2 I)``: the eigen noise level the decoder was trained with (``loss.noise = "eigen"``);
* ``s ~ N(0, Lambda)``: ``Lambda`` the covariance of the training patients' S-encoder posterior means (an
  empirical-Bayes prior: the directions the encoder uses, at the scale it uses them; directions it does not use
  are shrunk to zero).

With ``model.specific_readout_input = "residual"`` (the behaviour until 2026-12-02) the model reads
``r = x - decode(c, 0)`` instead, ``c`` the C encoder's posterior mean, and ``mu0`` and ``u`` are the controls'
mean residual and the span of their residual deviations. Plugging in that estimate of c costs S: on the planted
cohorts the common branch's patterns overlap the salient ones (in directions it decodes below the noise level),
so the twin takes part of a patient's effect with it (docs/science.md, *S read from the volume*). For the same
reason the common branch's patterns are not added to the flat-prior span: that lowers S further.

With ``P`` the projection off the control span, the posterior is Gaussian with::

    cov  = sigma^2 (W P W^T + sigma^2 Lambda^-1)^-1
    mean = R (x - mu0),   R = (W P W^T + sigma^2 Lambda^-1)^-1 W P

:func:`fit_salient_readout` computes ``R``, ``mu0`` and ``log diag(cov)`` from the training subjects without
forming ``P`` or the span's basis (V x V and n x V): only the Gram matrix of the controls' deviations (n x n).

C read-out
----------
Why. The C encoder's means carry the common factors but weight them by an optimisation artefact: with the
budgets of the profiles, the scale of each latent direction has not settled where the ELBO puts it (the
training subjects' means vary 4-9x more than the N(0, I) prior along the strong directions and ~1x along a
weak one such as age), so Euclidean distances in C, which the RSA reads, are dominated by a few directions.
And directions the common branch barely decodes (less image variance than the noise) still carry signal, e.g.
diagnosis, that a classifier on the raw means can find but the twin does not show (docs/science.md, *C read
from the decoder*).

The read-out puts C in the geometry of a converged linear VAE (probabilistic PCA with the decoder's subspace):
with ``Wc`` (dc, V) the common branch's patterns, ``K`` the covariance of the training subjects' C means, the
twins' image covariance ``Wc^T K Wc`` has principal axes ``e_i`` and variances ``d_i``. A subject's feature ``i``
is its twin's deviation from the training mean on ``e_i``, divided by ``sqrt(d_i + sigma^2)``; the axes kept are
those with ``d_i > sigma^2`` (they decode more than the noise level ``sigma^2`` the model was trained with). The
features have variance ``d_i / (d_i + sigma^2) = 1 - sigma^2 / lambda_i`` over the training subjects, the
posterior-mean variance of a pPCA direction with data variance ``lambda_i``, and their Euclidean distances are the
Mahalanobis distances of the twins under the model's marginal image covariance ``Wc^T K Wc + sigma^2 I`` on the
kept axes. In latent terms ``f = A (c - m)``, ``A = D^-1/2 P^T G^1/2`` with ``G = Wc Wc^T`` and ``P``, ``D`` the
eigenvectors and -values of ``G^1/2 K G^1/2`` (dc x dc; no V-sized matrix beyond ``Wc``). In this plain metric it
needs no label: every training subject counts alike.

In the patients' noise (``model.common_readout_salient_noise``, the default): the image metric is that of a
patient's volume around its twin, ``Sigma = sigma^2 I + Ws^T Lambda Ws`` (the salient patterns ``Ws`` and the S
read-out's prior ``Lambda``), not ``sigma^2 I``: ``G = sigma^2 Wc Sigma^-1 Wc^T`` (Woodbury, dc x dc). Twin
differences along what the salient branch decodes then count little. Why: the common branch's patterns overlap
the salient ones, so a patient's twin moves with the patient's effect, and C's distances told patients from
controls on a cohort with density losses in eight broad regions (docs/science.md, *C read in the patients'
noise*). This uses the diagnosis labels of the training subjects, as the S read-out's prior does; a subject's C
is still the same linear map of its C-encoder mean, whatever its diagnosis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

#: Relative eigenvalue below which a direction of the controls' deviation Gram matrix counts as empty.
SPAN_RTOL = 1e-6
#: Ridge added to the prior covariance, relative to its mean variance (keeps unused directions finite).
PRIOR_JITTER = 1e-6


@dataclass
class SalientReadout:
    """A fitted read-out: ``s = weight @ (r - offset)``, posterior log-variances ``logvar`` (the same for all)."""

    weight: torch.Tensor  # (ds, V)
    offset: torch.Tensor  # (V,)
    logvar: torch.Tensor  # (ds,)
    n_controls: int
    n_patients: int
    span_rank: int


#: Voxels per float64 block when accumulating over the control deviations.
VOXEL_CHUNK = 65536


def _voxel_chunks(n: int):
    for start in range(0, n, VOXEL_CHUNK):
        yield slice(start, min(n, start + VOXEL_CHUNK))


def _affine_patterns(branch, dim: int, index: torch.Tensor, what: str) -> torch.Tensor:
    """``branch(e_k) - branch(0)`` for each unit vector ``e_k`` of ``dim`` latents, on the ``index`` voxels (float64),
    after checking on two random inputs that ``branch`` is affine (a ValueError naming ``what`` otherwise)."""
    def on_mask(z: torch.Tensor) -> torch.Tensor:
        return branch(z).flatten(1).index_select(1, index).double()

    device = index.device
    base = on_mask(torch.zeros((1, dim), device=device))
    w = on_mask(torch.eye(dim, device=device)) - base
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn((2, dim), generator=g).to(device)
    err = (on_mask(a) - base - a.double() @ w).abs().max() / w.abs().max().clamp_min(1e-30)
    if err > 1e-3:
        raise ValueError(f"the {what} (relative deviation {float(err):.2g}): the decoder read-out needs "
                         "model.decoder 'dense' or model.decoder_activation 'linear'")
    return w


@torch.no_grad()
def salient_patterns(model) -> torch.Tensor:
    """The salient decoder's patterns ``W`` (ds, V) on the read-out's mask voxels, network units.

    Raises
    ------
    ValueError
        When the salient branch is not linear in s (a nonlinear conv decoder), so no closed form exists.
    """
    return _affine_patterns(model.salient_normalized, model.latent_specific, model.readout_index,
                            "salient branch is not linear in s")


@torch.no_grad()
def fit_salient_readout(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], noise_var: float,
                        what: str = "the training subjects") -> SalientReadout:
    """Fit the read-out of a trained additive DECODE-SZ ``model`` (module docstring).

    Parameters
    ----------
    model : DecodeSZ
        Trained, eval mode, fp32, built with ``specific_readout="decoder"`` (its mask voxels are read).
    batches : iterable of (Tensor, Tensor)
        ``(model input (N, 1, X, Y, Z), patient flags (N,))`` of the training subjects.
    noise_var : float
        The fold's eigen noise variance (network units).
    what : str
        Names the subjects in error messages.

    Raises
    ------
    ValueError
        With fewer than 2 patients or 2 controls, or a noise variance that is not positive.
    """
    return fit_readouts(model, batches, noise_var, what, salient=True, common=False)[0]


def _salient_prior(model, s_pat: list[torch.Tensor]) -> torch.Tensor:
    """``Lambda``: the covariance of the training patients' S-encoder means (ds x ds, float64), with a small ridge
    that keeps the directions the encoder does not use finite."""
    s = torch.cat(s_pat)
    prior = torch.cov(s.T).reshape(model.latent_specific, model.latent_specific)
    return prior + PRIOR_JITTER * (prior.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(prior),
                                                                                        dtype=prior.dtype)


def _salient_readout(model, read_ctl: list[torch.Tensor], s_pat: list[torch.Tensor], noise_var: float,
                     what: str) -> SalientReadout:
    """The S read-out from what it reads of the training controls (:meth:`DecodeSZ.readout_input`) and the
    training patients' S-encoder means."""
    n_c = sum(len(r) for r in read_ctl)
    n_p = sum(len(s) for s in s_pat)
    if n_c < 2 or n_p < 2:
        raise ValueError(f"the decoder read-out needs at least 2 controls and 2 patients among {what} "
                         f"(got {n_c} controls, {n_p} patients)")
    dev = torch.cat(read_ctl)  # (n_c, V) float32: the largest array (1 GB for 500 controls at 1.5 mm)
    offset = dev.double().mean(0)
    dev -= offset.float()  # the deviations, in place
    w = salient_patterns(model).cpu()  # (ds, V)
    # W P = W - (W D^T) K^+ D for the deviations D (n_c, V) and their Gram matrix K = D D^T, accumulated in
    # float64 over voxel chunks so that no float64 copy of D exists
    gram = torch.zeros(len(dev), len(dev), dtype=torch.float64)
    wd = torch.zeros(len(w), len(dev), dtype=torch.float64)
    for chunk in _voxel_chunks(dev.shape[1]):
        d = dev[:, chunk].double()
        gram += d @ d.T
        wd += w[:, chunk] @ d.T
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > SPAN_RTOL * lam.max().clamp_min(1e-300)
    vec, lam = vec[:, keep], lam[keep]
    m = (wd @ vec / lam) @ vec.T  # (ds, n_c)
    wp = w.clone()
    for chunk in _voxel_chunks(dev.shape[1]):
        wp[:, chunk] -= m @ dev[:, chunk].double()
    prior = _salient_prior(model, s_pat)
    a = w @ wp.T
    a = 0.5 * (a + a.T) + noise_var * torch.linalg.inv(prior)
    weight = torch.linalg.solve(a, wp)
    cov = noise_var * torch.linalg.inv(a)
    return SalientReadout(weight=weight.float(), offset=offset.float(), logvar=cov.diagonal().log().float(),
                          n_controls=n_c, n_patients=n_p, span_rank=int(keep.sum()))


@dataclass
class CommonReadout:
    """A fitted C read-out: ``f = weight @ (c - offset)`` for C-encoder means ``c``."""

    weight: torch.Tensor  # (k, dc)
    offset: torch.Tensor  # (dc,)
    variances: torch.Tensor  # (dc,) d_i of every axis, decreasing (network units)
    noise_var: float
    n_subjects: int


@torch.no_grad()
def common_patterns(model) -> torch.Tensor:
    """The common branch's patterns ``Wc`` (dc, V): ``decode(e_k, 0) - decode(0, 0)`` on the read-out's mask
    voxels, network units.

    Raises
    ------
    ValueError
        When the common branch is not affine in c (a nonlinear conv decoder), so the read-out is undefined.
    """
    return _affine_patterns(model.common_normalized, model.latent_common, model.readout_index,
                            "common branch is not linear in c")


@torch.no_grad()
def fit_common_readout(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], noise_var: float,
                       what: str = "the training subjects") -> CommonReadout:
    """Fit the C read-out of a trained additive DECODE-SZ ``model`` (module docstring).

    Parameters
    ----------
    model : DecodeSZ
        Trained, eval mode, fp32, built with ``common_readout="decoder"``.
    batches : iterable of (Tensor, Tensor)
        ``(model input (N, 1, X, Y, Z), patient flags (N,))`` of the training subjects (the flags pick the
        patients whose S-encoder means set the patients' noise, ``model.common_readout_salient_noise``; every
        subject's C mean counts alike).
    noise_var : float
        The fold's eigen noise variance (network units).
    what : str
        Names the subjects in error messages.

    Raises
    ------
    ValueError
        With fewer than 3 subjects, fewer than 2 patients in the patients' noise, or a noise variance that is not
        positive.
    """
    return fit_readouts(model, batches, noise_var, what, salient=False, common=True)[1]


def _common_readout(model, means: list[torch.Tensor], noise_var: float, what: str,
                    s_pat: list[torch.Tensor] | None = None) -> CommonReadout:
    """The C read-out from the training subjects' C-encoder means; with ``s_pat`` (the training patients'
    S-encoder means) in the patients' noise metric (module docstring)."""
    c = torch.cat(means) if means else torch.zeros((0, model.latent_common), dtype=torch.float64)
    if len(c) < 3:
        raise ValueError(f"the decoder read-out of C needs at least 3 subjects among {what} (got {len(c)})")
    w = common_patterns(model).cpu()  # (dc, V) float64
    gram = w @ w.T
    if s_pat is not None:
        n_p = sum(len(s) for s in s_pat)
        if n_p < 2:
            raise ValueError(f"the decoder read-out of C in the patients' noise needs at least 2 patients among "
                             f"{what} (got {n_p}; or set model.common_readout_salient_noise=false)")
        # sigma^2 Wc Sigma^-1 Wc^T with Sigma = sigma^2 I + Ws^T Lambda Ws (Woodbury: no V x V matrix)
        ws = salient_patterns(model).cpu()
        cross = w @ ws.T
        core = noise_var * torch.linalg.inv(_salient_prior(model, s_pat)) + ws @ ws.T
        gram = gram - cross @ torch.linalg.solve(core, cross.T)
    gv, gq = torch.linalg.eigh(0.5 * (gram + gram.T))
    g_half = (gq * gv.clamp_min(0).sqrt()) @ gq.T
    offset = c.mean(0)
    cov = torch.cov(c.T).reshape(len(gram), len(gram))
    d, p = torch.linalg.eigh(g_half @ cov @ g_half)
    d, p = d.flip(0).clamp_min(0), p.flip(1)
    # at least the strongest axis: a C that decodes nothing above the noise still gets one feature
    rank = max(1, int((d > noise_var).sum()))
    weight = (p[:, :rank].T @ g_half) / (d[:rank] + noise_var).sqrt()[:, None]
    return CommonReadout(weight=weight.float(), offset=offset.float(), variances=d.float(),
                         noise_var=float(noise_var), n_subjects=len(c))


@torch.no_grad()
def fit_readouts(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], noise_var: float,
                 what: str = "the training subjects", salient: bool = True,
                 common: bool = True) -> tuple[SalientReadout | None, CommonReadout | None]:
    """Fit the S read-out (``salient``) and the C read-out (``common``) in one pass over ``batches``: each
    volume is read and its C encoded once for both (:func:`fit_salient_readout`, :func:`fit_common_readout`).

    Raises
    ------
    ValueError
        A noise variance that is not positive, or too few subjects for a read-out (naming ``what``).
    """
    if not noise_var or noise_var <= 0:
        raise ValueError(f"the decoder read-outs need a positive noise variance, got {noise_var!r}")
    c_noise = common and getattr(model, "common_readout_salient_noise", False)
    read_ctl, s_pat, c_means = [], [], []
    for x, patient in batches:
        x = x.float()
        c_mu = model.encode_common(x)[0]
        if common:
            c_means.append(c_mu.double().cpu())
        if salient or c_noise:
            patient = patient.bool()
            if salient and (~patient).any():
                read_ctl.append(model.readout_input(x[~patient], c_mu[~patient]).cpu())
            if patient.any():
                s_pat.append(model.encode_specific_encoder(x[patient])[0].double().cpu())
    return (_salient_readout(model, read_ctl, s_pat, noise_var, what) if salient else None,
            _common_readout(model, c_means, noise_var, what, s_pat if c_noise else None) if common else None)
