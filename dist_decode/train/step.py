"""One optimiser step of a fold, and the loss terms of a batch.

A step: the model's forward pass with reparameterisation noise seeded by (seed, step, rank), the loss, DeepSpeed's
backward and step, then one step of the TC discriminator's own optimiser (its gradients averaged over ranks by
hand: it is not part of the engine). The loss terms of every rank are summed in one all-reduce, together with the
"a rank was signalled" flag, so every rank agrees on when to stop.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_decode.config import RunConfig
from dist_decode.model import anchor_loss, decode_sz_loss, discriminator_loss, loss_kind
from dist_decode.train.engine import Engine, step_seed

#: Loss terms of the DECODE-SZ loss and of the anchor's loss (every rank reports all of them, in this order).
DECODE_SZ_TERMS = ("control_s", "kl_c_controls", "kl_c_patients", "kl_s_patients", "match_c", "recon",
                   "recon_controls", "recon_patients", "tc", "total")
ANCHOR_TERMS = ("disc", "kl", "recon", "tc", "total")


class Stepper:
    """Loss, training step and discriminator step of one fold on one rank."""

    def __init__(self, cfg: RunConfig, parts: Engine, mask_index: torch.Tensor, noise_var: float | None,
                 rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.parts, self.mask_index, self.noise_var = cfg, parts, mask_index, noise_var
        self.rank, self.world, self.device = rank, world, device
        self.kind = loss_kind(cfg)
        self.control_s = self.kind == "decode_sz" and cfg.loss.control_s_weight > 0
        self.term_names = ANCHOR_TERMS if self.kind == "anchor2022" else DECODE_SZ_TERMS

    def forward(self, x: torch.Tensor, patient: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, dict]:
        """Loss, its terms and the model's outputs of one batch (reparameterisation noise from ``seed``)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = self.parts.engine(x, patient, generator=gen, control_s=self.control_s)
        if self.kind == "anchor2022":
            total, terms = anchor_loss(out, self.cfg.loss)
        else:
            total, terms = decode_sz_loss(out, self.mask_index, self.cfg.loss, self.parts.disc, self.noise_var)
            if "q_joint" in out:  # the anchor trained with the DECODE-SZ loss: its own discriminator is unused
                total = total + 0.0 * (out["q_joint"].sum() + out["q_shuffled"].sum())
        return total, terms, out

    def step(self, x: torch.Tensor, patient: torch.Tensor, step: int, stop_raised: bool, t_data: float
             ) -> tuple[dict[str, float], bool]:
        """One optimiser step; returns the rank-averaged metrics and whether any rank was signalled to stop."""
        engine = self.parts.engine
        engine.train()
        loss, terms, out = self.forward(x, patient, step_seed(self.cfg.seed, step, self.rank))
        engine.backward(loss)
        engine.step()
        disc_loss = self.disc_step(out) if self.parts.disc is not None else 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        vec = torch.cat([torch.stack([terms[k].float().reshape(()) for k in self.term_names]).to(self.device),
                         torch.tensor([disc_loss, t_data, float(stop_raised)], device=self.device)])
        if self.world > 1:
            dist.all_reduce(vec)  # sums: averaged below; the stop flag is > 0 if any rank was signalled
        vec = vec.cpu().tolist()
        rec = {k: vec[i] / self.world for i, k in enumerate(self.term_names)}
        rec.update(disc_loss=vec[-3] / self.world, data_wait_s=vec[-2] / self.world)
        return rec, vec[-1] > 0

    def disc_step(self, out: dict) -> float:
        """One step of the TC discriminator's own optimiser; gradients averaged over ranks."""
        disc, opt = self.parts.disc, self.parts.disc_opt
        opt.zero_grad(set_to_none=False)
        pidx = out["patient_index"]
        value = 0.0
        if pidx.numel() >= 2:
            dl = discriminator_loss(disc, out["c"][pidx], out["s"])
            dl.backward()
            value = float(dl.detach())
        for p in disc.parameters():
            if p.grad is None:  # fewer than two patients on this rank: contribute zeros
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in disc.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        if self.world > 1:
            dist.all_reduce(flat)
            flat /= self.world
        off = 0
        for g in grads:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        opt.step()
        return value
