"""What both stages' training steps share: the learning-rate schedule, the AdamW step, bf16 autocast, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from par_demo.base_training.config import TrainConfig


def optimizer_step(opt, loss: torch.Tensor, params, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (both stages train this way)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def autocast(tc: TrainConfig):
    """The forward passes of a training step in bf16 when asked (`TrainConfig.bf16`); losses come out fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16)


def checkpoint_path(work: Path, stage: str) -> Path:
    return work / f"stage_{stage}.pt"


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
