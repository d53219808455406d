"""Benchmark of the exact RSA permutation engines against loops of rsatoolbox / scipy Kendall calls.

Measured side by side in one run, on the same seeded permutations, per core (process CPU time, BLAS
limited to one thread). Synthetic cohorts (``--sizes``, default N = 150, 600 and 1,250 subjects x 64
features, correlation-distance data RDM) with the models (``--models``):

* ``age``: integer years 18-65, ``|x_i - x_j|`` (48 levels); ``panss``: integers 30-150 (~120 levels);
  ``sex``: same/different;
* ``age_dec2``: ages 18-66 with 2 decimals (thousands of levels, more than 256 distinct ages at N >= ~300);
* ``age_mixed``: ages 6-64 recorded with 0-4 decimals in the proportions of the ABIDE legend (20 %
  integers, 15 % one, 45 % two, 5 % three, 15 % four decimals): tens of thousands of levels at N = 470,
  ~190,000 at N = 1,250;
* ``age_float``: ages at full float precision (every ``|x_i - x_j|`` distinct: m levels).

``--fixture [DIR]`` adds the real ABIDE patients of ``shared/fixtures/anchor-abide-cvae`` (N = 470, BG and
SL spaces averaged over the 10 posterior samples, Euclidean RDM; AgeAtScan, FIQ, ADOS_Total, Sex,
ScannerID), and ``--fixture-cli-permutations B`` times the table-mode CLI on it with age alone x 2 spaces.
Every shared permutation is checked to give the same integer S in the engine, in rsatoolbox and in scipy
(``S = tau_b sqrt((P - x_ties)(P - y_ties))``). ``--mpi`` adds the wall-clock speed-up of the whole CLI
with 1 and 2 MPI ranks.

    OMP_NUM_THREADS=1 python benchmarks/bench_rsa.py --out benchmarks/results/bench_rsa.json
    OMP_NUM_THREADS=1 python benchmarks/bench_rsa.py --sizes 470,1250 --loop-perms 24,4 \\
        --engine-perms 400,40 --models age,age_dec2,age_mixed,age_float --loops scipy --fixture
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from scipy.spatial.distance import pdist  # noqa: E402
from scipy.stats import kendalltau  # noqa: E402

from dist_decode.rsa.kendall import kendall, make_engine, model_vector, tie_pairs  # noqa: E402
from dist_decode.rsa.permutation import block_rng, perm_block  # noqa: E402

MODELS = ("age", "panss", "sex", "age_dec2", "age_mixed", "age_float")
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "anchor-abide-cvae"
FIXTURE_VARIABLES = (("AgeAtScan", "continuous"), ("FIQ", "continuous"), ("ADOS_Total", "continuous"),
                     ("Sex", "categorical"), ("ScannerID", "categorical"))


def mixed_decimals(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ages 6-64 recorded with 0-4 decimals in the ABIDE legend's proportions."""
    places = rng.choice(5, n, p=[0.20, 0.15, 0.45, 0.05, 0.15])
    return np.array([round(float(v), int(k)) for v, k in zip(rng.uniform(6, 64, n), places)])


def cohort(n: int, seed: int, models: tuple[str, ...]) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, str]]]:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 66, n).astype(float)
    panss = rng.integers(30, 151, n).astype(float)
    sex = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 64))
    x[:, 0] += 0.05 * (age - age.mean()) / age.std()
    x[:, 1] += 0.1 * sex
    data = pdist(x, metric="correlation")
    extra = np.random.default_rng(seed + 1)
    table = {"age": (age, "continuous"), "panss": (panss, "continuous"), "sex": (sex, "categorical"),
             "age_dec2": (np.round(age + extra.uniform(0, 1, n), 2), "continuous"),
             "age_mixed": (mixed_decimals(extra, n), "continuous"),
             "age_float": (age + extra.uniform(0, 1, n), "continuous")}
    return data, {k: table[k] for k in models}


def fixture_cohort(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Patients of the ABIDE fixture: sample-averaged BG / SL features and their phenotypes (NaN = missing)."""
    with open(path / "abide_legend.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients = np.array([float(r["DxGroup"]) for r in rows]) == 1
    z = np.load(path / "latent_vecs10.npz")
    spaces = {"BG": z["background_vec_abide"][:, patients].mean(0), "SL": z["salient_vec_abide"][:, patients].mean(0)}
    pheno = {k: np.array([float(r[k]) if r[k].strip() else np.nan for r in rows])[patients]
             for k, _ in FIXTURE_VARIABLES}
    return spaces, pheno


def cpu_rate(fn, count: int) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    dt = max(time.process_time() - t0, 1e-9)
    return count / dt, out


def bench_models(label: str, data: np.ndarray, models: dict[str, tuple[np.ndarray, str]], perms: np.ndarray,
                 loop_perms: int, loops: tuple[str, ...]) -> dict:
    """Engine vs naive loops for every model on one data RDM; ``perms`` rows are shared by all."""
    n = perms.shape[1]
    shared = perms[:loop_perms]
    i, j = np.triu_indices(n, 1)
    m = data.size
    pairs = m * (m - 1) // 2
    x_ties = tie_pairs(data)
    out = {"label": label, "n": n, "cells": int(m), "models": {}}
    for name, (values, kind) in models.items():
        model = model_vector(values, kind)
        y_ties = tie_pairs(model)
        t0 = time.process_time()
        engine = make_engine(data, values, kind)
        setup_s = time.process_time() - t0
        engine.statistics(perms[:4])  # JIT / warm-up outside the timing
        res = {"kind": kind, "engine": type(engine).__name__, "kernel": getattr(engine, "kernel", "gemm"),
               "levels": int(getattr(engine, "n_levels", 2)), "codes": int(np.unique(values).size),
               "tree_depth": getattr(engine, "depth", None), "setup_s": round(setup_s, 4),
               "loop_perms": len(shared), "engine_perms": len(perms)}
        r_fast, s_fast = cpu_rate(lambda: engine.statistics(perms), len(perms))
        res["rate_engine"] = r_fast
        res["ns_per_cell"] = 1e9 / (r_fast * m)
        if "rsatoolbox" in loops:
            from rsatoolbox.rdm import RDMs, compare
            from rsatoolbox.rdm.rdms import permute_rdms

            rdm_data, rdm_model = RDMs(data[None]), RDMs(model[None])
            r_tbx, tau_tbx = cpu_rate(lambda: [float(compare(rdm_data, permute_rdms(rdm_model, p.astype(int)),
                                                              method="tau-a")[0, 0]) for p in shared], len(shared))
            res["rate_rsatoolbox_loop"] = r_tbx
            res["speedup_vs_rsatoolbox"] = r_fast / r_tbx
            res["identical_S_rsatoolbox"] = bool(np.array_equal(np.rint(np.array(tau_tbx) * pairs).astype(np.int64),
                                                                s_fast[: len(shared)]))

        def loop_scipy():
            res_ = []
            for p in shared:
                v = values[p]
                mp = np.abs(v[i] - v[j]) if kind == "continuous" else (v[i] != v[j]).astype(float)
                res_.append(kendalltau(data, mp)[0])
            return res_

        r_scipy, tau_b = cpu_rate(loop_scipy, len(shared))
        den = np.sqrt(float(pairs - x_ties) * float(pairs - y_ties))
        res["rate_scipy_loop"] = r_scipy
        res["speedup_vs_scipy"] = r_fast / r_scipy
        res["identical_S_scipy"] = bool(np.array_equal(np.rint(np.array(tau_b) * den).astype(np.int64),
                                                       s_fast[: len(shared)]))
        res["tau_a_observed"] = kendall(data, model).tau_a
        out["models"][name] = res
        tbx = (f"rsatoolbox {res['rate_rsatoolbox_loop']:8.1f}/s x{res['speedup_vs_rsatoolbox']:6.0f}  "
               if "rate_rsatoolbox_loop" in res else "")
        same = res["identical_S_scipy"] and res.get("identical_S_rsatoolbox", True)
        print(f"{label:14s} N={n:5d} {name:10s} {res['kernel']:8s} K={res['levels']:7d} U={res['codes']:5d}  "
              f"{tbx}scipy {r_scipy:8.1f}/s  engine {r_fast:10.1f}/s  x{r_fast / r_scipy:6.0f} (scipy)  "
              f"{res['ns_per_cell']:5.2f} ns/cell  identical={same}", flush=True)
    return out


def bench_size(n: int, loop_perms: int, fast_perms: int, seed: int, models: tuple[str, ...],
               loops: tuple[str, ...]) -> dict:
    data, table = cohort(n, seed, models)
    perms = perm_block(block_rng(seed, (n,), 0), fast_perms, n)
    out = bench_models("synthetic", data, table, perms, loop_perms, loops)
    t0 = time.process_time()
    perm_block(block_rng(seed, (n, 1), 0), 1000, n)
    out["draw_rate"] = 1000 / (time.process_time() - t0)
    return out


def bench_fixture(path: Path, loop_perms: int, fast_perms: int, seed: int, loops: tuple[str, ...]) -> list[dict]:
    """Every fixture variable against the BG and SL spaces (subjects missing a variable dropped)."""
    spaces, pheno = fixture_cohort(path)
    out = []
    for space, x in spaces.items():
        for name, kind in FIXTURE_VARIABLES:
            keep = np.isfinite(pheno[name])
            data = pdist(x[keep])
            perms = perm_block(block_rng(seed, (int(keep.sum()),), 0), fast_perms, int(keep.sum()))
            out.append(bench_models(f"fixture {space}", data, {name: (pheno[name][keep], kind)}, perms,
                                    loop_perms, loops))
    return out


def _write_table(tmp: Path, ids: list[str], spaces: dict[str, np.ndarray], columns: dict[str, list]) -> None:
    import h5py

    with h5py.File(tmp / "F.h5", "w") as f:
        f.create_dataset("participant_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        for k, v in spaces.items():
            f[k] = v
    names = list(columns)
    lines = ["\t".join(["participant_id", *names])] + [
        "\t".join([ids[k], *(str(columns[c][k]) for c in names)]) for k in range(len(ids))]
    (tmp / "P.tsv").write_text("\n".join(lines) + "\n")


def bench_fixture_cli(path: Path, permutations: int) -> dict:
    """Table-mode CLI on the fixture's patients, age alone x BG, SL (the measurement of issue 12)."""
    spaces, pheno = fixture_cohort(path)
    tmp = Path(tempfile.mkdtemp(prefix="bench_rsa_fixture_"))
    ids = [f"p{k}" for k in range(pheno["AgeAtScan"].size)]
    _write_table(tmp, ids, spaces, {"age": [repr(float(a)) for a in pheno["AgeAtScan"]]})
    cmd = [sys.executable, "-m", "dist_decode.rsa", "--features", str(tmp / "F.h5"), "--phenotypes",
           str(tmp / "P.tsv"), "--variables", "age:continuous", "--permutations", str(permutations),
           "--out", str(tmp / "o"), "--no-progress", "--force"]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.time() - t0
    doc = json.loads((tmp / "o" / "rsa.json").read_text())
    tests = len(doc["results"])
    cpu = sum(doc["cpu_s_per_rank"])
    res = {"permutations": permutations, "tests": tests, "cli_wall_s": wall, "analysis_wall_s": doc["wall_s"],
           "cpu_s_permutations": cpu, "ms_per_test_permutation": 1e3 * cpu / (permutations * tests)}
    print(f"fixture CLI: age x {tests} spaces, {permutations} permutations: CLI wall {wall:.2f} s, analysis wall "
          f"{doc['wall_s']:.2f} s, permutation blocks {cpu:.2f} CPU-s = "
          f"{res['ms_per_test_permutation']:.3f} ms per test-permutation", flush=True)
    return res


def bench_mpi(n: int, permutations: int, ranks: list[int]) -> dict:
    """Wall time of the whole table-mode CLI (age, PANSS, sex x 2 spaces) with 1..R MPI ranks."""
    rng = np.random.default_rng(3)
    tmp = Path(tempfile.mkdtemp(prefix="bench_rsa_"))
    ids = [f"s{k}" for k in range(n)]
    spaces = {"A": rng.normal(size=(n, 16)), "B": rng.normal(size=(n, 16))}
    _write_table(tmp, ids, spaces, {"age": [int(a) for a in rng.integers(18, 66, n)],
                                    "panss": [int(p) for p in rng.integers(30, 151, n)],
                                    "sex": ["MF"[s] for s in rng.integers(0, 2, n)]})
    exe = Path(sys.executable)
    out = {"n": n, "permutations": permutations, "wall_s": {}}
    for r in ranks:
        cmd = [sys.executable, "-m", "dist_decode.rsa", "--features", str(tmp / "F.h5"), "--phenotypes",
               str(tmp / "P.tsv"), "--variables", "age:continuous,panss:continuous,sex:categorical",
               "--permutations", str(permutations), "--block-size", "50", "--out", str(tmp / f"o{r}"),
               "--no-progress", "--force"]
        if r > 1:
            cmd = [str(exe.parent / "mpiexec"), "-n", str(r), *cmd, "--expect-ranks", str(r)]
        t0 = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        out["wall_s"][r] = time.time() - t0
        doc = json.loads((tmp / f"o{r}" / "rsa.json").read_text())
        out.setdefault("compute_s", {})[r] = doc["wall_s"]
        out.setdefault("cpu_s_per_rank", {})[r] = doc["cpu_s_per_rank"]
        out.setdefault("blocks_per_rank", {})[r] = doc["blocks_per_rank"]
        print(f"MPI ranks={r}: CLI wall {out['wall_s'][r]:.2f} s, analysis wall {doc['wall_s']:.2f} s, "
              f"CPU s of the permutation blocks per rank {doc['cpu_s_per_rank']} "
              f"(blocks {doc['blocks_per_rank']}), load avg {os.getloadavg()[0]:.1f}", flush=True)
    same = len({(tmp / f"o{r}" / "rsa.csv").read_bytes() for r in ranks}) == 1
    out["identical_results"] = same
    out["speedup_compute"] = {r: out["compute_s"][ranks[0]] / out["compute_s"][r] for r in ranks}
    # work split: the busiest rank's CPU time against one rank's (what wall time approaches on free cores)
    out["speedup_cpu_critical_path"] = {r: sum(out["cpu_s_per_rank"][ranks[0]]) / max(out["cpu_s_per_rank"][r])
                                        for r in ranks}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="150,600,1250", help="comma-separated subject counts ('' for none)")
    ap.add_argument("--loop-perms", default="100,15,4", help="permutations for the naive loops, per size")
    ap.add_argument("--engine-perms", default="2000,200,60", help="permutations for the engines, per size")
    ap.add_argument("--models", default=",".join(MODELS), help=f"synthetic models, any of {', '.join(MODELS)}")
    ap.add_argument("--loops", default="rsatoolbox,scipy", help="naive loops to time (scipy always runs)")
    ap.add_argument("--fixture", nargs="?", const=FIXTURE, type=Path,
                    help=f"also benchmark the ABIDE fixture (default {FIXTURE})")
    ap.add_argument("--fixture-loop-perms", type=int, default=24)
    ap.add_argument("--fixture-engine-perms", type=int, default=400)
    ap.add_argument("--fixture-cli-permutations", type=int, default=0,
                    help="time the table-mode CLI on the fixture (age x BG, SL) with this many permutations")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--mpi", action="store_true", help="also time the CLI with 1 and 2 MPI ranks")
    ap.add_argument("--mpi-n", type=int, default=600)
    ap.add_argument("--mpi-permutations", type=int, default=600)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    lp = [int(s) for s in a.loop_perms.split(",")]
    ep = [int(s) for s in a.engine_perms.split(",")]
    models = tuple(s for s in a.models.split(",") if s)
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    loops = tuple(sorted(set(a.loops.split(",")) | {"scipy"}))
    res = {"machine": {"cpu": _cpu(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_avg_start": os.getloadavg()},
           "sizes": [bench_size(n, lp[k], ep[k], a.seed, models, loops) for k, n in enumerate(sizes)]}
    if a.fixture is not None:
        res["fixture"] = bench_fixture(a.fixture, a.fixture_loop_perms, a.fixture_engine_perms, a.seed, loops)
        if a.fixture_cli_permutations:
            res["fixture_cli"] = bench_fixture_cli(a.fixture, a.fixture_cli_permutations)
    if a.mpi:
        res["mpi"] = bench_mpi(a.mpi_n, a.mpi_permutations, [1, 2])
    res["machine"]["load_avg_end"] = os.getloadavg()
    print(f"load average {res['machine']['load_avg_start'][0]:.1f} at the start, "
          f"{res['machine']['load_avg_end'][0]:.1f} at the end", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
