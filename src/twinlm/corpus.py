"""The embedded default corpus: the text every command trains on when given none.

The default corpus is English text that every Python installation already carries, so that every
command works offline with no corpus given: the standard library's documentation topics
(`pydoc_data.topics`, the text behind `help("if")`) and the docstrings of the standard library's
own modules, read from source with `ast` (nothing is imported), cleaned and deduplicated.

Reading text from files and `datasets` sources (this corpus included) is `twinlm.data.load_texts`.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

__all__ = ["default_corpus", "write_default_corpus"]


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


if __name__ == "__main__":  # python -m twinlm.corpus OUT.txt: write the default corpus
    out = write_default_corpus(sys.argv[1] if len(sys.argv) > 1 else "default_corpus.txt")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(default_corpus())} documents)")
