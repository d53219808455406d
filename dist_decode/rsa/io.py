"""Inputs and outputs of the RSA stage: feature tables, phenotypes, run directories, result files."""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers compression filters with h5py)
import numpy as np

from dist_decode.fsutil import atomic_path, atomic_write_json, atomic_write_text, open_hdf5
from dist_decode.rsa.analysis import MARK_P, MARK_TAU

log = logging.getLogger(__name__)

#: Row keys of rsa.json / rsa.csv, in column order (the report reads these).
ROW_KEYS = ("scope", "space", "variable", "kind", "n", "tau_a", "tau_b", "p", "p_fwe", "null_q025",
            "null_q50", "null_q975", "marked", "S", "pairs", "alternative")
_MISSING = {"", "n/a", "na", "nan", "none"}


def _strings(ds) -> np.ndarray:
    """An HDF5 dataset of strings (variable or fixed length) as a str array."""
    if ds.dtype.kind in "SO":
        return ds.asstr()[...].astype(str)
    return ds[...].astype(str)


# ------------------------------------------------------------------------------------------------
# table mode
# ------------------------------------------------------------------------------------------------
def read_features(path: str | os.PathLike, spaces: list[str] | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read ``participant_id`` and the feature spaces of an HDF5 file.

    Every numeric dataset other than ``participant_id`` with shape ``(n, d)`` (posterior means) or
    ``(K, n, d)`` (posterior samples) is a feature space, named after the dataset.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the dataset that is missing or misshapen.
    """
    path = Path(path)
    with open_hdf5(path, f"features file {path} not found") as f:
        if "participant_id" not in f:
            raise ValueError(f"{path}: no 'participant_id' dataset")
        ids = _strings(f["participant_id"])
        n = ids.size
        names = spaces or [k for k in f if k != "participant_id" and isinstance(f[k], h5py.Dataset)
                           and f[k].dtype.kind in "fiu"]
        out = {}
        for name in names:
            if name not in f:
                raise ValueError(f"{path}: feature space {name!r} not found; datasets: {sorted(f)}")
            x = f[name][...]
            if x.ndim == 2 and x.shape[0] == n:
                out[name] = x.astype(np.float64)
            elif x.ndim == 3 and x.shape[1] == n:
                out[name] = x.astype(np.float64)
            elif spaces:
                raise ValueError(f"{path}: dataset {name!r} has shape {x.shape}; expected ({n}, d) or "
                                 f"(K, {n}, d) for {n} participants")
            else:
                log.info("%s: skipping dataset %s of shape %s (not (n, d) or (K, n, d))", path, name, x.shape)
    if not out:
        raise ValueError(f"{path}: no (n, d) or (K, n, d) feature dataset found")
    if len(set(ids.tolist())) != n:
        raise ValueError(f"{path}: participant_id has duplicates")
    return ids, out


def read_phenotypes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a participants TSV: numeric columns as float (NaN = missing), others as str.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the problem (no ``participant_id`` column, duplicate ids, ragged rows).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"phenotypes file {path} not found")
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty phenotypes file")
    header = [h.strip() for h in rows[0]]
    if "participant_id" not in header:
        raise ValueError(f"{path}: no 'participant_id' column (columns: {header})")
    for k, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise ValueError(f"{path}: line {k} has {len(r)} fields, the header has {len(header)}")
    cols = {h: [r[i].strip() for r in rows[1:]] for i, h in enumerate(header)}
    out: dict[str, np.ndarray] = {}
    for h, vals in cols.items():
        present = [v for v in vals if v.lower() not in _MISSING]
        try:
            if h == "participant_id" or not present:
                raise ValueError
            [float(v) for v in present]
            out[h] = np.array([float(v) if v.lower() not in _MISSING else np.nan for v in vals])
        except ValueError:
            out[h] = np.array(vals, dtype=str)
    ids = out["participant_id"]
    if len(set(ids.tolist())) != ids.size:
        dup = sorted({i for i in ids.tolist() if (ids == i).sum() > 1})
        raise ValueError(f"{path}: duplicate participant_id {dup[:5]}")
    return out


def align(ids: np.ndarray, table: dict[str, np.ndarray], ids_table: np.ndarray, where: str
          ) -> dict[str, np.ndarray]:
    """Rows of ``table`` (keyed by ``ids_table``) in the order of ``ids``; error naming missing ids."""
    pos = {pid: k for k, pid in enumerate(np.asarray(ids_table).tolist())}
    missing = [pid for pid in np.asarray(ids).tolist() if pid not in pos]
    if missing:
        raise ValueError(f"{len(missing)} participant(s) have no phenotypes in {where}: {missing[:5]}")
    idx = np.array([pos[p] for p in np.asarray(ids).tolist()], dtype=np.int64)
    return {k: np.asarray(v)[idx] for k, v in table.items()}


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """A fixed-width, human-readable table of the result rows."""
    head = f"{'scope':<12} {'space':<8} {'variable':<18} {'kind':<11} {'n':>5} {'tau_a':>8} {'tau_b':>8} " \
           f"{'p':>8} {'p_FWE':>8} {'null 95% (tau_a)':>19}  mark"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{str(r['scope'])[:12]:<12} {str(r['space'])[:8]:<8} {str(r['variable'])[:18]:<18} "
            f"{r['kind']:<11} {r['n']:>5d} {r['tau_a']:>8.4f} {r['tau_b']:>8.4f} {r['p']:>8.4f} "
            f"{r['p_fwe']:>8.4f} [{r['null_q025']:>7.4f},{r['null_q975']:>7.4f}]  {'*' if r['marked'] else ''}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, header: dict[str, Any], rows: list[dict], null: np.ndarray,
                  labels: list[str]) -> Path:
    """Write ``null.npz``, ``rsa.csv``, ``rsa.txt`` and (last, as completion marker) ``rsa.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "null.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, null=null, columns=np.array(labels),
                                pairs=np.array([r["pairs"] for r in rows], np.int64),
                                observed=np.array([r["S"] for r in rows], np.int64))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in ROW_KEYS})
    atomic_write_text(out_dir / "rsa.csv", buf.getvalue())
    note = (f"Kendall tau-a RSA, {header['permutations']} subject-label permutations "
            f"({header['config'].get('alternative', 'two-sided')}), FWE by {header['config'].get('fwe')} over "
            f"models x spaces per scope; seed {header['seed']}, {header['ranks']} MPI rank(s).\n"
            f"* = |tau_a| > {MARK_TAU} and p < {MARK_P} (seed paper's criterion).\n\n")
    atomic_write_text(out_dir / "rsa.txt", note + format_table(rows))
    # strict JSON: undefined statistics (e.g. tau-b of a constant model) become null
    clean = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]
    atomic_write_json(out_dir / "rsa.json", {**header, "results": clean})
    return out_dir / "rsa.json"
