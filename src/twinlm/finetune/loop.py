"""Fine-tuning under Accelerate: config -> task data -> baseline -> checkpoint + new head -> train with
periodic dev/test evaluation and early stopping -> best model (`save_pretrained`) + metrics.json -> report.

Training runs on the engine pretraining uses (twinlm.training.engine): the same step (a window's loss is
the mean over all its targets), non-finite guard, run lock and stop signal; fine-tuning adds one
component, `DevTestEvaluator` (dev/test scores, the best model, early stopping).

    from twinlm.finetune import finetune
    summary = finetune("configs/finetune/sst2.yaml", ["training.lr=1e-4"])

Variants: any twinlm checkpoint works for either task. A causal (GPT-style) checkpoint classifies
sequences from its last real token (`classifier_pooling='last'`, its default). For token classification a
causal checkpoint sees only the words to the left of each word; this is allowed, with a warning, because
it still works (entity F1 is lower than a bidirectional model's), and refusing would stop users from
measuring exactly that difference.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from twinlm.errors import TwinLMError, is_out_of_memory
from twinlm.fileio import write_json_atomic
from twinlm.finetune.baselines import run_baseline
from twinlm.finetune.config import (
    FinetuneConfig,
    TrainingSection,
    dump_finetune_config,
    load_finetune_config,
)
from twinlm.finetune.data import Split, encode_split, load_task, make_collator
from twinlm.finetune.metrics import classification_scores, tagging_scores
from twinlm.model_folder import check_model_folder, load_error
from twinlm.session import run_folder
from twinlm.training.components import HubPublisher, MetricsLogger, StopSignal
from twinlm.training.engine import (
    Batch,
    Engine,
    EngineSettings,
    TrainState,
    count_label_targets,
)
from twinlm.training.optim import build_optimizer, build_scheduler
from twinlm.training.runtime import build_accelerator, gather_state_dict, save_model_folder
from twinlm.training.tracking import init_tracking, prepare_wandb_mode

METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------
# Checkpoint and tokenizer
# ------------------------------------------------------------------------------------------------
def check_checkpoint(path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; TwinLMError unless it is a twinlm model (local or Hub)."""
    from transformers import PretrainedConfig

    if Path(path).exists():  # a local folder: a twinlm model whose files are whole
        return check_model_folder(path, "model.path")
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    except (OSError, ValueError) as err:
        raise TwinLMError(
            f"model.path {path!r}: no readable config.json locally or on the Hub ({err.__class__.__name__}); "
            "give a checkpoint folder or a Hub model id"
        ) from None
    model_type = config_dict.get("model_type")
    if model_type != "twinlm":
        raise TwinLMError(
            f"model.path {path!r} is a {model_type or 'unknown'!s} checkpoint, not a twinlm one; "
            "convert it first (`twinlm convert`) or give a twinlm checkpoint"
        )
    return config_dict


def load_tokenizer_for(cfg: FinetuneConfig) -> Any:
    """The checkpoint's tokenizer (or `model.tokenizer`), with a padding token."""
    from twinlm.tokenization import auto_tokenizer

    source = cfg.model.tokenizer or cfg.model.path
    try:
        tokenizer = auto_tokenizer(source, revision=cfg.model.revision if not cfg.model.tokenizer else None)
    except (OSError, ValueError) as err:
        raise TwinLMError(
            f"cannot load a tokenizer from {source!r} ({err.__class__.__name__}); the checkpoint has no "
            "tokenizer files: set model.tokenizer to a tokenizer folder"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise TwinLMError(
            f"tokenizer {source!r} is not a fast tokenizer; word alignment needs tokenizer.json"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TwinLMError(f"tokenizer {source!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The pretrained body lives under the base model prefix; everything else (pooler, classifier) is the new head.
BODY_PREFIX = "model."


def _check_override_keys(overrides: dict[str, Any]) -> None:
    """TwinLMError naming `model.overrides.<key>` (with a did-you-mean) for keys TwinLMConfig lacks."""
    from twinlm.model.configuration_twinlm import check_config_keys

    try:
        check_config_keys(overrides, source="model.overrides")
    except ValueError as err:
        fields = ", ".join(f"model.overrides.{key}" for key in overrides if repr(str(key)) in str(err))
        detail = str(err).split(": ", 2)[-1]
        raise TwinLMError(f"{fields or 'model.overrides'}: not a TwinLMConfig field: {detail}") from None


def _is_head_or_dropout(key: str) -> bool:
    """Overrides that never touch a pretrained weight: dropout rates and the new head's settings."""
    return "dropout" in key or key.startswith("classifier_")


def _check_body_loaded(
    info: dict[str, Any], overrides: dict[str, Any], config_dict: dict[str, Any], path: str
) -> None:
    """TwinLMError unless every body weight came from the checkpoint and none of its weights was dropped.

    Fine-tuning must start from the pretrained body; only the new head may be freshly initialised. An
    override that changes a shape (intermediate_size, hidden_act swiglu <-> gelu, num_hidden_layers, ...)
    would otherwise re-initialise or silently discard pretrained weights.
    """
    reinit = {k for k in info.get("missing_keys", ()) if k.startswith(BODY_PREFIX)}
    reinit |= {k[0] for k in info.get("mismatched_keys", ()) if k[0].startswith(BODY_PREFIX)}
    dropped = {k for k in info.get("unexpected_keys", ()) if k.startswith(BODY_PREFIX)}
    if not reinit and not dropped:
        return
    suspects = [key for key in overrides if not _is_head_or_dropout(key)]
    changed = [k for k in suspects if k not in config_dict or config_dict[k] != overrides[k]] or suspects
    cause = (
        "override(s) " + ", ".join(f"model.overrides.{k}" for k in changed) + " change the pretrained body"
        if changed
        else "the checkpoint does not match its own config"
    )

    def some(keys: set[str]) -> str:
        names = sorted(keys)
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = []
    if reinit:
        parts.append(f"would re-initialise {len(reinit)} pretrained weight(s) ({some(reinit)})")
    if dropped:
        parts.append(f"would drop {len(dropped)} pretrained weight(s) ({some(dropped)})")
    raise TwinLMError(
        f"{cause} of {path!r}: {' and '.join(parts)}; only dropout and head settings (e.g. classifier_dropout, "
        "classifier_pooling) can be overridden when fine-tuning, so remove the size/architecture override(s)"
    )


def load_model(cfg: FinetuneConfig, labels: list[str], tokenizer: Any) -> tuple[torch.nn.Module, bool]:
    """The checkpoint's body with a new, randomly initialised head for `labels`; (model, is_causal).

    `model.overrides` may change dropout and head settings but never the pretrained body: unknown keys
    and overrides that would re-initialise or drop any body weight are TwinLMErrors.
    """
    import twinlm  # noqa: F401 - registers the Auto classes
    from twinlm.model import TwinLMConfig, TwinLMForSequenceClassification, TwinLMForTokenClassification

    config_dict = check_checkpoint(cfg.model.path, cfg.model.revision)
    causal = bool(config_dict.get("is_causal", False))
    id2label = dict(enumerate(labels))
    overrides: dict[str, Any] = dict(cfg.model.overrides)
    _check_override_keys(overrides)
    extra = dict(overrides)
    if cfg.model.classifier_pooling is not None:
        extra["classifier_pooling"] = cfg.model.classifier_pooling
    if config_dict.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        extra["pad_token_id"] = tokenizer.pad_token_id
    try:
        config = TwinLMConfig.from_pretrained(
            cfg.model.path,
            revision=cfg.model.revision,
            num_labels=len(labels),
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **extra,
        )
    except (ValueError, TypeError) as err:
        raise TwinLMError(f"model: cannot configure {cfg.model.path!r}: {err}") from None
    if len(tokenizer) > config.vocab_size:
        raise TwinLMError(
            f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is {config.vocab_size}; "
            "use the tokenizer the checkpoint was pretrained with"
        )
    if cfg.task.type == "token_classification" and causal:
        warnings.warn(
            f"{cfg.model.path} is a causal (GPT-style) checkpoint: for token classification each word sees "
            "only the words to its left; a masked-LM (BERT-style) checkpoint usually tags better",
            stacklevel=2,
        )
    cls = (
        TwinLMForSequenceClassification
        if cfg.task.type == "sequence_classification"
        else TwinLMForTokenClassification
    )
    try:
        model, info = _load_quietly(cls, cfg.model.path, config, cfg.model.revision)
    except (OSError, ValueError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise
        raise load_error(err, cfg.model.path) from None
    _check_body_loaded(info, overrides, config_dict, cfg.model.path)
    return model, causal


def _load_quietly(cls: Any, path: str, config: Any, revision: str | None) -> tuple[Any, dict[str, Any]]:
    """cls.from_pretrained with its loading info, without transformers' load report: it lists the new
    head (expected) and the unused LM head, while the body is checked by `_check_body_loaded` instead.
    ignore_mismatched_sizes is for the head only: a fine-tuned checkpoint with another label count has a
    differently shaped classifier."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(
            path, config=config, revision=revision, ignore_mismatched_sizes=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    split: Split,
    accelerator: Any | None,
    id2label: dict[int, str],
    task_type: str,
    word_index: list[list[int]] | None = None,
) -> dict[str, float]:
    """Scores on a whole split, gathered over processes (`accelerator`; None: one process, no gathering);
    tagging is scored per word (first sub-token), each prediction placed at its word (`word_index`, from
    `encode_split`; without it, in order from the first word)."""
    was_training = model.training
    model.eval()
    predicted: list[Any] = []
    for batch in loader:
        labels = batch.pop("labels")
        pred = model(**batch).logits.argmax(-1)
        if accelerator is not None and task_type == "token_classification":
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
        if accelerator is not None:
            pred, labels = accelerator.gather_for_metrics((pred, labels))
        if task_type == "sequence_classification":
            predicted.extend(id2label[int(p)] for p in pred.tolist())
        else:
            for row_p, row_l in zip(pred.tolist(), labels.tolist(), strict=True):
                predicted.append([id2label[p] for p, g in zip(row_p, row_l, strict=True) if g != -100])
    model.train(was_training)
    if len(predicted) != len(split):
        raise RuntimeError(
            f"evaluation of {split.name} produced {len(predicted)} predictions for {len(split)} examples"
        )
    if task_type == "sequence_classification":
        return classification_scores(split.labels, predicted)
    # Each prediction goes to its word; a word with none (cut off by max_length, or giving no sub-token, such
    # as a soft hyphen the normaliser drops) counts as "O" against the full gold sentence.
    placed = []
    for i, (pred, gold) in enumerate(zip(predicted, split.tags, strict=True)):
        words = word_index[i] if word_index is not None else range(len(pred))
        sentence = ["O"] * len(gold)
        for word, tag in zip(words, pred, strict=True):
            sentence[word] = tag
        placed.append(sentence)
    return tagging_scores(split.tags, placed)


def score_saved_model(folder: Path, cfg: FinetuneConfig, split: Split) -> dict[str, float]:
    """The scores of a fine-tuned model saved in `folder` (a run's best/) on `split`, in this process (e.g.
    the test split with its inputs perturbed, for `twinlm evaluate`'s noise curves)."""
    from twinlm.model import TwinLMForSequenceClassification, TwinLMForTokenClassification
    from twinlm.tokenization import auto_tokenizer

    cls = (
        TwinLMForSequenceClassification
        if cfg.task.type == "sequence_classification"
        else TwinLMForTokenClassification
    )
    model = cls.from_pretrained(folder)
    tokenizer = auto_tokenizer(folder)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    max_length = min(cfg.training.max_length, model.config.max_position_embeddings)
    encoded = encode_split(split, tokenizer, label2id, max_length, cfg.task.type)
    loader = DataLoader(
        encoded, batch_size=cfg.training.eval_batch_size, collate_fn=make_collator(tokenizer, cfg.task.type)
    )
    return evaluate(model, loader, split, None, id2label, cfg.task.type, encoded.word_index)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
EARLY_STOPPING = "early stopping"


def finetune(
    source: FinetuneConfig | dict[str, Any] | str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Fine-tune a twinlm checkpoint on a classification or tagging task; returns the metrics summary
    (also written to OUTPUT_DIR/metrics.json) and saves the best model to OUTPUT_DIR/best."""
    cfg = load_finetune_config(source, overrides)
    return Finetuner(cfg).run()


class DevTestEvaluator:
    """Fine-tuning's evaluation component: dev/test scores every `eval_every` steps (0: once an epoch
    ends) and at the end of the run; each better dev score saves the model (OUTPUT_DIR/best, and the
    Hub); `early_stopping_patience` evaluations without one stop the run. Its record (evaluations, best,
    patience count) lives in the engine's state, `state.extra['finetune']`."""

    def __init__(
        self,
        evaluate: Callable[[], dict[str, dict[str, float]]],
        new_best: Callable[[dict[str, Any]], None],
        train: TrainingSection,
        batches_per_epoch: int,
        steps_per_epoch: int,
        report_to: str,
    ) -> None:
        self.evaluate, self.new_best, self.report_to = evaluate, new_best, report_to
        self.every, self.patience = train.eval_every, train.early_stopping_patience
        self.metric = str(train.metric_for_best)
        self.batches_per_epoch, self.steps_per_epoch = batches_per_epoch, steps_per_epoch

    @staticmethod
    def record(engine: Engine) -> dict[str, Any]:
        return engine.state.extra["finetune"]

    def on_start(self, engine: Engine) -> None:
        empty = {"evaluations": [], "best": None, "bad_evals": 0, "evaluated_at": -1, "epochs_done": 0}
        engine.state.extra.setdefault("finetune", empty)

    def after_step(self, engine: Engine) -> None:
        state, record = engine.state, self.record(engine)
        # Epochs completed: with grad_accum > 1 an epoch may end inside a window (evaluated after it).
        done = state.epoch + (state.batch_in_epoch >= self.batches_per_epoch)
        epoch_ended, record["epochs_done"] = done > record["epochs_done"], done
        if (state.step % self.every == 0) if self.every else epoch_ended:
            self._evaluate(engine)

    def on_end(self, engine: Engine) -> None:
        if engine.stop_reason is None and engine.state.step != self.record(engine)["evaluated_at"]:
            self._evaluate(engine)

    def _evaluate(self, engine: Engine) -> None:
        """Score dev/test; keep the best model; request the stop when patience runs out."""
        state, record = engine.state, self.record(engine)
        result: dict[str, Any] = {
            "step": state.step,
            "epoch": round(state.step / self.steps_per_epoch, 3),
            "train_loss": state.loss_sum / state.loss_steps if state.loss_steps else None,
        }
        state.loss_sum, state.loss_steps = 0.0, 0  # the next train_loss: since this evaluation
        result.update(self.evaluate())
        record["evaluations"].append(result)
        record["evaluated_at"] = state.step
        score, best = (result["dev"][self.metric] if "dev" in result else None), record["best"]
        improved = best is None or score is None or score > best["dev"][self.metric]
        if improved:
            record["best"] = {k: result[k] for k in ("step", "epoch", "dev", "test") if k in result}
            record["bad_evals"] = 0
            self.new_best(result)
        else:
            record["bad_evals"] += 1
        self._report(engine, result, improved)
        if self.patience and "dev" in result and record["bad_evals"] >= self.patience:
            engine.request_stop(EARLY_STOPPING)

    def _report(self, engine: Engine, result: dict[str, Any], improved: bool) -> None:
        """The scores to the tracker (dev/..., test/..., train/loss) and one line above the progress bar."""
        splits = [split for split in ("dev", "test") if split in result]
        if self.report_to != "none":
            values = {f"{split}/{k}": v for split in splits for k, v in result[split].items()}
            if result["train_loss"] is not None:
                values["train/loss"] = result["train_loss"]
            engine.accelerator.log(values, step=result["step"])
        if engine.accelerator.is_main_process:
            shown = ", ".join(f"{split} {self.metric} {result[split][self.metric]:.4f}" for split in splits)
            tqdm.write(f"step {result['step']}: {shown}" + ("  (best so far)" if improved else ""))


class Finetuner:
    """One fine-tuning run on the shared Engine (twinlm.training.engine): setup, then training with the
    dev/test evaluator, progress bar and stop signal as components, then metrics.json, the report and
    the Hub push. `run()` returns the summary dict."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.hub: HubPublisher | None = None

    def _setup_task(self) -> dict[str, Any]:
        """Task splits and labels, tokenizer, model (pretrained body, new head); returns the encoded splits."""
        cfg, train = self.cfg, self.cfg.training
        set_seed(train.seed)
        self.splits, self.labels = load_task(cfg.task, train.seed)
        self.id2label = dict(enumerate(self.labels))
        label2id = {v: k for k, v in self.id2label.items()}
        check_checkpoint(cfg.model.path, cfg.model.revision)  # before the tokenizer: the clearer error
        self.tokenizer = load_tokenizer_for(cfg)
        set_seed(train.seed)  # the same new head on every process
        self.model, self.causal = load_model(cfg, self.labels, self.tokenizer)
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or train.max_length
        self.max_length = min(train.max_length, max_pos)
        return {
            name: encode_split(split, self.tokenizer, label2id, self.max_length, cfg.task.type)
            for name, split in self.splits.items()
        }

    def _setup_training(self, encoded: dict[str, Any]) -> None:
        """Loaders; AdamW (no decay on biases/norms) and warmup-then-decay over the run; all prepared."""
        train, acc = self.cfg.training, self.accelerator
        collator = make_collator(self.tokenizer, self.cfg.task.type)
        train_loader = DataLoader(
            encoded["train"],
            batch_size=train.batch_size,
            shuffle=True,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(train.seed),
        )
        eval_loaders = {
            name: DataLoader(ds, batch_size=train.eval_batch_size, shuffle=False, collate_fn=collator)
            for name, ds in encoded.items()
            if name != "train"
        }
        self.word_index = {name: ds.word_index for name, ds in encoded.items()}
        # Each process sees ceil(batches / processes) batches per epoch once Accelerate shards the loader.
        batches_per_process = math.ceil(len(train_loader) / acc.num_processes)
        self.steps_per_epoch = max(1, math.ceil(batches_per_process / train.grad_accum))
        self.max_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        self.model.train()
        optimizer = build_optimizer(self.model, train)
        self.scheduler = build_scheduler(optimizer, train, self.max_steps)  # stepped by the engine
        prepared = acc.prepare(self.model, optimizer, train_loader, *eval_loaders.values())
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.eval_loaders = dict(zip(eval_loaders, prepared[3:], strict=True))

    def _batches(self, state: TrainState) -> Iterator[Batch]:
        """(epoch, index, batch) from the prepared train loader, epoch after epoch (from the start:
        fine-tuning runs are short and not resumed)."""
        for epoch in itertools.count():
            for index, batch in enumerate(self.train_loader):
                yield epoch, index, batch

    def run(self) -> dict[str, Any]:
        """Setup, the engine's training, then metrics.json, the report and the Hub push (one output_dir
        per run: a second run on it is refused while this one holds its lock)."""
        start = time.perf_counter()
        cfg = self.cfg
        prepare_wandb_mode(cfg.logging.report_to, int(os.environ.get("RANK", "0")) == 0)
        with run_folder(self.output_dir, "output_dir"):
            self.accelerator = acc = build_accelerator(cfg.training, cfg.logging.report_to, self.output_dir)
            acc.wait_for_everyone()
            self._setup_training(self._setup_task())
            baseline = self._start()
            engine = self._engine()
            try:
                engine.train()
            except Exception:
                if self.hub is not None:  # pushes already queued (earlier best models) still go out
                    self.hub.finish()
                raise
            return self._finish(engine, baseline, start)

    def _start(self) -> dict[str, Any] | None:
        """run_config.yaml, the opening line and the baseline's scores (main process); trackers."""
        cfg, acc = self.cfg, self.accelerator
        baseline = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._clear_earlier_run()
            dump_finetune_config(cfg, self.output_dir / "run_config.yaml")
            sizes = ", ".join(f"{name} {len(split):,}" for name, split in self.splits.items())
            print(
                f"fine-tuning {cfg.model.path} ({'causal' if self.causal else 'masked'} LM) for "
                f"{cfg.task.type}: {len(self.labels)} labels, {sizes}; {self.max_steps} steps"
            )
            if cfg.training.baseline:
                baseline = run_baseline(cfg.task.type, self.splits, cfg.training.seed)
        init_tracking(acc, cfg.logging, cfg.model_dump(mode="json"), self.output_dir)
        return baseline

    def _clear_earlier_run(self) -> None:
        """An earlier run's best/ and metrics.json in this output_dir go (said in one line): this run's results
        replace them, and a run that fails or stops before its first evaluation must not leave the earlier
        run's model beside its own files, as if it were this run's best."""
        earlier = [p for p in (self.output_dir / "best", self.output_dir / METRICS_FILE) if p.exists()]
        if earlier:
            print(f"{self.output_dir}: replacing an earlier run's {' and '.join(p.name for p in earlier)}")
        for path in earlier:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _engine(self) -> Engine:
        cfg, train, acc = self.cfg, self.cfg.training, self.accelerator
        if cfg.hub.push:
            self.hub = HubPublisher(cfg.hub, enabled=acc.is_main_process)
        evaluator = DevTestEvaluator(
            self._evaluate, self._new_best, train, len(self.train_loader), self.steps_per_epoch,
            cfg.logging.report_to,
        )  # fmt: skip
        progress = MetricsLogger(None, 0, self.max_steps, "none", desc="finetune")
        settings = EngineSettings(self.max_steps, train.grad_accum, train.max_grad_norm, train.nonfinite)
        return Engine(
            acc, self.model, self.optimizer, self.scheduler, self._batches, count_label_targets,
            settings, [progress, evaluator, StopSignal()],
        )  # fmt: skip

    def _evaluate(self) -> dict[str, dict[str, float]]:
        return {
            name: evaluate(
                self.model,
                loader,
                self.splits[name],
                self.accelerator,
                self.id2label,
                self.cfg.task.type,
                self.word_index[name],
            )
            for name, loader in self.eval_loaders.items()
        }

    def _new_best(self, record: dict[str, Any]) -> None:
        """Save the new best model; with hub.push (and push_checkpoints) push it in the background."""
        best_dir = self._save_best(record)
        if self.hub is not None and self.cfg.hub.push_checkpoints:
            metric = self.cfg.training.metric_for_best
            score = record["dev"][metric] if "dev" in record else None
            message = f"best model at step {record['step']} (dev {metric} {score})"
            self.hub.submit(best_dir, message, step=record["step"])

    def _save_best(self, record: dict[str, Any]) -> Path:
        """save_pretrained (+ tokenizer, + eval_results.json) into OUTPUT_DIR/best, atomically; never a
        model holding NaN/inf values."""
        acc, best = self.accelerator, self.output_dir / "best"
        state_dict = gather_state_dict(acc, self.model, best)
        if state_dict is not None:
            extra = {"eval_results.json": json.dumps(record, indent=2)}
            save_model_folder(
                acc.unwrap_model(self.model), state_dict, self.tokenizer, best, "the best model", extra
            )
        acc.wait_for_everyone()
        return best

    def _finish(self, engine: Engine, baseline: dict[str, Any] | None, start: float) -> dict[str, Any]:
        """metrics.json and the report, the final Hub push (and its verdict); returns the summary."""
        cfg, acc = self.cfg, self.accelerator
        summary = self._summary(engine, baseline, time.perf_counter() - start)
        if self.hub is not None:
            if summary["best"] is not None:
                card = {
                    "metrics": {
                        f"{split}_{k}": v
                        for split in ("dev", "test")
                        if split in summary["best"]
                        for k, v in summary["best"][split].items()
                    },
                    "base_model": cfg.model.path,
                    "training_summary": {"task": cfg.task.type, "steps": summary["steps"]},
                }
                self.hub.submit(
                    self.output_dir / "best", f"fine-tuned {cfg.task.type} model", card_kwargs=card
                )
            report = self.hub.finish()
            summary["hub"] = {
                "repo_id": cfg.hub.repo_id,
                "pushes": report["hub_pushes"],
                "failures": report["hub_failures"],
            }
            if acc.is_main_process:
                self._write_metrics(summary)
            self.hub.check(report, self.output_dir / "best")
        acc.wait_for_everyone()
        acc.end_training()  # the trackers finish and the process group is torn down, after the last barrier
        return summary

    def _summary(self, engine: Engine, baseline: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
        cfg, state, stop = self.cfg, engine.state, engine.stop_reason
        record = DevTestEvaluator.record(engine)
        summary = {
            "task": cfg.task.type,
            "model": cfg.model.path,
            "variant": "causal" if self.causal else "masked",
            "labels": self.labels,
            "examples": {name: len(split) for name, split in self.splits.items()},
            "metric_for_best": cfg.training.metric_for_best,
            "steps": state.step,
            "max_steps": self.max_steps,
            "stopped_early": stop == EARLY_STOPPING,
            "interrupted_by": stop if stop not in (None, EARLY_STOPPING) else None,
            "skipped_steps": state.skipped_steps,
            "seconds": round(seconds, 1),
            "processes": self.accelerator.num_processes,
            "best": record["best"],
            "baseline": baseline,
            "evaluations": record["evaluations"],
            "best_model": str(self.output_dir / "best") if record["best"] is not None else None,
        }
        if self.accelerator.is_main_process:
            self._write_metrics(summary)
            print(format_report(summary, self.output_dir))
        return summary

    def _write_metrics(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.output_dir / METRICS_FILE, summary, "the fine-tuning metrics")


def format_report(summary: dict[str, Any], output_dir: Path) -> str:
    """The end-of-run report: the fine-tuned model's best dev/test scores next to the baseline's."""
    keys = (
        ("accuracy", "macro_f1")
        if summary["task"] == "sequence_classification"
        else ("f1", "precision", "recall")
    )
    splits = [s for s in ("dev", "test") if summary["best"] and s in summary["best"]]
    columns = [f"{s} {k}" for s in splits for k in keys]
    best = summary["best"] or {}
    rows = [
        (
            f"twinlm ({summary['variant']}, best at step {best.get('step')})",
            [best[s][k] for s in splits for k in keys],
        )
    ]
    base = summary.get("baseline")
    if base:
        rows.append((base["name"], [base.get(s, {}).get(k) for s in splits for k in keys]))
    width = max(len(r[0]) for r in rows) + 2
    status = "stopped early" if summary["stopped_early"] else "finished"
    if summary.get("interrupted_by"):
        status = f"interrupted by {summary['interrupted_by']}"
    lines = [
        "",
        f"fine-tuning {status} after {summary['steps']} steps "
        f"({summary['seconds']:.0f} s, {summary['processes']} process(es)); best by dev {summary['metric_for_best']}",
        " " * width + "".join(f"{c:>16}" for c in columns),
    ]
    for name, values in rows:
        lines.append(
            f"{name:<{width}}" + "".join(f"{'n/a' if v is None else format(v, '.4f'):>16}" for v in values)
        )
    if summary["best_model"] is not None:
        lines.append(f"  best model  {summary['best_model']}  (from_pretrained(..., trust_remote_code=True))")
    else:
        lines.append("  best model  none (no evaluation ran before the run ended)")
    lines.append(f"  metrics     {output_dir / METRICS_FILE}")
    return "\n".join(lines)
