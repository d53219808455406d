"""A real full disk for tests: a private tmpfs that only one subprocess (and its children) sees.

``run_on_small_fs(mount, script)`` runs the bash ``script`` in new mount (and, where needed, user) namespaces with an
empty tmpfs mounted at ``mount`` (``$FS`` in the script). Writes there fail with a real ``ENOSPC`` from the kernel,
exactly as on a full scratch filesystem; nothing is mocked. The mount disappears with the subprocess, so the script
copies what the test must inspect to a folder outside ``$FS``.

Two helpers are defined in the script: ``leave BYTES`` fills ``$FS`` (one ``fallocate``d file) so that exactly
``BYTES`` stay free, ``unfill`` frees that space again ("the user cleared the disk").

How the mount is made, first that works (probed once per session):

1. ``unshare --user --map-root-user --mount``: no privilege needed where unprivileged user namespaces are enabled
   (Debian 11+, Ubuntu, the CI container: measured as ``nobody`` and as root);
2. ``unshare --mount``: root (or CAP_SYS_ADMIN) without user namespaces.

Neither needs a loop device or a pre-made filesystem. Where neither works the tests fail under ``CI=true`` (a full
disk test that skips in CI tests nothing) and skip elsewhere, naming what was tried.
"""
from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

#: The namespace commands tried, in order.
PREFIXES = (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"])
#: tmpfs size: large enough for any test here; ``leave`` sets the free space a test wants.
SIZE = "256m"
_HELPERS = r'''
leave() { local avail; avail=$(df -B1 --output=avail "$FS" | tail -n 1); fallocate -l $((avail - $1)) "$FS/.filler"; }
unfill() { rm -f "$FS/.filler"; }
'''


@functools.lru_cache(maxsize=1)
def _prefix() -> tuple[list[str] | None, str]:
    """The first namespace command that can mount a tmpfs here, and what each attempt said."""
    tried = []
    with tempfile.TemporaryDirectory() as d:
        for prefix in PREFIXES:
            res = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d} && touch {d}/x"],
                                 capture_output=True, text=True)
            if res.returncode == 0 and not os.path.exists(f"{d}/x"):  # mounted, and only inside the namespace
                return prefix, ""
            tried.append(f"{' '.join(prefix)}: rc {res.returncode} {res.stderr.strip()[:200]}")
    return None, "; ".join(tried)


def require_small_fs() -> None:
    """Fail under CI=true, else skip, when no private tmpfs can be mounted here."""
    prefix, tried = _prefix()
    if prefix is None:
        msg = f"cannot mount a private tmpfs to simulate a full disk ({tried})"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def run_on_small_fs(mount: Path, script: str, env: dict[str, str] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """Run bash ``script`` with a private, empty tmpfs at ``mount`` (``$FS``); stdout/stderr are captured."""
    require_small_fs()
    prefix, _ = _prefix()
    mount.mkdir(parents=True, exist_ok=True)
    body = f'set -u\nexport FS="{mount}"\nmount -t tmpfs -o size={SIZE} tmpfs "$FS"\n{_HELPERS}\n{script}\n'
    return subprocess.run([*prefix, "bash", "-c", body], capture_output=True, text=True, env=env, timeout=timeout)


def full_then_room(tmp_path: Path, setup: str, cmd: str, leave: int = 0, after: str = "") -> dict[str, str]:
    """A stage command on a full disk, then the same command once the disk has room again.

    In a private tmpfs (``$FS``): ``setup`` (bash: copy the stage's inputs into ``$FS``), ``leave`` bytes free,
    ``cmd`` (its exit status, stderr and the files it left: every file under ``$FS`` and the temporary names of
    :func:`dist_decode.fsutil.atomic_path`), ``unfill``, ``cmd`` again, then ``after`` (bash, e.g. copying outputs
    out of ``$FS``). Returns ``full_rc``, ``full_err``, ``full_files``, ``full_tmp``, ``again_rc``, ``again_err``.
    """
    out = tmp_path / "full-then-room"
    out.mkdir(parents=True, exist_ok=True)
    res = run_on_small_fs(tmp_path / "fs", f"""
        {setup}
        leave {leave}
        {cmd} > /dev/null 2> {out}/full_err; echo $? > {out}/full_rc
        (cd $FS && find . -type f ! -name .filler | sort) > {out}/full_files
        (cd $FS && find . -name '.*.tmp-*' | sort) > {out}/full_tmp
        unfill
        {cmd} > /dev/null 2> {out}/again_err; echo $? > {out}/again_rc
        {after}
    """, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = {name: (out / name).read_text().strip()
           for name in ("full_rc", "full_err", "full_files", "full_tmp", "again_rc", "again_err")}
    return got
