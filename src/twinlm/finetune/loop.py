"""Fine-tuning under Accelerate: config -> task data -> baseline -> checkpoint + new head -> train with
periodic dev/test evaluation and early stopping -> best model (`save_pretrained`) + metrics.json -> report.

    from twinlm.finetune import finetune
    summary = finetune("configs/finetune/sst2.yaml", ["training.lr=1e-4"])

Variants: any twinlm checkpoint works for either task. A causal (GPT-style) checkpoint classifies
sequences from its last real token (`classifier_pooling='last'`, its default). For token classification a
causal checkpoint sees only the words to the left of each word; this is allowed, with a warning, because
it still works (entity F1 is lower than a bidirectional model's), and refusing would stop users from
measuring exactly that difference.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from twinlm.errors import TwinLMError
from twinlm.finetune.baselines import run_baseline
from twinlm.finetune.config import FinetuneConfig, dump_finetune_config, load_finetune_config
from twinlm.finetune.data import Split, encode_split, load_task, make_collator
from twinlm.finetune.metrics import classification_scores, tagging_scores

METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------
# Checkpoint and tokenizer
# ------------------------------------------------------------------------------------------------
def check_checkpoint(path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; TwinLMError unless it is a twinlm model (local or Hub)."""
    from transformers import PretrainedConfig

    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise TwinLMError(
            f"model.path {path!r} is not a model checkpoint (no config.json); give a folder written by "
            "save_pretrained, e.g. outputs/tiny-mlm/final"
        )
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
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision if not cfg.model.tokenizer else None
        )
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
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # transformers' load report lists the new head (expected) and the unused LM head; the body is
    # checked below instead. ignore_mismatched_sizes is for the head only: a fine-tuned checkpoint with
    # another label count has a differently shaped classifier.
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(
            cfg.model.path,
            config=config,
            revision=cfg.model.revision,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_body_loaded(info, overrides, config_dict, cfg.model.path)
    return model, causal


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    split: Split,
    accelerator: Any,
    id2label: dict[int, str],
    task_type: str,
) -> dict[str, float]:
    """Scores on a whole split, gathered over processes; tagging is scored per word (first sub-token)."""
    was_training = model.training
    model.eval()
    predicted: list[Any] = []
    for batch in loader:
        labels = batch.pop("labels")
        pred = model(**batch).logits.argmax(-1)
        if task_type == "token_classification":
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
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
    # Words cut off by max_length get no prediction: count them as "O" against the full gold sentence.
    padded = [p + ["O"] * (len(g) - len(p)) for p, g in zip(predicted, split.tags, strict=True)]
    return tagging_scores(split.tags, padded)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def finetune(
    source: FinetuneConfig | dict[str, Any] | str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Fine-tune a twinlm checkpoint on a classification or tagging task; returns the metrics summary
    (also written to OUTPUT_DIR/metrics.json) and saves the best model to OUTPUT_DIR/best."""
    cfg = load_finetune_config(source, overrides)
    return Finetuner(cfg).run()


class Finetuner:
    """One fine-tuning run; `run()` does everything and returns the summary dict."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    def _setup(self) -> None:
        from twinlm.training.loop import build_accelerator
        from twinlm.training.tracking import prepare_wandb_mode

        cfg, train = self.cfg, self.cfg.training
        prepare_wandb_mode(cfg.logging.report_to, int(os.environ.get("RANK", "0")) == 0)
        # build_accelerator reads training.{mixed_precision, grad_accum, batch_size, max_grad_norm},
        # logging.report_to and output_dir, which this config shares with the pretraining config.
        self.accelerator = acc = build_accelerator(cfg)  # type: ignore[arg-type]
        set_seed(train.seed)
        self.splits, self.labels = load_task(cfg.task, train.seed)
        self.id2label = dict(enumerate(self.labels))
        self.label2id = {v: k for k, v in self.id2label.items()}
        check_checkpoint(cfg.model.path, cfg.model.revision)  # before the tokenizer: the clearer error
        self.tokenizer = load_tokenizer_for(cfg)
        set_seed(train.seed)  # the same new head on every process
        self.model, self.causal = load_model(cfg, self.labels, self.tokenizer)
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or train.max_length
        self.max_length = min(train.max_length, max_pos)
        kind = cfg.task.type
        encoded = {
            name: encode_split(split, self.tokenizer, self.label2id, self.max_length, kind)
            for name, split in self.splits.items()
        }
        collator = make_collator(self.tokenizer, kind)
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

        from twinlm.training.optim import build_optimizer, build_scheduler

        # Each process sees ceil(batches / processes) batches per epoch once Accelerate shards the loader.
        batches_per_process = math.ceil(len(train_loader) / acc.num_processes)
        self.steps_per_epoch = max(1, math.ceil(batches_per_process / train.grad_accum))
        self.max_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        # The pretraining helpers: AdamW without decay on biases/norms, warmup then decay.
        opt_settings = SimpleNamespace(
            lr=train.lr,
            weight_decay=train.weight_decay,
            betas=train.betas,
            eps=train.eps,
            schedule=train.schedule,
            max_steps=self.max_steps,
            warmup_steps=int(train.warmup_ratio * self.max_steps),
        )
        self.model.train()
        optimizer = build_optimizer(self.model, opt_settings)  # type: ignore[arg-type]
        # Stepped once per optimizer step by the loop, not handed to Accelerate (see pretraining's optim.py).
        self.scheduler = build_scheduler(optimizer, opt_settings)  # type: ignore[arg-type]
        prepared = acc.prepare(self.model, optimizer, train_loader, *eval_loaders.values())
        self.model, self.optimizer, self.train_loader = prepared[:3]
        self.eval_loaders = dict(zip(eval_loaders, prepared[3:], strict=True))

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._setup()
        cfg, train, acc = self.cfg, self.cfg.training, self.accelerator
        main = acc.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_finetune_config(cfg, self.output_dir / "run_config.yaml")
            sizes = ", ".join(f"{name} {len(split):,}" for name, split in self.splits.items())
            print(
                f"fine-tuning {cfg.model.path} ({'causal' if self.causal else 'masked'} LM) for "
                f"{cfg.task.type}: {len(self.labels)} labels, {sizes}; {self.max_steps} steps"
            )
        baseline = None
        if train.baseline and main:
            baseline = run_baseline(cfg.task.type, self.splits, train.seed)
        from twinlm.training.tracking import init_tracking

        init_tracking(acc, cfg.logging, cfg.model_dump(mode="json"), Path(cfg.output_dir))
        pusher = None
        if cfg.hub.push:
            from twinlm.hub import BackgroundPusher

            pusher = BackgroundPusher(
                cfg.hub.repo_id, private=cfg.hub.private, revision=cfg.hub.revision, enabled=main
            )

        metric = train.metric_for_best
        evaluations: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        bad_evals, step, epoch, stopped_early = 0, 0, 0, False
        loss_sum, loss_count = 0.0, 0
        progress = tqdm(
            total=self.max_steps, desc="finetune", unit="step", disable=not main, dynamic_ncols=True
        )

        def do_eval() -> bool:
            """Evaluate on dev/test, keep the best model; True when early stopping says stop."""
            nonlocal best, bad_evals, loss_sum, loss_count
            record: dict[str, Any] = {
                "step": step,
                "epoch": round(step / self.steps_per_epoch, 3),
                "train_loss": loss_sum / loss_count if loss_count else None,
            }
            loss_sum, loss_count = 0.0, 0
            for name, loader in self.eval_loaders.items():
                record[name] = evaluate(
                    self.model, loader, self.splits[name], acc, self.id2label, cfg.task.type
                )
            evaluations.append(record)
            score = record["dev"][metric] if "dev" in record else None
            improved = best is None or score is None or score > best["dev"][metric]
            if improved:
                best = {k: record[k] for k in ("step", "epoch", "dev", "test") if k in record}
                bad_evals = 0
                best_dir = self._save_best(record)
                if pusher is not None and cfg.hub.push_checkpoints:
                    pusher.submit(best_dir, f"best model at step {step} (dev {metric} {score})")
            else:
                bad_evals += 1
            if cfg.logging.report_to != "none":
                values = {
                    f"{split}/{k}": v
                    for split in ("dev", "test")
                    if split in record
                    for k, v in record[split].items()
                }
                if record["train_loss"] is not None:
                    values["train/loss"] = record["train_loss"]
                acc.log(values, step=step)
            if main:
                shown = ", ".join(
                    f"{split} {metric} {record[split][metric]:.4f}"
                    for split in ("dev", "test")
                    if split in record
                )
                progress.write(f"step {step}: {shown}" + ("  (best so far)" if improved else ""))
            patience = train.early_stopping_patience
            return bool(patience and "dev" in record and bad_evals >= patience)

        evaluated_at = -1
        while step < self.max_steps and not stopped_early:
            for batch in self.train_loader:
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    if acc.sync_gradients and train.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), train.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                loss_sum += float(loss.detach())
                loss_count += 1
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.4f}", refresh=False)
                if train.eval_every and step % train.eval_every == 0:
                    evaluated_at = step
                    if do_eval():
                        stopped_early = True
                        break
                if step >= self.max_steps:
                    break
            epoch += 1
            if not stopped_early and not train.eval_every and step != evaluated_at:
                evaluated_at = step
                stopped_early = do_eval()
        if step != evaluated_at:
            do_eval()
        progress.close()

        summary = self._summary(evaluations, best, baseline, step, stopped_early, time.perf_counter() - start)
        if pusher is not None:
            card = {
                "metrics": {
                    f"{split}_{k}": v
                    for split in ("dev", "test")
                    if split in summary["best"]
                    for k, v in summary["best"][split].items()
                },
                "base_model": cfg.model.path,
                "training_summary": {"task": cfg.task.type, "steps": step},
            }
            pusher.submit(self.output_dir / "best", f"fine-tuned {cfg.task.type} model", card_kwargs=card)
            results = pusher.close()
            summary["hub"] = {
                "repo_id": cfg.hub.repo_id,
                "pushes": len(results),
                "failures": [r.error for r in results if not r.ok],
            }
            if main:
                self._write_metrics(summary)
        if cfg.logging.report_to != "none":
            acc.end_training()
        acc.wait_for_everyone()
        return summary

    def _save_best(self, record: dict[str, Any]) -> Path:
        """save_pretrained (+ tokenizer, + eval_results.json) into OUTPUT_DIR/best, atomically."""
        acc = self.accelerator
        best, tmp = self.output_dir / "best", self.output_dir / "best.tmp"
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            model = acc.unwrap_model(self.model)
            state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "eval_results.json").write_text(json.dumps(record, indent=2))
            if best.exists():
                shutil.rmtree(best)
            os.replace(tmp, best)
        acc.wait_for_everyone()
        return best

    def _summary(
        self,
        evaluations: list[dict[str, Any]],
        best: dict[str, Any] | None,
        baseline: dict[str, Any] | None,
        step: int,
        stopped_early: bool,
        seconds: float,
    ) -> dict[str, Any]:
        cfg = self.cfg
        summary = {
            "task": cfg.task.type,
            "model": cfg.model.path,
            "variant": "causal" if self.causal else "masked",
            "labels": self.labels,
            "examples": {name: len(split) for name, split in self.splits.items()},
            "metric_for_best": cfg.training.metric_for_best,
            "steps": step,
            "max_steps": self.max_steps,
            "stopped_early": stopped_early,
            "seconds": round(seconds, 1),
            "processes": self.accelerator.num_processes,
            "best": best,
            "baseline": baseline,
            "evaluations": evaluations,
            "best_model": str(self.output_dir / "best"),
        }
        if self.accelerator.is_main_process:
            self._write_metrics(summary)
            print(format_report(summary, self.output_dir))
        return summary

    def _write_metrics(self, summary: dict[str, Any]) -> None:
        (self.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))


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
    lines = [
        "",
        f"fine-tuning {'stopped early' if summary['stopped_early'] else 'finished'} after {summary['steps']} steps "
        f"({summary['seconds']:.0f} s, {summary['processes']} process(es)); best by dev {summary['metric_for_best']}",
        " " * width + "".join(f"{c:>16}" for c in columns),
    ]
    for name, values in rows:
        lines.append(
            f"{name:<{width}}" + "".join(f"{'n/a' if v is None else format(v, '.4f'):>16}" for v in values)
        )
    lines.append(f"  best model  {summary['best_model']}  (from_pretrained(..., trust_remote_code=True))")
    lines.append(f"  metrics     {output_dir / METRICS_FILE}")
    return "\n".join(lines)
