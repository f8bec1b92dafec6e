"""The one config system (twinlm.config): overrides, error messages, the shared optimizer section."""

from __future__ import annotations

import pytest

from twinlm.config import OptimizerSection, Section, build_config, split_overrides
from twinlm.errors import TwinLMError
from twinlm.finetune.config import FinetuneConfig
from twinlm.finetune.config import TrainingSection as FinetuneTraining
from twinlm.training.config import RunConfig
from twinlm.training.config import TrainingSection as PretrainTraining


def test_every_config_class_shares_one_section_base() -> None:
    from twinlm.data.config import DataConfig, SourceConfig
    from twinlm.tokenization import TokenizerTrainConfig

    for cls in (RunConfig, FinetuneConfig, DataConfig, SourceConfig, TokenizerTrainConfig):
        assert issubclass(cls, Section), cls


def test_training_sections_share_the_optimizer_fields() -> None:
    pre, fine = PretrainTraining(warmup_steps=7), FinetuneTraining(warmup_ratio=0.1, max_steps=50)
    assert isinstance(pre, OptimizerSection) and isinstance(fine, OptimizerSection)
    for field in OptimizerSection.model_fields:
        assert hasattr(pre, field) and hasattr(fine, field)
    assert (pre.lr, pre.betas, pre.schedule) == (5e-4, (0.9, 0.98), "cosine")  # defaults kept
    assert (fine.lr, fine.betas, fine.schedule, fine.batch_size) == (5e-5, (0.9, 0.999), "linear", 32)
    assert pre.warmup_steps_for(1000) == 7 and fine.warmup_steps_for(200) == 20
    assert FinetuneTraining(mixed_precision=None).mixed_precision == "no"


def test_split_overrides_is_the_same_for_every_command(tmp_path) -> None:
    existing = tmp_path / "a=b.txt"
    existing.write_text("x")
    argv = ["--config", "x.yaml", "--training.lr", "3e-4", "training.max_steps=5", "--hub.push=true",
            str(existing), "--quiet"]  # fmt: skip
    own, overrides = split_overrides(argv, ["--config", "-c", "--quiet", "-h", "--help"])
    assert own == ["--config", "x.yaml", str(existing), "--quiet"]
    assert overrides == ["--training.lr", "3e-4", "training.max_steps=5", "--hub.push=true"]


def test_unknown_keys_get_a_suggestion_with_their_full_path() -> None:
    values = {"model": {"path": "m"}, "task": {"type": "sequence_classification", "train": "t.tsv"}}
    with pytest.raises(TwinLMError) as info:
        build_config(
            FinetuneConfig, values, ["training.learning_rate=1e-4", "task.lable_column=x", "training.lr=abc"],
            what="fine-tuning config", example="configs/finetune/sst2.yaml",
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith("invalid fine-tuning config: ") and "\n" not in message
    assert "unknown key 'training.learning_rate'" in message
    assert "unknown key 'task.lable_column' (did you mean 'task.label_column'?)" in message
    assert "training.lr: Input should be a valid number" in message and "(got 'abc')" in message


def test_tokenizer_train_takes_the_same_overrides(tmp_path, capsys) -> None:
    from twinlm.cli import main
    from twinlm.tokenization import load_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20, encoding="utf-8")
    config = tmp_path / "tok.yaml"
    config.write_text("type: wordpiece\nvocab_size: 500\n", encoding="utf-8")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--config", str(config), str(corpus), "--quiet", "vocab_size=60", "--out", str(out),
            "--lowercase", "--min_frequency", "3"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert len(load_tokenizer(out)) == 60
    assert main(["tokenizer", "train", "--config", str(config), "--out", str(out), "vocab_sise=40"]) == 2
    assert "unknown key 'vocab_sise' (did you mean 'vocab_size'?)" in capsys.readouterr().err
