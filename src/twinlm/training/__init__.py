"""Pretraining under Accelerate: run config, loop, optimizer and schedules, checkpoints, tracking.

from twinlm.training import pretrain
summary = pretrain("configs/pretrain/tiny-clm.yaml", ["training.max_steps=50"])
"""

from twinlm.training.config import RunConfig, load_run_config, parse_overrides
from twinlm.training.loop import Trainer, pretrain

__all__ = ["RunConfig", "Trainer", "load_run_config", "parse_overrides", "pretrain"]
