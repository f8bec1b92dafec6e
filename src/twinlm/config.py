"""The one config system of every twinlm command: pydantic sections read from YAML, with overrides.

- `Section`: the base of every config class (unknown keys are errors, defaults are validated too).
- `OptimizerSection`: the optimisation settings pretraining and fine-tuning share, so that the optimizer
  and schedule builders take either run's `training` section.
- `parse_overrides` / `apply_overrides`: `section.key=value` and `--section.key value` (values read as
  YAML), the same for every command; `split_overrides` takes them out of a command line.
- `format_validation_error`: one line naming every bad key, the bad value, the allowed values, and a
  did-you-mean for typo'd keys.
- `read_config_file` / `build_config` / `dump_config`: YAML file (or dict, or instance) -> validated config.

Light on purpose (pydantic and yaml only): command-line parsers import it without torch.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from twinlm.errors import TwinLMError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
Schedule = Literal["linear", "cosine", "inverse_sqrt", "constant"]
MixedPrecision = Literal["no", "bf16", "fp16"]


# A seed torch, numpy and Python's random all take.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="a seed in [0, 2**32 - 1]")]

# A name that becomes a folder of its own under an output folder (variants, tasks, trials): no '/', no
# leading '.', so nothing is written outside the folder it belongs in.
FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def check_folder_names(names: Iterable[str], what: str) -> None:
    """ValueError naming every `what` (e.g. 'variant') whose name cannot be a folder name."""
    bad = [name for name in names if not FOLDER_NAME.match(str(name))]
    if bad:
        raise ValueError(
            f"{what} name(s) {bad} cannot name a folder; use letters, digits, '-', '_', '.', '+' "
            "(no '/', no leading '.')"
        )


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are validated too."""

    # inf/nan are refused in every float field: a budget of .inf minutes would never end
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class OptimizerSection(Section):
    """What the optimizer and the LR schedule read, shared by pretraining and fine-tuning.

    Subclasses set their own defaults and say how many warmup steps a run of `total_steps` gets
    (`warmup_steps_for`), so `build_optimizer`/`build_scheduler` can take either section directly.
    """

    batch_size: int = Field(8, gt=0, description="examples per process per micro-batch")
    grad_accum: int = Field(1, gt=0, le=65536, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, ge=0, description="0 or null: no clipping")
    schedule: Schedule = "cosine"
    mixed_precision: MixedPrecision = "no"
    seed: Seed = 42

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _none_is_no(cls, value: Any) -> Any:
        return "no" if value in (None, "none", False) else value

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warmup optimizer steps for a run of `total_steps` (none by default)."""
        return 0


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][\w.-]*=")


def coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` as a string; turn such strings into floats (in nested dicts and lists too)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", value.strip()) else number
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    return value


def _read_value(key: str, raw: str) -> Any:
    try:
        return coerce_numbers(yaml.safe_load(raw)) if raw != "" else ""
    except yaml.YAMLError as err:
        raise TwinLMError(f"override {key}: cannot read value {raw!r} ({err.__class__.__name__})") from err


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
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
        pairs.append((key, _read_value(key, raw)))
        i += 1
    return pairs


def flatten_overrides(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{'training': {'lr': 1}, 'data.seq_len': 64} -> [('training.lr', 1), ('data.seq_len', 64)]: a mapping
    of overrides sets the leaves it names, never a whole section (an empty mapping names none)."""
    pairs: list[tuple[str, Any]] = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += flatten_overrides(value, dotted + ".")
        else:
            pairs.append((dotted, value))
    return pairs


def apply_overrides(values: dict[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed); validation comes later.

    One semantics everywhere: a key sets one field. A mapping given as a value (`training={epochs: 2}` on
    the command line, `overrides: {training: {epochs: 2}}` in YAML) sets the fields it names and keeps the
    section's others. A field may be spelled nested or dotted in a mapping (`{training: {lr: 1}}` or
    `{training.lr: 1}`): an override finds it either way, so the last one given wins."""
    for key, value in overrides:
        leaves = flatten_overrides(value, f"{key}.") if isinstance(value, dict) else [(key, value)]
        for leaf, leaf_value in leaves:
            _set_dotted(values, leaf.split("."), leaf_value, leaf)
    return values


def _set_dotted(node: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    """Set `parts` under `node`, following a key already spelled with dots (`training.lr`) where there is one."""
    for k in range(len(parts), 1, -1):  # the longest dotted spelling first
        spelled = ".".join(parts[:k])
        if spelled in node:
            if k == len(parts):
                node[spelled] = value
                return
            if isinstance(node[spelled], dict):
                _set_dotted(node[spelled], parts[k:], value, key)
                return
    if len(parts) == 1:
        node[parts[0]] = value
        return
    child = node.get(parts[0])
    if child is None:
        child = node[parts[0]] = {}
    elif not isinstance(child, dict):
        raise TwinLMError(f"override {key}: {parts[0]} is not a section")
    _set_dotted(child, parts[1:], value, key)


def split_overrides(argv: Sequence[str], options: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a command line into (arguments for argparse, config overrides), both in order.

    Overrides are `--key VALUE` / `--key=VALUE` for any `--key` that is not one of the command's own
    `options`, and `key=VALUE` words that are not existing paths (so FILES arguments stay files).
    """
    own_options = set(options)
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            own += argv[i:]
            break
        if token.startswith("--") and token.split("=", 1)[0] not in own_options:
            takes_next = "=" not in token and i + 1 < len(argv)
            overrides += argv[i : i + 1 + takes_next]
            i += 1 + takes_next
            continue
        if _ASSIGNMENT.match(token) and not os.path.exists(token):
            overrides.append(token)
        else:
            own.append(token)
        i += 1
    return own, overrides


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`, `list[X]`, `dict[str, X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _sibling_keys(cls: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names allowed next to the key at `loc` (for did-you-mean); [] where not a model."""
    current: type[BaseModel] | None = cls
    for part in loc[:-1]:
        if current is None:
            return []
        if isinstance(part, int):  # a list index: stay on the list's item model
            continue
        field = current.model_fields.get(str(part))
        current = _model_class(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def format_validation_error(err: ValidationError, what: str, cls: type[BaseModel] | None = None) -> str:
    """One line naming every problem: `invalid run config: training.lr: ... (got 'x'); unknown key ...`.

    With `cls`, an unknown key gets the closest allowed key as a suggestion.
    """
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = (
                difflib.get_close_matches(str(e["loc"][-1]), _sibling_keys(cls, e["loc"]), n=1) if cls else []
            )
            hint = f" (did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])!r}?)" if close else ""
            problems.append(f"unknown key {loc!r}{hint}")
        elif e["type"] == "missing":
            problems.append(f"missing key {loc!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
            problems.append(f"{loc}: {msg}{shown}")
    return f"invalid {what}: " + "; ".join(problems)


def validate(cls: type[ConfigT], values: Any, what: str) -> ConfigT:
    """`cls.model_validate(values)`, with any problem as a one-line TwinLMError."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        raise TwinLMError(format_validation_error(err, what, cls)) from None


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def read_config_file(path: str | os.PathLike, what: str, example: str) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing, binary, non-UTF-8 or non-mapping file is a TwinLMError."""
    from twinlm.data.textfiles import read_text

    path = Path(path)
    if path.is_dir():
        raise TwinLMError(f"{what} {str(path)!r} is a folder, not a file; give a YAML file such as {example}")
    if not path.is_file():
        raise TwinLMError(f"{what} {str(path)!r} does not exist; give a YAML file such as {example}")
    text = read_text(path, what=what)
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise TwinLMError(f"{what} {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise TwinLMError(f"{what} {path}: the top level must be a mapping of keys, e.g. {example}")
    return coerce_numbers(values)


def build_config(
    cls: type[ConfigT],
    source: BaseModel | dict[str, Any] | str | os.PathLike | None,
    overrides: Sequence[str] | Iterable[tuple[str, Any]] = (),
    *,
    what: str,
    example: str,
) -> ConfigT:
    """A config from a YAML file, a dict or an instance, with overrides (command-line words, or
    already parsed (key, value) pairs) applied. Raises TwinLMError naming the key on any problem."""
    if isinstance(source, cls):
        values = source.model_dump(mode="python", exclude_unset=True)
    elif isinstance(source, dict):
        values = coerce_numbers(dict(source))
    elif source is None:
        values = {}
    else:
        values = read_config_file(source, what, example)
    items = list(overrides)
    pairs = parse_overrides(items) if all(isinstance(o, str) for o in items) else items
    return validate(cls, apply_overrides(values, pairs), what)


def dump_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML (next to a run's outputs, so that the run can be reproduced)."""
    from twinlm.fileio import write_text_atomic

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    write_text_atomic(path, text, "the resolved config")
