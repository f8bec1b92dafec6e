"""Validated configuration of the pretraining data: where the text comes from and how it is cut."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from twinlm.config import Section, validate

__all__ = ["DataConfig", "SourceConfig", "SourceType", "parse_data_config"]

SourceType = Literal["text", "json", "csv", "tsv", "parquet"]


class SourceConfig(Section):
    """One text source: a local `path` (file, directory or glob), a Hub dataset (`hub`), or `default: true`.

    A plain string in `DataConfig.sources` is shorthand for `{path: <string>}`. `split` and `config`
    apply to Hub datasets only (local files are one "train" split).
    """

    path: str | None = None
    type: SourceType | None = Field(
        default=None, description="file format; inferred from the extension when unset"
    )
    hub: str | None = Field(default=None, description="Hugging Face Hub dataset name")
    config: str | None = Field(default=None, description="Hub dataset configuration name")
    split: str = "train"
    default: bool = Field(default=False, description="the embedded default corpus")
    text_column: str = "text"
    max_documents: int | None = Field(
        default=None,
        gt=0,
        description="read only the first max_documents documents (a quick look at a large source)",
    )
    weight: float | None = Field(
        default=None,
        ge=0,
        description="share of the training TOKENS drawn from this source, relative to the other sources' "
        "weights (normalised to sum 1); every source gets one or none does (then each block is used once per "
        "epoch, in the sources' natural proportions)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> SourceConfig:
        kinds = [name for name in ("path", "hub") if getattr(self, name)] + (
            ["default"] if self.default else []
        )
        if len(kinds) != 1:
            got = "none of them" if not kinds else " and ".join(kinds)
            raise ValueError(f"a source needs exactly one of path, hub or default: true (got {got})")
        if self.type is not None and not self.path:
            raise ValueError("type applies only to a source with a path")
        if self.config is not None and not self.hub:
            raise ValueError("config applies only to a source with hub")
        return self

    def describe(self) -> str:
        """A short human-readable name of the source, for messages."""
        first = f", first {self.max_documents} documents" if self.max_documents else ""
        if self.path:
            return f"path={self.path!r}{first}"
        if self.hub:
            cfg = f", config={self.config!r}" if self.config else ""
            return f"hub={self.hub!r}{cfg}, split={self.split!r}{first}"
        return f"default corpus{first}"


class DataConfig(Section):
    """Everything that decides the pretraining blocks; an empty `sources` means the embedded corpus."""

    sources: list[SourceConfig] = Field(default_factory=list)
    seq_len: int = Field(default=128, ge=2)
    streaming: bool = False
    validation_fraction: float = Field(
        default=0.01, ge=0.0, lt=1.0, description="share of documents held out (not used when streaming)"
    )
    validation_size: int | None = Field(
        default=None,
        ge=0,
        description="documents held out; overrides validation_fraction; when streaming the first "
        "validation_size documents of the stream (1000 when unset)",
    )
    num_proc: int | None = Field(default=None, ge=1)
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    whole_word_masking: bool = False
    cache_dir: str | None = None
    text_document_split: Literal["line", "paragraph", "file"] = "paragraph"
    seed: int = 0

    @field_validator("sources", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _weights_for_all_or_none(self) -> DataConfig:
        weighted = [source.weight is not None for source in self.sources]
        if any(weighted) and not all(weighted):
            missing = ", ".join(f"sources.{i}" for i, w in enumerate(weighted) if not w)
            raise ValueError(f"give every source a weight or none ({missing} has no weight)")
        if any(weighted) and sum(source.weight or 0.0 for source in self.sources) <= 0:
            raise ValueError("the source weights add up to 0: give at least one source a positive weight")
        if any(weighted) and self.streaming:
            raise ValueError(
                "source weights need map-style data (a mix is drawn from known block counts): set "
                "streaming: false, or remove the weights"
            )
        return self

    def weights(self) -> list[float] | None:
        """The sources' normalised weights (shares of the training tokens), or None when unweighted."""
        if not self.sources or self.sources[0].weight is None:
            return None
        total = sum(source.weight or 0.0 for source in self.sources)
        return [(source.weight or 0.0) / total for source in self.sources]

    def resolved_num_proc(self) -> int:
        """`num_proc`, or min(4, CPU count) when unset."""
        return self.num_proc or max(1, min(4, os.cpu_count() or 1))


def parse_data_config(value: Mapping[str, Any] | DataConfig | None) -> DataConfig:
    """Build a DataConfig from a mapping (e.g. a YAML section), raising TwinLMError naming bad keys."""
    if isinstance(value, DataConfig):
        return value
    return validate(DataConfig, value or {}, "data config")
