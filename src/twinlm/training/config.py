"""The pretraining run config: pydantic sections loaded from YAML, with command-line overrides.

One file names everything a run needs (model, tokenizer, data, training settings, output, logging,
Hub). Unknown keys and wrong types are errors that name the key (`training.lr: ...`), raised before any
work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twinlm.data import DataConfig
from twinlm.errors import TwinLMError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    """Which model: a preset (or YAML file) plus field overrides. Exactly one of preset/config_file."""

    preset: str | None = None
    config_file: Path | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.preset is None) == (self.config_file is None):
            raise ValueError(
                "give exactly one of model.preset (e.g. 'tiny-modern-decoder') or model.config_file"
            )
        return self


class TokenizerTrainSection(_Section):
    """Train a tokenizer on the run's data first (saved in OUTPUT_DIR/tokenizer)."""

    type: Literal["wordpiece", "bpe"] | None = None  # None: wordpiece for masked LM, bpe for causal
    vocab_size: int = Field(8000, gt=0)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool | None = None  # None: tokenizer default
    model_max_length: int | None = None  # None: the data's seq_len


class TokenizerSection(_Section):
    """A trained tokenizer directory, or settings to train one. Exactly one of path/train."""

    path: Path | None = None
    train: TokenizerTrainSection | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of tokenizer.path (a directory) or tokenizer.train (settings)")
        return self


class TrainingSection(_Section):
    """Optimisation, evaluation and checkpoint settings. Steps count optimizer steps."""

    batch_size: int = Field(8, gt=0, description="sequences per process per micro-batch")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, ge=0, description="0 or null: no clipping")
    max_steps: int = Field(100, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "inverse_sqrt", "constant"] = "cosine"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    eval_on_start: bool = Field(False, description="also evaluate the untrained model (step 0)")
    eval_batches: int | None = Field(20, gt=0, description="per process; null: the whole validation set")
    save_every: int = Field(0, ge=0, description="0: checkpoint only at the end")
    keep_last: int = Field(2, gt=0)
    seed: int = 42
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint directory")
    log_every: int = Field(10, gt=0)
    peak_flops: float | None = Field(None, gt=0, description="per device, for MFU; default: known GPUs")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop the run, or skip the step (and count it)"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _none_is_no(cls, value: Any) -> Any:
        return "no" if value in (None, "none", False) else value


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

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> HubSection:
        if self.push and not self.repo_id:
            raise ValueError("hub.push is true but hub.repo_id is not set (e.g. 'user/twinlm-tiny')")
        return self


class RunConfig(_Section):
    """A whole pretraining run."""

    model: ModelSection
    tokenizer: TokenizerSection
    data: DataConfig
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: Path = Path("outputs/pretrain")
    logging: LoggingSection = Field(default_factory=LoggingSection)
    hub: HubSection = Field(default_factory=HubSection)


# ------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string; turn such strings into floats (in nested dicts and lists too)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", value.strip()) else number
    if isinstance(value, dict):
        return {k: _coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_coerce_numbers(v) for v in value]
    return value


def parse_overrides(args: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """Parse `--training.lr 3e-4`, `--training.lr=3e-4` or `training.lr=3e-4` into (dotted key, value).

    Values are read as YAML (`true`, `[0.9, 0.95]`, `null`, numbers).
    """
    pairs: list[tuple[str, Any]] = []
    items = list(args)
    i = 0
    while i < len(items):
        token = items[i]
        if token.startswith("--"):
            key = token[2:]
            if "=" in key:
                key, raw = key.split("=", 1)
            elif i + 1 < len(items):
                i += 1
                raw = items[i]
            else:
                raise TwinLMError(
                    f"override {token!r} has no value; write {token} VALUE or {token[2:]}=VALUE"
                )
        elif "=" in token:
            key, raw = token.split("=", 1)
        else:
            raise TwinLMError(
                f"cannot read override {token!r}; write section.key=VALUE or --section.key VALUE"
            )
        if not key or key.startswith(".") or key.endswith("."):
            raise TwinLMError(f"override {token!r} has an empty key; write e.g. training.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise TwinLMError(
                f"override {key}: cannot read value {raw!r} ({err.__class__.__name__})"
            ) from err
        pairs.append((key, _coerce_numbers(value)))
        i += 1
    return pairs


def apply_overrides(values: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed); validation comes later."""
    for key, value in overrides:
        node = values
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise TwinLMError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return values


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key {loc!r}")
        elif e["type"] == "missing":
            problems.append(f"missing key {loc!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
            problems.append(f"{loc}: {msg}{shown}")
    return "; ".join(problems)


def build_config(
    cls: type[ConfigT],
    source: BaseModel | dict[str, Any] | str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...],
    *,
    what: str,
    example: str,
) -> ConfigT:
    """A pydantic config (pretraining, fine-tuning) from a YAML file, a dict or an instance, with
    command-line overrides applied. Raises TwinLMError naming the key on any problem."""
    if isinstance(source, cls):
        values = source.model_dump(mode="python", exclude_unset=True)
    elif isinstance(source, dict):
        values = _coerce_numbers(dict(source))
    elif source is None:
        values = {}
    else:
        path = Path(source)
        if not path.is_file():
            raise TwinLMError(f"{what} {str(path)!r} does not exist; give a YAML file such as {example}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise TwinLMError(f"{what} {path}: not valid YAML ({err})") from err
        if not isinstance(values, dict):
            raise TwinLMError(f"{what} {path}: the top level must be a mapping of sections")
        values = _coerce_numbers(values)
    values = apply_overrides(values, parse_overrides(overrides))
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise TwinLMError(f"bad {what}: {_format_validation_error(err)}") from None


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
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
