"""Pretraining data: sources -> documents -> tokenised, packed blocks -> collated batches.

Public API: `DataConfig`/`SourceConfig` (validated config), `load_texts` (documents with a "text"
column), `build_pretraining_datasets` (packed train/validation blocks), `MaskedLMCollator` and
`CausalLMCollator` (batches for the two objectives).
"""

from twinlm.data.collators import CausalLMCollator, MaskedLMCollator, word_continuation_table
from twinlm.data.config import DataConfig, SourceConfig, parse_data_config
from twinlm.data.packing import (
    PACK_BATCH_DOCS,
    STREAMING_VALIDATION_SIZE,
    build_pretraining_datasets,
    pack_token_ids,
    split_documents,
    tokenize_documents,
)
from twinlm.data.sources import infer_source_type, load_texts, resolve_files

__all__ = [
    "PACK_BATCH_DOCS",
    "STREAMING_VALIDATION_SIZE",
    "CausalLMCollator",
    "DataConfig",
    "MaskedLMCollator",
    "SourceConfig",
    "build_pretraining_datasets",
    "infer_source_type",
    "load_texts",
    "pack_token_ids",
    "parse_data_config",
    "resolve_files",
    "split_documents",
    "tokenize_documents",
    "word_continuation_table",
]
