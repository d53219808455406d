"""Science benchmark: recovery of planted truth, per method change and per planted cohort.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_science.py --workdir /tmp/science

For every (cohort, variant) pair it synthesizes and packs the cohort (``data_prep.synth`` preset and seed), runs
the real pipeline on it (``python -m launch.submit --profile cpu --set ... --folds all --cluster local``: every
LOSO fold, the maps, the RSA and the report) and reads the recovery metrics of the run
(:func:`dist_decode.analysis.recovery.run_recovery`): S~specific, S~common, C~common, C~specific, the C diagnosis
AUC (means over the 8 held-out sites) and the maps' Dice and flagged / planted volume. Map variants re-run only
the maps stage on a copy of the full run's folds. Results go to ``WORKDIR/science.json`` (appended run by run, so
an interrupted benchmark resumes) and a Markdown table is printed (docs/science.md shows it).

Variants (``--variants``, default all): ``full`` (the cpu profile), one change off (or on) at a time, the plain
VAE, the 2022 anchor, and the previous defaults. Cohorts (``--cohorts``): the demo and the planted variants of
:data:`COHORTS` (data_prep.synth presets), each with its own seed. ``--reanalyse`` runs only the analysis again on
finished runs (new recovery metrics, e.g. the maps' Dice against the planted half maximum).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: cohort -> (synth preset, seed)
COHORTS = {"demo": ("demo", 0), "density": ("density", 1), "sites": ("sites", 2), "small": ("small", 3),
           "two-factor": ("two-factor", 4), "weak": ("weak", 5), "unbalanced": ("unbalanced", 6), "density-sz": ("density-sz", 7),
           "shape-wide": ("shape-wide", 8), "density-noisy": ("density-noisy", 9)}

#: variant -> (what it changes, training --set overrides, maps --set overrides); None = maps-only variant.
VARIANTS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "full": ("the cpu profile: every method on", [], []),
    "S from the encoder": ("model.specific_readout encoder: S features (RSA, maps) from the S encoder, not the "
                           "salient decoder's closed-form posterior (the default until 2026-12-02)",
                           ['model.specific_readout="encoder"'], []),
    "S read-out on the residual": ("model.specific_readout_input residual: S read from the volume minus the twin "
                                   "decoded from the C encoder's mean, not from the volume (the default until "
                                   "2026-12-02)", ['model.specific_readout_input="residual"'], []),
    "C read-out in the image metric": ("model.common_readout_salient_noise false: C's read-out axes in the plain "
                                       "image metric sigma^2 I, not in the patients' noise around their twin (the "
                                       "default until 2026-12-02)", ["model.common_readout_salient_noise=false"],
                                       []),
    "C from the encoder": ("model.common_readout encoder: C features (RSA, recovery) are the C encoder's means, not "
                           "the twin's coordinates on the common decoder's axes (the default until 2026-12-02)",
                           ['model.common_readout="encoder"'], []),
    "no TIV scaling": ("data.proportional_scaling none", ['data.proportional_scaling="none"'], []),
    "no smoothing": ("data.smooth_fwhm_mm 0", ["data.smooth_fwhm_mm=0"], []),
    "smoothing 4 mm": ("data.smooth_fwhm_mm 4 (half the default 8 mm: for small or narrow effects)",
                       ["data.smooth_fwhm_mm=4"], []),
    "no site normalisation": ("data.site_gain, site_center off", ["data.site_gain=false", "data.site_center=false"],
                              []),
    "encoders at the data grid": ("model.encoder_voxel_mm 0 (the encoders see the data grid, not 6 mm)",
                                  ["model.encoder_voxel_mm=0"], []),
    "site reference: all subjects": ("data.site_reference all: each site's gain and mean from all its subjects "
                                     "(the default until 2026-12-02)", ['data.site_reference="all"'], []),
    "dense encoders": ("model.encoder dense: one dense layer from every 6 mm brain voxel", ['model.encoder="dense"'],
                       []),
    "dense encoders at lr 1e-4": ("model.encoder dense, train.lr 1e-4", ['model.encoder="dense"', "train.lr=1e-4"], []),
    "dense encoders in 2 dimensions": ("model.encoder dense, train.encoder_lr_scale 0.1, model.latent_specific 2",
                                       ['model.encoder="dense"', "train.encoder_lr_scale=0.1",
                                        "model.latent_specific=2"], []),
    "dense encoders at 12 mm": ("model.encoder dense, model.encoder_voxel_mm 12",
                                ['model.encoder="dense"', "model.encoder_voxel_mm=12"], []),
    "bottleneck 32": ("model.bottleneck 32 (the convolutional encoders read 2,560 features, not 1,280)",
                      ["model.bottleneck=32"], []),
    "nonlinear encoders": ("model.encoder nonlinear (GroupNorm + SiLU)", ['model.encoder="nonlinear"'], []),
    "fixed noise": ("loss.noise fixed (summed squared error, the old recon term; S and C from the encoders: the "
                    "decoder read-outs need the eigen noise level)",
                    ['loss.noise="fixed"', 'model.specific_readout="encoder"', 'model.common_readout="encoder"'], []),
    "no control-S penalty": ("loss.control_s_weight 0", ["loss.control_s_weight=0"], []),
    "no C matching": ("loss.match_c none", ['loss.match_c="none"'], []),
    "+ TC term": ("loss.gamma_tc 10 (FactorVAE discriminator)", ["loss.gamma_tc=10"], []),
    "500 steps": ("train.steps 500", ["train.steps=500"], []),
    "maps: test the decoded effect": ("maps.test_on effect (the recon-vs-twin maps themselves)", None,
                                      ['maps.test_on="effect"']),
    "maps: every significant voxel": ("maps.extent significant (no half-maximum extent)", None,
                                      ['maps.extent="significant"']),
    "maps: FDR": ("maps.threshold fdr (q 0.05) instead of FWE", None, ['maps.threshold="fdr"']),
    "maps: SyN Jacobian": ("maps.kind jacobian (SyN twin -> recon / observed)", None, ['maps.kind="jacobian"']),
    "maps: extent at 60 % of the peak": ("maps.extent_fraction 0.6 (each cluster cut at 60 % of its peak, not half)",
                                         None, ["maps.extent_fraction=0.6"]),
    "maps: extent at 70 % of the peak": ("maps.extent_fraction 0.7", None, ["maps.extent_fraction=0.7"]),
    "maps: counter-ring share as measured": ("maps.counter_ring_noise false: the counter-ring share counts "
                                             "every opposite-signed value, not only what lies beyond one standard "
                                             "error of the tested mean (the default until 2026-12-03)", None, ["maps.counter_ring_noise=false"]),
    "maps: half maximum as smoothed": ("maps.extent_unsmoothed false: every cluster's half maximum on the map as "
                                       "smoothed (the default until 2026-12-02)", None,
                                       ["maps.extent_unsmoothed=false"]),
    "maps: plain t": ("maps.variance_smoothing_mm 0 (a plain t instead of the SnPM pseudo-t)", None,
                      ["maps.variance_smoothing_mm=0"]),
    "noise scale 1": ("loss.noise_scale 1 (the median eigenvalue itself)", ["loss.noise_scale=1"], []),
    "noise scale 0.25": ("loss.noise_scale 0.25 (less posterior shrinkage of weak factors)", ["loss.noise_scale=0.25"],
                         []),
    "weight decay 1": ("train.weight_decay 1 (AdamW: the encoders' read-out regularised, as a ridge is)",
                       ["train.weight_decay=1.0"], []),
    "plain VAE": ("model.name vae: one encoder, same blocks and size (its one space is shown as C and as S)",
                  ['model.name="vae"', 'loss.match_c="none"', "loss.control_s_weight=0"], []),
    "anchor 2022": ("the published CVAE at 64^3 on raw volumes, 20 steps (15 s per step on one core: ~2x the CPU "
                    "time of a DECODE-SZ fold)",
                    ['model.name="anchor2022"', "data.grid=[64,64,64]", 'data.proportional_scaling="none"',
                     "data.smooth_fwhm_mm=0", "data.site_gain=false", "data.site_center=false",
                     'model.route="joint"', 'model.decoder="conv"', "train.steps=20", "train.checkpoint_every=10"], []),
    "previous defaults": ("before issue 9: raw volumes at 40x48x40, nonlinear joint decoder, 200 steps",
                          ["data.grid=[40,48,40]", 'data.proportional_scaling="none"', "data.smooth_fwhm_mm=0",
                           "data.site_gain=false", "data.site_center=false", 'model.encoder="nonlinear"',
                           'model.route="joint"', 'model.decoder="conv"', 'model.output="softplus"',
                           "model.channels=[8,16,32]", "model.hidden=64", 'loss.noise="fixed"',
                           "loss.control_s_weight=1", "loss.gamma_tc=10", 'loss.match_c="none"', "train.steps=200",
                           "train.batch_size=4", 'train.precision="bf16"', "train.checkpoint_every=100",
                           'model.specific_readout="encoder"', 'model.common_readout="encoder"'],
                          ['maps.kind="jacobian"', 'maps.test_on="effect"', 'maps.extent="significant"',
                           'maps.threshold="fdr"', "maps.syn_iterations=[40,20,0]", "maps.syn_flow_sigma=3"]),
}
#: Variants whose training is the full method's and only the read-outs fitted after it differ: they resume the
#: full run's final checkpoints (:func:`refit_copy`) instead of training again.
REFIT_VARIANTS = {"S read-out on the residual", "C read-out in the image metric"}
METRICS = ("S~specific", "S~common", "C~common", "C~specific", "C diagnosis AUC", "maps Dice",
           "maps flagged / planted")


def sh(cmd: list[str], log: Path) -> None:
    """Run a command, its output to ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); {log}:\n" + "\n".join(tail))


def prepare(work: Path, cohort: str) -> Path:
    """Synthesize and pack a cohort once; returns the store."""
    preset, seed = COHORTS[cohort]
    cdir, store = work / "cohorts" / cohort, work / "stores" / cohort
    py = sys.executable
    if not (cdir / "participants.tsv").is_file():
        sh([py, "-m", "data_prep.synth", "--out", str(cdir), "--preset", preset, "--seed", str(seed),
            "--no-progress"], work / "logs" / f"synth-{cohort}.log")
    if not (store / "manifest.json").is_file():
        sh([py, "-m", "data_prep.pack", "--cat12-root", str(cdir), "--participants", str(cdir / "participants.tsv"),
            "--out", str(store)], work / "logs" / f"pack-{cohort}.log")
    return store


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def remap_config(run: Path, maps_sets: list[str]) -> None:
    """Give an existing run the current default maps settings (plus ``maps_sets``) and remove its maps, analysis
    and report, so that only those stages run again on its trained folds."""
    sets = ", ".join(repr(s) for s in maps_sets)
    sh([sys.executable, "-c", "from dist_decode.config import RunConfig, profile_config; "
        f"d = RunConfig.from_json({str(run / 'config.json')!r}).to_dict(); "
        f"d['maps'] = profile_config('cpu', [{sets}]).to_dict()['maps']; "
        f"RunConfig.from_dict(d).to_json({str(run / 'config.json')!r})"], run.parent / f"{run.name}-remap.log")
    for name in ("maps", "analysis", "report"):
        if (run / name).exists():
            shutil.rmtree(run / name)


def refit_copy(base: Path, run: Path) -> None:
    """Copy the trained folds of the finished run ``base`` into the new run ``run``: each fold's last checkpoint and
    its metrics, not its outputs. ``launch.submit`` then resumes every fold at its last step (no step left to
    train; the resume is bitwise), fits the read-outs with ``run``'s config, and runs the later stages."""
    folds = sorted(p.parent for p in (base / "folds").glob("*/DONE"))
    if not folds:
        raise RuntimeError(f"{base} has no finished fold to refit")
    for fold in folds:
        tag = (fold / "checkpoints" / "latest").read_text().strip()
        dst = run / "folds" / fold.name
        shutil.copytree(fold / "checkpoints" / tag, dst / "checkpoints" / tag)
        shutil.copy2(fold / "checkpoints" / "latest", dst / "checkpoints" / "latest")
        shutil.copy2(fold / "metrics.jsonl", dst / "metrics.jsonl")


def run_variant(work: Path, cohort: str, variant: str, store: Path, folds: str = "all", remap: bool = False,
                refit_from: str | None = None) -> dict:
    """Run one (cohort, variant) and return its recovery metrics.

    Everything runs in subprocesses (the pipeline's own CLIs, ``python -m dist_decode.analysis`` for the
    metrics), so this long-running benchmark reads every run with the code that wrote it. ``remap``: a training
    variant whose run exists keeps its trained folds and RSA, and its maps stage runs again with the current
    default maps settings (the training is deterministic, so this is what a fresh run would give).
    ``refit_from``: a variant whose run has the same training; this one resumes its final checkpoints
    (:func:`refit_copy`; the default for :data:`REFIT_VARIANTS`, from ``full``).
    """
    _, train_sets, maps_sets = VARIANTS[variant]
    py = sys.executable
    tag = slug(variant) if folds == "all" else f"{slug(variant)}--folds-{slug(folds)}"
    log = work / "logs" / f"{cohort}-{tag}.log"
    t0 = time.time()
    if remap and train_sets is not None:
        run = work / "runs" / cohort / tag
        if not (run / "config.json").is_file():
            raise RuntimeError(f"--remap: {cohort} / {variant} (folds {folds}) has no run to re-map")
        remap_config(run, maps_sets)
        sh([py, "-m", "dist_decode.maps", "--run-dir", str(run), "--no-progress"], log)
    elif train_sets is None:  # a maps variant: the full run's folds, the maps stage again with other settings
        base = work / "runs" / cohort / ("full" if folds == "all" else f"full--folds-{slug(folds)}")
        if not (base / "maps" / "overlap.nii.gz").is_file():
            raise RuntimeError(f"maps variant {variant!r} needs the full run of {cohort} (folds {folds}) first")
        run = work / "runs" / cohort / tag
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        for name in ("folds", "manifest.json", "normalisation.h5"):
            if (base / name).exists():
                (run / name).symlink_to(base / name)
        sets = ", ".join(repr(s) for s in maps_sets)
        sh([py, "-c", "from dist_decode.config import RunConfig, override; "
            f"override(RunConfig.from_json({str(base / 'config.json')!r}), [{sets}]).to_json({str(run / 'config.json')!r})"],
           log)
        sh([py, "-m", "dist_decode.maps", "--run-dir", str(run), "--no-progress"], log)
    else:
        run = work / "runs" / cohort / tag
        if refit_from is None and variant in REFIT_VARIANTS:
            refit_from = "full"
        if refit_from is not None and not (run / "config.json").is_file():
            base = work / "runs" / cohort / (slug(refit_from) if folds == "all" else
                                              f"{slug(refit_from)}--folds-{slug(folds)}")
            if run.exists():
                shutil.rmtree(run)
            refit_copy(base, run)
        sets = [a for s in train_sets + maps_sets + ["rsa.permutations=200", "rsa.block_size=100"] for a in ("--set", s)]
        sh([py, "-m", "launch.submit", "--store", str(store), "--run-dir", str(run), "--profile", "cpu", *sets,
            "--folds", folds, "--cluster", "local", "--max-parallel", str(os.cpu_count() or 1)], log)
    wall = time.time() - t0
    return read_run(work, cohort, variant, folds, run, wall, report=remap and train_sets is not None)


def read_run(work: Path, cohort: str, variant: str, folds: str, run: Path, wall: float,
             report: bool = False) -> dict:
    """Analyse a finished run (``python -m dist_decode.analysis``; with ``report`` its report again too) and
    return its row of the results."""
    py = sys.executable
    log = work / "logs" / f"{cohort}-{run.name}.log"
    sh([py, "-m", "dist_decode.analysis", "--run-dir", str(run)], log)
    if report:
        sh([py, "-m", "dist_decode.report", "--run-dir", str(run)], log)
    rec = json.loads((run / "analysis" / "analysis.json").read_text())["recovery"]
    if rec["status"] != "ok":
        raise RuntimeError(f"{run}: recovery {rec['status']}: {rec.get('reason')}")
    values = {g["metric"]: g["value"] for g in rec["goals"]}
    model = json.loads((run / "config.json").read_text())["model"]["name"]
    if model == "vae":  # one latent space: it is both "S" and "C"
        values["S~specific"] = values["C~specific"]
        values["S~common"] = values["C~common"]
    done_sites = sorted(p.parent.name for p in (run / "folds").glob("*/DONE"))
    done = json.loads((run / "folds" / done_sites[0] / "DONE").read_text())
    return {"cohort": cohort, "variant": variant, "folds": folds, "what": VARIANTS[variant][0], "run": str(run),
            "n_parameters": done.get("n_parameters"), "steps": done.get("steps"), "wall_s": round(wall, 1),
            "fold_wall_s": [json.loads((run / "folds" / s / "DONE").read_text()).get("wall_s") for s in done_sites],
            "metrics": {m: values.get(m) for m in METRICS},
            "oracle": values.get("oracle specific~common (floor of the cross-talk rows)"),
            "corr_mean_effect_vs_planted": (rec.get("maps") or {}).get("corr_mean_effect_vs_planted"),
            "dice_half_max": (rec.get("maps") or {}).get("dice_half_max"),
            "dice_ceiling": (rec.get("maps") or {}).get("dice_ceiling")}


def fold_se(run: str | Path) -> dict[str, float]:
    """Standard error over the held-out sites of each per-fold metric of a run, from the folds in its
    ``analysis.json`` (also those written before the analysis recorded it)."""
    from dist_decode.analysis.recovery import goal_table  # a pure function: safe in a long-running process

    path = Path(run) / "analysis" / "analysis.json"
    if not path.is_file():
        return {}
    folds = [f for f in json.loads(path.read_text())["recovery"].get("folds", []) if f.get("status") == "ok"]
    return {g["metric"]: g["se"] for g in goal_table(folds, None) if g["se"] is not None}


def table(results: list[dict]) -> str:
    """Markdown table of the results (one row per run)."""
    from dist_decode.analysis.recovery import GOALS, met  # pure functions: safe in a long-running process

    # the last map column: Dice with the planted effect's own half-maximum region (what the maps' extent
    # reports), and in brackets that region's Dice with the planted regions: the maps Dice's ceiling on the grid
    head = ("| cohort | variant | folds | parameters | " + " | ".join(METRICS)
            + " | maps Dice vs planted half max (ceiling) | oracle spec~com | min/fold |")
    # ±: the standard error over the 8 held-out sites (all-fold rows): a site has 5-30 patients, so one site's tau
    # moves by +-0.1-0.2 and the mean by +-0.01-0.07
    goal = "| | **goal** | | | " + " | ".join(
        {">=": "≥ ", "<=": "≤ ", "abs<=": "\\|.\\| ≤ "}[GOALS[m][0]] + f"{GOALS[m][1]:g}" for m in METRICS) + " | | | |"
    lines = [head, "|" + "---|" * (len(METRICS) + 7), goal]
    for r in results:
        cells = []
        se = fold_se(r["run"])
        for m in METRICS:
            v = r["metrics"].get(m)
            if v is None:
                cells.append("–")
                continue
            ok = met(m, v)
            pm = f" ±{se[m]:.2f}" if m in se and r.get("folds", "all") == "all" else ""
            cells.append(f"{'**' if ok else ''}{v:.2f}{'**' if ok else ''}{pm}")
        hm, cap = r.get("dice_half_max"), r.get("dice_ceiling")
        cells.append("–" if hm is None or cap is None else f"{hm:.2f} ({cap:.2f})")
        fw = [w for w in r.get("fold_wall_s") or [] if w]
        lines.append(f"| {r['cohort']} | {r['variant']} | {r.get('folds', 'all')} | {r['n_parameters']:,} | " + " | ".join(cells)
                     + f" | {r['oracle']:.2f} | {sum(fw) / max(1, len(fw)) / 60:.1f} |")
    return "\n".join(lines)


def record(out: Path, r: dict) -> list[dict]:
    """Add (or replace) the row of ``r``'s cohort, variant and folds in ``out`` and return all rows. The file is
    read again under a lock, so benchmark processes running side by side keep each other's rows."""
    import fcntl

    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(out.read_text()) if out.is_file() else []
        key = (r["cohort"], r["variant"], r.get("folds", "all"))
        rows = [x for x in rows if (x["cohort"], x["variant"], x.get("folds", "all")) != key] + [r]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(out)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="cohorts, stores, runs and science.json go here")
    ap.add_argument("--cohorts", default="demo", help=f"comma-separated, from {sorted(COHORTS)} (default demo)")
    ap.add_argument("--variants", default="all", help="comma-separated variant names (default: all)")
    ap.add_argument("--folds", default="all",
                    help="LOSO folds of every run (launch.submit --folds; default all). Ablations on a few folds "
                         "compare with the full method on the same folds, never with an all-fold row")
    ap.add_argument("--refit-from", metavar="VARIANT",
                    help="train no run: resume the final checkpoints of VARIANT's run of the same cohort and folds "
                         "(its training must be the same; only the read-outs fitted after training differ)")
    ap.add_argument("--table-only", action="store_true", help="print the table of WORKDIR/science.json and stop")
    ap.add_argument("--reanalyse", action="store_true",
                    help="for the runs already in science.json: run the analysis again (this checkout's recovery "
                         "metrics) and update their rows; nothing is trained or mapped")
    ap.add_argument("--remap", action="store_true",
                    help="re-run only the maps stage of existing training runs with the current maps defaults "
                         "(after a change to them); their rows are replaced")
    args = ap.parse_args(argv)
    work = args.workdir.absolute()
    out = work / "science.json"
    results = json.loads(out.read_text()) if out.is_file() else []
    if args.table_only:
        print(table(results))
        return 0
    cohorts = [c.strip() for c in args.cohorts.split(",") if c.strip()]
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    for name in cohorts + variants:
        if name not in COHORTS and name not in VARIANTS:
            ap.error(f"unknown cohort or variant {name!r}")
    for cohort in cohorts:
        store = prepare(work, cohort)
        for variant in variants:
            same = [r for r in results if r["cohort"] == cohort and r["variant"] == variant
                    and r.get("folds", "all") == args.folds]
            if same and args.reanalyse:
                # the analysis again, with this checkout's code, on the run as it is (its wall time kept)
                print(f"== {cohort} / {variant} (folds {args.folds}) reanalyse", flush=True)
                results = record(out, read_run(work, cohort, variant, args.folds, Path(same[0]["run"]),
                                               same[0]["wall_s"]))
                continue
            if same and not (args.remap and VARIANTS[variant][1] is not None):
                continue
            print(f"== {cohort} / {variant} (folds {args.folds}){' remap' if args.remap else ''}", flush=True)
            try:
                r = run_variant(work, cohort, variant, store, args.folds, remap=args.remap,
                                refit_from=args.refit_from)
            except RuntimeError as exc:
                print(f"   failed: {exc}", flush=True)
                continue
            results = record(out, r)
            m = r["metrics"]
            print("   " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if v is not None and math.isfinite(v))
                  + f" ({r['wall_s'] / 60:.1f} min)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
