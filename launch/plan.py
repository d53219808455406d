"""``python -m launch.plan``: projected wall time, GPU-hours, CPU-hours and peak memory of a run, per stage.

Arithmetic on measured unit costs (``benchmarks/calibration.json``, :mod:`dist_decode.contracts.calibration`), the
store's manifest (subjects, sites, grid, eligible folds) and the run config (steps, batch, permutations, maps
settings); it computes no science. Every figure the calibration lacks (no GPU has been measured) is replaced by a
stated assumption, and every assumption is printed with the plan.

The model, per stage (``u`` = calibration units; ``r(g)`` = voxels of grid ``g`` / voxels of the calibration grid):

* pack: ``N * u.pack_s_per_subject * r(store)`` CPU-s over ``--cpus-per-task`` processes on one node;
* train, one fold: ``setup + steps * step + export``; ``step`` on CPU = ``u.train_s_per_step[precision] * (batch /
  u.train_batch_size) * r(model grid)`` over ``--cpus-per-task`` threads at ``--cpu-thread-efficiency``; on GPU
  ``--gpu-step-s``, else the calibration's GPU figure, else the CPU step / ``--gpu-speedup``. ``batch`` is per rank
  (DeepSpeed data parallel: G ranks see G x batch per step); ``--same-samples`` divides the steps by G so a fold sees
  as many volumes as on one GPU. Data-parallel steps pay ``--allreduce-overhead``. ``setup`` = the normalisation
  pass ``u.normalise_s_per_subject * N * r(store)`` + ``u.train_s_to_first_step * r(model grid)`` (model build,
  DeepSpeed start) on the fold's CPU threads; ``export`` (features of all N subjects)
  = N forward passes, each ``--forward-fraction`` of a training step's per-volume cost;
* maps: per patient of a held-out site, ``2 * samples`` SyN registrations (``maps.kind = jacobian``) at
  ``u.syn_s_per_registration * r(store)``, or ``2 * samples`` decoder passes (density maps), sharded over every core;
  then one group test per site, ``u.group_s_per_patient * patients * r(store)``, the sites side by side (the
  launcher's per-fold maps jobs), so the largest site sets the wall time;
* rsa: ``u.rsa_s_per_1000_permutations_per_rank['1'] * B / 1000 * (pairs / calibration pairs) * (tests /
  calibration tests)`` CPU-s, pairs within held-out sites, over ``--rsa-ranks`` MPI ranks (at most one per block);
* report: ``--report-s`` (not measured; assumed).

Stages run in the launcher's order (pack, the folds in waves, maps and RSA side by side, report): the total is
``pack + train + max(maps, rsa) + report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_decode.config import PROFILES, RunConfig, override, profile_config
from dist_decode.contracts import calibration as cal_contract
from dist_decode.contracts import store as store_contract
from launch.stages import parse_folds

log = logging.getLogger("launch.plan")
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.json"


@dataclass
class StagePlan:
    """One stage's projection: wall seconds, GPU- and CPU-hours, peak memory per task (MiB), parallel tasks."""

    name: str
    wall_s: float
    gpu_h: float
    cpu_h: float
    peak_mb: float | None
    tasks: int
    note: str = ""


@dataclass
class Plan:
    """The projection of a whole run and the assumptions it rests on."""

    stages: list[StagePlan]
    total_wall_s: float
    dominant: str
    assumptions: list[str] = field(default_factory=list)


def _voxels(grid) -> int:
    return int(math.prod(int(v) for v in grid))


def _peak(cal: dict, stage: str) -> float | None:
    """The calibration's largest-scale peak RSS of a stage (MiB), or None."""
    peaks = cal["peak_rss_mb"]
    for scale in ("paper", *peaks):
        v = (peaks.get(scale) or {}).get(stage)
        if v is not None:
            return float(v)
    return None


def project(manifest: dict, cfg: RunConfig, cal: dict, folds: list[int], *, nodes: int = 1, gpus_per_fold: int = 0,
            gpus_per_node: int = 4, cpus_per_node: int = 32, cpus_per_task: int = 8, gpu_step_s: float | None = None,
            gpu_speedup: float = 100.0, cpu_thread_efficiency: float = 0.5, allreduce_overhead: float = 0.05,
            forward_fraction: float = 1 / 3, same_samples: bool = False, rsa_ranks: int | None = None,
            report_s: float = 60.0) -> Plan:
    """Project a run's cost per stage (see the module docstring for the model).

    Parameters
    ----------
    manifest : dict
        The store's manifest (:func:`dist_decode.contracts.store.read_manifest`).
    cfg : RunConfig
        The run config (steps, batch size, precision, maps and RSA settings).
    cal : dict
        The calibration (:func:`dist_decode.contracts.calibration.read_calibration`).
    folds : list of int
        Fold indices to train (indices into ``manifest["sites"]``).
    nodes, gpus_per_fold, gpus_per_node, cpus_per_node, cpus_per_task : int
        The cluster: ``nodes`` nodes of ``cpus_per_node`` cores and ``gpus_per_node`` GPUs; a fold takes
        ``gpus_per_fold`` GPUs (0: a CPU fold of ``cpus_per_task`` threads).
    gpu_step_s : float, optional
        Measured GPU seconds per step at the run's batch and grid (overrides the calibration and the speed-up).
    gpu_speedup, cpu_thread_efficiency, allreduce_overhead, forward_fraction : float
        Assumptions (printed): GPU step speed over one CPU core, parallel efficiency of CPU threads, extra step time
        of data-parallel gradient all-reduce, cost of one forward pass relative to a training step (per volume).
    same_samples : bool
        Divide the steps by ``gpus_per_fold`` (same volumes seen as one rank).
    rsa_ranks : int, optional
        MPI ranks of the RSA job (default: every core of the cluster).
    report_s : float
        Assumed wall seconds of the report.

    Raises
    ------
    ValueError
        For a cluster that cannot hold one fold, or no folds.
    """
    u = cal["units"]
    assumptions: list[str] = []
    if not folds:
        raise ValueError("no folds to plan (every site ineligible or --folds empty)")
    sites = manifest["sites"]
    label = (manifest.get("labels") or {}).get("patient_label", "SZ")
    patients = {s: int(manifest["counts"][s].get(label, 0)) for s in sites}
    held = [sites[k] for k in folds]
    n = int(manifest.get("n_subjects") or sum(sum(c.values()) for c in manifest["counts"].values()))
    store_grid = manifest["grid"]["shape"]
    model_grid = list(cfg.data.grid) if cfg.data.grid else store_grid
    total_cores = nodes * cpus_per_node
    on_gpu = gpus_per_fold > 0
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if on_gpu else "fp32")
    stages: list[StagePlan] = []

    # pack: one job of cpus_per_task processes on one node
    pack_cpu = n * u["pack_s_per_subject"] * _voxels(store_grid) / _voxels(u["pack_grid"])
    pack_procs = max(1, min(cpus_per_task, cpus_per_node))
    stages.append(StagePlan("pack", pack_cpu / pack_procs, 0.0, pack_cpu / 3600, _peak(cal, "pack"), pack_procs,
                            f"{n} subjects, {n * u['store_mb_per_volume'] / 1e3:.1f} GB store"))

    # train: folds in waves; each fold setup + steps + export. The step was measured for one model (a profile's);
    # another architecture costs differently per voxel, which grid and batch scaling cannot express.
    calibrated = profile_config(u.get("train_profile", "gpu")).model
    if cfg.model != calibrated:
        differ = sorted(f.name for f in dataclasses.fields(cfg.model)
                        if getattr(cfg.model, f.name) != getattr(calibrated, f.name))
        assumptions.append(f"THE TRAINING STEP WAS CALIBRATED FOR ANOTHER MODEL (the {u.get('train_profile', 'gpu')} "
                           f"profile's, {u.get('train_n_parameters', 0):,} parameters); this config differs in "
                           f"model.{', model.'.join(differ)}: the train rows scale that step by grid and batch only "
                           "and may be far off (calibrate this model: benchmarks/bench_scale.py, docs/scale.md)")
    cpu_s = u["train_s_per_step"].get(precision) or u["train_s_per_step"]["fp32"]
    per_volume = cpu_s / u["train_batch_size"] * _voxels(model_grid) / _voxels(u["train_grid"])
    steps = cfg.train.steps
    if on_gpu:
        measured = (u.get("gpu_s_per_step") or {}).get(precision)
        if gpu_step_s is not None:
            step = gpu_step_s
            assumptions.append(f"GPU step time {gpu_step_s:g} s (--gpu-step-s), batch {cfg.train.batch_size} per rank")
        elif measured is not None:
            step = measured * cfg.train.batch_size / u["train_batch_size"] * _voxels(model_grid) / _voxels(u["train_grid"])
            assumptions.append(f"GPU step time from the calibration: {step:.3g} s")
        else:
            step = per_volume * cfg.train.batch_size / gpu_speedup
            assumptions.append(f"NO GPU FIGURE in the calibration (no GPU has been measured): one GPU step is ASSUMED "
                               f"{gpu_speedup:g}x one CPU core's ({per_volume * cfg.train.batch_size:.1f} s -> "
                               f"{step:.2f} s at batch {cfg.train.batch_size}, {precision}); set --gpu-step-s "
                               "once benchmarks/gpu_check.sh has measured it")
        forward = step / cfg.train.batch_size * forward_fraction  # one GPU's forward pass per volume
        if gpus_per_fold > 1:
            step *= 1 + allreduce_overhead
            assumptions.append(f"data parallel over {gpus_per_fold} GPUs: per-rank batch {cfg.train.batch_size}, "
                               f"+{100 * allreduce_overhead:g} % step time for the all-reduce (assumed)")
        if same_samples:
            steps = math.ceil(steps / gpus_per_fold)
            assumptions.append(f"--same-samples: {cfg.train.steps} steps / {gpus_per_fold} GPUs = {steps} steps")
        concurrent = (gpus_per_node // gpus_per_fold) * nodes if gpus_per_fold <= gpus_per_node else \
            nodes // math.ceil(gpus_per_fold / gpus_per_node)
    else:
        speed = max(1.0, cpus_per_task * cpu_thread_efficiency)
        step = per_volume * cfg.train.batch_size / speed
        assumptions.append(f"CPU folds: {cpus_per_task} threads at {100 * cpu_thread_efficiency:g} % efficiency "
                           f"(assumed; measured with 1 thread) = {speed:g}x one core")
        concurrent = (cpus_per_node // cpus_per_task) * nodes
        forward = per_volume * forward_fraction / speed
    if concurrent < 1:
        raise ValueError(f"a fold needs {gpus_per_fold or cpus_per_task} {'GPUs' if on_gpu else 'cores'} but a node "
                         f"has {gpus_per_node if on_gpu else cpus_per_node} and there are {nodes} node(s)")
    # normalisation statistics (one pass over the store, once per run) + model build and start, on CPU threads
    normalise = (u.get("normalise_s_per_subject") or 0.0) * n * _voxels(store_grid) / _voxels(u["pack_grid"])
    if not u.get("normalise_s_per_subject"):
        assumptions.append("the calibration has no normalisation figure: its cost is left out")
    setup = (normalise + u.get("train_s_to_first_step", 0.0) * _voxels(model_grid) / _voxels(u["train_grid"]))
    setup /= max(1.0, cpus_per_task * cpu_thread_efficiency)
    export = n * forward
    fold_wall = setup + steps * step + export
    waves = math.ceil(len(folds) / concurrent)
    assumptions.append(f"feature export: {n} forward passes per fold, each {forward_fraction:.2g} of a training "
                       "step per volume (not measured)")
    assumptions.append(f"train peak memory: host RSS measured on a CPU at batch {u['train_batch_size']} (grows with the "
                       "batch: activations); GPU memory not measured")
    fold_gpus = gpus_per_fold if on_gpu else 0
    fold_cpus = cpus_per_task * max(1, gpus_per_fold)
    stages.append(StagePlan("train (one fold)", fold_wall, fold_wall * fold_gpus / 3600, fold_wall * fold_cpus / 3600,
                            _peak(cal, "train"), max(1, gpus_per_fold),
                            f"{steps} steps x {step:.3g} s + setup {setup:.0f} s + export {export:.0f} s"))
    stages.append(StagePlan(f"train ({len(folds)} folds)", waves * fold_wall, len(folds) * fold_wall * fold_gpus / 3600,
                            len(folds) * fold_wall * fold_cpus / 3600, _peak(cal, "train"),
                            min(len(folds), concurrent) * max(1, gpus_per_fold),
                            f"{waves} wave(s) of {min(len(folds), concurrent)} concurrent folds"))

    # maps: subject maps sharded over every core, then one group test per held-out site, side by side
    mc = cfg.maps
    samples = mc.n_samples if mc.use_samples else 1
    n_patients = sum(patients[s] for s in held)
    if mc.kind == "jacobian":
        per_patient = 2 * samples * u["syn_s_per_registration"] * _voxels(store_grid) / _voxels(u["syn_grid"])
        what = f"2 x {samples} SyN registrations per patient"
    else:
        per_patient = 2 * samples * per_volume * forward_fraction
        what = f"density maps: 2 x {samples} decoder passes per patient (assumed {forward_fraction:.2g} of a step)"
    subject_cpu = n_patients * per_patient
    group_unit = u["group_s_per_patient"] * _voxels(store_grid) / _voxels(u["group_grid"])
    group_cpu = group_unit * n_patients
    # the launcher's per-fold maps jobs test their sites side by side: the largest site sets the wall time
    maps_wall = max(subject_cpu / total_cores, per_patient) + group_unit * max(patients[s] for s in held)
    group_peak = _peak(cal, "group")
    cal_largest = (cal.get("scales", {}).get("paper") or {}).get("largest_site_patients")
    if group_peak is not None and cal_largest:
        largest = max(patients[s] for s in held)
        group_peak = group_peak * max(1.0, largest / cal_largest)
    stages.append(StagePlan("maps", maps_wall, 0.0, (subject_cpu + group_cpu) / 3600,
                            max(v for v in (_peak(cal, "syn"), group_peak, 0.0) if v is not None), total_cores,
                            f"{n_patients} patients: {what}; group tests {group_cpu:.0f} s"))

    # rsa: CPU-s per 1,000 permutations scaled by within-site pairs and tests, over MPI ranks
    rc = cfg.rsa
    tests_cal = u.get("rsa_tests") or 1
    tests = len(rc.variables) * 2  # two feature spaces (C, S) per variable
    pairs = sum(sum(manifest["counts"][s].values()) * (sum(manifest["counts"][s].values()) - 1) / 2 for s in held)
    pairs_cal = u["rsa_n"] * (u["rsa_n"] - 1) / 2
    rsa_cpu = (u["rsa_s_per_1000_permutations_per_rank"]["1"] * rc.permutations / 1000 * pairs / pairs_cal
               * tests / tests_cal)
    blocks = math.ceil(rc.permutations / rc.block_size)
    ranks = max(1, min(rsa_ranks or total_cores, blocks))
    assumptions.append(f"RSA cost scales with within-site pairs ({pairs:.0f} vs {pairs_cal:.0f} measured) and tests "
                       f"({tests} vs {tests_cal}); {ranks} ranks (<= {blocks} blocks of {rc.block_size})")
    stages.append(StagePlan("rsa", rsa_cpu / ranks, 0.0, rsa_cpu / 3600, _peak(cal, "rsa"), ranks,
                            f"{rc.permutations} permutations"))
    stages.append(StagePlan("report", report_s, 0.0, report_s / 3600, None, 1, "assumed, not measured"))
    assumptions.append(f"report {report_s:g} s (not measured)")

    by = {s.name: s for s in stages}
    total = (by["pack"].wall_s + by[f"train ({len(folds)} folds)"].wall_s + max(by["maps"].wall_s, by["rsa"].wall_s)
             + report_s)
    dominant = max((s for s in stages if s.name != "train (one fold)"), key=lambda s: s.wall_s).name
    return Plan(stages, total, dominant, assumptions)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_plan(plan: Plan, header: str) -> str:
    """The plan as a table, then the dominant stage and the assumptions."""
    lines = [header, f"{'stage':<20}{'wall h:m:s':>12}{'GPU-h':>10}{'CPU-h':>10}{'peak GiB/task':>15}{'tasks':>7}  notes"]
    for s in plan.stages:
        peak = f"{s.peak_mb / 1024:.2f}" if s.peak_mb else "n/a"
        lines.append(f"{s.name:<20}{_hms(s.wall_s):>12}{s.gpu_h:>10.2f}{s.cpu_h:>10.2f}{peak:>15}{s.tasks:>7}  {s.note}")
    lines.append(f"{'total (critical path)':<20}{_hms(plan.total_wall_s):>12}")
    lines.append(f"dominant stage: {plan.dominant}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0, or 2 for a missing or invalid store, calibration or option.")
    p.add_argument("--store", required=True, help="packed store (its manifest.json: subjects, sites, grid)")
    p.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                   help="unit costs (default benchmarks/calibration.json, written by benchmarks/bench_scale.py)")
    p.add_argument("--config", help="RunConfig JSON (default: --profile)")
    p.add_argument("--profile", default="gpu", choices=sorted(PROFILES), help="config profile (default gpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--steps", type=int, help="training steps per fold (default: the config's)")
    p.add_argument("--folds", default="all", help="'all' or indices, e.g. '0,3' (default all eligible)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-fold", type=int, default=0, help="GPUs per fold, 0 = CPU-only (default 0)")
    p.add_argument("--gpus-per-node", type=int, default=4, help="GPUs per node (default 4)")
    p.add_argument("--cpus-per-node", type=int, default=32, help="cores per node (default 32)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="cores per fold rank / pack job (default 8)")
    p.add_argument("--rsa-ranks", type=int, help="MPI ranks of the RSA (default: every core, at most one per block)")
    a = p.add_argument_group("assumptions (printed with the plan)")
    a.add_argument("--gpu-step-s", type=float, help="measured GPU seconds per step (overrides --gpu-speedup)")
    a.add_argument("--gpu-speedup", type=float, default=100.0,
                   help="GPU step speed over one CPU core when no GPU figure exists (default 100, an assumption)")
    a.add_argument("--cpu-thread-efficiency", type=float, default=0.5, help="CPU thread efficiency (default 0.5)")
    a.add_argument("--allreduce-overhead", type=float, default=0.05, help="data-parallel step overhead (default 0.05)")
    a.add_argument("--forward-fraction", type=float, default=1 / 3,
                   help="forward pass cost / training step cost per volume (default 1/3)")
    a.add_argument("--same-samples", action="store_true", help="divide the steps by --gpus-per-fold")
    a.add_argument("--report-s", type=float, default=60.0, help="report wall seconds (default 60)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    from dist_decode.cli import setup_logging

    setup_logging(args.verbose)
    try:
        for name in ("nodes", "gpus_per_node", "cpus_per_node", "cpus_per_task"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
        manifest = store_contract.read_manifest(args.store)
        cal = cal_contract.read_calibration(args.calibration)
        sets = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
        cfg = override(RunConfig.from_json(args.config), sets) if args.config else profile_config(args.profile, sets)
        folds = parse_folds(args.folds, manifest["sites"], store_contract.ineligible_sites(manifest))
        plan = project(manifest, cfg, cal, folds, nodes=args.nodes, gpus_per_fold=args.gpus_per_fold,
                       gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                       cpus_per_task=args.cpus_per_task, gpu_step_s=args.gpu_step_s, gpu_speedup=args.gpu_speedup,
                       cpu_thread_efficiency=args.cpu_thread_efficiency, allreduce_overhead=args.allreduce_overhead,
                       forward_fraction=args.forward_fraction, same_samples=args.same_samples,
                       rsa_ranks=args.rsa_ranks, report_s=args.report_s)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one plain line, as the stage CLIs print theirs
        return 2
    log.debug("calibration units: %s", cal["units"])
    m = cal["machine"]
    cluster = (f"{args.nodes} node(s) x {args.gpus_per_node} GPUs, {args.gpus_per_fold} GPU(s) per fold"
               if args.gpus_per_fold else f"{args.nodes} CPU node(s) x {args.cpus_per_node} cores, "
               f"{args.cpus_per_task} cores per fold")
    header = (f"store {args.store}: {manifest.get('n_subjects')} subjects, {len(folds)} folds, grid "
              f"{'x'.join(map(str, manifest['grid']['shape']))}; {cluster}\n"
              f"calibration {args.calibration}: {m.get('hostname')} ({m.get('cpu_model')}, {m.get('cores')} cores), "
              f"{m.get('date_utc')}")
    print(format_plan(plan, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
