"""Optimizer and learning-rate schedule: AdamW with no weight decay on biases and norms, warmup then decay."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from twinlm.training.config import TrainingSection

# Our schedule names -> transformers' scheduler names (all include the linear warmup).
SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "inverse_sqrt": "inverse_sqrt",  # Vaswani et al. 2017: lr ~ 1/sqrt(step) after warmup
    "constant": "constant_with_warmup",
}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and biases / norm weights / other vectors (not decayed).

    Vectors are excluded because decaying a bias or a norm gain towards zero only hurts; the rule
    "fewer than 2 dimensions, or a norm's parameter" covers LayerNorm, RMSNorm and BatchNorm.
    """
    decay, no_decay = [], []
    norm_modules = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        or "norm" in type(m).__name__.lower()
        for p in m.parameters(recurse=False)
    }
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in norm_modules else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainingSection, *, cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; DeepSpeed's CPU Adam when ZeRO offloads the optimizer to the CPU."""
    groups = param_groups(model, cfg.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingSection) -> LambdaLR:
    """Warmup for `warmup_steps`, then linear / cosine decay to 0 at `max_steps`, 1/sqrt, or constant.

    The scheduler is stepped once per optimizer step by the training loop (it is not handed to
    Accelerate, which would step it once per process).
    """
    return get_scheduler(
        SCHEDULES[cfg.schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )
