"""Small helpers shared by every ``python -m`` entry point."""
from __future__ import annotations

import logging
import os


def setup_logging(verbose: bool = False) -> None:
    """Log ``time level name: message`` to stderr; rank-prefixed under torch.distributed/MPI."""
    rank = os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s: {prefix}%(message)s",
        datefmt="%H:%M:%S",
    )
