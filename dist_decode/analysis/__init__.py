"""Analyses of a finished run: numbers the report renders (recovery of planted truth, ...)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dist_decode.fsutil import read_json

log = logging.getLogger("dist_decode.analysis")


def saved_if_current(path: Path, inputs: str, schema: int) -> dict[str, Any] | None:
    """The analysis saved at ``path`` when it was computed from these inputs with this schema, else ``None``."""
    old = read_json(path)
    if isinstance(old, dict) and old.get("inputs") == inputs and old.get("schema") == schema:
        log.info("analysis up to date (%s)", path)
        return old
    return None
