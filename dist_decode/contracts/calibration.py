"""``calibration.json``: measured unit costs of every stage, written by ``benchmarks/bench_scale.py`` and read by the
planner (``python -m launch.plan``).

One owner for the format, so the benchmark that writes it and the planner that reads it cannot drift apart. Every
figure comes with the machine it was measured on (:func:`machine_info`); a figure that was not measured (no GPU
has been lent to this project) is ``null``, never a guess: the planner then says which assumption it uses.

Layout (schema 1)::

    {"schema_version": 1, "created": ..., "command": ..., "machine": {...}, "load_avg": {"start": [...], "end": [...]},
     "units": {"pack_s_per_subject": ..., "store_mb_per_volume": ..., "pack_grid": [X, Y, Z],
               "train_s_per_step": {"fp32": ..., "bf16": ...}, "train_batch_size": B, "train_grid": [X, Y, Z],
               "train_threads": 1, "train_setup_s": ..., "gpu_s_per_step": {"fp32": null, "bf16": null},
               "syn_s_per_registration": ..., "syn_grid": [X, Y, Z], "syn_iterations": [...],
               "group_s_per_patient": ..., "group_grid": [X, Y, Z],
               "rsa_s_per_1000_permutations_per_rank": {"1": ..., "2": ...}, "rsa_n": N, "rsa_tests": T},
     "peak_rss_mb": {"demo": {"pack": ..., ...}, "paper": {...}},
     "scales": {"demo": {"subjects": ..., "grid": [...], "largest_site_patients": ...}, "paper": {...}}}
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

#: Version of the calibration layout; the writer sets it, the reader refuses any other.
SCHEMA_VERSION = 1
#: Unit costs the planner needs; each must be present in ``units`` (a value may be null where noted).
REQUIRED_UNITS = ("pack_s_per_subject", "store_mb_per_volume", "pack_grid", "train_s_per_step", "train_batch_size",
                  "train_grid", "train_threads", "syn_s_per_registration", "syn_grid", "group_s_per_patient",
                  "rsa_s_per_1000_permutations_per_rank", "rsa_n")
#: Units that may be null (not measurable on the machine that wrote the file).
NULLABLE_UNITS = ("gpu_s_per_step",)
REQUIRED_KEYS = ("schema_version", "machine", "units", "peak_rss_mb")
STAGES = ("pack", "train", "maps_subject", "maps_group", "rsa")


def machine_info() -> dict[str, Any]:
    """Where a measurement ran: host name, CPU model, cores, memory, torch version, date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        torch_version = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version, gpu = None, None
    return {"hostname": socket.gethostname(), "cpu_model": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "gpu": gpu, "torch": torch_version, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"calibration {path}: {what} (re-run python benchmarks/bench_scale.py to write a current one)")


def read_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """The validated calibration file.

    Raises
    ------
    FileNotFoundError
        No such file (naming how to make one).
    ValueError
        Not a JSON object, another schema version, or a required key or unit missing or not a number; the message
        names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration at {path} (write one with python benchmarks/bench_scale.py)")
    try:
        cal = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not JSON: {exc}") from exc
    if not isinstance(cal, dict):
        raise _fail(path, "not a JSON object")
    if cal.get("schema_version") != SCHEMA_VERSION:
        raise _fail(path, f"schema_version {cal.get('schema_version')!r}, this reader reads {SCHEMA_VERSION}")
    for key in REQUIRED_KEYS:
        if key not in cal:
            raise _fail(path, f"missing field {key!r}")
    units = cal["units"]
    if not isinstance(units, dict):
        raise _fail(path, "field 'units' is not an object")
    for key in REQUIRED_UNITS:
        if units.get(key) is None:
            raise _fail(path, f"missing field 'units.{key}'")
    for key in ("train_s_per_step", "rsa_s_per_1000_permutations_per_rank"):
        if not isinstance(units[key], dict) or not units[key]:
            raise _fail(path, f"field 'units.{key}' must be a non-empty object")
        for sub, v in units[key].items():
            if not isinstance(v, (int, float)) or v <= 0:
                raise _fail(path, f"field 'units.{key}.{sub}' must be a positive number, got {v!r}")
    for key in ("pack_s_per_subject", "store_mb_per_volume", "syn_s_per_registration", "group_s_per_patient"):
        if not isinstance(units[key], (int, float)) or units[key] <= 0:
            raise _fail(path, f"field 'units.{key}' must be a positive number, got {units[key]!r}")
    return cal


def write_calibration(path: str | os.PathLike, cal: dict[str, Any]) -> Path:
    """Write ``cal`` (schema version set here) atomically and check that :func:`read_calibration` accepts it."""
    from dist_decode.fsutil import atomic_write_json

    path = Path(path)
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **{k: v for k, v in cal.items()
                                                                   if k != "schema_version"}})
    read_calibration(path)
    return path
