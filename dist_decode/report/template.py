"""The self-contained HTML of the report: inline CSS, figures as base64 PNG data URIs, no scripts."""
from __future__ import annotations

import base64
import html
import json
import math
from typing import Any, Iterable

CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2em auto;max-width:1150px;color:#222;
line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444}h2{margin-top:1.8em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}tr.mark td{background:#fff3cd}
.missing{background:#fdecea;border-left:4px solid #c0392b;padding:.5em 1em}.note{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}pre{background:#f7f7f7;padding:.6em;overflow:auto;
font-size:.8em;max-height:28em}.wide{overflow-x:auto}.figs{display:flex;flex-wrap:wrap;gap:.5em}
.figs img{max-width:48%}
"""


def esc(v: Any) -> str:
    return html.escape(str(v))


def fmt(v: Any) -> str:
    """Numbers to 3-4 significant figures, None/NaN as an en dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return esc(v)


def table(rows: list[dict], cols: Iterable[str] | None = None, labels: dict | None = None,
          mark_key: str | None = None) -> str:
    """An HTML table of ``rows`` (text columns left-aligned); rows with a true ``mark_key`` are highlighted."""
    if not rows:
        return "<p class='note'>(no rows)</p>"
    cols = list(cols) if cols else list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    labels = labels or {}
    head = "".join(f"<th class='{'l' if isinstance(rows[0].get(c), str) else ''}'>{esc(labels.get(c, c))}</th>"
                   for c in cols)
    body = []
    for r in rows:
        cls = " class='mark'" if mark_key and r.get(mark_key) else ""
        cells = "".join(f"<td class='{'l' if isinstance(r.get(c), str) else ''}'>{fmt(r.get(c))}</td>" for c in cols)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def img(figs: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figs:
        return ""
    data = base64.b64encode(figs[name]).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{esc(alt)}' data-figure='{esc(name)}'>"


def missing_box(text: str) -> str:
    return f"<div class='missing'>Missing: {esc(text)}</div>"


def render(data: dict, figs: dict[str, bytes]) -> str:
    """The full report page."""
    p: list[str] = []
    prov = data["provenance"]
    p.append(f"<h1>dist-decode report</h1><p class='note'>Run <code>{esc(data['run_dir'])}</code>, "
             f"built {esc(prov['built_at'])} on {esc(prov['host'])}, commit {esc(prov.get('git_commit') or 'unknown')}."
             "</p>")
    if data["missing"]:
        items = "".join(f"<li>{esc(m)}</li>" for m in data["missing"])
        p.append(f"<div class='missing'><b>This run is incomplete; missing parts:</b><ul>{items}</ul></div>")

    # Cohort
    p.append("<h2 id='cohort'>Cohort</h2>")
    c = data["cohort"]
    if c["status"] == "ok":
        p.append(f"<p>{c['n_sites']} sites, {c['n_subjects']} subjects after exclusions; "
                 f"{len(c['excluded'])} excluded"
                 + (" (" + ", ".join(f"{esc(k)}: {v}" for k, v in c["excluded_by_reason"].items()) + ")"
                    if c["excluded"] else "") + ".</p>")
        p.append(table(c["sites"]))
        if c["loso_ineligible"]:
            p.append(f"<p>Not held out (LOSO-ineligible): <code>{esc(json.dumps(c['loso_ineligible']))}</code></p>")
    else:
        p.append(missing_box(c["reason"]))

    # Folds
    p.append("<h2 id='folds'>Leave-one-site-out folds</h2>")
    f = data["folds"]
    cols = ["site", "status", "model", "n_test", "n_test_patients", "n_test_controls", "recon_error_test",
            "recon_error_train", "auc_s", "auc_c", "auc_s_transfer", "auc_c_transfer", "n_parameters",
            "anchor_parameters", "fewer_than_anchor_pct", "steps", "final_train_loss", "final_val_loss",
            "volumes_per_s", "world_size", "wall_s"]
    p.append(table(f["folds"], cols, labels={
        "auc_s": "AUC S (CV)", "auc_c": "AUC C (CV)", "auc_s_transfer": "AUC S (train sites)",
        "auc_c_transfer": "AUC C (train sites)", "fewer_than_anchor_pct": "% fewer than anchor"}))
    p.append("<p class='note'>Reconstruction error: masked mean squared error of the held-out site (test) and of the "
             "training subjects. AUC: SZ vs HC separability of the held-out site's posterior-mean features, by a "
             "standardised logistic regression, stratified cross-validated within the held-out site (CV), and "
             "trained on the training sites then applied to the held-out site. Anchor: the 2022 CVAE "
             f"({fmt(f['anchor_parameters'])} parameters).</p>")
    p.append(img(figs, "folds", "per-fold reconstruction error and AUC"))
    p.append(img(figs, "loss", "training and validation loss"))

    # RSA
    p.append("<h2 id='rsa'>Representational similarity analysis</h2>")
    r = data["rsa"]
    if r["status"] == "ok":
        p.append(f"<p>Kendall tau between feature and model RDMs of patients, {fmt(r['permutations'])} subject-label "
                 "permutations; p_FWE across variables and spaces. Highlighted rows meet the seed's criterion "
                 "|tau-a| &gt; 0.025 and p &lt; 0.01.</p>")
        # The pooled analysis first and full width; the per-site ones side by side.
        order = sorted(r["scopes"], key=lambda sc: sc != "pooled")
        if "pooled" in order:
            p.append(img(figs, "rsa_pooled", "RSA pooled"))
        sites = "".join(img(figs, f"rsa_{sc}", f"RSA {sc}") for sc in order if sc != "pooled")
        if sites:
            p.append(f"<div class='figs'>{sites}</div>")
        p.append(table(r["rows"], ["scope", "space", "variable", "kind", "n", "tau_a", "tau_b", "p", "p_fwe",
                                   "null_q025", "null_q50", "null_q975", "marked", "seed_mark"], mark_key="seed_mark"))
    else:
        p.append(missing_box(r["reason"]))

    # Maps
    p.append("<h2 id='maps'>Schizophrenia-specific maps</h2>")
    m = data["maps"]
    if m["status"] == "ok":
        cfg = m.get("config") or {}
        how = (f"Benjamini-Hochberg FDR q = {cfg.get('fdr_q')}" if cfg.get("threshold") == "fdr" else
               f"sign-flip permutation maxT FWE alpha = {cfg.get('fwe_alpha')} ({cfg.get('permutations')} permutations)")
        kind = cfg.get("kind") if cfg.get("kind") not in (None, "auto") else "density"
        what = ("log(recon / twin) in grey-matter density units" if kind == "density" else
                f"the log Jacobian of ANTs {esc(cfg.get('syn_transform'))} twin &rarr; reconstruction")
        tested = ("each patient's observed volume against the healthy twin (log(observed / twin))"
                  if cfg.get("test_on", "deviation") == "deviation" else "the decoded maps")
        extent = (f"within each significant cluster, the voxels whose mean effect reaches {cfg.get('extent_fraction')} "
                  "of the cluster's peak" if cfg.get("extent") == "half_max" else "every significant voxel")
        p.append(f"<p>Per held-out patient: the healthy twin decode(c, 0) against the reconstruction decode(c, s): "
                 f"{what}. Per held-out site: a voxelwise one-sample test of {tested}, thresholded at {esc(how)}, "
                 f"keeping {extent}; overlap = number of sites (0..{m['n_sites']}), sites: "
                 f"{esc(', '.join(m['sites']))}.</p>")
        if m.get("sites_missing_fold"):
            p.append(missing_box("folds not finished: " + ", ".join(m["sites_missing_fold"])))
        p.append(img(figs, "overlap_slices", "overlap heatmap on MNI slices"))
        p.append(img(figs, "overlap_glass", "overlap glass brain"))
        groups = [{"site": s, **{k: v for k, v in g.items() if k in (
            "status", "n", "method", "level", "t_threshold", "n_significant", "n_kept", "n_kept_negative",
            "n_kept_positive")}}
            for s, g in (m.get("groups") or {}).items()]
        p.append("<h3>Per-site group maps</h3>" + table(groups, labels={"n_kept_negative": "kept: loss",
                                                                          "n_kept_positive": "kept: gain"}))
        p.append("<h3>Dice between sites</h3>" + img(figs, "dice", "Dice matrix"))
        p.append("<h3>Clusters</h3>" + table(m.get("clusters") or []))
    else:
        p.append(missing_box(m["reason"]))

    # Recovery
    rec = data["recovery"]
    p.append("<h2 id='recovery'>Ground-truth recovery (synthetic cohort)</h2>")
    if rec["status"] == "ok":
        p.append(f"<p>Measured on {esc(rec['subjects'])}; the mean over the {len(rec['folds'])} held-out sites. "
                 "S~specific: Kendall tau-a between the S-space RDM and the RDM of the planted specific factors "
                 "(likewise S~common, C~common, C~specific); C diagnosis AUC: cross-validated SZ/HC AUC of C within "
                 "the held-out site; maps: the overlap at the consistent-site threshold (at least half the sites) "
                 "against the planted regions. The oracle row is the tau between the two planted RDMs themselves: "
                 "the cross-talk a perfect model would show on these patients.</p>")
        goals = [{**g, "met": ("met" if g["met"] else "NOT MET") if g["met"] is not None else ""}
                 for g in rec["goals"]]
        p.append(table(goals, ["metric", "value", "goal", "met", "folds", "min", "max"]))
        rm = rec.get("maps")
        if rm:
            dices = ", ".join(f"&ge;{k} sites: {fmt(v)}" for k, v in rm["dice_by_min_sites"].items())
            p.append(f"<p>Overlap map vs planted regions ({rm['planted']} voxels in the mask): at &ge;{rm['threshold']} "
                     f"sites {rm['flagged']} voxels flagged; Dice {dices}"
                     + (f"; correlation of the mean decoded effect with the planted effect "
                        f"{fmt(rm['corr_mean_effect_vs_planted'])}" if rm.get("corr_mean_effect_vs_planted")
                        is not None else "") + ".</p>")
        else:
            p.append(missing_box("maps/overlap.nii.gz or ground_truth/specific_regions.nii.gz not found"))
        p.append("<details><summary>per held-out site</summary>" + table(rec["folds"]) + "</details>")
    else:
        p.append(f"<p class='note'>{esc(rec['reason'])}</p>")

    # Provenance
    p.append("<h2 id='provenance'>Provenance</h2>")
    p.append(table([{"seed": prov["seed"], "git commit": prov.get("git_commit") or "unknown",
                     "store": prov.get("store") or "unknown", "store manifest hash": prov.get("store_manifest_hash")}]))
    if prov["run_times_s"]:
        p.append("<h3>Run times (s)</h3>" + table([{"stage": k, "seconds": v if not isinstance(v, dict) else
                                                    json.dumps(v)} for k, v in prov["run_times_s"].items()]))
    p.append("<h3>Versions</h3>" + table([{"package": k, "version": v} for k, v in prov["report_versions"].items()]))
    if prov.get("run_versions"):
        p.append(f"<p class='note'>At training time: <code>{esc(json.dumps(prov['run_versions']))}</code></p>")
    p.append(f"<h3>Configuration</h3><pre>{esc(json.dumps(prov['config'], indent=2))}</pre>")
    body = "\n".join(x for x in p if x)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dist-decode report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
