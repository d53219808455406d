"""The DeepSpeed engine of a fold: precision, the derived DeepSpeed JSON, the model, its optimisers, the LR schedule.

The optimiser is a client ``torch.optim.AdamW`` passed to ``deepspeed.initialize`` (a config-defined optimiser
JIT-compiles FusedAdam for minutes on CPU), so the DeepSpeed JSON lists no optimiser. The TC discriminator of the
DECODE-SZ loss has its own Adam optimiser (FactorVAE's settings) outside the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import deepspeed
import numpy as np
import torch
from torch import nn

from dist_decode.config import RunConfig
from dist_decode.model import build_discriminator, build_model, count_parameters


def resolve_precision(cfg: RunConfig, on_gpu: bool) -> str:
    """``fp32`` or ``bf16`` from ``train.precision`` (``auto``: bf16 on GPU, fp32 on CPU)."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if on_gpu else "fp32"
    return p


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON of a fold, derived from the typed config (written to ``deepspeed.json``)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "gradient_clipping": t.gradient_clipping,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: RunConfig):
    """Multiplier of ``train.lr`` at each step: linear warm-up, then constant or cosine to 0."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "cosine":
            span = max(1, t.steps - t.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - t.warmup_steps) / span)))
        return 1.0

    return f


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """Seed of the reparameterisation noise of (step, rank): a resumed run draws the same noise."""
    s = np.random.SeedSequence([int(seed), int(stream), int(step), int(rank)]).generate_state(1, dtype=np.uint64)[0]
    return int(s) & 0x7FFF_FFFF_FFFF_FFFF


#: parameter-name prefixes of the encoders (DECODE-SZ's C and S encoders, the plain VAE's one encoder)
ENCODER_PREFIXES = ("common.", "specific.", "encoder.")


def param_groups(model: nn.Module, lr: float, encoder_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the encoders at ``lr * encoder_lr_scale``, the rest at ``lr``.

    At scale 1 it is one group, as before the option existed, so checkpoints of earlier runs still resume.
    """
    if encoder_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    enc, rest = [], []
    for name, p in model.named_parameters():
        (enc if name.startswith(ENCODER_PREFIXES) else rest).append(p)
    return [g for g in ({"params": enc, "lr": lr * encoder_lr_scale}, {"params": rest, "lr": lr}) if g["params"]]


@dataclass
class Engine:
    """The trainable parts of a fold."""

    engine: Any
    scheduler: Any
    disc: nn.Module | None
    disc_opt: torch.optim.Optimizer | None
    n_parameters: int
    ds_config: dict[str, Any]
    dtype: torch.dtype


def build_engine(cfg: RunConfig, grid, input_scale: float, mask: torch.Tensor, voxel_mm: float, world: int,
                 precision: str, device: torch.device) -> Engine:
    """The model (seeded by ``cfg.seed``), its DeepSpeed engine and the TC discriminator with its optimiser."""
    ds_config = deepspeed_config(cfg, world, precision)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, grid, input_scale, mask.cpu(), voxel_mm)
    disc = build_discriminator(cfg)
    n_parameters = count_parameters(model) + (count_parameters(disc) if disc else 0)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.lr, cfg.train.encoder_lr_scale), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, dist_init_required=False)
    disc_opt = None
    if disc is not None:
        disc.to(device)
        # FactorVAE's discriminator optimiser settings (Kim & Mnih 2018)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.loss.disc_lr, betas=(0.5, 0.9))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return Engine(engine, scheduler, disc, disc_opt, n_parameters, ds_config, dtype)
