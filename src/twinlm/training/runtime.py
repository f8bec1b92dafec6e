"""The skeleton every training run shares (pretraining, fine-tuning; evaluate and ablate run those): the
Accelerator built from a run's training section, and the export of a trained model.

The rest of the frame lives beside it: the output folder checked and locked (`twinlm.session.run_folder`),
the engine with its components (`twinlm.training.engine`, `components`), atomic writes (`twinlm.fileio`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
)

from twinlm.config import OptimizerSection
from twinlm.errors import TwinLMError
from twinlm.fileio import atomic_folder
from twinlm.training.engine import NonFiniteError, model_is_finite


def _on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def _single_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 and os.environ.get(
        "ACCELERATE_USE_DEEPSPEED", ""
    ).lower() not in ("1", "true")


def _reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (mixed precision, accumulation) of an earlier run."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build_accelerator(train: OptimizerSection, report_to: str, output_dir: Path) -> Accelerator:
    """Accelerator from a run's training section (pretraining's or fine-tuning's), tracker and output
    folder; the launch config (accelerate launch) picks the distribution."""
    handlers = []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if _on_cpu() and (distributed or deepspeed):
        # Several CPU processes (DeepSpeed in particular) need the process group created by
        # Accelerate, with gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    log_with = None if report_to == "none" else report_to
    if not distributed and not deepspeed:
        _reset_accelerate_state()  # pretrain() may run several times in one process (a demo, tests)
    if _fsdp_asked() and _on_cpu() and distributed and os.environ.get("FSDP_VERSION", "1") != "2":
        raise TwinLMError(
            f"the launch asks for FSDP version {os.environ.get('FSDP_VERSION', '1')} on the CPU; twinlm runs FSDP on "
            "CPU processes only as FSDP2 (fsdp_config: fsdp_version: 2, as in configs/accelerate/fsdp.yaml)"
        )
    if train.mixed_precision == "fp16" and _on_cpu():
        raise TwinLMError("training.mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.grad_accum, sync_with_dataloader=False
        ),
        log_with=log_with,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    if _fsdp_asked() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp2_on_cpu(accelerator, train.mixed_precision)
    check_distribution(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # The run config is the one source of truth for these (DeepSpeed JSON files say "auto").
        ds["train_micro_batch_size_per_gpu"] = train.batch_size
        ds["gradient_accumulation_steps"] = train.grad_accum
        ds["train_batch_size"] = train.batch_size * train.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = train.max_grad_norm or 0.0
        accelerator.state.deepspeed_plugin.gradient_accumulation_steps = train.grad_accum
    return accelerator


def _fsdp_asked() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def _fsdp2_on_cpu(accelerator: Accelerator, mixed_precision: str) -> None:
    """FSDP2 on CPU processes (gloo). accelerate sets FSDP up only for its GPU backends: on CPU processes it
    keeps the launch's FSDP settings aside and runs plain data parallel. torch's FSDP2 (`fully_shard`) runs on a
    CPU device mesh over gloo, and accelerate's FSDP2 path (`fsdp2_prepare_model`, the sharded DCP checkpoints
    of save_state/load_state) asks nothing of the device, so the state accelerate would have set up on GPUs is
    set here: the launch's FSDP plugin, distributed type FSDP. FSDP1 stays GPU-only (refused in one line by
    build_accelerator: accelerate's FSDP1 plugin raises on a CPU)."""
    # from the launch's FSDP_* variables (version 2: checked in build_accelerator)
    plugin = FullyShardedDataParallelPlugin()
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # (AcceleratorState copies its distributed type into PartialState's on GPUs too)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_distribution(accelerator: Accelerator) -> None:
    """TwinLMError when the launch asked for something accelerate did not set up: several processes that
    would each train alone (no gradient sync), or FSDP in a single plain process (accelerate's FSDP needs a
    process group: ACCELERATE_USE_CPU=1 on a CPU, where twinlm sets up FSDP2 itself, `_fsdp2_on_cpu`)."""
    n, kind = accelerator.num_processes, accelerator.distributed_type
    cpu_launch = (
        "on a CPU, launch with ACCELERATE_USE_CPU=1 and --multi_gpu (data parallel), a DeepSpeed config or "
        "configs/accelerate/fsdp.yaml (FSDP2)"
    )
    if n > 1 and kind == DistributedType.NO:
        raise TwinLMError(
            f"{n} processes were launched but accelerate set up no distributed training (each would train alone, "
            f"without gradient sync); {cpu_launch}"
        )
    if _fsdp_asked() and kind != DistributedType.FSDP:
        raise TwinLMError(
            f"the launch asks for FSDP, but accelerate runs "
            f"{'one plain process' if kind == DistributedType.NO else kind.value} here, without sharding; "
            f"{cpu_launch}"
        )


def gather_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, target: Path
) -> dict[str, Any] | None:
    """The model's weights in float32 on the main process (None elsewhere), gathered from every process (ZeRO-3
    shards: all take part); a NonFiniteError instead of a model holding NaN/inf values."""
    if not model_is_finite(model):
        raise NonFiniteError(f"the model holds NaN/inf values: not saved to {target}")
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def save_model_folder(
    model: Any,
    state_dict: dict[str, Any],
    tokenizer: Any,
    target: Path,
    what: str,
    extra: dict[str, str] | None = None,
) -> Path:
    """save_pretrained (safetensors, config, model code) and the tokenizer, plus `extra` files {name: text},
    into `target` atomically (twinlm.fileio): a failure leaves no half-written folder and says what ran out."""
    from twinlm.tokenization import save_plain_backend

    with atomic_folder(target, what) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_plain_backend(tokenizer, Path(tmp))  # no truncation/padding a training call left on it
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return target


__all__ = ["build_accelerator", "gather_state_dict", "save_model_folder"]
