"""What a job executes: one stage command, started the way its cluster expects, with the one time-limit mechanism.

Both routes run stages through :func:`run_stage`: the submitit route (:class:`StageJob`, the callable submitit
pickles) and the plain ``sbatch slurm/*.sh`` route (``exec python -m launch.runner --name N -- CMD...``).

Time limit (SLURM ``--signal=B:USR1@T``): the warning reaches the batch process, which sends SIGUSR1 to the stage
(``srun`` forwards it to every rank), waits until the stage has checkpointed and exited (at most
:data:`CHECKPOINT_GRACE_S`), then requeues the job with ``scontrol requeue``; the requeued job re-runs the same
command and the stage resumes (finished stages are no-ops). Preemption and ``scontrol requeue`` by hand send
SIGTERM to every process of the job, and the stage checkpoints by itself.

- ``mode="slurm"``: torch ranks start with ``srun --ntasks N`` (the trainer reads ``SLURM_PROCID`` /
  ``SLURM_NTASKS`` / ``SLURM_LOCALID``), MPI ranks with ``srun --mpi=pmi2 --ntasks N``.
- ``mode="local"`` (submitit's local executor): a fold job has one submitit task per rank; each exports
  ``TorchDistributedEnvironment`` and runs the trainer. MPI ranks start with the venv's ``mpiexec -n N``.
  SIGTERM/SIGUSR1 sent to the task are forwarded to the stage process.
"""
from __future__ import annotations

import argparse
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
#: The time-limit warning both routes ask SLURM for (``--signal=B:USR1@T``).
WARNING_SIGNAL = signal.SIGUSR1


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


def threads_env(env: dict[str, str]) -> dict[str, str]:
    """One OpenMP/BLAS thread per rank unless the user chose otherwise (oversubscription: 10-40x slower)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def requeue_self() -> None:
    """``scontrol requeue`` this SLURM job (this array task for array jobs)."""
    env = os.environ
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_TASK_ID")
           else env.get("SLURM_JOB_ID"))
    if not job:
        raise StageFailed("time limit near but this is not a SLURM job: nothing to requeue")
    print(f"[launch] requeueing job {job}: the stage resumes from its checkpoint", flush=True)
    subprocess.run(["scontrol", "requeue", job], check=False)


def run_stage(name: str, cmd: list[str], env: dict[str, str], on_slurm: bool) -> int:
    """Run ``cmd`` to its end; returns its exit status (see the module docstring for signals).

    On SLURM the time-limit warning makes the stage checkpoint and the job requeue itself; locally SIGTERM and
    SIGUSR1 are forwarded to the stage.
    """
    print(f"[launch] {name}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    warned: list[float] = []
    previous = {}

    def on_warning(signum, _frame):  # noqa: ANN001 - signal handler signature
        if on_slurm:
            print(f"[launch] {name}: time limit near: SIGUSR1 -> checkpoint, then requeue", flush=True)
            warned.append(time.monotonic())
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1 if on_slurm else signum)

    for sig in ((WARNING_SIGNAL,) if on_slurm else (signal.SIGTERM, signal.SIGUSR1)):
        previous[sig] = signal.signal(sig, on_warning)
    try:
        while True:  # wait in slices: a signal handler must not wait on the child itself (Popen lock)
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if warned and time.monotonic() - warned[0] > CHECKPOINT_GRACE_S:
                    print(f"[launch] {name}: still running {CHECKPOINT_GRACE_S} s after SIGUSR1; requeueing anyway",
                          flush=True)
                    rc = None
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if warned and rc != 0:
        requeue_self()
    return -1 if rc is None else rc


class StageJob(submitit.helpers.Checkpointable):
    """Run one stage command under submitit (checkpointable: a requeued job re-runs the same command).

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
        env = threads_env(dict(os.environ))
        if self.mode == "local":
            # A launcher started inside an allocation must not make local ranks believe they are SLURM tasks.
            for key in [k for k in env if k.startswith("SLURM_")]:
                del env[key]
            if not self.mpi and "SUBMITIT_LOCAL_JOB_ID" in os.environ:
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
                env.update({k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                       "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ})
        cmd = self.command()
        rc = run_stage(self.name, cmd, env, on_slurm=self.mode == "slurm")
        if rc != 0:
            raise StageFailed(f"stage {self.name}: command exited with status {rc}: {' '.join(cmd)}")
        if self.done and not Path(self.done).exists() and (self.mode == "slurm" or _rank0()):
            raise StageFailed(f"stage {self.name}: command succeeded but did not write its completion file {self.done}")
        return self.done or ""


def _rank0() -> bool:
    return os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.runner --name N -- CMD...``: run a stage command the way the submitit route does."""
    p = argparse.ArgumentParser(prog="python -m launch.runner", description=main.__doc__.split("\n")[0],
                                epilog="Used by slurm/*.sh (exec'd, so the batch process receives SLURM's "
                                       "--signal=B:USR1@T time-limit warning).")
    p.add_argument("--name", required=True, help="stage name, for messages")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the stage command (after --)")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    return run_stage(args.name, cmd, threads_env(dict(os.environ)), on_slurm="SLURM_JOB_ID" in os.environ)


if __name__ == "__main__":
    sys.exit(main())
