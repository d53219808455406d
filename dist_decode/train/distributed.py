"""Process-group environment for one fold: torchrun, the deepspeed launcher, srun, submitit or a plain process.

DeepSpeed reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from
the environment; when they are missing it falls back to MPI discovery, which fails (or hangs) in a
plain process. :func:`setup_env` fills them in from whatever launched us, before
``deepspeed.init_distributed``:

* torchrun / ``deepspeed`` launcher / submitit (``TorchDistributedEnvironment().export()``): already set;
* ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), ``SLURM_LOCALID``;
  ``MASTER_ADDR`` is the first host of ``SLURM_JOB_NODELIST`` (``SLURM_STEP_NODELIST``), and
  ``MASTER_PORT`` is derived from the job id so that concurrent fold jobs on one node do not collide;
* a plain process: world size 1 on 127.0.0.1 and a free port.
"""
from __future__ import annotations

import fcntl
import importlib
import logging
import os
import re
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Parameters
    ----------
    rank, world_size, local_rank, local_world_size : int
    launcher : str
        ``env`` (torchrun, deepspeed, submitit), ``slurm`` or ``single``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[07-09,12],cpu01`` (-> ``gpu07``)."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"SLURM node list {nodelist!r}: cannot parse")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _tasks_on_first_node(spec: str) -> int:
    """``SLURM_TASKS_PER_NODE``-style spec ``2(x3),1`` -> 2."""
    m = re.match(r"(\d+)", spec.strip())
    return int(m.group(1)) if m else 1


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_env(environ: dict | None = None) -> DistEnv:
    """Fill in the torch.distributed variables of ``environ`` (default ``os.environ``) and describe them."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        env.setdefault("LOCAL_RANK", str(local))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            if world > 1:
                raise ValueError("RANK/WORLD_SIZE are set but MASTER_PORT is not: cannot rendezvous")
            env["MASTER_PORT"] = str(free_port())
        launcher = "env"
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEP_NUM_TASKS" in env):
        # inside an srun step (a batch script's own process has no step id: treat it as single)
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        local = int(env.get("SLURM_LOCALID", "0"))
        local_world = _tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        env.setdefault("MASTER_ADDR", first_host(nodes) if nodes and world > 1 else "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env.setdefault("MASTER_PORT", str(20000 + job % 30000))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(local_world))
        launcher = "slurm"
    else:
        rank, world, local, local_world = 0, 1, 0, 1
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        launcher = "single"
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return DistEnv(rank, world, local, max(1, local_world), launcher)


def set_threads(dist_env: DistEnv) -> int:
    """``torch.set_num_threads(cores // local_world_size)`` unless ``OMP_NUM_THREADS`` is set.

    Oversubscribed OpenMP threads make DeepSpeed CPU steps 10-40x slower (spin-waiting).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    n = max(1, cores // dist_env.local_world_size)
    torch.set_num_threads(n)
    return n


def init_process_group() -> None:
    """``deepspeed.init_distributed`` once per process; the group is kept (DeepSpeed caches groups)."""
    _tolerate_missing_compiler()
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)


def _tolerate_missing_compiler() -> None:
    """Let DeepSpeed's CPU shared-memory all-reduce op fail to build without killing the run.

    On CPU, ``deepspeed.comm`` JIT-compiles ``deepspeed_shm_comm`` (~30 s, cached in
    ``TORCH_EXTENSIONS_DIR``); it needs g++. It only speeds up all-reduce under the deepspeed
    launcher, so when the build fails we log a warning and fall back to plain gloo.
    """
    mod = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm re-exports torch
    original = mod.build_shm_op
    if getattr(original, "_dist_decode_wrapped", False):
        return

    def build_shm_op():
        try:
            with _exclusive_build("deepspeed_shm_comm"):
                return original()
        except Exception as exc:  # compiler missing or broken: plain gloo still works
            log.warning("DeepSpeed shm all-reduce op could not be built (%s); using plain gloo", exc)
            return None

    build_shm_op._dist_decode_wrapped = True  # type: ignore[attr-defined]
    mod.build_shm_op = build_shm_op


class _exclusive_build:
    """Serialise a torch JIT extension build across processes, and clear a build lock left by a killed one.

    torch's own lock (``<build dir>/lock``, a ``FileBaton``) is a plain file: when a builder dies mid-build (a fold
    cancelled, preempted or timed out during its first ~30 s) the file stays and every later process waits on it
    forever, holding its SLURM allocation. An ``fcntl`` lock dies with its holder, so whoever holds ours may treat
    a leftover ``lock`` file as stale.
    """

    def __init__(self, name: str) -> None:
        from torch.utils.cpp_extension import _get_build_directory

        self.build_dir = Path(_get_build_directory(name, verbose=False))
        self.fh = None

    def __enter__(self) -> "_exclusive_build":
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.build_dir / "dist_decode.lock", "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        stale = self.build_dir / "lock"
        if stale.exists():
            log.warning("removing %s left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def cleanup_shm(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer (the deepspeed launcher leaves ~66 MB per rank
    in /dev/shm otherwise); the mapping stays valid until the process exits."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        f.unlink(missing_ok=True)


class StopFlag:
    """Records SIGTERM / SIGUSR1 (SLURM preemption, requeue, scancel) until the next step boundary.

    Use as a context manager; previous handlers are restored on exit (submitit installs its own).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)

    def __enter__(self) -> "StopFlag":
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: the launcher handles signals
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @staticmethod
    def exit_code(signum: int) -> int:
        """Shell convention 128 + signal number (143 for SIGTERM, 138 for SIGUSR1)."""
        return 128 + int(signum)
