"""Train one leave-one-site-out fold with DeepSpeed: ``python -m dist_decode.train --store S --fold K --run-dir R``.

One process per GPU (or per CPU rank), launched by torchrun, ``srun``, the ``deepspeed`` launcher, submitit, or
nothing at all (world size 1). The fold's outputs go to ``RUN/folds/<held-out site>/`` (docs/training.md,
docs/architecture.md): ``config.json``, ``deepspeed.json``, ``metrics.jsonl``, ``checkpoints/``,
``model_final.pt``, ``features.h5`` and, last, ``DONE``. A fold with ``DONE`` is skipped; a fold with a checkpoint
resumes from it.

Modules, in the order a fold uses them: :mod:`.plan` (what the fold trains on; binds the run directory),
:mod:`.distributed` (the process-group environment), :mod:`.inputs` (normalised model inputs),
:mod:`.engine` (DeepSpeed engine, optimisers), :mod:`.step` (one optimiser step), :mod:`.validate`,
:mod:`.checkpoint`, :mod:`.export` (model_final.pt, features.h5) and :mod:`.loop` (the loop that ties them).
"""
from dist_decode.train.engine import deepspeed_config
from dist_decode.train.loop import FoldInterrupted, FoldTrainer, train_fold

__all__ = ["FoldInterrupted", "FoldTrainer", "deepspeed_config", "train_fold"]
