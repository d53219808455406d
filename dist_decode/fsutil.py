"""Atomic file output: every result is written under a temporary name and renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix (``.x.h5.tmp-123.h5``) so libraries that look at the
    extension (nibabel) still recognise the format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffixes}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
