"""Text sources for training tokenizers and models: the embedded default corpus, text files, datasets.

The default corpus is English text that every Python installation already carries, so that every
command works offline with no corpus given: the standard library's documentation topics
(`pydoc_data.topics`, the text behind `help("if")`) and the docstrings of the standard library's
own modules, read from source with `ast` (nothing is imported), cleaned and deduplicated.

One way to read text, used by every command: `TextSource(...).iter_batches()` yields lists of strings.
"""

from __future__ import annotations

import ast
import codecs
import functools
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from tqdm.auto import tqdm

from twinlm.errors import TwinLMError

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "TextFilesInfo",
    "TextSource",
    "batched_texts",
    "default_corpus",
    "iter_dataset_texts",
    "iter_file_batches",
    "scan_text_files",
    "write_default_corpus",
]

#: The name configs and the CLI use for the embedded corpus (`source: default`).
DEFAULT_CORPUS_NAME = "default"

# Parts of the standard library that are not English prose about Python (tests, vendored code,
# generated codec tables), or that are installed packages rather than the standard library.
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "lib2to3",
    "ensurepip",
    "turtledemo",
}
_ROLE = re.compile(r":[a-zA-Z0-9_:+-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``")  # ``x`` -> x
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_WORD = re.compile(r"[A-Za-z]+")
_MIN_WORDS = 6  # a paragraph shorter than this is a heading, a signature or a label, not prose


def _clean_paragraphs(text: str) -> list[str]:
    """Split a docstring/topic into prose paragraphs: drop doctests, reST markup and code-like lines."""
    paragraphs: list[str] = []
    lines: list[str] = []
    in_doctest = False

    def flush() -> None:
        if lines:
            paragraph = _LITERAL.sub(r"\1", _ROLE.sub(r"\1", " ".join(" ".join(lines).split())))
            letters = sum(len(w) for w in _WORD.findall(paragraph))
            non_space = len(paragraph) - paragraph.count(" ")
            # Prose is mostly letters; tables, code and option lists are not.
            if len(paragraph.split()) >= _MIN_WORDS and letters >= 0.7 * non_space:
                paragraphs.append(paragraph)
            lines.clear()

    for raw in text.splitlines():
        if _DOCTEST.match(raw):
            flush()
            in_doctest = True
            continue
        if not raw.strip():
            flush()
            in_doctest = False  # the output of a doctest ends at the first blank line
            continue
        if in_doctest:
            continue
        line = raw.strip()
        if set(line) <= set("=-~^*#+_:. "):  # reST underlines and rules
            flush()
            continue
        lines.append(line)
    flush()
    return paragraphs


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child)


def _stdlib_sources() -> list[Path]:
    """The standard library's `.py` files (no tests, no installed packages), sorted for determinism."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _raw_documents() -> Iterator[list[str]]:
    """The raw material: one document per pydoc topic, then one per standard-library module."""
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield _clean_paragraphs(pydoc_data.topics.topics[key])
    for path in _stdlib_sources():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # a file for another Python, or unreadable
            continue
        yield [p for doc in _docstrings(tree) for p in _clean_paragraphs(doc)]


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    seen: set[str] = set()
    documents: list[str] = []
    for paragraphs in _raw_documents():
        kept = []
        for paragraph in paragraphs:
            key = paragraph.casefold()
            if key not in seen:  # licences, "Return self.", shared boilerplate: once only
                seen.add(key)
                kept.append(paragraph)
        if kept:
            documents.append("\n".join(kept))
    return tuple(documents)


def default_corpus() -> list[str]:
    """The embedded English corpus (about 2 MB) as a deterministic list of documents.

    A document is one documentation topic or one standard-library module's docstrings; its paragraphs
    are separated by single newlines. The text depends only on the Python installation (version), needs
    no network, and is computed once per process (a few seconds) then cached.
    """
    return list(_default_corpus())


def write_default_corpus(path: str | os.PathLike[str]) -> Path:
    """Write the default corpus to `path` as UTF-8 text, one document per line.

    A document's own line breaks (between its paragraphs) become spaces, so any line-based reader
    gets one document per line back. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for document in _default_corpus():
            f.write(document.replace("\n", " ") + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------------

_CHUNK = 1 << 20  # bytes read at a time, and the longest piece of one line handed on at once


@dataclass(frozen=True)
class TextFilesInfo:
    """What a validating pass over text files found."""

    files: tuple[Path, ...]
    n_bytes: int
    n_lines: int


def scan_text_files(files: Sequence[str | os.PathLike[str]], show_progress: bool = False) -> TextFilesInfo:
    """Check that every file exists, is UTF-8 and that together they hold some text; count lines.

    Streams the files in chunks (constant memory), so it is cheap next to training and turns bad input
    into a one-line `TwinLMError` before anything is trained or written.
    """
    if not files:
        raise TwinLMError("no text files given: name at least one UTF-8 text file")
    paths = tuple(Path(f) for f in files)
    for path in paths:
        if not path.exists():
            raise TwinLMError(f"text file not found: {path}")
        if not path.is_file():
            raise TwinLMError(f"not a regular file: {path} (give text files, not directories)")
    total = sum(p.stat().st_size for p in paths)
    n_lines = 0
    has_text = False
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking text", disable=not show_progress) as bar:
        for path in paths:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            offset = 0
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    try:
                        text = decoder.decode(chunk)
                    except UnicodeDecodeError as err:
                        raise TwinLMError(
                            f"{path} is not UTF-8 text (invalid byte at offset {offset + err.start}): "
                            "convert it to UTF-8 first"
                        ) from None
                    n_lines += chunk.count(b"\n")
                    has_text = has_text or bool(text.strip())
                    offset += len(chunk)
                    bar.update(len(chunk))
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise TwinLMError(f"{path} is not UTF-8 text (truncated character at the end)") from None
                if offset and not _ends_with_newline(path):
                    n_lines += 1
    if not has_text:
        raise TwinLMError(f"the corpus is empty: {', '.join(map(str, paths))} hold no text")
    return TextFilesInfo(files=paths, n_bytes=total, n_lines=n_lines)


def _ends_with_newline(path: Path) -> bool:
    """Whether a non-empty file ends with a newline (its last line was counted by the newline count)."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def iter_file_batches(files: Sequence[str | os.PathLike[str]], batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield the lines of UTF-8 text files in lists of `batch_size`, streaming (constant memory).

    Lines keep their newline. A line longer than 1 MiB is handed on in 1 MiB pieces, so even a file
    that is one enormous line never has to fit in memory.
    """
    batch: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="strict", newline="") as f:
            while piece := f.readline(_CHUNK):
                batch.append(piece)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def batched_texts(texts: Iterable[str], batch_size: int = 1000) -> Iterator[list[str]]:
    """Group an iterable of strings into lists of `batch_size` (the last may be shorter)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------

_LOCAL_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


def _local_dataset_args(path: Path) -> tuple[str, dict[str, Any]]:
    """The `datasets` builder and its arguments for a local file or folder of files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    suffixes = {p.suffix.lower() for p in files if p.suffix.lower() in _LOCAL_BUILDERS}
    builders = {_LOCAL_BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise TwinLMError(
            f"cannot tell the format of {path}: expected files ending in one of "
            f"{', '.join(sorted(_LOCAL_BUILDERS))} (found {sorted(suffixes) or 'none'})"
        )
    builder = builders.pop()
    data_files = [str(p) for p in files if p.suffix.lower() in suffixes]
    kwargs: dict[str, Any] = {"data_files": data_files}
    if ".tsv" in suffixes:
        kwargs["sep"] = "\t"
    return builder, kwargs


def iter_dataset_texts(
    name_or_path: str | os.PathLike[str],
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    batch_size: int = 1000,
) -> Iterator[list[str]]:
    """Yield batches of strings from a `datasets` source: a Hub dataset name or local files.

    Local files (a file or a folder of `.txt`, `.json(l)`, `.csv`/`.tsv` or `.parquet` files) go through
    the matching `datasets` builder; with `streaming=True` (default) nothing is loaded into memory.
    Empty and missing values in the text column are skipped.
    """
    import datasets

    path = Path(name_or_path)
    if path.exists():
        builder, kwargs = _local_dataset_args(path)
        load_args: tuple[Any, ...] = (builder,)
    elif str(name_or_path).startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_BUILDERS:
        raise TwinLMError(f"dataset path not found: {name_or_path}")
    else:
        load_args, kwargs = (str(name_or_path), config), {}
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(*load_args, split=split, streaming=streaming, **kwargs)
    except TwinLMError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, connection)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TwinLMError(f"cannot load dataset {name_or_path!s} (split {split!r}): {message}") from None
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise TwinLMError(
            f"dataset {name_or_path!s} has no column {text_column!r}: choose one of {', '.join(columns)}"
        )
    try:
        for batch in dataset.iter(batch_size=batch_size):
            if text_column not in batch:
                raise TwinLMError(f"dataset {name_or_path!s} has no column {text_column!r}")
            texts = [t for t in batch[text_column] if isinstance(t, str) and t]
            if texts:
                yield texts
    except (UnicodeDecodeError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TwinLMError(f"cannot read dataset {name_or_path!s}: {message}") from None


# ---------------------------------------------------------------------------------------------------
# One description of "where the text comes from", for configs and the CLI
# ---------------------------------------------------------------------------------------------------


class TextSource(BaseModel):
    """Where text comes from: the default corpus, text files, or a `datasets` source.

    In YAML: `source: default`, `source: [a.txt, b.txt]`, `source: {files: [a.txt]}` or
    `source: {dataset: wikitext, config: wikitext-103-raw-v1, split: train, text_column: text}`.
    With neither files nor a dataset it is the embedded default corpus.
    """

    model_config = ConfigDict(extra="forbid")

    files: list[Path] = []
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_shorthand(cls, value: Any) -> Any:
        if value is None or value == DEFAULT_CORPUS_NAME:
            return {}
        if isinstance(value, (str, os.PathLike)):
            return {"files": [value]}
        if isinstance(value, (list, tuple)):
            return {"files": list(value)}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> TextSource:
        if self.files and self.dataset:
            raise ValueError("give either files or a dataset, not both")
        return self

    @property
    def is_default(self) -> bool:
        """True when this source is the embedded default corpus."""
        return not self.files and not self.dataset

    def describe(self) -> str:
        """A short human-readable name for summaries."""
        if self.dataset:
            parts = [self.dataset, self.config, self.split]
            return "dataset " + ":".join(p for p in parts if p)
        if self.files:
            return f"{len(self.files)} file(s)" if len(self.files) > 3 else ", ".join(map(str, self.files))
        return "the embedded default corpus"

    def validate_input(self, show_progress: bool = False) -> TextFilesInfo | None:
        """Check files up front (existence, UTF-8, not empty); returns what the scan found, if files."""
        return scan_text_files(self.files, show_progress=show_progress) if self.files else None

    def iter_batches(self, batch_size: int = 1000) -> Iterator[list[str]]:
        """Yield the text of this source in lists of strings."""
        if self.dataset:
            yield from iter_dataset_texts(
                self.dataset, self.config, self.split, self.text_column, self.streaming, batch_size
            )
        elif self.files:
            yield from iter_file_batches(self.files, batch_size)
        else:
            yield from batched_texts(_default_corpus(), batch_size)


if __name__ == "__main__":  # python -m twinlm.corpus OUT.txt: write the default corpus
    out = write_default_corpus(sys.argv[1] if len(sys.argv) > 1 else "default_corpus.txt")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(default_corpus())} documents)")
