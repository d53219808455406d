"""The GPU path, measured: ``bash benchmarks/gpu_check.sh OUT.json`` (this is its Python part).

One training-step benchmark of the default model (``RunConfig()``, the ``gpu`` profile) built and stepped by the
trainer's own code: :class:`~dist_decode.train.inputs.FoldInputs` (the real data pipeline on a synthetic packed
store), :func:`~dist_decode.train.engine.build_engine` (``build_model`` + client AdamW + ``deepspeed.initialize``)
and :class:`~dist_decode.train.step.Stepper` (forward, loss, DeepSpeed backward/step, TC discriminator step).

Cases (each: its own engine, ``--warmup`` steps not timed, then ``--steps`` timed steps with
``torch.cuda.synchronize()`` around every step; median step time, peak GPU memory of the case):

* ``fp32``              fp32, ZeRO 1 (the default stage);
* ``bf16``              bf16 as the trainer does it (DeepSpeed ``bf16`` weights + fp32 master copy, input cast
                        to bf16; the trainer uses no autocast), ZeRO 1;
* ``bf16_channels_last`` bf16 with the input batch in ``torch.channels_last_3d`` (convolutions then keep their
                        outputs in it; the weights stay in DeepSpeed's contiguous buffers: DeepSpeed 0.19's
                        ``_broadcast_model`` views bf16 parameters as bytes and rejects channels-last weights);
* ``bf16_compile``      bf16 with ``engine.compile()`` (``torch.compile``, inductor on GPU);
* ``bf16_zero2``        bf16, ZeRO 2 (world size 1);
* ``bf16_loader``       bf16, ZeRO 1, batches from the store through the trainer's DataLoader path every step
                        (no in-memory cache): ``gpu_idle_fraction`` = time waiting for the next batch / step time.

The compute cases reuse one batch already on the device, so they measure the model only. On a machine without
CUDA the same code runs at a tiny size (6 mm store, small channels, a few steps) and the JSON lists in
``skipped`` what could not be measured and why. The JSON is rewritten after every case, so a run cut short by
the time budget still leaves the cases it finished.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("fp32", "bf16", "bf16_channels_last", "bf16_compile", "bf16_zero2", "bf16_loader")
#: Model settings of the CPU mode (the GPU mode uses the defaults).
CPU_MODEL = ["model.channels=[4, 8]", "model.hidden=16", "model.bottleneck=4", "model.norm_groups=2"]


def case_spec(name: str) -> dict:
    """Precision, ZeRO stage and switches of a case name."""
    return {"precision": "fp32" if name == "fp32" else "bf16", "zero_stage": 2 if name.endswith("zero2") else 1,
            "channels_last": name.endswith("channels_last"), "compile": name.endswith("compile"),
            "loader": name.endswith("loader")}


def build_store(work: Path, voxel_mm: float, sites: int, per_site: int, n_jobs: int | None) -> Path:
    """A small synthetic cohort packed into a store (``data_prep.synth`` + ``data_prep.pack``), cached in ``work``."""
    from data_prep.pack import pack
    from data_prep.synth import synthesize

    tag = f"{voxel_mm:g}mm_{sites}x{per_site}"
    store = work / f"store_{tag}"
    if (store / "manifest.json").is_file():
        return store
    cohort = work / f"cohort_{tag}"
    synthesize(cohort, preset="tiny", seed=0, voxel_mm=voxel_mm, n_jobs=n_jobs, progress=False, sites=sites,
               subjects_per_site=per_site)
    pack(cohort, cohort / "participants.tsv", store, progress=False, n_jobs=n_jobs or 1)
    return store


def conv_weights_channels_last(module) -> bool | None:
    """Whether every 5-D weight of ``module`` is in ``channels_last_3d`` (None: it has none)."""
    import torch

    w = [p for p in module.parameters() if p.dim() == 5]
    return all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in w) if w else None


def run_case(name: str, base_cfg, inputs, noise_var: float, device, cuda: bool, warmup: int, steps: int,
             compile_backend: str | None) -> dict:
    """Build the case's engine, step it ``warmup + steps`` times and summarise the timed steps."""
    import torch
    from dist_decode.config import override
    from dist_decode.data import BalancedBatchSampler
    from dist_decode.train.engine import build_engine
    from dist_decode.train.step import Stepper

    spec = case_spec(name)
    cfg = override(base_cfg, [f'train.precision="{spec["precision"]}"', f"train.zero_stage={spec['zero_stage']}"])
    t_build = time.perf_counter()
    before_mb = None
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before_mb = torch.cuda.memory_allocated(device) / 2 ** 20  # left over by earlier cases (inputs, leaks)
    parts = build_engine(cfg, inputs.grid, inputs.input_scale, inputs.mask, inputs.voxel_mm, 1, spec["precision"],
                         device)
    if spec["compile"]:
        parts.engine.compile(backend=compile_backend)
    stepper = Stepper(cfg, parts, inputs.mask_index, noise_var, 0, 1, device)
    n = warmup + steps
    sampler = BalancedBatchSampler(inputs.is_patient[inputs.plan.train], cfg.train.batch_size, cfg.seed, 0, 1,
                                   steps=n)
    batches = inputs.training_batches(sampler)
    if spec["loader"]:
        get = lambda: next(batches)  # noqa: E731 - the trainer's path: read, normalise, move, every step
    else:
        fixed = next(batches)  # one batch on the device, reused: the model alone
        get = lambda: fixed  # noqa: E731
    fmt = torch.channels_last_3d if spec["channels_last"] else torch.contiguous_format
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    waits, totals, first = [], [], None
    t_loop = time.perf_counter()
    for k in range(n):
        sync()
        t0 = time.perf_counter()
        x, patient = get()
        x = x.to(parts.dtype).contiguous(memory_format=fmt)
        sync()
        t1 = time.perf_counter()
        rec, _ = stepper.step(x, patient, k, False, t1 - t0)
        sync()
        t2 = time.perf_counter()
        if not math.isfinite(rec["total"]):
            raise FloatingPointError(f"{name}: loss {rec['total']} at step {k}")
        if k == 0:
            first = t2 - t0
        if k >= warmup:
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    out = {
        "precision": spec["precision"], "zero_stage": spec["zero_stage"], "channels_last_3d": spec["channels_last"],
        "compile": compile_backend if spec["compile"] else None, "loader": spec["loader"],
        "batch": cfg.train.batch_size, "warmup_steps": warmup, "timed_steps": steps,
        "first_step_s": first, "step_s": statistics.median(totals), "step_s_min": min(totals),
        "step_s_max": max(totals), "volumes_per_s": cfg.train.batch_size / statistics.median(totals),
        "build_s": t_loop - t_build, "conv_weights_channels_last": conv_weights_channels_last(parts.engine.module),
        "n_parameters": parts.n_parameters, "loss_last": rec["total"],
    }
    if spec["loader"]:
        out["data_wait_s"] = statistics.median(waits)
        out["gpu_idle_fraction"] = sum(waits) / sum(totals)
        out["num_workers"] = cfg.data.num_workers
    if cuda:
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2 ** 20
        out["gpu_allocated_before_mb"] = before_mb
    del parts, stepper
    batches = None  # drop the loader (its workers) before the next case
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for the store (default: a temp dir)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new cases after this many seconds (the shell wrapper kills at its own limit)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 3 on GPU, 1 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the config's 8 on GPU, 2 on CPU)")
    p.add_argument("--voxel-mm", type=float, default=None, help="store grid (default 1.5 mm = 113x137x113 on GPU, "
                   "6 mm on CPU)")
    p.add_argument("--sites", type=int, default=3, help="sites of the synthetic store")
    p.add_argument("--per-site", type=int, default=4, help="subjects per site (half patients)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the loader case "
                   "(default 4 on GPU, 0 on CPU)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="on CPU, run bf16_compile with the inductor backend instead of skipping it")
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from dist_decode.config import profile_config
    from dist_decode.model import loss_kind
    from dist_decode.train import distributed
    from dist_decode.train.inputs import FoldInputs
    from dist_decode.train.plan import plan_fold

    cuda = torch.cuda.is_available() and get_accelerator().device_name() == "cuda"
    steps = a.steps or (10 if cuda else 2)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    voxel_mm = a.voxel_mm or (1.5 if cuda else 6.0)
    workers = a.workers if a.workers is not None else (4 if cuda else 0)
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = set(wanted) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")

    report: dict = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine()),
        "machine": platform.node(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cases": {}, "ratios": {}, "skipped": [], "failed": [],
    }
    skipped = report["skipped"]

    def write() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(a.out)

    compile_backend = "inductor"
    if not cuda:
        skipped.append({"what": "full CAT12 grid (113x137x113), default model widths",
                        "why": "no CUDA device: the same code paths run at a tiny size (%g mm grid, %s)"
                               % (voxel_mm, ", ".join(CPU_MODEL))})
        skipped.append({"what": "gpu_peak_mb (peak GPU memory per case)", "why": "no CUDA device"})
        if not a.cpu_compile:
            compile_backend = "eager"
            skipped.append({"what": "torch.compile with inductor (bf16_compile runs with backend 'eager')",
                            "why": "inductor compiles the 3D CNN's forward and backward for minutes on a CPU; the "
                                   "'eager' backend still traces the model with dynamo through engine.compile()"})
        skipped.append({"what": "bf16 speed-up as a figure of merit",
                        "why": "CPU bf16 convolutions are not what a GPU's tensor cores do; the bf16 cases run "
                               "to keep the path working, their ratio says nothing about a GPU"})
        if not torch.backends.mkldnn.is_available():  # pragma: no cover - every x86 torch build has it
            skipped.append({"what": "bf16 cases", "why": "no oneDNN in this torch build"})
            wanted = [c for c in wanted if c == "fp32"]
    write()

    work_ctx = tempfile.TemporaryDirectory(prefix="gpu_check_") if a.work is None else contextlib.nullcontext(a.work)
    with work_ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        store = build_store(work, voxel_mm, a.sites, a.per_site, None if cuda else 1)
        report["store"] = {"path": str(store), "voxel_mm": voxel_mm, "sites": a.sites, "subjects": a.sites *
                           a.per_site, "build_s": round(time.perf_counter() - t0, 1)}
        sets = ["data.val_fraction=0.0", "data.cache=\"none\"", f"data.num_workers={workers}"]
        if a.batch:
            sets.append(f"train.batch_size={a.batch}")
        elif not cuda:
            sets.append("train.batch_size=2")
        cfg = profile_config("gpu", sets + ([] if cuda else CPU_MODEL))

        env = distributed.setup_env()
        distributed.set_threads(env)
        distributed.init_process_group()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            get_accelerator().set_device(0)
            torch.backends.cudnn.benchmark = True  # as the trainer
        t0 = time.perf_counter()
        run_dir = work / f"run_{store.name}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run directory is bound to one store and config
        plan = plan_fold(store, 0, run_dir, cfg)
        inputs = FoldInputs(plan, cfg, run_dir, device, cuda, progress=False)
        noise_var = (inputs.noise_var(cfg.loss.noise_scale)
                     if cfg.loss.noise == "eigen" and loss_kind(cfg) == "decode_sz" else None)
        report["grid"] = list(inputs.grid)
        report["inputs"] = {"description": inputs.description, "train_subjects": int(len(plan.train)),
                            "setup_s": round(time.perf_counter() - t0, 1)}
        report["model"] = {"name": cfg.model.name, "channels": list(cfg.model.channels), "decoder": cfg.model.decoder,
                           "batch": cfg.train.batch_size, "profile": "gpu" if cuda else "gpu + " + ", ".join(CPU_MODEL)}
        write()

        for name in wanted:
            elapsed = time.perf_counter() - t_start
            if elapsed > a.budget_s:
                skipped.append({"what": f"case {name}", "why": f"time budget: {elapsed:.0f} s of {a.budget_s:.0f} s "
                                "used before it started"})
                write()
                continue
            try:
                r = run_case(name, cfg, inputs, noise_var, device, cuda, warmup, steps,
                             compile_backend if case_spec(name)["compile"] else None)
                report["cases"][name] = r
                print(f"{name:20s} step {r['step_s']:.4f} s  {r['volumes_per_s']:7.2f} vol/s" +
                      (f"  idle {100 * r['gpu_idle_fraction']:.1f} %" if "gpu_idle_fraction" in r else "") +
                      (f"  GPU peak {r['gpu_peak_mb']:.0f} MiB" if "gpu_peak_mb" in r else ""), flush=True)
            except Exception as exc:  # one broken case must not hide the others
                report["failed"].append({"case": name, "error": f"{type(exc).__name__}: {exc}",
                                         "traceback": traceback.format_exc()[-3000:]})
                print(f"{name:20s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            report["ratios"] = ratios(report["cases"])
            write()
    write()
    return 1 if report["failed"] else 0


def ratios(cases: dict) -> dict:
    """Speed-ups (step time of the reference / step time of the case) and memory ratios between cases."""
    out = {}
    pairs = {"bf16_over_fp32_speedup": ("fp32", "bf16"),
             "channels_last_speedup": ("bf16", "bf16_channels_last"),
             "compile_speedup": ("bf16", "bf16_compile"),
             "zero2_over_zero1_speedup": ("bf16", "bf16_zero2"),
             "loader_over_cached_step": ("bf16_loader", "bf16")}
    for key, (ref, case) in pairs.items():
        if ref in cases and case in cases:
            out[key] = cases[ref]["step_s"] / cases[case]["step_s"]
    for key, (a, b) in {"fp32_over_bf16_memory": ("fp32", "bf16"),
                        "zero2_over_zero1_memory": ("bf16_zero2", "bf16")}.items():
        if a in cases and b in cases and "gpu_peak_mb" in cases[a]:
            out[key] = cases[a]["gpu_peak_mb"] / cases[b]["gpu_peak_mb"]
    return out


if __name__ == "__main__":
    sys.exit(main())
