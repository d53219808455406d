"""Store vs nibabel read throughput: ``python benchmarks/bench_store.py``.

Reads the same volumes in one process from the packed HDF5 store (``dist_decode.data.Store.read``)
and from the CAT12 ``.nii.gz`` files with nibabel, and prints volumes/s of each, their ratio, and the
bytes on disk of each. Both a lossless (Blosc-LZ4 float32) and a float16 store are measured.

Without ``--cohort`` it synthesizes a cohort on CAT12's 1.5 mm grid (113x137x113) under
``--workdir`` first (cached there for the next run). Reads are from a warm page cache (every file is
read once before timing), so the figures compare decoding cost, which is what a training loop that
re-reads its data every epoch pays.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.pack import pack  # noqa: E402
from data_prep.synth import synthesize  # noqa: E402
from dist_decode.cli import setup_logging  # noqa: E402
from dist_decode.data import Store  # noqa: E402

log = logging.getLogger("bench_store")


def _read_nifti(paths: list[Path]) -> float:
    t = time.perf_counter()
    for p in paths:
        vol = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
        assert vol.ndim == 3
    return time.perf_counter() - t


def _read_store(store: Store, idx: list[int], raw: bool = False) -> float:
    read = store.read_raw if raw else store.read
    t = time.perf_counter()
    for i in idx:
        vol = read(i)
        assert vol.ndim == 3
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_store.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_store"), help="cohort and stores go here")
    ap.add_argument("--cohort", type=Path, default=None, help="an existing CAT12 cohort (default: synthesize one)")
    ap.add_argument("--subjects", type=int, default=40, help="subjects to synthesize (default 40)")
    ap.add_argument("--voxel-mm", type=float, default=1.5, help="grid of the synthesized cohort (default 1.5)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported (default 3)")
    ap.add_argument("--jobs", type=int, default=None, help="processes for synthesis/packing (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    setup_logging()

    cohort = args.cohort
    if cohort is None:
        cohort = args.workdir / f"cohort_{args.voxel_mm:g}mm_{args.subjects}"
        per_site = max(2, args.subjects // 4)
        synthesize(cohort, preset="tiny", seed=0, voxel_mm=args.voxel_mm, sites=4, subjects_per_site=per_site,
                   poor_quality_fraction=0.0, jacobian=False, n_jobs=args.jobs)
    stores = {}
    for name, dtype in (("lossless", "float32"), ("float16", "float16")):
        out = args.workdir / f"store_{cohort.name}_{name}"
        pack(cohort, cohort / "participants.tsv", out, dtype=dtype, min_iqr_rating=None, n_jobs=args.jobs)
        stores[name] = Store.open(out)

    ref = stores["lossless"]
    idx = list(range(ref.n))
    paths = []
    for pid in ref.participant_ids:
        hits = sorted((cohort / pid / "mri").glob(f"mwp1{pid}*.nii*")) or sorted((cohort / "mri").glob(f"mwp1{pid}*.nii*"))
        paths.append(hits[0])
    nifti_bytes = sum(p.stat().st_size for p in paths)

    # Warm the page cache and the code paths once, then time the best of N passes, interleaved.
    _read_nifti(paths)
    for s in stores.values():
        _read_store(s, idx)
    best = {"nibabel": np.inf, **{k: np.inf for k in stores}, "float16_raw": np.inf}
    for _ in range(args.repeats):
        best["nibabel"] = min(best["nibabel"], _read_nifti(paths))
        for k, s in stores.items():
            best[k] = min(best[k], _read_store(s, idx))
        best["float16_raw"] = min(best["float16_raw"], _read_store(stores["float16"], idx, raw=True))

    n = len(idx)
    result = {
        "volumes": n,
        "grid": list(ref.grid_shape),
        "vol_per_s": {k: n / v for k, v in best.items()},
        "ratio_vs_nibabel": {k: best["nibabel"] / best[k] for k in best if k != "nibabel"},
        "bytes_on_disk": {
            "nibabel": nifti_bytes,
            **{k: sum(sh["bytes"] for sh in s.manifest["shards"]) for k, s in stores.items()},
        },
        "repeats": args.repeats,
        "float16_max_error": stores["float16"].manifest["storage"]["float16_max_error"],
        "cpu": os.cpu_count(),
    }
    print(f"{n} volumes {tuple(ref.grid_shape)}, one process, warm page cache, best of {args.repeats}")
    print(f"{'reader':<26}{'vol/s':>10}{'x nibabel':>12}{'MB on disk':>12}{'MB/volume':>11}")
    rows = [("nibabel .nii.gz", "nibabel"), ("store Blosc-LZ4 float32", "lossless"),
            ("store float16 -> float32", "float16"), ("store float16, raw", "float16_raw")]
    for label, k in rows:
        ratio = result["ratio_vs_nibabel"].get(k, 1.0)
        b = result["bytes_on_disk"][{"float16_raw": "float16"}.get(k, k)]
        print(f"{label:<26}{result['vol_per_s'][k]:>10.1f}{ratio:>12.2f}{b / 1e6:>12.1f}{b / 1e6 / n:>11.2f}")
    print(f"float16 max abs error: {result['float16_max_error']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
