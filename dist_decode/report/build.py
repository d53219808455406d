"""Collect a run's results into ``RUN/report/``: ``index.html``, ``report.json``, CSV tables and PNG figures.

Every section is optional: a missing store, fold, RSA result or maps output becomes an entry of
``report.json["missing"]`` and a visible note in the HTML, never an error.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_decode.analysis.recovery import cv_auc, transfer_auc
from dist_decode.config import RunConfig
from dist_decode.fsutil import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger("dist_decode.report")

#: Diagnosis labels read as controls when the store cannot be opened (the store's is_patient wins otherwise).
CONTROL_LABELS = {"hc", "control", "controls", "cn", "ctrl", "healthy", "td", "0"}
#: Parameter count of the 2022 anchor CVAE (Aglinskas et al.), used if the model module is unavailable.
ANCHOR_FALLBACK = 202_434_754
SEED_TAU, SEED_P = 0.025, 0.01


class Run:
    """Read-only view of a run directory for the report."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: run directory not found")
        self.missing: list[str] = []
        self.manifest = _read_json(self.dir / "manifest.json") or {}
        if not self.manifest:
            self.missing.append("run manifest.json")
        cfg_path = self.dir / "config.json"
        try:
            self.cfg = RunConfig.from_json(cfg_path) if cfg_path.is_file() else RunConfig()
        except ValueError as exc:
            log.warning("%s: %s; using defaults", cfg_path, exc)
            self.cfg = RunConfig()
        if not cfg_path.is_file():
            self.missing.append("run config.json (defaults shown)")
        self.store = None
        if "store" in self.manifest:
            try:
                from dist_decode.data import Store

                self.store = Store.open(self.manifest["store"])
            except Exception as exc:  # the report must still build without the store (e.g. on a laptop)
                log.warning("store %s could not be opened: %s", self.manifest.get("store"), exc)
                self.missing.append(f"store {self.manifest.get('store')} ({exc})")
        fold_root = self.dir / "folds"
        on_disk = sorted(p.name for p in fold_root.iterdir() if p.is_dir()) if fold_root.is_dir() else []
        if self.store is not None:
            inel = self.store.manifest.get("loso_ineligible", {}) or {}
            inel = set(inel) if not isinstance(inel, list) else {e["site"] if isinstance(e, dict) else e for e in inel}
            self.sites = [s for s in self.store.sites if s not in inel]
        elif isinstance(self.manifest.get("folds"), dict):
            self.sites = list(self.manifest["folds"].values())
        elif isinstance(self.manifest.get("folds"), list):
            self.sites = [f["site"] if isinstance(f, dict) else f for f in self.manifest["folds"]]
        else:
            self.sites = on_disk
        self.sites += [s for s in on_disk if s not in self.sites]
        self.patient_ids = None
        if self.store is not None:
            ids = [str(p) for p in self.store.participant_ids]
            self.patient_ids = {p for p, pat in zip(ids, np.asarray(self.store.is_patient)) if pat}

    def is_patient(self, pids, diagnosis) -> np.ndarray:
        if self.patient_ids is not None:
            return np.array([p in self.patient_ids for p in pids])
        return np.array([str(d).lower() not in CONTROL_LABELS for d in diagnosis])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable JSON (%s)", path, exc)
        return None


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_features(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as h5:
        out = {k: h5[k][()] for k in h5.keys() if isinstance(h5[k], h5py.Dataset)}
    for k in ("participant_id", "site", "diagnosis", "split"):
        if k in out:
            out[k] = np.array(_strings(out[k]))
    return out


# -- sections ---------------------------------------------------------------------------------------------------
def cohort_section(run: Run) -> dict:
    """Sites, group counts, exclusions and LOSO-ineligible sites, from the store manifest."""
    if run.store is None:
        return {"status": "missing", "reason": "store not available"}
    m = run.store.manifest
    counts = m.get("counts", {})
    rows = []
    for site in run.store.sites:
        c = counts.get(site, {})
        rows.append({"site": site, **{str(k): int(v) for k, v in c.items()}, "total": int(sum(c.values()))})
    excluded = m.get("excluded", []) or []
    reasons: dict[str, int] = {}
    for e in excluded:
        r = e.get("reason", "unspecified") if isinstance(e, dict) else "unspecified"
        reasons[r] = reasons.get(r, 0) + 1
    return {"status": "ok", "sites": rows, "n_sites": len(rows), "n_subjects": int(sum(r["total"] for r in rows)),
            "excluded": excluded, "excluded_by_reason": reasons,
            "loso_ineligible": m.get("loso_ineligible", {}), "ground_truth": bool(run.store.ground_truth)}


def anchor_parameters() -> int:
    try:
        from dist_decode.model import ANCHOR_N_PARAMETERS

        return int(ANCHOR_N_PARAMETERS)
    except ImportError:
        return ANCHOR_FALLBACK


def folds_section(run: Run) -> dict:
    """Per fold: held-out n, reconstruction error, S/C diagnosis separability, parameters, steps, time."""
    anchor = anchor_parameters()
    rows = []
    curves: dict[str, dict] = {}
    for k, site in enumerate(run.sites):
        fdir = run.dir / "folds" / site
        done = _read_json(fdir / "DONE")
        if done is None:
            rows.append({"site": site, "status": "in progress" if fdir.is_dir() else "missing"})
            continue
        row: dict[str, Any] = {"site": site, "status": "done", "model": done.get("model"),
                               "steps": done.get("steps"), "wall_s": done.get("wall_s"),
                               "world_size": done.get("world_size"), "n_parameters": done.get("n_parameters")}
        if row["n_parameters"]:
            row["anchor_parameters"] = anchor
            row["fewer_than_anchor_pct"] = round(100.0 * (1 - row["n_parameters"] / anchor), 2)
        fpath = fdir / "features.h5"
        if not fpath.is_file():
            row["status"] = "done (features.h5 missing)"
            rows.append(row)
            continue
        try:
            f = _read_features(fpath)
            for key in ("participant_id", "diagnosis", "split", "s_mean", "c_mean"):
                if key not in f:
                    raise KeyError(f"no dataset {key!r}")
        except (OSError, KeyError, ValueError) as exc:  # one damaged file must not sink the whole report
            log.warning("%s: %s", fpath, exc)
            row["status"] = f"done (features.h5 unreadable: {exc})"
            rows.append(row)
            continue
        test = f["split"] == "test"
        pat = run.is_patient(f["participant_id"], f["diagnosis"])
        row["n_test"] = int(test.sum())
        row["n_test_patients"] = int((test & pat).sum())
        row["n_test_controls"] = int((test & ~pat).sum())
        row["n_train"] = int((f["split"] == "train").sum())
        if "recon_error" in f:
            err = np.asarray(f["recon_error"], float)
            row["recon_error_test"] = float(err[test].mean()) if test.any() else None
            row["recon_error_train"] = float(err[f["split"] == "train"].mean()) if (f["split"] == "train").any() else None
        seed = int(np.random.SeedSequence([run.cfg.seed, 31337, k]).generate_state(1)[0])
        for space in ("s", "c"):
            x = np.asarray(f[f"{space}_mean"], float)
            row[f"auc_{space}"] = cv_auc(x[test], pat[test], seed)
            train = f["split"] != "test"
            row[f"auc_{space}_transfer"] = transfer_auc(x[train], pat[train], x[test], pat[test])
        curve = read_metrics(fdir / "metrics.jsonl")
        if curve["train_step"]:
            row["final_train_loss"] = curve["train_total"][-1]
            if curve["volumes_per_s"]:
                row["volumes_per_s"] = float(np.mean(curve["volumes_per_s"]))
        if curve["val_step"]:
            row["final_val_loss"] = curve["val_total"][-1]
        curves[site] = curve
        rows.append(row)
    done = [r for r in rows if r["status"].startswith("done")]
    return {"status": "ok" if done else "missing", "folds": rows, "n_done": len(done),
            "missing": [r["site"] for r in rows if not r["status"].startswith("done")],
            "anchor_parameters": anchor, "curves": curves}


def read_metrics(path: Path) -> dict[str, list]:
    """Training and validation totals per step from a fold's ``metrics.jsonl`` (unreadable lines skipped)."""
    out: dict[str, list] = {"train_step": [], "train_total": [], "val_step": [], "val_total": [], "volumes_per_s": []}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log is still useful
        kind, total = rec.get("kind"), rec.get("total", rec.get("loss"))
        if total is None or "step" not in rec:
            continue
        if kind == "val":
            out["val_step"].append(rec["step"])
            out["val_total"].append(float(total))
        elif kind in ("train", None):
            out["train_step"].append(rec["step"])
            out["train_total"].append(float(total))
            if rec.get("volumes_per_s") is not None:
                out["volumes_per_s"].append(float(rec["volumes_per_s"]))
    return out


def rsa_section(run: Run) -> dict:
    data = _read_json(run.dir / "rsa" / "rsa.json")
    if not data:
        return {"status": "missing", "reason": "rsa/rsa.json not found (run python -m dist_decode.rsa)"}
    rows = data.get("results", [])
    for r in rows:  # recompute the seed's mark so the table is explicit about the criterion
        if r.get("tau_a") is not None and r.get("p") is not None:
            r["seed_mark"] = bool(abs(r["tau_a"]) > SEED_TAU and r["p"] < SEED_P)
    return {"status": "ok", "rows": rows, "permutations": data.get("permutations"), "seed": data.get("seed"),
            "config": data.get("config"), "ranks": data.get("ranks"),
            "scopes": list(dict.fromkeys(str(r.get("scope")) for r in rows))}


def maps_section(run: Run) -> dict:
    mdir = run.dir / "maps"
    summary = _read_json(mdir / "maps.json")
    if not (mdir / "overlap.nii.gz").is_file() or not summary:
        sub = mdir / "subjects"
        n = len(list(sub.rglob("*.nii.gz"))) if sub.is_dir() else 0
        return {"status": "missing",
                "reason": f"maps/overlap.nii.gz not found (run python -m dist_decode.maps); {n} subject maps so far"}
    return {"status": "ok", **{k: summary.get(k) for k in (
        "sites", "n_sites", "sites_missing_fold", "sites_without_group_map", "overlap_max", "overlap_voxels",
        "dice", "clusters", "groups", "config")}}


def recovery_section(run: Run) -> dict:
    """Synthetic cohorts: every recovery metric beside its goal (:mod:`dist_decode.analysis.recovery`)."""
    from dist_decode.analysis.recovery import run_recovery

    if run.store is None or not run.store.ground_truth:
        return {"status": "not_applicable", "reason": "the cohort has no ground truth (real data)"}
    try:
        return run_recovery(run.dir, run.store, run.sites, run.cfg.seed)
    except (OSError, ValueError, KeyError) as exc:  # a damaged fold must not sink the whole report
        log.warning("recovery: %s", exc)
        return {"status": "missing", "reason": str(exc)}


def provenance_section(run: Run) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("numpy", "scipy", "torch", "deepspeed", "h5py", "nibabel", "nilearn", "antspyx", "scikit-learn",
                "mpi4py", "matplotlib", "dist-decode"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    commit = run.manifest.get("git_commit") or run.manifest.get("commit")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                    cwd=Path(__file__).resolve().parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    times = {}
    for site in run.sites:
        done = _read_json(run.dir / "folds" / site / "DONE")
        if done and done.get("wall_s") is not None:
            times[f"fold {site}"] = done["wall_s"]
    maps = _read_json(run.dir / "maps" / "maps.json")
    if maps and maps.get("timing") and maps["timing"].get("wall_s"):
        t = maps["timing"]
        times["maps (subject registrations)"] = round(t["wall_s"], 2)
        if t.get("seconds_per_subject"):
            times["maps (s per subject, one worker)"] = round(t["seconds_per_subject"], 2)
    rsa = _read_json(run.dir / "rsa" / "rsa.json")
    if rsa and rsa.get("wall_s") is not None:
        times["rsa"] = rsa["wall_s"]
    return {"config": run.cfg.to_dict(), "seed": run.cfg.seed, "git_commit": commit,
            "run_versions": run.manifest.get("versions"), "report_versions": versions,
            "run_times_s": times, "store": run.manifest.get("store"),
            "store_manifest_hash": (run.manifest.get("store_manifest_sha256") or run.manifest.get("store_manifest_hash")
                                    or run.manifest.get("store_hash")),
            "host": platform.node(), "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# -- build ------------------------------------------------------------------------------------------------------
def input_fingerprint(run_dir: Path) -> str:
    """Hash of the names, sizes and mtimes of every file the report reads (its 'is it up to date' key)."""
    h = hashlib.sha256()
    paths = [run_dir / "manifest.json", run_dir / "config.json", run_dir / "rsa" / "rsa.json",
             run_dir / "maps" / "maps.json", run_dir / "maps" / "overlap.nii.gz"]
    folds = run_dir / "folds"
    if folds.is_dir():
        for d in sorted(folds.iterdir()):
            paths += [d / "DONE", d / "features.h5", d / "metrics.jsonl"]
    for p in paths:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(run_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(Path(__file__).read_bytes())
    h.update((Path(__file__).resolve().parent.parent / "analysis" / "recovery.py").read_bytes())
    return h.hexdigest()[:16]


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], (dict, list))]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def build_report(run_dir: str | Path, force: bool = False) -> Path:
    """Build ``RUN/report/`` and return the path of ``index.html`` (skipped when its inputs are unchanged).

    Parameters
    ----------
    run_dir : path
        The run directory.
    force : bool
        Rebuild even if the inputs did not change.

    Raises
    ------
    FileNotFoundError
        When ``run_dir`` does not exist.
    """
    import nibabel as nib

    from dist_decode.report import figures
    from dist_decode.report.template import render

    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = run_dir / "report"
    index = out / "index.html"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    key = input_fingerprint(run_dir)
    old = _read_json(out / "report.json")
    if index.is_file() and old and old.get("inputs_fingerprint") == key and not force:
        log.info("report up to date (%s)", index)
        return index
    run = Run(run_dir)
    data: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "inputs_fingerprint": key}
    data["cohort"] = cohort_section(run)
    data["folds"] = folds_section(run)
    data["rsa"] = rsa_section(run)
    data["maps"] = maps_section(run)
    data["recovery"] = recovery_section(run)
    data["provenance"] = provenance_section(run)
    missing = list(run.missing)
    missing += [f"fold {s} ({r['status']})" for s in data["folds"]["missing"]
                for r in data["folds"]["folds"] if r["site"] == s]
    missing += [f"fold {r['site']}: {r['status'][len('done ('):-1]}" for r in data["folds"]["folds"]
                if r["status"].startswith("done (")]
    for sec in ("cohort", "rsa", "maps"):
        if data[sec]["status"] == "missing":
            missing.append(f"{sec}: {data[sec]['reason']}")
    if data["maps"]["status"] == "ok":
        for s, why in (data["maps"].get("sites_without_group_map") or {}).items():
            missing.append(f"group map of site {s} ({why})")
    data["missing"] = missing

    figs: dict[str, bytes] = {}
    fig = figures.folds_figure(data["folds"]["folds"])
    if fig:
        figs["folds"] = fig
    fig = figures.loss_figure(data["folds"].get("curves", {}))
    if fig:
        figs["loss"] = fig
    if data["rsa"]["status"] == "ok":
        for scope in data["rsa"]["scopes"]:
            fig = figures.rsa_figure(data["rsa"]["rows"], scope)
            if fig:
                figs[f"rsa_{scope}"] = fig
    if data["maps"]["status"] == "ok":
        ov = nib.load(str(run_dir / "maps" / "overlap.nii.gz"))
        ov = nib.Nifti1Image(np.asarray(ov.dataobj).astype(np.float32), ov.affine)
        figs["overlap_slices"] = figures.overlap_slices(ov, data["maps"]["n_sites"])
        figs["overlap_glass"] = figures.overlap_glass(ov, data["maps"]["n_sites"])
        d = data["maps"]["dice"]
        figs["dice"] = figures.dice_figure(d["sites"], np.array(d["matrix"], dtype=float))

    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    for name, png in figs.items():
        with atomic_path(fig_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
    data["figures"] = {name: f"figures/{name}.png" for name in figs}
    _write_csv(out / "folds.csv", data["folds"]["folds"])
    if data["cohort"]["status"] == "ok":
        _write_csv(out / "cohort.csv", data["cohort"]["sites"])
    if data["rsa"]["status"] == "ok":
        _write_csv(out / "rsa.csv", data["rsa"]["rows"])
    if data["maps"]["status"] == "ok":
        _write_csv(out / "clusters.csv", data["maps"]["clusters"] or [])
        d = data["maps"]["dice"]
        _write_csv(out / "dice.csv", [{"site": s, **{t: v for t, v in zip(d["sites"], row)}}
                                      for s, row in zip(d["sites"], d["matrix"])])
    rec = data["recovery"]
    if rec["status"] == "ok":
        _write_csv(out / "recovery.csv", rec["goals"])
        _write_csv(out / "recovery_folds.csv", rec["folds"])
    data["build_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / "report.json", data)
    atomic_write_text(index, render(data, figs))  # last: the stage's completion file
    log.info("report written: %s (%d figures, %d missing parts)", index, len(figs), len(missing))
    return index
