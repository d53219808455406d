"""The stage graph of a run: which entry point each job calls, what it waits for, when it is finished.

The launcher computes no science: every stage is one ``python -m dist_decode.<stage>`` command (the same
command the ``slurm/*.sh`` scripts run), a completion file (:mod:`dist_decode.contracts.run`) and the stages it
depends on::

    fold-K (one per LOSO fold)  ->  maps-K  ->  maps (overlap)  ->  analysis  ->  report
                                \\-> rsa (MPI, all folds) ---------/

With ``maps_split="subject"`` the maps' per-subject work is instead split over ``maps_jobs`` jobs by subject
(``--stage jacobians --shard K/N``) after all folds, then one combining job.

A trained run applied to a new cohort (:func:`build_apply_plan`, ``launch.apply``), every job one
``python -m dist_decode.apply --stage ...`` command::

    apply-K (one per fold model)  ->  apply-maps (mean over the models)  ->  apply-analysis  ->  apply-report
                                  \\-> apply-rsa ------------------------/
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_decode.contracts import store as store_contract
from dist_decode.contracts.apply import ApplyDir
from dist_decode.contracts.run import RunDir

#: Stage kinds in pipeline order, with the module each one runs.
MODULES = {
    "fold": "dist_decode.train",
    "maps_fold": "dist_decode.maps",
    "maps": "dist_decode.maps",
    "rsa": "dist_decode.rsa",
    "analysis": "dist_decode.analysis",
    "report": "dist_decode.report",
    "apply_model": "dist_decode.apply",
    "apply_maps": "dist_decode.apply",
    "apply_rsa": "dist_decode.apply",
    "apply_analysis": "dist_decode.apply",
    "apply_report": "dist_decode.apply",
}


@dataclass
class Stage:
    """One schedulable unit of work.

    Parameters
    ----------
    name : str
        Unique name in the plan (``fold-3``, ``maps-3``, ``maps``, ``rsa``, ``report``); also the job name.
    kind : str
        One of :data:`MODULES`.
    args : list of str
        Arguments after ``python -m <module>``.
    done : pathlib.Path
        Completion file; the stage is finished when it exists.
    deps : list of str
        Names of the stages that must finish first.
    ntasks : int
        Processes of the job (torch.distributed ranks of a fold, MPI ranks of the RSA, else 1).
    mpi : bool
        Ranks talk MPI (started with ``srun --mpi=pmi2`` or ``mpiexec``) instead of torch.distributed.
    fold : int or None
        LOSO fold index for fold and per-fold maps stages.
    """

    name: str
    kind: str
    args: list[str]
    done: Path
    deps: list[str] = field(default_factory=list)
    ntasks: int = 1
    mpi: bool = False
    fold: int | None = None

    @property
    def module(self) -> str:
        return MODULES[self.kind]

    def is_done(self) -> bool:
        return self.done.exists()

    def argv(self, python: str | None = None) -> list[str]:
        """The command of one task: ``python -m module args`` (python defaults to this interpreter)."""
        return [python or sys.executable, "-m", self.module, *self.args]


def read_store_sites(store: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Fold order and the sites that cannot be held out (site -> reason) of a packed store.

    Raises
    ------
    FileNotFoundError, ValueError
        From :func:`dist_decode.contracts.store.read_manifest`.
    """
    manifest = store_contract.read_manifest(store)
    return list(manifest["sites"]), store_contract.ineligible_sites(manifest)


def parse_folds(spec: str, sites: list[str], ineligible: dict[str, str]) -> list[int]:
    """Turn ``all`` or ``0,3,5-7`` into fold indices.

    ``all`` means every site that can be held out. Naming an ineligible fold explicitly is an error.

    Raises
    ------
    ValueError
        On malformed specs, indices out of range or ineligible folds.
    """
    n = len(sites)
    if spec.strip().lower() == "all":
        return [k for k, s in enumerate(sites) if s not in ineligible]
    folds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                chunk = list(range(lo, hi + 1))
            else:
                chunk = [int(part)]
        except ValueError:
            raise ValueError(f"--folds {spec!r}: {part!r} is not a fold index or range (use e.g. 'all' or '0,3,5-7')") from None
        for k in chunk:
            if not 0 <= k < n:
                raise ValueError(f"--folds {spec!r}: fold {k} out of range; the store has {n} sites (folds 0-{n - 1})")
            if sites[k] in ineligible:
                raise ValueError(f"--folds {spec!r}: fold {k} (site {sites[k]}) cannot be held out: {ineligible[sites[k]]}")
            if k not in folds:
                folds.append(k)
    if not folds:
        raise ValueError(f"--folds {spec!r}: no folds selected")
    return folds


def build_plan(
    store: str | os.PathLike,
    run_dir: str | os.PathLike,
    folds: list[int],
    sites: list[str],
    *,
    tasks_per_fold: int = 1,
    rsa_ranks: int = 2,
    train_args: list[str] | None = None,
    maps_split: str = "fold",
    maps_jobs: int = 2,
    maps_cpus: int = 1,
    subset: bool = False,
) -> list[Stage]:
    """All stages of a run over ``folds``, in dependency order.

    Parameters
    ----------
    store, run_dir : path
        Packed store and run directory (made absolute, since jobs may start elsewhere).
    folds : list of int
        Fold indices to train.
    sites : list of str
        The store's fold order (``sites[k]`` held out by fold ``k``).
    tasks_per_fold : int
        torch.distributed ranks of each fold job.
    rsa_ranks : int
        MPI ranks of the RSA job.
    train_args : list of str
        Extra trainer arguments (``--config FILE`` ...), identical for every fold.
    maps_split : {"fold", "subject", "none"}
        ``fold``: one maps job per fold, pipelined behind it, then the combining job; ``subject``: the per-subject
        maps of all folds split over ``maps_jobs`` jobs, then the combining job; ``none``: one maps job.
    maps_jobs : int
        Jobs of the ``subject`` split.
    maps_cpus : int
        Cores per maps job (its registration workers).
    subset : bool
        ``folds`` is a deliberate selection, not every eligible fold: the RSA analyses just those.
    """
    if maps_split not in ("fold", "subject", "none"):
        raise ValueError(f"maps split {maps_split!r}: expected 'fold', 'subject' or 'none'")
    store = Path(store).absolute()
    rundir = RunDir(Path(run_dir).absolute())
    run = rundir.path
    train_args = list(train_args or [])
    stages: list[Stage] = []
    fold_names = []
    for k in folds:
        name = f"fold-{k}"
        fold_names.append(name)
        stages.append(Stage(
            name=name, kind="fold", fold=k, ntasks=max(1, tasks_per_fold),
            args=["--store", str(store), "--fold", str(k), "--run-dir", str(run), *train_args],
            done=rundir.completion("fold", sites[k]),
        ))
    workers = ["--workers", str(max(1, maps_cpus))]
    maps_done = rundir.completion("maps")
    combine_args = ["--run-dir", str(run), *workers]
    maps_deps = list(fold_names)
    if maps_split == "fold":
        # per-fold parts pipelined behind their fold, then the combining step
        maps_deps = []
        for k in folds:
            maps_deps.append(f"maps-{k}")
            stages.append(Stage(name=f"maps-{k}", kind="maps_fold", fold=k, deps=[f"fold-{k}"],
                                args=["--run-dir", str(run), "--fold", str(k), *workers],
                                # no completion file of its own in the contract: its job's exit status counts
                                done=maps_done))
        combine_args.append("--combine")
    elif maps_split == "subject":
        # the per-subject maps of all folds split over maps_jobs jobs, then the group step
        maps_deps = []
        n = max(1, maps_jobs)
        for k in range(n):
            maps_deps.append(f"maps-{k}")
            stages.append(Stage(name=f"maps-{k}", kind="maps_fold", deps=list(fold_names),
                                args=["--run-dir", str(run), "--stage", "jacobians", "--shard", f"{k}/{n}", *workers],
                                done=maps_done))
        combine_args += ["--stage", "group"]
    stages.append(Stage(name="maps", kind="maps", deps=maps_deps, args=combine_args, done=maps_done))
    # a wrong PMI silently gives N singletons instead of one N-rank world: the RSA refuses that
    rsa_args = ["--run-dir", str(run), "--expect-ranks", str(max(1, rsa_ranks))]
    if subset:
        rsa_args.append("--allow-missing-folds")  # the user chose these folds: analyse them, not all sites
    stages.append(Stage(name="rsa", kind="rsa", deps=list(fold_names), ntasks=max(1, rsa_ranks), mpi=True,
                        args=rsa_args, done=rundir.completion("rsa")))
    stages.append(Stage(name="analysis", kind="analysis", deps=["maps", "rsa"], args=["--run-dir", str(run)],
                        done=rundir.completion("analysis")))
    stages.append(Stage(name="report", kind="report", deps=["analysis"], args=["--run-dir", str(run)],
                        done=rundir.completion("report")))
    return stages


def build_apply_plan(run_dir: str | os.PathLike, store: str | os.PathLike, out: str | os.PathLike,
                     models: dict[int, str], *, rsa_ranks: int = 1) -> list[Stage]:
    """The stages of ``dist_decode.apply`` of ``run_dir`` on the new ``store`` into ``out``, in dependency order.

    Parameters
    ----------
    run_dir, store, out : path
        The trained run, the new cohort's store, the apply directory (made absolute).
    models : dict of int to str
        The fold models to apply: fold index -> held-out site (``OUT/manifest.json``'s models).
    rsa_ranks : int
        MPI ranks of the RSA job.
    """
    common = ["--run-dir", str(Path(run_dir).absolute()), "--store", str(Path(store).absolute()),
              "--out", str(Path(out).absolute()), "--no-progress"]
    applied = ApplyDir(Path(out).absolute())
    stages = [Stage(name=f"apply-{k}", kind="apply_model", fold=k, args=[*common, "--stage", "model", "--model", str(k)],
                    done=applied.completion("model", site)) for k, site in models.items()]
    names = [s.name for s in stages]
    stages.append(Stage(name="apply-maps", kind="apply_maps", deps=list(names), args=[*common, "--stage", "maps"],
                        done=applied.completion("maps")))
    stages.append(Stage(name="apply-rsa", kind="apply_rsa", deps=list(names), ntasks=max(1, rsa_ranks), mpi=True,
                        args=[*common, "--stage", "rsa", "--expect-ranks", str(max(1, rsa_ranks))],
                        done=applied.completion("rsa")))
    stages.append(Stage(name="apply-analysis", kind="apply_analysis", deps=["apply-maps", "apply-rsa"],
                        args=[*common, "--stage", "analysis"], done=applied.completion("analysis")))
    stages.append(Stage(name="apply-report", kind="apply_report", deps=["apply-analysis"],
                        args=[*common, "--stage", "report"], done=applied.completion("report")))
    return stages


def fold_array_spec(folds: list[int]) -> str:
    """SLURM ``--array`` spec of fold indices: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts, start, prev = [], None, None
    for k in sorted(folds):
        if start is None:
            start = prev = k
        elif k == prev + 1:
            prev = k
        else:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = k
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.stages {array,check-fold}``: fold questions for the ``slurm/*.sh`` scripts.

    ``array --store S --folds all`` prints the ``--array`` spec of the folds; ``check-fold --store S --fold K``
    exits 0 when fold K can be trained, 1 (printing why) when there is nothing to train, 2 on a bad store.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m launch.stages", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("array", help="print the SLURM --array spec of the selected folds")
    a.add_argument("--store", required=True)
    a.add_argument("--folds", default="all")
    c = sub.add_parser("check-fold", help="exit 0 if the fold can be trained, 1 (with the reason) if not")
    c.add_argument("--store", required=True)
    c.add_argument("--fold", type=int, required=True)
    args = p.parse_args(argv)
    try:
        sites, ineligible = read_store_sites(args.store)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "array":
        try:
            print(fold_array_spec(parse_folds(args.folds, sites, ineligible)))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if not 0 <= args.fold < len(sites):
        print(f"no fold {args.fold}: the store {args.store} has {len(sites)} sites (folds 0-{len(sites) - 1})")
        return 1
    site = sites[args.fold]
    if site in ineligible:
        print(f"site {site} cannot be held out: {ineligible[site]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
