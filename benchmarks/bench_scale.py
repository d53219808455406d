"""Unit costs and peak memory of every stage at demo and paper scale: ``python benchmarks/bench_scale.py``.

For each scale (``--scales``, default ``demo,paper``: the ``data_prep.synth`` presets) it runs, each stage as its own
child process under ``/usr/bin/time -v`` (wall time and peak resident memory of that process):

``synth``  ``python -m data_prep.synth --preset SCALE`` (one process; not a pipeline stage, timed for the record);
``pack``   ``python -m data_prep.pack`` into a store: s/subject, MB/volume on disk, peak RSS;
``train``  ``python -m dist_decode.train --profile gpu`` (the store's full grid) on fold 0 for ``--train-steps``
           steps in fp32 then bf16, stopped once the steps are logged (the feature export after the last step is
           not timed): median s/step after 2 warm-up steps, seconds to the first step (normalisation statistics,
           model build), peak RSS from the trainer's own ``metrics.jsonl``;
``syn``    ``--syn-pairs`` SyN registrations (``dist_decode.maps.jacobian.log_jacobian`` with the run config's SyN
           settings) between two real store volumes of the first site: s/registration, peak RSS (a maps worker);
``group``  the maps stage's group step (``dist_decode.maps.pipeline.site_test_input`` + ``site_group_test``, the run
           config's FWE test) on as many synthetic subject maps as the largest site has patients;
``rsa``    ``python -m dist_decode.rsa`` table mode on every subject of the cohort (its phenotypes, the run config's
           variables, two random 16-d spaces) with 1 and 2 MPI ranks: CPU-s per 1,000 permutations;
``subset`` pack and the group step again on ``--subset-subjects`` / ``--subset-patients`` of the cohort, on the same
           grid: their peak RSS against the full cohort's says whether memory grows with N.

Every stage's figures are cached in ``WORK/results/SCALE/STAGE.json``; a re-run skips cached stages (``--redo``
recomputes some). Cohorts, stores and runs go under ``--work`` (never the repository). The figures go to
``--calibration`` (default ``benchmarks/calibration.json``, :mod:`dist_decode.contracts.calibration`), with the
machine, the commands and the load average at start and end: the development machine is shared.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_scale.py --work /work/scratch/scale
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages come first
    sys.path.insert(0, str(ROOT))

from dist_decode.contracts import calibration  # noqa: E402

log = logging.getLogger("bench_scale")
SCALES = ("demo", "paper")
STAGES = ("synth", "pack", "train", "syn", "group", "rsa", "subset")
PY = sys.executable


# -- running one child, measured ------------------------------------------------------------------------------------
def child_env(threads: int = 1) -> dict[str, str]:
    """The environment of every child: this repository first on the path, ``threads`` threads per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[k] = str(threads)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's CPU op is JIT-built once into the repository's cache (as the tests and bench_train do)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_time_v(path: Path) -> dict[str, float]:
    """Wall seconds and peak RSS (MiB) from a ``/usr/bin/time -v`` report."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size"):
            out["peak_rss_mb"] = int(line.rsplit(":", 1)[1]) / 1024.0
        elif line.startswith("Elapsed (wall clock) time"):
            parts = [float(v) for v in line.rsplit(" ", 1)[1].split(":")]
            out["wall_s"] = sum(v * 60 ** k for k, v in enumerate(reversed(parts)))
    return out


def timed(cmd: list[str], logfile: Path, env: dict[str, str] | None = None,
          stop_when=None, poll_s: float = 1.0) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``; return its wall seconds, peak RSS (MiB) and exit status.

    ``stop_when()`` (polled every ``poll_s``) returning true sends SIGTERM to the command (not to ``time``, which
    then still reports it). Raises RuntimeError on a failure that was not asked for, naming the log file.
    """
    logfile.parent.mkdir(parents=True, exist_ok=True)
    tfile = logfile.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(tfile), *cmd] if Path("/usr/bin/time").exists() else cmd
    log.info("run: %s (log %s)", " ".join(cmd), logfile)
    t0 = time.time()
    with open(logfile, "w") as fh:
        proc = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env or child_env(), cwd=ROOT)
        stopped = 0.0
        while proc.poll() is None:
            time.sleep(poll_s)
            if stop_when is not None and not stopped and stop_when():
                _signal_children(proc.pid, signal.SIGTERM)
                stopped = time.time()
            elif stopped and time.time() - stopped > 15:
                # the trainer checkpoints on SIGTERM and would then export every subject's features: not timed here
                _signal_children(proc.pid, signal.SIGKILL)
    wall = time.time() - t0
    if proc.returncode != 0 and not stopped:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}; see {logfile}")
    out: dict[str, Any] = {"wall_s": wall, "rc": proc.returncode, "stopped": bool(stopped), "command": " ".join(cmd)}
    if tfile.is_file():
        out.update(parse_time_v(tfile))
    return out


def _signal_children(pid: int, sig: int) -> None:
    """Send ``sig`` to the children of ``pid`` (the measured command under ``time``), not to ``time`` itself."""
    import psutil

    for child in psutil.Process(pid).children():
        try:
            child.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


# -- the stages -----------------------------------------------------------------------------------------------------
class Bench:
    """One scale's cohort, store and cached stage results under ``work``."""

    def __init__(self, work: Path, scale: str, args: argparse.Namespace) -> None:
        self.work, self.scale, self.args = work, scale, args
        self.cohort = work / "cohorts" / scale
        self.store = work / "stores" / scale
        self.results = work / "results" / scale
        self.logs = work / "logs"

    def cached(self, stage: str) -> dict | None:
        f = self.results / f"{stage}.json"
        if stage in self.args.redo or not f.is_file():
            return None
        return json.loads(f.read_text())

    def save(self, stage: str, res: dict) -> dict:
        from dist_decode.fsutil import atomic_write_json

        res = {"stage": stage, "scale": self.scale, "load_avg_end": list(os.getloadavg()), **res}
        atomic_write_json(self.results / f"{stage}.json", res)
        log.info("%s %s: %s", self.scale, stage, {k: v for k, v in res.items() if k not in ("command",)})
        return res

    def manifest(self) -> dict:
        from dist_decode.contracts.store import read_manifest

        return read_manifest(self.store)

    def synth(self) -> dict:
        preset_args = ["--preset", self.scale] + (self.args.synth_args.split() if self.args.synth_args else [])
        cmd = [PY, "-m", "data_prep.synth", "--out", str(self.cohort), *preset_args, "--jobs", "1", "--no-progress"]
        done = (self.cohort / "participants.tsv").is_file()
        tfile = self.logs / f"synth_{self.scale}.time"
        if done and tfile.is_file():  # synthesized earlier (by this script or by hand with the same command)
            res = {"command": " ".join(cmd) + "  (earlier run)", **parse_time_v(tfile)}
        elif done:
            res = {"command": " ".join(cmd), "wall_s": None, "note": "cohort existed; synthesis not timed"}
        else:
            res = timed(cmd, self.logs / f"synth_{self.scale}.log")
        n = sum(1 for _ in open(self.cohort / "participants.tsv")) - 1
        res["subjects"] = n
        res["s_per_subject"] = res["wall_s"] / n if res.get("wall_s") else None
        return self.save("synth", res)

    def pack(self) -> dict:
        shutil.rmtree(self.store, ignore_errors=True)  # a resumed pack would time only its remainder
        cmd = [PY, "-m", "data_prep.pack", "--cat12-root", str(self.cohort), "--participants",
               str(self.cohort / "participants.tsv"), "--out", str(self.store), "--jobs", "1", "--no-progress"]
        res = timed(cmd, self.logs / f"pack_{self.scale}.log")
        m = self.manifest()
        n = int(m["n_subjects"])
        nbytes = sum(int(s["bytes"]) for s in m["shards"])
        res.update(subjects=n, grid=m["grid"]["shape"], s_per_subject=res["wall_s"] / n,
                   store_mb_per_volume=nbytes / n / 1e6, store_gb=nbytes / 1e9, mask_voxels=m["mask"]["n_voxels"])
        return self.save("pack", res)

    def train(self) -> dict:
        steps = self.args.train_steps
        out: dict[str, Any] = {"steps": steps, "fold": 0, "threads": 1, "profile": "gpu"}
        norm = None
        for precision in ("fp32", "bf16"):
            run = self.work / "runs" / f"{self.scale}_train_{precision}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            if norm is not None:  # the normalisation statistics are the run's, not the precision's: reuse them
                shutil.copy2(norm, run / "normalisation.h5")
            metrics = run / "folds"
            started = time.time()
            first: dict[str, float] = {}

            def n_steps() -> int:
                files = list(metrics.glob("*/metrics.jsonl"))
                if not files:
                    return 0
                k = sum(1 for line in files[0].read_text().splitlines() if '"kind": "train"' in line)
                if k and "t" not in first:
                    first["t"] = time.time() - started
                return k

            cmd = [PY, "-m", "dist_decode.train", "--store", str(self.store), "--fold", "0", "--run-dir", str(run),
                   "--profile", "gpu", "--steps", str(steps), "--precision", precision,
                   "--set", f"train.checkpoint_every={steps}", "--set", "train.log_every=1",
                   "--set", "train.feature_samples=1"]
            if self.args.train_batch:
                cmd += ["--set", f"train.batch_size={self.args.train_batch}"]
            res = timed(cmd, self.logs / f"train_{self.scale}_{precision}.log", stop_when=lambda: n_steps() >= steps)
            recs = [json.loads(x) for x in next(metrics.glob("*/metrics.jsonl")).read_text().splitlines()]
            info = next(r for r in recs if r["kind"] == "info")
            train = [r for r in recs if r["kind"] == "train"]
            if len(train) < 3:
                raise RuntimeError(f"train {precision}: only {len(train)} steps logged; see the log")
            timed_steps = train[2:]
            step_s = statistics.median(r["step_s"] for r in timed_steps)
            out[precision] = {"s_per_step": step_s, "step_s_all": [round(r["step_s"], 3) for r in train],
                              "s_to_first_step": first.get("t", 0.0) - train[0]["step_s"],
                              # the trainer's own figure, or time's (the whole process) when larger
                              "peak_rss_mb": max([r["max_rss_mb"] for r in train] + [res.get("peak_rss_mb", 0.0)]),
                              "peak_rss_mb_time_v": res.get("peak_rss_mb"), "command": res["command"],
                              "normalisation_reused": norm is not None}
            out.update(grid=info["grid"], model=info["model"], n_parameters=info["n_parameters"],
                       batch_size=json.loads(next(metrics.glob("*/config.json")).read_text())["train"]["batch_size"])
            norm = run / "normalisation.h5"
            log.info("%s train %s: %.2f s/step", self.scale, precision, step_s)
        out["peak_rss_mb"] = max(out[p]["peak_rss_mb"] for p in ("fp32", "bf16"))
        return self.save("train", out)

    def syn(self) -> dict:
        pairs = self.args.syn_pairs if self.scale == "paper" else min(self.args.syn_pairs, 2)
        out_json = self.results / "syn_child.json"
        cmd = [PY, str(Path(__file__).resolve()), "_syn", "--store", str(self.store), "--pairs", str(pairs),
               "--child-out", str(out_json)]
        res = timed(cmd, self.logs / f"syn_{self.scale}.log")
        res.update(json.loads(out_json.read_text()))
        return self.save("syn", res)

    def group(self) -> dict:
        m = self.manifest()
        from dist_decode.contracts.store import fold_sites

        label = m["labels"].get("patient_label", "SZ") if isinstance(m.get("labels"), dict) else "SZ"
        n = max(int(m["counts"][s].get(label, 0)) for s in fold_sites(m))
        data = self.work / "maps_input" / self.scale
        subprocess.run([PY, str(Path(__file__).resolve()), "_groupdata", "--store", str(self.store), "--n", str(n),
                        "--dir", str(data)], check=True, env=child_env(), cwd=ROOT)
        res: dict[str, Any] = {"patients": n}
        for how in ("stream", "stack"):  # stack: the group step before it streamed (for the record)
            out_json = self.results / f"group_{how}_child.json"
            cmd = [PY, str(Path(__file__).resolve()), "_group", "--store", str(self.store), "--dir", str(data),
                   "--n", str(n), "--how", how, "--child-out", str(out_json)]
            r = timed(cmd, self.logs / f"group_{self.scale}_{how}.log")
            r.update(json.loads(out_json.read_text()))
            res[how] = r
        res["peak_rss_mb"] = res["stream"]["peak_rss_mb"]
        res["s_per_patient"] = res["stream"]["seconds"] / n
        return self.save("group", res)

    def rsa(self) -> dict:
        import numpy as np

        from dist_decode.config import RSAConfig

        tsv = self.cohort / "participants.tsv"
        rows = [line.split("\t") for line in tsv.read_text().splitlines()]
        header, rows = rows[0], rows[1:]
        n = len(rows)
        variables = [v for v in RSAConfig().variables if v.split(":")[0] in header]
        tmp = self.work / "rsa_input" / self.scale
        tmp.mkdir(parents=True, exist_ok=True)
        import h5py

        rng = np.random.default_rng(3)
        with h5py.File(tmp / "F.h5", "w") as f:
            f.create_dataset("participant_id", data=np.array([r[0] for r in rows], dtype=object),
                             dtype=h5py.string_dtype())
            for space in ("C", "S"):
                f[space] = rng.normal(size=(n, 16))
        shutil.copy2(tsv, tmp / "P.tsv")
        perms = self.args.rsa_permutations
        exe = Path(PY).parent / "mpiexec"
        res: dict[str, Any] = {"n": n, "permutations": perms, "variables": variables, "spaces": 2}
        for ranks in (1, 2):
            cmd = [PY, "-m", "dist_decode.rsa", "--features", str(tmp / "F.h5"), "--phenotypes", str(tmp / "P.tsv"),
                   "--variables", ",".join(variables), "--permutations", str(perms), "--block-size",
                   str(max(1, perms // 8)), "--out", str(tmp / f"out{ranks}"), "--no-progress", "--force"]
            if ranks > 1:
                cmd = [str(exe), "-n", str(ranks), *cmd, "--expect-ranks", str(ranks)]
            r = timed(cmd, self.logs / f"rsa_{self.scale}_{ranks}.log")
            doc = json.loads((tmp / f"out{ranks}" / "rsa.json").read_text())
            cpu = doc["cpu_s_per_rank"]
            r.update(analysis_wall_s=doc["wall_s"], cpu_s_per_rank=cpu, tests=len(doc["results"]),
                     cpu_s_per_1000_permutations=1000 * sum(cpu) / perms)
            res[str(ranks)] = r
        res["identical_results"] = (tmp / "out1" / "rsa.csv").read_bytes() == (tmp / "out2" / "rsa.csv").read_bytes()
        res["tests"] = res["1"]["tests"]
        res["peak_rss_mb"] = max(res["1"].get("peak_rss_mb", 0), res["2"].get("peak_rss_mb", 0))
        return self.save("rsa", res)


    def subset(self) -> dict:
        """Pack and the group step again on a subset of this cohort, on the same grid: does memory grow with N?"""
        k = self.args.subset_subjects
        lines = (self.cohort / "participants.tsv").read_text().splitlines()
        sub = self.work / "subset" / self.scale
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
        (sub / "participants.tsv").write_text("\n".join(lines[:k + 1]) + "\n")
        cmd = [PY, "-m", "data_prep.pack", "--cat12-root", str(self.cohort), "--participants",
               str(sub / "participants.tsv"), "--out", str(sub / "store"), "--jobs", "1", "--no-progress"]
        pack = timed(cmd, self.logs / f"pack_{self.scale}_subset.log")
        from dist_decode.contracts.store import read_manifest

        n_sub = int(read_manifest(sub / "store")["n_subjects"])
        full = self.cached("group") or self.group()  # its maps are the input (the first n_pat of them)
        n_pat = max(3, min(self.args.subset_patients, full["patients"]))
        out_json = self.results / "group_subset_child.json"
        data = self.work / "maps_input" / self.scale
        cmd = [PY, str(Path(__file__).resolve()), "_group", "--store", str(self.store), "--dir", str(data),
               "--n", str(n_pat), "--how", "stream", "--child-out", str(out_json)]
        group = timed(cmd, self.logs / f"group_{self.scale}_subset.log")
        group.update(json.loads(out_json.read_text()))
        shutil.rmtree(sub / "store", ignore_errors=True)
        return self.save("subset", {"pack": {**pack, "subjects": n_sub}, "group": group,
                                    "full_pack_subjects": (self.cached("pack") or {}).get("subjects"),
                                    "full_group_patients": full["patients"]})


# -- children (run in their own process so /usr/bin/time measures them alone) ----------------------------------------
def child_syn(store_path: Path, pairs: int, out: Path) -> None:
    """Register ``pairs`` (control -> patient) volume pairs of the store's first site with the run config's SyN."""
    import numpy as np

    from dist_decode.config import RunConfig
    from dist_decode.data import Store
    from dist_decode.maps.pipeline import syn_settings
    from dist_decode.maps.jacobian import log_jacobian

    st = Store.open(store_path)
    site = np.asarray(st.site_of) == st.sites[0]
    pat = np.asarray(st.is_patient, bool)
    patients, controls = np.flatnonzero(site & pat)[:pairs], np.flatnonzero(site & ~pat)[:pairs]
    mc = RunConfig().maps
    seconds = []
    for k, (i, j) in enumerate(zip(controls, patients)):
        twin, recon = st.read(int(i)).astype(np.float32), st.read(int(j)).astype(np.float32)
        t0 = time.perf_counter()
        log_jacobian(twin, recon, np.asarray(st.affine, float), syn_settings(mc, seed=k))
        seconds.append(time.perf_counter() - t0)
    out.write_text(json.dumps({"registrations": len(seconds), "seconds": seconds,
                               "s_per_registration": statistics.median(seconds), "grid": list(st.grid_shape),
                               "iterations": list(mc.syn_iterations), "metric": mc.syn_metric}))


def child_groupdata(store_path: Path, n: int, folder: Path) -> None:
    """Write ``n`` synthetic effect and deviation maps on the store grid (noise plus one atrophic blob), once."""
    import numpy as np

    from dist_decode.data import Store
    from dist_decode.fsutil import save_nifti

    st = Store.open(store_path)
    shape, aff = tuple(st.grid_shape), np.asarray(st.affine, float)
    mask = np.asarray(st.mask) > 0
    rng = np.random.default_rng(0)
    c = np.array(shape) // 2
    d2 = ((np.indices(shape) - c[:, None, None, None]) ** 2).sum(0)
    blob = (-0.05 * np.exp(-d2 / (2 * (6.0 / float(np.mean(np.abs(np.diag(aff)[:3])))) ** 2))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        for what in ("effect", "deviation"):
            f = folder / f"p{i:04d}_{what}.nii.gz"
            if not f.is_file():
                save_nifti(f, ((rng.normal(0, 0.03, shape).astype(np.float32) + blob) * mask), aff)


def child_group(store_path: Path, folder: Path, n: int, how: str, out: Path) -> None:
    """The maps stage's group step on ``n`` maps: ``stream`` (the stage's code) or ``stack`` (full stacks, as before)."""
    import numpy as np
    from nibabel.affines import voxel_sizes

    from dist_decode.config import RunConfig
    from dist_decode.data import Store
    from dist_decode.maps.group import site_group_map, site_group_test, smooth_maps
    from dist_decode.maps.pipeline import load_nifti, site_test_input

    st = Store.open(store_path)
    mask, aff = np.asarray(st.mask) > 0, np.asarray(st.affine, float)
    mc = RunConfig().maps
    level = mc.fdr_q if mc.threshold == "fdr" else mc.fwe_alpha
    paths = {w: [folder / f"p{i:04d}_{w}.nii.gz" for i in range(n)] for w in ("effect", "deviation")}
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    if how == "stream":
        x, _ = site_test_input(paths, mc.test_on, mask, mc.smooth_fwhm_mm, aff)
        g = site_group_test(x, mask, mc.threshold, level, mc.permutations, rng, mc.variance_smoothing_mm,
                            voxel_sizes(aff))
    else:
        stacks = {w: smooth_maps(np.stack([load_nifti(p).astype(np.float32) for p in ps]), mc.smooth_fwhm_mm,
                                 voxel_sizes(aff)) for w, ps in paths.items()}
        g = site_group_map(stacks[mc.test_on], mask, mc.threshold, level, mc.permutations, rng,
                           mc.variance_smoothing_mm, voxel_sizes(aff))
        _ = stacks["effect"].mean(axis=0), stacks["deviation"].mean(axis=0)
    out.write_text(json.dumps({"seconds": time.perf_counter() - t0, "n": n, "threshold": mc.threshold,
                               "permutations": mc.permutations, "n_significant": g.info["n_significant"],
                               "mask_voxels": int(mask.sum())}))


# -- calibration ----------------------------------------------------------------------------------------------------
def normalisation_seconds(train_log: Path) -> tuple[int, float] | None:
    """(subjects, seconds) of the normalisation statistics pass logged by the trainer, or None."""
    import re

    if not train_log.is_file():
        return None
    m = re.search(r"normalisation statistics of (\d+) subjects .* \(([\d.]+) s\)", train_log.read_text())
    return (int(m.group(1)), float(m.group(2))) if m else None


def build_calibration(results: dict[str, dict[str, dict]], command: str, load_start: list[float],
                      logs: Path | None = None) -> dict:
    """The calibration document from the stage results (unit costs from the largest scale measured)."""
    scale = "paper" if "paper" in results else next(iter(results))
    r = results[scale]

    def need(stage: str) -> dict:
        if stage not in r:
            raise ValueError(f"no {stage} result at scale {scale}; run that stage (it is needed for the calibration)")
        return r[stage]

    pack, train, syn, group, rsa = (need(s) for s in ("pack", "train", "syn", "group", "rsa"))
    units = {
        "pack_s_per_subject": pack["s_per_subject"], "store_mb_per_volume": pack["store_mb_per_volume"],
        "pack_grid": pack["grid"], "pack_jobs": 1,
        "train_s_per_step": {p: train[p]["s_per_step"] for p in ("fp32", "bf16")},
        "train_batch_size": train["batch_size"], "train_grid": train["grid"], "train_threads": train["threads"],
        # model build, DeepSpeed start, input scale: the bf16 run, whose normalisation statistics were reused
        "train_s_to_first_step": train["bf16"]["s_to_first_step"],
        "normalise_s_per_subject": None, "train_model": train["model"], "train_profile": train.get("profile", "gpu"),
        "train_n_parameters": train["n_parameters"],
        "gpu_s_per_step": {"fp32": None, "bf16": None},
        "syn_s_per_registration": syn["s_per_registration"], "syn_grid": syn["grid"],
        "syn_iterations": syn["iterations"], "syn_threads": 1,
        "group_s_per_patient": group["s_per_patient"], "group_grid": pack["grid"],
        "group_permutations": group["stream"]["permutations"],
        "rsa_s_per_1000_permutations_per_rank": {k: rsa[k]["cpu_s_per_1000_permutations"] for k in ("1", "2")},
        "rsa_n": rsa["n"], "rsa_tests": rsa["tests"],
    }
    norm = normalisation_seconds(logs / f"train_{scale}_fp32.log") if logs is not None else None
    if norm is not None:
        units["normalise_s_per_subject"] = norm[1] / norm[0]
    peak = {s: {st: res.get("peak_rss_mb") for st, res in stages.items() if st not in ("synth", "subset")}
            for s, stages in results.items()}
    for s, stages in results.items():
        if "subset" in stages:  # the same grid, fewer subjects / patients
            peak[s]["pack_subset"] = stages["subset"]["pack"].get("peak_rss_mb")
            peak[s]["group_subset"] = stages["subset"]["group"].get("peak_rss_mb")
    scales = {s: {"subjects": stages.get("pack", {}).get("subjects"), "grid": stages.get("pack", {}).get("grid"),
                  "largest_site_patients": stages.get("group", {}).get("patients"),
                  "subset_subjects": stages.get("subset", {}).get("pack", {}).get("subjects"),
                  "subset_patients": stages.get("subset", {}).get("group", {}).get("n")}
              for s, stages in results.items()}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
            "machine": calibration.machine_info(), "load_avg": {"start": load_start, "end": list(os.getloadavg()),
                         "note": "of this invocation; each stage's own is stages.SCALE.STAGE.load_avg_end"},
            "shared_machine": True, "units": units, "peak_rss_mb": peak, "scales": scales, "stages": results}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("_"):  # a measured child
        p = argparse.ArgumentParser(prog="bench_scale.py " + argv[0])
        p.add_argument("--store", type=Path, required=True)
        p.add_argument("--pairs", type=int, default=2)
        p.add_argument("--n", type=int, default=3)
        p.add_argument("--dir", type=Path)
        p.add_argument("--how", default="stream")
        p.add_argument("--child-out", type=Path)
        a = p.parse_args(argv[1:])
        if argv[0] == "_syn":
            child_syn(a.store, a.pairs, a.child_out)
        elif argv[0] == "_groupdata":
            child_groupdata(a.store, a.n, a.dir)
        elif argv[0] == "_group":
            child_group(a.store, a.dir, a.n, a.how, a.child_out)
        else:
            p.error(f"unknown child {argv[0]}")
        return 0

    p = argparse.ArgumentParser(prog="python benchmarks/bench_scale.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/work/scratch/scale"),
                   help="cohorts, stores, runs, logs and cached results (default /work/scratch/scale)")
    p.add_argument("--scales", default="demo,paper", help="synth presets to measure (default demo,paper)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip, of {','.join(STAGES)}")
    p.add_argument("--redo", default="", help="comma-separated stages to recompute although cached")
    p.add_argument("--synth-args", default="", help="extra data_prep.synth arguments (e.g. for a tiny test cohort)")
    p.add_argument("--train-steps", type=int, default=20, help="training steps per precision (default 20)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="train.batch_size of the timed steps (default: the gpu profile's); the planner scales "
                   "s/step linearly to the run's batch size")
    p.add_argument("--syn-pairs", type=int, default=3, help="SyN registrations at paper scale (default 3)")
    p.add_argument("--rsa-permutations", type=int, default=1000, help="RSA permutations (default 1000)")
    p.add_argument("--subset-subjects", type=int, default=150,
                   help="subset stage: pack this many of the cohort's subjects on the same grid (default 150)")
    p.add_argument("--subset-patients", type=int, default=15,
                   help="subset stage: group step on this many patients' maps (default 15, the demo's largest site)")
    p.add_argument("--calibration", type=Path, default=ROOT / "benchmarks" / "calibration.json",
                   help="calibration file to write (default benchmarks/calibration.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    from dist_decode.cli import setup_logging

    setup_logging(a.verbose)
    a.redo = {s for s in a.redo.split(",") if s}
    skip = {s for s in a.skip.split(",") if s}
    bad = (skip | a.redo) - set(STAGES)
    if bad:
        p.error(f"unknown stage(s) {sorted(bad)}; stages: {','.join(STAGES)}")
    load_start = list(os.getloadavg())
    results: dict[str, dict[str, dict]] = {}
    try:
        for scale in [s for s in a.scales.split(",") if s]:
            b = Bench(a.work.absolute(), scale, a)
            results[scale] = {}
            for stage in STAGES:
                res = b.cached(stage)
                if res is None and stage not in skip:
                    res = getattr(b, stage)()
                if res is not None:
                    results[scale][stage] = res
        cal = build_calibration(results, "python benchmarks/bench_scale.py " + " ".join(argv), load_start,
                                a.work.absolute() / "logs")
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    calibration.write_calibration(a.calibration, cal)
    u = cal["units"]
    print(f"machine: {cal['machine']['hostname']}, {cal['machine']['cpu_model']}, {cal['machine']['cores']} cores "
          f"(shared; load {load_start[0]:.2f} -> {cal['load_avg']['end'][0]:.2f}); one thread per process")
    print(f"pack        {u['pack_s_per_subject']:.3f} s/subject, {u['store_mb_per_volume']:.2f} MB/volume "
          f"({'x'.join(map(str, u['pack_grid']))})")
    print(f"train       {u['train_s_per_step']['fp32']:.2f} s/step fp32, {u['train_s_per_step']['bf16']:.2f} s/step "
          f"bf16 (batch {u['train_batch_size']}, {'x'.join(map(str, u['train_grid']))}, 1 thread)")
    print(f"maps SyN    {u['syn_s_per_registration']:.1f} s/registration ({'x'.join(map(str, u['syn_grid']))}, "
          f"iterations {u['syn_iterations']})")
    print(f"maps group  {u['group_s_per_patient']:.2f} s/patient")
    print(f"rsa         {u['rsa_s_per_1000_permutations_per_rank']['1']:.1f} CPU-s per 1,000 permutations "
          f"(1 rank), {u['rsa_s_per_1000_permutations_per_rank']['2']:.1f} (2 ranks), N={u['rsa_n']}, "
          f"{u['rsa_tests']} tests")
    print("peak RSS (MiB):")
    for scale, stages in cal["peak_rss_mb"].items():
        print(f"  {scale:6s} " + "  ".join(f"{k} {v:.0f}" for k, v in stages.items() if v is not None))
    print(f"wrote {a.calibration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
