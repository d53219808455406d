"""Seeded permutation blocks, family-wise correction, and real multi-rank runs (mpiexec, srun --mpi=pmi2)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_decode.rsa import fwe
from dist_decode.rsa.kendall import BITWORD_LEVELS, model_vector
from dist_decode.rsa.permutation import block_rng, block_sizes, get_comm, perm_block, restrict, strata_segments

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")


def test_block_seeds_are_spawn_children_and_blocks_tile_b():
    for b in (0, 3, 17):
        direct = block_rng(42, (1,), b).integers(0, 2**63, 4)
        child = np.random.default_rng(np.random.SeedSequence(42, spawn_key=(1,)).spawn(b + 1)[b])
        assert np.array_equal(direct, child.integers(0, 2**63, 4))
    assert block_sizes(1000, 300) == [300, 300, 300, 100]
    assert block_sizes(500, 500) == [500]
    with pytest.raises(ValueError):
        block_sizes(0, 10)


def test_perm_block_within_strata_and_restriction():
    segs = strata_segments(np.array(list("aaabbbbcc")), 9)
    assert segs == [(0, 3), (3, 7), (7, 9)]
    perms = perm_block(block_rng(1, (0,), 0), 500, 9, segs)
    assert all(sorted(p) == list(range(9)) for p in perms)
    for a, b in segs:
        assert ((perms[:, a:b] >= a) & (perms[:, a:b] < b)).all()
    members = np.array([0, 2, 3, 5, 6, 8])
    local = restrict(perms, members, 9)
    assert all(sorted(p) == list(range(6)) for p in local)
    # restricted relabelling stays within stratum: local 0,1 = stratum a; 2,3,4 = b; 5 = c
    assert set(local[:, :2].ravel()) == {0, 1} and set(local[:, 2:5].ravel()) == {2, 3, 4}
    # and is uniform: every local subject lands at position 2 about equally often
    counts = np.bincount(local[:, 2], minlength=6)[2:5]
    assert counts.min() > 120
    with pytest.raises(ValueError, match="contiguous"):
        strata_segments(np.array(list("aba")), 3)


def test_fwe_corrections():
    rng = np.random.default_rng(0)
    null = rng.integers(-50, 50, size=(999, 5)) * np.array([1, 2, 3, 4, 5])
    obs = np.array([60, -10, 200, 5, 400])
    p = fwe.p_values(fwe.exceed(null, obs), 999)
    for method in ("maxT", "minP"):
        pf = fwe.fwe_correct(null, obs, method)
        assert (pf >= p - 1e-12).all()
        single = fwe.fwe_correct(null[:, :1], obs[:1], method)
        assert single[0] == pytest.approx(p[0])  # one test: FWE = marginal
    assert fwe.p_values(fwe.exceed(null, obs, "greater"), 999)[1] > 0.5
    assert fwe.p_values(fwe.exceed(null, obs, "less"), 999)[1] < 0.6
    with pytest.raises(ValueError):
        fwe.fwe_correct(null, obs, "bonferroni")


def _table(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(2)
    n = 50
    ids = [f"s{i}" for i in range(n)]
    age = rng.integers(20, 60, n).astype(float)
    age_dec = np.round(age + rng.uniform(0, 1, n), 3)
    assert np.unique(model_vector(age_dec, "continuous")).size > BITWORD_LEVELS  # the tree kernel's models
    x = rng.normal(size=(n, 6))
    x[:, 0] += age / 15
    with h5py.File(tmp_path / "F.h5", "w") as f:
        f.create_dataset("participant_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f["A"], f["B"] = x, rng.normal(size=(n, 3))
    rows = ["participant_id\tage\tage_dec\tsex\tsite"] + [
        f"{ids[i]}\t{age[i]}\t{age_dec[i]}\t{'MF'[i % 3 == 0]}\tsite{i % 3}" for i in range(n)]
    (tmp_path / "P.tsv").write_text("\n".join(rows) + "\n")
    return ["--features", str(tmp_path / "F.h5"), "--phenotypes", str(tmp_path / "P.tsv"),
            "--variables", "age:continuous,age_dec:continuous,sex:categorical", "--strata", "site",
            "--permutations", "700", "--block-size", "100", "--seed", "77", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@pytest.mark.mpi
def test_mpiexec_two_ranks_match_plain_process(tmp_path: Path):
    args = _table(tmp_path)
    # the communicator really has 2 ranks
    probe = subprocess.run([MPIEXEC, "-n", "2", PY, "-c",
                            "from dist_decode.rsa.permutation import get_comm; c = get_comm(2); "
                            "r = c.allgather((c.Get_rank(), c.Get_size())); c.Get_rank() or print(r)"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[(0, 2), (1, 2)]"
    one = subprocess.run([PY, "-m", "dist_decode.rsa", *args, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([MPIEXEC, "-n", "2", PY, "-m", "dist_decode.rsa", *args, "--expect-ranks", "2",
                          "--out", str(tmp_path / "two")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "rsa.json").read_text())["ranks"] == 2
    assert json.loads((tmp_path / "one" / "rsa.json").read_text())["ranks"] == 1
    a, b = np.load(tmp_path / "one" / "null.npz"), np.load(tmp_path / "two" / "null.npz")
    assert a["null"].shape == (700, 6) and a["null"].tobytes() == b["null"].tobytes()
    assert (tmp_path / "one" / "rsa.csv").read_bytes() == (tmp_path / "two" / "rsa.csv").read_bytes()


def test_singleton_mislaunch_fails_loudly(tmp_path: Path):
    args = _table(tmp_path)
    res = subprocess.run([PY, "-m", "dist_decode.rsa", *args, "--expect-ranks", "2", "--out", str(tmp_path / "o")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "MPI world size is 1 but 2" in res.stderr
    # what srun without --mpi=pmi2 looks like: 2 tasks announced, each a singleton
    env = {**_env(), "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        env.pop(k, None)
    res = subprocess.run([PY, "-m", "dist_decode.rsa", *args, "--out", str(tmp_path / "o")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "srun --mpi=pmi2" in res.stderr
    assert not (tmp_path / "o").exists()
    assert get_comm() is None  # plain process: no MPI at all


def _slurm_up() -> bool:
    if shutil.which("srun") is None:
        return False
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm_up.sh"), "--status"],
                          capture_output=True).returncode == 0


@pytest.mark.slurm
@pytest.mark.mpi
def test_srun_pmi2_two_ranks(tmp_path: Path):
    if not _slurm_up():
        if os.environ.get("CI") == "true":
            pytest.fail("SLURM is not up under CI=true (scripts/slurm_up.sh)")
        pytest.skip("no single-node SLURM (start it with scripts/slurm_up.sh)")
    args = _table(tmp_path)
    one = subprocess.run([PY, "-m", "dist_decode.rsa", *args, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    cmd = ["srun", "--mpi=pmi2", "-n", "2", "-t", "5", "--mem=400M", PY, "-m", "dist_decode.rsa", *args,
           "--out", str(tmp_path / "srun")]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "srun" / "rsa.json").read_text())["ranks"] == 2
    assert np.load(tmp_path / "srun" / "null.npz")["null"].tobytes() == \
        np.load(tmp_path / "one" / "null.npz")["null"].tobytes()
