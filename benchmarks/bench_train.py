"""Training throughput and peak memory of one fold: ``python benchmarks/bench_train.py``.

Runs the real trainer (``python -m dist_decode.train``, or torchrun for world size 2) for a few
steps per configuration and reads its ``metrics.jsonl``: median training volumes/s after warm-up,
the share of step time spent waiting on data, and the peak resident (CPU) or allocated (GPU) memory
of rank 0. Configurations:

* ``decode_sz`` vs ``anchor2022`` at 64^3 (fp32, world size 1);
* fp32 vs bf16 (DECODE-SZ at 64^3);
* world size 1 vs 2 (DECODE-SZ at 64^3, fp32, same per-rank batch: weak scaling);
* on a GPU machine: DECODE-SZ at the full CAT12 grid (113x137x113) in bf16 with DataLoader workers,
  throughput per GPU and data-wait share (target: ~0 %).

Without ``--store`` a synthetic store is built once into ``--work`` (``data_prep.synth`` + ``pack``,
``tiny`` preset at 6 mm; with ``--full-grid`` another one at 1.5 mm). Every rank runs with
``--threads`` OpenMP threads (default 1: the development machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_store(work: Path, voxel_mm: float) -> Path:
    """Synthesize and pack a tiny-preset cohort at ``voxel_mm`` (cached in ``work``)."""
    from data_prep.pack import pack
    from data_prep.synth import synthesize

    store = work / f"store_{voxel_mm:g}mm"
    if (store / "manifest.json").is_file():
        return store
    cohort = work / f"cohort_{voxel_mm:g}mm"
    synthesize(cohort, preset="tiny", seed=0, voxel_mm=voxel_mm, n_jobs=1, progress=False)
    pack(cohort, cohort / "participants.tsv", store, progress=False, n_jobs=1)
    return store


def run_case(name: str, store: Path, work: Path, world: int, steps: int, threads: int, sets: list[str],
             extra: list[str]) -> dict:
    """Train one configuration and summarise its metrics (the first 2 steps are warm-up)."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--store", str(store), "--fold", "0", "--run-dir", str(run_dir), "--steps", str(steps),
            "--set", f"train.checkpoint_every={steps}", "--set", f"train.log_every={steps}",
            "--set", "train.feature_samples=1", "--set", "data.val_fraction=0.0"]
    for s in sets:
        args += ["--set", s]
    args += extra
    if world == 1:
        cmd = [sys.executable, "-m", "dist_decode.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "dist_decode.train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    fold_dir = next((run_dir / "folds").iterdir())
    recs = [json.loads(x) for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    info = next(r for r in recs if r["kind"] == "info")
    train = [r for r in recs if r["kind"] == "train"][2:]
    out = {
        "case": name, "model": info["model"], "grid": "x".join(map(str, info["grid"])),
        "precision": info["precision"], "world_size": world, "n_parameters": info["n_parameters"],
        "global_batch": None, "volumes_per_s": statistics.median(r["volumes_per_s"] for r in train),
        "step_s": statistics.median(r["step_s"] for r in train),
        "data_wait_share": sum(r["data_wait_s"] for r in train) / sum(r["step_s"] for r in train),
        "peak_rss_mb_rank0": max(r["max_rss_mb"] for r in train),
        "gpu_peak_mb_rank0": max((r.get("gpu_peak_mb", 0.0) for r in train), default=0.0),
        "wall_s": round(time.time() - t0, 1),
    }
    cfg = json.loads((fold_dir / "config.json").read_text())
    out["global_batch"] = cfg["train"]["batch_size"] * world
    shutil.rmtree(run_dir, ignore_errors=True)  # the anchor's checkpoints are GBs
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="packed store (default: build a synthetic one in --work)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_train", help="scratch folder")
    p.add_argument("--steps", type=int, default=8, help="steps per case (2 warm-up steps are not counted)")
    p.add_argument("--batch", type=int, default=4, help="per-rank batch size")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    p.add_argument("--cases", default="all",
                   help="comma list of: decode_sz64, anchor64, decode_sz64_bf16, decode_sz64_ws2, full_grid")
    p.add_argument("--full-grid", action="store_true",
                   help="also run DECODE-SZ at 113x137x113 bf16 (default on when a GPU is present)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    workers = a.workers if a.workers is not None else (4 if gpu else 0)
    a.work.mkdir(parents=True, exist_ok=True)
    store = a.store or build_store(a.work, 6.0)
    common = [f"train.batch_size={a.batch}", f"data.num_workers={workers}"]
    g64 = "data.grid=[64,64,64]"
    cases = {
        "decode_sz64": (1, [g64, *common], ["--precision", "fp32"]),
        "anchor64": (1, common, ["--model", "anchor2022", "--precision", "fp32"]),
        "decode_sz64_bf16": (1, [g64, *common], ["--precision", "bf16"]),
        "decode_sz64_ws2": (2, [g64, *common], ["--precision", "fp32"]),
    }
    wanted = list(cases) + ["full_grid"] if a.cases == "all" else a.cases.split(",")
    results = []
    for name in wanted:
        if name == "full_grid":
            if not (gpu or a.full_grid):
                continue
            full = a.store or build_store(a.work, 1.5)
            spec = (1, [*common], ["--precision", "bf16"])
            results.append(run_case(name, full, a.work, spec[0], a.steps, a.threads, spec[1], spec[2]))
        else:
            world, sets, extra = cases[name]
            results.append(run_case(name, store, a.work, world, a.steps, a.threads, sets, extra))
        r = results[-1]
        print(f"{r['case']:18s} {r['model']:10s} {r['grid']:12s} {r['precision']:5s} ws={r['world_size']} "
              f"batch={r['global_batch']:<3d} params={r['n_parameters']:>12,d}  {r['volumes_per_s']:8.2f} vol/s  "
              f"step {r['step_s']:.3f} s  data-wait {100 * r['data_wait_share']:5.1f} %  "
              f"peak RSS {r['peak_rss_mb_rank0']:8.0f} MiB" +
              (f"  GPU peak {r['gpu_peak_mb_rank0']:.0f} MiB" if r["gpu_peak_mb_rank0"] else ""), flush=True)
    by = {r["case"]: r for r in results}

    def ratio(x: str, y: str, key: str = "volumes_per_s") -> str:
        return f"{by[x][key] / by[y][key]:.2f}x" if x in by and y in by else "n/a"

    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores), {a.threads} thread(s)/rank"
    print(f"\nmachine: {device}")
    print(f"DECODE-SZ / anchor throughput at 64^3: {ratio('decode_sz64', 'anchor64')}; "
          f"peak memory anchor / DECODE-SZ: {ratio('anchor64', 'decode_sz64', 'peak_rss_mb_rank0')}")
    print(f"bf16 / fp32 throughput: {ratio('decode_sz64_bf16', 'decode_sz64')}")
    print(f"world size 2 / 1 throughput: {ratio('decode_sz64_ws2', 'decode_sz64')}")
    if a.out:
        a.out.write_text(json.dumps({"machine": device, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
