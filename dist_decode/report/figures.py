"""Report figures, each returned as PNG bytes (matplotlib Agg; nilearn plotting for brain maps, offline)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def rsa_figure(rows: list[dict], scope: str = "pooled") -> bytes | None:
    """Bars of Kendall tau-a per variable for S and C in one scope; stars mark the seed's criterion.

    Returns None when the scope has no rows.
    """
    rows = [r for r in rows if str(r.get("scope")) == scope]
    if not rows:
        return None
    variables = list(dict.fromkeys(r["variable"] for r in rows))
    spaces = [s for s in ("S", "C") if any(r["space"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(variables), 3.2))
    width = 0.8 / max(len(spaces), 1)
    colours = {"S": "#c0392b", "C": "#2c7fb8"}
    for k, space in enumerate(spaces):
        for i, var in enumerate(variables):
            row = next((r for r in rows if r["space"] == space and r["variable"] == var), None)
            if row is None or row.get("tau_a") is None:
                continue
            x = i + (k - (len(spaces) - 1) / 2) * width
            ax.bar(x, row["tau_a"], width, color=colours.get(space, "grey"), label=space if i == 0 else None)
            lo, hi = row.get("null_q025"), row.get("null_q975")
            if lo is not None and hi is not None:
                ax.plot([x, x], [lo, hi], color="black", lw=1)  # the permutation null's 95 % range
            if row.get("marked"):
                ax.text(x, row["tau_a"], "*", ha="center", va="bottom" if row["tau_a"] >= 0 else "top", fontsize=14)
    for y in (0.025, -0.025):
        ax.axhline(y, color="grey", ls=":", lw=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(variables)), variables, rotation=20)
    ax.set_ylabel("Kendall tau-a")
    ax.set_title(f"RSA ({scope}): bars = tau-a, lines = null 95 %, * = |tau|>0.025 and p<0.01")
    ax.legend(title="space", fontsize=8)
    return _png(fig)


def overlap_slices(overlap_img, n_sites: int) -> bytes:
    """Overlap count on MNI slices (axial mosaic) over nilearn's MNI152 template."""
    from nilearn import plotting

    fig = plt.figure(figsize=(11, 2.8))
    plotting.plot_stat_map(overlap_img, display_mode="z", cut_coords=7, cmap="hot", vmin=0.5,
                           vmax=max(n_sites, 1), threshold=0.5, symmetric_cbar=False, figure=fig,
                           title=f"sites significant (0..{n_sites})", colorbar=True)
    return _png(fig)


def overlap_glass(overlap_img, n_sites: int) -> bytes:
    """Overlap count as a glass brain."""
    from nilearn import plotting

    fig = plt.figure(figsize=(9, 3.2))
    plotting.plot_glass_brain(overlap_img, threshold=0.5, cmap="hot", vmin=0, vmax=max(n_sites, 1),
                              colorbar=True, plot_abs=False, figure=fig, title="overlap (glass brain)")
    return _png(fig)


def effect_slices(img, title: str) -> bytes:
    """A signed map (e.g. a mean log density ratio) on axial MNI slices, symmetric colour scale (blue = loss)."""
    from nilearn import plotting

    data = np.asarray(img.dataobj, float)
    vmax = float(np.abs(data).max()) or 1.0
    fig = plt.figure(figsize=(11, 2.8))
    plotting.plot_stat_map(img, display_mode="z", cut_coords=7, cmap="RdBu_r", vmax=vmax, threshold=vmax * 0.05,
                           symmetric_cbar=True, figure=fig, title=title, colorbar=True)
    return _png(fig)


def models_figure(rows: list[dict]) -> bytes | None:
    """A trained run on a new cohort, per fold model: reconstruction error (new cohort beside the model's own
    held-out site) and the SZ/HC AUC of S and C transferred from the model's training subjects."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return None
    names = [r["model"] for r in done]
    x = np.arange(len(names))
    val = lambda r, k: r.get(k) if r.get(k) is not None else np.nan  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 1.4 * len(names), 3.2))
    fig.subplots_adjust(wspace=0.45)
    a1.bar(x - 0.2, [val(r, "recon_error") for r in done], 0.4, color="#7f7f7f", label="new cohort")
    a1.bar(x + 0.2, [val(r, "recon_error_run_heldout") for r in done], 0.4, color="#c7c7c7",
           label="own held-out site")
    a1.set_xticks(x, names, rotation=30)
    a1.set_ylabel("recon MSE")
    a1.legend(fontsize=7)
    _auc_panel(a2, names, [val(r, "auc_s_transfer") for r in done], [val(r, "auc_c_transfer") for r in done],
               "SZ vs HC AUC (from training sites)")
    fig.suptitle("Per fold model, on the new cohort")
    return _png(fig)


def _auc_panel(ax, labels: Sequence[str], auc_s: Sequence[float], auc_c: Sequence[float], ylabel: str) -> None:
    """S (red) and C (blue) diagnosis AUC bars side by side per label, chance at 0.5 dotted."""
    x = np.arange(len(labels))
    ax.bar(x - 0.2, auc_s, 0.4, color="#c0392b", label="S")
    ax.bar(x + 0.2, auc_c, 0.4, color="#2c7fb8", label="C")
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xticks(x, labels, rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def dice_figure(sites: Sequence[str], matrix: np.ndarray) -> bytes:
    """Site-by-site Dice heatmap (grey = undefined: both maps empty)."""
    m = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(sites), 1.0 + 0.5 * len(sites)))
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=1, cmap="viridis")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
    ax.set_yticks(range(len(sites)), sites)
    for i in range(len(sites)):
        for j in range(len(sites)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="Dice")
    ax.set_title("Dice of site maps")
    return _png(fig)


def folds_figure(folds: list[dict]) -> bytes | None:
    """Held-out reconstruction error and S/C diagnosis AUC per fold."""
    done = [f for f in folds if f.get("status") == "done"]
    if not done:
        return None
    sites = [f["site"] for f in done]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(3 + 1.2 * len(sites), 3))
    a1.bar(sites, [f.get("recon_error_test") or 0 for f in done], color="#7f7f7f")
    a1.set_ylabel("held-out recon MSE")
    a1.tick_params(axis="x", rotation=30)
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    _auc_panel(a2, sites, [nan(f.get("auc_s")) for f in done], [nan(f.get("auc_c")) for f in done],
               "SZ vs HC AUC (CV)")
    fig.suptitle("Per fold (held-out site)")
    return _png(fig)


def loss_figure(curves: dict[str, dict]) -> bytes | None:
    """Training loss (lines) and validation loss (dots) per fold, log scale; None without any curve."""
    curves = {k: v for k, v in curves.items() if v.get("train_step")}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, (site, c) in enumerate(curves.items()):
        colour = f"C{k % 10}"
        ax.plot(c["train_step"], c["train_total"], color=colour, lw=1, label=site)
        if c.get("val_step"):
            ax.plot(c["val_step"], c["val_total"], "o", color=colour, ms=4)
    if all(v > 0 for c in curves.values() for v in c["train_total"]):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("total loss")
    ax.set_title("Training (lines) and validation (dots) loss per fold")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
