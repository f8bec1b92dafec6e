"""Pretraining data: sources -> documents -> tokenised, packed blocks -> collated batches.

Public API: `DataConfig`/`SourceConfig` (validated config), `load_texts` (documents with a "text"
column), `build_pretraining_datasets` (packed train/validation blocks, each source tokenised once into a
cache), `MixtureSampler` (a seeded, resumable mix of the sources by weight), `MaskedLMCollator` and
`CausalLMCollator` (batches for the two objectives). The config classes are light; the rest (torch,
datasets) is imported on first use (PEP 562), so command-line parsers can use the config cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

from twinlm.data.config import DataConfig, SourceConfig, parse_data_config

# public name -> submodule that defines it (imported when the name is first used)
_LAZY = {
    "CausalLMCollator": "collators",
    "MaskedLMCollator": "collators",
    "MixtureSampler": "mixing",
    "blocks_per_source": "mixing",
    "word_continuation_table": "collators",
    "PACK_BATCH_DOCS": "packing",
    "PretrainingData": "packing",
    "SourceBlocks": "packing",
    "STREAMING_VALIDATION_SIZE": "packing",
    "build_pretraining_datasets": "packing",
    "pack_token_ids": "packing",
    "split_documents": "packing",
    "tokenize_documents": "packing",
    "infer_source_type": "sources",
    "load_texts": "sources",
    "resolve_files": "sources",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"twinlm.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'twinlm.data' has no attribute {name!r}")


__all__ = [
    "DataConfig",
    "SourceConfig",
    "parse_data_config",
    "CausalLMCollator",
    "MaskedLMCollator",
    "MixtureSampler",
    "blocks_per_source",
    "word_continuation_table",
    "PACK_BATCH_DOCS",
    "PretrainingData",
    "SourceBlocks",
    "STREAMING_VALIDATION_SIZE",
    "build_pretraining_datasets",
    "pack_token_ids",
    "split_documents",
    "tokenize_documents",
    "infer_source_type",
    "load_texts",
    "resolve_files",
]
