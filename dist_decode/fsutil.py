"""Atomic file output: every result is written under a temporary name and renamed into place.

A write that fails because the disk is full surfaces as :class:`DiskFull`, naming the path (see
:func:`disk_full_errors`); the temporary file of an atomic write is removed either way.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.x.h5.tmp-123.h5``) so libraries that look at the
    extension (nibabel) still recognise the format. A full disk's ``OSError`` that names no file (a write to an
    open file) is raised again naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffixes}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS and not exc.filename:  # a write to an open file names no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


#: errno values that mean "no room for this write": no space, quota exceeded, file size limit (``RLIMIT_FSIZE``).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: Below this many free bytes a failed write is taken to be a full disk (a failed write fills the disk to the block).
FULL_BELOW_BYTES = 1 << 20


class DiskFull(OSError):
    """A write failed because its filesystem is full (or a quota or file size limit was reached).

    ``errno`` is ENOSPC, EDQUOT or EFBIG; ``str()`` is the message alone (no ``[Errno N]`` prefix).
    """

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this process may still write on the filesystem of ``path`` (its nearest existing parent), or None."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    # root may also use the blocks reserved for it, so it hits ENOSPC only when none is free at all
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


def _full_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``exc`` or an exception it was raised from carries it (errno or text)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e.errno
        for code in DISK_FULL_ERRNOS:  # HDF5 keeps the errno only in its message
            if os.strerror(code) in str(e):
                return code
        e = e.__cause__ or e.__context__
    return None


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write refused for lack of space.

    An ``OSError`` with errno ENOSPC/EDQUOT/EFBIG, or that errno's text in the message (HDF5 errors); failing that,
    when ``path`` is given, any write error with less than :data:`FULL_BELOW_BYTES` left on its filesystem (torch's
    zip writer given a path reports a full disk only as ``RuntimeError: ... unexpected pos ...``).
    """
    if isinstance(exc, DiskFull) or _full_errno(exc) is not None:
        return True
    if path is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(path)
        return free is not None and free < FULL_BELOW_BYTES
    return False


#: What to do about each kind of full.
_ADVICE = {errno.ENOSPC: "free space on that filesystem", errno.EDQUOT: "raise the quota or free space in it",
           errno.EFBIG: "raise the file size limit (ulimit -f)"}


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failed write of ``what`` under ``path`` into :class:`DiskFull` when the disk is full.

    Other errors pass unchanged. The message names the path and says what to do::

        disk full: could not write the checkpoint /scratch/run/folds/A/checkpoints/step000000200 (No space left
        on device; 0.0 MB free on that filesystem); nothing half-written was kept: free space on that filesystem
        and run again

    The caller guarantees the "nothing half-written" part (temporary names, removing what it started).
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc, path):
            raise
        code = _full_errno(exc) or errno.ENOSPC
        target = _failed_file(exc) or Path(path)
        free = free_bytes(target)
        room = f"; {free / 2 ** 20:.1f} MB free on that filesystem" if free is not None else ""
        raise DiskFull(code, f"disk full: could not write {what} {target} ({os.strerror(code)}{room}); nothing "
                             f"half-written was kept: {_ADVICE[code]} and run again") from exc


def _failed_file(exc: BaseException) -> Path | None:
    """The file a failed write was for, when the error (or one it was raised from) names it: the final name for a
    temporary file of :func:`atomic_path` (``.NAME.tmp-PID...`` -> ``NAME``)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = getattr(e, "filename", None)
        if isinstance(e, OSError) and isinstance(name, (str, os.PathLike)) and str(name):
            p = Path(name)
            m = re.fullmatch(r"\.(.+)\.tmp-\d+.*", p.name)
            return p.with_name(m.group(1)) if m else p
        e = e.__cause__ or e.__context__
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def create_once(path: str | os.PathLike, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists: complete or not at all, never overwritten (a hard link of a
    finished temporary file, so concurrent writers cannot half-write it). Returns True when this call created it."""
    path = Path(path)
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        atomic_write_text(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON content of ``path``, or ``default`` when it is missing or unreadable (a file cut by a crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def open_hdf5(path: str | os.PathLike, missing: str) -> Any:
    """Open an HDF5 file for reading: ``FileNotFoundError(missing)`` when absent, a ``ValueError`` naming the file
    when it is not HDF5 (a NIfTI or a file cut by a crash); use it as a context manager."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc


def save_nifti(path: str | os.PathLike, data: Any, affine: Any) -> None:
    """Write a NIfTI volume atomically: float32 (integer arrays keep their type), mm units, MNI sform/qform.

    The sform/qform code 4 (MNI152) is what CAT12 writes, so FSLeyes and MRIcroGL show the images in MNI space.
    """
    import nibabel as nib
    import numpy as np

    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32)
    affine = np.asarray(affine, float)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=4)
    img.set_qform(affine, code=4)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
