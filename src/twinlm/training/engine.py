"""The training engine shared by pretraining and fine-tuning, in torchtitan's shape:
`train()` -> `train_step()` -> `forward_backward_step()`.

The loop itself only steps. Logging, evaluation, checkpoints, Hub pushes and the stop signal are
components (twinlm.training.components) that decide themselves when they run; every counter they
need, running loss sums included, lives in one `TrainState` that checkpoints save and restore.

The loss of an accumulation window is the mean over all its target tokens (all micro-batches, all
processes): the target tokens of the window are counted first, then each micro-batch's loss is
weighted by its share of them, so `grad_accum=4 x batch 2` steps exactly like `batch 8`. A loss of
several terms with their own targets (replaced-token detection: masked tokens for the generator, every
token for the discriminator) counts a tuple, and the model gets the window's counts as a tensor.
A model output with `metrics` (detached scalars, each a micro-batch's share of its window mean, like the
loss) has them summed over the window and the processes, and logged as means between log lines.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from twinlm.errors import TwinLMError, is_out_of_memory

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "labels")
MAX_CONSECUTIVE_SKIPS = 10  # with nonfinite="skip": a model that keeps producing NaN is broken, stop


class NonFiniteError(TwinLMError):
    """A NaN/inf loss or gradient norm: the run stops before the model (or a checkpoint) is spoiled."""


@dataclasses.dataclass
class TrainState:
    """Every counter of a run; `state_dict()` goes into each checkpoint, so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0  # window losses since the last log line (fine-tuning: the last evaluation)
    loss_steps: int = 0
    metric_sums: dict[str, float] = dataclasses.field(default_factory=dict)  # the outputs' metrics, likewise
    skipped_steps: int = 0  # non-finite steps skipped (nonfinite="skip")
    consecutive_skips: int = 0
    last_grad_norm: float | None = None
    last_loss: float | None = None
    initial_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_eval_step: int = -1
    rate_first: float | None = None  # tokens/s of the first log interval (it includes warm-up)
    rate_sum: float = 0.0  # tokens/s of the later log intervals
    rate_count: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # a component's own counters

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        """Restore from a checkpoint; checkpoints of older versions lack some fields (kept at defaults)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key in names:
                setattr(self, key, value)


class Component(Protocol):
    """A piece of the run that decides itself when to act; every method is called on every process."""

    def on_start(self, engine: Engine) -> None: ...
    def after_step(self, engine: Engine) -> None: ...
    def on_end(self, engine: Engine) -> None: ...


@dataclasses.dataclass
class EngineSettings:
    """When the run ends (max_steps, or max_seconds of training-step time, whichever comes first) and
    how each step runs."""

    max_steps: int | None
    grad_accum: int = 1
    max_grad_norm: float | None = None
    nonfinite: Literal["stop", "skip"] = "stop"
    max_seconds: float | None = None  # a time budget: train_seconds (steps only, no evaluation)


Batch = tuple[int, int, dict[str, torch.Tensor]]  # (epoch, index of the batch in its epoch, batch)


class Engine:
    """Steps a prepared model: windows of `grad_accum` micro-batches, clip, guard, optimizer, schedule."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        batches: Callable[[TrainState], Iterator[Batch]],
        count_targets: Callable[[dict[str, torch.Tensor]], int],
        settings: EngineSettings,
        components: list[Any],
        state: TrainState | None = None,
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.scheduler = (
            accelerator,
            model,
            optimizer,
            scheduler,
        )
        self.batches, self.count_targets, self.settings = batches, count_targets, settings
        self.components = components
        self.state = state or TrainState()
        self.stop_reason: str | None = None  # set by a component: the loop ends after this step
        self._data: Iterator[Batch] | None = None
        self._batch_shape: tuple[int, ...] | None = None
        self._metrics: dict[str, torch.Tensor] = {}  # this window's metric shares (see forward_backward_step)
        forward = inspect.signature(accelerator.unwrap_model(model).forward).parameters
        self.model_normalises = "num_items_in_batch" in forward  # transformers' convention

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def train(self) -> TrainState:
        """Run steps until max_steps, the time budget or a stop request; components act before, between
        and after (and release what they hold, e.g. signal handlers, however the loop ends)."""
        try:
            for component in self.components:
                component.on_start(self)
            self.model.train()
            self._data = self.batches(self.state)
            while self.stop_reason is None and self.ended_by() is None:
                self.train_step()
                for component in self.components:
                    component.after_step(self)
            for component in self.components:
                component.on_end(self)
        finally:
            for component in self.components:
                getattr(component, "close", lambda engine: None)(self)
        return self.state

    def ended_by(self) -> str | None:
        """'max_steps' or 'max_minutes' once that limit is reached (the same on every process), else None."""
        settings, state = self.settings, self.state
        if settings.max_steps is not None and state.step >= settings.max_steps:
            return "max_steps"
        if settings.max_seconds is not None and state.train_seconds >= settings.max_seconds:
            return "max_minutes"
        return None

    def train_step(self) -> None:
        """One optimizer step over one accumulation window; running out of memory is a one-line error."""
        try:
            self._window_step()
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            shape = " x ".join(map(str, self._batch_shape)) if self._batch_shape else "?"
            raise TwinLMError(
                f"out of memory in training step {self.state.step + 1} (micro-batches of {shape} tokens on "
                f"{self.accelerator.device}): lower training.batch_size (raise training.grad_accum to keep the "
                "batch), the sequence length or the model size, or set training.gradient_checkpointing=true"
            ) from None

    def _window_step(self) -> None:
        """One optimizer step over one accumulation window (look ahead: count its target tokens first)."""
        acc, state = self.accelerator, self.state
        started = time.perf_counter()
        assert self._data is not None
        window = [next(self._data) for _ in range(self.settings.grad_accum)]
        counts = [self.count_targets(b) for _, _, b in window]
        local = torch.tensor(
            [c if isinstance(c, tuple) else (c,) for c in counts], dtype=torch.float32, device=acc.device
        )  # (micro-batches, loss terms)
        total = local.sum(0)
        if acc.num_processes > 1:
            total = acc.reduce(total, reduction="sum")
        total = total.clamp(min=1.0)
        loss = torch.zeros((), device=acc.device)
        self._metrics = {}
        for i, (_, _, batch) in enumerate(window):
            if total.numel() == 1:
                loss += self.forward_backward_step(batch, local[i, 0].item(), total.item())
            else:
                loss += self.forward_backward_step(batch, local[i], total)
        grad_norm = self._clip()
        state.epoch, state.batch_in_epoch = window[-1][0], window[-1][1] + 1
        state.tokens_seen += sum(b["input_ids"].numel() for _, _, b in window) * acc.num_processes
        names = sorted(self._metrics)
        values = torch.stack([loss, *(self._metrics[n].to(loss) for n in names)])
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="sum")
        loss = values[0]
        if self._finite(loss, grad_norm):
            self.optimizer.step()
            state.consecutive_skips = 0
            state.loss_sum += state.last_loss or 0.0
            state.loss_steps += 1
            for name, value in zip(names, values[1:].tolist(), strict=True):
                state.metric_sums[name] = state.metric_sums.get(name, 0.0) + value
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.train_seconds += self._elapsed(started)  # before the schedule: a time budget's clock reads it
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.scheduler.step()

    def _elapsed(self, started: float) -> float:
        """This step's seconds; under a time budget the slowest process's, so that every process sees the
        same clock (the same learning rate, and the same last step)."""
        seconds = time.perf_counter() - started
        acc = self.accelerator
        if self.settings.max_seconds is None or acc.num_processes == 1:
            return seconds
        return float(acc.gather(torch.tensor([seconds], device=acc.device)).max().item())

    def forward_backward_step(
        self,
        batch: dict[str, torch.Tensor],
        targets: float | torch.Tensor,
        total: float | torch.Tensor,
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its share of the window's mean loss.

        `targets`/`total`: this micro-batch's and the window's target counts (tensors, one entry per loss
        term, when the objective counts several: only a model that takes num_items_in_batch can use those)."""
        acc = self.accelerator
        self._batch_shape = tuple(batch["input_ids"].shape)
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in batch.items() if k in MODEL_INPUTS}
        with acc.accumulate(self.model):
            with acc.autocast():
                if self.model_normalises:
                    output = self.model(**batch, num_items_in_batch=total)
                    share = output.loss
                else:
                    output = self.model(**batch)
                    mean = output.loss  # the mean over this micro-batch's targets
                    share = mean if targets == total else mean * (targets / total)
            for name, value in (getattr(output, "metrics", None) or {}).items():
                self._metrics[name] = self._metrics.get(name, 0.0) + value.detach().float()
            # Accelerate (or DeepSpeed) divides by grad_accum and DDP averages over processes: undo both,
            # so the gradient is that of the window's sum over targets / the window's target count.
            scale = self.settings.grad_accum * acc.num_processes
            acc.backward(share * scale if scale != 1 else share)
        return share.detach().float()

    def _clip(self) -> torch.Tensor | None:
        """The global gradient norm (clipped to max_grad_norm when set); None where DeepSpeed owns it."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            norm = getattr(self.model, "get_global_grad_norm", lambda: None)()
            return None if norm is None else torch.as_tensor(float(norm))
        return acc.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm or math.inf)

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        """Record loss and norm; True if both are finite, else skip (counted) or raise NonFiniteError."""
        values = torch.stack([loss.float(), (grad_norm if grad_norm is not None else loss).float().to(loss)])
        loss_value, norm_value = values.tolist()
        state = self.state
        state.last_loss, state.last_grad_norm = loss_value, (norm_value if grad_norm is not None else None)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            return True
        what = (
            f"loss {loss_value} and gradient norm {norm_value}"
            if grad_norm is not None
            else f"loss {loss_value}"
        )
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if self.settings.nonfinite == "stop" or state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(
                f"non-finite {what} at step {state.step + 1}: training stopped, the model is not saved; "
                "resume from the last checkpoint with a lower training.lr (or training.nonfinite=skip "
                f"to skip such steps, at most {MAX_CONSECUTIVE_SKIPS} in a row)"
            )
        if self.accelerator.is_main_process:
            print(f"skipping step {state.step + 1}: non-finite {what} ({state.skipped_steps} skipped so far)")
        return False


def model_is_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer is finite (checked before a save, an export or a push). FSDP2's
    sharded parameters (DTensors) are checked shard by shard and the verdict agreed by every process (all of
    them call this), so that no process goes on to save what another refuses."""
    from torch.distributed.tensor import DTensor

    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.numel()]
    sharded = [t for t in tensors if isinstance(t, DTensor)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    local = [t for t in local if t.numel()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else torch.tensor(True)
    if sharded:
        flag = finite.to(torch.int32).reshape(1)
        torch.distributed.all_reduce(
            flag, op=torch.distributed.ReduceOp.MIN, group=sharded[0].device_mesh.get_group()
        )
        return bool(flag.item())
    return bool(finite.item())


def count_lm_targets(causal: bool) -> Callable[[dict[str, torch.Tensor]], int]:
    """Target tokens of a language-model batch: labels != -100 (shifted by one for next-token loss)."""

    def count(batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"][:, 1:] if causal else batch["labels"]
        return int((labels != -100).sum())

    return count


def count_label_targets(batch: dict[str, torch.Tensor]) -> int:
    """Examples (sequence labels) or tagged tokens (token labels) that carry a loss."""
    return int((batch["labels"] != -100).sum())
