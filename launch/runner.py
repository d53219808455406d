"""What a submitted job executes: one stage command, started the way its cluster expects.

:class:`StageJob` is the callable submitit pickles. It only assembles and runs the stage's command line
(the very command ``slurm/*.sh`` runs); the science is in the ``dist_decode`` entry points.

- ``mode="slurm"`` (submitit with ``use_srun=False``, the callable runs in the batch step): torch ranks start
  with ``srun --ntasks N`` (the trainer reads ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), MPI ranks
  with ``srun --mpi=pmi2 --ntasks N``. SLURM signals every process of the job on preemption or
  ``scontrol requeue``, so the trainer checkpoints by itself and the requeued job resumes.
- ``mode="local"`` (submitit's local executor): a fold job has one submitit task per rank; each exports
  ``TorchDistributedEnvironment`` and runs the trainer. MPI ranks start with the venv's ``mpiexec -n N``.
  SIGTERM/SIGUSR1 sent to the task are forwarded to the stage process.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit


#: Seconds a stage may take to checkpoint after the time-limit warning before the job is requeued anyway.
CHECKPOINT_GRACE_S = 90


class StageFailed(RuntimeError):
    """A stage command exited non-zero or did not write its completion file."""


def mpiexec_path() -> str:
    """The MPICH ``mpiexec`` of this interpreter's venv (pip's ``mpich`` wheel), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("mpiexec not found next to the interpreter or on PATH; install the 'mpich' wheel")
    return found


def _threads_env(env: dict[str, str]) -> dict[str, str]:
    # Oversubscribed OpenMP threads make small-machine steps 10-40x slower; one thread per rank unless the
    # user chose otherwise.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


class StageJob(submitit.helpers.Checkpointable):
    """Run one stage command; checkpointable, so submitit requeues it on timeout/preemption.

    Requeueing re-runs the same command; the trainer resumes from its latest checkpoint and finished stages
    are no-ops, so no state needs to be carried over.

    Parameters
    ----------
    name : str
        Stage name (for messages).
    argv : list of str
        ``[python, -m, module, args...]`` of one task.
    ntasks : int
        Ranks of the stage.
    mpi : bool
        MPI ranks (``srun --mpi=pmi2`` / ``mpiexec``) instead of torch.distributed ranks.
    mode : {"slurm", "local"}
        How ranks are started (see the module docstring).
    done : str or None
        Completion file that must exist after a successful run (None: not checked).
    """

    def __init__(self, name: str, argv: list[str], ntasks: int, mpi: bool, mode: str, done: str | None) -> None:
        if mode not in ("slurm", "local"):
            raise ValueError(f"mode must be 'slurm' or 'local', got {mode!r}")
        self.name = name
        self.argv = list(argv)
        self.ntasks = int(ntasks)
        self.mpi = bool(mpi)
        self.mode = mode
        self.done = done

    def command(self) -> list[str]:
        """The full command line this job runs (per task in local torch mode)."""
        if self.mode == "slurm":
            if self.mpi:
                return ["srun", "--mpi=pmi2", f"--ntasks={self.ntasks}", "--kill-on-bad-exit=1", *self.argv]
            if self.ntasks > 1 or self.argv[2] == "dist_decode.train":
                return ["srun", f"--ntasks={self.ntasks}", "--kill-on-bad-exit=1", *self.argv]
            return list(self.argv)
        if self.mpi and self.ntasks > 1:
            return [mpiexec_path(), "-n", str(self.ntasks), *self.argv]
        return list(self.argv)

    def __call__(self) -> str:
        env = _threads_env(dict(os.environ))
        if self.mode == "local":
            # A launcher started inside an allocation must not make local ranks believe they are SLURM tasks.
            for key in [k for k in env if k.startswith("SLURM_")]:
                del env[key]
            if not self.mpi and "SUBMITIT_LOCAL_JOB_ID" in os.environ:
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
                env.update({k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                       "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ})
        cmd = self.command()
        print(f"[launch] {self.name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, env=env)
        previous = {}
        if self.mode == "local":
            def forward(signum, _frame):  # noqa: ANN001 - signal handler signature
                if proc.poll() is None:
                    proc.send_signal(signum)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                previous[sig] = signal.signal(sig, forward)
        else:
            submitit_handler = signal.getsignal(signal.SIGUSR2)

            def checkpoint_first(signum, frame):  # noqa: ANN001 - signal handler signature
                # The time-limit warning (--signal=B:USR2@T) reaches only this batch step. Let the stage
                # checkpoint first (srun forwards SIGUSR1 to every rank); submitit requeues once it has exited
                # (below). Otherwise the ranks would get only SLURM's SIGTERM and KillWait (often 30 s) to save.
                print(f"[launch] {self.name}: time limit near: SIGUSR1 -> checkpoint, then requeue", flush=True)
                warned.append((signum, frame, time.monotonic()))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGUSR1)
            warned: list = []
            previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, checkpoint_first)
        try:
            while True:  # wait in slices: a signal handler must not wait on the child itself (Popen lock)
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if self.mode == "slurm" and warned and time.monotonic() - warned[0][2] > CHECKPOINT_GRACE_S:
                        print(f"[launch] {self.name}: still running {CHECKPOINT_GRACE_S} s after SIGUSR1; requeueing anyway",
                              flush=True)
                        rc = None
                        break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.mode == "slurm" and warned and rc != 0 and callable(submitit_handler):
            submitit_handler(warned[0][0], warned[0][1])  # checkpoint (re-run this job) + scontrol requeue + exit
        if rc != 0:
            raise StageFailed(f"stage {self.name}: command exited with status {rc}: {' '.join(cmd)}")
        if self.done and not Path(self.done).exists() and (self.mode == "slurm" or _rank0()):
            raise StageFailed(f"stage {self.name}: command succeeded but did not write its completion file {self.done}")
        return self.done or ""


def _rank0() -> bool:
    return os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0") == "0"
