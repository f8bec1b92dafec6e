"""Pretraining under Accelerate: run config, loop, optimizer and schedules, checkpoints, tracking.

from twinlm.training import pretrain
summary = pretrain("configs/pretrain/tiny-clm.yaml", ["training.max_steps=50"])
"""

from twinlm.training.config import RunConfig, load_run_config, parse_overrides


def __getattr__(name: str):
    """PEP 562: the loop (torch, accelerate) is imported on first use, so `twinlm pretrain --help` is fast."""
    if name in ("PretrainingRun", "pretrain"):
        from twinlm.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'twinlm.training' has no attribute {name!r}")


__all__ = ["PretrainingRun", "RunConfig", "load_run_config", "parse_overrides", "pretrain"]
