"""The maps stage: per-patient healthy-twin maps -> per-site group maps -> overlap, Dice and clusters.

Layout under ``RUN/maps/`` (each file written under a temporary name and renamed):

``subjects/<site>/<participant_id>_effect.nii.gz``
    The decoded schizophrenia-specific map: ``log(recon / twin)`` in grey-matter density units
    (``maps.kind = "density"``) or the log Jacobian of the SyN registration twin -> recon (``"jacobian"``).
``subjects/<site>/<participant_id>_deviation.nii.gz``
    The patient's observed volume against the healthy twin: ``log(observed / twin)`` (or SyN twin -> observed).
``subjects/settings.json``
    The settings that produced the subject maps (a re-run with other settings refuses to mix them).
``sites/<site>/{mean_effect,mean_deviation,t,p,signed,binary}.nii.gz`` and ``sites/<site>/group.json``
    The held-out site's group test (of ``maps.test_on``) and the kept extent (``maps.extent``); ``group.json``
    (written last) records n, method, level and threshold.
``overlap.nii.gz`` (+ ``overlap_atrophy.nii.gz``, ``overlap_expansion.nii.gz``), ``dice.csv``, ``clusters.csv``,
``maps.json``
    Across sites. ``overlap.nii.gz`` is the stage's completion file; ``maps.json`` lists the sites included and
    the folds that were missing, so a later run with more finished folds recomputes them.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from tqdm import tqdm

from nibabel.affines import voxel_sizes

from dist_decode.config import MapsConfig, RunConfig
from dist_decode.contracts.run import RunDir
from dist_decode.fsutil import atomic_path, atomic_write_json, save_nifti
from dist_decode.maps.density import MapSpace, log_ratio
from dist_decode.maps.group import half_max_extent, site_group_test, smooth_maps
from dist_decode.maps.jacobian import SynSettings, log_jacobian
from dist_decode.maps.overlap import Atlas, cluster_table, dice_matrix, overlap_count
from dist_decode.maps.twins import decode_pairs, read_held_out
from dist_decode.model import load_fold_model

log = logging.getLogger("dist_decode.maps")

GROUP_FILES = ("mean_effect", "mean_deviation", "t", "p", "signed", "binary")
MAP_KINDS = ("auto", "density", "jacobian")


# -- small helpers ----------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A file-name-safe version of a participant id or site."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


def load_nifti(path: Path) -> np.ndarray:
    """The data array of a NIfTI file."""
    return np.asarray(nib.load(str(path)).dataobj)


def resolve_kind(mc: MapsConfig) -> str:
    """``maps.kind`` with ``auto`` resolved: ``density``, as the store holds modulated (mwp1) maps."""
    if mc.kind not in MAP_KINDS:
        raise ValueError(f"maps.kind {mc.kind!r}: expected one of {list(MAP_KINDS)}")
    return "density" if mc.kind == "auto" else mc.kind


def check_settings(mc: MapsConfig) -> None:
    """Raise ValueError naming the field for a maps setting outside its choices."""
    resolve_kind(mc)
    for name, value, choices in (("test_on", mc.test_on, ("deviation", "effect")),
                                 ("extent", mc.extent, ("half_max", "significant")),
                                 ("threshold", mc.threshold, ("fdr", "fwe")),
                                 ("syn_transform", mc.syn_transform, ("SyNOnly", "SyN"))):
        if value not in choices:
            raise ValueError(f"maps.{name} {value!r}: expected one of {list(choices)}")
    if not 0 < mc.extent_fraction < 1:
        raise ValueError(f"maps.extent_fraction {mc.extent_fraction}: expected a value in (0, 1)")


def resolve_shard(spec: str | None) -> tuple[int, int]:
    """Parse ``K/N`` (0-based task K of N) or ``auto`` (MPI rank / SLURM task / array task from the environment).

    Raises
    ------
    ValueError
        For a malformed spec or K outside 0..N-1.
    """
    if spec in (None, "", "0/1"):
        return 0, 1
    if spec == "auto":
        env = os.environ
        for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                                   ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                                   ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_key in env and size_key in env and int(env[size_key]) > 1:
                return int(env[rank_key]), int(env[size_key])
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m:
        raise ValueError(f"--shard {spec!r}: expected K/N (e.g. 0/4) or 'auto'")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {spec!r}: need 0 <= K < N")
    return k, n


def extent_smoothing_mm(cfg: RunConfig) -> float:
    """FWHM (mm) of the smoothing the ``half_max`` extent undoes (``maps.extent_unsmoothed``): the inputs' and the
    maps' own, combined; 0 when off."""
    if not cfg.maps.extent_unsmoothed:
        return 0.0
    return math.hypot(cfg.data.smooth_fwhm_mm, cfg.maps.smooth_fwhm_mm)


def usable_cores() -> int:
    """Cores this process may run on (the SLURM/cgroup CPU set, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _syn_task(out_effect: str, out_deviation: str, twins: np.ndarray, recons: np.ndarray, observed: np.ndarray,
              mask: np.ndarray, affine: np.ndarray, settings: SynSettings, save_volumes: bool) -> tuple[str, float]:
    """Worker (``jacobian`` maps): mean log J of SyN twin -> recon and twin -> observed over the subject's
    decoded (twin, recon) pairs; both written."""
    start = time.perf_counter()
    try:
        effect = np.mean([log_jacobian(t, r, affine, settings) for t, r in zip(twins, recons)], axis=0)
        deviation = np.mean([log_jacobian(t, observed, affine, settings) for t in twins], axis=0)
    except Exception as exc:  # name the subject: a bare ITK/ANTs error says nothing about which one failed
        raise RuntimeError(f"{out_effect}: twin registration failed: {type(exc).__name__}: {exc}") from exc
    _write_subject(Path(out_effect), Path(out_deviation), effect * mask, deviation * mask, twins, recons, affine,
                   save_volumes)
    return out_effect, time.perf_counter() - start


def _write_subject(out_effect: Path, out_deviation: Path, effect: np.ndarray, deviation: np.ndarray,
                   twins: np.ndarray, recons: np.ndarray, affine: np.ndarray, save_volumes: bool) -> None:
    if save_volumes:
        stem = out_effect.name[: -len("_effect.nii.gz")]
        save_nifti(out_effect.with_name(f"{stem}_recon.nii.gz"), np.mean(recons, axis=0), affine)
        save_nifti(out_effect.with_name(f"{stem}_twin.nii.gz"), np.mean(twins, axis=0), affine)
    save_nifti(out_deviation, deviation, affine)
    save_nifti(out_effect, effect, affine)  # last: its presence marks the subject done


def subject_seed(seed: int, fold: int, row: int) -> int:
    """The registration seed of subject ``row`` of fold ``fold`` (``jacobian`` maps)."""
    return int(np.random.SeedSequence([int(seed), int(fold), int(row)]).generate_state(1)[0] % 2**31)


def decoded_subjects(model, c: np.ndarray, s: np.ndarray, pids: list[str], space: MapSpace):
    """Decode subjects' healthy twins and reconstructions and give them, with the observed volumes, in grey-matter
    density units on the store grid.

    Parameters
    ----------
    model : torch.nn.Module
        The fold model (eval mode).
    c, s : ndarray (B, K, d)
        Latents of the B subjects (K = 1 for posterior means, else posterior samples).
    pids : list of str
        Their participant ids in ``space.store``.
    space : MapSpace

    Returns
    -------
    list of (twins, recons, observed)
        Per subject: (K, X, Y, Z), (K, X, Y, Z) and (X, Y, Z) float32 densities.
    """
    nb, k = c.shape[:2]
    shape = space.shape
    recon, twin = decode_pairs(model, c.reshape(nb * k, -1), s.reshape(nb * k, -1), shape)
    recon = recon.reshape((nb, k) + shape)
    twin = twin.reshape((nb, k) + shape)
    observed = space.observed(list(pids))
    return [(space.density(twin[j], pid), space.density(recon[j], pid), space.density(observed[j], pid))
            for j, pid in enumerate(pids)]


def write_subject_maps(kind: str, out_effect: Path, out_deviation: Path, twins: np.ndarray, recons: np.ndarray,
                       observed: np.ndarray, mask: np.ndarray, affine: np.ndarray, mc: MapsConfig, seed: int) -> None:
    """Write one patient's effect and deviation maps (``kind`` ``density`` or ``jacobian``, in this process) from
    its decoded twins and reconstructions and its observed volume (:func:`decoded_subjects`); effect last."""
    if kind == "density":
        effect = np.mean([log_ratio(r, t, mask) for r, t in zip(recons, twins)], axis=0)
        deviation = np.mean([log_ratio(observed, t, mask) for t in twins], axis=0)
        _write_subject(Path(out_effect), Path(out_deviation), effect, deviation, twins, recons, affine,
                       mc.save_volumes)
        return
    _syn_task(str(out_effect), str(out_deviation), twins, recons, observed, mask, affine, syn_settings(mc, seed),
              mc.save_volumes)


# -- run context ------------------------------------------------------------------------------------------------
class MapsRun:
    """What the maps stage knows about a run directory: config, store, finished and missing folds."""

    def __init__(self, run_dir: str | Path, cfg: RunConfig | None = None):
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        self.manifest = self.rundir.manifest()
        self.cfg = cfg if cfg is not None else self.rundir.config()
        self.store = self.rundir.store()
        self.out = self.run_dir / "maps"
        self.affine = np.asarray(self.store.affine, float)
        self.shape = tuple(int(v) for v in self.store.grid_shape)
        ids = [str(p) for p in self.store.participant_ids]
        self.patient_ids = {p for p, pat in zip(ids, np.asarray(self.store.is_patient)) if pat}
        self.expected_sites = self.store.fold_sites
        self.done_sites = [s for s in self.expected_sites if self.rundir.done("fold", s)]
        self.missing_sites = [s for s in self.expected_sites if s not in self.done_sites]
        self.selected = list(self.done_sites)  # folds the subject and group steps work on (--fold narrows it)

    def select_folds(self, folds: list[str]) -> None:
        """Restrict the subject and group steps to these folds (index into the store's sites, or site name).

        Raises
        ------
        ValueError
            For an unknown fold.
        FileNotFoundError
            For a fold that has not finished training.
        """
        chosen = []
        for f in folds:
            site = self.store.sites[int(f)] if str(f).isdigit() and int(f) < len(self.store.sites) else str(f)
            if site not in self.expected_sites:
                raise ValueError(f"fold {f!r}: not a LOSO fold of this run (sites: {', '.join(self.expected_sites)})")
            if site not in self.done_sites:
                raise FileNotFoundError(f"{self.fold_dir(site) / 'DONE'}: fold {f} ({site}) has not finished training")
            chosen.append(site)
        self.selected = [s for s in self.done_sites if s in chosen]

    def fold_dir(self, site: str) -> Path:
        return self.run_dir / "folds" / site

    def site_index(self, site: str) -> int:
        return list(self.store.sites).index(site)

    def subject_path(self, site: str, pid: str, what: str = "effect") -> Path:
        return self.out / "subjects" / safe_name(site) / f"{safe_name(pid)}_{what}.nii.gz"

    def site_dir(self, site: str) -> Path:
        return self.out / "sites" / safe_name(site)


def syn_settings(mc: MapsConfig, seed: int) -> SynSettings:
    return SynSettings(transform=mc.syn_transform, iterations=tuple(mc.syn_iterations),
                       metric=mc.syn_metric, flow_sigma=mc.syn_flow_sigma, total_sigma=mc.syn_total_sigma,
                       seed=seed)


def subject_settings(mc: MapsConfig) -> dict:
    out = {"kind": resolve_kind(mc), "use_samples": mc.use_samples, "n_samples": mc.n_samples if mc.use_samples else 1}
    if out["kind"] == "jacobian":
        out.update(syn_transform=mc.syn_transform, syn_iterations=list(mc.syn_iterations), syn_metric=mc.syn_metric,
                   syn_flow_sigma=mc.syn_flow_sigma, syn_total_sigma=mc.syn_total_sigma)
    return out


# -- stage 1: subject maps --------------------------------------------------------------------------------------
def compute_subject_maps(run: MapsRun, workers: int, shard: tuple[int, int] = (0, 1),
                         load_model: Callable | None = None, force: bool = False,
                         progress: bool = True) -> dict:
    """Decode every held-out patient of every finished fold (this shard's share) and write its effect and
    deviation maps, skipping done ones.

    Returns
    -------
    dict
        ``computed``, ``skipped``, ``seconds_per_subject`` and ``wall_s``.
    """
    mc = run.cfg.maps
    check_settings(mc)
    kind = resolve_kind(mc)
    settings_path = run.out / "subjects" / "settings.json"
    wanted = subject_settings(mc)
    if settings_path.is_file():
        have = json.loads(settings_path.read_text())
        if have != wanted:
            if not force:
                raise ValueError(f"{settings_path}: existing subject maps were made with {have}, the config asks "
                                 f"for {wanted}; use --force to recompute them or a new run directory")
            shutil.rmtree(run.out / "subjects")
    atomic_write_json(settings_path, wanted)

    todo = []  # (site, row-in-held-out, pid) across folds, in a fixed order so shards are reproducible
    held = {}
    for site in run.selected:
        h = read_held_out(run.fold_dir(site) / "features.h5", run.patient_ids, mc.use_samples, mc.n_samples)
        held[site] = h
        todo += [(site, i, pid) for i, pid in enumerate(h.participant_id)]
    mine = [t for k, t in enumerate(todo) if k % shard[1] == shard[0]]
    pending = [t for t in mine if force or not run.subject_path(t[0], t[2]).is_file()]
    stats = {"subjects_total": len(todo), "this_shard": len(mine), "skipped": len(mine) - len(pending),
             "computed": 0, "seconds_per_subject": None, "wall_s": 0.0, "kind": kind}
    if not pending:
        log.info("subject maps: nothing to do (%d in this shard already done)", len(mine))
        return stats
    if load_model is None:
        load_model = load_fold_model

    space = MapSpace(run.run_dir, run.store, run.cfg)
    mask = np.asarray(run.store.mask) > 0
    start = time.perf_counter()
    nworkers = (workers if workers > 0 else usable_cores()) if kind == "jacobian" else 1
    pool = None
    if nworkers > 1:
        pool = cf.ProcessPoolExecutor(max_workers=nworkers, mp_context=mp.get_context("spawn"))
    futures: set[cf.Future] = set()
    seconds: list[float] = []
    bar = tqdm(total=len(pending), desc=f"{kind} maps", unit="subj", disable=not progress)

    def collect(done_futs):
        for fut in done_futs:
            _, sec = fut.result()
            seconds.append(sec)
            bar.update(1)

    try:
        by_site: dict[str, list] = {}
        for site, i, pid in pending:
            by_site.setdefault(site, []).append((i, pid))
        for site, items in by_site.items():
            model, _ = load_model(run.fold_dir(site))
            h = held[site]
            fold_idx = run.site_index(site)
            for b in range(0, len(items), max(1, mc.decode_batch)):
                batch = items[b:b + max(1, mc.decode_batch)]
                rows = np.array([i for i, _ in batch])
                decoded = decoded_subjects(model, h.c[rows], h.s[rows], [pid for _, pid in batch], space)
                for (i, pid), (twins_d, recons_d, obs_d) in zip(batch, decoded):
                    t0 = time.perf_counter()
                    paths = (run.subject_path(site, pid, "effect"), run.subject_path(site, pid, "deviation"))
                    # One seed per (run seed, fold, subject row): the same map on every re-run and shard layout.
                    seed = subject_seed(run.cfg.seed, fold_idx, int(i))
                    if pool is None:
                        write_subject_maps(kind, *paths, twins_d, recons_d, obs_d, mask, run.affine, mc, seed)
                        seconds.append(time.perf_counter() - t0)
                        bar.update(1)
                        continue
                    args = (str(paths[0]), str(paths[1]), twins_d, recons_d, obs_d, mask, run.affine,
                            syn_settings(mc, seed), mc.save_volumes)
                    futures.add(pool.submit(_syn_task, *args))
                    if len(futures) >= 2 * nworkers:  # bound the decoded volumes held in memory
                        done, futures = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
                        collect(done)
            del model
        done, futures = cf.wait(futures)
        collect(done)
    finally:
        bar.close()
        if pool is not None:
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
    stats.update(computed=len(seconds), seconds_per_subject=float(np.mean(seconds)) if seconds else None,
                 wall_s=time.perf_counter() - start)
    log.info("subject maps (%s): %d computed in %.1f s (%.3f s per subject, %d workers)", kind,
             len(seconds), stats["wall_s"], stats["seconds_per_subject"] or 0.0, nworkers)
    return stats


# -- stage 2: per-site group maps -------------------------------------------------------------------------------
def site_test_input(paths: dict[str, list[Path]], test_on: str, mask: np.ndarray, smooth_fwhm_mm: float,
                    affine: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One site's group-test input, read one subject map at a time.

    Parameters
    ----------
    paths : dict
        ``{"effect": [...], "deviation": [...]}``: the site's patients' map files, in the same order.
    test_on : {"effect", "deviation"}
        Which maps the test runs on.
    mask : bool ndarray (X, Y, Z)
    smooth_fwhm_mm : float
        Gaussian FWHM applied to each map (:func:`smooth_maps`; 0 = none).
    affine : ndarray (4, 4)
        Voxel-to-world of the store grid (voxel sizes for the smoothing).

    Returns
    -------
    x : ndarray (n, V) float64
        The smoothed ``test_on`` maps at the mask voxels (what :func:`site_group_test` needs).
    means : dict
        ``effect`` and ``deviation``: the mean smoothed map over the patients, (X, Y, Z) float32.

    Memory is the (n, V) matrix plus a few volumes: never an (n, X, Y, Z) stack (at 1.5 mm that was 7 MB per
    patient per map kind, twice over, for the largest held-out site).
    """
    mask = np.asarray(mask, bool)
    n = len(paths[test_on])
    x = np.empty((n, int(mask.sum())), np.float64)
    sums = {what: np.zeros(mask.shape, np.float64) for what in paths}
    vox = voxel_sizes(affine)
    for what, files in paths.items():
        for i, f in enumerate(files):
            m = load_nifti(f).astype(np.float32)
            if m.shape != mask.shape:
                raise ValueError(f"{f}: map shape {m.shape} is not the store grid {mask.shape}")
            m = smooth_maps(m[None], smooth_fwhm_mm, vox)[0]
            sums[what] += m
            if what == test_on:
                x[i] = m[mask]
    return x, {what: (s / max(n, 1)).astype(np.float32) for what, s in sums.items()}


def compute_group_maps(run: MapsRun, force: bool = False) -> dict[str, dict]:
    """One group map per finished held-out site whose subject maps are all present.

    The test (``maps.threshold``) runs on the patients' ``maps.test_on`` maps; ``maps.extent`` then decides which
    significant voxels the site map keeps, using the mean effect map.

    Returns
    -------
    dict of site -> dict
        The site's ``group.json`` content, or ``{"status": ...}`` explaining why there is no map.
    """
    mc = run.cfg.maps
    check_settings(mc)
    level = mc.fdr_q if mc.threshold == "fdr" else mc.fwe_alpha
    results: dict[str, dict] = {}
    mask = np.asarray(run.store.mask) > 0
    extent_mm = extent_smoothing_mm(run.cfg) if mc.extent == "half_max" else None
    for site in run.selected:
        h = read_held_out(run.fold_dir(site) / "features.h5", run.patient_ids, False)
        pids = h.participant_id
        settings = {"threshold": mc.threshold, "level": level, "smooth_fwhm_mm": mc.smooth_fwhm_mm,
                    "variance_smoothing_mm": mc.variance_smoothing_mm if mc.threshold == "fwe" else None,
                    "permutations": mc.permutations if mc.threshold == "fwe" else None, "test_on": mc.test_on,
                    "extent": mc.extent, "extent_fraction": mc.extent_fraction if mc.extent == "half_max" else None,
                    "extent_smoothing_mm": extent_mm,
                    "counter_ring_noise": bool(extent_mm) and mc.counter_ring_noise,
                    "subjects": subject_settings(mc), "participants": pids}
        gpath = run.site_dir(site) / "group.json"
        if len(pids) < max(3, mc.min_patients):
            results[site] = {"site": site, "status": "too_few_patients", "n": len(pids)}
            log.warning("site %s: %d held-out patients < %d; no group map", site, len(pids), max(3, mc.min_patients))
            continue
        absent = [p for p in pids if not run.subject_path(site, p, "effect").is_file()]
        if absent:
            results[site] = {"site": site, "status": "subject_maps_missing", "n": len(pids), "missing": len(absent)}
            log.warning("site %s: %d of %d subject maps missing (e.g. %s); no group map yet",
                        site, len(absent), len(pids), absent[0])
            continue
        if gpath.is_file() and not force:
            have = json.loads(gpath.read_text())
            if have.get("settings") == settings:
                results[site] = have
                continue
        paths = {what: [run.subject_path(site, p, what) for p in pids] for what in ("effect", "deviation")}
        x, means = site_test_input(paths, mc.test_on, mask, mc.smooth_fwhm_mm, run.affine)
        rng = np.random.default_rng(np.random.SeedSequence([run.cfg.seed, 7919, run.site_index(site)]))
        gm = site_group_test(x, mask, mc.threshold, level, mc.permutations, rng, mc.variance_smoothing_mm,
                             voxel_sizes(run.affine))
        del x
        mean_effect = means["effect"] * mask
        keep = gm.binary > 0
        if mc.extent == "half_max":
            keep = half_max_extent(keep, gm.t, mean_effect, mc.extent_fraction, extent_mm, voxel_sizes(run.affine),
                                   tested=means[mc.test_on] * mask,
                                   tested_se=gm.se if mc.counter_ring_noise else None)
        signed = np.where(keep, gm.t, 0.0).astype(np.float32)
        sdir = run.site_dir(site)
        arrays = {"mean_effect": mean_effect, "mean_deviation": means["deviation"] * mask, "t": gm.t,
                  "p": gm.p, "signed": signed, "binary": keep.astype(np.uint8)}
        for name in GROUP_FILES:
            save_nifti(sdir / f"{name}.nii.gz", arrays[name], run.affine)
        info = {"site": site, "status": "ok", **gm.info, "n_kept": int(keep.sum()),
                "n_kept_negative": int((keep & (gm.t < 0)).sum()), "n_kept_positive": int((keep & (gm.t > 0)).sum()),
                "settings": settings}
        atomic_write_json(gpath, info)
        results[site] = info
        log.info("site %s: n=%d, %d significant voxels (%s %.3g on %s), %d kept (%s)", site, gm.n,
                 gm.info["n_significant"], mc.threshold, level, mc.test_on, int(keep.sum()), mc.extent)
    return results


# -- stage 3: across sites --------------------------------------------------------------------------------------
def compute_overlap(run: MapsRun, groups: dict[str, dict], force: bool = False,
                    timing: dict | None = None) -> dict | None:
    """Overlap count, Dice matrix and cluster table over the sites that have a group map.

    ``timing`` (the subject stage's statistics of this invocation) is recorded in ``maps.json``.
    """
    mc = run.cfg.maps
    sites = [s for s in run.done_sites if groups.get(s, {}).get("status") == "ok"]
    summary_path = run.out / "maps.json"
    if not sites:
        log.warning("no site has a group map yet; overlap not computed")
        return None
    key = {"sites": sites, "groups": {s: groups[s]["settings"] for s in sites},
           "cluster_min_sites": mc.cluster_min_sites, "cluster_min_voxels": mc.cluster_min_voxels,
           "atlases": list(mc.atlases)}
    if (run.out / "overlap.nii.gz").is_file() and summary_path.is_file() and not force:
        have = json.loads(summary_path.read_text())
        if have.get("key") == key:
            log.info("overlap: up to date (%d sites)", len(sites))
            return have
    binaries = {s: load_nifti(run.site_dir(s) / "binary.nii.gz") > 0 for s in sites}
    signed = {s: load_nifti(run.site_dir(s) / "signed.nii.gz").astype(np.float32) for s in sites}
    ov = overlap_count(binaries)
    atrophy = overlap_count({s: signed[s] < 0 for s in sites})
    expansion = overlap_count({s: signed[s] > 0 for s in sites})
    names, dmat = dice_matrix(binaries)
    atlases = [Atlas.load(a) for a in mc.atlases]
    clusters = cluster_table(signed, run.affine, mc.cluster_min_sites, mc.cluster_min_voxels, atlases)

    with atomic_path(run.out / "dice.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["site"] + names)
            for s, row in zip(names, dmat):
                w.writerow([s] + ["" if np.isnan(v) else f"{v:.4f}" for v in row])
    cols = ["cluster", "sign", "size_voxels", "size_mm3", "max_sites", "peak_i", "peak_j", "peak_k", "peak_x",
            "peak_y", "peak_z", "mean_t", "n_sites", "sites"] + [f"label_{a}" for a in mc.atlases]
    with atomic_path(run.out / "clusters.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(clusters)
    save_nifti(run.out / "overlap_atrophy.nii.gz", atrophy, run.affine)
    save_nifti(run.out / "overlap_expansion.nii.gz", expansion, run.affine)
    summary = {
        "key": key,
        "sites": sites,
        "n_sites": len(sites),
        "sites_missing_fold": run.missing_sites,
        "sites_without_group_map": {s: groups[s].get("status") for s in run.done_sites if s not in sites},
        "overlap_max": int(ov.max()),
        "overlap_voxels": {str(k): int((ov >= k).sum()) for k in range(1, len(sites) + 1)},
        "dice": {"sites": names, "matrix": [[None if np.isnan(v) else float(v) for v in r] for r in dmat]},
        "clusters": clusters,
        "groups": {s: {k: v for k, v in groups[s].items() if k != "settings"} for s in run.done_sites if s in groups},
        "config": asdict(mc),
        "timing": timing,
    }
    atomic_write_json(summary_path, summary)
    save_nifti(run.out / "overlap.nii.gz", ov, run.affine)  # last: the stage's completion file
    log.info("overlap over %d sites: max %d, %d clusters", len(sites), int(ov.max()), len(clusters))
    return summary


def run_maps(run_dir: str | Path, cfg: RunConfig | None = None, workers: int | None = None,
             shard: tuple[int, int] = (0, 1), stage: str = "all", load_model: Callable | None = None,
             force: bool = False, progress: bool = True, folds: list[str] | None = None) -> dict:
    """Run the maps stage on a run directory (see the module docstring for the outputs).

    Parameters
    ----------
    run_dir : path
        The run directory (``RUN/``).
    cfg : RunConfig, optional
        Defaults to ``RUN/config.json``.
    workers : int, optional
        Registration processes (default ``cfg.maps.workers``; 0 = one per core; 1 = in this process).
    shard : (int, int)
        ``(k, n)``: this task registers every n-th subject starting at k (MPI ranks, SLURM array tasks).
    stage : {"all", "jacobians", "group"}
        ``jacobians`` only registers; ``group`` only does the group maps and overlap; ``all`` does both (with
        n > 1 shards, the group part runs only once every subject map exists).
    load_model : callable, optional
        ``fold_dir -> (model, RunConfig)``; default :func:`dist_decode.model.load_fold_model`.
    force : bool
        Recompute finished outputs.
    folds : list of str, optional
        Only these folds (index or site): their subject maps and group maps, no overlap (a later call without
        ``folds`` combines). Lets a scheduler start a fold's maps as soon as that fold has trained.

    Returns
    -------
    dict
        ``subjects`` (stage-1 stats), ``groups`` (per site), ``overlap`` (``maps.json`` content or None),
        ``missing_folds``.
    """
    if stage not in ("all", "jacobians", "group"):
        raise ValueError(f"stage {stage!r}: use all, jacobians or group")
    run = MapsRun(run_dir, cfg)
    if not run.done_sites:
        raise FileNotFoundError(f"{run.run_dir / 'folds'}: no finished fold (no folds/<site>/DONE)")
    if run.missing_sites:
        log.warning("folds not finished (no DONE): %s; maps cover the others", ", ".join(run.missing_sites))
    if folds:
        run.select_folds(list(folds))
    mc = run.cfg.maps
    result: dict = {"missing_folds": run.missing_sites, "subjects": None, "groups": None, "overlap": None}
    if stage in ("all", "jacobians"):
        result["subjects"] = compute_subject_maps(run, mc.workers if workers is None else workers, shard,
                                                  load_model, force, progress)
    if stage in ("all", "group") and (stage == "group" or shard[1] == 1 or shard[0] == 0):
        result["groups"] = compute_group_maps(run, force)
        if not folds:
            result["overlap"] = compute_overlap(run, result["groups"], force, result["subjects"])
    return result
