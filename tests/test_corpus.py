"""The embedded default corpus (reading text sources is tested in test_data and test_tokenization)."""

from __future__ import annotations

import collections
import hashlib
import json

from twinlm.corpus import default_corpus, write_default_corpus


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
