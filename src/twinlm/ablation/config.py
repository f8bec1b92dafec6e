"""The question file of `twinlm ablate`: base run, variants, seeds, measures, textbook claims."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from twinlm.ablation.measures import MEASURES, RUN_OUTPUTS
from twinlm.config import Section, Seed, build_config, check_folder_names, flatten_overrides
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
    """A textbook claim about two variants on `metric` (default: the question's), with the publication it
    comes from and what that reports, printed beside the measurement. `kind` says what the claim is:

    - `beats`: `better` beats `worse` (lower or higher, as `lower_is_better`);
    - `no difference`: the two are the same within `margin` (in the metric's units), shown when the 95%
      interval of the paired difference lies inside +-margin (an equivalence test); a significant gap beyond
      the margin disagrees; anything between is inconclusive;
    - `closer`: `better`'s value lies closer to `target` than `worse`'s (|value - target| per seed, lower
      wins), for claims such as "Pre-LN's gradient ratio is about 1, Post-LN's far from it"."""

    better: str
    worse: str
    metric: str | None = None
    lower_is_better: bool | None = None
    kind: Literal["beats", "no difference", "closer"] = "beats"
    margin: float | None = Field(
        None, gt=0, description="kind 'no difference': the largest gap that still counts as the same"
    )
    target: float | None = Field(
        None, description="kind 'closer': the value the better variant lies closer to"
    )
    source: str | None = Field(None, description="e.g. 'Vaswani et al. 2017, Table 3 (A)'")
    published: str | None = Field(None, description="what the source reports, with its number")
    scale_note: str | None = Field(
        None, description="what about a small scale could explain a measurement that does not reproduce it"
    )

    @model_validator(mode="after")
    def _kind_settings(self) -> Comparison:
        needs = {"no difference": "margin", "closer": "target"}
        for kind, field in needs.items():
            given = getattr(self, field) is not None
            if self.kind == kind and not given:
                raise ValueError(f"a claim of kind {kind!r} needs `{field}` ({self.better} vs {self.worse})")
            if self.kind != kind and given:
                raise ValueError(
                    f"`{field}` belongs to claims of kind {kind!r}; this claim ({self.better} vs {self.worse}) "
                    f"is of kind {self.kind!r}"
                )
        if self.kind != "beats" and self.lower_is_better is not None:
            raise ValueError(
                f"lower_is_better has no meaning for a claim of kind {self.kind!r} ({self.better} vs {self.worse})"
            )
        return self


class Scale(Section):
    """A named scale (configs/ablation-scales.yaml): the base pretraining config every question runs on
    there, its seeds and overrides; a question adds its own per scale (`scales: {NAME: {...}}`)."""

    config: Path = Field(description="the base pretraining config at this scale")
    seeds: list[Seed] = Field(min_length=2)
    overrides: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


# The scales file, from the repository root (as every config path): tiny (make ablate), small (make
# ablate-small), and larger ones for a GPU.
DEFAULT_SCALES = Path("configs/ablation-scales.yaml")


class Scales(Section):
    scales: dict[str, Scale] = Field(min_length=1)


class QuestionScale(Section):
    """What a question changes at one scale: base overrides (a longer table, a deeper model) and the
    variants it runs there (default: all; a scale with a budget may run the ones its claims need)."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    variants: list[str] | dict[str, dict[str, Any]] | None = Field(
        None,
        min_length=2,
        description="the variants run at this scale; as a mapping, with more overrides of their own there",
    )


class AblationConfig(Section):
    """One question: base run, variants (overrides), seeds, the metric that answers it."""

    question: str
    textbook: str = Field(description="the textbook answer, checked against the numbers")
    expect: str | None = Field(None, description="the variant the textbook says wins on `metric`")
    base: BaseRun
    variants: dict[str, dict[str, Any]] = Field(min_length=2)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=2)
    metric: str = "val_loss"
    lower_is_better: bool = True
    measures: list[Measure] = Field(default_factory=list)
    compare: list[Comparison] = Field(default_factory=list, description="textbook claims, each checked")
    scales: dict[str, QuestionScale] = Field(
        default_factory=dict,
        description="at a named scale (configs/ablation-scales.yaml): more base overrides, the variants run there",
    )
    reference: str | None = Field(
        None,
        description="the variant whose learning decides whether the question is answered (default: the first)",
    )
    scale: str | None = Field(None, description="the scale this question runs at (set by --scale)")

    @model_validator(mode="after")
    def _known(self) -> AblationConfig:
        check_folder_names(self.variants, "variant")
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
        for field, name in (("expect", self.expect), ("reference", self.reference)):
            if name is not None and name not in self.variants:
                raise ValueError(f"{field}={name!r} is not a variant ({', '.join(self.variants)})")
        for scale, settings in self.scales.items():
            missing = [v for v in settings.variants or () if v not in self.variants]
            if missing:
                raise ValueError(f"scales.{scale}.variants names {missing}, which are not variants")
        known = self.outputs()
        for where, metric in [("metric", self.metric)] + [
            (f"compare[{i}].metric", c.metric) for i, c in enumerate(self.compare) if c.metric
        ]:
            if not _known_metric(metric, known):
                raise ValueError(
                    f"{where}={metric!r} is no number this question measures; choose from "
                    f"{', '.join(sorted(known))} (or add the measure that produces it)"
                )
        return self

    def outputs(self) -> set[str]:
        """The numbers each run of this question will report: the run's own and its measures'."""
        known = set(RUN_OUTPUTS)
        for measure in self.measures:
            known |= set(MEASURES[measure.name].settings(measure.params).outputs())
        return known

    def params(self, measure: Measure) -> dict[str, Any]:
        """A measure's parameters with their defaults filled in (validated when the config was built)."""
        return MEASURES[measure.name].settings(measure.params).model_dump(mode="json")

    @property
    def reference_variant(self) -> str:
        return self.reference or next(iter(self.variants))


def _known_metric(name: str, known: set[str]) -> bool:
    """A measured number: named by a measure or the run, any validation number, or a per-layer one."""
    return (
        name in known
        or name.startswith("val_")
        or re.fullmatch(r"(entropy|saturation|init_grad)_L\d+", name) is not None
    )


def load_ablation(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    scale: str | None = None,
    scales_file: str | Path | None = None,
) -> AblationConfig:
    """Read an ablation YAML (with `key=value` overrides, e.g. seeds=[0,1,2]), at a named scale when given
    (its base config, seeds and overrides, then the question's own for that scale); a one-line TwinLMError
    naming the key on any problem."""
    example = "configs/ablations/02-scaled-attention.yaml"
    config = build_config(AblationConfig, path, overrides, what="ablation config", example=example)
    if scale is not None:
        config = at_scale(config, scale, scales_file or DEFAULT_SCALES)
    if not config.base.config.is_file():
        raise TwinLMError(f"ablation config {path}: base.config {str(config.base.config)!r} does not exist")
    return config


def load_scales(path: str | Path) -> dict[str, Scale]:
    return build_config(Scales, path, (), what="scales file", example="configs/ablations/scales.yaml").scales


def at_scale(config: AblationConfig, name: str, scales_file: str | Path) -> AblationConfig:
    """The question at scale `name`: that scale's base config, seeds and overrides, then the question's
    base overrides, then its own overrides for that scale (later ones win; each sets one field)."""
    scales = load_scales(scales_file)
    if name not in scales:
        raise TwinLMError(f"--scale {name!r} is not in {scales_file}; choose one of {', '.join(scales)}")
    unknown = sorted(set(config.scales) - set(scales))
    if unknown:
        raise TwinLMError(f"scales {unknown} of the question are not in {scales_file} ({', '.join(scales)})")
    scale, own = scales[name], config.scales.get(name, QuestionScale())
    overrides = dict(flatten_overrides(scale.overrides))
    overrides.update(flatten_overrides(config.base.overrides))
    overrides.update(flatten_overrides(own.overrides))
    values = config.model_dump()
    values.update(base={"config": scale.config, "overrides": overrides}, seeds=list(scale.seeds), scale=name)
    if own.variants is not None:  # the variants run at this scale (with their own overrides), and the claims
        extra = own.variants if isinstance(own.variants, dict) else dict.fromkeys(own.variants, {})
        values["variants"] = {
            v: {**dict(flatten_overrides(config.variants[v])), **dict(flatten_overrides(more))}
            for v, more in extra.items()
        }
        values["compare"] = [c for c in values["compare"] if {c["better"], c["worse"]} <= set(own.variants)]
        for field in ("expect", "reference"):
            if values[field] is not None and values[field] not in own.variants:
                values[field] = None
    return AblationConfig.model_validate(values)
