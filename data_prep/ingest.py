"""Read and check a CAT12 cohort's files: participants.tsv (+ participants.json), mwp1 volumes, cat_*.xml reports.

Every problem is reported with the subject, file or column it concerns. Problems with the table
itself raise :class:`ValueError` (they must be fixed upstream); problems with one subject's files
are returned as :class:`VolumeError` reasons so the packer can list the subject as excluded.
Finding the files is :mod:`data_prep.discover`; grids and resampling are :mod:`data_prep.grids`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MISSING = {"n/a", ""}
REQUIRED_COLUMNS = ("participant_id", "site", "diagnosis")
#: Columns that must be numeric when present (``n/a`` allowed).
NUMERIC_COLUMNS = frozenset({"age", "education_years", "panss_total", "tiv_ml", "iqr"})
#: Dataset names a shard uses for its own purposes.
RESERVED_COLUMNS = frozenset({"volumes", "checksums", "volume_sum", "resampled"})


class VolumeError(Exception):
    """A subject's file cannot be used; the message is the exclusion reason."""


@dataclass
class Participants:
    """A checked participants.tsv.

    Attributes
    ----------
    path : Path
    columns : list of str
        In file order; ``participant_id`` first is not required.
    rows : dict
        participant_id -> {column: raw string}, in file order.
    kinds : dict
        column -> ``"numeric"`` or ``"text"``.
    """

    path: Path
    columns: list[str]
    rows: dict[str, dict[str, str]]
    kinds: dict[str, str]

    @property
    def ids(self) -> list[str]:
        """Participant ids in file order."""
        return list(self.rows)

    def value(self, pid: str, column: str) -> float | str:
        """Return the typed value (float with NaN for ``n/a``, or str) of one cell."""
        raw = self.rows[pid].get(column, "n/a")
        if self.kinds.get(column) == "numeric":
            return math.nan if raw in MISSING else float(raw)
        return "" if raw in MISSING else raw


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_participants(
    path: str | os.PathLike,
    patient_label: str = "SZ",
    control_label: str = "HC",
    numeric_columns: frozenset[str] | set[str] = NUMERIC_COLUMNS,
    levels: dict[str, str] | None = None,
) -> Participants:
    """Read and check a BIDS participants.tsv.

    Parameters
    ----------
    path : path
        Tab-separated, header row, ``n/a`` for missing values.
    patient_label, control_label : str
        The two allowed values of ``diagnosis``.
    numeric_columns : set of str
        Columns that must hold numbers (or ``n/a``) when present; other columns are numeric when
        every non-missing value is a number, text otherwise.
    levels : dict or None
        ``diagnosis`` levels from participants.json (value -> description), quoted in the error on unknown labels.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Naming the column, line or subject: a missing required column, a reserved or repeated
        column name, a row with the wrong number of fields, an empty or duplicate participant_id,
        a missing site, a non-numeric value in a numeric column; diagnosis values matching neither label (one
        error listing every distinct value found, where each first occurs, and the flags to pass).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"participants table not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        lines = list(csv.reader(fh, delimiter="\t"))
    lines = [ln for ln in lines if any(c.strip() for c in ln)]
    if not lines:
        raise ValueError(f"{path}: empty file (expected a header row)")
    header = [c.strip() for c in lines[0]]
    for col in REQUIRED_COLUMNS:
        if col not in header:
            raise ValueError(f"{path}: missing required column {col!r} (columns: {', '.join(header)})")
    dup_cols = [c for c, n in Counter(header).items() if n > 1]
    if dup_cols:
        raise ValueError(f"{path}: column(s) {dup_cols} appear more than once")
    bad = sorted(set(header) & RESERVED_COLUMNS) + [c for c in header if "/" in c]
    if bad or "" in header:
        raise ValueError(f"{path}: column name(s) {bad or ['(empty)']} are reserved, contain '/' or are empty; rename them")
    rows: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    unknown: dict[str, list[tuple[int, str]]] = {}
    for lineno, fields in enumerate(lines[1:], start=2):
        if len(fields) != len(header):
            raise ValueError(f"{path}, line {lineno}: {len(fields)} fields, header has {len(header)}")
        row = {c: v.strip() for c, v in zip(header, fields)}
        pid = row["participant_id"]
        if pid in MISSING:
            raise ValueError(f"{path}, line {lineno}: empty participant_id")
        if pid in rows:
            raise ValueError(
                f"{path}: duplicate participant_id {pid!r} on lines {first_line[pid]} and {lineno}"
            )
        if row["site"] in MISSING:
            raise ValueError(f"{path}, line {lineno}: subject {pid} has no site")
        if row["diagnosis"] not in (patient_label, control_label):
            unknown.setdefault(row["diagnosis"], []).append((lineno, pid))
        rows[pid] = row
        first_line[pid] = lineno
    if not rows:
        raise ValueError(f"{path}: no subjects (only a header row)")
    if unknown:
        raise ValueError(_unknown_labels_message(path, rows, unknown, patient_label, control_label, levels or {}))
    kinds = {}
    for col in header:
        values = [r[col] for r in rows.values() if r[col] not in MISSING]
        if col in REQUIRED_COLUMNS:
            kinds[col] = "text"
        elif col in numeric_columns:
            for pid, r in rows.items():
                if r[col] not in MISSING and not _is_number(r[col]):
                    raise ValueError(
                        f"{path}, line {first_line[pid]}: subject {pid}: column {col!r} must be numeric "
                        f"(or n/a), got {r[col]!r}"
                    )
            kinds[col] = "numeric"
        else:
            kinds[col] = "numeric" if values and all(_is_number(v) for v in values) else "text"
    return Participants(path, header, rows, kinds)


def _unknown_labels_message(path: Path, rows: dict[str, dict[str, str]], unknown: dict[str, list[tuple[int, str]]],
                            patient: str, control: str, levels: dict[str, str]) -> str:
    """The error for diagnosis values that match neither label: every distinct value and the flags to pass."""
    counts = Counter(r["diagnosis"] for r in rows.values())

    def show(v: str) -> str:
        desc = f" = {levels[v]}" if v in levels else ""
        return f"{v!r}{desc} ({counts[v]} subject{'s' if counts[v] != 1 else ''})"

    where = "; ".join(f"{v!r} first on line {occ[0][0]} (subject {occ[0][1]})" for v, occ in unknown.items())
    return (
        f"{path}: column 'diagnosis' holds value(s) matching neither --patient-label {patient!r} nor "
        f"--control-label {control!r}: {where}. Values found: {', '.join(show(v) for v in sorted(counts))}. "
        "Pass --patient-label LABEL and --control-label LABEL with this cohort's two labels, "
        "or remove the rows of other groups"
    )


def read_participants_json(tsv: str | os.PathLike) -> dict[str, dict] | None:
    """Read the BIDS ``participants.json`` next to a participants.tsv (None when there is none).

    Returns
    -------
    dict or None
        column -> its description object (``Description``, ``Levels``, ``Units``, ...); entries that are not
        objects are left out.

    Raises
    ------
    ValueError
        The file is not JSON, not an object, or a ``Levels`` entry is not an object (naming the file and column).
    """
    path = Path(tsv).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):  # bad input: a ValueError like every other (CLI exit 2)
        raise ValueError(  # noqa: TRY004
            f"{path}: expected a JSON object of column descriptions, got {type(data).__name__}")
    out = {}
    for col, entry in data.items():
        if not isinstance(entry, dict):
            continue
        if "Levels" in entry and not isinstance(entry["Levels"], dict):
            raise ValueError(f"{path}: column {col!r}: 'Levels' must be an object (value -> description), "
                             f"got {entry['Levels']!r}")
        out[str(col)] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Return (shape, affine) of a NIfTI from its header only.

    Raises
    ------
    VolumeError
        The header cannot be read.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise VolumeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, affine


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one mwp1 as a 3-D float32 array with its affine, checking its voxels.

    Raises
    ------
    VolumeError
        Unreadable or truncated file; not 3-D; NaN or infinite voxels. The message names the file and the
        problem.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        img_affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise VolumeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: not a 3-D volume (shape {tuple(data.shape)})")
    bad = ~np.isfinite(data)
    if bad.any():
        n_nan = int(np.isnan(data).sum())
        raise VolumeError(f"{path}: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxels")
    return np.ascontiguousarray(data), img_affine


def read_cat_xml(path: Path) -> tuple[float, float]:
    """Return (vol_TIV in ml, IQR mark) from a CAT12 ``cat_*.xml`` (NaN where absent, empty or ``NaN``).

    Raises
    ------
    VolumeError
        The XML cannot be parsed, or a present field is not a number.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise VolumeError(f"cannot parse CAT12 report {path}: {exc}") from exc

    def number(tag: str) -> float:
        node = root.find(tag)
        if node is None or node.text is None or not node.text.strip():
            return math.nan
        text = node.text.strip().strip("[]").split()[0]
        try:
            return float(text)
        except ValueError as exc:
            raise VolumeError(f"CAT12 report {path}: {tag} is not a number: {node.text!r}") from exc

    return number("subjectmeasures/vol_TIV"), number("qualityratings/IQR")


def iqr_rating(mark: float) -> float:
    """Convert a CAT12 IQR mark (1 best .. 6 worst) to CAT12's percentage rating (105 - 10 mark)."""
    return 105.0 - 10.0 * mark
