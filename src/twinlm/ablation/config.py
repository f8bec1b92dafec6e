"""The question file of `twinlm ablate`: base run, variants, seeds, measures, textbook claims."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from twinlm.ablation.measures import MEASURES
from twinlm.config import Section, build_config
from twinlm.errors import TwinLMError


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
class BaseRun(Section):
    config: Path = Field(description="a pretraining run config, e.g. configs/pretrain/tiny-clm.yaml")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys: training.max_steps")


class Measure(Section):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Comparison(Section):
    """A textbook claim about two variants: `better` beats `worse` on `metric` (default: the question's)."""

    better: str
    worse: str
    metric: str | None = None
    lower_is_better: bool | None = None


# A variant names a folder under --runs: letters, digits, '-', '_', '.', '+' (no '/', no leading '.').
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class AblationConfig(Section):
    """One question: base run, variants (overrides), seeds, the metric that answers it."""

    question: str
    textbook: str = Field(description="the textbook answer, checked against the numbers")
    expect: str | None = Field(None, description="the variant the textbook says wins on `metric`")
    base: BaseRun
    variants: dict[str, dict[str, Any]] = Field(min_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=2)
    metric: str = "val_loss"
    lower_is_better: bool = True
    measures: list[Measure] = Field(default_factory=list)
    compare: list[Comparison] = Field(default_factory=list, description="textbook claims, each checked")

    @model_validator(mode="after")
    def _known(self) -> AblationConfig:
        bad_names = [n for n in self.variants if not _VARIANT_NAME.match(n)]
        if bad_names:
            raise ValueError(
                f"variant name(s) {bad_names} cannot name a run folder; use letters, digits, '-', '_', '.', '+' "
                "(no '/', no leading '.')"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        unknown = [m.name for m in self.measures if m.name not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measure(s) {unknown}; choose from {sorted(MEASURES)}")
        for i, measure in enumerate(self.measures):
            problem = MEASURES[measure.name].problem(measure.params)
            if problem:
                raise ValueError(f"measures[{i}] ({measure.name}): {problem}")
        named = [n for c in self.compare for n in (c.better, c.worse) if n not in self.variants]
        if named:
            raise ValueError(f"compare names {named}, which are not variants ({', '.join(self.variants)})")
        if self.expect is not None and self.expect not in self.variants:
            raise ValueError(f"expect={self.expect!r} is not a variant ({', '.join(self.variants)})")
        return self

    def params(self, measure: Measure) -> dict[str, Any]:
        """A measure's parameters with their defaults filled in (validated when the config was built)."""
        return MEASURES[measure.name].params.model_validate(measure.params).model_dump(mode="json")


def load_ablation(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AblationConfig:
    """Read an ablation YAML (with `key=value` overrides, e.g. seeds=[0,1,2]); a one-line TwinLMError
    naming the key on any problem."""
    example = "configs/ablations/02-scaled-attention.yaml"
    config = build_config(AblationConfig, path, overrides, what="ablation config", example=example)
    if not config.base.config.is_file():
        raise TwinLMError(f"ablation config {path}: base.config {str(config.base.config)!r} does not exist")
    return config
