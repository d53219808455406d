"""The main job: the whole pipeline on the embedded demo cohort, end to end.

``python -m launch.demo --run-dir runs/demo`` (``make demo``)

1. synthesize the ``demo`` cohort (``data_prep.synth``; 8 sites, ~200 subjects, 3 mm) into ``--cohort``,
2. pack it into ``--store`` (``data_prep.pack``),
3. write the demo ``RunConfig`` to ``RUN/config.json`` (small model and a few hundred steps, so the whole
   run fits in about 15 minutes on a 2-core CPU),
4. hand everything to the :mod:`launch.submit` machinery: all LOSO folds, maps, the MPI RSA, the report --
   on SLURM when a controller answers, else locally -- and wait,
5. print the path of ``RUN/report/index.html``.

Re-running skips finished work (cohort, store, folds, stages).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from dist_decode.cli import setup_logging
from dist_decode.config import RunConfig, profile_config
from dist_decode.contracts.run import RunDir, bind, config_diff
from launch.submit import INTERRUPTED, add_scheduling_args, launch

log = logging.getLogger("launch.demo")

#: The demo runs the ``cpu`` profile (dist_decode.config.PROFILES: encoders on a 6 mm resampling of the 3 mm store,
#: a dense decoder onto the store's brain voxels, 1,000 steps of 16 subjects per fold) with 2,000 RSA permutations.
#: Measured timings and recovery are in docs/science.md and docs/launch.md.
DEMO_PROFILE = "cpu"
DEMO_SETTINGS = [
    "rsa.permutations=2000",
    "rsa.block_size=250",
]


def demo_config(extra: list[str] | None = None) -> RunConfig:
    """The demo's RunConfig: the :data:`DEMO_PROFILE` profile + :data:`DEMO_SETTINGS` + ``extra`` overrides."""
    return profile_config(DEMO_PROFILE, DEMO_SETTINGS + list(extra or []))


def _run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit status {rc}: {' '.join(cmd)}")


def prepare_data(cohort: Path, store: Path, preset: str, seed: int) -> None:
    """Synthesize and pack the cohort unless already done (each step is skipped when its output exists)."""
    py = sys.executable
    if (cohort / "participants.tsv").is_file():
        log.info("cohort %s exists; skipping synthesis", cohort)
    else:
        _run([py, "-m", "data_prep.synth", "--out", str(cohort), "--preset", preset, "--seed", str(seed)],
             "synthesize")
    if (store / "manifest.json").is_file():
        log.info("store %s exists; skipping packing", store)
    else:
        _run([py, "-m", "data_prep.pack", "--cat12-root", str(cohort), "--participants",
              str(cohort / "participants.tsv"), "--out", str(store)], "pack")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--cohort", default="cohorts/demo", help="where the synthetic cohort goes (default: cohorts/demo)")
    p.add_argument("--store", default="stores/demo", help="where the packed store goes (default: stores/demo)")
    p.add_argument("--preset", default="demo", choices=["tiny", "demo", "paper"],
                   help="data_prep.synth preset (default: demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort (default: 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=VALUE",
                   help="extra RunConfig override on top of the demo settings (first run only); repeatable")
    add_scheduling_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.wait = True  # the demo ends with the report
    setup_logging(args.verbose)
    t0 = time.monotonic()
    run_dir = Path(args.run_dir).absolute()
    try:
        prepare_data(Path(args.cohort).absolute(), Path(args.store).absolute(), args.preset, args.seed)
        run = RunDir(run_dir)
        cfg = demo_config(args.overrides)
        if run.config_path.is_file():
            diff = config_diff(run.config(), cfg)
            if diff:
                raise ValueError(f"{run.config_path} exists with other settings ({'; '.join(diff)}); the demo "
                                 "settings and --set apply to a new --run-dir")
            log.info("using the run's existing %s", run.config_path)
        bind(run, Path(args.store).absolute(), cfg, created_by="launch.demo")
        rc = launch(Path(args.store), run_dir, args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    minutes = (time.monotonic() - t0) / 60
    report = run_dir / "report" / "index.html"
    if rc == 0 and report.exists():
        print(f"demo finished in {minutes:.1f} min; open {report}")
    else:
        print(f"demo stopped after {minutes:.1f} min with unfinished stages (see above); re-run to continue",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
