"""Optimizer and learning-rate schedule: AdamW with no weight decay on biases and norms, warmup then decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from twinlm.config import OptimizerSection

# Our schedule names -> transformers' scheduler names (all include the linear warmup).
SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "inverse_sqrt": "inverse_sqrt",  # Vaswani et al. 2017: lr ~ 1/sqrt(step) after warmup
    "constant": "constant_with_warmup",
}
# The schedules that anneal to an end: their factor at progress p in [0, 1] (after warmup).
DECAYS: dict[str, Callable[[float], float]] = {
    "linear": lambda p: max(0.0, 1.0 - p),
    "cosine": lambda p: max(0.0, 0.5 * (1.0 + math.cos(math.pi * p))),
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


FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    model: nn.Module, cfg: OptimizerSection, *, cpu_offload: bool = False, deepspeed: bool = False
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, with torch's fused kernel (as transformers' Trainer: adamw_torch_fused;
    on CPU 4x faster than the default for-each step) where every parameter is a float on the CPU or a CUDA
    GPU and DeepSpeed does not own the step; DeepSpeed's CPU Adam when ZeRO offloads it to the CPU."""
    groups = param_groups(model, cfg.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    params = [p for group in groups for p in group["params"]]
    fused = not deepspeed and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimizerSection,
    total_steps: int | None,
    progress: Callable[[], float] | None = None,
) -> LambdaLR:
    """Warmup (`cfg.warmup_steps_for(total_steps)` steps), then linear / cosine decay to 0 at
    `total_steps`, 1/sqrt, or constant.

    With `progress` (a time budget: a callable giving the run's progress in [0, 1]), linear and cosine
    decay by that progress instead of by step / total_steps, so they reach 0 when the budget is spent;
    the warmup still counts steps. The scheduler is stepped once per optimizer step by the engine (it is
    not handed to Accelerate, which would step it once per process).
    """
    warmup = cfg.warmup_steps_for(total_steps or 0)
    if progress is None or cfg.schedule not in DECAYS:
        return get_scheduler(
            SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
        )
    decay = DECAYS[cfg.schedule]

    def factor(step: int) -> float:  # a function, not an object: LambdaLR does not save it in checkpoints
        return (step / warmup if step < warmup else 1.0) * decay(min(1.0, progress()))

    return LambdaLR(optimizer, factor)
