"""The stages of ``dist_decode.apply``: per model (encode + maps), the maps across models, the RSA.

``OUT/`` (:mod:`dist_decode.contracts.apply`), each file written under a temporary name and renamed:

``normalisation.h5``
    The new cohort's normalisation statistics in the run's units (:meth:`dist_decode.normalise.Normaliser.
    applied_to`): the run's settings, proportional-scaling reference, global scale and mean site total; each new
    site's mean and gain from its own volumes, as for a held-out site.
``folds/<model>/features.h5``, ``folds/<model>/DONE``
    Every new subject encoded by the run's fold model ``<model>`` (the site it held out), in store order, ``split``
    ``apply``; ``DONE`` (written after the model's maps) marks the model finished.
``maps/models/<model>/<site>/<participant_id>_{effect,deviation}.nii.gz``
    The model's healthy-twin maps of each new patient (``maps.kind`` of the run's config, as ``dist_decode.maps``).
``maps/mean/<site>/<participant_id>_{effect,deviation}.nii.gz``
    Their mean over the models.
``maps/sites/<site>/mean_{effect,deviation}.nii.gz``, ``maps/models/<model>/sites/<site>/mean_effect.nii.gz``
    The new site's mean over its patients (of the model mean; of each model).
``maps/maps.json``
    What was mapped (models, patients per site, settings); written last: the maps' completion file.
``rsa/rsa.json`` (+ ``rsa.csv``, ``rsa.txt``, ``null.npz``)
    RSA of the new cohort in each model's S and C spaces (:func:`dist_decode.rsa.analysis.run_loso` per model: one
    scope per new site and ``pooled``, named ``<model>:<scope>``; rows carry ``model``). Without any phenotype of
    ``rsa.variables`` in the new store, ``{"status": "skipped", "reason": ...}``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dist_decode.contracts import apply as apply_contract
from dist_decode.contracts import features as features_contract
from dist_decode.contracts.apply import ApplyDir
from dist_decode.contracts.run import RunDir
from dist_decode.data import resample_volume
from dist_decode.fsutil import atomic_write_json, read_json, save_nifti
from dist_decode.maps.density import MapSpace
from dist_decode.maps.pipeline import (check_settings, decoded_subjects, load_nifti, resolve_kind, safe_name,
                                       subject_seed, subject_settings, write_subject_maps)
from dist_decode.model import load_fold_model, model_grid
from dist_decode.model.encode import extract_features
from dist_decode.model.loss import mask_index
from dist_decode import normalise
from dist_decode.normalise import NormaliseSettings, model_inputs

log = logging.getLogger("dist_decode.apply")

MAP_KINDS = ("effect", "deviation")


class ApplyContext:
    """What the apply stages know: the apply directory, its run (config, store, brain mask) and the new store.

    Parameters
    ----------
    out : path
        A bound apply directory (:func:`dist_decode.contracts.apply.bind`).
    """

    def __init__(self, out: str | Path) -> None:
        self.out = ApplyDir(out)
        self.manifest = self.out.manifest()
        self.run = RunDir(self.manifest["run"])
        self.cfg = self.run.config()
        self.run_store = self.run.store()  # hash-checked: its mask is the models' brain mask
        self.store = self.out.store()
        self.mask = np.asarray(self.run_store.mask, bool)
        self.affine = np.asarray(self.store.affine, float)
        self.shape = tuple(int(v) for v in self.store.grid_shape)
        self.models = self.out.models()
        self.is_patient = np.asarray(self.store.is_patient, bool)

    @property
    def normalised(self) -> bool:
        settings = NormaliseSettings.from_config(self.cfg.data)
        return settings.active and self.cfg.model.name != "anchor2022"

    def normaliser(self, progress: bool = True) -> normalise.Normaliser | None:
        """``OUT/normalisation.h5``: computed once (under a lock), in the run's units; None for raw-input runs."""
        if not self.normalised:
            return None
        settings = NormaliseSettings.from_config(self.cfg.data)
        run_norm = normalise.Normaliser.load(self.run.path / normalise.FILE)
        return normalise.ensure(self.out.path, self.store, settings, progress, like=(run_norm, self.mask))

    def model_of(self, spec: str) -> str:
        """A model by its held-out site, or its fold index in the run's store.

        Raises
        ------
        ValueError
            Naming the models of this apply directory.
        """
        sites = list(self.run_store.sites)
        site = sites[int(spec)] if str(spec).isdigit() and int(spec) < len(sites) else str(spec)
        if site not in self.models:
            raise ValueError(f"--model {spec!r}: not a model of {self.out.path} (models: {', '.join(self.models)})")
        return site

    def fold_index(self, model: str) -> int:
        return list(self.run_store.sites).index(model)

    def subject_path(self, model: str | None, site: str, pid: str, what: str) -> Path:
        """A new patient's map: of one model, or (``model`` None) the mean over the models."""
        base = self.out.path / "maps" / ("mean" if model is None else f"models/{safe_name(model)}")
        return base / safe_name(site) / f"{safe_name(pid)}_{what}.nii.gz"

    def site_map_path(self, model: str | None, site: str, what: str = "effect") -> Path:
        base = self.out.path / "maps" if model is None else self.out.path / "maps" / "models" / safe_name(model)
        return base / "sites" / safe_name(site) / f"mean_{what}.nii.gz"

    def meta(self) -> dict[str, np.ndarray]:
        """Row-aligned ``participant_id``, ``site``, ``diagnosis``, ``split``, ``index`` of every new subject."""
        st = self.store
        col = st.manifest.get("labels", {}).get("diagnosis_column", "diagnosis")
        diag = (np.asarray(st.phenotypes[col]).astype(str) if col in st.phenotypes
                else np.where(self.is_patient, "patient", "control"))
        return {"participant_id": np.asarray(st.participant_ids).astype(str), "site": np.asarray(st.site_of).astype(str),
                "diagnosis": diag, "split": np.full(st.n, apply_contract.SPLIT), "index": np.arange(st.n)}

    def patients(self) -> dict[str, list[str]]:
        """New site -> its patients' ids (store order)."""
        out: dict[str, list[str]] = {}
        for pid, site, pat in zip(self.store.participant_ids, self.store.site_of, self.is_patient):
            if pat:
                out.setdefault(str(site), []).append(str(pid))
        return out


# -- per model: features, then the model's maps, then DONE ------------------------------------------------------
def apply_model(ctx: ApplyContext, model: str, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Encode every new subject with fold model ``model`` and map the new patients; write ``DONE`` last.

    Returns
    -------
    dict
        The model's ``DONE`` content (read back when it was finished already).
    """
    done = ctx.out.completion("model", model)
    if done.is_file() and not force:
        log.info("model %s: already applied (%s)", model, done)
        return read_json(done) or {}
    start = time.perf_counter()
    ctx.normaliser(progress)
    net, _ = load_fold_model(ctx.run.fold_dir(model))
    cfg, store = ctx.cfg, ctx.store
    grid = model_grid(cfg, ctx.run_store.grid_shape)
    mask = ctx.mask
    if tuple(grid) != ctx.shape:
        mask = np.asarray(resample_volume(mask.astype(np.float32), grid)) > 0.5
    features_path = ctx.out.fold_dir(model) / features_contract.FILE
    if force or not features_path.is_file():
        rows = np.arange(store.n)
        bs = max(1, int(cfg.train.batch_size))

        def batches():
            for k in range(0, store.n, bs):
                r = rows[k:k + bs]
                x = model_inputs(ctx.out.path, store, cfg, r, grid)
                yield x, torch.from_numpy(ctx.is_patient[r]), torch.from_numpy(r)

        trained = read_json(ctx.run.fold_dir(model) / "DONE") or {}
        noise_var = trained.get("noise_var")
        extract_features(net, batches(), ctx.meta(), mask_index(torch.from_numpy(mask)), cfg.train.feature_samples,
                         cfg.seed, features_path,
                         {"fold": ctx.fold_index(model), "site": model, "model": cfg.model.name,
                          "n_parameters": trained.get("n_parameters", 0), "grid": list(grid), "seed": cfg.seed,
                          "steps": trained.get("steps", 0),
                          "noise_var": float("nan") if noise_var is None else float(noise_var),
                          "applied_to": str(store.path), "run": str(ctx.run.path)},
                         progress=progress)
    n_maps = model_maps(ctx, model, net, force, progress)
    info = {"model": model, "fold": ctx.fold_index(model), "n_subjects": int(store.n),
            "n_patients": int(ctx.is_patient.sum()), "n_maps": n_maps, "wall_s": round(time.perf_counter() - start, 3),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(done, info)
    log.info("model %s: %d subjects encoded, %d patients mapped (%.1f s) -> %s", model, store.n, n_maps,
             info["wall_s"], ctx.out.fold_dir(model))
    return info


def model_maps(ctx: ApplyContext, model: str, net, force: bool = False, progress: bool = True) -> int:
    """The model's effect and deviation maps of every new patient (skipping those on disk); returns how many exist.

    The maps are those of ``dist_decode.maps`` (``maps.kind``, ``maps.use_samples`` of the run's config): the
    patient's reconstruction and observed volume against its healthy twin, in its own site's density units.
    """
    mc = ctx.cfg.maps
    check_settings(mc)
    kind = resolve_kind(mc)
    f = features_contract.read(ctx.out.fold_dir(model) / features_contract.FILE, samples=mc.use_samples)
    f = f.take(ctx.is_patient[np.asarray(f.index, np.int64)])
    if mc.use_samples:
        k = max(1, min(int(mc.n_samples), f.c_samples.shape[1]))
        c, s = f.c_samples[:, :k], f.s_samples[:, :k]
    else:
        c, s = f.c_mean[:, None], f.s_mean[:, None]
    pending = [j for j, (pid, site) in enumerate(zip(f.participant_id, f.site))
               if force or not ctx.subject_path(model, site, pid, "effect").is_file()]
    if pending:
        space = MapSpace(ctx.out.path, ctx.store, ctx.cfg)
        step = max(1, mc.decode_batch)
        with tqdm(total=len(pending), desc=f"{kind} maps ({model})", unit="subj", disable=not progress) as bar:
            for b in range(0, len(pending), step):
                rows = np.asarray(pending[b:b + step])
                pids = [str(p) for p in f.participant_id[rows]]
                decoded = decoded_subjects(net, np.asarray(c[rows], np.float32), np.asarray(s[rows], np.float32),
                                           pids, space)
                for j, pid, (twins, recons, observed) in zip(rows, pids, decoded):
                    site = str(f.site[j])
                    write_subject_maps(kind, ctx.subject_path(model, site, pid, "effect"),
                                       ctx.subject_path(model, site, pid, "deviation"), twins, recons, observed,
                                       ctx.mask, ctx.affine, mc,
                                       subject_seed(ctx.cfg.seed, ctx.fold_index(model), int(f.index[j])))
                    bar.update(1)
    return int(len(f))


# -- across models: the mean maps -------------------------------------------------------------------------------
def combine_maps(ctx: ApplyContext, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Average every new patient's maps over the models, and each new site's over its patients; ``maps.json`` last.

    Raises
    ------
    FileNotFoundError
        A model of this apply directory is not finished (naming it).
    """
    path = ctx.out.completion("maps")
    missing = [m for m in ctx.models if not ctx.out.done("model", m)]
    if missing:
        raise FileNotFoundError(f"model(s) {missing} not applied yet (no {ctx.out.completion('model', missing[0])}); "
                                "run --stage model for them first")
    models = list(ctx.models)
    key = {"models": models, "subjects": subject_settings(ctx.cfg.maps)}
    old = read_json(path)
    if isinstance(old, dict) and old.get("key") == key and not force:
        log.info("maps: up to date (%s)", path)
        return old
    start = time.perf_counter()
    patients = ctx.patients()
    sites: dict[str, Any] = {}
    with tqdm(total=sum(len(v) for v in patients.values()), desc="mean maps", unit="subj",
              disable=not progress) as bar:
        for site, pids in patients.items():
            site_sum = {what: np.zeros(ctx.shape, np.float64) for what in MAP_KINDS}
            model_sum = {m: np.zeros(ctx.shape, np.float64) for m in models}
            for pid in pids:
                for what in MAP_KINDS:
                    maps = []
                    for m in models:
                        p = ctx.subject_path(m, site, pid, what)
                        if not p.is_file():
                            raise FileNotFoundError(f"{p}: missing (re-run --stage model --model {m} --force)")
                        maps.append(load_nifti(p).astype(np.float32))
                        if what == "effect":
                            model_sum[m] += maps[-1]
                    mean = np.mean(maps, axis=0)
                    site_sum[what] += mean
                    save_nifti(ctx.subject_path(None, site, pid, what), mean, ctx.affine)
                bar.update(1)
            n = len(pids)
            for what in MAP_KINDS:
                save_nifti(ctx.site_map_path(None, site, what), site_sum[what] / n, ctx.affine)
            for m in models:
                save_nifti(ctx.site_map_path(m, site), model_sum[m] / n, ctx.affine)
            sites[site] = {"n_patients": n, "participants": pids}
    summary = {"key": key, "models": models, "models_missing": ctx.manifest.get("models_missing", []),
               "sites": sites, "n_patients": int(sum(v["n_patients"] for v in sites.values())),
               "sites_without_patients": sorted(set(map(str, ctx.store.sites)) - set(sites)),
               "config": asdict(ctx.cfg.maps), "wall_s": round(time.perf_counter() - start, 3)}
    atomic_write_json(path, summary)  # last: the stage's completion file
    log.info("mean maps of %d patients over %d models -> %s", summary["n_patients"], len(models), path)
    return summary


# -- RSA of the new cohort in each model's spaces ----------------------------------------------------------------
def apply_rsa(ctx: ApplyContext, comm: Any = None, ranks: int = 1, force: bool = False,
              progress: bool = True) -> dict[str, Any] | None:
    """Permutation RSA of the new cohort in each model's S and C spaces (see the module docstring).

    Returns
    -------
    dict or None
        The ``rsa.json`` content (None on MPI ranks other than 0).
    """
    from dist_decode.rsa import io as rio
    from dist_decode.rsa.analysis import parse_variables, run_loso

    path = ctx.out.completion("rsa")
    if path.is_file() and not force:
        log.info("%s exists: RSA already done (use --force to recompute)", path)
        return read_json(path)
    missing = [m for m in ctx.models if not ctx.out.done("model", m)]
    if missing:
        raise FileNotFoundError(f"model(s) {missing} not applied yet (no {ctx.out.completion('model', missing[0])})")
    rc = ctx.cfg.rsa
    pheno = ctx.store.phenotypes
    variables = [(n, k) for n, k in parse_variables(",".join(rc.variables)) if n in pheno]
    absent = [v.split(":")[0] for v in rc.variables if v.split(":")[0] not in pheno]
    settings = {"variables": [f"{n}:{k}" for n, k in variables], "distance": rc.distance,
                "permutations": rc.permutations, "block_size": rc.block_size, "fwe": rc.fwe,
                "alternative": rc.alternative, "within_site": rc.within_site, "use_samples": rc.use_samples,
                "patients_only": list(rc.patients_only), "patients_only_spaces": list(rc.patients_only_spaces)}
    header: dict[str, Any] = {"config": settings, "seed": ctx.cfg.seed, "permutations": rc.permutations,
                              "ranks": ranks, "mode": "apply", "out": str(ctx.out.path), "absent_variables": absent}
    if not variables:
        reason = f"the new store has none of the phenotypes of rsa.variables ({', '.join(absent)})"
        return _rsa_skipped(path, header, reason, comm)
    t0 = time.perf_counter()
    rows_all: list[dict] = []
    nulls: list[np.ndarray] = []
    labels_all: list[str] = []
    skipped: dict[str, str] = {}
    ids = np.asarray(ctx.store.participant_ids).astype(str)
    for m in ctx.models:
        f = features_contract.read(ctx.out.fold_dir(m) / features_contract.FILE, samples=rc.use_samples)
        folds: dict[str, dict[str, Any]] = {}
        subsets: dict[str, dict] = {}
        for site in dict.fromkeys(f.site.tolist()):
            sf = f.take(f.site == site)
            ph = rio.align(sf.participant_id, pheno, ids, str(ctx.store.path))
            patient = ctx.is_patient[np.asarray(sf.index, np.int64)]
            folds[site] = {"spaces": {name: sf.space(name, rc.use_samples) for name in features_contract.SPACES},
                           "phenotypes": ph}
            subsets[site] = {v: patient for v in rc.patients_only}
            subsets[site].update({(space, v): patient for space in rc.patients_only_spaces for v, _ in variables})
        try:
            rows, null, labels = run_loso(folds, variables, rc.permutations, ctx.cfg.seed, rc.distance, rc.fwe,
                                          rc.alternative, comm, rc.block_size, subsets, within_site=rc.within_site,
                                          progress=progress)
        except ValueError as exc:  # e.g. no variable with enough distinct values at any new site
            skipped[m] = str(exc)
            log.warning("RSA in the spaces of model %s: %s", m, exc)
            continue
        for r in rows:
            r["model"] = m
            r["scope"] = f"{m}:{r['scope']}"
        rows_all += rows
        labels_all += [f"{m}:{lab}" for lab in labels]
        if null is not None:
            nulls.append(null)
    header.update(models=[m for m in ctx.models if m not in skipped], skipped_models=skipped,
                  sites=sorted({str(s) for s in ctx.store.site_of}), wall_s=round(time.perf_counter() - t0, 3))
    if not rows_all:
        return _rsa_skipped(path, header, "; ".join(f"model {m}: {why}" for m, why in skipped.items()), comm)
    if comm is not None and comm.Get_rank() != 0:
        return None
    rio.write_results(path.parent, header, rows_all, np.concatenate(nulls, axis=1), labels_all)
    log.info("wrote %s (%d rows over %d models)", path, len(rows_all), len(header["models"]))
    return read_json(path)


def _rsa_skipped(path: Path, header: dict, reason: str, comm: Any) -> dict | None:
    log.warning("RSA skipped: %s", reason)
    if comm is not None and comm.Get_rank() != 0:
        return None
    out = {**header, "status": "skipped", "reason": reason, "results": []}
    atomic_write_json(path, out)
    return out
