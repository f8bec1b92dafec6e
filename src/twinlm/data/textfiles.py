"""Check that files are UTF-8 text before anything reads them: one line naming the file and the byte.

Binary files (a NUL byte) and other encodings (Latin-1, UTF-16, ...) are rejected up front with the file,
the byte offset and what to do, instead of a traceback (or a tokenizer trainer that never finishes)
later. Light on purpose: no datasets, no torch.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from twinlm.errors import TwinLMError

__all__ = ["TextFilesInfo", "check_text_files", "read_text"]

_CHUNK = 1 << 20  # bytes read at a time
CONVERT_HINT = "convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)"


@dataclass(frozen=True)
class TextFilesInfo:
    """What `check_text_files` found."""

    files: tuple[Path, ...]
    n_bytes: int
    n_lines: int
    has_text: bool  # whether any non-whitespace character was seen


def _not_text(path: Path, offset: int, prefix: str) -> TwinLMError:
    return TwinLMError(
        f"{prefix}{path} is a binary file, not text (NUL byte at offset {offset}): give UTF-8 text files"
    )


def _not_utf8(path: Path, offset: int, prefix: str) -> TwinLMError:
    return TwinLMError(f"{prefix}{path} is not UTF-8 text (invalid byte at offset {offset}): {CONVERT_HINT}")


def _check_file(path: Path, prefix: str, bar: tqdm) -> tuple[int, bool]:
    """(lines, has text) of one file; raises on a NUL byte or bytes that are not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, n_lines, has_text, last = 0, 0, False, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise _not_text(path, offset + nul, prefix)
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start, prefix) from None
            n_lines += chunk.count(b"\n")
            offset += len(chunk)
            last = chunk[-1:]
            bar.update(len(chunk))
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise TwinLMError(
            f"{prefix}{path} is not UTF-8 text (truncated character at the end): {CONVERT_HINT}"
        ) from None
    return n_lines + (last != b"\n"), has_text  # a last line without its newline counts


def check_text_files(
    files: Sequence[str | os.PathLike[str]], show_progress: bool = False, where: str | None = None
) -> TextFilesInfo:
    """Check that plain-text files exist, hold no NUL byte and are UTF-8; count their bytes and lines.

    Streams each file in 1 MiB chunks (constant memory), so bad input becomes a one-line `TwinLMError`
    naming the file (prefixed by `where`) before anything is loaded, trained or written.
    """
    prefix = f"{where}: " if where else ""
    paths = tuple(Path(f) for f in files)
    for path in paths:
        if not path.exists():
            raise TwinLMError(f"{prefix}text file not found: {path}")
        if not path.is_file():
            raise TwinLMError(f"{prefix}not a regular file: {path} (give text files, not directories)")
    total = sum(p.stat().st_size for p in paths)
    n_lines, has_text = 0, False
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking text", disable=not show_progress) as bar:
        for path in paths:
            lines, text = _check_file(path, prefix, bar)
            n_lines += lines
            has_text = has_text or text
    return TextFilesInfo(files=paths, n_bytes=total, n_lines=n_lines, has_text=has_text)


def read_text(path: str | os.PathLike[str], what: str | None = None) -> str:
    """The whole of a small UTF-8 text file (a config, a task file), or a one-line TwinLMError that names
    the file and the offending byte when it is binary or in another encoding."""
    path = Path(path)
    prefix = f"{what} " if what else ""
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise _not_text(path, nul, prefix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start, prefix) from None
