"""Training, saving, loading and measuring the WordPiece and byte-level BPE tokenizers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from twinlm import cli
from twinlm.corpus import default_corpus
from twinlm.errors import TwinLMError
from twinlm.tokenization import (
    TextSource,
    TokenizerTrainConfig,
    _iter_line_batches,
    format_stats_table,
    iter_dataset_texts,
    load_tokenizer,
    tokenizer_stats,
    train_tokenizer,
)

VOCAB = 600
HOSTILE = [
    "",
    " ",
    "   runs   of    spaces   ",
    "\t\ttabs\tand\ttrailing\t",
    "\n\n\nnewlines\n\n",
    "\r\nwindows\r\nline ends\r\n",
    "emoji 😀👍🏽 family 👩\u200d👩\u200d👧\u200d👦 flags 🇫🇷",
    "中文 日本語のテキスト 한국어",
    "العربية עברית",
    "e\u0301 combining, ﬁ ligature, \u00a0nbsp, zero\u200bwidth",
    "control \x00\x01\x7f chars",
    "<|endoftext|>two docs<|endoftext|>",
    "Mixed CASE, punctuation!?... (brackets) [x] {y} 'quotes' \"dq\" `bt`",
    "    indented = code(x)  # comment\n\tif y:\n\t\treturn",
]


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    return default_corpus()[:120]


@pytest.fixture(scope="module")
def bpe(train_texts):
    return train_tokenizer("bpe", train_texts, vocab_size=VOCAB, show_progress=False)


@pytest.fixture(scope="module")
def wordpiece(train_texts):
    return train_tokenizer(
        "wordpiece", train_texts, vocab_size=VOCAB, show_progress=False, model_max_length=128
    )


def test_bpe_is_lossless_on_hostile_text(bpe) -> None:
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0x0, 0x1F)]
    randoms = ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(200)) for _ in range(20)]
    for text in HOSTILE + randoms + ["".join(HOSTILE)]:
        ids = bpe(text)["input_ids"]
        assert bpe.decode(ids) == text
        assert (
            bpe.backend_tokenizer.decode(bpe.backend_tokenizer.encode(text).ids, skip_special_tokens=False)
            == text
        )
    assert bpe("")["input_ids"] == []


def test_bpe_special_tokens_and_padding(bpe) -> None:
    eos = bpe.eos_token_id
    assert bpe.eos_token == bpe.bos_token == bpe.unk_token == "<|endoftext|>"
    assert bpe.pad_token == "<|pad|>" and bpe.pad_token_id != eos
    assert bpe("hello world")["input_ids"][-1] != eos  # GPT-2 style: nothing added implicitly
    ids = bpe("one<|endoftext|>two")["input_ids"]
    assert ids.count(eos) == 1  # the separator is one token, never split into pieces
    batch = bpe(["a longer piece of text", "short"], padding=True)
    assert len(batch["input_ids"][0]) == len(batch["input_ids"][1])
    assert batch["input_ids"][1][-1] == bpe.pad_token_id and batch["attention_mask"][1][-1] == 0
    assert "token_type_ids" not in batch


def test_wordpiece_round_trip_on_normalised_text(wordpiece) -> None:
    assert wordpiece.decode(
        wordpiece("The  Module\tRETURNS the value")["input_ids"], skip_special_tokens=True
    ) == ("the module returns the value")
    backend = wordpiece.backend_tokenizer
    for text in HOSTILE[2:]:
        ids = wordpiece(text, add_special_tokens=False)["input_ids"]
        again = wordpiece(wordpiece.decode(ids), add_special_tokens=False)["input_ids"]
        assert again == ids, text  # decoding gives the normalised text, which encodes to the same ids
    # rare words split into ## pieces and decode back whole
    tokens = backend.encode("unsubscribable", add_special_tokens=False).tokens
    assert len(tokens) > 1 and all(t.startswith("##") for t in tokens[1:])
    assert (
        wordpiece.decode(wordpiece("unsubscribable")["input_ids"], skip_special_tokens=True)
        == "unsubscribable"
    )


def test_wordpiece_special_tokens_and_pair_template(wordpiece) -> None:
    for attr, token in [
        ("pad", "[PAD]"),
        ("unk", "[UNK]"),
        ("cls", "[CLS]"),
        ("sep", "[SEP]"),
        ("mask", "[MASK]"),
    ]:
        assert getattr(wordpiece, f"{attr}_token") == token
    assert [wordpiece.convert_ids_to_tokens(i) for i in range(5)] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    assert wordpiece.model_max_length == 128
    single = wordpiece("a list")
    assert (
        single["input_ids"][0] == wordpiece.cls_token_id and single["input_ids"][-1] == wordpiece.sep_token_id
    )
    pair = wordpiece("a list", "the value")
    tokens = wordpiece.convert_ids_to_tokens(pair["input_ids"])
    assert tokens == ["[CLS]", "a", "list", "[SEP]", "the", "value", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert wordpiece("emoji 😀")["input_ids"][-2] == wordpiece.unk_token_id


def test_vocab_size_is_respected(bpe, wordpiece) -> None:
    assert len(bpe) == VOCAB and bpe.backend_tokenizer.get_vocab_size() == VOCAB
    assert len(wordpiece) == VOCAB
    small = train_tokenizer(
        "bpe", default_corpus()[:20], vocab_size=300, show_progress=False, min_frequency=1
    )
    assert len(small) == 300


def test_saved_tokenizers_load_in_a_fresh_process_without_twinlm(bpe, wordpiece, tmp_path) -> None:
    from twinlm.tokenization import save_tokenizer

    save_tokenizer(bpe, tmp_path / "bpe")
    save_tokenizer(wordpiece, tmp_path / "wp")
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    code = """
import json, sys
from transformers import AutoTokenizer
out = {}
for name in ("wp", "bpe"):
    t = AutoTokenizer.from_pretrained(sys.argv[1] + "/" + name)
    enc = t("Hello world", "second part") if name == "wp" else t("Hello  world\\n😀")
    out[name] = {"fast": t.is_fast, "max": t.model_max_length, "len": len(t), "enc": dict(enc),
                 "special": {k: getattr(t, k) for k in ("pad_token", "unk_token", "cls_token", "sep_token",
                             "mask_token", "bos_token", "eos_token")},
                 "decoded": t.decode(enc["input_ids"])}
out["twinlm_imported"] = any(m.startswith("twinlm") for m in sys.modules)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["twinlm_imported"] is False
    wp, bp = out["wp"], out["bpe"]
    assert wp["fast"] and bp["fast"] and wp["max"] == 128 and bp["max"] == 512
    assert wp["special"] == {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "bos_token": None,
        "eos_token": None,
    }
    assert wp["enc"] == {k: list(v) for k, v in wordpiece("Hello world", "second part").items()}
    assert wp["enc"]["token_type_ids"][-1] == 1
    assert bp["special"]["eos_token"] == "<|endoftext|>" and bp["special"]["pad_token"] == "<|pad|>"
    assert bp["decoded"] == "Hello  world\n😀"
    assert bp["len"] == len(bpe)


def test_stats_on_a_known_tiny_corpus() -> None:
    wp = train_tokenizer("wordpiece", ["aaa bbb"] * 50, vocab_size=40, min_frequency=1, show_progress=False)
    assert {"aaa", "bbb"} <= set(wp.get_vocab())
    stats = tokenizer_stats(wp, ["aaa bbb zzz", "aaa"], name="wp")
    # aaa, bbb, [UNK] (z was never seen), aaa
    assert (stats["tokens"], stats["words"], stats["bytes"], stats["texts"]) == (4, 4, 14, 2)
    assert stats["tokens_per_word"] == 1.0
    assert stats["bytes_per_token"] == 14 / 4
    assert stats["unk_rate"] == 1 / 4
    assert stats["vocab_used"] == 3 and stats["vocab_use"] == 3 / len(wp)

    bpe = train_tokenizer("bpe", ["aaa bbb"] * 50, vocab_size=270, min_frequency=1, show_progress=False)
    b = tokenizer_stats(bpe, ["aaa bbb zzz", "aaa"], name="bpe")
    assert b["unk_rate"] == 0.0 and b["type"] == "bpe"
    assert b["tokens"] == len(bpe("aaa bbb zzz")["input_ids"]) + len(bpe("aaa")["input_ids"])
    assert b["bytes_per_token"] == 14 / b["tokens"] and b["tokens"] > 4  # "zzz" needs byte pieces
    table = format_stats_table([stats, b]).splitlines()
    assert table[0].split() == ["wp", "bpe"]
    assert table[6].split()[-2:] == ["1.000", f"{b['tokens'] / 4:.3f}"]
    assert table[7].split()[-2:] == ["3.500", f"{14 / b['tokens']:.3f}"]
    with pytest.raises(TwinLMError, match="empty"):
        tokenizer_stats(wp, ["", "   "])


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_train_and_stats_side_by_side(tmp_path, capsys, train_texts) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(train_texts), encoding="utf-8")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(default_corpus()[200:230]), encoding="utf-8")
    (tmp_path / "wordpiece").mkdir()
    (tmp_path / "wordpiece" / "stale.txt").write_text("from an older run", encoding="utf-8")
    for kind in ("wordpiece", "bpe"):
        code, out, err = _run(
            ["tokenizer", "train", "--type", kind, "--vocab-size", "500", "--out", str(tmp_path / kind),
             "--min-frequency", "3", "--model-max-length", "64", "--quiet", str(corpus)],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert f"to {tmp_path / kind}" in out
        assert len(load_tokenizer(tmp_path / kind)) == 500
    assert load_tokenizer(tmp_path / "bpe").model_max_length == 64
    assert sorted(p.name for p in (tmp_path / "wordpiece").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    code, out, err = _run(
        ["tokenizer", "stats", str(tmp_path / "wordpiece"), str(tmp_path / "bpe"), str(held_out)], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "held_out.txt" in lines[0]
    assert lines[1].split() == ["wordpiece", "bpe"]
    rows = {line[:20].strip(): line[20:].split() for line in lines[3:]}
    assert rows["type"] == ["wordpiece", "bpe"]
    assert rows["unknown-token rate"][1] == "0.0000%"
    assert all(float(v) > 1 for v in rows["tokens / word"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_cli_config_and_dataset_source(tmp_path, capsys) -> None:
    data = tmp_path / "docs.jsonl"
    docs = default_corpus()[:60]
    data.write_text("\n".join(json.dumps({"body": d}) for d in docs), encoding="utf-8")
    config = tmp_path / "tok.yaml"
    config.write_text(
        f"type: wordpiece\nvocab_size: 450\nlowercase: false\nsources:\n  - {{path: {data}, text_column: body}}\n",
        encoding="utf-8",
    )  # the pretraining data.sources schema
    assert TokenizerTrainConfig.from_yaml(config).sources[0].path == str(data)
    code, out, err = _run(
        ["tokenizer", "train", "--config", str(config), "--out", str(tmp_path / "tok"), "--quiet"], capsys
    )
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == 450
    assert tok.convert_ids_to_tokens(tok("Return")["input_ids"])[1].startswith("R")  # lowercase: false
    # the same via the Python API and the CLI flag
    code, out, err = _run(
        ["tokenizer", "train", "--type", "bpe", "--vocab-size", "400", "--out", str(tmp_path / "b"), "--quiet",
         "--dataset", str(data), "--text-column", "body"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: sentencepiece\nvocab_size: 100\n", encoding="utf-8")
    code, out, err = _run(["tokenizer", "train", "--config", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "type" in err and len(err.strip().splitlines()) == 1
    # every problem is named, unknown keys by name (as pretraining's data config does)
    bad.write_text("type: bpe\nvocab_sise: 300\nsources: [{path: a.txt, colum: x}]\n", encoding="utf-8")
    code, out, err = _run(["tokenizer", "train", "--config", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        "unknown key 'vocab_sise' (did you mean 'vocab_size'?)" in err and "missing key 'vocab_size'" in err
    )
    assert "unknown key 'sources.0.colum'" in err
    bad.write_text("type: bpe\nvocab_size: 300\nsource: default\n", encoding="utf-8")  # the old key
    assert "unknown key 'source'" in _run(["tokenizer", "train", "--config", str(bad)], capsys)[2]
    assert not (tmp_path / "x").exists()


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("na\xefve caf\xe9\n".encode("latin-1"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 " * 5, encoding="utf-8")
    return {
        "empty corpus": (["--type", "bpe", "--vocab-size", "300", str(empty)], "empty"),
        "missing file": (["--type", "bpe", "--vocab-size", "300", str(tmp_path / "missing.txt")], "no such file"),
        "non-UTF-8": (["--type", "wordpiece", "--vocab-size", "300", str(latin)], "not UTF-8"),
        "bpe vocab < bytes + specials": (["--type", "bpe", "--vocab-size", "200", str(tiny)], "too small"),
        "wordpiece vocab < alphabet": (["--type", "wordpiece", "--vocab-size", "40", "--no-lowercase", str(tiny)], "too small"),
        "unknown type": (["--type", "unigram", "--vocab-size", "300", str(tiny)], "unknown tokenizer type"),
        "files and dataset": (["--type", "bpe", "--vocab-size", "300", "--dataset", str(tiny), str(tiny)], "not both"),
    }  # fmt: skip


def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "out" / "tok"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("previous run", encoding="utf-8")
    for name, (args, message) in _bad_input_cases(tmp_path).items():
        for target in (out, existing):
            code, stdout, err = _run(["tokenizer", "train", "--quiet", "--out", str(target), *args], capsys)
            assert code == 2, name
            lines = err.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], (name, err)
        assert not out.exists(), name
        assert [p.name for p in existing.iterdir()] == ["keep.txt"], name
        assert not [p for p in tmp_path.rglob(".*tmp*")], name  # no temp folder left beside --out


def test_bad_input_from_python_and_loading(tmp_path) -> None:
    with pytest.raises(TwinLMError, match="empty"):
        train_tokenizer("wordpiece", [], vocab_size=100, show_progress=False)
    with pytest.raises(TwinLMError, match="empty"):
        train_tokenizer("bpe", iter(["", " \n"]), vocab_size=300, show_progress=False)
    with pytest.raises(TwinLMError, match="strings"):
        train_tokenizer("bpe", [b"bytes"], vocab_size=300, show_progress=False)
    with pytest.raises(TwinLMError, match="no text files"):
        train_tokenizer("bpe", files=[], vocab_size=300, show_progress=False)
    with pytest.raises(TwinLMError, match="not found"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(TwinLMError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TwinLMError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_cli_exits_nonzero_in_a_real_process(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twinlm", "tokenizer", "train", "--type", "wordpeace", "--vocab-size", "300",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "twinlm tokenizer: error: unknown tokenizer type 'wordpeace': use one of wordpiece, bpe"
    )
    assert not (tmp_path / "o").exists()


# --- where the text comes from (reading is twinlm.data's) -------------------------------------------


def test_text_source_takes_the_data_sources_schema() -> None:
    assert TextSource().is_default and TextSource.model_validate({"sources": [{"default": True}]}).is_default
    files = TextSource.model_validate({"sources": ["a.txt", {"path": "b.txt"}]})
    assert [s.path for s in files.sources] == ["a.txt", "b.txt"] and files.describe() == "a.txt, b.txt"
    hub = TextSource.model_validate({"sources": [{"hub": "wikitext", "config": "raw", "text_column": "t"}]})
    assert not hub.is_default and hub.describe() == "hub='wikitext', config='raw', split='train'"
    with pytest.raises(ValidationError):
        TextSource.model_validate({"sources": [{"path": "a.txt", "hub": "x"}]})
    with pytest.raises(ValidationError):
        TextSource.model_validate({"sources": [{"filez": ["a.txt"]}]})
    batches = list(TextSource().iter_batches(100))  # the embedded corpus, through twinlm.data.load_texts
    assert [t for b in batches for t in b] == default_corpus() and max(len(b) for b in batches) == 100


def test_file_sources_keep_lines_and_stream_long_ones_in_pieces(tmp_path) -> None:
    path = tmp_path / "long.txt"
    line = "word " * 500_000  # one 2.5 MB line
    path.write_text(line + "\nsecond line\n", encoding="utf-8")
    pieces = [t for batch in _iter_line_batches([path], batch_size=2) for t in batch]
    assert "".join(pieces) == line + "\nsecond line\n"  # lossless: newlines kept for byte-level BPE
    assert max(len(p) for p in pieces) <= 1 << 20
    assert pieces[-1] == "second line\n"
    # FILES may be folders/globs typed by twinlm.data: plain text by line, JSON Lines by its text column
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain one\nplain two", encoding="utf-8")
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "  json doc  "}\n{"text": ""}\n', encoding="utf-8")
    (tmp_path / "notes").write_text("no extension\n", encoding="utf-8")  # a named file: plain text
    source = TextSource.from_files([tmp_path / "d", tmp_path / "notes"])
    assert source.validate_input() is None  # not only plain text: no line count for the trainer
    assert [t for b in source.iter_batches() for t in b] == [
        "plain one\n",
        "plain two",
        "no extension\n",
        "json doc",
    ]
    assert TextSource(sources=[str(tmp_path / "d" / "*.txt")]).validate_input().n_lines == 2
    with pytest.raises(TwinLMError, match="the glob matches no files"):
        TextSource(sources=[{"path": str(tmp_path / "*.csv")}]).validate_input()


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
    with pytest.raises(TwinLMError, match="no such file"):
        list(iter_dataset_texts(tmp_path / "nope.jsonl"))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TwinLMError, match=r"latin1.txt is not UTF-8"):  # streamed, yet named up front
        list(iter_dataset_texts(latin))


REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_example_configs_are_valid() -> None:
    configs = sorted((REPO / "configs" / "tokenizer").glob("*.yaml"))
    assert len(configs) >= 2
    kinds = {TokenizerTrainConfig.from_yaml(path).type for path in configs}
    assert kinds == {"wordpiece", "bpe"}


@pytest.mark.skipif(
    not (SHARED / "corpus").is_dir(), reason="../shared/data/corpus is absent on this machine"
)
def test_real_corpus_wordpiece_vs_bpe(tmp_path) -> None:
    """Train both on a real public-domain text and compare them on held-out lines of another."""
    train = SHARED / "corpus" / "tinyshakespeare.txt"
    held_out = (SHARED / "corpus" / "moby_dick.txt").read_text(encoding="utf-8").splitlines()[5000:7000]
    stats = {}
    for kind in ("wordpiece", "bpe"):
        tok = train_tokenizer(
            kind, files=[train], vocab_size=4000, out_dir=tmp_path / kind, show_progress=False
        )
        assert len(load_tokenizer(tmp_path / kind)) == 4000
        stats[kind] = tokenizer_stats(tok, held_out, name=kind)
    wp, bpe = stats["wordpiece"], stats["bpe"]
    assert wp["words"] == bpe["words"] > 10_000
    assert 1.0 < wp["tokens_per_word"] < 2.0 and 1.0 < bpe["tokens_per_word"] < 2.5
    assert 0.0 < wp["unk_rate"] < 0.05 and bpe["unk_rate"] == 0.0  # characters Shakespeare never used
    assert 0.3 < wp["vocab_use"] <= 1.0 and 0.3 < bpe["vocab_use"] <= 1.0


def test_truncation_or_padding_left_by_a_call_neither_skews_stats_nor_is_saved(train_texts, tmp_path) -> None:
    """transformers leaves a call's truncation and padding set on the backend tokenizer: `tokenizer_stats`
    counted cut and padded texts, and save_pretrained wrote them into tokenizer.json (a raw `tokenizers` user
    of the saved file cut every text). Both now see the tokenizer as it is."""
    from tokenizers import Tokenizer

    from twinlm.tokenization import save_tokenizer, tokenizer_stats

    tok = train_tokenizer("bpe", train_texts, vocab_size=VOCAB, show_progress=False)
    held_out = default_corpus()[120:140]
    fresh = tokenizer_stats(tok, held_out)
    tok(held_out[:2], padding="max_length", truncation=True, max_length=4)  # a training-time call
    assert tokenizer_stats(tok, held_out) == fresh
    saved = json.loads((save_tokenizer(tok, tmp_path / "tok") / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    raw = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert len(raw.encode(held_out[0], add_special_tokens=False).ids) > 4
