"""Find every subject's CAT12 scans (``mwp1`` + ``report/cat_*.xml``) under a cohort folder, and pick one per subject.

CAT12 writes ``mri/`` and ``report/`` next to each input T1, so one root may mix these layouts::

    ROOT/<id>/mri/mwp1<id>.nii[.gz]                                 plain: a folder per subject
    ROOT/mri/mwp1<id>.nii[.gz]                                      flat: CAT12 run on a folder of T1s
    ROOT/sub-X[/ses-Y]/anat/mri/mwp1sub-X[_ses-Y]_T1w.nii[.gz]      BIDS derivatives
    ROOT/sub-X[/ses-Y]/mri/mwp1sub-X[_ses-Y]_T1w.nii[.gz]

and the report of ``mri/mwp1<label>.nii[.gz]`` is ``report/cat_<label>.xml`` beside that ``mri/``. A file belongs to
the subject whose id is the longest ``_``-separated prefix of its label (``sub-01_ses-01_T1w`` -> ``sub-01``; an
id ``01`` also owns ``sub-01_*``); a lone file in ``ROOT/<id>/`` with any other name is that subject's. Its
session is the ``ses-`` entity of the file name, else a ``ses-*`` folder on its path.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: Folders of a cohort that hold no subjects (the synthetic cohort's ground truth).
IGNORED_DIRS = frozenset({"ground_truth", "derivatives_ground_truth"})
#: Deepest ``mri/`` folder searched, counted from the root (``sub-X/ses-Y/anat/mri`` is 4).
MAX_DEPTH = 6

_NII = re.compile(r"^mwp1(?P<label>.+?)\.nii(\.gz)?$")


@dataclass(frozen=True)
class Scan:
    """One CAT12-processed T1 of a subject.

    Attributes
    ----------
    mwp1 : Path
    report : Path or None
        ``report/cat_<label>.xml`` beside ``mri/``, when it exists.
    label : str
        The file name between ``mwp1`` and ``.nii[.gz]``.
    session : str
        Session label without ``ses-`` (``""`` when the scan has none).
    """

    mwp1: Path
    report: Path | None
    label: str
    session: str

    @property
    def session_name(self) -> str:
        """The session label, or ``(none)``."""
        return self.session or "(none)"


@dataclass
class Discovery:
    """Result of :func:`find_scans`.

    Attributes
    ----------
    scans : dict
        participant_id -> its scans in choice order (natural order of session, then label).
    missing : list of str
        Table subjects without any scan.
    unlisted : dict
        Subject named by the file (``sub-X`` or the label) -> files of subjects not in the table.
    """

    scans: dict[str, list[Scan]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unlisted: dict[str, list[Path]] = field(default_factory=dict)


def natural_key(text: str) -> tuple:
    """Sort key putting ``ses-2`` before ``ses-10`` (digit runs compare as numbers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def mwp1_files(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """All ``mri/mwp1*.nii[.gz]`` below ``root`` (hidden and ground-truth folders skipped), in sorted order."""
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


def _session(path: Path, root: Path) -> str:
    parts = _label(path).split("_")
    for part in parts:
        if part.startswith("ses-") and len(part) > 4:
            return part[4:]
    for part in path.relative_to(root).parts[:-1]:
        if part.startswith("ses-") and len(part) > 4:
            return part[4:]
    return ""


def _owner(label: str, ids: set[str]) -> str | None:
    """The id owning a label: the longest ``_``-prefix that is an id (or ``sub-`` + an id)."""
    parts = label.split("_")
    for k in range(len(parts), 0, -1):
        prefix = "_".join(parts[:k])
        if prefix in ids:
            return prefix
        if prefix.startswith("sub-") and prefix[4:] in ids:
            return prefix[4:]
    return None


def _scan(f: Path, root: Path) -> Scan:
    report = f.parent.parent / "report" / f"cat_{_label(f)}.xml"
    return Scan(f, report if report.is_file() else None, _label(f), _session(f, root))


def find_scans(root: str | os.PathLike, ids: list[str]) -> Discovery:
    """Find each subject's scans under a CAT12 output folder (see the module docstring for the layouts).

    Parameters
    ----------
    root : path
        The CAT12 output folder.
    ids : list of str
        participant_id of every table subject.

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    ValueError
        One subject has the same scan twice (same label and session: ``.nii`` and ``.nii.gz``, or two CAT12
        runs of one T1 in two folders), naming the files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CAT12 output folder not found: {root}")
    files = mwp1_files(root)
    idset = set(ids)
    owned: dict[str, list[Path]] = {}
    free: list[Path] = []
    for f in files:
        pid = _owner(_label(f), idset)
        if pid is None:
            free.append(f)
        else:
            owned.setdefault(pid, []).append(f)
    result = Discovery()
    for pid in ids:
        mine = owned.get(pid, [])
        if not mine and (root / pid).is_dir():  # any T1 name inside the subject's own folder
            mine = [f for f in free if root / pid in f.parents]
            free = [f for f in free if f not in mine]
        if not mine:
            result.missing.append(pid)
            continue
        scans = sorted((_scan(f, root) for f in mine),
                       key=lambda s: (natural_key(s.session), natural_key(s.label), str(s.mwp1)))
        seen: dict[tuple[str, str], Scan] = {}
        for s in scans:
            key = (s.session, s.label)
            if key in seen:
                raise ValueError(
                    f"subject {pid}: the same scan twice ({seen[key].mwp1} and {s.mwp1}; label {s.label!r}, session "
                    f"{s.session_name}): keep one file, or point --cat12-root at one CAT12 run"
                )
            seen[key] = s
        result.scans[pid] = scans
    for f in free:
        label = _label(f)
        who = label.split("_")[0] if label.startswith("sub-") else label
        result.unlisted.setdefault(who, []).append(f)
    return result


def choose_scan(
    scans: list[Scan], session: str | None, check: Callable[[Scan], str | None]
) -> tuple[Scan | None, list[dict[str, str]], str | None]:
    """Pick a subject's scan: the first in order (of ``session`` if given) for which ``check`` finds no problem.

    Parameters
    ----------
    scans : list of Scan
        The subject's scans in choice order.
    session : str or None
        Only scans of this session (``ses-`` prefix optional). Ignored for a subject whose scans carry no
        session at all (a site without sessions in a mixed root).
    check : callable
        ``check(scan)`` returns None when the scan is usable, else the problem (header, report, QC).

    Returns
    -------
    chosen : Scan or None
        None when no scan is usable.
    not_used : list of dict
        ``{"file", "session", "reason"}`` for every other scan.
    problem : str or None
        Why nothing was chosen (every scan's problem, or the missing session).
    """
    want = session.removeprefix("ses-") if session else None
    not_used: list[dict[str, str]] = []
    pool = scans
    if want is not None and any(s.session for s in scans):
        pool = [s for s in scans if s.session == want]
        for s in scans:
            if s.session != want:
                not_used.append({"file": str(s.mwp1), "session": s.session_name,
                                 "reason": f"session {s.session_name} not selected (--session {want})"})
        if not pool:
            found = ", ".join(dict.fromkeys(s.session_name for s in scans))
            return None, not_used, f"no scan of session {want} (sessions found: {found})"
    chosen = None
    problems = []
    for s in pool:
        if chosen is not None:
            not_used.append({"file": str(s.mwp1), "session": s.session_name,
                             "reason": f"an earlier scan was chosen ({chosen.mwp1.name})"})
            continue
        problem = check(s)
        if problem is None:
            chosen = s
        else:
            problems.append(problem if len(pool) == 1 else f"session {s.session_name}, {s.mwp1.name}: {problem}")
            not_used.append({"file": str(s.mwp1), "session": s.session_name, "reason": problem})
    if chosen is None:
        return None, not_used, problems[0] if len(problems) == 1 else "no usable scan: " + "; ".join(problems)
    return chosen, not_used, None
