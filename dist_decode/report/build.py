"""Render a run's results into ``RUN/report/``: ``index.html``, ``report.json``, CSV tables and PNG figures.

The report computes no science: the numbers come from ``analysis/analysis.json`` (:mod:`dist_decode.analysis`,
brought up to date first when its inputs changed), ``rsa/rsa.json`` and ``maps/maps.json``; the page is the
jinja2 template ``templates/report.html.j2``. Every section is optional: a missing stage output becomes an entry
of ``report.json["missing"]`` and a visible note in the page, never an error.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import jinja2
import nibabel as nib
import numpy as np

from dist_decode import provenance
from dist_decode.analysis.__main__ import analyse
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import atomic_path, atomic_write_json, atomic_write_text, read_json
from dist_decode.model import ANCHOR_N_PARAMETERS
from dist_decode.report import figures
from dist_decode.rsa.analysis import MARK_P, MARK_TAU

log = logging.getLogger("dist_decode.report")

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


# -- template helpers -------------------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    """Numbers to 3-4 significant figures, missing values as an en dash, booleans as yes / blank."""
    if v is None or isinstance(v, jinja2.Undefined) or (isinstance(v, float) and math.isnan(v)):
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def columns(rows: list[dict]) -> list[str]:
    """The scalar columns of ``rows``, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("dist_decode.report", "templates"),
                             autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=False)
    env.filters["fmt"] = fmt
    env.globals["columns"] = columns
    return env


# -- sections (read, never compute) ----------------------------------------------------------------------------
def rsa_section(run: RunDir) -> dict:
    data = read_json(run.completion("rsa"))
    if not data:
        return {"status": "missing", "reason": "rsa/rsa.json not found (run python -m dist_decode.rsa)"}
    rows = data.get("results", [])
    spaces = (data.get("config") or {}).get("patients_only_spaces") or []
    subjects = (f"{', '.join(spaces)} in the held-out patients, the other spaces in every held-out subject"
                if spaces else "every held-out subject") + "; PANSS in patients only"
    return {"status": "ok", "rows": rows, "permutations": data.get("permutations"), "seed": data.get("seed"),
            "config": data.get("config"), "ranks": data.get("ranks"), "subjects": subjects,
            "criterion": {"tau": MARK_TAU, "p": MARK_P},
            "scopes": sorted(dict.fromkeys(str(r.get("scope")) for r in rows), key=lambda sc: sc != "pooled")}


def maps_section(run: RunDir) -> dict:
    summary = read_json(run.path / "maps" / "maps.json")
    if not run.done("maps") or not summary:
        sub = run.path / "maps" / "subjects"
        n = len(list(sub.rglob("*_effect.nii.gz"))) if sub.is_dir() else 0
        return {"status": "missing",
                "reason": f"maps/overlap.nii.gz not found (run python -m dist_decode.maps); {n} subject maps so far"}
    out = {"status": "ok", **{k: summary.get(k) for k in (
        "sites", "n_sites", "sites_missing_fold", "sites_without_group_map", "overlap_max", "overlap_voxels",
        "dice", "clusters", "groups", "config")}}
    out["group_rows"] = [{"site": s, **{k: v for k, v in g.items() if k in (
        "status", "n", "method", "level", "t_threshold", "n_significant", "n_kept", "n_kept_negative",
        "n_kept_positive")}} for s, g in (out.get("groups") or {}).items()]
    return out


def provenance_section(run: RunDir, manifest: dict, sites: list[str]) -> dict:
    cfg = read_json(run.config_path) or {}
    times = {}
    for site in sites:
        done = read_json(run.fold_dir(site) / "DONE")
        if done and done.get("wall_s") is not None:
            times[f"fold {site}"] = done["wall_s"]
    maps = read_json(run.path / "maps" / "maps.json")
    if maps and (maps.get("timing") or {}).get("wall_s"):
        t = maps["timing"]
        times["maps (subject maps)"] = round(t["wall_s"], 2)
        if t.get("seconds_per_subject"):
            times["maps (s per subject, one worker)"] = round(t["seconds_per_subject"], 3)
    rsa = read_json(run.completion("rsa"))
    if rsa and rsa.get("wall_s") is not None:
        times["rsa"] = rsa["wall_s"]
    versions = provenance.versions(provenance.PACKAGES + ("matplotlib", "jinja2"))
    return {"config": cfg, "seed": cfg.get("seed"), "git_commit": manifest.get("git_commit"),
            "run_versions": manifest.get("versions"), "report_versions": versions,
            "version_rows": [{"package": k, "version": v} for k, v in versions.items()],
            "run_times_s": times, "run_time_rows": [{"stage": k, "seconds": v} for k, v in times.items()],
            "store": manifest.get("store"), "store_manifest_hash": manifest.get("store_manifest_sha256"),
            "host": platform.node(), "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _figures(data: dict, run: RunDir) -> dict[str, bytes]:
    figs: dict[str, bytes] = {}
    for name, fig in (("folds", figures.folds_figure(data["folds"]["folds"])),
                      ("loss", figures.loss_figure(data["curves"]))):
        if fig:
            figs[name] = fig
    if data["rsa"]["status"] == "ok":
        for scope in data["rsa"]["scopes"]:
            fig = figures.rsa_figure(data["rsa"]["rows"], scope)
            if fig:
                figs[f"rsa_{scope}"] = fig
    if data["maps"]["status"] == "ok":
        ov = nib.load(str(run.completion("maps")))
        ov = nib.Nifti1Image(np.asarray(ov.dataobj).astype(np.float32), ov.affine)
        figs["overlap_slices"] = figures.overlap_slices(ov, data["maps"]["n_sites"])
        figs["overlap_glass"] = figures.overlap_glass(ov, data["maps"]["n_sites"])
        d = data["maps"]["dice"]
        figs["dice"] = figures.dice_figure(d["sites"], np.array(d["matrix"], dtype=float))
    return figs


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = columns(rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def _fingerprint(run: RunDir, analysis: dict) -> str:
    """What the page shows: the analysis, the RSA and maps outputs, and this module and its template."""
    h = hashlib.sha256(str(analysis.get("inputs")).encode())
    for p in (run.completion("rsa"), run.path / "maps" / "maps.json", run.completion("maps"), run.config_path):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    here = Path(__file__).resolve().parent
    for f in (here / "build.py", here / "figures.py", here / "templates" / "report.html.j2",
              here / "templates" / "macros.html.j2"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# -- build ------------------------------------------------------------------------------------------------------

def current_analysis(d: Any, analyse_fn: Any) -> tuple[dict[str, Any], str | None]:
    """The analysis of ``d`` (a run or an apply directory), recomputed by ``analyse_fn``; when it cannot run (the
    directory copied without its stores) the saved one, with a note saying so."""
    try:
        return analyse_fn(d.path), None
    except (FileNotFoundError, ValueError) as exc:
        analysis = read_json(d.completion("analysis"))
        if not isinstance(analysis, dict):
            raise ValueError(f"{d.path}: the analysis cannot run ({exc}) and none was saved before") from exc
        stale = f"analysis not updated ({exc}); the numbers are those of {d.completion('analysis')}"
        log.warning("%s", stale)
        return analysis, stale


def up_to_date(index: Path, report_json: Path, key: str) -> bool:
    """The page exists and was rendered from inputs with this fingerprint."""
    old = read_json(report_json)
    if index.is_file() and old and old.get("inputs_fingerprint") == key:
        log.info("report up to date (%s)", index)
        return True
    return False

def build_report(run_dir: str | Path, force: bool = False) -> Path:
    """Build ``RUN/report/`` and return the path of ``index.html`` (skipped when nothing it shows changed).

    Raises
    ------
    FileNotFoundError, ValueError
        When ``run_dir`` is not a started run (no manifest), or the run's store changed since it was made.
    """
    start = time.perf_counter()
    run = RunDir(run_dir)
    manifest = run.manifest()
    # up to date already when the launcher ran the analysis stage
    analysis, stale = current_analysis(run, analyse)
    out = run.path / "report"
    index = run.completion("report")
    key = _fingerprint(run, analysis)
    if not force and up_to_date(index, out / "report.json", key):
        return index
    data: dict[str, Any] = {"run_dir": str(run.path.resolve()), "inputs_fingerprint": key,
                            "cohort": analysis["cohort"], "folds": analysis["folds"], "curves": analysis["curves"],
                            "rsa": rsa_section(run), "maps": maps_section(run), "recovery": analysis["recovery"],
                            "provenance": provenance_section(run, manifest, [r["site"] for r in analysis["folds"]["folds"]]),
                            "anchor_parameters": ANCHOR_N_PARAMETERS}
    if data["recovery"].get("status") == "ok":
        data["recovery"]["goal_rows"] = [
            {**g, "met": ("met" if g["met"] else "NOT MET") if g["met"] is not None else ""}
            for g in data["recovery"]["goals"]]
    missing = [f"fold {r['site']} ({r['status']})" for r in data["folds"]["folds"] if r["status"] in (
        "missing", "in progress")]
    missing += [f"fold {r['site']}: {r['status'][len('done ('):-1]}" for r in data["folds"]["folds"]
                if r["status"].startswith("done (")]
    for sec in ("rsa", "maps"):
        if data[sec]["status"] == "missing":
            missing.append(f"{sec}: {data[sec]['reason']}")
    if data["maps"]["status"] == "ok":
        for s, why in (data["maps"].get("sites_without_group_map") or {}).items():
            missing.append(f"group map of site {s} ({why})")
    if stale:
        missing.insert(0, stale)
    data["missing"] = missing

    figs = _figures(data, run)
    for name, png in figs.items():
        with atomic_path(out / "figures" / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    data["figures"] = {name: f"figures/{name}.png" for name in figs}
    _write_csv(out / "folds.csv", data["folds"]["folds"])
    _write_csv(out / "cohort.csv", data["cohort"]["sites"])
    if data["rsa"]["status"] == "ok":
        _write_csv(out / "rsa.csv", data["rsa"]["rows"])
    if data["maps"]["status"] == "ok":
        _write_csv(out / "clusters.csv", data["maps"]["clusters"] or [])
        d = data["maps"]["dice"]
        _write_csv(out / "dice.csv", [{"site": s, **dict(zip(d["sites"], row))} for s, row in zip(d["sites"],
                                                                                                  d["matrix"])])
    if data["recovery"].get("status") == "ok":
        _write_csv(out / "recovery.csv", data["recovery"]["goals"])
        _write_csv(out / "recovery_folds.csv", data["recovery"]["folds"])
    data["build_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "report.json", data)
    html = environment().get_template("report.html.j2").render(
        **{**data, "figures": {k: base64.b64encode(v).decode() for k, v in figs.items()}}, css=CSS,
        missing_parts=missing)
    atomic_write_text(index, html)  # last: the stage's completion file
    log.info("report written: %s (%d figures, %d missing parts)", index, len(figs), len(missing))
    return index
