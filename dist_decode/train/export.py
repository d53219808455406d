"""What a finished fold leaves behind: ``model_final.pt``, ``features.h5`` and, last, ``DONE``.

``model_final.pt`` holds fp32 weights (with bf16 and ZeRO >= 1 the fp32 master weights are merged from the final
checkpoint's optimizer partitions), the config, the grid and the fold's noise level; :func:`dist_decode.model.
load_fold_model` rebuilds the model from it. The features are computed with that same fp32 model by
:func:`dist_decode.model.encode.extract_features` (also what ``dist_decode.apply`` encodes a new cohort with).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dist_decode.fsutil import atomic_path
from dist_decode.model.encode import extract_features, subject_generator  # noqa: F401  (the fold's exporter)
from dist_decode.train import checkpoint

log = logging.getLogger("dist_decode.train")


def final_state_dict(engine, fold_dir: Path, steps: int, precision: str, zero_stage: int) -> dict[str, Any]:
    """fp32 weights of the trained model (see the module docstring)."""
    if precision == "bf16" and zero_stage >= 1:
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(fold_dir / "checkpoints"), tag=checkpoint.tag_of(steps))
            if set(sd) == set(engine.module.state_dict()):
                return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                        for k, v in sd.items()}
            log.warning("fp32 master weights incomplete in the final checkpoint; saving the bf16 weights")
        except Exception as exc:  # an unexpected checkpoint layout must not lose a finished fold
            log.warning("could not merge fp32 master weights (%s); saving the bf16 weights", exc)
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in engine.module.state_dict().items()}


def save_model(path: Path, blob: dict[str, Any]) -> None:
    """Write ``model_final.pt`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
