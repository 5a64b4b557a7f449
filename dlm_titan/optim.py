"""AdamW and the SMDM learning-rate schedule (linear warmup, then cosine to min_lr)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from dlm_titan.flops import smdm_warmup_steps


def build_optimizer(model: torch.nn.Module, optimizer_cfg, device_type: str) -> torch.optim.AdamW:
    """AdamW over every parameter with weight decay on all of them, as SMDM (norms and embeddings included).

    Args:
        optimizer_cfg: the ``optimizer`` section.
        device_type: "cuda" picks the fused kernel under implementation = "auto".
    """
    impl = optimizer_cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    return torch.optim.AdamW(
        model.parameters(),
        lr=optimizer_cfg.lr,
        betas=tuple(optimizer_cfg.betas),
        eps=optimizer_cfg.eps,
        weight_decay=optimizer_cfg.weight_decay,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def resolve_warmup_steps(warmup_steps: int, total_steps: int) -> int:
    """-1 means SMDM's max(1% of steps, 100); never longer than the run."""
    warmup = smdm_warmup_steps(total_steps) if warmup_steps < 0 else warmup_steps
    return min(warmup, total_steps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, decay_type: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (1-based): step / warmup during warmup, then a
    decay from 1 to min_ratio that ends exactly at ``total`` and stays there."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if decay_type == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 1.0
    return min_ratio + (1.0 - min_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_cfg, peak_lr: float, total_steps: int) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step; its state is saved with checkpoints."""
    warmup = resolve_warmup_steps(lr_cfg.warmup_steps, total_steps)
    min_ratio = lr_cfg.min_lr / peak_lr
    # LambdaLR calls the function with 0 for the first step; our steps are 1-based.
    return LambdaLR(optimizer, lambda i: lr_factor(i + 1, warmup, total_steps, min_ratio, lr_cfg.decay_type))
