"""Train WordPiece (BERT-style) and byte-level BPE (GPT-style) tokenizers, and measure them.

Both are trained by the `tokenizers` trainers from batched, streaming iterators, wrapped as a
transformers fast tokenizer, and saved as `tokenizer.json` + `tokenizer_config.json` so that
`AutoTokenizer.from_pretrained(dir)` loads them in any process, without twinlm.

    twinlm tokenizer train --type wordpiece --vocab-size 16000 --out tok/ corpus/*.txt
    twinlm tokenizer stats tok_wordpiece/ tok_bpe/ held_out.txt
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from twinlm.config import Section, apply_overrides, parse_overrides, read_config_file, validate
from twinlm.data.config import SourceConfig
from twinlm.errors import TwinLMError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from twinlm.data.sources import TextFilesInfo

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "TOKENIZER_TYPES",
    "WORDPIECE_SPECIAL_TOKENS",
    "TextSource",
    "TokenizerTrainConfig",
    "add_parser",
    "new_tokenizer",
    "format_stats_table",
    "iter_dataset_texts",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_stats",
    "train_tokenizer",
]

TOKENIZER_TYPES = ("wordpiece", "bpe")
WORDPIECE_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
ENDOFTEXT = "<|endoftext|>"
BPE_PAD = "<|pad|>"
# GPT-2 convention: <|endoftext|> separates documents and serves as bos/eos/unk; a separate pad token
# so that padding can never be mistaken for the end of a document.
BPE_SPECIAL_TOKENS = {
    "bos_token": ENDOFTEXT,
    "eos_token": ENDOFTEXT,
    "unk_token": ENDOFTEXT,
    "pad_token": BPE_PAD,
}
_BYTE_ALPHABET = 256
_BATCH = 1000
_LINE_PIECE = 1 << 20  # the longest piece of one line read from a file at once (characters)
# The longest text handed to a `tokenizers` trainer at once (characters). BPE training time grows faster
# than quadratically with the length of one pre-token (a 60 KB run without spaces: seconds; 1 MB: many
# minutes), so longer texts are cut, just before a whitespace character where there is one.
_PIECE = 1000


# ---------------------------------------------------------------------------------------------------
# Where the training text comes from (reading is twinlm.data's; only plain-text line batches are ours)
# ---------------------------------------------------------------------------------------------------


def _batched(texts: Iterable[str], batch_size: int = _BATCH) -> Iterator[list[str]]:
    """Group an iterable of strings into lists of `batch_size` (the last may be shorter)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _iter_line_batches(
    files: Sequence[str | os.PathLike[str]], batch_size: int = _BATCH
) -> Iterator[list[str]]:
    """The lines of UTF-8 text files (newlines kept, as byte-level BPE learns them) in lists, streaming.

    A line longer than 1 MiB is handed on in 1 MiB pieces, so even a file that is one enormous line never
    has to fit in memory. Check the files first with `twinlm.data.textfiles.check_text_files`.
    """

    def lines() -> Iterator[str]:
        for path in files:
            with open(path, encoding="utf-8", errors="strict", newline="") as f:
                while piece := f.readline(_LINE_PIECE):
                    yield piece

    return _batched(lines(), batch_size)


def _iter_sources(sources: list[SourceConfig], streaming: bool, batch_size: int) -> Iterator[list[str]]:
    """Documents of `twinlm.data` sources (the embedded corpus when empty) in lists of strings."""
    import datasets
    import pyarrow as pa

    from twinlm.data import DataConfig, load_texts

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    cfg = DataConfig(sources=sources, streaming=streaming, text_document_split="line")
    what = ", ".join(s.describe() for s in sources) or "the default corpus"
    try:  # streaming sources are read lazily: decoding errors surface while iterating
        for batch in load_texts(cfg).iter(batch_size=batch_size):
            yield batch["text"]
    except (UnicodeDecodeError, ValueError, pa.ArrowException) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TwinLMError(f"cannot read {what}: {message}") from None


def _dataset_source(
    name_or_path: str | os.PathLike[str], config: str | None, split: str, text_column: str
) -> SourceConfig:
    """A Hub dataset name, or a local file/folder/glob (anything that looks like a path), as a source."""
    from twinlm.data.sources import infer_source_type

    name = str(name_or_path)
    looks_local = Path(name).exists() or name.startswith((".", "/", "~")) or any(c in name for c in "*?[")
    if looks_local or infer_source_type(name) is not None:
        return SourceConfig(path=name, text_column=text_column)
    return SourceConfig(hub=name, config=config, split=split, text_column=text_column)


def iter_dataset_texts(
    name_or_path: str | os.PathLike[str],
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    batch_size: int = _BATCH,
) -> Iterator[list[str]]:
    """Yield batches of documents from a Hub dataset name or local files, via `twinlm.data.load_texts`.

    Local files (a file, folder or glob of `.txt`, `.json(l)`, `.csv`/`.tsv` or `.parquet`) are typed by
    extension; plain text gives one document per line. Documents are stripped and empty ones skipped;
    with `streaming=True` (default) nothing is loaded into memory. Bad input raises `TwinLMError`.
    """
    yield from _iter_sources(
        [_dataset_source(name_or_path, config, split, text_column)], streaming, batch_size
    )


class TextSource(BaseModel):
    """Where tokenizer text comes from: a list of `twinlm.data.SourceConfig`, as pretraining's `data.sources`.

    Each source is `{path: ...}` (a file, folder or glob; a bare string is shorthand), `{hub: name, config,
    split, text_column}` or `{default: true}`; an empty list is the embedded default corpus. Plain-text
    files are read line by line (newlines kept, as byte-level BPE learns them), everything else through
    `twinlm.data.load_texts`.
    """

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(default_factory=list)
    streaming: bool = True

    @field_validator("sources", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @classmethod
    def from_files(cls, files: Sequence[str | os.PathLike[str]], text_column: str = "text") -> TextSource:
        """Sources for FILES given on the command line or to `train_tokenizer(files=...)`."""
        return cls(sources=[SourceConfig(path=str(f), text_column=text_column) for f in files])

    @property
    def is_default(self) -> bool:
        """True when this source is the embedded default corpus."""
        return all(s.default for s in self.sources)

    def describe(self) -> str:
        """A short human-readable name for summaries."""
        if self.is_default:
            return "the embedded default corpus"
        if all(s.path for s in self.sources):
            paths = [str(s.path) for s in self.sources]
            return f"{len(paths)} file(s)" if len(paths) > 3 else ", ".join(paths)
        return ", ".join(s.describe() for s in self.sources)

    def _resolve(self) -> tuple[list[str], list[SourceConfig]]:
        """(plain-text files, other sources), with files/folders/globs expanded by `twinlm.data`."""
        from twinlm.data.sources import infer_source_type, resolve_files

        text_files: list[str] = []
        others: list[SourceConfig] = []
        for source in self.sources:
            if not source.path:
                others.append(source)
                continue
            # a named file of unknown extension is taken as plain text, as FILES promise
            if source.type is None and Path(source.path).is_file() and infer_source_type(source.path) is None:
                source = source.model_copy(update={"type": "text"})
            for kind, found in resolve_files(source, "text source").items():
                if kind == "text":
                    text_files += found
                else:
                    others += [SourceConfig(path=p, type=kind, text_column=source.text_column) for p in found]
        return text_files, others

    def validate_input(self, show_progress: bool = False) -> TextFilesInfo | None:
        """Check local files up front (existence, type, UTF-8, not empty).

        Returns the plain-text check's counts (its lines are the trainer's progress total) when the source
        is plain-text files only, else None.
        """
        from twinlm.data.textfiles import check_text_files

        text_files, others = self._resolve()
        if not text_files:
            return None
        info = check_text_files(text_files, show_progress=show_progress)
        if not info.has_text and not others:
            raise TwinLMError(f"the corpus is empty: {', '.join(text_files)} hold no text")
        return None if others else info

    def iter_batches(self, batch_size: int = _BATCH) -> Iterator[list[str]]:
        """Yield the text of these sources in lists of strings."""
        text_files, others = self._resolve()
        yield from _iter_line_batches(text_files, batch_size)
        if others or not self.sources:
            yield from _iter_sources(others, self.streaming, batch_size)


def _special_list(kind: str) -> list[str]:
    """Special tokens in vocabulary order (they take the first ids)."""
    tokens = WORDPIECE_SPECIAL_TOKENS if kind == "wordpiece" else BPE_SPECIAL_TOKENS
    return list(dict.fromkeys(tokens.values()))


def _check_kind(kind: str) -> str:
    normalized = str(kind).lower().replace("-", "").replace("_", "")
    aliases = {"wordpiece": "wordpiece", "bpe": "bpe", "bytelevelbpe": "bpe", "bytebpe": "bpe"}
    if normalized not in aliases:
        raise TwinLMError(f"unknown tokenizer type {kind!r}: use one of {', '.join(TOKENIZER_TYPES)}")
    return aliases[normalized]


def _check_vocab_size(kind: str, vocab_size: int) -> None:
    """Reject sizes that cannot hold the special tokens plus the alphabet (before any training)."""
    from twinlm.training.config import MAX_VOCAB_SIZE

    minimum = len(_special_list(kind)) + (_BYTE_ALPHABET if kind == "bpe" else 1)
    if isinstance(vocab_size, int) and vocab_size > MAX_VOCAB_SIZE:
        raise TwinLMError(
            f"vocab size {vocab_size:,} is beyond what a tokenizer can be trained to here (at most "
            f"{MAX_VOCAB_SIZE:,}); check the value"
        )
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        what = "256 byte symbols" if kind == "bpe" else "at least one symbol"
        raise TwinLMError(
            f"vocab size {vocab_size} is too small for {kind}: its {len(_special_list(kind))} special "
            f"tokens plus the alphabet ({what}) need at least {minimum}"
        )


def new_tokenizer(kind: str, lowercase: bool = True) -> Any:
    """An untrained `tokenizers.Tokenizer` with the full pipeline of the given type.

    WordPiece: BERT normaliser and pre-tokeniser, `##` decoder. Byte-level BPE: no normaliser (lossless),
    ByteLevel pre-tokeniser and decoder, no prefix space.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _check_kind(kind)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIAL_TOKENS["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _trainer(kind: str, vocab_size: int, min_frequency: int, show_progress: bool) -> Any:
    from tokenizers import pre_tokenizers, trainers

    if kind == "wordpiece":
        return trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=_special_list(kind),
            limit_alphabet=1000,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special_list(kind),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )


def _wrap(tok: Any, kind: str, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained `tokenizers.Tokenizer` as a transformers fast tokenizer with its special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        cls, sep = WORDPIECE_SPECIAL_TOKENS["cls_token"], WORDPIECE_SPECIAL_TOKENS["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
        specials = WORDPIECE_SPECIAL_TOKENS
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        specials = BPE_SPECIAL_TOKENS
        input_names = ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        model_input_names=input_names,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **specials,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike[str]) -> Path:
    """Save atomically: write into `OUT.tmp` beside `out_dir`, then rename it into place.

    An existing `out_dir` is replaced only once the new one is complete, so a failure (a full disk) never
    leaves a half-written tokenizer behind; it is a one-line TwinLMError.
    """
    from twinlm.fileio import atomic_folder, check_output_folder

    out = check_output_folder(out_dir, "the tokenizer folder")
    with atomic_folder(out, "the tokenizer") as tmp:
        tokenizer.save_pretrained(str(tmp))
        # Portable class name: transformers v4 and v5 both map it to their generic fast tokenizer.
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        save_plain_backend(tokenizer, tmp)
    return out


def save_plain_backend(tokenizer: Any, folder: Path) -> None:
    """Rewrite FOLDER/tokenizer.json (after save_pretrained) without truncation and padding: a call with them
    leaves them set on the backend, save_pretrained writes them, and a raw `tokenizers.Tokenizer.from_file`
    user (or `twinlm tokenizer stats`) would then cut or pad every text."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None and (folder / "tokenizer.json").is_file():
        plain_backend(tokenizer).save(str(folder / "tokenizer.json"))


def plain_backend(tokenizer: PreTrainedTokenizerFast) -> Any:
    """A copy of the tokenizer's `tokenizers.Tokenizer` with no truncation and no padding set."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def train_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    files: Sequence[str | os.PathLike[str]] | None = None,
    *,
    vocab_size: int,
    out_dir: str | os.PathLike[str] | None = None,
    min_frequency: int = 2,
    lowercase: bool = True,
    model_max_length: int = 512,
    show_progress: bool = True,
    source: TextSource | None = None,
) -> PreTrainedTokenizerFast:
    """Train a `"wordpiece"` or `"bpe"` tokenizer and return it as a transformers fast tokenizer.

    Text comes from `texts` (any iterable of strings, consumed once), `files` (UTF-8 text files, streamed
    line by line) or `source` (a `TextSource`, e.g. a `datasets` dataset); with none of them, from the
    embedded default corpus. `lowercase` applies to WordPiece only (byte-level BPE is lossless). With
    `out_dir`, the tokenizer is saved there atomically. Bad input raises `TwinLMError`.
    """
    tokenizer, _ = _train_timed(
        kind,
        texts,
        files,
        source,
        vocab_size,
        out_dir,
        min_frequency,
        lowercase,
        model_max_length,
        show_progress,
    )
    return tokenizer


def _train_timed(
    kind: str,
    texts: Iterable[str] | None,
    files: Sequence[str | os.PathLike[str]] | None,
    source: TextSource | None,
    vocab_size: int,
    out_dir: str | os.PathLike[str] | None,
    min_frequency: int,
    lowercase: bool,
    model_max_length: int,
    show_progress: bool,
) -> tuple[PreTrainedTokenizerFast, float]:
    """`train_tokenizer`, also returning the seconds spent in the trainer (for the CLI summary)."""
    kind = _check_kind(kind)
    _check_vocab_size(kind, vocab_size)
    if min_frequency < 1:
        raise TwinLMError(f"min frequency {min_frequency} must be at least 1")
    if model_max_length < 1:
        raise TwinLMError(f"model max length {model_max_length} must be at least 1")
    given = [n for n, v in (("texts", texts), ("files", files), ("source", source)) if v is not None]
    if len(given) > 1:
        raise TwinLMError(f"give only one of texts, files, source (got {', '.join(given)})")
    length = None
    if texts is not None:
        batches: Iterable[list[str]] = _batched(texts, _BATCH)
    else:
        if files is not None:
            if not files:
                raise TwinLMError("no text files given: name at least one UTF-8 text file")
            source = TextSource.from_files(files)
        source = source or TextSource()
        info = source.validate_input(show_progress=show_progress)
        if info is not None:
            length = info.n_lines
        batches = source.iter_batches(_BATCH)

    seen = _TextCounter(batches)
    tok = new_tokenizer(kind, lowercase=lowercase)
    trainer = _trainer(kind, vocab_size, min_frequency, show_progress)
    start = time.perf_counter()
    tok.train_from_iterator(seen, trainer=trainer, length=length)
    seconds = time.perf_counter() - start
    if not seen.has_text:
        raise TwinLMError("the corpus is empty: the texts hold no non-whitespace characters")
    if tok.get_vocab_size() > vocab_size:
        raise TwinLMError(
            f"vocab size {vocab_size} is too small: the {len(_special_list(kind))} special tokens plus "
            f"the corpus alphabet already need {tok.get_vocab_size()}; use a larger --vocab-size"
        )
    tokenizer = _wrap(tok, kind, model_max_length)
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer, seconds


def bounded_pieces(text: str, limit: int = _PIECE) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, each cut just before a space, newline or tab where
    the window has one, so that the pre-tokenizers see the same words as in the whole text."""
    start = 0
    while len(text) - start > limit:
        stop = start + limit + 1
        cut = max(
            text.rfind(" ", start + 1, stop),
            text.rfind("\n", start + 1, stop),
            text.rfind("\t", start + 1, stop),
        )
        cut = cut if cut > start else start + limit
        yield text[start:cut]
        start = cut
    yield text[start:]


class _TextCounter:
    """Pass batches through to the trainer in bounded pieces (see `bounded_pieces`), noting whether any
    non-blank text went by."""

    def __init__(self, batches: Iterable[list[str]]) -> None:
        self.batches = batches
        self.has_text = False

    def __iter__(self) -> Iterator[list[str]]:
        for batch in self.batches:
            if not self.has_text:
                bad = next((type(t).__name__ for t in batch if not isinstance(t, str)), None)
                if bad is not None:
                    raise TwinLMError(f"texts must be strings, got {bad}")
                self.has_text = any(t.strip() for t in batch)
            if any(isinstance(t, str) and len(t) > _PIECE for t in batch):
                batch = [piece for t in batch for piece in bounded_pieces(t)]
            yield batch


def auto_tokenizer(source: str | os.PathLike[str], **kwargs: Any) -> PreTrainedTokenizerFast:
    """`AutoTokenizer.from_pretrained(source)`, with twinlm registered with transformers' Auto classes first.

    AutoTokenizer reads a folder's config.json before its tokenizer files. A twinlm checkpoint's config names
    model_type 'twinlm' and ships its code (auto_map): in a process where twinlm is not registered (`import twinlm`
    alone loads nothing), transformers asks whether to run that code (a 15-second prompt in a terminal, an error
    elsewhere), falls back to a blank config and warns 'You are using a model of type `twinlm` to instantiate a
    model of type ``'. Registered, the config is a known type and nothing is asked or warned. (Outside twinlm,
    `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` does the same, as the model card says.)"""
    from transformers import AutoTokenizer

    if (
        not Path(source).is_dir() or (Path(source) / "config.json").is_file()
    ):  # a tokenizer folder needs nothing
        import twinlm.model  # noqa: F401  (registers TwinLMConfig with AutoConfig)

    return AutoTokenizer.from_pretrained(str(source), **kwargs)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (as written by `train_tokenizer`, or a checkpoint folder) through
    `AutoTokenizer` (see auto_tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise TwinLMError(f"tokenizer directory not found: {path}")
    if not (path / "tokenizer.json").is_file():
        raise TwinLMError(f"{path} is not a tokenizer directory (no tokenizer.json): train one first")
    try:
        return auto_tokenizer(path)
    except Exception as err:  # corrupt JSON, unknown class, ...
        raise TwinLMError(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from None


def _tokenizer_type(tokenizer: Any) -> str:
    name = type(tokenizer.backend_tokenizer.model).__name__
    return {"WordPiece": "wordpiece", "BPE": "bpe"}.get(name, name.lower())


def tokenizer_stats(
    tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], name: str | None = None
) -> dict[str, Any]:
    """Measure a tokenizer on held-out text.

    Returns tokens per (whitespace) word, UTF-8 bytes per token, unknown-token rate (fraction of tokens
    that are the model's unknown token; 0 for byte-level BPE, which has none) and vocabulary use
    (fraction of the vocabulary seen), plus the raw counts. Special tokens are not added.
    """
    backend = plain_backend(tokenizer)  # no truncation or padding left on it by an earlier call
    unk = getattr(backend.model, "unk_token", None)
    unk_id = backend.token_to_id(unk) if unk else None
    n_texts = n_words = n_bytes = n_tokens = n_unk = 0
    used: set[int] = set()
    for batch in _batched(texts, _BATCH):
        n_texts += len(batch)
        n_words += sum(len(t.split()) for t in batch)
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        for encoding in backend.encode_batch(batch, add_special_tokens=False):
            ids = encoding.ids
            n_tokens += len(ids)
            used.update(ids)
            if unk_id is not None:
                n_unk += ids.count(unk_id)
    if n_tokens == 0:
        raise TwinLMError("the held-out text is empty: give files with text")
    vocab_size = len(tokenizer)
    return {
        "name": name or str(getattr(tokenizer, "name_or_path", "") or _tokenizer_type(tokenizer)),
        "type": _tokenizer_type(tokenizer),
        "vocab_size": vocab_size,
        "texts": n_texts,
        "words": n_words,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "tokens_per_word": n_tokens / max(n_words, 1),
        "bytes_per_token": n_bytes / n_tokens,
        "unk_rate": n_unk / n_tokens,
        "vocab_used": len(used),
        "vocab_use": len(used) / vocab_size,
    }


_ROWS = [
    ("type", "type", "{}"),
    ("vocab size", "vocab_size", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("words", "words", "{:,}"),
    ("tokens / word", "tokens_per_word", "{:.3f}"),
    ("bytes / token", "bytes_per_token", "{:.3f}"),
    ("unknown-token rate", "unk_rate", "{:.4%}"),
    ("vocabulary use", "vocab_use", "{:.1%}"),
]


def format_stats_table(stats: Sequence[dict[str, Any]]) -> str:
    """One column per tokenizer, one row per measure: the side-by-side comparison."""
    header = ["", *[s["name"] for s in stats]]
    rows = [header] + [[label, *[fmt.format(s[key]) for s in stats]] for label, key, fmt in _ROWS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Config file and command line
# ---------------------------------------------------------------------------------------------------


class TokenizerTrainConfig(Section):
    """A tokenizer training run as YAML (see configs/tokenizer/); command-line flags override it.

    `sources` takes the pretraining `data.sources` schema (a list of `twinlm.data.SourceConfig`; empty
    means the embedded default corpus) and `streaming` applies to Hub datasets and non-text files.
    """

    type: Literal["wordpiece", "bpe"]
    vocab_size: int
    min_frequency: int = 2
    lowercase: bool = True
    model_max_length: int = 512
    sources: list[SourceConfig] = Field(default_factory=list)
    streaming: bool = True
    out: Path | None = None

    @field_validator("sources", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def text_source(self) -> TextSource:
        """The configured sources, ready to read."""
        return TextSource(sources=self.sources, streaming=self.streaming)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TokenizerTrainConfig:
        """Read and validate a YAML config (with overrides); errors name the file and every bad key."""
        values = read_config_file(path, "tokenizer config", "configs/tokenizer/wordpiece.yaml")
        return validate(cls, apply_overrides(values, parse_overrides(overrides)), f"tokenizer config {path}")


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("datasets source (in place of FILES)")
    group.add_argument(
        "--dataset", help="Hub dataset name, or a local file/folder (.txt .jsonl .csv .parquet)"
    )
    group.add_argument("--dataset-config", help="dataset configuration name")
    group.add_argument("--split", default=None, help="dataset split (default: train)")
    group.add_argument(
        "--text-column",
        default=None,
        help="column holding the text in .csv/.tsv/.json/.parquet (default: text)",
    )
    group.add_argument("--no-streaming", action="store_true", help="download/load the dataset fully first")


def _source_from_args(args: argparse.Namespace, files: Sequence[str], base: TextSource | None) -> TextSource:
    if args.dataset and files:
        raise TwinLMError("give either FILES or --dataset, not both")
    if args.dataset:
        source = _dataset_source(
            args.dataset, args.dataset_config, args.split or "train", args.text_column or "text"
        )
        return TextSource(sources=[source], streaming=not args.no_streaming)
    if files:
        return TextSource.from_files(files, text_column=args.text_column or "text")
    return base or TextSource()


def _train_config(args: argparse.Namespace) -> TokenizerTrainConfig:
    """--config (if any), then `key=value` overrides, then flags, validated as one TokenizerTrainConfig."""
    values = (
        read_config_file(args.config, "tokenizer config", "configs/tokenizer/wordpiece.yaml")
        if args.config
        else {}
    )
    flags = ("type", "vocab_size", "min_frequency", "lowercase", "model_max_length", "out")
    pairs = parse_overrides(args.overrides) + [
        (k, getattr(args, k)) for k in flags if getattr(args, k) is not None
    ]
    values = apply_overrides(values, pairs)
    if values.get("type") is not None:  # aliases (byte-level-bpe, ...) and a message naming the types
        values["type"] = _check_kind(values["type"])
    if not args.config and set(values) <= set(TokenizerTrainConfig.model_fields):  # else: name unknown keys
        for key, flag in (("type", "--type"), ("vocab_size", "--vocab-size")):
            if values.get(key) is None:
                raise TwinLMError(f"{flag} is required (on the command line or in --config)")
    config = validate(TokenizerTrainConfig, values, f"tokenizer config {args.config or '(flags)'}")
    if config.out is None:
        raise TwinLMError("--out is required (on the command line or in --config)")
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    values = config.model_dump(exclude={"sources", "streaming"})
    source = _source_from_args(args, args.files, config.text_source)
    kind = _check_kind(values["type"])
    _check_vocab_size(kind, int(values["vocab_size"]))
    from twinlm.fileio import check_output_folder

    check_output_folder(values["out"], "--out")  # before training, not after
    print(
        f"training a {kind} tokenizer ({values['vocab_size']:,} tokens) on {source.describe()}",
    )
    start = time.perf_counter()
    tokenizer, train_seconds = _train_timed(
        kind,
        None,
        None,
        source,
        int(values["vocab_size"]),
        values["out"],
        int(values.get("min_frequency", 2)),
        bool(values.get("lowercase", True)),
        int(values.get("model_max_length", 512)),
        not args.quiet,
    )
    seconds = time.perf_counter() - start
    print(
        f"saved {kind} tokenizer with {len(tokenizer):,} tokens to {values['out']} "
        f"(trained in {train_seconds:.1f} s, {seconds:.1f} s in all)"
    )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    tokenizer_dirs = [p for p in args.paths if Path(p).is_dir()]
    files = [p for p in args.paths if not Path(p).is_dir()]
    if not tokenizer_dirs:
        raise TwinLMError(
            "no tokenizer directory given: `twinlm tokenizer stats TOKENIZER_DIR [DIR2] [FILES ...]`"
        )
    tokenizers = [(p, load_tokenizer(p)) for p in tokenizer_dirs]  # fail early on a bad directory
    source = _source_from_args(args, files, None)
    source.validate_input()
    names = [Path(p).name or str(p) for p in tokenizer_dirs]
    if len(set(names)) < len(names):  # a/tok and b/tok: show the paths as given
        names = [str(p) for p in tokenizer_dirs]
    results = []
    bar = tqdm(tokenizers, desc="measuring", disable=args.quiet or len(tokenizers) < 2)
    for name, (_, tokenizer) in zip(names, bar, strict=True):
        # the held-out text is streamed again for each tokenizer, so it never has to fit in memory
        held_out = (text for batch in source.iter_batches(_BATCH) for text in batch)
        results.append(tokenizer_stats(tokenizer, held_out, name=name))
    print(f"held-out text: {source.describe()}")
    print(format_stats_table(results))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `twinlm tokenizer train|stats` (called by twinlm.cli)."""
    parser = subparsers.add_parser(
        "tokenizer", help="train and measure WordPiece / byte-level BPE tokenizers"
    )
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a tokenizer and save it for AutoTokenizer")
    train.add_argument(
        "files", nargs="*", metavar="FILES", help="UTF-8 text files (default: embedded corpus)"
    )
    train.add_argument("--type", help="wordpiece (BERT-style) or bpe (byte-level, GPT-style)")
    train.add_argument("--vocab-size", type=int, help="vocabulary size including special tokens")
    train.add_argument("--out", type=Path, help="output directory (written atomically)")
    train.add_argument("--min-frequency", type=int, help="minimum pair/word frequency to merge (default 2)")
    case = train.add_mutually_exclusive_group()
    case.add_argument(
        "--lowercase",
        dest="lowercase",
        action="store_true",
        default=None,
        help="WordPiece: lowercase (default)",
    )
    case.add_argument("--no-lowercase", dest="lowercase", action="store_false", help="WordPiece: keep case")
    train.add_argument("--model-max-length", type=int, help="longest sequence the model takes (default 512)")
    train.add_argument("--config", type=Path, help="YAML file with these options (flags override it)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_source_args(train)
    # an `overrides` default: config keys as `key=value` / `--key value` too (see twinlm.cli.parse_args)
    train.set_defaults(func=_cmd_train, overrides=[])

    stats = sub.add_parser("stats", help="measure one tokenizer, or two side by side, on held-out text")
    stats.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="tokenizer directories, then held-out text files (default: embedded corpus)",
    )
    stats.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_source_args(stats)
    stats.set_defaults(func=_cmd_stats)
