"""The embedded default corpus and the text sources every command reads from."""

from __future__ import annotations

import collections
import hashlib
import json

import pytest
from pydantic import ValidationError

from twinlm.corpus import (
    TextSource,
    default_corpus,
    iter_dataset_texts,
    iter_file_batches,
    scan_text_files,
    write_default_corpus,
)
from twinlm.errors import TwinLMError


def _digest(documents: list[str]) -> str:
    return hashlib.sha256(json.dumps(documents).encode()).hexdigest()


def test_default_corpus_is_nontrivial_english() -> None:
    docs = default_corpus()
    text = "\n".join(docs)
    assert len(docs) > 300
    assert 1_000_000 < len(text.encode()) < 4_000_000
    words = text.lower().split()
    top = {w for w, _ in collections.Counter(words).most_common(20)}
    assert {"the", "a", "of", "to", "and", "is", "in"} <= top
    assert sum(c.isascii() for c in text) / len(text) > 0.99
    # cleaned: no doctest prompts, no reST roles, no empty documents
    assert not any(line.lstrip().startswith(">>>") for line in text.splitlines())
    assert ":func:`" not in text and ":class:`" not in text and text.count("``") < 10
    assert all(doc.strip() for doc in docs)


def test_default_corpus_is_deduplicated_and_a_fresh_copy() -> None:
    docs = default_corpus()
    paragraphs = [p.casefold() for doc in docs for p in doc.split("\n")]
    assert len(paragraphs) == len(set(paragraphs))
    docs.append("mutated")
    assert default_corpus()[-1] != "mutated"  # callers cannot corrupt the cache


def test_default_corpus_is_deterministic() -> None:
    from twinlm.corpus import _default_corpus

    # a second build from scratch (not the cache) gives the same documents in the same order
    assert _digest(list(_default_corpus.__wrapped__())) == _digest(default_corpus())


def test_write_default_corpus_one_document_per_line(tmp_path) -> None:
    path = write_default_corpus(tmp_path / "sub" / "default.txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # trailing newline
    assert lines[:-1] == [doc.replace("\n", " ") for doc in default_corpus()]
    assert not list(tmp_path.glob("sub/.*"))  # no temp file left


def test_text_source_shorthands(tmp_path) -> None:
    assert TextSource.model_validate("default").is_default
    assert TextSource().is_default
    assert TextSource.model_validate(["a.txt", "b.txt"]).files[1].name == "b.txt"
    ds = TextSource.model_validate({"dataset": "wikitext", "config": "raw", "text_column": "t"})
    assert not ds.is_default and ds.describe() == "dataset wikitext:raw:train"
    with pytest.raises(ValidationError):
        TextSource.model_validate({"files": ["a.txt"], "dataset": "x"})
    with pytest.raises(ValidationError):
        TextSource.model_validate({"filez": ["a.txt"]})
    batches = list(TextSource().iter_batches(100))
    assert sum(len(b) for b in batches) == len(default_corpus()) and max(len(b) for b in batches) == 100


def test_file_batches_stream_long_lines_in_pieces(tmp_path) -> None:
    path = tmp_path / "long.txt"
    line = "word " * 500_000  # one 2.5 MB line
    path.write_text(line + "\nsecond line\n", encoding="utf-8")
    pieces = [t for batch in iter_file_batches([path], batch_size=2) for t in batch]
    assert "".join(pieces) == line + "\nsecond line\n"
    assert max(len(p) for p in pieces) <= 1 << 20
    assert pieces[-1] == "second line\n"
    info = scan_text_files([path])
    assert info.n_lines == 2 and info.n_bytes == path.stat().st_size


def test_scan_rejects_bad_files(tmp_path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("some text\nno newline at end", encoding="utf-8")
    assert scan_text_files([good]).n_lines == 2
    with pytest.raises(TwinLMError, match="not found"):
        scan_text_files([tmp_path / "missing.txt"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(TwinLMError, match=r"not UTF-8.*offset 3"):
        scan_text_files([good, bad])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(TwinLMError, match="empty"):
        scan_text_files([empty])
    with pytest.raises(TwinLMError, match="not a regular file"):
        scan_text_files([tmp_path])


def test_iter_dataset_texts_local_files(tmp_path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    rows = [{"text": f"document number {i}", "id": i} for i in range(25)] + [{"text": "", "id": 99}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    batches = list(iter_dataset_texts(jsonl, batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]  # the empty text is skipped
    assert batches[0][3] == "document number 3"

    csv = tmp_path / "data.csv"
    csv.write_text("sentence,label\nfirst one,0\nsecond one,1\n", encoding="utf-8")
    assert list(iter_dataset_texts(csv, text_column="sentence", streaming=False)) == [
        ["first one", "second one"]
    ]
    with pytest.raises(TwinLMError, match="no column 'text'.*sentence"):
        list(iter_dataset_texts(csv))
    with pytest.raises(TwinLMError, match="not found"):
        list(iter_dataset_texts(tmp_path / "nope.jsonl"))
