"""Bad input to every reader: one line, exit status 2, nothing written (files made in tmp_path)."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest

from twinlm.cli import main
from twinlm.errors import TwinLMError
from twinlm.finetune.config import TaskSection
from twinlm.finetune.data import load_task
from twinlm.tokenization import bounded_pieces, load_tokenizer, train_tokenizer


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.timeout(120)
def test_a_megabyte_of_nul_bytes_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "zeros.txt"
    corpus.write_bytes(b"\0" * (1 << 20))
    start = time.perf_counter()
    code, err = _run(
        ["tokenizer", "train", "--type", "bpe", "--vocab-size", "300", "--out", str(tmp_path / "tok"), "--quiet",
         str(corpus)],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "zeros.txt is a binary file, not text (NUL byte at offset 0)" in _one_line(err)
    assert time.perf_counter() - start < 30  # was over 400 s; a generous bound for a loaded machine
    assert not (tmp_path / "tok").exists() and list(tmp_path.iterdir()) == [corpus]


def test_long_unbroken_text_reaches_the_trainer_in_bounded_pieces() -> None:
    text = "".join(random.Random(0).choices(string.ascii_lowercase, k=5000)) + " tail\nnext"
    pieces = list(bounded_pieces(text, limit=1000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1000
    words = "alpha beta gamma " * 200  # cut just before a space: the words survive whole
    assert all(p.startswith(" ") or i == 0 for i, p in enumerate(bounded_pieces(words, limit=100)))
    assert "".join(bounded_pieces(words, limit=100)).split() == words.split()
    assert list(bounded_pieces("short")) == ["short"]


@pytest.mark.timeout(120)
def test_a_megabyte_without_whitespace_trains_in_linear_time() -> None:
    # one 1 MB "word": quadratic-or-worse for the BPE trainer unless it is cut into bounded pieces
    blob = "".join(random.Random(1).choices(string.ascii_letters, k=1 << 20))
    tokenizer = train_tokenizer("bpe", texts=[blob, "hello world"], vocab_size=300, show_progress=False)
    assert len(tokenizer) == 300


def test_tsv_corpus_trains_on_its_text_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text(
        "id\ttext\n" + "".join(f"{i}\tthe quick brown fox {i}\n" for i in range(50)), encoding="utf-8"
    )
    code, err = _run(
        ["tokenizer", "train", "--type", "wordpiece", "--vocab-size", "200", "--out", str(tmp_path / "tok"), "--quiet",
         str(corpus)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    vocab = load_tokenizer(tmp_path / "tok").get_vocab()
    assert "quick" in vocab and "id" not in vocab  # the text column, not the header or the ids

    other = tmp_path / "other.tsv"
    other.write_text("id\tbody\n1\tsome words\n", encoding="utf-8")
    code, err = _run(
        ["tokenizer", "train", "--type", "bpe", "--vocab-size", "300", "--out", str(tmp_path / "t2"), "--quiet",
         str(other)],
        capsys,
    )  # fmt: skip
    assert code == 2 and "no column 'text' (columns: id, body)" in _one_line(err) and "--text-column" in err
    assert not (tmp_path / "t2").exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune", "tokenizer"])
def test_binary_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    argv = [command, "--config", str(config)]
    if command == "tokenizer":
        argv = ["tokenizer", "train", "--config", str(config), "--out", str(tmp_path / "tok")]
    code, err = _run(argv, capsys)
    assert code == 2
    assert "run.yaml is a binary file, not text (NUL byte at offset 0)" in _one_line(err)
    assert list(tmp_path.iterdir()) == [config]


def test_latin1_config_names_the_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    code, err = _run(["pretrain", "--config", str(config)], capsys)
    assert code == 2 and "not UTF-8 text (invalid byte at offset 15): convert it to UTF-8" in _one_line(err)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.csv", "sentence,label\ncaf\xe9 cr\xe8me,1\n".encode("latin-1"), "invalid byte at offset 18"),
        (
            "train.jsonl",
            '{"sentence": "na\xefve", "label": 1}\n'.encode("latin-1"),
            "invalid byte at offset 16",
        ),
        ("train.txt", "Caf\xe9 B-LOC\n".encode("latin-1"), "invalid byte at offset 3"),
        ("train.tsv", b"sentence\tlabel\n\x00\x01\x02\tx\n", "binary file, not text (NUL byte at offset 15)"),
    ],
)
def test_finetuning_files_in_other_encodings_are_named(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    kind = "token_classification" if name.endswith(".txt") else "sequence_classification"
    with pytest.raises(TwinLMError, match="task.train: .*" + name) as info:
        load_task(TaskSection(type=kind, train=path))
    assert message in str(info.value) and "\n" not in str(info.value)
    if "offset" in message and "NUL" not in message:
        assert "convert it to UTF-8" in str(info.value)
