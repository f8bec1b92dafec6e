"""Tokenise documents and pack them into fixed-length blocks for pretraining.

Layout of a block (`seq_len` tokens, no padding):
- causal: `doc <eos> doc <eos> ...`; masked LM: `[CLS] doc [SEP] [CLS] doc [SEP] ...`.
- `position_ids` restart at 0 at every document start and at every block start: a document that
  continues from the previous block starts again at 0, because the model cannot attend to the
  previous block anyway. With restarting positions the model never attends across documents.
- Documents are concatenated in batches of `PACK_BATCH_DOCS` documents; the tail of each batch that
  does not fill a whole block (fewer than `seq_len` tokens) is dropped, as in transformers' run_clm.
- Map-style data is packed source by source: a block never mixes two sources.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, Sequence, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from twinlm.data.cache import cache_root, load_entry, new_entry, store_entry
from twinlm.data.config import DataConfig, SourceConfig
from twinlm.data.sources import TextDataset, configured_sources, load_source, load_texts, source_identity
from twinlm.errors import TwinLMError

__all__ = [
    "PACK_BATCH_DOCS",
    "STREAMING_VALIDATION_SIZE",
    "PretrainingData",
    "SourceBlocks",
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
_FORMAT_VERSION = "twinlm-pack-v2"  # v2: each source tokenised and packed on its own

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


def tokenize_documents(
    ds: TextDataset,
    tokenizer: Any,
    *,
    causal: bool,
    cfg: DataConfig,
    cache_file: str | None = None,
    fingerprint: str | None = None,
) -> TextDataset:
    """Map "text" to "input_ids" with the document separators added; a map-style result is written to
    `cache_file` (datasets' own cache when None), named by `fingerprint` (default: input + tokenizer)."""
    prefix, suffix = _separators(tokenizer, causal)
    fn = partial(_tokenize_batch, tokenizer=tokenizer, prefix=prefix, suffix=suffix)
    if isinstance(ds, IterableDataset):
        return ds.map(fn, batched=True, remove_columns=["text"], features=_TOKENIZED_FEATURES)
    fingerprint = fingerprint or Hasher.hash([ds._fingerprint, _tokenizer_fingerprint(tokenizer, causal)])
    num_proc = min(cfg.resolved_num_proc(), max(1, len(ds) // _DOCS_PER_PROC))
    return ds.map(
        fn,
        batched=True,
        remove_columns=ds.column_names,
        features=_TOKENIZED_FEATURES,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        desc="Tokenizing",
    )


def _pack(
    ds: TextDataset, tokenizer: Any, cfg: DataConfig, cache: tuple[Path, str] | None = None
) -> TextDataset:
    """Blocks of `cfg.seq_len` tokens; a map-style result is cached as the entry `cache` (root, key)."""
    fn = partial(_pack_batch, seq_len=cfg.seq_len, vocab_size=len(tokenizer))
    if isinstance(ds, IterableDataset):
        return ds.map(
            fn,
            batched=True,
            batch_size=PACK_BATCH_DOCS,
            remove_columns=["input_ids"],
            features=_BLOCK_FEATURES,
        )
    assert cache is not None
    root, key = cache
    cached = load_entry(root, "blocks", key)
    if cached is not None:
        return cached
    # One process on purpose: block boundaries then do not depend on num_proc (packing is cheap).
    packed = ds.map(
        fn,
        batched=True,
        batch_size=PACK_BATCH_DOCS,
        remove_columns=ds.column_names,
        features=_BLOCK_FEATURES,
        new_fingerprint=key,
        cache_file_name=new_entry(root, "blocks", key),
        desc=f"Packing into blocks of {cfg.seq_len}",
    )
    return store_entry(root, "blocks", key, packed)


def _pack_key(tokens_key: str, part: str, indices: np.ndarray, cfg: DataConfig) -> str:
    return Hasher.hash([_FORMAT_VERSION, "pack", tokens_key, part, indices, cfg.seq_len, PACK_BATCH_DOCS])


def _tokenized_source(
    source: SourceConfig, where: str, cfg: DataConfig, tokenizer: Any, causal: bool, root: Path
) -> tuple[Dataset, str]:
    """One source's tokenised documents from the cache, or tokenised now and cached; (dataset, key)."""
    identity = source_identity(source, cfg, where)
    key = Hasher.hash([_FORMAT_VERSION, "tokens", identity, _tokenizer_fingerprint(tokenizer, causal)])
    cached = load_entry(root, "tokens", key)
    if cached is not None:
        logger.info("%s (%s): tokenised documents from the cache (%s)", where, source.describe(), root)
        return cached, key
    docs = load_source(source, cfg, where)
    assert isinstance(docs, Dataset)
    tokenized = tokenize_documents(
        docs, tokenizer, causal=causal, cfg=cfg, cache_file=new_entry(root, "tokens", key), fingerprint=key
    )
    return store_entry(root, "tokens", key, tokenized), key


def _split_indices(n: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices of a map-style corpus of `n` documents, both sorted."""
    if cfg.validation_size is not None:
        k = cfg.validation_size
    else:
        k = int(round(n * cfg.validation_fraction))
        k = max(k, 1) if cfg.validation_fraction > 0 else 0
    if k == 0:
        return np.arange(n), np.arange(0)
    if k >= n:
        raise TwinLMError(
            f"the corpus has {n} documents, too few to hold out {k} for validation; "
            "lower validation_size/validation_fraction or add text"
        )
    order = np.random.default_rng(cfg.seed).permutation(n)
    return np.sort(order[k:]), np.sort(order[:k])


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
    train_idx, val_idx = _split_indices(len(docs), cfg)
    if len(val_idx) == 0:
        return docs, None
    return docs.select(train_idx), docs.select(val_idx)


@dataclasses.dataclass
class SourceBlocks:
    """One source's part of the packed data (map-style): its training blocks follow the previous source's."""

    name: str  # the source as messages name it (SourceConfig.describe)
    weight: float | None  # normalised share of the training tokens; None: the natural proportion
    documents: int  # training documents
    train_blocks: int
    validation_blocks: int


@dataclasses.dataclass
class PretrainingData:
    """Packed blocks for pretraining: `train` (an IterableDataset when streaming), `validation` (None when
    none is held out) and, map-style, each source's share (`sources`, in the order of the train blocks)."""

    train: Dataset | IterableDataset
    validation: Dataset | None
    sources: list[SourceBlocks]
    identity: str | None = None  # what the train blocks are (contents, tokenizer, split, seq_len, weights)

    def source_sizes(self) -> list[int]:
        """Training blocks per source, in order (source i's blocks follow source i-1's)."""
        return [s.train_blocks for s in self.sources]


def build_pretraining_datasets(cfg: DataConfig, tokenizer: Any, *, causal: bool) -> PretrainingData:
    """Load, split, tokenise and pack the corpus into blocks (see the module docstring for the layout).

    Map-style: every source is tokenised once into the cache (`twinlm.data.cache`; reused by later runs until
    its files, its settings or the tokenizer change), the validation documents are held out over all sources
    together (`split_documents`), and each source is packed on its own, so that every block comes from one
    source (what source mixing and the per-source token counts need). Streaming: one stream, tokenised and
    packed on the fly. Raises TwinLMError when a part holds too little text for one block.
    """
    if cfg.streaming:
        return _build_streaming(cfg, tokenizer, causal)
    root = cache_root(cfg)
    weights = cfg.weights()
    parts = [
        (where, source, *_tokenized_source(source, where, cfg, tokenizer, causal, root))
        for where, source in configured_sources(cfg)
    ]
    sizes = [len(ds) for _, _, ds, _ in parts]
    train_idx, val_idx = _split_indices(sum(sizes), cfg)
    trains, validations, blocks, train_keys = [], [], [], []
    offset = 0
    for i, (where, source, tokenized, key) in enumerate(parts):
        local_train = train_idx[(train_idx >= offset) & (train_idx < offset + sizes[i])] - offset
        local_val = val_idx[(val_idx >= offset) & (val_idx < offset + sizes[i])] - offset
        offset += sizes[i]
        train_keys.append(_pack_key(key, "train", local_train, cfg))
        train = _pack(tokenized.select(local_train), tokenizer, cfg, (root, train_keys[-1]))
        trains.append(train)
        validation = None
        if len(local_val):
            validation = _pack(
                tokenized.select(local_val),
                tokenizer,
                cfg,
                (root, _pack_key(key, "validation", local_val, cfg)),
            )
            validations.append(validation)
        weight = weights[i] if weights is not None else None
        if weight and len(train) == 0:
            raise TwinLMError(
                f"{where} ({source.describe()}) has weight {source.weight} but its {len(local_train)} training "
                f"documents hold fewer than seq_len={cfg.seq_len} tokens per packing batch; add text, lower "
                "seq_len or remove the source"
            )
        blocks.append(
            SourceBlocks(source.describe(), weight, len(local_train), len(train), len(validation or []))
        )
    train_ds = trains[0] if len(trains) == 1 else concatenate_datasets(trains)
    validation_ds = None
    if len(val_idx):
        validation_ds = validations[0] if len(validations) == 1 else concatenate_datasets(validations)
        if len(validation_ds) == 0:
            raise TwinLMError(
                f"the {len(val_idx)} validation documents hold fewer than seq_len={cfg.seq_len} tokens; "
                "raise validation_size/validation_fraction or lower seq_len"
            )
    if len(train_ds) == 0:
        raise TwinLMError(
            f"the {len(train_idx)} training documents hold fewer than seq_len={cfg.seq_len} tokens "
            "per packing batch; add text or lower seq_len"
        )
    logger.info(
        "pretraining data: %d train blocks, %s validation blocks of %d tokens (%d train documents)",
        len(train_ds),
        len(validation_ds) if validation_ds is not None else 0,
        cfg.seq_len,
        len(train_idx),
    )
    return PretrainingData(train_ds, validation_ds, blocks, Hasher.hash([train_keys, weights]))


def _build_streaming(cfg: DataConfig, tokenizer: Any, causal: bool) -> PretrainingData:
    """One stream of all sources, tokenised and packed as it is read; validation held out from its start."""
    docs = load_texts(cfg)
    train_docs, val_docs = split_documents(docs, cfg)
    train = _pack(tokenize_documents(train_docs, tokenizer, causal=causal, cfg=cfg), tokenizer, cfg)
    validation = None
    if val_docs is not None:
        root = cache_root(cfg)
        key = Hasher.hash(
            [_FORMAT_VERSION, "streamed", val_docs._fingerprint, _tokenizer_fingerprint(tokenizer, causal)]
        )
        tokenized = load_entry(root, "tokens", key)
        if tokenized is None:
            tokenized = tokenize_documents(
                val_docs,
                tokenizer,
                causal=causal,
                cfg=cfg,
                cache_file=new_entry(root, "tokens", key),
                fingerprint=key,
            )
            tokenized = store_entry(root, "tokens", key, tokenized)
        every = np.arange(len(tokenized))
        validation = _pack(tokenized, tokenizer, cfg, (root, _pack_key(key, "validation", every, cfg)))
        if len(validation) == 0:
            raise TwinLMError(
                f"the {len(val_docs)} validation documents hold fewer than seq_len={cfg.seq_len} tokens; "
                "raise validation_size/validation_fraction or lower seq_len"
            )
    if next(iter(train), None) is None:
        raise TwinLMError(
            f"the streamed corpus yields no block of seq_len={cfg.seq_len} tokens after holding out "
            "validation documents; add text, lower seq_len or validation_size"
        )
    return PretrainingData(train, validation, [])
