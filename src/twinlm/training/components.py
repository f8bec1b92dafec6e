"""The engine's components: each decides itself when it runs (see twinlm.training.engine).

StopSignal (SIGINT/SIGTERM -> save and stop), MetricsLogger (metrics.jsonl, trackers, progress bar),
Evaluator (initial, periodic and final validation), Checkpointer (periodic, on stop and at the end) and
HubPublisher (background pushes, and a clear verdict when they failed).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from twinlm.errors import TwinLMError
from twinlm.stopping import STOP
from twinlm.training.engine import Engine
from twinlm.training.tracking import MetricsLog


class StopSignal:
    """SIGINT/SIGTERM set the process-wide stop flag (twinlm.stopping, shared with the command running the
    engine); after each step all processes agree on it, and the engine stops. A signal that came before
    the first step (during setup) stops the run before it trains."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._held = False

    def on_start(self, engine: Engine) -> None:
        STOP.enter()
        self._held = True
        if STOP.signum:
            self.signum = STOP.signum
            engine.request_stop(signal.Signals(STOP.signum).name)

    def after_step(self, engine: Engine) -> None:
        signum = STOP.signum or 0
        acc = engine.accelerator
        if acc.num_processes > 1:  # saving is collective: every process must stop at the same step
            flags = acc.gather(torch.tensor([signum], device=acc.device))
            signum = max(flags.tolist())
        if signum:
            self.signum = signum
            engine.request_stop(signal.Signals(signum).name)

    def on_end(self, engine: Engine) -> None:
        pass

    def close(self, engine: Engine) -> None:
        """Called by the engine however the loop ended: the outermost holder restores the handlers."""
        if self._held:
            self._held = False
            STOP.exit()


class MetricsLogger:
    """Every `log_every` steps (and at the last): the mean window loss (and the model's metrics, e.g.
    replaced-token detection's gen_loss, disc_loss) since the last line, lr, grad norm, tokens/s and MFU,
    to metrics.jsonl and the configured tracker; the progress bar each step.
    With log_every=0 (fine-tuning) only the bar, showing the loss since whoever last reset it."""

    def __init__(
        self,
        metrics: MetricsLog | None,
        log_every: int,
        max_steps: int | None,
        report_to: str,
        flops_per_token: float | None = None,
        peak_flops_total: float | None = None,
        desc: str = "train",
    ) -> None:
        self.metrics, self.log_every, self.max_steps, self.report_to = (
            metrics,
            log_every,
            max_steps,
            report_to,
        )
        self.flops_per_token, self.peak_flops_total, self.desc = flops_per_token, peak_flops_total, desc
        self.last_rates: dict[str, float | None] = {"tokens_per_s": None, "mfu": None}
        self.progress: Any = None

    def on_start(self, engine: Engine) -> None:
        state = engine.state
        self._mark = (state.tokens_seen, state.train_seconds)
        self.progress = tqdm(
            total=self.max_steps,
            initial=state.step,
            desc=self.desc,
            unit="step",
            # an explicit `disable` overrides tqdm's own TQDM_DISABLE, so it is read here (evaluation's workers set it)
            disable=not engine.accelerator.is_main_process
            or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false"),
            dynamic_ncols=True,
        )

    def log(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
        if self.report_to != "none":
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
            engine.accelerator.log(values, step=record["step"])

    def after_step(self, engine: Engine) -> None:
        state = engine.state
        self.progress.update(1)
        if not self.log_every:
            if state.loss_steps:
                self.progress.set_postfix(loss=f"{state.loss_sum / state.loss_steps:.4f}", refresh=False)
            return
        if state.step % self.log_every == 0 or state.step == self.max_steps:
            self._log_line(engine)

    def _log_line(self, engine: Engine) -> None:
        state = engine.state
        loss = state.loss_sum / state.loss_steps if state.loss_steps else None
        record = {
            "step": state.step,
            "loss": loss,
            **{
                name: value / state.loss_steps
                for name, value in state.metric_sums.items()
                if state.loss_steps
            },
            "lr": engine.scheduler.get_last_lr()[0],
            "grad_norm": state.last_grad_norm,
            "epoch": state.epoch,
            "tokens": state.tokens_seen,
            "train_seconds": state.train_seconds,
            **self._rates(state),
        }
        self.log(engine, record)
        if loss is not None and self.last_rates["tokens_per_s"] is not None:
            self.progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.last_rates['tokens_per_s']:.0f}")
        state.loss_sum, state.loss_steps, state.metric_sums = 0.0, 0, {}

    def _rates(self, state: Any) -> dict[str, float | None]:
        tokens, seconds = state.tokens_seen - self._mark[0], state.train_seconds - self._mark[1]
        self._mark = (state.tokens_seen, state.train_seconds)
        tps = tokens / max(seconds, 1e-9)
        mfu = tps * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else None
        self.last_rates = {"tokens_per_s": tps, "mfu": mfu}
        if state.rate_first is None:  # a run's first interval includes warm-up: kept apart
            state.rate_first = tps
        else:
            state.rate_sum, state.rate_count = state.rate_sum + tps, state.rate_count + 1
        return self.last_rates

    def on_end(self, engine: Engine) -> None:
        # A run that ended on its time budget stopped at a step no schedule knew: log that last step too.
        if self.log_every and engine.stop_reason is None and engine.state.loss_steps:
            self._log_line(engine)
        self.progress.close()

    def close(self, engine: Engine) -> None:
        """However the loop ended (an error too): close the bar, so that a message starts on its own line."""
        if self.progress is not None:
            self.progress.close()


class Evaluator:
    """Validation before training (optional), every `every` steps, and at the end when the last step
    had none; results go into the state (so a resumed run's summary still has them) and the log."""

    def __init__(
        self, evaluate: Callable[[], dict[str, float]], every: int, on_start: bool, logger: MetricsLogger
    ) -> None:
        self.evaluate, self.every, self.at_start, self.logger = evaluate, every, on_start, logger

    def _run(self, engine: Engine) -> dict[str, float]:
        result = self.evaluate()
        if result:
            self.logger.log(engine, {"step": engine.state.step, **result})
        return result

    def on_start(self, engine: Engine) -> None:
        state = engine.state
        if self.at_start and state.step == 0 and not state.initial_eval:
            state.initial_eval = self._run(engine)

    def after_step(self, engine: Engine) -> None:
        state = engine.state
        if self.every and state.step % self.every == 0:
            state.last_eval, state.last_eval_step = self._run(engine), state.step

    def on_end(self, engine: Engine) -> None:
        state = engine.state
        if engine.stop_reason is None and state.last_eval_step != state.step:
            state.last_eval, state.last_eval_step = self._run(engine), state.step


class Checkpointer:
    """Saves every `every` steps, when the run is stopped, and at the end (once per step)."""

    def __init__(self, save: Callable[[Engine], Path], every: int) -> None:
        self.save, self.every = save, every
        self.saved_step: int | None = None
        self.last: Path | None = None

    def _save(self, engine: Engine) -> None:
        if self.saved_step != engine.state.step:
            self.last, self.saved_step = self.save(engine), engine.state.step

    def on_start(self, engine: Engine) -> None:
        pass

    def after_step(self, engine: Engine) -> None:
        if (self.every and engine.state.step % self.every == 0) or engine.stop_reason is not None:
            self._save(engine)

    def on_end(self, engine: Engine) -> None:
        self._save(engine)


class HubPublisher:
    """Background pushes to the Hub (main process); `finish` reports them and, unless the user allows
    failure (hub.allow_failure), raises when the final push or every push failed."""

    def __init__(self, hub: Any, enabled: bool) -> None:
        from twinlm.hub import BackgroundPusher

        self.hub = hub
        self.enabled = enabled
        self.pusher = BackgroundPusher(
            hub.repo_id, private=hub.private, revision=hub.revision, enabled=enabled
        )

    def submit(
        self,
        folder: Path,
        message: str,
        card_kwargs: dict[str, Any] | None = None,
        owned: bool = False,
        step: int | None = None,
    ) -> None:
        """Queue a push: a checkpoint's (`step` given) to its own branch when hub.checkpoint_revision is set,
        anything else to hub.revision."""
        revision = None if step is None else self.hub.checkpoint_branch(step)
        self.pusher.submit(folder, message, card_kwargs=card_kwargs, owned=owned, revision=revision)

    def snapshot_folder(self, name: str) -> Path:
        """Where to export a model that is pushed once and then removed (submit it with owned=True)."""
        return self.pusher.snapshot_folder(name)

    def finish(self) -> dict[str, Any]:
        """Wait for the queue; {'hub_pushes', 'hub_pushes_ok', 'hub_failures'} for the summary."""
        results = self.pusher.close(wait=True)
        ok = sum(1 for r in results if r.ok)
        report = {
            "hub_pushes": len(results),
            "hub_pushes_ok": ok,
            "hub_failures": [r.error for r in results if not r.ok],
            "hub_last_push_ok": results[-1].ok if results else None,
            "hub_revisions": [r.revision or "main" for r in results if r.ok],
        }
        if self.enabled:
            branches = [
                r.revision for r in results if r.ok and r.revision and r.revision != self.hub.revision
            ]
            print(
                f"  hub          {ok} of {len(results)} pushes to {self.hub.repo_id} succeeded"
                + (f" (checkpoints as revisions {', '.join(branches)})" if branches else "")
            )
        return report

    def check(self, report: dict[str, Any], saved_at: Path) -> None:
        """TwinLMError (call it after the summary is written) when the final push or every push failed."""
        failures = report["hub_failures"]
        if not self.enabled or not failures or getattr(self.hub, "allow_failure", False):
            return
        if report["hub_pushes_ok"] == 0 or not report["hub_last_push_ok"]:
            raise TwinLMError(
                f"hub: {len(failures)} of {report['hub_pushes']} pushes to {self.hub.repo_id} failed (last: "
                f"{failures[-1]}); the model is saved at {saved_at}: push it later with `twinlm push`, or set "
                "hub.allow_failure=true to accept a run whose pushes fail"
            )
