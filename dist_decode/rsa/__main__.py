"""``python -m dist_decode.rsa``: Kendall tau-a RSA with an exact, MPI-parallel permutation test.

Run mode reads every fold of a run directory; table mode reads any feature file. Launch as one plain
process, ``mpiexec -n N python -m dist_decode.rsa ...`` or ``srun --mpi=pmi2 python -m dist_decode.rsa ...``;
results are identical for any number of ranks.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_decode.cli import setup_logging
from dist_decode.config import RSAConfig
from dist_decode.contracts import features as features_contract
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import DiskFull, disk_full_errors
from dist_decode.rsa import io as rio
from dist_decode.rsa.analysis import parse_variables, run_loso, run_rsa
from dist_decode.rsa.permutation import get_comm

log = logging.getLogger("dist_decode.rsa")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dist_decode.rsa",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs: rsa.json (config, seed, permutations, ranks, results), rsa.csv, rsa.txt, null.npz.\n"
               "Examples:\n"
               "  python -m dist_decode.rsa --run-dir RUN\n"
               "  mpiexec -n 4 python -m dist_decode.rsa --run-dir RUN --permutations 10000\n"
               "  python -m dist_decode.rsa --features F.h5 --phenotypes P.tsv \\\n"
               "      --variables age:continuous,sex:categorical --out DIR --permutations 1000 --seed 1",
    )
    mode = p.add_argument_group("inputs (give --run-dir, or --features with --phenotypes and --out)")
    mode.add_argument("--run-dir", type=Path, help="run directory: reads RUN/folds/<site>/features.h5, "
                      "writes RUN/rsa/")
    mode.add_argument("--features", type=Path, help="HDF5 file with participant_id and one (n, d) or "
                      "(K, n, d) dataset per feature space (table mode)")
    mode.add_argument("--phenotypes", type=Path, help="participants TSV with participant_id (table mode; in "
                      "run mode it replaces the store's phenotypes)")
    mode.add_argument("--out", type=Path, help="output folder (table mode; run mode writes RUN/rsa)")
    mode.add_argument("--spaces", help="comma-separated feature datasets to analyse (table mode; default: all)")
    a = p.add_argument_group("analysis (defaults: the run's config.json rsa section, else RSAConfig)")
    a.add_argument("--variables", help="column:kind list, kind continuous or categorical, "
                   "e.g. age:continuous,sex:categorical")
    a.add_argument("--permutations", type=int, help="number of permutations B")
    a.add_argument("--seed", type=int, help="master seed (run mode default: the run's seed)")
    a.add_argument("--block-size", type=int, help="permutations per seeded block (unit of work of a rank)")
    a.add_argument("--distance", choices=["euclidean", "correlation"], help="feature RDM distance")
    a.add_argument("--fwe", choices=["maxT", "minP"], help="family-wise correction over models x spaces")
    a.add_argument("--alternative", choices=["two-sided", "greater", "less"], help="test direction")
    a.add_argument("--use-samples", action=argparse.BooleanOptionalAction, default=None,
                   help="run mode: average the feature RDM over posterior samples instead of posterior means")
    a.add_argument("--within-site", action=argparse.BooleanOptionalAction, default=None,
                   help="run mode: permute within held-out site (the pooled statistic only uses within-site "
                        "cells either way)")
    a.add_argument("--strata", help="table mode: phenotype column to permute within (e.g. site)")
    a.add_argument("--patients-only", help="comma-separated variables analysed in patients only "
                   "(default: config patients_only, e.g. panss_total)")
    a.add_argument("--patients-only-spaces", help="comma-separated feature spaces analysed in patients only, for "
                   "every variable (default: config patients_only_spaces, i.e. S; '' for none)")
    a.add_argument("--diagnosis-column", default="diagnosis", help="patients-only with a TSV: diagnosis column")
    a.add_argument("--patient-label", default="SZ", help="patients-only with a TSV: diagnosis value of patients")
    r = p.add_argument_group("execution")
    r.add_argument("--expect-ranks", type=int, help="fail unless the MPI world has exactly this many ranks")
    r.add_argument("--force", action="store_true", help="recompute even when rsa.json exists")
    r.add_argument("--allow-missing-folds", action="store_true",
                   help="run mode: analyse the finished folds (DONE) and leave out the others")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _settings(args: argparse.Namespace, base: Any) -> dict[str, Any]:
    """The RSA settings: ``base`` (an RSAConfig) overridden by the command line."""
    s = {
        "variables": args.variables or ",".join(base.variables),
        "distance": args.distance or base.distance,
        "permutations": args.permutations if args.permutations is not None else base.permutations,
        "block_size": args.block_size if args.block_size is not None else base.block_size,
        "fwe": args.fwe or base.fwe,
        "alternative": args.alternative or base.alternative,
        "within_site": base.within_site if args.within_site is None else args.within_site,
        "use_samples": base.use_samples if args.use_samples is None else args.use_samples,
        "patients_only": (args.patients_only.split(",") if args.patients_only is not None
                          else list(base.patients_only)),
        "patients_only_spaces": (args.patients_only_spaces.split(",") if args.patients_only_spaces is not None
                                 else list(base.patients_only_spaces)),
    }
    s["patients_only_spaces"] = [v.strip() for v in s["patients_only_spaces"] if v.strip()]
    s["variables"] = [f"{n}:{k}" for n, k in parse_variables(s["variables"])]
    s["patients_only"] = [v.strip() for v in s["patients_only"] if v.strip()]
    return s


def run_mode(args: argparse.Namespace, comm: Any, ranks: int) -> int:
    rundir = RunDir(args.run_dir)
    run = rundir.path
    out = run / "rsa"
    if rundir.done("rsa") and not args.force:
        log.info("%s exists: RSA already done (use --force to recompute)", out / "rsa.json")
        return 0
    rundir.manifest()  # a started run (clear error otherwise)
    cfg = rundir.config()
    s = _settings(args, cfg.rsa)
    seed = args.seed if args.seed is not None else cfg.seed
    variables = parse_variables(s["variables"])
    if args.phenotypes:
        pheno = rio.read_phenotypes(args.phenotypes)
        ids_all = pheno["participant_id"]
        patient_all = None
    else:
        store = rundir.store()
        ids_all, pheno, patient_all = store.participant_ids, store.phenotypes, np.asarray(store.is_patient, bool)
    folds: dict[str, dict[str, Any]] = {}
    subsets: dict[str, dict[str, np.ndarray]] = {}
    missing = [site for site in rundir.folds() if not rundir.done("fold", site)]
    if missing and not args.allow_missing_folds:
        raise FileNotFoundError(f"fold(s) {missing} of {run} are not trained yet (no DONE); train them, or pass "
                                "--allow-missing-folds to analyse the others")
    for site in rundir.folds():
        if site in missing:
            log.warning("fold %s is not trained: left out (--allow-missing-folds)", site)
            continue
        f = features_contract.read(rundir.fold_dir(site) / features_contract.FILE, split="test",
                                   samples=s["use_samples"])
        where = str(args.phenotypes or "the store")
        ph = rio.align(f.participant_id, {**pheno, "__row": np.arange(len(ids_all))}, ids_all, where)
        if patient_all is not None:
            patient = patient_all[ph.pop("__row")]
        else:
            ph.pop("__row")
            patient = f.diagnosis == args.patient_label
        folds[site] = {"spaces": {name: f.space(name, s["use_samples"]) for name in features_contract.SPACES},
                       "phenotypes": ph}
        subsets[site] = {v: patient for v in s["patients_only"]}
        subsets[site].update({(space, v): patient for space in s["patients_only_spaces"] for v, _ in variables})
        log.info("fold %s: %d held-out subjects (%d patients)", site, len(f), patient.sum())
    t0 = time.time()
    timing: dict = {}
    rows, null, labels = run_loso(folds, variables, s["permutations"], seed, s["distance"], s["fwe"],
                                  s["alternative"], comm, s["block_size"], subsets,
                                  within_site=s["within_site"], progress=not args.no_progress, timing=timing)
    if null is None:
        return 0
    header = {"config": s, "seed": seed, "permutations": s["permutations"], "ranks": ranks,
              "mode": "run", "run_dir": str(run), "sites": list(folds), "missing_folds": missing,
              "wall_s": round(time.time() - t0, 3), **timing}
    path = rio.write_results(out, header, rows, null, labels)
    log.info("wrote %s (%d rows, %.1f s)", path, len(rows), time.time() - t0)
    print(rio.format_table(rows), end="")
    return 0


def table_mode(args: argparse.Namespace, comm: Any, ranks: int) -> int:
    if not (args.features and args.phenotypes and args.out):
        raise ValueError("table mode needs --features, --phenotypes and --out (or give --run-dir)")
    if (args.out / "rsa.json").is_file() and not args.force:
        log.info("%s exists: RSA already done (use --force to recompute)", args.out / "rsa.json")
        return 0
    s = _settings(args, RSAConfig(patients_only=(), patients_only_spaces=()))
    seed = args.seed if args.seed is not None else 0
    variables = parse_variables(s["variables"])
    ids, spaces = rio.read_features(args.features, args.spaces.split(",") if args.spaces else None)
    table = rio.read_phenotypes(args.phenotypes)
    pheno = rio.align(ids, table, table["participant_id"], str(args.phenotypes))
    strata = None
    if args.strata:
        if args.strata not in pheno:
            raise ValueError(f"--strata {args.strata!r}: no such column in {args.phenotypes}")
        strata = pheno[args.strata].astype(str)
    subsets: dict = {}
    if s["patients_only"] or s["patients_only_spaces"]:
        if args.diagnosis_column not in pheno:
            raise ValueError(f"--patients-only needs the column {args.diagnosis_column!r} in {args.phenotypes}")
        patient = pheno[args.diagnosis_column].astype(str) == args.patient_label
        if not patient.any():
            raise ValueError(f"no subject has {args.diagnosis_column} == {args.patient_label!r} in "
                             f"{args.phenotypes} (values: {sorted(set(pheno[args.diagnosis_column].astype(str)))})")
        subsets = {v: patient for v in s["patients_only"]}
        unknown = [sp for sp in s["patients_only_spaces"] if sp not in spaces]
        if unknown:
            raise ValueError(f"--patients-only-spaces {unknown}: no such feature space in {args.features} "
                             f"(spaces: {sorted(spaces)})")
        subsets.update({(sp, v): patient for sp in s["patients_only_spaces"] for v, _ in variables})
    t0 = time.time()
    timing: dict = {}
    rows, null = run_rsa(spaces, pheno, variables, s["permutations"], seed, s["distance"], strata, s["fwe"],
                         s["alternative"], comm, s["block_size"], subsets, scope="all", return_null=True,
                         progress=not args.no_progress, timing=timing)
    if null is None:
        return 0
    s["within_site"] = bool(args.strata)  # table mode: permutation strata come from --strata only
    s.pop("use_samples")  # table mode: (K, n, d) datasets are posterior samples
    header = {"config": {**s, "strata": args.strata}, "seed": seed, "permutations": s["permutations"],
              "ranks": ranks, "mode": "table", "features": str(args.features),
              "phenotypes": str(args.phenotypes), "wall_s": round(time.time() - t0, 3), **timing}
    labels = [f"{r['scope']}/{r['space']}/{r['variable']}" for r in rows]
    path = rio.write_results(args.out, header, rows, null, labels)
    log.info("wrote %s (%d rows, %.1f s)", path, len(rows), time.time() - t0)
    print(rio.format_table(rows), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    comm = None
    try:
        comm = get_comm(args.expect_ranks)
        ranks = comm.Get_size() if comm is not None else 1
        if comm is not None and comm.Get_rank() != 0:
            logging.getLogger().setLevel(logging.WARNING)
        log.info("%d rank(s)%s", ranks, " (MPI)" if comm is not None else " (plain process, no MPI)")
        if args.run_dir and args.features:
            raise ValueError("give either --run-dir or --features, not both")
        out = args.run_dir / "rsa" if args.run_dir else args.out
        with disk_full_errors(out or Path.cwd(), "the RSA results"):
            return run_mode(args, comm, ranks) if args.run_dir else table_mode(args, comm, ranks)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, DiskFull) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if comm is not None and comm.Get_size() > 1:
            comm.Abort(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
