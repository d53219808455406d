"""Render a run applied to a new cohort into ``OUT/report/``: ``index.html``, ``report.json``, CSV tables, figures.

The same machinery as the run's report (:mod:`dist_decode.report.build`: jinja2 environment, figures, macros): the
numbers come from ``OUT/analysis/analysis.json`` (:mod:`dist_decode.analysis.apply`, brought up to date first) and
``OUT/rsa/rsa.json``; the page is ``templates/apply.html.j2``. Nothing is computed here; a missing part becomes an
entry of ``report.json["missing"]`` and a note on the page.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import platform
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dist_decode import provenance
from dist_decode.analysis.apply import analyse_apply
from dist_decode.contracts.apply import ApplyDir
from dist_decode.fsutil import atomic_path, atomic_write_json, atomic_write_text, read_json
from dist_decode.report import figures
from dist_decode.report.build import CSS, _write_csv, current_analysis, environment, rsa_section, up_to_date

log = logging.getLogger("dist_decode.report")
HERE = Path(__file__).resolve().parent
#: At most this many new sites get a mean-effect figure (all are in the tables).
MAX_SITE_FIGURES = 8


def _fig_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _fingerprint(out: ApplyDir, analysis: dict) -> str:
    h = hashlib.sha256(str(analysis.get("inputs")).encode())
    for p in (out.completion("rsa"), out.completion("maps")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for f in (HERE / "apply.py", HERE / "figures.py", HERE / "templates" / "apply.html.j2",
              HERE / "templates" / "macros.html.j2"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def apply_rsa_section(out: ApplyDir) -> dict:
    """``rsa/rsa.json`` as the apply RSA wrote it (or why it is absent)."""
    data = read_json(out.completion("rsa"))
    if isinstance(data, dict) and data.get("status") == "skipped":
        return {"status": "skipped", "reason": data.get("reason")}
    sec = rsa_section(out)  # the run report's reader: rows, settings, scopes
    if sec["status"] == "ok":
        spaces = (sec.get("config") or {}).get("patients_only_spaces") or []
        sec["subjects"] = (f"{', '.join(spaces)} in the new patients, the other spaces in every new subject"
                           if spaces else "every new subject") + "; PANSS in patients only"
        sec["models"] = data.get("models", [])
        sec["skipped_models"] = data.get("skipped_models", {})
        sec["absent_variables"] = data.get("absent_variables", [])
        sec["pooled_scopes"] = [s for s in sec["scopes"] if s.endswith(":pooled")]
    else:
        sec["reason"] = "rsa/rsa.json not found (python -m dist_decode.apply --stage rsa)"
    return sec


def build_apply_report(out_dir: str | Path, force: bool = False) -> Path:
    """Build ``OUT/report/`` and return the path of ``index.html`` (skipped when nothing it shows changed).

    Raises
    ------
    FileNotFoundError, ValueError
        When ``out_dir`` is not a bound apply directory, or the analysis cannot run and none was saved.
    """
    start = time.perf_counter()
    out = ApplyDir(out_dir)
    manifest = out.manifest()
    analysis, stale = current_analysis(out, analyse_apply)
    rdir = out.path / "report"
    index = out.completion("report")
    key = _fingerprint(out, analysis)
    if not force and up_to_date(index, rdir / "report.json", key):
        return index
    cfg = read_json(Path(manifest["run"]) / "config.json") or {}
    data: dict[str, Any] = {
        "out": str(out.path.resolve()), "inputs_fingerprint": key, "run": manifest["run"], "store": manifest["store"],
        "cohort": analysis["cohort"], "compatibility": analysis["compatibility"], "models": analysis["models"],
        "maps": analysis["maps"], "rsa": apply_rsa_section(out),
        "provenance": {"config": cfg, "seed": cfg.get("seed"), "git_commit": manifest.get("git_commit"),
                       "store_manifest_hash": manifest.get("store_manifest_sha256"),
                       "run_manifest_hash": manifest.get("run_manifest_sha256"),
                       "run_store": manifest.get("run_store"),
                       "version_rows": [{"package": k, "version": v} for k, v in
                                        provenance.versions(provenance.PACKAGES + ("matplotlib", "jinja2")).items()],
                       "host": platform.node(), "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}}
    missing = [f"model {r['model']} ({r['status']})" for r in data["models"]["rows"] if r["status"] != "done"]
    missing += [f"model {m}: the run's fold did not finish before this directory was made"
                for m in data["models"]["missing"]]
    if data["maps"]["status"] != "ok":
        missing.append(f"maps: {data['maps']['reason']}")
    if data["rsa"]["status"] == "missing":
        missing.append(f"rsa: {data['rsa']['reason']}")
    if stale:
        missing.insert(0, stale)
    data["missing"] = missing

    figs: dict[str, bytes] = {}
    fig = figures.models_figure(data["models"]["rows"])
    if fig:
        figs["models"] = fig
    if data["maps"]["status"] == "ok":
        from dist_decode.maps.pipeline import safe_name

        for row in data["maps"]["sites"][:MAX_SITE_FIGURES]:
            p = out.path / "maps" / "sites" / safe_name(row["site"]) / "mean_effect.nii.gz"
            if p.is_file():
                img = nib.load(str(p))
                img = nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine)
                figs[_fig_name(f"effect_{row['site']}")] = figures.effect_slices(
                    img, f"{row['site']}: mean effect over {row['n_patients']} patients and the models")
        data["maps"]["figures"] = {row["site"]: _fig_name(f"effect_{row['site']}") for row in data["maps"]["sites"]}
    if data["rsa"]["status"] == "ok":
        for scope in data["rsa"]["pooled_scopes"]:
            fig = figures.rsa_figure(data["rsa"]["rows"], scope)
            if fig:
                figs[_fig_name(f"rsa_{scope}")] = fig
        data["rsa"]["figures"] = {s: _fig_name(f"rsa_{s}") for s in data["rsa"]["pooled_scopes"]}
    for name, png in figs.items():
        with atomic_path(rdir / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    data["figures"] = {name: f"figures/{name}.png" for name in figs}
    _write_csv(rdir / "cohort.csv", data["cohort"]["sites"])
    _write_csv(rdir / "models.csv", data["models"]["rows"])
    if data["maps"]["status"] == "ok":
        _write_csv(rdir / "maps_sites.csv", data["maps"]["sites"])
    if data["rsa"]["status"] == "ok":
        _write_csv(rdir / "rsa.csv", data["rsa"]["rows"])
    data["build_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(rdir / "report.json", data)
    html = environment().get_template("apply.html.j2").render(
        **{**data, "figures": {k: base64.b64encode(v).decode() for k, v in figs.items()}}, css=CSS,
        missing_parts=missing)
    atomic_write_text(index, html)  # last: the stage's completion file
    log.info("apply report written: %s (%d figures, %d missing parts)", index, len(figs), len(missing))
    return index
