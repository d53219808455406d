"""``python -m dist_decode.maps.bench``: timings of the maps stage's parts on synthetic data (no run needed).

1. One twin -> recon SyN registration + log Jacobian per grid (a known contraction of nilearn's MNI152 GM
   template), for each iteration schedule; also the recovered log J at the contraction's centre.
2. The subject worker pool with 1 and ``--workers`` processes (6 registrations on the 3 mm grid).
3. The per-site group test at the CAT12 grid: FDR and sign-flip maxT FWE.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402

from dist_decode.cli import setup_logging  # noqa: E402

GRIDS = {"6": (6.0, (29, 35, 29)), "3": (3.0, (57, 69, 57)), "1.5": (1.5, (113, 137, 113))}
log = logging.getLogger("dist_decode.maps.bench")


def _pair(vox: float, shape: tuple[int, int, int], amount: float = 0.3):
    """(twin, recon, affine, centre): the GM template and a 9 mm-sigma contraction of it."""
    from nilearn import datasets, image
    from scipy import ndimage

    aff = np.array([[-vox, 0, 0, 84], [0, vox, 0, -120], [0, 0, vox, -72], [0, 0, 0, 1.0]])
    gm = datasets.load_mni152_gm_template(resolution=1 if vox < 2 else 2)
    base = image.resample_img(gm, target_affine=aff, target_shape=shape, interpolation="continuous",
                              force_resample=True, copy_header=True).get_fdata().astype(np.float32)
    c = np.array(shape) * np.array([0.5, 0.7, 0.55])
    d = np.indices(shape).astype(float) - c[:, None, None, None]
    w = np.exp(-(d ** 2).sum(0) / (2 * (9.0 / vox) ** 2))
    recon = ndimage.map_coordinates(base, c[:, None, None, None] + d * (1 + amount * w), order=1)
    return base, recon.astype(np.float32), aff, tuple(int(v) for v in c)


def bench_registration(grids: list[str], schedules: list[tuple[int, ...]]) -> list[dict]:
    from dist_decode.maps.jacobian import SynSettings, log_jacobian

    rows = []
    for g in grids:
        vox, shape = GRIDS[g]
        twin, recon, aff, centre = _pair(vox, shape)
        for its in schedules:
            t = time.perf_counter()
            lj = log_jacobian(twin, recon, aff, SynSettings(iterations=its, seed=1))
            rows.append({"grid": "x".join(map(str, shape)), "voxel_mm": vox, "iterations": list(its),
                         "seconds": round(time.perf_counter() - t, 2), "logj_centre": round(float(lj[centre]), 3),
                         "logj_true": round(-3 * float(np.log(1.3)), 3)})
            log.info("SyN %s %s: %.2f s", rows[-1]["grid"], its, rows[-1]["seconds"])
    return rows


def bench_pool(workers: int, n: int = 6) -> dict:
    from dist_decode.maps.jacobian import SynSettings
    from dist_decode.maps.pipeline import _syn_task

    vox, shape = GRIDS["3"]
    pairs = [_pair(vox, shape, a)[:3] for a in np.linspace(0.1, 0.4, n)]
    out = {"subjects": n, "grid": "x".join(map(str, shape))}
    with tempfile.TemporaryDirectory() as tmp:
        for nw in sorted({1, workers}):
            t = time.perf_counter()
            with cf.ProcessPoolExecutor(nw, mp_context=mp.get_context("spawn")) as pool:
                futs = [pool.submit(_syn_task, f"{tmp}/w{nw}_{i}_effect.nii.gz", f"{tmp}/w{nw}_{i}_deviation.nii.gz",
                                    tw[None], rc[None], rc, np.ones(tw.shape, np.float32), aff, SynSettings(seed=i),
                                    False) for i, (tw, rc, aff) in enumerate(pairs)]
                for f in futs:
                    f.result()
            out[f"seconds_{nw}_workers"] = round(time.perf_counter() - t, 2)
            log.info("pool, %d worker(s): %.2f s", nw, out[f"seconds_{nw}_workers"])
    if workers > 1:
        out["speedup"] = round(out["seconds_1_workers"] / out[f"seconds_{workers}_workers"], 2)
    return out


def bench_group(n: int, permutations: int) -> dict:
    from dist_decode.maps.group import site_group_map

    shape = (113, 137, 113)
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, bool)
    mask[15:98, 15:122, 15:98] = True
    x = rng.normal(0, 0.03, size=(n,) + shape).astype(np.float32)
    x[:, 50:60, 60:70, 50:60] -= 0.03
    out = {"n": n, "voxels": int(mask.sum())}
    for method in ("fdr", "fwe"):
        t = time.perf_counter()
        g = site_group_map(x, mask, method, 0.05, permutations=permutations, rng=np.random.default_rng(1))
        out[method] = {"seconds": round(time.perf_counter() - t, 2), "n_significant": g.info["n_significant"]}
        log.info("group %s: %.2f s", method, out[method]["seconds"])
    out["fwe"]["permutations"] = permutations
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_decode.maps.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", default="6,3,1.5", help="voxel sizes to register at, from 6, 3, 1.5 (default all)")
    p.add_argument("--schedules", default="40x20x0,40x20x10", help="SyN iteration schedules (default both)")
    p.add_argument("--workers", type=int, default=2, help="pool size compared with 1 process (default 2)")
    p.add_argument("--patients", type=int, default=60, help="patients of the group-test benchmark (default 60)")
    p.add_argument("--permutations", type=int, default=1000, help="FWE sign flips (default 1000)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: registration, pool, group")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    setup_logging()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    bad = [g for g in grids if g not in GRIDS]
    if bad:
        log.error("--grids %s: choose from %s", ",".join(bad), ", ".join(GRIDS))
        return 2
    schedules = [tuple(int(v) for v in s.split("x")) for s in args.schedules.split(",") if s.strip()]
    res: dict = {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}
    if "registration" not in skip:
        res["registration"] = bench_registration(grids, schedules)
    if "pool" not in skip:
        res["pool"] = bench_pool(args.workers)
    if "group" not in skip:
        res["group"] = bench_group(args.patients, args.permutations)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        from dist_decode.fsutil import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
