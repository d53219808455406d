"""Validation: the loss terms on the fold's validation subjects, averaged over all of them and every rank."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dist_decode.train.engine import step_seed
from dist_decode.train.inputs import FoldInputs
from dist_decode.train.step import Stepper


def validate(stepper: Stepper, inputs: FoldInputs, rows: np.ndarray, step: int, batch_size: int,
             dtype: torch.dtype) -> dict | None:
    """The validation record at ``step`` (identical on every rank), or None without validation subjects.

    Each rank takes every ``world``-th validation subject; noise is seeded per batch on a stream of its own.
    """
    if not len(rows):
        return None
    rank, world, device = stepper.rank, stepper.world, stepper.device
    mine = rows[rank::world]
    stepper.parts.engine.eval()
    sums: dict[str, float] = {}
    n_local = 0
    with torch.no_grad():
        for b, (x, patient) in enumerate(inputs.batches(mine, batch_size) if len(mine) else []):
            _, terms, _ = stepper.forward(x.to(dtype), patient, step_seed(stepper.cfg.seed, b, rank, stream=1))
            nb = x.shape[0]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * nb
            n_local += nb
    names = stepper.term_names  # identical on every rank, even one without validation subjects
    vec = torch.tensor([sums.get(k, 0.0) for k in names] + [float(n_local)], dtype=torch.float64,
                       device=device)  # NCCL reduces device tensors only
    if world > 1:
        dist.all_reduce(vec)
    vec = vec.cpu()
    n = max(1.0, float(vec[-1]))
    return {"kind": "val", "step": step, "n": int(vec[-1]), **{k: float(vec[i]) / n for i, k in enumerate(names)}}
