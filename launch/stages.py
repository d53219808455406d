"""The stage graph of a run: which entry point each job calls, what it waits for, when it is finished.

The launcher computes no science: every stage is one ``python -m dist_decode.<stage>`` command (the same
command the ``slurm/*.sh`` scripts run), a completion file (docs/architecture.md) and the stages it
depends on::

    fold-K (one per LOSO fold)  ->  maps-K  ->  maps (overlap)  ->  report
                                \\-> rsa (MPI, all folds) ---------/

A stage whose module is not installed yet is *unavailable*: the launcher skips it (and whatever needs it)
with a clear message instead of failing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Stage kinds in pipeline order, with the module each one runs.
MODULES = {
    "fold": "dist_decode.train",
    "maps_fold": "dist_decode.maps",
    "maps": "dist_decode.maps",
    "rsa": "dist_decode.rsa",
    "report": "dist_decode.report",
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


_OPTIONS_CACHE: dict[str, frozenset[str]] = {}


def cli_options(module: str) -> frozenset[str]:
    """The ``--long`` options listed by ``python -m module --help`` (empty when it does not run).

    Used to follow the stage CLIs as they evolve (e.g. whether ``dist_decode.maps`` can run per fold).
    """
    if module not in _OPTIONS_CACHE:
        import re
        import subprocess

        try:
            out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
            _OPTIONS_CACHE[module] = frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))
        except (OSError, subprocess.TimeoutExpired):
            _OPTIONS_CACHE[module] = frozenset()
    return _OPTIONS_CACHE[module]


def maps_options() -> frozenset[str]:
    """Options of the maps CLI (empty while ``dist_decode.maps`` is not installed)."""
    return cli_options(MODULES["maps"]) if module_available(MODULES["maps"]) else frozenset()


def module_available(module: str) -> bool:
    """Whether ``module`` (e.g. ``dist_decode.maps``) can be run with ``python -m``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package runs through its __main__
        try:
            return importlib.util.find_spec(module + ".__main__") is not None
        except ImportError:
            return False
    return True


def read_store_sites(store: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Fold order and ineligible sites of a packed store.

    Returns
    -------
    sites : list of str
        ``sites[k]`` is held out by fold ``k``.
    ineligible : dict
        Site -> reason, for sites that cannot be held out (``manifest["loso_ineligible"]``).

    Raises
    ------
    FileNotFoundError
        When ``STORE/manifest.json`` does not exist.
    ValueError
        When the manifest has no usable ``sites`` list.
    """
    manifest_path = Path(store) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path}: no store manifest; pack a cohort first "
            "(python -m data_prep.pack --cat12-root COHORT --participants COHORT/participants.tsv --out STORE)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: not valid JSON ({exc})") from None
    sites = manifest.get("sites")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
        raise ValueError(f"{manifest_path}: 'sites' must be a non-empty list of site names, got {sites!r}")
    raw = manifest.get("loso_ineligible") or []
    ineligible: dict[str, str] = {}
    if isinstance(raw, dict):
        ineligible = {str(k): str(v) for k, v in raw.items()}
    else:
        for item in raw:
            if isinstance(item, dict):
                ineligible[str(item.get("site"))] = str(item.get("reason", "not eligible"))
            else:
                ineligible[str(item)] = "not eligible"
    return list(sites), ineligible


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
    per_fold_maps: bool = True,
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
        Extra trainer arguments (``--config FILE``, ``--set sec.field=v`` ...), identical for every fold.
    per_fold_maps : bool
        Split the maps stage: one job per fold (when ``dist_decode.maps`` takes ``--fold``) or ``maps_jobs``
        registration shards (when it takes ``--stage``/``--shard``), then the combining job; else one job.
    maps_jobs : int
        Registration shards when the maps CLI shards by subject.
    maps_cpus : int
        Cores per maps job (passed as ``--workers`` when the maps CLI has it).
    subset : bool
        ``folds`` is a deliberate selection, not every eligible fold: the RSA analyses just those.
    """
    store = Path(store).absolute()
    run = Path(run_dir).absolute()
    train_args = list(train_args or [])
    stages: list[Stage] = []
    fold_names = []
    for k in folds:
        name = f"fold-{k}"
        fold_names.append(name)
        stages.append(Stage(
            name=name, kind="fold", fold=k, ntasks=max(1, tasks_per_fold),
            args=["--store", str(store), "--fold", str(k), "--run-dir", str(run), *train_args],
            done=run / "folds" / sites[k] / "DONE",
        ))
    maps_cli = maps_options()
    workers = ["--workers", str(max(1, maps_cpus))] if "--workers" in maps_cli else []
    maps_deps = list(fold_names)
    combine_args = ["--run-dir", str(run), *workers]
    if "--fold" in maps_cli and per_fold_maps:
        # per-fold parts pipelined behind their fold, then the combining step
        maps_deps = []
        for k in folds:
            maps_deps.append(f"maps-{k}")
            stages.append(Stage(name=f"maps-{k}", kind="maps_fold", fold=k, deps=[f"fold-{k}"],
                                args=["--run-dir", str(run), "--fold", str(k), *workers],
                                # no completion file of its own in the contract: its job's exit status counts
                                done=run / "maps" / "overlap.nii.gz"))
        combine_args.append("--combine")
    elif "--shard" in maps_cli and "--stage" in maps_cli and per_fold_maps and maps_jobs > 1:
        # the registrations of all folds split over maps_jobs jobs, then the group step
        maps_deps = []
        for k in range(maps_jobs):
            maps_deps.append(f"maps-{k}")
            stages.append(Stage(name=f"maps-{k}", kind="maps_fold", deps=list(fold_names),
                                args=["--run-dir", str(run), "--stage", "jacobians", "--shard", f"{k}/{maps_jobs}",
                                      *workers],
                                done=run / "maps" / "overlap.nii.gz"))
        combine_args += ["--stage", "group"]
    stages.append(Stage(name="maps", kind="maps", deps=maps_deps, args=combine_args,
                        done=run / "maps" / "overlap.nii.gz"))
    rsa_args = ["--run-dir", str(run)]
    if module_available(MODULES["rsa"]) and "--expect-ranks" in cli_options(MODULES["rsa"]):
        # a wrong PMI silently gives N singletons instead of one N-rank world: let the RSA refuse that
        rsa_args += ["--expect-ranks", str(max(1, rsa_ranks))]
    if subset and module_available(MODULES["rsa"]) and "--allow-missing-folds" in cli_options(MODULES["rsa"]):
        rsa_args.append("--allow-missing-folds")  # the user chose these folds: analyse them, not all sites
    stages.append(Stage(name="rsa", kind="rsa", deps=list(fold_names), ntasks=max(1, rsa_ranks), mpi=True,
                        args=rsa_args, done=run / "rsa" / "rsa.json"))
    stages.append(Stage(name="report", kind="report", deps=["maps", "rsa"],
                        args=["--run-dir", str(run)], done=run / "report" / "index.html"))
    return stages


def prune_unavailable(stages: list[Stage]) -> tuple[list[Stage], dict[str, str]]:
    """Drop stages whose module is missing, and stages that depend only on dropped ones.

    The report works on partial runs, so a stage that loses *some* dependencies keeps the others.

    Returns
    -------
    kept : list of Stage
    skipped : dict
        Stage name -> reason ("stage not available: module dist_decode.rsa is not installed").
    """
    skipped: dict[str, str] = {}
    kept: list[Stage] = []
    names = set()
    for st in stages:
        if not module_available(st.module):
            skipped[st.name] = f"stage not available: module {st.module} is not installed yet"
            continue
        live = [d for d in st.deps if d in names]
        if st.deps and not live:
            skipped[st.name] = f"stage skipped: everything it needs was skipped ({', '.join(st.deps)})"
            continue
        st.deps = live
        kept.append(st)
        names.add(st.name)
    return kept, skipped


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
