"""Load documents from the configured sources into one `datasets` table with a "text" column."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher

from twinlm.data.config import DataConfig, SourceConfig
from twinlm.data.textfiles import TextFilesInfo, check_text_files
from twinlm.errors import TwinLMError

__all__ = [
    "TextDataset",
    "TextFilesInfo",
    "check_text_files",
    "configured_sources",
    "file_digest",
    "infer_source_type",
    "load_source",
    "load_texts",
    "resolve_files",
    "source_identity",
]

TextDataset = Dataset | IterableDataset

_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}
_GLOB_CHARS = set("*?[")
_SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}


def infer_source_type(path: str | Path) -> str | None:
    """The loader for a file from its extension ("text", "json", "csv", "tsv", "parquet"), or None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def resolve_files(source: SourceConfig, where: str) -> dict[str, list[str]]:
    """Expand a source's path (file, directory or glob) into sorted files grouped by loader.

    Raises TwinLMError when nothing exists or matches, or a file's type cannot be told.
    """
    assert source.path is not None
    raw = source.path
    path = Path(raw).expanduser()
    if any(c in raw for c in _GLOB_CHARS):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise TwinLMError(f"{where} ({source.describe()}): the glob matches no files")
    elif path.is_dir():
        files = sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (source.type is not None or infer_source_type(p) is not None)
        )
        if not files:
            known = ", ".join(sorted(_EXTENSIONS))
            raise TwinLMError(f"{where} ({source.describe()}): the directory holds no files with {known}")
    elif path.is_file():
        files = [str(path)]
    else:
        raise TwinLMError(f"{where} ({source.describe()}): no such file or directory")

    groups: dict[str, list[str]] = {}
    for f in files:
        kind = source.type or infer_source_type(f)
        if kind is None:
            raise TwinLMError(
                f"{where} ({source.describe()}): cannot tell the type of {f}; "
                f"set type to one of text, json, csv, tsv, parquet"
            )
        if kind == "csv" and infer_source_type(f) == "tsv":
            kind = "tsv"
        groups.setdefault(kind, []).append(f)
    return groups


def _load_local(source: SourceConfig, cfg: DataConfig, where: str) -> list[TextDataset]:
    parts = []
    for kind, files in resolve_files(source, where).items():
        kwargs: dict[str, Any] = {}
        builder = kind
        label = f"{where} ({source.describe()})"
        if kind != "parquet":  # a binary or non-UTF-8 file is named up front, not deep inside `datasets`
            checked = {
                f: check_text_files([f], where=label)
                for f in files
                if Path(f).suffix.lower() not in _COMPRESSION
            }
        if kind == "text":
            # leave out files with no text (datasets fails on them with a message that names nothing),
            # and say so when that leaves nothing.
            blank = {f for f, info in checked.items() if not info.has_text}
            files = [f for f in files if f not in blank]
            if not files:
                raise TwinLMError(f"{label}: no text in {', '.join(sorted(blank))}")
            kwargs["sample_by"] = _SAMPLE_BY[cfg.text_document_split]
        elif kind == "tsv":
            builder, kwargs["delimiter"] = "csv", "\t"
        if not cfg.streaming:
            # `datasets` tells a local file's cached Arrow table from its modification time alone: a file
            # rewritten with its old time (cp -p, rsync -a, tar) would load its OLD text. twinlm keys its own
            # caches by the files' contents and calls this only on a miss, so the table is built again.
            kwargs["download_mode"] = "force_redownload"
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=files,
                split="train",
                streaming=cfg.streaming,
                cache_dir=cfg.cache_dir,
                **kwargs,
            )
        except (ValueError, OSError, pa.ArrowException, datasets.exceptions.DatasetGenerationError) as e:
            raise TwinLMError(f"{where} ({source.describe()}): cannot read {kind} files: {e}") from e
        parts.append(ds)
    return parts


def _load_hub(source: SourceConfig, cfg: DataConfig, where: str) -> TextDataset:
    try:
        return datasets.load_dataset(
            source.hub,
            source.config,
            split=source.split,
            streaming=cfg.streaming,
            cache_dir=cfg.cache_dir,
        )
    except Exception as e:  # the Hub raises many kinds (offline, not found, bad split, gated)
        raise TwinLMError(f"{where} ({source.describe()}): cannot load the Hub dataset: {e}") from e


def _load_default(cfg: DataConfig) -> TextDataset:
    from twinlm.corpus import default_corpus

    docs = default_corpus()
    # A content fingerprint (not a random one) so that tokenised caches of the corpus are reused.
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.encode("utf-8"))
        digest.update(b"\0")
    table = datasets.table.InMemoryTable.from_pydict({"text": pa.array(docs, type=pa.string())})
    ds = Dataset(table, fingerprint=f"twinlm-default-{digest.hexdigest()[:32]}")
    return ds.to_iterable_dataset() if cfg.streaming else ds


def _column_names(ds: TextDataset) -> list[str] | None:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return None if first is None else list(first)


def _clean_documents(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Strip surrounding whitespace (e.g. a file's last newline) and drop empty documents."""
    return {"text": [t.strip() for t in batch["text"] if isinstance(t, str) and t.strip()]}


def _normalise(ds: TextDataset, source: SourceConfig, where: str, cfg: DataConfig) -> TextDataset:
    """Keep only the text column, named "text" and typed string; strip documents and drop empty ones."""
    col = source.text_column
    names = _column_names(ds)
    if names is not None and col not in names:
        raise TwinLMError(
            f"{where} ({source.describe()}): no column {col!r} (columns: {', '.join(names)}); "
            "set text_column (twinlm tokenizer: --text-column)"
        )
    ds = ds.select_columns([col])
    if col != "text":
        ds = ds.rename_column(col, "text")
    feature = ds.features["text"] if ds.features is not None else None
    if feature is not None:
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise TwinLMError(
                f"{where} ({source.describe()}): column {col!r} holds {feature}, not text; set text_column"
            )
        if feature.dtype != "string":
            ds = ds.cast_column("text", datasets.Value("string"))
    if isinstance(ds, Dataset):
        return ds.map(_clean_documents, batched=True, desc=f"Cleaning documents ({where})")
    return ds.map(_clean_documents, batched=True)


def _is_empty(ds: TextDataset) -> bool:
    return len(ds) == 0 if isinstance(ds, Dataset) else next(iter(ds), None) is None


def configured_sources(cfg: DataConfig) -> list[tuple[str, SourceConfig]]:
    """(name for messages, source) of every configured source; the embedded corpus when there is none."""
    if not cfg.sources:
        return [("the default corpus", SourceConfig(default=True))]
    return [(f"data source {i}", source) for i, source in enumerate(cfg.sources)]


def load_source(source: SourceConfig, cfg: DataConfig, where: str) -> TextDataset:
    """One source's documents, one per row, column "text" (see `load_texts`)."""
    if source.path:
        loaded = _load_local(source, cfg, where)
    elif source.hub:
        loaded = [_load_hub(source, cfg, where)]
    else:
        loaded = [_load_default(cfg)]
    if source.max_documents is not None:
        loaded = _first_documents(loaded, source.max_documents)
    parts = [_normalise(ds, source, where, cfg) for ds in loaded]
    if all(_is_empty(ds) for ds in parts):
        raise TwinLMError(f"{where} ({source.describe()}): holds no non-empty documents")
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if isinstance(docs, IterableDataset) and source.max_documents is not None:
        docs = docs.take(source.max_documents)
    return docs


def _first_documents(parts: list[TextDataset], limit: int) -> list[TextDataset]:
    """The first `limit` rows of the parts taken in order (before cleaning: at most `limit` documents)."""
    kept: list[TextDataset] = []
    for ds in parts:
        if limit <= 0:
            break
        if isinstance(ds, Dataset):
            ds = ds.select(range(min(limit, len(ds))))
            limit -= len(ds)
        else:
            ds = ds.take(limit)  # a stream's length is unknown: load_source takes `limit` of them all again
        kept.append(ds)
    return kept


def load_texts(cfg: DataConfig) -> TextDataset:
    """All documents of `cfg.sources` (the embedded corpus when empty), one per row, column "text".

    A `datasets.Dataset` (memory-mapped, cached), or an `IterableDataset` when `cfg.streaming`.
    Plain-text files become documents by `cfg.text_document_split`; documents are stripped of surrounding
    whitespace and empty ones dropped.
    Raises TwinLMError naming the source for missing files, empty globs, wrong columns or no text.
    """
    parts = [load_source(source, cfg, where) for where, source in configured_sources(cfg)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_identity(source: SourceConfig, cfg: DataConfig, where: str) -> str:
    """What a source's documents are, as a string that changes whenever they may: the SHA-256 of every local
    file's bytes (not its path or time: a copied corpus keeps its identity, an edited one loses it) with how
    it is read; for a Hub dataset and the embedded corpus the fingerprint `datasets` gives the loaded data."""
    settings = [source.type, source.text_column, source.max_documents, cfg.text_document_split]
    if source.path:
        files = [
            (kind, file_digest(f)) for kind, group in resolve_files(source, where).items() for f in group
        ]
        return Hasher.hash(["files", files, settings])
    if source.hub:
        loaded = _load_hub(source, cfg, where)
        return Hasher.hash(["hub", source.hub, source.config, source.split, loaded._fingerprint, settings])
    return Hasher.hash(["default", _load_default(cfg)._fingerprint, settings])
