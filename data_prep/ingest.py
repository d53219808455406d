"""Read and check a CAT12 cohort: participants.tsv, the mwp1 files on disk, the cat_*.xml reports.

Every problem is reported with the subject, file or column it concerns. Problems with the table
itself raise :class:`ValueError` (they must be fixed upstream); problems with one subject's files
are returned as :class:`VolumeError` reasons so the packer can list the subject as excluded.
"""
from __future__ import annotations

import csv
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MISSING = {"n/a", ""}
REQUIRED_COLUMNS = ("participant_id", "site", "diagnosis")
#: Columns that must be numeric when present (``n/a`` allowed).
NUMERIC_COLUMNS = frozenset({"age", "education_years", "panss_total", "tiv_ml", "iqr"})
#: Dataset names a shard uses for its own purposes.
RESERVED_COLUMNS = frozenset({"volumes", "checksums", "volume_sum"})
#: Folders of a cohort that hold no subjects (the synthetic cohort's ground truth).
IGNORED_DIRS = frozenset({"ground_truth", "derivatives_ground_truth"})

_NII = re.compile(r"^mwp1(?P<label>.+?)\.nii(\.gz)?$")


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

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Naming the column, line or subject: a missing required column, a reserved or repeated
        column name, a row with the wrong number of fields, an empty or duplicate participant_id,
        a missing site, an unknown diagnosis label, a non-numeric value in a numeric column.
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
            raise ValueError(
                f"{path}, line {lineno}: subject {pid} has unknown diagnosis label {row['diagnosis']!r} "
                f"(expected {patient_label!r} for patients or {control_label!r} for controls)"
            )
        rows[pid] = row
        first_line[pid] = lineno
    if not rows:
        raise ValueError(f"{path}: no subjects (only a header row)")
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


# ---------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------


@dataclass
class SubjectFiles:
    """Where one subject's CAT12 outputs are."""

    mwp1: Path
    report: Path | None


@dataclass
class Discovery:
    """Result of :func:`find_subjects`."""

    found: dict[str, SubjectFiles] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unlisted: list[tuple[str, Path]] = field(default_factory=list)


def _mwp1_files(root: Path, max_depth: int = 4) -> list[Path]:
    """All ``mri/mwp1*.nii[.gz]`` below ``root`` (ignoring hidden and ground-truth folders)."""
    out = []
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (here == root and d in IGNORED_DIRS)
        )
        if len(here.parts) - root_depth >= max_depth:
            dirnames[:] = []
        if here.name == "mri":
            out.extend(here / f for f in sorted(filenames) if _NII.match(f) and not f.startswith("."))
    return out


def _label(path: Path) -> str:
    m = _NII.match(path.name)
    assert m is not None
    return m.group("label")


def find_subjects(root: str | os.PathLike, ids: list[str]) -> Discovery:
    """Find each subject's ``mwp1`` (and ``report/cat_*.xml``) under a CAT12 output folder.

    A subject's file is ``mri/mwp1<id>[_<entities>].nii[.gz]`` in ``root/<id>/.../mri/`` or in
    ``root/mri/`` (CAT12 writes ``mri/`` next to the input T1, so both layouts occur), or the only
    ``mwp1*`` file inside ``root/<id>/``. The report is ``report/cat_<label>.xml`` beside ``mri/``.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    ValueError
        A subject matches several files (naming them).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CAT12 output folder not found: {root}")
    files = _mwp1_files(root)
    by_label: dict[str, list[Path]] = {}
    for f in files:
        by_label.setdefault(_label(f), []).append(f)
    result = Discovery()
    used: set[Path] = set()
    idset = set(ids)
    for pid in ids:
        cands = [f for lab, fs in by_label.items() if lab == pid or lab.startswith(pid + "_") for f in fs]
        # Do not steal a file whose label is exactly another subject's id (pid 'a' vs label 'a_b').
        cands = [f for f in cands if _label(f) == pid or _label(f) not in idset]
        if not cands:
            own = root / pid
            inside = [f for f in files if own in f.parents] if own.is_dir() else []
            if len(inside) == 1:
                cands = inside
        if len(cands) > 1:
            # e.g. both .nii and .nii.gz, or two sessions: guessing would silently pick the wrong scan.
            raise ValueError(
                f"subject {pid}: several mwp1 files match: {', '.join(str(c) for c in cands)}; keep one"
            )
        if not cands:
            result.missing.append(pid)
            continue
        f = cands[0]
        used.add(f)
        report = f.parent.parent / "report" / f"cat_{_label(f)}.xml"
        result.found[pid] = SubjectFiles(f, report if report.is_file() else None)
    result.unlisted = [(_label(f), f) for f in files if f not in used]
    return result


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


def read_volume(path: Path, shape: tuple[int, ...], affine: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """Read one mwp1 as float32 and check it against the cohort grid.

    Raises
    ------
    VolumeError
        Unreadable or truncated file; shape or affine differing from the cohort grid; NaN or
        infinite voxels. The message names the file and the problem.
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
    if tuple(data.shape) != tuple(shape):
        raise VolumeError(f"{path}: shape {tuple(data.shape)} differs from the cohort grid {tuple(shape)}")
    if not np.allclose(img_affine, affine, atol=atol):
        raise VolumeError(
            f"{path}: affine differs from the cohort grid (max difference "
            f"{np.abs(img_affine - affine).max():.4g} mm)"
        )
    bad = ~np.isfinite(data)
    if bad.any():
        n_nan = int(np.isnan(data).sum())
        raise VolumeError(f"{path}: {n_nan} NaN and {int(bad.sum()) - n_nan} infinite voxels")
    return np.ascontiguousarray(data)


def read_cat_xml(path: Path) -> tuple[float, float]:
    """Return (vol_TIV in ml, IQR mark) from a CAT12 ``cat_*.xml`` (NaN where absent).

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


def reference_grid(headers: dict[str, tuple[tuple[int, ...], np.ndarray]]) -> tuple[tuple[int, ...], np.ndarray]:
    """Return the most common (shape, affine) among subjects' headers (ties: first seen)."""
    def key(shape: tuple[int, ...], aff: np.ndarray) -> tuple:
        return shape, tuple(np.round(aff, 3).ravel())

    best = Counter(key(*h) for h in headers.values()).most_common(1)[0][0]
    return next((s, aff) for s, aff in headers.values() if key(s, aff) == best)
