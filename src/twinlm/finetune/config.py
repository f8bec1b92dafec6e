"""The fine-tuning run config: pydantic sections loaded from YAML, with command-line overrides.

One file names the starting checkpoint, the task (its files or Hub dataset, columns, labels), the training
settings, the output folder, logging and Hub publishing. Unknown keys and wrong types are errors naming
the key, raised before any work starts. Overrides use the pretraining config's syntax
(`training.lr=1e-4` or `--training.lr 1e-4`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from twinlm.config import OptimizerSection, Schedule, Section, build_config, dump_config
from twinlm.errors import TwinLMError
from twinlm.training.config import HubSection, LoggingSection

TaskType = Literal["sequence_classification", "token_classification"]
FileFormat = Literal["csv", "tsv", "json", "jsonl", "conll"]
SPLITS = ("train", "dev", "test")


_Section = Section  # the one section base (twinlm.config); the old name kept for importers


class ModelSection(_Section):
    """The starting checkpoint: a local folder written by `save_pretrained`, or a Hub model id."""

    path: str = Field(description="checkpoint folder or Hub id, e.g. outputs/tiny-mlm/final")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer folder/Hub id; default: the checkpoint's own")
    classifier_pooling: Literal["cls", "mean", "last"] | None = Field(
        None,
        description="sequence classification pooling; default: the checkpoint's (cls for BERT, last for GPT)",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="other config fields, e.g. classifier_dropout"
    )


class HubDatasetSection(_Section):
    """A dataset on the Hub (or in the local `datasets` cache), e.g. name=nyu-mll/glue, config=sst2."""

    name: str
    config: str | None = None
    revision: str | None = Field(
        None,
        description="a branch, tag or commit sha: pinned, a result stays the same dataset's (evaluate caches it)",
    )
    train_split: str = "train"
    dev_split: str | None = "validation"
    test_split: str | None = None


class TaskSection(_Section):
    """What to learn: the task type, where its data lives, which columns hold text and labels."""

    type: TaskType
    train: Path | None = None
    dev: Path | None = None
    test: Path | None = None
    hub: HubDatasetSection | None = None
    format: FileFormat | None = Field(
        None, description="default: from the file extension (.txt/.conll -> conll)"
    )
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = Field(None, description="the label set; default: sorted values seen in train")
    tokens_column: str = Field("tokens", description="Hub/JSON token classification: the list of words")
    tags_column: str = Field("ner_tags", description="Hub/JSON token classification: the list of tags")
    conll_word_column: int = Field(0, description="CoNLL files: column index of the word")
    conll_tag_column: int = Field(-1, description="CoNLL files: column index of the IOB2 tag (-1: the last)")
    max_train_examples: int | None = Field(
        None, gt=0, description="subsample train (first N after a seeded shuffle)"
    )
    max_eval_examples: int | None = Field(None, gt=0, description="use only the first N dev/test examples")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_source(self) -> TaskSection:
        files = [s for s in SPLITS if getattr(self, s) is not None]
        if self.hub is not None and files:
            raise ValueError(f"give task.hub or task files, not both (got hub and {', '.join(files)})")
        if self.hub is None and self.train is None:
            raise ValueError("task.train is missing: give a train file (with dev/test) or task.hub")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels has duplicates: {self.labels}")
        return self


class TrainingSection(OptimizerSection):
    """Optimisation, evaluation and early stopping. `max_steps` (if set) wins over `epochs`.

    The optimizer/schedule fields come from `twinlm.config.OptimizerSection`; fine-tuning's defaults
    differ (smaller lr, larger batch, AdamW's betas, linear decay) and its warmup is a ratio.
    """

    batch_size: int = Field(32, gt=0, description="examples per process per micro-batch")
    lr: float = Field(5e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "linear"
    eval_batch_size: int = Field(64, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0: once per epoch")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="evaluations without improvement; null: off"
    )
    metric_for_best: str | None = Field(None, description="default: accuracy (sequence), f1 (token)")
    max_length: int = Field(128, gt=1)
    baseline: bool = Field(True, description="also train the simple baseline on the same split")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop the run, or skip the step (and count it)"
    )

    def warmup_steps_for(self, total_steps: int) -> int:
        """Fine-tuning names its warmup as a share of the run."""
        return int(self.warmup_ratio * total_steps)


class FinetuneConfig(_Section):
    """A whole fine-tuning run."""

    model: ModelSection
    task: TaskSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: Path = Path("outputs/finetune")
    logging: LoggingSection = Field(default_factory=LoggingSection)
    hub: HubSection = Field(default_factory=HubSection)

    @model_validator(mode="after")
    def _metric_fits_task(self) -> FinetuneConfig:
        allowed = METRICS[self.task.type]
        if self.training.metric_for_best is None:
            self.training.metric_for_best = allowed[0]
        elif self.training.metric_for_best not in allowed:
            raise ValueError(
                f"training.metric_for_best {self.training.metric_for_best!r} does not fit task "
                f"{self.task.type}; use one of {', '.join(allowed)}"
            )
        return self


# The dev metric that picks the best model (first: the default), per task type.
METRICS: dict[str, tuple[str, ...]] = {
    "sequence_classification": ("accuracy", "macro_f1"),
    "token_classification": ("f1", "precision", "recall", "accuracy"),
}


def load_finetune_config(
    source: FinetuneConfig | dict[str, Any] | str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> FinetuneConfig:
    """Build a FinetuneConfig from a YAML file, a dict or a FinetuneConfig, then apply overrides.

    Relative data paths in a YAML file are read relative to the current directory (like the pretraining
    config), so run from the repository root. Raises TwinLMError naming the key on any problem.
    """
    config = build_config(
        FinetuneConfig, source, overrides, what="fine-tuning config", example="configs/finetune/sst2.yaml"
    )
    for split in SPLITS:
        file = getattr(config.task, split)
        if file is not None and not file.is_file():
            raise TwinLMError(f"task.{split}: file {str(file)!r} does not exist")
    return config


def dump_finetune_config(config: FinetuneConfig, path: str | os.PathLike) -> None:
    """Write the resolved config next to the run's outputs (so a run can be reproduced)."""
    dump_config(config, path)
