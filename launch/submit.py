"""Submit a whole LOSO run: one job per fold, then maps, the MPI RSA and the report, chained.

``python -m launch.submit --store STORE --run-dir RUN --folds all [--wait]``

Through submitit: on SLURM (auto-detected, or ``--cluster slurm``) every stage is a batch job and the chain
is expressed with ``--dependency=afterok``; this command returns once everything is queued (``--wait``
follows the jobs until the report exists). With ``--cluster local`` (no SLURM) the stages run as local
submitit jobs on this machine, at most ``--max-parallel`` ranks at a time, and this command stays in the
foreground until the run is finished.

Idempotent: finished stages (their completion file exists) are skipped, queued or running jobs of an
earlier submission are reused, failed/cancelled/preempted ones are resubmitted. The launcher computes no
science; each job runs the same ``python -m dist_decode.<stage>`` command as ``slurm/*.sh``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from tqdm import tqdm

from dist_decode.cli import setup_logging
from dist_decode.config import PROFILES
from dist_decode.contracts.run import RunDir, bind, resolve_config
from dist_decode.fsutil import atomic_write_json
from dist_decode.provenance import now_utc
from launch import slurmctl
from launch.runner import StageJob
from launch.stages import Stage, build_plan, parse_folds, read_store_sites
from launch.status import format_status

log = logging.getLogger("launch.submit")

#: SLURM states after which a stage that is not finished must be submitted again.
RETRY_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "UNKNOWN"}


# -- options -----------------------------------------------------------------------------------------
def add_scheduling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``launch.submit`` and ``launch.demo`` (everything but store/run/config)."""
    g = p.add_argument_group("scheduling")
    g.add_argument("--folds", default="all", help="'all' (every site that can be held out) or indices, e.g. '0,3' or '0-3' (default: all)")
    g.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="where jobs run: 'auto' = SLURM when sinfo answers, else local (default: auto)")
    g.add_argument("--gpus-per-fold", type=int, default=0, help="GPUs per fold job, one rank per GPU (default: 0 = CPU)")
    g.add_argument("--tasks-per-fold", type=int, default=None,
                   help="data-parallel ranks per fold (default: --gpus-per-fold, or 1 on CPU)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPU cores per fold rank (default: 1)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per fold job (default: 1)")
    g.add_argument("--rsa-ranks", type=int, default=2, help="MPI ranks of the RSA job (default: 2)")
    g.add_argument("--maps-cpus", type=int, default=1, help="CPU cores per maps job (default: 1)")
    g.add_argument("--partition", default=os.environ.get("DD_PARTITION"), help="SLURM partition (default: $DD_PARTITION or the cluster default)")
    g.add_argument("--account", default=os.environ.get("DD_ACCOUNT"), help="SLURM account (default: $DD_ACCOUNT or none)")
    g.add_argument("--time", type=int, default=240, help="time limit of a fold job in minutes (default: 240)")
    g.add_argument("--stage-time", type=int, default=120, help="time limit of maps/RSA/report jobs in minutes (default: 120)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="SLURM: seconds before the time limit at which a job checkpoints and requeues itself (default: 120)")
    g.add_argument("--max-parallel", type=int, default=None,
                   help="local cluster only: ranks running at once (default: the number of CPU cores)")
    g.add_argument("--maps-split", choices=["fold", "subject", "none"], default="fold",
                   help="how the maps stage spreads out: one job per fold behind it ('fold', default), its "
                        "per-subject work split over --maps-jobs jobs by subject ('subject'), or one job ('none'); "
                        "each is followed by one combining job")
    g.add_argument("--maps-jobs", type=int, default=2, help="jobs of --maps-split subject (default: 2)")
    g.add_argument("--wait", action="store_true", help="follow the jobs until the report exists (always on for --cluster local)")
    g.add_argument("--poll", type=float, default=0.5, help="seconds between status polls with --wait (default: 0.5)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the commands, submit nothing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="packed store (data_prep.pack output)")
    p.add_argument("--run-dir", required=True, help="run directory (created if missing)")
    p.add_argument("--config", help="RunConfig JSON of a new run (written to RUN/config.json, which every stage reads)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="named settings for a new run (default gpu: full grid; cpu: cohorts at 3-4 mm on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=VALUE",
                   help="config override of a new run (an existing run keeps its config.json); repeatable")
    add_scheduling_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# -- state ------------------------------------------------------------------------------------------
class RunState:
    """``RUN/launch/jobs.json``: the job of every stage and, for local jobs, how it ended."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "launch" / "jobs.json"
        self.jobs: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.jobs = json.loads(self.path.read_text()).get("jobs", {})
            except (json.JSONDecodeError, AttributeError):
                log.warning("%s is unreadable; starting a fresh job record", self.path)

    def record(self, name: str, **fields: Any) -> None:
        entry = self.jobs.setdefault(name, {})
        entry.update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"jobs": self.jobs})


def save_plan(run_dir: Path, stages: list[Stage], cluster: str, store: Path) -> None:
    """``RUN/launch/plan.json``: what ``launch.status`` needs to report on the run later."""
    atomic_write_json(run_dir / "launch" / "plan.json", {
        "store": str(store), "cluster": cluster, "written": now_utc(),
        "stages": [{"name": s.name, "kind": s.kind, "fold": s.fold, "deps": s.deps, "ntasks": s.ntasks,
                    "mpi": s.mpi, "done": str(s.done), "argv": s.argv()} for s in stages],
    })


def stage_finished(stage: Stage, state: RunState) -> bool:
    """Finished: its completion file exists; a per-fold maps part also counts once its job completed."""
    if stage.is_done():
        return True
    return stage.kind == "maps_fold" and state.jobs.get(stage.name, {}).get("state") == "COMPLETED"


def resolve_cluster(choice: str) -> str:
    """``auto`` -> ``slurm`` when the controller answers, else ``local``."""
    if choice == "auto":
        return "slurm" if slurmctl.slurm_available() else "local"
    if choice == "slurm" and not slurmctl.slurm_available():
        raise ValueError("--cluster slurm: no SLURM controller answers (sinfo failed); start one "
                         "(bash scripts/slurm_up.sh) or use --cluster local")
    return choice


# -- the launcher -------------------------------------------------------------------------------------
class Launcher:
    """Plans a run and hands its stages to submitit (SLURM or local).

    Parameters
    ----------
    store, run_dir : pathlib.Path
        Packed store and run directory.
    stages : list of Stage
        The plan (:func:`launch.stages.build_plan`).
    cluster : {"slurm", "local"}
    opts : argparse.Namespace
        Scheduling options (see :func:`add_scheduling_args`).
    """

    def __init__(self, store: Path, run_dir: Path, stages: list[Stage], cluster: str, opts: argparse.Namespace) -> None:
        self.store = store
        self.run_dir = run_dir
        self.stages = stages
        self.by_name = {s.name: s for s in stages}
        self.cluster = cluster
        self.opts = opts
        self.state = RunState(run_dir)
        self.log_root = run_dir / "launch" / "logs"

    # submitit --------------------------------------------------------------------------------------
    def _executor(self, stage: Stage, dependency: list[str]) -> Any:
        o = self.opts
        ex = submitit.AutoExecutor(folder=str(self.log_root / "%j"), cluster=self.cluster)
        is_fold = stage.kind == "fold"
        nodes = max(1, o.nodes) if is_fold else 1
        if self.cluster == "local":
            # Local fold ranks are submitit tasks (TorchDistributedEnvironment); MPI ranks come from mpiexec.
            ex.update_parameters(name=f"dd-{stage.name}", timeout_min=(o.time if is_fold else o.stage_time),
                                 tasks_per_node=(stage.ntasks if is_fold else 1), nodes=1,
                                 stderr_to_stdout=True)
            return ex
        extra: dict[str, Any] = {"kill-on-invalid-dep": "yes", "requeue": True,
                                 # Only the batch step (StageJob under submitit) gets the time-limit warning: it
                                 # makes the stage checkpoint, then requeues (launch.runner, as slurm/*.sh do)
                                 "signal": f"B:USR1@{max(10, o.signal_delay)}"}
        if dependency:
            extra["dependency"] = "afterok:" + ":".join(dependency)
        # The batch shell must *be* the submitit process: a B: signal reaches only the batch shell, and bash
        # would die of it (or defer a trap until its foreground child ends). So exec into submitit.
        folder = shlex.quote(str(self.log_root / "%j"))
        setup = ["export SUBMITIT_EXECUTOR=slurm",
                 f"exec {shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"]
        params: dict[str, Any] = dict(
            name=f"dd-{stage.name}", timeout_min=(o.time if is_fold else o.stage_time), nodes=nodes,
            tasks_per_node=max(1, stage.ntasks // nodes),
            cpus_per_task=(o.cpus_per_task if is_fold else (o.maps_cpus if stage.kind.startswith("maps") else 1)),
            stderr_to_stdout=True, slurm_use_srun=False, slurm_additional_parameters=extra, slurm_setup=setup,
        )
        if is_fold and o.gpus_per_fold:
            params["gpus_per_node"] = max(1, o.gpus_per_fold // nodes)
        if o.partition:
            params["slurm_partition"] = o.partition
        if o.account:
            params["slurm_account"] = o.account
        ex.update_parameters(**params)
        return ex

    def _job(self, stage: Stage) -> StageJob:
        # Per-fold maps parts have no completion file of their own: only their exit status counts.
        done = None if stage.kind == "maps_fold" else str(stage.done)
        return StageJob(stage.name, stage.argv(), stage.ntasks, stage.mpi, self.cluster, done)

    # SLURM -----------------------------------------------------------------------------------------
    def submit_slurm(self) -> dict[str, str]:
        """Queue every unfinished stage with afterok dependencies; reuse live jobs. Returns name -> job id."""
        live: dict[str, str] = {}
        for st in self.stages:
            if stage_finished(st, self.state):
                log.info("%-8s done (%s)", st.name, st.done)
                continue
            prev = self.state.jobs.get(st.name, {})
            if prev.get("cluster") == "slurm" and prev.get("job_id"):
                info = slurmctl.job_info(prev["job_id"])
                state = (info or {}).get("JobState", "UNKNOWN").split()[0]
                reason = (info or {}).get("Reason", "")
                if state in slurmctl.ACTIVE and "DependencyNeverSatisfied" not in reason:
                    live[st.name] = prev["job_id"]
                    log.info("%-8s already queued: job %s (%s)", st.name, prev["job_id"], state)
                    continue
                if state in slurmctl.ACTIVE:  # waiting forever on a failed upstream job: replace it
                    slurmctl.cancel(prev["job_id"])
                elif state == "COMPLETED" and st.kind == "maps_fold":
                    self.state.record(st.name, state="COMPLETED")
                    continue
                elif state not in RETRY_STATES and state != "COMPLETED":
                    log.debug("%s: previous job %s in state %s", st.name, prev["job_id"], state)
                log.info("%-8s resubmitting (previous job %s: %s)", st.name, prev["job_id"], state)
            deps = [live[d] for d in st.deps if d in live]
            job = self._executor(st, deps).submit(self._job(st))
            live[st.name] = str(job.job_id)
            self.state.record(st.name, cluster="slurm", job_id=str(job.job_id), submitted=now_utc(), state="SUBMITTED",
                              log=str(self.log_root / str(job.job_id)))
            log.info("%-8s submitted: job %s%s", st.name, job.job_id,
                     f" (after {','.join(deps)})" if deps else "")
        return live

    def wait_slurm(self, live: dict[str, str]) -> bool:
        """Follow the queued jobs until the report exists or nothing can run any more; True on success."""
        poll = max(0.1, self.opts.poll)
        last: dict[str, str] = {}
        bar = tqdm(total=len(self.stages), desc="stages done", unit="stage", file=sys.stderr, disable=None)
        try:
            while True:
                n_done, pending = 0, 0
                for st in self.stages:
                    jid = live.get(st.name)
                    info = slurmctl.job_info(jid) if jid else None
                    state = (info or {}).get("JobState", "UNKNOWN").split()[0] if jid else "DONE"
                    if state == "COMPLETED" and st.kind == "maps_fold":
                        self.state.jobs.get(st.name, {})["state"] = "COMPLETED"
                    if stage_finished(st, self.state) or (jid is None):
                        n_done += 1
                        state = "DONE"
                    elif state in slurmctl.ACTIVE:
                        pending += 1
                    label = state
                    if info and state == "PENDING":
                        label += f" ({info.get('Reason', '')})"
                    if info and int(info.get("Restarts", "0") or 0):
                        label += f" restarts={info['Restarts']}"
                    if last.get(st.name) != label:
                        if st.name in last or label != "DONE":
                            tqdm.write(f"{st.name:<8} {label}" + (f"  job {jid}" if jid else ""), file=sys.stderr)
                        last[st.name] = label
                        if jid and state != "DONE":
                            self.state.jobs.setdefault(st.name, {})["state"] = state
                bar.n = n_done
                bar.refresh()
                if n_done == len(self.stages):
                    self.state.save()
                    return True
                if pending == 0:
                    self.state.save()
                    return False
                time.sleep(poll)
        finally:
            bar.close()

    # local -----------------------------------------------------------------------------------------
    def run_local(self) -> bool:
        """Run the plan with the local submitit executor, respecting dependencies; True when all finished."""
        slots = self.opts.max_parallel or os.cpu_count() or 1
        finished = {s.name for s in self.stages if stage_finished(s, self.state)}
        for name in sorted(finished):
            log.info("%-8s done", name)
        failed: dict[str, str] = {}
        running: dict[str, Any] = {}
        todo = [s for s in self.stages if s.name not in finished]
        bar = tqdm(total=len(self.stages), initial=len(finished), desc="stages done", unit="stage", file=sys.stderr, disable=None)
        try:
            while todo or running:
                # start whatever is ready and fits
                for st in list(todo):
                    bad = [d for d in st.deps if d in failed]
                    if bad:
                        failed[st.name] = f"not run: {', '.join(bad)} failed"
                        self.state.record(st.name, cluster="local", state="CANCELLED", reason=failed[st.name])
                        tqdm.write(f"{st.name:<8} CANCELLED ({failed[st.name]})", file=sys.stderr)
                        todo.remove(st)
                        continue
                    if not all(d in finished for d in st.deps):
                        continue
                    used = sum(self.by_name[n].ntasks for n in running)
                    if running and used + st.ntasks > slots:
                        continue
                    job = self._executor(st, []).submit(self._job(st))
                    running[st.name] = job
                    todo.remove(st)
                    self.state.record(st.name, cluster="local", job_id=str(job.job_id), submitted=now_utc(),
                                      state="RUNNING", log=str(self.log_root / str(job.job_id)))
                    tqdm.write(f"{st.name:<8} RUNNING  local job {job.job_id}", file=sys.stderr)
                # collect finished jobs
                for name, job in list(running.items()):
                    if not job.done():
                        continue
                    del running[name]
                    exc = job.exception()
                    if exc is None:
                        finished.add(name)
                        self.state.record(name, state="COMPLETED", ended=now_utc())
                        bar.update(1)
                        tqdm.write(f"{name:<8} COMPLETED", file=sys.stderr)
                    else:
                        msg = str(exc).strip().splitlines()
                        reason = next((m for m in reversed(msg) if "StageFailed" in m or "exited with" in m),
                                      msg[-1] if msg else "failed")
                        failed[name] = reason
                        logs = self.log_root / str(job.job_id)
                        self.state.record(name, state="FAILED", ended=now_utc(), reason=reason)
                        tqdm.write(f"{name:<8} FAILED   ({reason.strip()}); logs: {logs}", file=sys.stderr)
                if todo or running:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            for name, job in running.items():
                log.warning("interrupted: cancelling %s (local job %s)", name, job.job_id)
                job.cancel(check=False)
                self.state.record(name, state="CANCELLED", reason="launcher interrupted")
            raise
        finally:
            bar.close()
        return not failed


def plan_run(store: Path, run_dir: Path, opts: argparse.Namespace, train_args: list[str]) -> list[Stage]:
    """Read the store, select folds and build the stage graph."""
    sites, ineligible = read_store_sites(store)
    for site, why in ineligible.items():
        log.info("site %s cannot be held out (its subjects train every fold): %s", site, why)
    folds = parse_folds(opts.folds, sites, ineligible)
    tasks = opts.tasks_per_fold or (opts.gpus_per_fold or 1)
    if opts.nodes < 1 or tasks % max(1, opts.nodes):
        raise ValueError(f"--tasks-per-fold {tasks} must be a positive multiple of --nodes {opts.nodes}")
    return build_plan(store, run_dir, folds, sites, tasks_per_fold=tasks, rsa_ranks=opts.rsa_ranks,
                      train_args=train_args, maps_split=opts.maps_split, maps_jobs=max(1, opts.maps_jobs),
                      maps_cpus=max(1, opts.maps_cpus),
                      subset=len(folds) < len(parse_folds("all", sites, ineligible)))


def launch(store: Path, run_dir: Path, opts: argparse.Namespace) -> int:
    """Plan, submit and (optionally) wait. Returns the process exit status.

    The run directory is bound to ``store`` and its config already (every stage reads ``RUN/config.json``).
    """
    store, run_dir = store.absolute(), run_dir.absolute()
    return execute(plan_run(store, run_dir, opts, []), store, run_dir, opts)


def execute(stages: list[Stage], store: Path, run_dir: Path, opts: argparse.Namespace) -> int:
    """Submit a plan (or print it with ``--dry-run``) and, locally or with ``--wait``, follow it to its report.

    ``run_dir`` is where the plan's outputs go (a run directory, or an apply directory for ``launch.apply``): its
    ``launch/`` folder records the plan, the jobs and their logs, and ``report/index.html`` is the last stage's
    completion file. Returns the process exit status.
    """
    cluster = resolve_cluster(opts.cluster)
    if opts.dry_run:
        print(f"cluster: {cluster}\nrun directory: {run_dir}")
        for st in stages:
            state = "done" if st.is_done() else "todo"
            print(f"{st.name:<8} [{state}] ntasks={st.ntasks}{' mpi' if st.mpi else ''} after={','.join(st.deps) or '-'}\n"
                  f"         {' '.join(st.argv())}")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    save_plan(run_dir, stages, cluster, store)
    launcher = Launcher(store, run_dir, stages, cluster, opts)
    log.info("run directory: %s (cluster: %s)", run_dir, cluster)
    if cluster == "local":
        ok = launcher.run_local()
    else:
        live = launcher.submit_slurm()
        print("jobs: " + " ".join(f"{n}={j}" for n, j in live.items()) if live else "jobs: none (everything is finished)")
        print(f"run directory: {run_dir}")
        if not opts.wait:
            print(f"follow with: python -m launch.status --run-dir {run_dir}")
            return 0
        ok = launcher.wait_slurm(live)
    print(format_status(run_dir))
    report = run_dir / "report" / "index.html"
    if report.exists() and ok:
        print(f"report: {report}")
        return 0
    if report.exists():
        print(f"report (partial run): {report}")
    print("some stages did not finish; fix the cause (see the logs above) and re-run the same command: "
          "finished stages are skipped", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    run = RunDir(Path(args.run_dir).absolute())
    try:
        cfg = resolve_config(run, args.config, args.profile, args.overrides)
        if not args.dry_run:
            bind(run, args.store, cfg, created_by="launch.submit")  # refuses another store or config up front
        return launch(Path(args.store), run.path, args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


#: What Ctrl-C means for each cluster.
INTERRUPTED = ("interrupted: SLURM jobs keep running (python -m launch.status --run-dir RUN follows them); "
               "local jobs were cancelled. Re-run the same command to continue.")


if __name__ == "__main__":
    sys.exit(main())
