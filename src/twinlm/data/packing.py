"""Tokenise documents and pack them into fixed-length blocks for pretraining.

Layout of a block (`seq_len` tokens, no padding):
- causal: `doc <eos> doc <eos> ...`; masked LM: `[CLS] doc [SEP] [CLS] doc [SEP] ...`.
- `position_ids` restart at 0 at every document start and at every block start: a document that
  continues from the previous block starts again at 0, because the model cannot attend to the
  previous block anyway. With restarting positions the model never attends across documents.
- Documents are concatenated in batches of `PACK_BATCH_DOCS` documents; the tail of each batch that
  does not fill a whole block (fewer than `seq_len` tokens) is dropped, as in transformers' run_clm.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from itertools import chain
from typing import Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, Sequence, Value
from datasets.fingerprint import Hasher

from twinlm.data.config import DataConfig
from twinlm.data.sources import TextDataset, load_texts
from twinlm.errors import TwinLMError

__all__ = [
    "PACK_BATCH_DOCS",
    "STREAMING_VALIDATION_SIZE",
    "build_pretraining_datasets",
    "pack_token_ids",
    "split_documents",
    "tokenize_documents",
]

logger = logging.getLogger(__name__)

#: Documents concatenated together before cutting blocks (the remainder of each batch is dropped).
PACK_BATCH_DOCS = 1000
#: Documents held out for validation when streaming and `validation_size` is unset.
STREAMING_VALIDATION_SIZE = 1000
#: Documents per worker process below which tokenising in several processes is not worth it.
_DOCS_PER_PROC = 2000
_FORMAT_VERSION = "twinlm-pack-v1"

_TOKENIZED_FEATURES = Features({"input_ids": Sequence(Value("int32"))})
_BLOCK_FEATURES = Features({"input_ids": Sequence(Value("int32")), "position_ids": Sequence(Value("int32"))})


def _separators(tokenizer: Any, causal: bool) -> tuple[list[int], list[int]]:
    """Ids put before and after every document: causal `[] doc [eos]` (a WordPiece tokenizer, which has no
    eos, ends documents with its [SEP]), masked LM `[cls] doc [sep]`."""
    if causal:
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if end is None:
            raise TwinLMError(
                "the tokenizer has no eos_token (or sep_token); causal packing ends every document with it"
            )
        return [], [end]
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise TwinLMError(
            "the tokenizer has no cls_token/sep_token; masked-LM packing wraps documents in them"
        )
    return [tokenizer.cls_token_id], [tokenizer.sep_token_id]


def _tokenize_batch(
    batch: dict[str, list[str]], tokenizer: Any, prefix: list[int], suffix: list[int]
) -> dict:
    encoded = tokenizer(
        batch["text"],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    return {"input_ids": [prefix + ids + suffix for ids in encoded]}


def pack_token_ids(documents: list[list[int]], seq_len: int, vocab_size: int | None = None) -> dict:
    """Concatenate tokenised documents and cut them into blocks of exactly `seq_len` (tail dropped).

    Returns {"input_ids": (n, seq_len), "position_ids": (n, seq_len)} int32 arrays; positions restart
    at 0 at each document start and each block start. Raises TwinLMError on ids >= `vocab_size`.
    """
    lengths = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
    total = int(lengths.sum())
    n_blocks = total // seq_len
    used = n_blocks * seq_len
    ids = np.fromiter(chain.from_iterable(documents), dtype=np.int64, count=total)[:used]
    if vocab_size is not None and used and (ids.max() >= vocab_size or ids.min() < 0):
        raise TwinLMError(
            f"the tokenizer produced id {int(ids.max())} outside its vocabulary of {vocab_size}; "
            "the tokenizer files are inconsistent"
        )
    restart = np.zeros(used, dtype=bool)
    doc_starts = np.cumsum(lengths) - lengths
    restart[doc_starts[doc_starts < used]] = True
    restart[::seq_len] = True
    index = np.arange(used)
    positions = index - np.maximum.accumulate(np.where(restart, index, 0))
    return {
        "input_ids": ids.astype(np.int32).reshape(n_blocks, seq_len),
        "position_ids": positions.astype(np.int32).reshape(n_blocks, seq_len),
    }


def _pack_batch(batch: dict[str, list[list[int]]], seq_len: int, vocab_size: int) -> dict:
    return pack_token_ids(batch["input_ids"], seq_len, vocab_size)


def _tokenizer_fingerprint(tokenizer: Any, causal: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    return Hasher.hash([_FORMAT_VERSION, state, _separators(tokenizer, causal), len(tokenizer)])


def tokenize_documents(ds: TextDataset, tokenizer: Any, *, causal: bool, cfg: DataConfig) -> TextDataset:
    """Map "text" to "input_ids" with the document separators added (cached for map-style datasets)."""
    prefix, suffix = _separators(tokenizer, causal)
    fn = partial(_tokenize_batch, tokenizer=tokenizer, prefix=prefix, suffix=suffix)
    if isinstance(ds, IterableDataset):
        return ds.map(fn, batched=True, remove_columns=["text"], features=_TOKENIZED_FEATURES)
    fingerprint = Hasher.hash([ds._fingerprint, _tokenizer_fingerprint(tokenizer, causal)])
    num_proc = min(cfg.resolved_num_proc(), max(1, len(ds) // _DOCS_PER_PROC))
    return ds.map(
        fn,
        batched=True,
        remove_columns=ds.column_names,
        features=_TOKENIZED_FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fingerprint,
        cache_file_name=_cache_file(ds, cfg, "tokenized", fingerprint),
        desc="Tokenizing",
    )


def _pack(ds: TextDataset, tokenizer: Any, cfg: DataConfig) -> TextDataset:
    fn = partial(_pack_batch, seq_len=cfg.seq_len, vocab_size=len(tokenizer))
    if isinstance(ds, IterableDataset):
        return ds.map(
            fn,
            batched=True,
            batch_size=PACK_BATCH_DOCS,
            remove_columns=["input_ids"],
            features=_BLOCK_FEATURES,
        )
    # One process on purpose: block boundaries then do not depend on num_proc (packing is cheap).
    fingerprint = Hasher.hash([ds._fingerprint, _FORMAT_VERSION, "pack", cfg.seq_len, PACK_BATCH_DOCS])
    return ds.map(
        fn,
        batched=True,
        batch_size=PACK_BATCH_DOCS,
        remove_columns=ds.column_names,
        features=_BLOCK_FEATURES,
        new_fingerprint=fingerprint,
        cache_file_name=_cache_file(ds, cfg, "packed", fingerprint),
        desc=f"Packing into blocks of {cfg.seq_len}",
    )


def _cache_file(ds: Dataset, cfg: DataConfig, stage: str, fingerprint: str) -> str | None:
    """An explicit cache file for in-memory datasets when `cache_dir` is set; else datasets' default."""
    if ds.cache_files or cfg.cache_dir is None:
        return None
    os.makedirs(cfg.cache_dir, exist_ok=True)
    return os.path.join(cfg.cache_dir, f"twinlm-{stage}-{fingerprint}.arrow")


def split_documents(docs: TextDataset, cfg: DataConfig) -> tuple[TextDataset, Dataset | None]:
    """Hold out validation documents before packing, deterministically from `cfg.seed`.

    Map-style: `validation_size` documents (or `validation_fraction` of them, at least one when the
    fraction is positive) drawn at random; both parts keep corpus order. Streaming: the first
    `validation_size` documents (STREAMING_VALIDATION_SIZE when unset) of the stream.
    """
    if isinstance(docs, IterableDataset):
        k = cfg.validation_size if cfg.validation_size is not None else STREAMING_VALIDATION_SIZE
        if cfg.validation_size is None and cfg.validation_fraction == 0:
            k = 0
        if k == 0:
            return docs, None
        held = [row["text"] for row in docs.take(k)]
        # A content fingerprint, so that the tokenised validation set is cached like map-style data.
        validation = Dataset.from_dict({"text": held}, features=Features({"text": Value("string")}))
        validation._fingerprint = Hasher.hash(["streamed-validation", held])
        return docs.skip(k), validation
    n = len(docs)
    if cfg.validation_size is not None:
        k = cfg.validation_size
    else:
        k = int(round(n * cfg.validation_fraction))
        k = max(k, 1) if cfg.validation_fraction > 0 else 0
    if k == 0:
        return docs, None
    if k >= n:
        raise TwinLMError(
            f"the corpus has {n} documents, too few to hold out {k} for validation; "
            "lower validation_size/validation_fraction or add text"
        )
    order = np.random.default_rng(cfg.seed).permutation(n)
    val_idx = np.sort(order[:k])
    train_idx = np.sort(order[k:])
    return docs.select(train_idx), docs.select(val_idx)


def build_pretraining_datasets(
    cfg: DataConfig, tokenizer: Any, *, causal: bool
) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Load, split, tokenise and pack the corpus: (train, validation) datasets of packed blocks.

    Rows are {"input_ids": [seq_len ints], "position_ids": [seq_len ints]}; see the module docstring
    for the layout. Train is an IterableDataset when `cfg.streaming`; validation is map-style, or None
    when no validation is asked for. Deterministic, and cached by `datasets` fingerprints.
    """
    docs = load_texts(cfg)
    train_docs, val_docs = split_documents(docs, cfg)
    train = _pack(tokenize_documents(train_docs, tokenizer, causal=causal, cfg=cfg), tokenizer, cfg)
    validation = None
    if val_docs is not None:
        validation = _pack(tokenize_documents(val_docs, tokenizer, causal=causal, cfg=cfg), tokenizer, cfg)
        if len(validation) == 0:
            raise TwinLMError(
                f"the {len(val_docs)} validation documents hold fewer than seq_len={cfg.seq_len} tokens; "
                "raise validation_size/validation_fraction or lower seq_len"
            )
    if isinstance(train, Dataset):
        if len(train) == 0:
            raise TwinLMError(
                f"the {len(train_docs)} training documents hold fewer than seq_len={cfg.seq_len} tokens "
                "per packing batch; add text or lower seq_len"
            )
        logger.info(
            "pretraining data: %d train blocks, %s validation blocks of %d tokens (%d train documents)",
            len(train),
            len(validation) if validation is not None else 0,
            cfg.seq_len,
            len(train_docs),
        )
    elif next(iter(train), None) is None:
        raise TwinLMError(
            f"the streamed corpus yields no block of seq_len={cfg.seq_len} tokens after holding out "
            "validation documents; add text, lower seq_len or validation_size"
        )
    return train, validation
