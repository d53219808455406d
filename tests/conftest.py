"""Session fixtures and the environment shared by every test file.

``tiny_cohort``: path of ``python -m data_prep.synth --preset tiny --seed 0`` (4 sites x 10 subjects,
5 SZ / 5 HC per site, 6 mm grid 29x35x29, with ``ground_truth/``). ``tiny_store``: path of that cohort
packed with the default options (Blosc-LZ4, float32, IQR QC at 60 %). Both are built once per session.
``stage_env``: the environment of a stage started as a subprocess. Builders of finished runs with a known planted
effect (for the maps and report tests) are in ``planted_runs.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two cores shared by everything: never let a library start a thread per core; DeepSpeed on the CPU; its JIT-built
# op cached where the test runner builds it. Subprocesses inherit all of it (os.environ).
for _key, _value in (("OMP_NUM_THREADS", "1"), ("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                     ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1"), ("DS_ACCELERATOR", "cpu"),
                     ("PYTHONUNBUFFERED", "1"), ("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))):
    os.environ.setdefault(_key, _value)


@pytest.fixture()
def stage_env() -> dict[str, str]:
    """A copy of the environment for a stage subprocess (edit it freely)."""
    return dict(os.environ)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a synthesized tiny CAT12 cohort (read-only by convention: copy it before damaging it)."""
    from data_prep.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_cohort") / "cohort"
    synthesize(out, preset="tiny", seed=0, n_jobs=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of ``tiny_cohort`` packed into a store (read-only by convention)."""
    from data_prep.pack import pack

    out = tmp_path_factory.mktemp("tiny_store") / "store"
    pack(tiny_cohort, tiny_cohort / "participants.tsv", out, progress=False, n_jobs=1)
    return out
