"""Seeded permutation blocks and their distribution over MPI ranks.

Block ``b`` of a test family draws its permutations from
``numpy.random.default_rng(SeedSequence(seed, spawn_key=(*family_key, b)))``, which equals the ``b``-th
child of ``SeedSequence(seed, spawn_key=family_key).spawn(...)``. A block's content therefore depends only
on ``(seed, family_key, b)``, never on which rank computes it, so 1, 2 or N ranks produce byte-identical
null distributions. Blocks are dealt round-robin (``b % size == rank``); the per-permutation cost is
uniform, so static scheduling balances the ranks.

mpi4py is imported lazily (:func:`get_comm`), so a plain process never needs an MPI launcher.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: Environment variables set by MPI launchers / SLURM that announce the expected world size.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


def block_rng(seed: int, family_key: tuple[int, ...], block: int) -> np.random.Generator:
    """The generator of one permutation block (depends only on ``seed``, ``family_key`` and ``block``)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*family_key, block)))


def block_sizes(permutations: int, block_size: int) -> list[int]:
    """Sizes of the blocks that make up ``permutations`` draws (the last one may be shorter)."""
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    full, rest = divmod(permutations, block_size)
    return [block_size] * full + ([rest] if rest else [])


def strata_segments(strata: np.ndarray | None, n: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` segments of equal stratum (subjects must be sorted by stratum)."""
    if strata is None:
        return [(0, n)]
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata has shape {strata.shape}, expected ({n},)")
    starts = np.flatnonzero(np.r_[True, strata[1:] != strata[:-1]])
    stops = np.r_[starts[1:], n]
    if len(set(strata[starts].tolist())) != len(starts):
        raise ValueError("strata must be contiguous (sort subjects by stratum first)")
    return list(zip(starts.tolist(), stops.tolist()))


def perm_block(rng: np.random.Generator, size: int, n: int,
               segments: list[tuple[int, int]] | None = None) -> np.ndarray:
    """``size`` uniform random permutations of ``range(n)``, each only within the given segments.

    Returns
    -------
    ndarray, shape (size, n), int64
        Row ``p``: subject ``i`` takes the model value of subject ``p[i]``.
    """
    segments = segments or [(0, n)]
    out = np.empty((size, n), np.int64)
    for a, b in segments:
        out[:, a:b] = rng.permuted(np.broadcast_to(np.arange(a, b), (size, b - a)), axis=1)
    return out


def restrict(perms: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """Restrict permutations of ``range(n)`` to a subset, as local indices ``0..len(members)-1``.

    The relative order in which ``perms`` places the members is kept, which is a uniform permutation of
    the members when ``perms`` is uniform, and stays within stratum when the subjects are sorted by
    stratum and ``perms`` permutes within strata. Every model (with its own missing values) thus sees
    the same relabelling of the subjects it shares with the other models.
    """
    members = np.asarray(members)
    if members.size == n:
        return perms
    inside = np.zeros(n, bool)
    inside[members] = True
    local = np.full(n, -1, np.int64)
    local[members] = np.arange(members.size)
    rows = perms[inside[perms]].reshape(perms.shape[0], members.size)
    return local[rows]


# ------------------------------------------------------------------------------------------------
# MPI
# ------------------------------------------------------------------------------------------------
def launched_size() -> int | None:
    """World size announced by the launcher's environment (PMI, Open MPI, SLURM step), if any."""
    for var in _SIZE_VARS:
        if os.environ.get(var):
            return int(os.environ[var])
    if os.environ.get("SLURM_STEP_ID") is not None and os.environ.get("SLURM_NTASKS"):
        # inside an srun step: every task is one rank
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ["SLURM_NTASKS"])
    return None


def get_comm(expect_ranks: int | None = None) -> Any | None:
    """The MPI world communicator, or ``None`` for a plain process; fail loudly on mis-launches.

    Parameters
    ----------
    expect_ranks : int, optional
        Required world size. Without it the size announced by the launcher (``PMI_SIZE``,
        ``SLURM_STEP_NUM_TASKS``...) is required.

    Raises
    ------
    RuntimeError
        When the world size differs from the expected one, e.g. ``srun`` without ``--mpi=pmi2`` (every
        task becomes a singleton of size 1) or an ``mpiexec`` of another MPI than mpi4py's.
    """
    announced = launched_size()
    expected = expect_ranks if expect_ranks is not None else announced
    if announced is None and (expect_ranks is None or expect_ranks == 1):
        return None  # plain process: no launcher, no MPI import
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is an install requirement
        raise RuntimeError(f"launched as {expected} MPI ranks but mpi4py cannot be imported: {exc}") from exc
    comm = MPI.COMM_WORLD
    if expected is not None and comm.Get_size() != expected:
        hint = ("under SLURM launch with `srun --mpi=pmi2`; with mpiexec use the one of mpi4py's MPI "
                "(.venv/bin/mpiexec)")
        raise RuntimeError(f"MPI world size is {comm.Get_size()} but {expected} ranks were expected "
                           f"(launcher environment: {announced}); {hint}")
    return comm


def run_blocks(compute: Callable[[int, int], np.ndarray], sizes: list[int], comm: Any | None,
               count: Callable[[np.ndarray], np.ndarray], n_tests: int, progress: bool = True,
               timing: dict | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Compute every block (``compute(b, size) -> (size, T) int64``), reduce counts, gather the nulls.

    Parameters
    ----------
    compute : callable
        ``compute(block, size)`` returns the block's ``(size, T)`` integer statistics.
    sizes : list of int
        Permutations per block.
    comm : mpi4py communicator or None
        ``None`` runs every block in this process.
    count : callable
        ``count(null_rows) -> (T,)`` int64 exceedance counts of some rows; summed over ranks with
        ``MPI.SUM`` (O(T) bytes) for the marginal p-values.
    n_tests : int
        ``T``, the number of columns.
    progress : bool
        tqdm bar over the blocks of rank 0.
    timing : dict, optional
        Filled on rank 0 with ``blocks_per_rank`` and ``cpu_s_per_rank`` (process CPU seconds each
        rank spent on its blocks), which shows how evenly the work was split.

    Returns
    -------
    null : ndarray (sum(sizes), T) or None
        The null matrix in block order on rank 0 (and in a plain process), ``None`` on other ranks.
    counts : ndarray (T,) or None
        Reduced counts on rank 0, ``None`` on other ranks.
    """
    rank = comm.Get_rank() if comm is not None else 0
    size = comm.Get_size() if comm is not None else 1
    mine = [b for b in range(len(sizes)) if b % size == rank]
    try:
        from tqdm import tqdm

        it = tqdm(mine, desc="permutation blocks", unit="block", disable=not progress or rank != 0)
    except ImportError:  # pragma: no cover
        it = mine
    cpu0 = time.process_time()
    parts = {b: compute(b, sizes[b]) for b in it}
    local = np.zeros(n_tests, np.int64)
    for p in parts.values():
        local += count(p)
    mine_stats = (len(mine), round(time.process_time() - cpu0, 4))
    stats = [mine_stats] if comm is None else comm.gather(mine_stats, root=0)
    if timing is not None and rank == 0:
        timing["blocks_per_rank"] = [s_[0] for s_ in stats]
        timing["cpu_s_per_rank"] = [s_[1] for s_ in stats]
    if comm is None:
        return np.concatenate([parts[b] for b in range(len(sizes))]), local
    from mpi4py import MPI

    counts = np.zeros_like(local)
    comm.Reduce(local, counts, op=MPI.SUM, root=0)
    gathered = comm.gather(parts, root=0)
    if rank != 0:
        return None, None
    allparts: dict[int, np.ndarray] = {}
    for d in gathered:
        allparts.update(d)
    missing = sorted(set(range(len(sizes))) - set(allparts))
    if missing:
        raise RuntimeError(f"permutation blocks {missing} were not computed by any rank")
    return np.concatenate([allparts[b] for b in range(len(sizes))]), counts
