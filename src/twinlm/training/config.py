"""The pretraining run config: pydantic sections loaded from YAML, with command-line overrides.

One file names everything a run needs (model, tokenizer, data, training settings, output, logging,
Hub). Unknown keys and wrong types are errors that name the key (`training.lr: ...`), raised before any
work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from twinlm.config import (
    OptimizerSection,
    Section,
    apply_overrides,
    build_config,
    coerce_numbers,
    dump_config,
    parse_overrides,
)
from twinlm.data.config import DataConfig
from twinlm.errors import TwinLMError

__all__ = [
    "HubSection",
    "LoggingSection",
    "ModelSection",
    "RTDSection",
    "RunConfig",
    "TokenizerSection",
    "TokenizerTrainSection",
    "TrainingSection",
    "apply_overrides",
    "build_config",
    "coerce_numbers",
    "dump_run_config",
    "load_run_config",
    "parse_overrides",
]

# The largest vocabulary a tokenizer may be trained to (TwinLMConfig's own limit, SIZE_LIMITS["vocab_size"]).
MAX_VOCAB_SIZE = 2**21
# A Hub branch name (git's rules, the common subset): what hub.checkpoint_revision must give.
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")

_Section = Section  # the one section base (twinlm.config); the old name kept for importers


class ModelSection(_Section):
    """Which model: a preset (or YAML file), or a trained twinlm model to continue pretraining, plus field
    overrides. Exactly one of preset/config_file/from_pretrained."""

    preset: str | None = None
    config_file: Path | None = None
    from_pretrained: str | None = Field(
        None,
        description="continue pretraining a twinlm model: a folder written by save_pretrained (a run's final/) "
        "or a Hub repo id; its config and weights (and, unless the tokenizer section names another, its "
        "tokenizer); overrides may change what does not change a weight's shape (dropout, attention "
        "implementation, window)",
    )
    revision: str | None = Field(None, description="with from_pretrained: the Hub branch, tag or commit")
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if sum(x is not None for x in (self.preset, self.config_file, self.from_pretrained)) != 1:
            raise ValueError(
                "give exactly one of model.preset (e.g. 'tiny-modern-decoder'), model.config_file or "
                "model.from_pretrained (a trained model to continue pretraining)"
            )
        if self.revision is not None and self.from_pretrained is None:
            raise ValueError(
                "model.revision is set without model.from_pretrained (it names the Hub revision)"
            )
        return self

    @property
    def source(self) -> str:
        """The model's source, for messages: preset name, config file or pretrained model (at its revision)."""
        if self.from_pretrained is not None:
            return self.from_pretrained + (f"@{self.revision}" if self.revision else "")
        return self.preset if self.preset is not None else str(self.config_file)


class TokenizerTrainSection(_Section):
    """Train a tokenizer on the run's data first (saved in OUTPUT_DIR/tokenizer)."""

    type: Literal["wordpiece", "bpe"] | None = None  # None: wordpiece for masked LM, bpe for causal
    vocab_size: int = Field(8000, gt=0, le=MAX_VOCAB_SIZE)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool | None = None  # None: tokenizer default
    model_max_length: int | None = None  # None: the data's seq_len


class TokenizerSection(_Section):
    """A trained tokenizer directory, or settings to train one: at most one of path/train. Neither: the
    tokenizer of model.from_pretrained (continued pretraining keeps its model's tokenizer)."""

    path: Path | None = None
    train: TokenizerTrainSection | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        if self.path is not None and self.train is not None:
            raise ValueError("give exactly one of tokenizer.path (a directory) or tokenizer.train (settings)")
        return self


class TrainingSection(OptimizerSection):
    """Optimisation, evaluation and checkpoint settings. Steps count optimizer steps.

    The optimizer/schedule fields (batch_size, grad_accum, lr, weight_decay, betas, eps, max_grad_norm,
    schedule, mixed_precision, seed) come from `twinlm.config.OptimizerSection`, with these defaults.
    """

    max_steps: int | None = Field(100, gt=0, description="null: end by max_minutes only")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="a training-time budget (evaluation not counted): linear/cosine schedules anneal to its "
        "end and the run stops when it is spent; max_steps, if set, is an upper bound",
    )
    warmup_steps: int = Field(0, ge=0)
    gradient_checkpointing: bool = False
    compile: bool = False
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    eval_on_start: bool = Field(False, description="also evaluate the untrained model (step 0)")
    eval_batches: int | None = Field(20, gt=0, description="per process; null: the whole validation set")
    save_every: int = Field(0, ge=0, description="0: checkpoint only at the end")
    keep_last: int = Field(2, gt=0)
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint directory")
    log_every: int = Field(10, gt=0)
    peak_flops: float | None = Field(None, gt=0, description="per device, for MFU; default: known GPUs")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop the run, or skip the step (and count it)"
    )

    def warmup_steps_for(self, total_steps: int) -> int:
        """Pretraining names its warmup in steps."""
        return self.warmup_steps

    @model_validator(mode="after")
    def _an_end(self) -> TrainingSection:
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError(
                "training.max_steps is null: set it, or set training.max_minutes (a time budget)"
            )
        return self


class LoggingSection(_Section):
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    project: str = "twinlm"
    run_name: str | None = None


class HubSection(_Section):
    """Hub publishing, shared by pretraining and fine-tuning: with push=true, each checkpoint's model is
    pushed in the background as training goes (fine-tuning: each new best model), then the final model."""

    push: bool = Field(False, description="push checkpoints as training goes and the final model")
    repo_id: str | None = Field(None, description="target repo, e.g. 'user/twinlm-tiny' (needed with push)")
    private: bool = Field(False, description="create the repo as private")
    revision: str | None = Field(None, description="branch to push to (created from main if missing)")
    allow_failure: bool = Field(
        False, description="finish with exit status 0 even when the final push (or every push) failed"
    )
    push_checkpoints: bool = Field(
        True, description="with push: push each checkpoint too; set false to push only the final model"
    )
    checkpoint_revision: str | None = Field(
        None,
        description="with push_checkpoints: the branch each checkpoint goes to, a template with {step} (e.g. "
        "'step-{step}': from_pretrained(repo, revision='step-1000') loads the checkpoint of step 1000; "
        "created from main); the final model still goes to `revision`. null: every push is a commit to "
        "`revision`",
    )

    @field_validator("checkpoint_revision")
    @classmethod
    def _one_branch_per_step(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            name = template.format(step=1000)
        except Exception:  # noqa: BLE001 - KeyError, IndexError, TypeError ({step[0]}), ValueError
            raise ValueError(
                f"{template!r} may name only {{step}} (e.g. 'step-{{step}}'); double other braces"
            ) from None
        if name == template.replace("{{", "{").replace("}}", "}"):
            raise ValueError(f"{template!r} has no {{step}}: every checkpoint would go to the same branch")
        parts = name.split("/")
        if (
            not BRANCH_NAME.fullmatch(name)
            or name.endswith(".")
            or name.startswith("refs/")
            or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
        ):
            raise ValueError(
                f"{template!r} gives {name!r}, not a branch name git accepts: letters, digits, '-', '_', '.' and "
                "'/' between non-empty parts that do not start with '.' or end with '.lock' or '.', not under "
                "refs/ (e.g. 'step-{step}' or 'checkpoints/step-{step}')"
            )
        return template

    def checkpoint_branch(self, step: int) -> str | None:
        """The branch the checkpoint of `step` is pushed to (None: the run's `revision`)."""
        return None if self.checkpoint_revision is None else self.checkpoint_revision.format(step=step)

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> HubSection:
        if self.push and not self.repo_id:
            raise ValueError("hub.push is true but hub.repo_id is not set (e.g. 'user/twinlm-tiny')")
        if self.push and not self.push_checkpoints and self.checkpoint_revision is not None:
            raise ValueError(
                "hub.checkpoint_revision is set but hub.push_checkpoints is false: no checkpoint is pushed; "
                "set push_checkpoints true or leave checkpoint_revision out"
            )
        return self


class RTDSection(_Section):
    """Replaced-token detection (objective: rtd, ELECTRA): the generator's size and the loss weight."""

    generator_size: float = Field(
        0.25,
        gt=0,
        le=1,
        description="generator hidden size as a fraction of the discriminator's (whole heads of its head size; "
        "the feed-forward in proportion); ELECTRA: 1/4 to 1/3",
    )
    generator_layers: float = Field(
        1.0, gt=0, le=1, description="generator layers as a fraction of the discriminator's (ELECTRA: 1)"
    )
    discriminator_weight: float = Field(
        50.0, gt=0, description="weight of the discriminator's loss next to the generator's (ELECTRA: 50)"
    )


class RunConfig(_Section):
    """A whole pretraining run."""

    model: ModelSection
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataConfig
    objective: Literal["mlm", "clm", "rtd"] | None = Field(
        None,
        description="mlm (masked-LM), rtd (ELECTRA's replaced-token detection) for an encoder, clm for a causal "
        "model; null: the model's own (mlm for an encoder, clm for a decoder)",
    )
    rtd: RTDSection = Field(default_factory=RTDSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: Path = Path("outputs/pretrain")
    logging: LoggingSection = Field(default_factory=LoggingSection)
    hub: HubSection = Field(default_factory=HubSection)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _null_tokenizer(cls, value: Any) -> Any:
        return {} if value is None else value  # `tokenizer: null`: the model's own (model.from_pretrained)

    @model_validator(mode="after")
    def _a_tokenizer(self) -> RunConfig:
        tok = self.tokenizer
        if tok.path is None and tok.train is None and self.model.from_pretrained is None:
            raise ValueError(
                "tokenizer: give exactly one of tokenizer.path (a directory) or tokenizer.train (settings); "
                "only a run from model.from_pretrained may leave both out (it keeps its model's tokenizer)"
            )
        if self.model.from_pretrained is not None and tok.train is not None:
            raise ValueError(
                "tokenizer.train with model.from_pretrained: a newly trained tokenizer's ids do not match the "
                "model's embeddings; leave the tokenizer section out (the model's own) or give tokenizer.path"
            )
        if self.model.from_pretrained is not None and self.objective == "rtd":
            raise ValueError(
                "objective rtd builds its generator and discriminator from scratch: continue pretraining a "
                "model.from_pretrained with objective mlm or clm (its own: leave objective unset)"
            )
        return self


def load_run_config(
    source: RunConfig | dict[str, Any] | str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """Build a RunConfig from a YAML file, a dict or a RunConfig, then apply command-line overrides.

    Raises TwinLMError naming the key for unknown keys, wrong types and missing files.
    """
    config = build_config(
        RunConfig, source, overrides, what="run config", example="configs/pretrain/tiny-clm.yaml"
    )
    _check_paths(config)
    return config


def _check_paths(config: RunConfig) -> None:
    """Files the config names must exist (the data sources are checked by the data pipeline)."""
    if config.model.config_file is not None and not config.model.config_file.is_file():
        raise TwinLMError(f"model.config_file: {str(config.model.config_file)!r} does not exist")
    if config.tokenizer.path is not None and not config.tokenizer.path.is_dir():
        raise TwinLMError(
            f"tokenizer.path: {str(config.tokenizer.path)!r} is not a directory; "
            "give a saved tokenizer directory or use tokenizer.train"
        )
    resume = config.training.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise TwinLMError(
            f"training.resume_from_checkpoint: {resume!r} is not a checkpoint directory; give 'latest' or a path"
        )


def dump_run_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config next to the run's outputs (so a run can be reproduced)."""
    dump_config(config, path)
