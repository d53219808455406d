"""The S read-out of a trained DECODE-SZ model from its salient decoder: the posterior mean of s in closed form.

Why. The S encoder is fitted patient by patient; the salient decoder's patterns are fitted to all patients
together. On planted cohorts with weak, narrow or few-patient effects the decoder's patterns point to the planted
severity more reliably than the encoder does (docs/science.md, *S read from the decoder*). With an additive route
and a linear salient branch, the exact posterior of s under the trained decoder is a linear map of the volume, so
the encoder can be replaced by it after training. The encoder stays: training needs it (amortised inference), and
its posterior means over the training patients set the prior below.

The model, for a subject with common latent ``c`` (the C encoder's posterior mean) and residual
``r = x - decode(c, 0)`` on the brain-mask voxels (network units)::

    r = mu0 + W^T s + u + e

* ``W`` (ds, V): the salient decoder's patterns, ``salient(e_k)`` for each unit vector ``e_k``;
* ``mu0``: the training controls' mean residual;
* ``u``: anything in the span of the training controls' residual deviations, under a flat prior (what a control
  can show says nothing about s: site, scanner and common anatomy the common branch left over);
* ``e ~ N(0, sigma^2 I)``: the eigen noise level the decoder was trained with (``loss.noise = "eigen"``);
* ``s ~ N(0, Lambda)``: ``Lambda`` the covariance of the training patients' S-encoder posterior means (an
  empirical-Bayes prior: the directions the encoder uses, at the scale it uses them; directions it does not use
  are shrunk to zero).

With ``P`` the projection off the control span, the posterior is Gaussian with::

    cov  = sigma^2 (W P W^T + sigma^2 Lambda^-1)^-1
    mean = R (r - mu0),   R = (W P W^T + sigma^2 Lambda^-1)^-1 W P

:func:`fit_salient_readout` computes ``R``, ``mu0`` and ``log diag(cov)`` from the training subjects without
forming ``P`` or the span's basis (V x V and n x V): only the controls' residual Gram matrix (n x n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

#: Relative eigenvalue below which a direction of the controls' residual Gram matrix counts as empty.
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


@torch.no_grad()
def salient_patterns(model) -> torch.Tensor:
    """The salient decoder's patterns ``W`` (ds, V) on the read-out's mask voxels, network units.

    Raises
    ------
    ValueError
        When the salient branch is not linear in s (a nonlinear conv decoder), so no closed form exists.
    """
    ds = model.latent_specific
    mask_index = model.readout_index
    device = mask_index.device
    eye = torch.eye(ds, dtype=torch.float32, device=device)
    w = model.salient_normalized(eye).flatten(1).index_select(1, mask_index).double()
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn((2, ds), generator=g).to(device)
    lhs = model.salient_normalized(a).flatten(1).index_select(1, mask_index).double()
    err = (lhs - a.double() @ w).abs().max() / w.abs().max().clamp_min(1e-30)
    if err > 1e-3:
        raise ValueError(f"the salient branch is not linear in s (relative deviation {float(err):.2g}): the "
                         "decoder read-out needs model.decoder 'dense' or model.decoder_activation 'linear'")
    return w


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
    if not noise_var or noise_var <= 0:
        raise ValueError(f"the decoder read-out needs a positive noise variance, got {noise_var!r}")
    resid_ctl, s_pat = [], []
    for x, patient in batches:
        x = x.float()
        patient = patient.bool()
        r = model.common_residual(x)
        if (~patient).any():
            resid_ctl.append(r[~patient].cpu())
        if patient.any():
            s_pat.append(model.encode_specific_encoder(x[patient])[0].double().cpu())
    n_c = sum(len(r) for r in resid_ctl)
    n_p = sum(len(s) for s in s_pat)
    if n_c < 2 or n_p < 2:
        raise ValueError(f"the decoder read-out needs at least 2 controls and 2 patients among {what} "
                         f"(got {n_c} controls, {n_p} patients)")
    dev = torch.cat(resid_ctl)  # (n_c, V) float32: the largest array (1 GB for 500 controls at 1.5 mm)
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
    s = torch.cat(s_pat)
    prior = torch.cov(s.T).reshape(model.latent_specific, model.latent_specific)
    prior = prior + PRIOR_JITTER * (prior.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(prior),
                                                                                            dtype=prior.dtype)
    a = w @ wp.T
    a = 0.5 * (a + a.T) + noise_var * torch.linalg.inv(prior)
    weight = torch.linalg.solve(a, wp)
    cov = noise_var * torch.linalg.inv(a)
    return SalientReadout(weight=weight.float(), offset=offset.float(), logvar=cov.diagonal().log().float(),
                          n_controls=n_c, n_patients=n_p, span_rank=int(keep.sum()))
