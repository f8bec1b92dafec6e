"""Pretraining data: sources, config errors, packing layout, validation split, collators."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, IterableDataset

import twinlm.corpus
import twinlm.data.packing
from twinlm.data import (
    CausalLMCollator,
    DataConfig,
    MaskedLMCollator,
    SourceConfig,
    build_pretraining_datasets,
    load_texts,
    pack_token_ids,
    parse_data_config,
)
from twinlm.data.sources import check_text_files
from twinlm.errors import TwinLMError
from twinlm.tokenization import train_tokenizer

_WORDS = (
    "the a of and to in whale ship captain sea harbour letter sister marriage fortune house "
    "unbelievable extraordinarily misunderstanding parliamentary constitutional government "
    "people nation congress treasury gentleman lady morning evening"
).split()


def _make_docs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct documents of varied length (each starts with its own number)."""
    rng = random.Random(seed)
    return [f"doc {i} " + " ".join(rng.choices(_WORDS, k=rng.randint(3, 40))) + "." for i in range(n)]


DOCS = _make_docs(200)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", texts=DOCS * 3, vocab_size=120, show_progress=False)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", texts=DOCS * 3, vocab_size=300, show_progress=False)


@pytest.fixture
def paragraphs_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


def _cfg(tmp_path, sources, **kw) -> DataConfig:
    kw.setdefault("num_proc", 1)
    return DataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)


def _blocks(cfg: DataConfig, tok, causal: bool):
    """(train, validation) packed blocks."""
    data = build_pretraining_datasets(cfg, tok, causal=causal)
    return data.train, data.validation


def _split_stream(ids: list[int], sep: int) -> list[tuple[int, ...]]:
    """Cut a token stream after each `sep`; the trailing partial document is dropped."""
    docs, cur = [], []
    for t in ids:
        cur.append(t)
        if t == sep:
            docs.append(tuple(cur))
            cur = []
    return docs


# --- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"seq_len": 64, "sourcez": []}, "unknown key 'sourcez' (did you mean 'sources'?)"),
        ({"seq_len": "long"}, "seq_len"),
        ({"seq_len": 1}, "seq_len"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"text_document_split": "sentence"}, "text_document_split"),
        ({"sources": [{"pth": "a.txt"}]}, "unknown key 'sources.0.pth' (did you mean 'sources.0.path'?)"),
        ({"sources": [{"text_column": "body"}]}, "exactly one of path, hub or default"),
        ({"sources": [{"path": "a.txt", "hub": "x/y"}]}, "got path and hub"),
        ({"sources": [{"hub": "x/y", "type": "csv"}]}, "type applies only"),
        ({"sources": [{"path": "a.txt", "type": "xml"}]}, "sources.0.type"),
        ({"sources": [{"path": "a", "weight": 2}, "b"]}, "give every source a weight or none (sources.1 has"),
        ({"sources": [{"path": "a", "weight": 0}]}, "the source weights add up to 0"),
        ({"sources": [{"path": "a", "weight": -1}]}, "sources.0.weight"),
        ({"sources": [{"path": "a", "weight": 1}], "streaming": True}, "set streaming: false"),
    ],
)
def test_bad_configs_name_the_key(raw, fragment):
    with pytest.raises(TwinLMError, match="invalid data config") as info:
        parse_data_config(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_config_defaults_and_shorthand():
    cfg = parse_data_config({"sources": ["corpus/*.txt", {"hub": "wikitext", "config": "wikitext-2-raw-v1"}]})
    assert cfg.sources[0].path == "corpus/*.txt"
    assert cfg.sources[1].split == "train" and cfg.sources[1].text_column == "text"
    assert (cfg.seq_len, cfg.mlm_probability, cfg.text_document_split) == (128, 0.15, "paragraph")
    assert 1 <= cfg.resolved_num_proc() <= 4
    assert parse_data_config(None).sources == []
    assert SourceConfig.model_validate("x.txt").describe() == "path='x.txt'"
    assert SourceConfig(default=True).describe() == "default corpus"


@pytest.mark.parametrize(
    "make_source, fragment",
    [
        (lambda d: str(d / "missing.txt"), "no such file or directory"),
        (lambda d: str(d / "nothing-*.txt"), "the glob matches no files"),
        (lambda d: str(d / "emptydir"), "the directory holds no files"),
        (lambda d: str(d / "notes.xyz"), "cannot tell the type"),
        (lambda d: str(d / "blank.txt"), "no text in"),
        (lambda d: str(d / "empty.txt"), "no text in"),
        (lambda d: {"path": str(d / "rows.jsonl"), "text_column": "body"}, "no column 'body'"),
        (lambda d: {"path": str(d / "rows.jsonl"), "text_column": "n"}, "not text"),
    ],
)
def test_bad_sources_raise_naming_the_source(tmp_path, make_source, fragment):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notes.xyz").write_text("hello there\n")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "rows.jsonl").write_text('{"text": "hello", "n": 1}\n')
    cfg = _cfg(tmp_path, [make_source(tmp_path)])
    with pytest.raises(TwinLMError, match="data source 0") as info:
        load_texts(cfg)
    assert fragment in str(info.value)


def test_too_few_documents_for_validation_and_blocks(tmp_path, wordpiece, paragraphs_file):
    with pytest.raises(TwinLMError, match="too few to hold out"):
        build_pretraining_datasets(
            _cfg(tmp_path, [str(paragraphs_file)], validation_size=200), wordpiece, causal=False
        )
    with pytest.raises(TwinLMError, match="fewer than seq_len"):
        build_pretraining_datasets(
            _cfg(tmp_path, [str(paragraphs_file)], seq_len=100_000), wordpiece, causal=False
        )


def test_causal_packing_with_wordpiece_ends_documents_with_sep(tmp_path, wordpiece, paragraphs_file):
    # WordPiece has no eos: a causal model trained on it (the WordPiece-vs-BPE question) ends documents with [SEP]
    train, _ = _blocks(_cfg(tmp_path, [str(paragraphs_file)], seq_len=32), wordpiece, causal=True)
    ids = np.array(train["input_ids"]).reshape(-1)
    assert (ids == wordpiece.sep_token_id).sum() > 10 and not (ids == wordpiece.cls_token_id).any()


def test_tokenizer_without_separator_is_rejected(tmp_path, bpe, paragraphs_file):
    with pytest.raises(TwinLMError, match="cls_token/sep_token"):
        build_pretraining_datasets(_cfg(tmp_path, [str(paragraphs_file)]), bpe, causal=False)
    with pytest.raises(TwinLMError, match="no mask_token"):
        MaskedLMCollator(bpe)


# --- sources --------------------------------------------------------------------------------------


def test_local_formats_globs_and_document_split(tmp_path):
    rows = [{"body": d, "n": i} for i, d in enumerate(DOCS[:30])]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n")
    (tmp_path / "b.csv").write_text("n,body\n" + "".join(f'{r["n"]},"{r["body"]}"\n' for r in rows[10:20]))
    pq.write_table(pa.table({"body": [r["body"] for r in rows[20:30]]}), tmp_path / "c.parquet")
    (tmp_path / "d.tsv").write_text("body\tn\n" + "".join(f"{r['body']}\t{r['n']}\n" for r in rows[:3]))
    cfg = _cfg(
        tmp_path,
        [
            {"path": str(tmp_path / "*.jsonl"), "text_column": "body"},
            {"path": str(tmp_path / "b.csv"), "text_column": "body"},
            {"path": str(tmp_path / "c.parquet"), "text_column": "body"},
            {"path": str(tmp_path / "d.tsv"), "text_column": "body"},
        ],
    )
    texts = load_texts(cfg)
    assert isinstance(texts, Dataset) and texts.column_names == ["text"]
    assert texts["text"] == DOCS[:30] + DOCS[:3]

    # Plain text: the three ways a file becomes documents.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.txt").write_text("one line\nsecond line\n\nnew paragraph\n\n\n")
    (tmp_path / "t" / "y.md").write_text("only line\n")
    counts = {}
    for split in ("line", "paragraph", "file"):
        ds = load_texts(_cfg(tmp_path, [str(tmp_path / "t")], text_document_split=split))
        counts[split] = len(ds)
        assert all(t.strip() for t in ds["text"])
    assert counts == {"line": 4, "paragraph": 3, "file": 2}


def test_check_text_files_counts_and_rejects_bad_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\nno newline at end", encoding="utf-8")
    info = check_text_files([good])
    assert (info.n_lines, info.n_bytes, info.has_text) == (2, good.stat().st_size, True)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n", encoding="utf-8")
    assert check_text_files([empty]).has_text is False and check_text_files([empty]).n_lines == 2
    with pytest.raises(TwinLMError, match="not found"):
        check_text_files([tmp_path / "missing.txt"])
    with pytest.raises(TwinLMError, match="not a regular file"):
        check_text_files([tmp_path])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(TwinLMError, match=r"latin1.txt is not UTF-8.*offset 3"):
        check_text_files([good, bad])
    cut = tmp_path / "cut.txt"
    cut.write_bytes("caf\u00e9".encode()[:-1])
    with pytest.raises(TwinLMError, match="truncated character"):
        check_text_files([cut])
    # pretraining gets the same one-line error naming the file, streaming or not, before any loading
    for streaming in (False, True):
        with pytest.raises(TwinLMError, match=r"data source 1 \(path=.*latin1.txt is not UTF-8"):
            load_texts(_cfg(tmp_path, [str(good), str(tmp_path / "latin*.txt")], streaming=streaming))


def test_streaming_loads_the_same_documents(tmp_path, paragraphs_file):
    cfg = _cfg(tmp_path, [str(paragraphs_file), str(paragraphs_file)], streaming=True)
    texts = load_texts(cfg)
    assert isinstance(texts, IterableDataset)
    assert [r["text"] for r in texts] == DOCS + DOCS


def test_default_corpus_when_no_source(tmp_path, monkeypatch):
    # The real embedded corpus takes ~10 s to build; the data path only needs its list of documents.
    monkeypatch.setattr(twinlm.corpus, "default_corpus", lambda: ["first document", "", "second one"])
    assert load_texts(_cfg(tmp_path, []))["text"] == ["first document", "second one"]
    streamed = load_texts(_cfg(tmp_path, [{"default": True}], streaming=True))
    assert [r["text"] for r in streamed] == ["first document", "second one"]


# --- packing --------------------------------------------------------------------------------------


def test_pack_token_ids_layout_and_vocab_check():
    out = pack_token_ids([[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], seq_len=4)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # tail [9, 10] dropped
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]  # restart per doc and block
    out = pack_token_ids([[1, 2], [3, 4, 5, 6, 7, 8, 9]], seq_len=3)
    assert out["position_ids"].tolist() == [[0, 1, 0], [0, 1, 2], [0, 1, 2]]
    with pytest.raises(TwinLMError, match="outside its vocabulary"):
        pack_token_ids([[1, 2, 99]], seq_len=3, vocab_size=50)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_blocks(tmp_path, paragraphs_file, wordpiece, bpe, causal):
    tok = bpe if causal else wordpiece
    cfg = _cfg(tmp_path, [str(paragraphs_file)], seq_len=32, validation_fraction=0.1)
    train, val = _blocks(cfg, tok, causal=causal)
    sep = tok.eos_token_id if causal else tok.sep_token_id
    prefix = [] if causal else [tok.cls_token_id]
    encoded = {
        tuple(prefix + tok(d, add_special_tokens=False)["input_ids"] + [sep]): i for i, d in enumerate(DOCS)
    }
    seen: dict[str, set[int]] = {}
    for name, ds in (("train", train), ("validation", val)):
        ids, pos = np.array(ds["input_ids"]), np.array(ds["position_ids"])
        assert ids.ndim == 2 and ids.shape[1] == 32 and len(ds) > 0
        # Positions restart exactly at block starts and document starts, and count up otherwise.
        flat_ids, flat_pos = ids.reshape(-1), pos.reshape(-1)
        if causal:
            doc_start = np.r_[True, flat_ids[:-1] == sep]
        else:
            doc_start = flat_ids == tok.cls_token_id
        block_start = np.arange(flat_ids.size) % 32 == 0
        assert np.array_equal(flat_pos == 0, doc_start | block_start)
        steps = np.diff(flat_pos)[~(doc_start | block_start)[1:]]
        assert (steps == 1).all()
        # The blocks are the separated documents, back to back, in corpus order; only a tail is cut.
        docs = _split_stream(flat_ids.tolist(), sep)
        assert all(d in encoded for d in docs)
        order = [encoded[d] for d in docs]
        assert order == sorted(order)
        seen[name] = set(order)
        assert flat_ids.size - sum(map(len, docs)) < max(map(len, encoded)) + 32
    assert not seen["train"] & seen["validation"]
    assert len(seen["validation"]) >= 15  # 10% of 200 documents, minus at most a cut tail
    assert len(seen["train"] | seen["validation"]) >= 190


def test_builds_are_deterministic_and_cached(tmp_path, paragraphs_file, wordpiece):
    def build(cache, seed=0):
        cfg = DataConfig(
            sources=[str(paragraphs_file)], seq_len=16, cache_dir=str(tmp_path / cache), num_proc=1, seed=seed
        )
        return _blocks(cfg, wordpiece, causal=False)

    (t1, v1), (t2, v2), (t3, v3) = build("c1"), build("c2"), build("c1")
    assert t1[:] == t2[:] and v1[:] == v2[:]
    assert v3[:] == v1[:]
    assert t1.cache_files == t3.cache_files and "c1" in t1.cache_files[0]["filename"]
    _, v_other = build("c1", seed=1)
    assert v_other[:] != v1[:]  # another seed holds out other documents


def test_multiprocess_tokenising_gives_the_same_blocks(tmp_path, paragraphs_file, wordpiece, monkeypatch):
    monkeypatch.setattr(twinlm.data.packing, "_DOCS_PER_PROC", 50)
    one = _cfg(tmp_path, [str(paragraphs_file)], seq_len=16, num_proc=1, validation_size=0)
    two = one.model_copy(update={"num_proc": 2, "cache_dir": str(tmp_path / "cache2")})
    t1, v1 = _blocks(one, wordpiece, causal=False)
    t2, _ = _blocks(two, wordpiece, causal=False)
    assert v1 is None
    assert t1[:] == t2[:]


def test_streaming_blocks_match_map_style(tmp_path, paragraphs_file, bpe):
    base = _cfg(tmp_path, [str(paragraphs_file)], seq_len=24, validation_size=0)
    mapped, _ = _blocks(base, bpe, causal=True)
    streamed, none = _blocks(base.model_copy(update={"streaming": True}), bpe, causal=True)
    assert isinstance(streamed, IterableDataset) and none is None
    rows = [{k: v.tolist() for k, v in r.items()} for r in streamed]
    assert len(rows) == len(mapped) > 10 and rows == [mapped[i] for i in range(len(mapped))]
    # Streaming holds out the first validation_size documents of the stream.
    cfg = base.model_copy(update={"streaming": True, "validation_size": 20})
    streamed, val = _blocks(cfg, bpe, causal=True)
    first = bpe(DOCS[0], add_special_tokens=False)["input_ids"]
    assert val[0]["input_ids"][: len(first[:24])] == first[:24]
    assert next(iter(streamed))["input_ids"][:5].tolist() == bpe(DOCS[20])["input_ids"][:5]


def test_real_corpus_slice(tmp_path, shared_data, bpe):
    corpus = shared_data / "corpus"
    austen = (corpus / "austen_6_novels.txt").read_text(encoding="utf-8").splitlines()[:300]
    with open(corpus / "sotu_1790_2021.txt", encoding="utf-8") as f:
        speech = f.readline()[:20_000]  # one address per very long line
    (tmp_path / "austen.txt").write_text("\n".join(austen) + "\n")
    (tmp_path / "sotu.txt").write_text(speech + "\n")
    cfg = _cfg(
        tmp_path, [str(tmp_path / "austen.txt"), str(tmp_path / "sotu.txt")], seq_len=64, validation_size=2
    )
    docs = load_texts(cfg)
    assert docs["text"][-1] == speech.strip("\n") and len(docs) > 10
    train, val = _blocks(cfg, bpe, causal=True)
    pos = np.array(train["position_ids"])
    assert pos.shape[1] == 64 and len(val) >= 1
    # The long speech spans many blocks, each restarting at 0 and running to 63 without a separator.
    assert (pos[:, -1] == 63).sum() > 20_000 // 4 // 64 // 2


def test_max_documents_reads_the_first_documents_of_a_source(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[30:60]))
    source = {"path": str(folder), "max_documents": 45}
    assert load_texts(_cfg(tmp_path, [source]))["text"] == DOCS[:45]  # across the source's two files
    streamed = load_texts(_cfg(tmp_path, [source], streaming=True))
    assert [row["text"] for row in streamed] == DOCS[:45]
    assert SourceConfig.model_validate(source).describe().endswith("first 45 documents")


# --- source mixing ---------------------------------------------------------------------------------


def test_mixture_sampler_draws_each_epoch_by_weight_reproducibly():
    from twinlm.data import MixtureSampler, blocks_per_source

    sizes, weights = [100, 30, 10], [0.5, 0.3, 0.2]
    sampler = MixtureSampler(sizes, weights, seed=3)
    epochs = [sampler.epoch_indices(e) for e in range(3)]
    for indices in epochs:  # exact shares of the blocks (= of the tokens), every epoch
        assert len(indices) == 140 and blocks_per_source(indices, sizes) == [70, 42, 28]
    assert np.array_equal(epochs[0], MixtureSampler(sizes, weights, seed=3).epoch_indices(0))
    assert not np.array_equal(epochs[0], MixtureSampler(sizes, weights, seed=4).epoch_indices(0))
    # a source drawn below its size shows every block before any repeats (epoch 0 then 1) ...
    first = [i for e in epochs[:2] for i in e.tolist() if i < 100]
    assert set(first) == set(range(100)) and max(np.bincount(first)) == 2
    # ... one drawn above it repeats every block as evenly as possible (28 draws of 10 blocks)
    assert sorted(set(np.bincount(epochs[0][epochs[0] >= 130] - 130).tolist())) == [2, 3]
    # two processes deal the epoch between them, nothing twice
    ranks = [MixtureSampler(sizes, weights, seed=3, rank=r, world=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    dealt = [list(r) for r in ranks]
    assert len(dealt[0]) == len(dealt[1]) == len(ranks[0]) == 70
    assert sorted(dealt[0] + dealt[1]) == sorted(epochs[1].tolist())


def test_a_weighted_source_without_a_block_is_an_error(tmp_path, wordpiece, paragraphs_file):
    (tmp_path / "short.txt").write_text("a few words\n")
    sources = [
        {"path": str(paragraphs_file), "weight": 1},
        {"path": str(tmp_path / "short.txt"), "weight": 1},
    ]
    with pytest.raises(TwinLMError, match=r"data source 1 \(path=.*short.txt'\) has weight 1.0"):
        build_pretraining_datasets(
            _cfg(tmp_path, sources, seq_len=32, validation_size=0), wordpiece, causal=False
        )
    data = build_pretraining_datasets(
        _cfg(tmp_path, [*sources[:1], {**sources[1], "weight": 0}], seq_len=32, validation_size=0),
        wordpiece,
        causal=False,
    )
    assert [s.weight for s in data.sources] == [1.0, 0.0] and data.source_sizes()[1] == 0


# --- the tokenised-data cache ---------------------------------------------------------------------


def _write_parquet(path, docs):
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, path, compression="zstd")


def test_parquet_sources_are_tokenised_once_and_reused(tmp_path, wordpiece, monkeypatch):
    """Each source is tokenised into the cache once; the next run neither reads its text nor tokenises it,
    whatever the files' paths and times, until their bytes, the reading settings or the tokenizer change."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_parquet(corpus / "a.parquet", DOCS[:120])
    _write_parquet(corpus / "b.parquet", DOCS[120:])
    calls = []
    tokenize = twinlm.data.packing.tokenize_documents

    def counting(ds, *args, **kwargs):
        calls.append(len(ds))
        return tokenize(ds, *args, **kwargs)

    monkeypatch.setattr(twinlm.data.packing, "tokenize_documents", counting)

    def build(folder=corpus, tok=wordpiece, **kw):
        calls.clear()
        cfg = _cfg(tmp_path, [str(folder / "a.parquet"), str(folder / "b.parquet")], **{"seq_len": 16, **kw})
        return build_pretraining_datasets(cfg, tok, causal=False)

    first = build()
    assert calls == [120, 80] and len(list((tmp_path / "cache").glob("twinlm-tokens-*.json"))) == 2
    assert sum(s.documents for s in first.sources) == 198  # 1% held out over both sources together

    load_source = twinlm.data.packing.load_source
    monkeypatch.setattr(twinlm.data.packing, "load_source", lambda *a: pytest.fail("read a cached source"))
    again = build()
    assert calls == [] and again.train[:] == first.train[:] and again.validation[:] == first.validation[:]
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)  # other paths, other times, the same bytes
    os.utime(copy / "a.parquet", (1, 1))
    assert build(copy).train[:] == first.train[:] and calls == []
    assert build(seq_len=24).train[0]["input_ids"].__len__() == 24 and calls == []  # only repacked
    monkeypatch.setattr(twinlm.data.packing, "load_source", load_source)

    _write_parquet(copy / "b.parquet", DOCS[120:] + ["one more document at the end"])
    build(copy)
    assert calls == [81]  # only the changed source
    other = train_tokenizer("wordpiece", texts=DOCS * 2, vocab_size=150, show_progress=False)
    build(tok=other)
    assert calls == [120, 80]

    # A damaged entry (a truncated Arrow file) is not trusted: that source is tokenised again.
    arrow = max((tmp_path / "cache").glob("twinlm-tokens-*.arrow"), key=os.path.getmtime)  # other's
    arrow.write_bytes(arrow.read_bytes()[:100])
    assert build(tok=other).train[:] and len(calls) == 1


def test_an_interrupted_tokenisation_leaves_no_cache_entry(tmp_path, wordpiece, paragraphs_file, monkeypatch):
    cfg = _cfg(tmp_path, [str(paragraphs_file)], seq_len=16)

    def broken(batch, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(twinlm.data.packing, "_tokenize_batch", broken)
    with pytest.raises(KeyboardInterrupt):
        build_pretraining_datasets(cfg, wordpiece, causal=False)
    assert not list((tmp_path / "cache").glob("twinlm-tokens-*.json"))
    monkeypatch.undo()
    assert len(build_pretraining_datasets(cfg, wordpiece, causal=False).train) > 10


def test_corpus_modern_parquet_as_shipped(tmp_path, shared_data, wordpiece):
    """A corpus-modern file, read as shipped (zstd parquet, column text), then again from the cache."""
    path = shared_data / "corpus-modern" / "spamassassin_ham.parquet"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cfg = _cfg(tmp_path, [str(path)], seq_len=128, validation_size=10)
    first = build_pretraining_datasets(cfg, wordpiece, causal=False)
    assert first.sources[0].documents > 3000 and len(first.train) > 1000 and len(first.validation) > 0
    assert build_pretraining_datasets(cfg, wordpiece, causal=False).train[:5] == first.train[:5]


# --- collators ------------------------------------------------------------------------------------


def _random_rows(tok, n_rows: int, length: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    special = set(tok.all_special_ids)
    normal = [i for i in range(len(tok)) if i not in special]
    rows = []
    for r in range(n_rows):
        n = length - (r % 3) * 5  # unequal lengths, so the batch is padded
        ids = rng.choice(normal, size=n).tolist()
        ids[0], ids[n // 2] = tok.cls_token_id, tok.sep_token_id
        rows.append({"input_ids": ids, "position_ids": list(range(n))})
    return rows


def test_masked_lm_collator_rates_and_exclusions(wordpiece):
    tok = wordpiece
    rows = _random_rows(tok, 96, 128, seed=0)
    batch = MaskedLMCollator(tok, generator=torch.Generator().manual_seed(0))(rows)
    original = torch.full_like(batch["input_ids"], -1)
    for b, r in enumerate(rows):
        original[b, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    real = batch["attention_mask"].bool()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    special = torch.isin(original, torch.tensor(tok.all_special_ids)) & real
    masked = batch["labels"] != -100
    assert not (masked & (special | ~real)).any()  # specials and padding never masked
    assert torch.equal(batch["input_ids"][special], original[special])
    assert (batch["input_ids"][~real] == tok.pad_token_id).all()
    assert torch.equal(batch["labels"][masked], original[masked])
    maskable = real & ~special
    rate = masked.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.015, rate
    new = batch["input_ids"][masked]
    n = masked.sum().item()
    to_mask = (new == tok.mask_token_id).sum().item() / n
    kept = (new == original[masked]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.03 and abs(randomised - 0.1) < 0.03
    replaced = new[(new != tok.mask_token_id) & (new != original[masked])]
    assert not torch.isin(replaced, torch.tensor(tok.all_special_ids)).any()  # random tokens are normal
    # Unmasked tokens are untouched; equal-length rows give no attention_mask.
    assert torch.equal(batch["input_ids"][~masked & real], original[~masked & real])
    equal = [{"input_ids": r["input_ids"][:100], "position_ids": r["position_ids"][:100]} for r in rows[:4]]
    assert "attention_mask" not in MaskedLMCollator(tok)(equal)


def test_masked_lm_collator_uses_global_rng_by_default(wordpiece):
    rows = _random_rows(wordpiece, 4, 64, seed=1)
    collate = MaskedLMCollator(wordpiece)
    torch.manual_seed(123)
    a = collate(rows)
    torch.manual_seed(123)
    b = collate(rows)
    c = collate(rows)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["labels"], c["labels"])


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_whole_word_masking_masks_whole_words(kind, wordpiece, bpe):
    tok = wordpiece
    if kind == "bpe":  # the package's byte-level BPE has no mask token: give a copy one (RoBERTa-style)
        tok = copy.deepcopy(bpe)
        tok.add_special_tokens({"mask_token": "<|mask|>"})
    text = " ".join(DOCS[:40])
    enc = tok(text, add_special_tokens=False)
    ids, words = enc["input_ids"], enc.word_ids()
    assert len(ids) > len(set(words)) + 50  # many words are several pieces
    if kind == "wordpiece":
        ids, words = [tok.cls_token_id] + ids + [tok.sep_token_id], [None] + words + [None]
    rows = [{"input_ids": ids}] * 8
    batch = MaskedLMCollator(tok, whole_word_masking=True, generator=torch.Generator().manual_seed(0))(rows)
    masked = (batch["labels"] != -100).tolist()
    multi_piece_masked = 0
    for row in masked:
        by_word: dict[int, set[bool]] = {}
        for w, m in zip(words, row, strict=True):
            if w is None:
                assert not m
            else:
                by_word.setdefault(w, set()).add(m)
        assert all(len(s) == 1 for s in by_word.values())  # every word all masked or all kept
        multi_piece_masked += sum(1 for w, s in by_word.items() if s == {True} and words.count(w) > 1)
    assert multi_piece_masked > 10
    rate = np.mean(masked)
    assert 0.08 < rate < 0.25, rate


def test_causal_lm_collator_labels(bpe):
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "position_ids": [3, 4, 0, 1, 2]},
        {"input_ids": [10, 11, 12], "position_ids": [0, 1, 2]},
    ]
    batch = CausalLMCollator(bpe)(rows)
    assert batch["labels"].tolist() == [[5, 6, -100, 8, 9], [-100, 11, 12, -100, -100]]
    assert batch["input_ids"][1, 3:].tolist() == [bpe.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    same = CausalLMCollator(bpe)([rows[0], rows[0]])
    assert "attention_mask" not in same and same["position_ids"].dtype == torch.long


# --- Hub sources and the model --------------------------------------------------------------------


def test_hub_source_calls_load_dataset_and_names_failures(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming, cache_dir):
        calls.append((name, config, split, streaming, cache_dir))
        if name == "missing/set":
            raise FileNotFoundError("Couldn't find 'missing/set' on the Hugging Face Hub")
        return Dataset.from_dict({"id": [1, 2, 3], "content": ["alpha beta", "  ", "gamma"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = {"hub": "someone/corpus", "config": "en", "split": "train[:10]", "text_column": "content"}
    texts = load_texts(_cfg(tmp_path, [source]))
    assert texts["text"] == ["alpha beta", "gamma"]
    assert calls == [("someone/corpus", "en", "train[:10]", False, str(tmp_path / "cache"))]
    with pytest.raises(TwinLMError, match=r"data source 1 \(hub='missing/set', split='train'\)"):
        load_texts(_cfg(tmp_path, [source, {"hub": "missing/set"}]))


@pytest.mark.parametrize("causal", [False, True])
def test_collated_blocks_feed_the_model(tmp_path, paragraphs_file, wordpiece, bpe, causal):
    from conftest import tiny_config

    from twinlm import TwinLMForCausalLM, TwinLMForMaskedLM

    tok = bpe if causal else wordpiece
    cfg = _cfg(tmp_path, [str(paragraphs_file)], seq_len=32, validation_size=0)
    train, _ = _blocks(cfg, tok, causal=causal)
    collate = CausalLMCollator(tok) if causal else MaskedLMCollator(tok)
    batch = collate([train[i] for i in range(4)])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    model_cls = TwinLMForCausalLM if causal else TwinLMForMaskedLM
    model = model_cls(tiny_config(vocab_size=len(tok), is_causal=causal, pad_token_id=tok.pad_token_id))
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_a_file_rewritten_with_its_old_modification_time_is_read_again(tmp_path, wordpiece):
    """`datasets` keys its cache of a local file by path and modification time; twinlm keys its own by the
    bytes. A file rewritten and given its old time back (cp -p, rsync -a, tar) must give the new text's
    blocks, not the old Arrow table stored under the new text's key."""
    import os

    from twinlm.data.sources import load_texts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"alpha number {i} says hello to the world again." for i in range(60)))
    stat = corpus.stat()
    cfg = _cfg(tmp_path, [str(corpus)], seq_len=16, validation_size=0)
    first, _ = _blocks(cfg, wordpiece, causal=False)
    corpus.write_text("\n\n".join(f"gamma number {i} says hello to the world again." for i in range(60)))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_texts(cfg)[0]["text"].startswith("gamma")  # what tokenizer training reads, too
    second, _ = _blocks(cfg, wordpiece, causal=False)
    assert "gamma" in wordpiece.decode(second[0]["input_ids"]) and second[:] != first[:]


def test_the_default_corpus_cut_to_its_first_documents_has_its_own_cache_key(tmp_path):
    """`{default: true, max_documents: N}` reads N documents: its cache key must not be the whole corpus's
    (a warm cache of the whole corpus was reused for it)."""
    from twinlm.data.sources import source_identity

    cfg = _cfg(tmp_path, [{"default": True}])
    whole = source_identity(SourceConfig(default=True), cfg, "data.sources[0]")
    first = source_identity(SourceConfig(default=True, max_documents=5), cfg, "data.sources[0]")
    assert whole != first
    assert first == source_identity(SourceConfig(default=True, max_documents=5), cfg, "data.sources[0]")
