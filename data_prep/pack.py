"""Pack CAT12 mwp1 maps into a sharded HDF5 store: ``python -m data_prep.pack``.

::

    python -m data_prep.pack --cat12-root COHORT --participants COHORT/participants.tsv --out STORE
    python -m data_prep.pack --verify STORE

Layout (see ``docs/architecture.md``): ``STORE/manifest.json``, ``STORE/mask.nii.gz`` and
``STORE/shards/<site>-<k>.h5``, one shard per site (split when ``max_shard_subjects`` is set), each
holding ``volumes`` (n, X, Y, Z) with one chunk per volume, ``participant_id``, one row-aligned
dataset per participants.tsv column (+ ``tiv_ml`` and ``iqr`` from ``cat_*.xml``), per-volume
sha256 ``checksums`` and the affine/shape as attributes.

Scans are found in any CAT12 layout and one is chosen per subject (:mod:`data_prep.discover`); subjects on
other grids are resampled onto the store grid (:mod:`data_prep.grids`); an ``--out`` holding another cohort is
refused (:mod:`data_prep.guard`). Every file is written under a temporary name and renamed; a shard whose
inputs and options are unchanged is kept on re-run, so an interrupted run resumes. The manifest is written last.
A full disk stops the run with :class:`dist_decode.fsutil.DiskFull` naming the file: its temporary file is removed,
finished shards are kept, and no manifest is written, so the store is never taken for complete and a re-run with
enough space resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import voxel_sizes

from data_prep import discover, grids, guard, ingest
from dist_decode import provenance
from dist_decode.contracts.store import SCHEMA_VERSION
from dist_decode.fsutil import (DiskFull, atomic_path, atomic_write_json, disk_full_errors, is_disk_full,
                                read_json)

log = logging.getLogger("data_prep.pack")

CODECS = ("blosc-lz4", "gzip", "none")
DTYPES = ("float32", "float16")
MISSING_QC = ("keep", "exclude")
FLOAT16_MAX = 65504.0


@dataclass
class PackOptions:
    """Packer options (all recorded in the manifest).

    Parameters
    ----------
    codec : {"blosc-lz4", "gzip", "none"}
        Lossless compression of each volume chunk: Blosc-LZ4 with byte shuffle (hdf5plugin, fast
        to read), gzip with shuffle (needs only h5py) or none.
    gzip_level : int
        gzip level 1-9 when ``codec="gzip"``.
    dtype : {"float32", "float16"}
        Stored precision; float16 is lossy and its maximum absolute error is recorded.
    max_shard_subjects : int or None
        Cap on volumes per shard (a site is split into ``<site>-0``, ``<site>-1``, ...).
    min_iqr_rating : float or None
        QC: exclude subjects whose CAT12 IQR rating (percent, ``105 - 10 * IQR mark``) is below this.
        ``None`` disables QC.
    missing_qc : {"keep", "exclude"}
        A scan without an IQR rating (no ``report/cat_*.xml``, or one without ``qualityratings/IQR``) is kept
        (default: a missing rating says nothing about the scan) or fails QC; either way with a warning and
        listed in the manifest (``qc.unrated``). Ignored when ``min_iqr_rating`` is None.
    session : str or None
        Pack this session of subjects with several (``01`` or ``ses-01``); default: the first session, in
        natural order, whose scan passes the checks and QC. Subjects without sessions are unaffected.
    grid : str
        Store grid: ``auto`` (the CAT12 12.8+ grid when a subject has it, else the most common), ``cat12[:MM]``,
        ``cat12.7[:MM]``, ``site:NAME`` or a NIfTI file (:func:`data_prep.grids.choose`).
    resample : bool
        Resample subjects on other grids onto the store grid; False: refuse a cohort on several grids.
    mask_threshold : float
        Store mask = voxels whose mean GM over the packed subjects exceeds this.
    patient_label, control_label : str
        The ``diagnosis`` values of patients and controls.
    site_order : list of str or None
        LOSO fold order of the sites (default: sorted).
    strict : bool
        Raise instead of excluding a subject whose file is missing, unreadable or invalid, or an
        mwp1 file on disk whose subject is not in the table.
    n_jobs : int or None
        Reader processes (None: all cores).
    """

    codec: str = "blosc-lz4"
    gzip_level: int = 4
    dtype: str = "float32"
    max_shard_subjects: int | None = None
    min_iqr_rating: float | None = 60.0
    missing_qc: str = "keep"
    session: str | None = None
    grid: str = "auto"
    resample: bool = True
    mask_threshold: float = 0.1
    patient_label: str = "SZ"
    control_label: str = "HC"
    site_order: list[str] | None = None
    strict: bool = False
    n_jobs: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r}: choose from {CODECS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {DTYPES}")
        if not 1 <= int(self.gzip_level) <= 9:
            raise ValueError(f"gzip_level {self.gzip_level}: must be 1..9")
        if self.max_shard_subjects is not None and int(self.max_shard_subjects) < 1:
            raise ValueError(f"max_shard_subjects {self.max_shard_subjects}: must be >= 1")
        if self.patient_label == self.control_label:
            raise ValueError("patient and control labels must differ")
        if self.missing_qc not in MISSING_QC:
            raise ValueError(f"missing_qc {self.missing_qc!r}: choose from {MISSING_QC}")


def _compression(opts: PackOptions) -> dict[str, Any]:
    """h5py dataset keyword arguments of the chosen codec."""
    if opts.codec == "blosc-lz4":
        import hdf5plugin

        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if opts.codec == "gzip":
        return {"compression": "gzip", "compression_opts": int(opts.gzip_level), "shuffle": True}
    return {}


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def volume_checksum(vol: np.ndarray) -> str:
    """Return the hex sha256 of a stored volume's bytes (C order, stored dtype)."""
    return hashlib.sha256(np.ascontiguousarray(vol).tobytes()).hexdigest()


def _safe_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", site) or "site"


# ---------------------------------------------------------------------------------------------
# Worker: read + check one subject
# ---------------------------------------------------------------------------------------------

_GRID: dict[str, Any] = {}


def _load(item: tuple[str, str]) -> tuple[str, np.ndarray | None, str | None, dict[str, float] | None]:
    """Read one subject and put it on the store grid: (pid, volume, exclusion reason, resampling record)."""
    pid, path = item
    target: grids.Grid = _GRID["grid"]
    try:
        data, affine = ingest.read_volume(Path(path))
    except ingest.VolumeError as exc:
        return pid, None, str(exc), None
    source = grids.Grid.of(data.shape, affine)
    if source == target:
        return pid, data, None, None
    if not _GRID["resample"]:
        return pid, None, f"{path}: grid {source.describe()} is not the store grid {target.describe()}", None
    inside = grids.inside_fraction(data, source, target)
    if inside < grids.MIN_GM_INSIDE:
        return pid, None, (f"{path}: only {inside:.1%} of its grey matter lies inside the store grid "
                           f"{target.describe()} (file grid {source.describe()}): not the same space"), None
    vol = grids.resample(data, source, target)
    rec = {"gm_ml_source": round(grids.gm_ml(data, source), 3), "gm_ml_store": round(grids.gm_ml(vol, target), 3)}
    return pid, vol, None, rec


def _init_worker(grid: grids.Grid, resample: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _GRID.update(grid=grid, resample=resample)


def _start_worker(grid: grids.Grid, resample: bool) -> None:
    """Pool initializer: default SIGTERM (so ``Pool.terminate`` ends the worker) and the store grid."""
    default_sigterm()
    _init_worker(grid, resample)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What will be packed: the chosen scan of every candidate, the store grid, shards, known exclusions."""

    table: ingest.Participants
    meta: dict[str, dict] | None
    scans: dict[str, discover.Scan]
    not_used: dict[str, list[dict[str, str]]]
    xml: dict[str, tuple[float, float]]
    source_grids: dict[str, grids.Grid]
    grid: grids.Grid
    shards: list[dict[str, Any]]
    excluded: list[dict[str, str]]
    unrated: list[dict[str, Any]]

    @property
    def shape(self) -> tuple[int, ...]:
        """Store grid shape."""
        return self.grid.shape

    @property
    def affine(self) -> np.ndarray:
        """Store grid affine."""
        return self.grid.affine

    def cohort(self) -> dict[str, str]:
        """participant_id -> site of every table row (the store's identity, :mod:`data_prep.guard`)."""
        return {pid: row["site"] for pid, row in self.table.rows.items()}


def _no_rating(scan: discover.Scan) -> str:
    if scan.report is None:
        return f"no report/cat_{scan.label}.xml beside {scan.mwp1.parent}"
    return f"{scan.report} has no qualityratings/IQR"


def plan(cat12_root: Path, participants: Path, opts: PackOptions) -> Plan:
    """Check the table and files, choose each subject's scan, apply QC, choose the store grid, assign shards.

    Raises
    ------
    ValueError, FileNotFoundError
        Table problems, the same scan twice, several grids with ``resample=False`` (always), and per-subject
        problems when ``opts.strict``.
    """
    meta = ingest.read_participants_json(participants)
    levels = ((meta or {}).get("diagnosis") or {}).get("Levels")
    table = ingest.read_participants(participants, opts.patient_label, opts.control_label, levels=levels)
    disc = discover.find_scans(cat12_root, table.ids)
    excluded: list[dict[str, str]] = []

    def exclude(pid: str, reason: str) -> None:
        if opts.strict:
            raise ValueError(f"subject {pid}: {reason}")
        log.warning("excluding %s: %s", pid, reason)
        excluded.append({"participant_id": pid, "reason": reason})

    for pid in disc.missing:
        exclude(pid, f"in {table.path.name} but no mwp1{pid}*.nii[.gz] found in any mri/ folder under {cat12_root}")
    for who, files in disc.unlisted.items():
        exclude(who, f"{', '.join(str(f) for f in files)} {'is' if len(files) == 1 else 'are'} on disk but subject "
                     f"{who!r} is not in {table.path.name}")

    qc_on = opts.min_iqr_rating is not None
    found: dict[discover.Scan, tuple[grids.Grid, tuple[float, float]]] = {}
    failed_unrated: set[discover.Scan] = set()

    def check(scan: discover.Scan) -> str | None:
        try:
            shape, affine = ingest.read_header(scan.mwp1)
        except ingest.VolumeError as exc:
            return str(exc)
        if len(shape) != 3:
            return f"{scan.mwp1}: not a 3-D volume (shape {shape})"
        values = (math.nan, math.nan)
        if scan.report is not None:
            try:
                values = ingest.read_cat_xml(scan.report)
            except ingest.VolumeError as exc:
                return str(exc)
        iqr = values[1]
        if qc_on and not math.isfinite(iqr) and opts.missing_qc == "exclude":
            failed_unrated.add(scan)
            return f"QC: no IQR rating ({_no_rating(scan)}); --missing-qc exclude"
        if qc_on and math.isfinite(iqr) and ingest.iqr_rating(iqr) < opts.min_iqr_rating:
            return (f"QC: CAT12 IQR {iqr:.2f} = {ingest.iqr_rating(iqr):.1f}% is below the threshold "
                    f"{opts.min_iqr_rating:g}%")
        found[scan] = (grids.Grid.of(shape, affine), values)
        return None

    scans: dict[str, discover.Scan] = {}
    not_used: dict[str, list[dict[str, str]]] = {}
    unrated: list[dict[str, Any]] = []
    for pid in table.ids:
        if pid not in disc.scans:
            continue
        chosen, skipped, problem = discover.choose_scan(disc.scans[pid], opts.session, check)
        if skipped:
            not_used[pid] = skipped
        unrated.extend({"participant_id": pid, "file": str(s.mwp1), "problem": _no_rating(s), "kept": False}
                       for s in disc.scans[pid] if s in failed_unrated)
        if chosen is None:
            exclude(pid, problem or "no usable scan")
            continue
        scans[pid] = chosen
        if not math.isfinite(found[chosen][1][1]):
            unrated.append({"participant_id": pid, "file": str(chosen.mwp1), "problem": _no_rating(chosen),
                            "kept": True})
    kept_unrated = [u for u in unrated if u["kept"]]
    if kept_unrated and qc_on:
        log.warning("%d subject(s) have no CAT12 IQR rating and are kept unrated (--missing-qc keep; listed in the "
                    "manifest's qc.unrated): %s", len(kept_unrated),
                    ", ".join(f"{u['participant_id']} ({u['problem']})" for u in kept_unrated[:5])
                    + (", ..." if len(kept_unrated) > 5 else ""))
    if not scans:
        raise ValueError(f"no usable mwp1 file for any subject of {participants} under {cat12_root}")

    site_of = {pid: table.rows[pid]["site"] for pid in table.ids}
    source_grids = {pid: found[scans[pid]][0] for pid in scans}
    grid = grids.choose(source_grids, site_of, opts.grid)
    off = [pid for pid, g in source_grids.items() if g != grid]
    if off and not opts.resample:
        raise ValueError(f"--no-resample: {len(off)} subject(s) are not on the store grid {grid.describe()}; grids "
                         f"found (sites, subjects): {grids.listing(source_grids, site_of)}. Drop --no-resample to "
                         "resample them onto one grid (--grid chooses it)")
    log.info("store grid %s; grids found: %s", grid.describe(), grids.listing(source_grids, site_of))
    if off:
        log.info("%d subject(s) will be resampled onto the store grid", len(off))

    by_site: dict[str, list[str]] = {}
    for pid in scans:
        by_site.setdefault(site_of[pid], []).append(pid)
    if opts.site_order is not None:
        unknown = [s for s in opts.site_order if s not in by_site]
        missing = [s for s in by_site if s not in opts.site_order]
        if unknown or missing:
            raise ValueError(f"site_order: unknown site(s) {unknown}, unlisted site(s) {missing}")
        order = list(opts.site_order)
    else:
        order = sorted(by_site)
    shards = []
    names: set[str] = set()
    for site in order:
        pids = by_site[site]
        cap = int(opts.max_shard_subjects or len(pids))
        base = _safe_name(site)
        while base in names:
            base += "_"
        names.add(base)
        for k, start in enumerate(range(0, len(pids), cap)):
            shards.append({"file": f"shards/{base}-{k}.h5", "site": site, "candidates": pids[start:start + cap]})
    xml = {pid: found[scans[pid]][1] for pid in scans}
    return Plan(table, meta, scans, not_used, xml, source_grids, grid, shards, excluded, unrated)


#: Options that do not change a shard's bytes beyond what the plan hash already covers.
_UNHASHED = ("n_jobs", "site_order", "strict", "mask_threshold", "session", "grid", "resample", "missing_qc")


def _plan_hash(p: Plan, shard: dict[str, Any], opts: PackOptions) -> str:
    """Hash of everything a shard's content depends on (resume key)."""
    h = hashlib.sha256()
    stored = {k: v for k, v in asdict(opts).items() if k not in _UNHASHED}
    h.update(json.dumps(stored, sort_keys=True).encode())
    h.update(json.dumps([p.grid.shape, p.grid.affine_key, p.table.columns, shard["site"]]).encode())
    for pid in shard["candidates"]:
        f = p.scans[pid].mwp1
        st = f.stat()
        h.update(json.dumps([pid, p.table.rows[pid], str(f), st.st_size, st.st_mtime_ns, list(p.xml[pid])]).encode())
        if p.source_grids[pid] != p.grid:
            h.update(json.dumps([p.source_grids[pid].affine_key, p.source_grids[pid].shape, grids.METHOD]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _phenotype_arrays(p: Plan, pids: list[str]) -> dict[str, np.ndarray]:
    """Row-aligned phenotype arrays: every table column, plus tiv_ml and iqr from cat_*.xml."""
    cols: dict[str, np.ndarray] = {}
    for col in p.table.columns:
        vals = [p.table.value(pid, col) for pid in pids]
        if p.table.kinds[col] == "numeric":
            cols[col] = np.asarray(vals, dtype=np.float64)
        else:
            cols[col] = np.asarray(vals, dtype=object)
    for j, col in enumerate(("tiv_ml", "iqr")):
        xml_vals = np.asarray([p.xml[pid][j] for pid in pids], dtype=np.float64)
        if col in cols:  # the CAT12 report wins where it has a value
            cols[col] = np.where(np.isfinite(xml_vals), xml_vals, cols[col])
        else:
            cols[col] = xml_vals
    return cols


def column_kinds(p: Plan) -> dict[str, str]:
    """Kind of every phenotype dataset."""
    kinds = dict(p.table.kinds)
    kinds["tiv_ml"] = kinds["iqr"] = "numeric"  # always present, from cat_*.xml (NaN without a report)
    return kinds


def _write_shard(p: Plan, shard: dict[str, Any], opts: PackOptions, path: Path, pool, bar) -> dict[str, Any]:
    """Read the shard's candidates in parallel and write the shard atomically; return its record."""
    import h5py

    X = tuple(int(s) for s in p.shape)
    dtype = np.dtype(opts.dtype)
    items = [(pid, str(p.scans[pid].mwp1)) for pid in shard["candidates"]]
    results = pool.imap(_load, items) if pool is not None else map(_load, items)
    kept: list[str] = []
    resampled: dict[str, dict[str, float]] = {}
    excluded: list[dict[str, str]] = []
    checksums: list[str] = []
    vsum = np.zeros(X, np.float64)
    f16_err = 0.0
    # No chunk cache (rdcc_nbytes=0): each volume is one chunk written once, so the cache saves nothing, and after a
    # write that failed (a full disk) HDF5 2.0 segfaults when it retries a cached dirty chunk at close or exit.
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", rdcc_nbytes=0) as h5:
            vols = h5.create_dataset(
                "volumes", shape=(0, *X), maxshape=(None, *X), chunks=(1, *X), dtype=dtype, **_compression(opts)
            )
            for pid, vol, err, rec in results:
                bar.update()
                if err is None and dtype == np.float16 and np.abs(vol).max() > FLOAT16_MAX:
                    err = f"{p.scans[pid].mwp1}: values beyond the float16 range; pack with dtype float32"
                if err is not None:
                    if opts.strict:
                        raise ValueError(f"subject {pid}: {err}")
                    log.warning("excluding %s: %s", pid, err)
                    excluded.append({"participant_id": pid, "reason": err})
                    continue
                stored = vol.astype(dtype)
                if dtype == np.float16:
                    f16_err = max(f16_err, float(np.abs(stored.astype(np.float32) - vol).max()))
                n = vols.shape[0]
                vols.resize(n + 1, axis=0)
                vols[n] = stored
                checksums.append(volume_checksum(stored))
                vsum += vol
                kept.append(pid)
                if rec is not None:
                    resampled[pid] = rec
            str_t = h5py.string_dtype("utf-8")
            for col, arr in _phenotype_arrays(p, kept).items():
                if arr.dtype == object:
                    h5.create_dataset(col, data=np.asarray(arr, dtype=str_t) if len(arr) else np.zeros(0, str_t), dtype=str_t)
                else:
                    h5.create_dataset(col, data=arr)
            h5.create_dataset("checksums", data=np.asarray(checksums, dtype=object), dtype=str_t)
            h5.create_dataset("volume_sum", data=vsum, compression="gzip")
            h5.attrs["affine"] = p.affine
            h5.attrs["shape"] = np.asarray(X)
            h5.attrs["voxel_mm"] = float(np.mean(voxel_sizes(p.affine)))
            h5.attrs["site"] = shard["site"]
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["codec"] = opts.codec
            h5.attrs["dtype"] = opts.dtype
            h5.attrs["float16_max_error"] = f16_err
            h5.attrs["excluded"] = json.dumps(excluded)
            # per-subject resampling records: a dataset, as an attribute could outgrow HDF5's 64 KiB limit
            h5.create_dataset("resampled", data=json.dumps(resampled), dtype=str_t)
            h5.attrs["plan_hash"] = shard["plan_hash"]
            h5.attrs["created"] = provenance.now_utc()
    return {"n": len(kept), "excluded": excluded, "resampled": resampled, "float16_max_error": f16_err}


def _reuse_shard(path: Path, plan_hash: str) -> dict[str, Any] | None:
    """Return the record of a finished shard with the same plan hash, or None."""
    import h5py

    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("plan_hash") != plan_hash:
                return None
            return {
                "n": int(h5["volumes"].shape[0]),
                "excluded": json.loads(h5.attrs["excluded"]),
                "resampled": json.loads(h5["resampled"].asstr()[()]),
                "float16_max_error": float(h5.attrs["float16_max_error"]),
            }
    except Exception:  # a damaged leftover: rewrite it
        return None


def pack(
    cat12_root: str | os.PathLike,
    participants: str | os.PathLike | None,
    out: str | os.PathLike,
    progress: bool = True,
    ground_truth: str | os.PathLike | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Pack a CAT12 cohort into a store and return its manifest.

    Parameters
    ----------
    cat12_root : path
        CAT12 output folder, any mix of the layouts of :mod:`data_prep.discover`.
    participants : path or None
        BIDS participants.tsv (default ``cat12_root/participants.tsv``); ``participants.json`` beside it is
        recorded when present.
    out : path
        Store folder: new, empty, or a store of the same cohort (finished shards of an earlier run with
        identical inputs are kept, so an interrupted run resumes).
    progress : bool
        Show a tqdm progress bar.
    ground_truth : path or None
        Synthetic ground-truth folder to record (default ``cat12_root/ground_truth`` if present).
    overwrite : bool
        Replace a store of another cohort at ``out`` (refused otherwise).
    **options
        :class:`PackOptions` fields.

    Returns
    -------
    dict
        The manifest written to ``out/manifest.json``.

    Raises
    ------
    ValueError, FileNotFoundError
        With a message naming the subject, file or column; before anything is written for problems of the
        input and for an ``out`` holding another cohort or something that is not a store.
    """
    import nibabel as nib
    from tqdm import tqdm

    opts = PackOptions(**options)
    opts.check()
    root = Path(cat12_root).resolve()
    participants = Path(participants) if participants is not None else root / "participants.tsv"
    out = Path(out).resolve()
    p = plan(root, participants, opts)
    if not p.shards:
        raise ValueError(f"no subject of {participants} is left to pack (all {len(p.excluded)} excluded)")
    guard.check(out, p.cohort(), overwrite)

    (out / "shards").mkdir(parents=True, exist_ok=True)
    guard.mark_in_progress(out, p.cohort(), {"cat12_root": str(root), "participants": str(participants.resolve())})
    for stale in (out / "shards").glob(".*.tmp-*"):
        log.warning("removing the leftover of an interrupted run: %s", stale)
        stale.unlink()

    n_jobs = (os.cpu_count() or 1) if opts.n_jobs is None else max(1, int(opts.n_jobs))
    total = sum(len(s["candidates"]) for s in p.shards)
    records = []
    bar = tqdm(total=total, desc="pack", unit="subj", disable=not progress)
    pool = None
    try:
        for shard in p.shards:
            shard["plan_hash"] = _plan_hash(p, shard, opts)
            path = out / shard["file"]
            rec = _reuse_shard(path, shard["plan_hash"])
            if rec is not None:
                log.info("keeping finished shard %s (%d volumes)", shard["file"], rec["n"])
                bar.update(len(shard["candidates"]))
            else:
                if pool is None and n_jobs > 1 and total > 1:
                    pool = mp.get_context("fork").Pool(n_jobs, _start_worker, (p.grid, opts.resample))
                _init_worker(p.grid, opts.resample)
                with disk_full_errors(path, "the shard"):
                    rec = _write_shard(p, shard, opts, path, pool, bar)
            records.append({**shard, **rec})
        if pool is not None:  # all work done: let the workers exit on their own
            pool.close()
            pool.join()
            pool = None
    finally:
        bar.close()
        if pool is not None:  # an error or SIGTERM: stop the workers now
            pool.terminate()

    import h5py

    excluded = list(p.excluded)
    vsum = np.zeros(p.shape, np.float64)
    shards_out = []
    for rec in records:
        excluded.extend(rec["excluded"])
        path = out / rec["file"]
        if rec["n"] == 0:
            log.warning("shard %s of site %s has no usable subject; left out", rec["file"], rec["site"])
            path.unlink(missing_ok=True)
            continue
        with h5py.File(path, "r") as h5:
            vsum += h5["volume_sum"][...]
        shards_out.append({"file": rec["file"], "site": rec["site"], "n": rec["n"], "sha256": sha256_file(path),
                           "bytes": path.stat().st_size})
    kept_ids: list[str] = []
    resampled: dict[str, dict[str, float]] = {}
    for rec in records:
        gone = {e["participant_id"] for e in rec["excluded"]}
        kept_ids.extend(pid for pid in rec["candidates"] if pid not in gone)
        resampled.update(rec["resampled"])
    n_total = len(kept_ids)
    if n_total == 0:
        raise ValueError(f"no subject of {participants} is left to pack (all excluded; see the log)")

    sites = list(dict.fromkeys(s["site"] for s in shards_out))
    counts = {s: {opts.patient_label: 0, opts.control_label: 0} for s in sites}
    for pid in kept_ids:
        row = p.table.rows[pid]
        counts[row["site"]][row["diagnosis"]] += 1
    ineligible = []
    for s in sites:
        for label, what in ((opts.patient_label, "patients"), (opts.control_label, "controls")):
            if counts[s][label] == 0:
                reason = f"no {what} ({label}) after exclusions: cannot be a LOSO test site"
                log.warning("site %s: %s", s, reason)
                ineligible.append({"site": s, "reason": reason})

    mean = (vsum / n_total).astype(np.float32)
    mask = (mean > opts.mask_threshold).astype(np.uint8)
    if not mask.any():
        raise ValueError(f"the store mask is empty: no voxel's mean exceeds mask_threshold={opts.mask_threshold}")
    mask_img = nib.Nifti1Image(mask, p.affine)
    with disk_full_errors(out / "mask.nii.gz", "the store mask"), atomic_path(out / "mask.nii.gz") as tmp:
        nib.save(mask_img, tmp)

    gt = Path(ground_truth).resolve() if ground_truth is not None else root / "ground_truth"
    f16 = max((r["float16_max_error"] for r in records), default=0.0)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": provenance.now_utc(),
        "tool": "data_prep.pack",
        "versions": {**provenance.versions(("h5py", "hdf5plugin", "nibabel", "numpy")), "hdf5": _hdf5_version()},
        "sources": {
            "cat12_root": str(root),
            "participants": str(participants.resolve()),
            "participants_sha256": sha256_file(participants),
        },
        "options": asdict(opts),
        "ground_truth": str(gt) if gt.is_dir() else None,
        "grid": {"shape": list(p.shape), "affine": np.asarray(p.affine).tolist(), "voxel_mm": float(np.mean(voxel_sizes(p.affine)))},
        "labels": {"diagnosis_column": "diagnosis", "site_column": "site",
                   "patient": opts.patient_label, "control": opts.control_label,
                   "levels": ((p.meta or {}).get("diagnosis") or {}).get("Levels")},
        "participants_json": p.meta,
        "cohort": guard.by_site(p.cohort()),
        "sites": sites,
        "n_subjects": n_total,
        "shards": shards_out,
        "counts": counts,
        "loso_ineligible": ineligible,
        "excluded": excluded,
        "columns": column_kinds(p),
        "storage": {
            "codec": opts.codec,
            "gzip_level": opts.gzip_level if opts.codec == "gzip" else None,
            "dtype": opts.dtype,
            "float16_max_error": f16 if opts.dtype == "float16" else 0.0,
            "chunks": [1, *p.shape],
            "lossless": opts.dtype == "float32",
        },
        "qc": {"min_iqr_rating": opts.min_iqr_rating, "missing_qc": opts.missing_qc, "unrated": p.unrated},
        "mask": {"file": "mask.nii.gz", "threshold": opts.mask_threshold, "n_voxels": int(mask.sum())},
        "grids": _grids_entry(p, kept_ids, resampled),
        "subjects": _subject_records(p, kept_ids, resampled),
    }
    old = read_json(out / "manifest.json")
    if old is not None and {**old, "created": None} == json.loads(json.dumps({**manifest, "created": None})):
        manifest["created"] = old["created"]  # nothing changed: keep the file (and its hash) as it is
        log.info("store %s is up to date", out)
    else:
        with disk_full_errors(out / "manifest.json", "the store manifest"):
            atomic_write_json(out / "manifest.json", manifest)
    guard.done(out)
    listed = {out / s["file"] for s in shards_out}
    for stale in sorted((out / "shards").glob("*.h5")):
        if stale not in listed:  # a shard of an earlier run with other sites/options: not part of this store
            log.warning("removing %s: not part of the new manifest", stale)
            stale.unlink()
    log.info("packed %d subjects from %d sites into %d shard(s) at %s; %d excluded", n_total, len(sites),
             len(shards_out), out, len(excluded))
    return manifest


def _grids_entry(p: Plan, kept: list[str], resampled: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The manifest's ``grids``: the store grid, every grid found (sites, subjects), the resampling rule."""
    site_of = {pid: p.table.rows[pid]["site"] for pid in kept}
    found = [{**g.to_json(), "sites": sites} for g, sites in grids.table({k: p.source_grids[k] for k in kept}, site_of)]
    return {
        "store": p.grid.to_json(),
        "found": found,
        "resampling": {"method": grids.METHOD, "values": "mwp1 is a density (ml GM per ml voxel): resampled as it "
                       "is, no voxel-volume factor; gm_ml = sum x voxel volume is kept up to interpolation error",
                       "n_subjects": len(resampled)},
    }


def _subject_records(p: Plan, kept: list[str], resampled: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The manifest's ``subjects``: per packed subject the file used, the files not used, its grid, resampling."""
    out = {}
    for pid in kept:
        scan = p.scans[pid]
        rec: dict[str, Any] = {"file": str(scan.mwp1), "report": str(scan.report) if scan.report else None,
                               "session": scan.session or None, "not_used": p.not_used.get(pid, [])}
        if pid in resampled:
            rec["resampled"] = {"from": p.source_grids[pid].describe(), **resampled[pid]}
        else:
            rec["resampled"] = None
        out[pid] = rec
    return out


def _hdf5_version() -> str:
    import h5py

    return h5py.version.hdf5_version


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def verify(store: str | os.PathLike, progress: bool = True) -> list[str]:
    """Re-check every shard hash and every per-volume checksum of a store.

    Returns
    -------
    list of str
        One message per problem (empty when the store is intact).
    """
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)
    from tqdm import tqdm

    store = Path(store)
    mpath = store / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: missing"]
    try:
        manifest = json.loads(mpath.read_text())
        shards = manifest["shards"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{mpath}: damaged ({exc})"]
    problems = []
    if not (store / manifest.get("mask", {}).get("file", "mask.nii.gz")).is_file():
        problems.append(f"{store / 'mask.nii.gz'}: missing")
    bar = tqdm(total=sum(int(s["n"]) for s in shards), desc="verify", unit="vol", disable=not progress)
    for s in shards:
        path = store / s["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            bar.update(int(s["n"]))
            continue
        if sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        try:
            with h5py.File(path, "r") as h5:
                vols, sums, ids = h5["volumes"], h5["checksums"].asstr()[...], h5["participant_id"].asstr()[...]
                if vols.shape[0] != s["n"]:
                    problems.append(f"{path}: {vols.shape[0]} volumes, manifest says {s['n']}")
                for i in range(vols.shape[0]):
                    try:
                        ok = volume_checksum(vols[i]) == sums[i]
                    except Exception as exc:  # a damaged chunk fails to decompress
                        problems.append(f"{path}: volume {i} ({ids[i]}) unreadable: {exc}")
                    else:
                        if not ok:
                            problems.append(f"{path}: volume {i} ({ids[i]}) checksum mismatch")
                    bar.update()
        except Exception as exc:
            problems.append(f"{path}: cannot read: {type(exc).__name__}: {exc}")
    bar.close()
    return problems


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (scancel, kill) into SystemExit so worker pools are stopped and temp files removed."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def default_sigterm() -> None:
    """In a forked pool worker that writes no file: undo :func:`_exit_on_sigterm` inherited from the parent, so the
    SIGTERM of ``Pool.terminate`` ends the worker at once (a handler raising SystemExit can leave it blocked in the
    pool's queue lock, and the parent's ``terminate`` waiting for it forever)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from dist_decode.cli import setup_logging

    ap = argparse.ArgumentParser(
        prog="python -m data_prep.pack",
        description="Pack CAT12 mwp1 maps + participants.tsv into a sharded, checksummed HDF5 store, "
        "or verify a store (--verify).",
    )
    ap.add_argument("--cat12-root", type=Path, help="CAT12 output folder: <id>/mri/, mri/, BIDS sub-X[/ses-Y][/anat]/mri/ "
                    "(any mix)")
    ap.add_argument("--participants", type=Path, default=None,
                    help="BIDS participants.tsv (default: CAT12_ROOT/participants.tsv)")
    ap.add_argument("--out", type=Path, help="store folder to write: new, empty, or a store of this cohort (an "
                    "interrupted run resumes)")
    ap.add_argument("--overwrite", action="store_true", help="replace a store of another cohort at --out")
    ap.add_argument("--verify", type=Path, metavar="STORE", help="re-check every checksum of STORE; exit 1 on damage")
    ap.add_argument("--codec", choices=CODECS, default="blosc-lz4", help="chunk compression (default blosc-lz4)")
    ap.add_argument("--gzip-level", type=int, default=4, help="gzip level for --codec gzip (default 4)")
    ap.add_argument("--float16", action="store_true", help="store float16 (lossy; max error recorded)")
    ap.add_argument("--max-shard-subjects", type=int, default=None, help="cap volumes per shard (default: one shard per site)")
    ap.add_argument("--min-iqr-rating", type=float, default=60.0,
                    help="QC: exclude subjects whose CAT12 IQR rating is below this percent (default 60; 105-10*IQR)")
    ap.add_argument("--no-qc", action="store_true", help="do not exclude on IQR")
    ap.add_argument("--missing-qc", choices=MISSING_QC, default="keep",
                    help="a scan without an IQR rating (no cat_*.xml or no IQR in it): keep it (default) or exclude it; "
                    "warned and listed in the manifest either way")
    ap.add_argument("--session", default=None, metavar="LABEL",
                    help="pack this session of subjects with several (e.g. 01 or ses-01; default: the first session, "
                    "in natural order, that passes the checks and QC)")
    ap.add_argument("--grid", default="auto", metavar="SPEC",
                    help="store grid: auto (default: the CAT12 12.8+ grid if a subject has it, else the most common), "
                    "cat12[:MM], cat12.7[:MM], site:NAME, or a NIfTI file")
    ap.add_argument("--no-resample", action="store_true",
                    help="refuse a cohort whose subjects are on several grids (default: resample onto the store grid)")
    ap.add_argument("--mask-threshold", type=float, default=0.1, help="store mask: mean GM above this (default 0.1)")
    ap.add_argument("--patient-label", default="SZ", help="diagnosis value of patients (default SZ)")
    ap.add_argument("--control-label", default="HC", help="diagnosis value of controls (default HC)")
    ap.add_argument("--site-order", default=None, help="comma-separated LOSO fold order of the sites (default sorted)")
    ap.add_argument("--strict", action="store_true", help="fail on a missing/unreadable/invalid subject instead of excluding it")
    ap.add_argument("--ground-truth", type=Path, default=None, help="synthetic ground-truth folder (default CAT12_ROOT/ground_truth)")
    ap.add_argument("--jobs", type=int, default=None, help="reader processes (default: all cores)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    _exit_on_sigterm()
    if args.verify is not None:
        problems = verify(args.verify, progress=not args.no_progress)
        for msg in problems:
            log.error("%s", msg)
        if problems:
            log.error("store %s is damaged: %d problem(s)", args.verify, len(problems))
            return 1
        log.info("store %s is intact", args.verify)
        return 0
    if args.cat12_root is None or args.out is None:
        ap.error("--cat12-root and --out are required (or use --verify STORE)")
    try:
        pack(
            args.cat12_root, args.participants, args.out, progress=not args.no_progress,
            ground_truth=args.ground_truth, overwrite=args.overwrite, codec=args.codec, gzip_level=args.gzip_level,
            dtype="float16" if args.float16 else "float32", max_shard_subjects=args.max_shard_subjects,
            min_iqr_rating=None if args.no_qc else args.min_iqr_rating, mask_threshold=args.mask_threshold,
            missing_qc=args.missing_qc, session=args.session, grid=args.grid, resample=not args.no_resample,
            patient_label=args.patient_label, control_label=args.control_label,
            site_order=args.site_order.split(",") if args.site_order else None, strict=args.strict, n_jobs=args.jobs,
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFull):  # a write the messages above do not name
            exc = f"disk full while writing the store {args.out}: {exc}"
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
