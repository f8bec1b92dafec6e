"""Fine-tuning: learnable synthetic tasks from a tiny checkpoint, metrics, baselines, and bad input."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, hold_run_lock, inject_nan_at
from conftest_hub import hub_env, local_hub  # noqa: F401

from twinlm.errors import TwinLMError

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

FILLER = (
    "the a one this that big small red blue old new cat dog man woman house car tree river hill road "
    "sees likes takes finds makes runs walks near under over with from and then"
).split()
CITIES = ["paris", "london", "berlin", "madrid"]
NAMES = [("john", "smith"), ("mary", "jones"), ("anna", "brown")]


def sentence(rng: random.Random, n: int = 8) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def build_checkpoint(out: Path, kind: str = "wordpiece", seed: int = 0, **overrides: object) -> Path:
    """A tiny twinlm checkpoint with its own tokenizer, trained on synthetic text (a few seconds)."""
    import torch

    from twinlm import TwinLMConfig, TwinLMForCausalLM, TwinLMForMaskedLM
    from twinlm.tokenization import train_tokenizer

    torch.manual_seed(seed)  # the same checkpoint in every test session
    rng = random.Random(seed)
    words = FILLER + CITIES + [w for pair in NAMES for w in pair] + ["excellent", "terrible"]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    tokenizer = train_tokenizer(
        kind,
        texts=texts,
        vocab_size=200 if kind == "wordpiece" else 400,
        min_frequency=1,
        model_max_length=64,
        show_progress=False,
    )
    if kind == "wordpiece":
        config = TwinLMConfig.from_preset(
            "tiny-bert-base", vocab_size=len(tokenizer), max_position_embeddings=64, **overrides
        )
        model = TwinLMForMaskedLM(config)
    else:
        config = TwinLMConfig.from_preset(
            "tiny-gpt2-small",
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **overrides,
        )
        model = TwinLMForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_sentiment(folder: Path, n_train: int = 160, n_eval: int = 60, seed: int = 1) -> dict[str, Path]:
    """label = pos iff the sentence holds 'excellent' (else it holds 'terrible'): learnable in a few steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = sentence(rng)
            pos = i % 2 == 0
            words.insert(rng.randrange(len(words)), "excellent" if pos else "terrible")
            lines.append(f"{' '.join(words)}\t{'pos' if pos else 'neg'}")
        paths[split] = folder / f"{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n")
    return paths


def write_entities(
    folder: Path, n_train: int = 160, n_eval: int = 50, seed: int = 2, filler: tuple[int, int] = (6, 6)
) -> dict[str, Path]:
    """CoNLL-style `word POS tag` files: cities are B-LOC, two-word names B-PER I-PER, the rest O; each
    sentence has between filler[0] and filler[1] other words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
        lines = ["-DOCSTART- -X- O", ""]
        for _ in range(n):
            length = filler[0] if filler[0] == filler[1] else rng.randint(*filler)
            tagged = [(w, "O") for w in sentence(rng, length)]
            first, last = rng.choice(NAMES)
            at = rng.randrange(len(tagged))
            tagged[at:at] = [(first, "B-PER"), (last, "I-PER")]
            tagged.insert(rng.randrange(len(tagged) + 1), (rng.choice(CITIES), "B-LOC"))
            lines += [f"{w} NN {t}" for w, t in tagged] + [""]
        paths[split] = folder / f"{split}.txt"
        paths[split].write_text("\n".join(lines))
    return paths


def seq_config(ckpt: Path, data: dict[str, Path], out: Path, **training) -> dict:
    return {
        "model": {"path": str(ckpt)},
        "task": {"type": "sequence_classification", **{k: str(v) for k, v in data.items()}},
        "training": {
            "batch_size": 16,
            "lr": 2e-3,
            "epochs": 4,
            "warmup_ratio": 0.1,
            "eval_every": 0,
            "early_stopping_patience": 2,
            "max_length": 32,
            **training,
        },
        "output_dir": str(out),
    }


def tok_config(ckpt: Path, data: dict[str, Path], out: Path, **training) -> dict:
    return {
        "model": {"path": str(ckpt)},
        "task": {"type": "token_classification", **{k: str(v) for k, v in data.items()}},
        "training": {
            "batch_size": 16,
            "lr": 3e-3,
            "epochs": 5,
            "warmup_ratio": 0.1,
            "max_length": 32,
            "early_stopping_patience": None,
            **training,
        },
        "output_dir": str(out),
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train 10x faster on one thread than on two when other test processes share the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "mlm")


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sentiment(tmp_path_factory.mktemp("sentiment"))


@pytest.fixture(scope="module")
def entities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_entities(tmp_path_factory.mktemp("entities"))


# ------------------------------------------------------------------------------------------------
# Learning
# ------------------------------------------------------------------------------------------------
def test_sequence_classification_learns_and_saves_best(mlm_ckpt, sentiment, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from twinlm.finetune import finetune

    out = tmp_path / "run"
    summary = finetune(seq_config(mlm_ckpt, sentiment, out))
    best = summary["best"]
    assert best["dev"]["accuracy"] >= 0.85, summary["evaluations"]
    assert best["test"]["accuracy"] >= 0.8
    assert summary["labels"] == ["neg", "pos"]
    assert summary["baseline"]["name"] == "tfidf+logistic_regression"
    assert summary["baseline"]["dev"]["accuracy"] >= 0.9  # the keyword is an easy TF-IDF feature too
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best"]["step"] == best["step"]
    assert len(metrics["evaluations"]) >= 1 and "test" in metrics["evaluations"][0]
    # The best model reloads with its labels and reproduces the recorded dev score's predictions.
    model = AutoModelForSequenceClassification.from_pretrained(out / "best", trust_remote_code=True)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    saved = json.loads((out / "best" / "eval_results.json").read_text())
    assert saved["dev"]["accuracy"] == pytest.approx(best["dev"]["accuracy"])


def test_token_classification_learns_entities(mlm_ckpt, entities, tmp_path):
    from twinlm.finetune import finetune

    summary = finetune(tok_config(mlm_ckpt, entities, tmp_path / "run"))
    assert summary["labels"] == ["B-LOC", "B-PER", "I-PER", "O"]
    assert summary["best"]["dev"]["f1"] >= 0.8, summary["evaluations"]
    assert summary["best"]["test"]["f1"] >= 0.75
    # Every name/city is always the same entity: the most-frequent-tag baseline is near perfect here.
    assert summary["baseline"]["name"] == "most_frequent_tag"
    assert summary["baseline"]["test"]["f1"] >= 0.95
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_early_stopping_stops_when_dev_does_not_improve(mlm_ckpt, sentiment, tmp_path):
    from twinlm.finetune import finetune

    # lr ~ 0: dev accuracy cannot improve after the first evaluation, so patience 1 stops at the second.
    summary = finetune(
        seq_config(
            mlm_ckpt,
            sentiment,
            tmp_path / "run",
            lr=1e-9,
            epochs=10,
            eval_every=3,
            early_stopping_patience=1,
            baseline=False,
        ),
        ["logging.report_to=tensorboard"],
    )
    assert summary["stopped_early"] is True
    assert len(summary["evaluations"]) == 2 and summary["steps"] == 6
    assert summary["best"]["step"] == 3 and summary["baseline"] is None
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # dev/test scores went to TensorBoard


# ------------------------------------------------------------------------------------------------
# The shared engine's guarantees
# ------------------------------------------------------------------------------------------------


def test_a_nan_step_stops_fine_tuning_and_keeps_the_last_good_best_model(
    mlm_ckpt, sentiment, tmp_path, monkeypatch
):
    from twinlm.finetune import finetune
    from twinlm.training.lock import LOCK_FILE

    out = tmp_path / "run"
    inject_nan_at(monkeypatch, 3)
    config = seq_config(
        mlm_ckpt, sentiment, out, max_steps=5, eval_every=1, baseline=False, early_stopping_patience=None
    )
    with pytest.raises(TwinLMError, match="non-finite loss nan and gradient norm nan at step 3") as err:
        finetune(config)
    assert "\n" not in str(err.value)
    saved = json.loads((out / "best" / "eval_results.json").read_text())
    assert saved["step"] <= 2  # the best model of a step before the NaN, untouched
    assert not (out / "metrics.json").exists() and not (out / LOCK_FILE).read_text()

    summary = finetune(config, ["training.nonfinite=skip"])  # skip the step instead, and count it
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    assert [e["step"] for e in summary["evaluations"]] == [1, 2, 3, 4, 5]


def test_ctrl_c_stops_after_the_step_and_keeps_the_best_model(mlm_ckpt, sentiment, tmp_path, monkeypatch):
    import signal

    import yaml

    from twinlm.cli import main
    from twinlm.training.engine import Engine

    original = Engine.forward_backward_step

    def interrupted(self, *args):
        if self.state.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C during step 3
        return original(self, *args)

    monkeypatch.setattr(Engine, "forward_backward_step", interrupted)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(seq_config(mlm_ckpt, sentiment, out, max_steps=6, eval_every=2, baseline=False))
    )
    assert main(["finetune", "--config", str(config)]) == 128 + signal.SIGINT  # as pretraining's
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["interrupted_by"] == "SIGINT" and summary["steps"] == 3
    assert not summary["stopped_early"] and [e["step"] for e in summary["evaluations"]] == [2]
    assert (out / "best" / "model.safetensors").is_file()


def test_a_second_run_on_the_same_output_dir_is_refused(mlm_ckpt, sentiment, tmp_path):

    from twinlm.finetune import finetune

    out = tmp_path / "run"
    out.mkdir()
    holder = hold_run_lock(out)  # a run in progress
    try:
        with pytest.raises(TwinLMError, match=r"output_dir .*run is in use by another run"):
            finetune(seq_config(mlm_ckpt, sentiment, out, max_steps=1, baseline=False))
        assert not (out / "best").exists()
    finally:
        holder.kill()
        holder.wait()


def test_grad_accum_steps_like_the_full_batch_for_tagging(mlm_ckpt, tmp_path):
    """Token classification: micro-batches hold different numbers of tagged words, and the window's loss
    is the mean over all of them, so 2 x 8 sentences step like 16 (dropout off, same data order)."""
    from safetensors.torch import load_file

    from twinlm.finetune import finetune

    entities = write_entities(tmp_path / "data", n_train=32, n_eval=8, filler=(1, 14))
    no_dropout = {
        name: 0.0
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "embedding_dropout_prob",
            "classifier_dropout",
        )
    }
    weights, losses = [], []
    for batch_size, grad_accum in ((16, 1), (8, 2)):
        out = tmp_path / f"b{batch_size}"
        config = tok_config(
            mlm_ckpt, entities, out, batch_size=batch_size, grad_accum=grad_accum, max_steps=2, baseline=False
        )
        config["model"]["overrides"] = no_dropout
        summary = finetune(config)
        assert summary["steps"] == 2 and [e["step"] for e in summary["evaluations"]] == [2]
        losses.append(summary["evaluations"][0]["train_loss"])
        weights.append(load_file(out / "best" / "model.safetensors"))
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    # The two runs add the same gradients in a different order; Adam divides each coordinate by its own
    # gradient scale, so rounding in tiny gradients shows up as a few ulp on weights near 1 (CI saw 9 ulp,
    # 1.07e-6). A mis-weighted window moves weights by a share of the lr-sized update (lr 3e-3): 1e-5 is
    # 0.3% of one update.
    for name, value in weights[0].items():
        assert (weights[1][name] - value).abs().max().item() < 1e-5, name


def test_alignment_labels_first_subtoken_only(mlm_ckpt):
    from transformers import AutoTokenizer

    from twinlm.finetune.data import Split, encode_split

    tok = AutoTokenizer.from_pretrained(mlm_ckpt)
    words = ["paris", "treeriverhill", "john"]  # the made-up word splits into several pieces
    split = Split("dev", "mem", words=[words], tags=[["B-LOC", "O", "B-PER"]])
    feats = encode_split(split, tok, {"O": 0, "B-LOC": 1, "B-PER": 2}, 32, "token_classification")[0]
    enc = tok(words, is_split_into_words=True)
    word_ids = enc.word_ids()
    assert len(feats["labels"]) == len(word_ids) and word_ids.count(1) > 1
    firsts = [
        lab
        for lab, w, prev in zip(feats["labels"], word_ids, [None, *word_ids][:-1], strict=True)
        if w is not None and w != prev
    ]
    assert firsts == [1, 0, 2]
    assert sum(lab != -100 for lab in feats["labels"]) == 3


def test_metrics_and_baseline_scores():
    from twinlm.finetune.baselines import most_frequent_tag
    from twinlm.finetune.data import Split
    from twinlm.finetune.metrics import classification_scores, tagging_scores

    scores = classification_scores(["a", "a", "a", "b"], ["a", "a", "a", "a"])
    assert scores["accuracy"] == 0.75 and scores["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert tagging_scores(gold, [["B-PER", "O", "O", "B-LOC"]])["f1"] == pytest.approx(0.5)  # span must match
    train = Split(
        "train",
        "mem",
        words=[["Bob", "in", "Rome"], ["Rome", "x"]],
        tags=[["B-PER", "O", "B-LOC"], ["B-LOC", "O"]],
    )
    dev = Split("dev", "mem", words=[["Rome", "zzz"]], tags=[["B-LOC", "B-PER"]])
    result = most_frequent_tag({"train": train, "dev": dev})["dev"]  # zzz unseen -> most frequent tag "O"
    assert result["precision"] == 1.0 and result["recall"] == 0.5


def test_sentence_pairs_from_json_lines(mlm_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from twinlm.finetune import finetune
    from twinlm.finetune.config import load_finetune_config
    from twinlm.finetune.data import encode_split, load_task

    rng = random.Random(3)
    for split, n in (("train", 40), ("dev", 10)):
        rows = [
            {"premise": " ".join(sentence(rng)), "hypothesis": " ".join(sentence(rng, 4)), "label": i % 2}
            for i in range(n)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"path": str(mlm_ckpt)},
        "task": {
            "type": "sequence_classification",
            "train": str(tmp_path / "train.jsonl"),
            "dev": str(tmp_path / "dev.jsonl"),
            "text_column": "premise",
            "text_pair_column": "hypothesis",
        },
        "training": {"max_steps": 2, "baseline": True},
        "output_dir": str(tmp_path / "run"),
    }
    cfg = load_finetune_config(raw)
    splits, labels = load_task(cfg.task)
    assert labels == ["0", "1"] and splits["dev"].pairs is not None
    feats = encode_split(
        splits["train"],
        AutoTokenizer.from_pretrained(mlm_ckpt),
        {"0": 0, "1": 1},
        64,
        "sequence_classification",
    )[0]
    assert 0 in feats["token_type_ids"] and 1 in feats["token_type_ids"]  # [CLS] A [SEP] B [SEP]
    summary = finetune(raw)
    assert summary["examples"] == {"train": 40, "dev": 10} and "test" not in summary["best"]
    assert set(summary["baseline"]["dev"]) == {"accuracy", "macro_f1"}


def test_hub_dataset_with_class_labels(mlm_ckpt, tmp_path):
    """task.hub goes through datasets.load_dataset: a local folder of parquet files stands in for the Hub
    (offline), and ClassLabel ids are turned into their names."""
    import datasets

    from twinlm.finetune.config import load_finetune_config
    from twinlm.finetune.data import load_task

    folder = tmp_path / "glue_like"
    folder.mkdir()
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    for split, n in (("train", 12), ("validation", 4)):
        ds = datasets.Dataset.from_dict(
            {"sentence": [f"s {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
        )
        ds.to_parquet(str(folder / f"{split}.parquet"))
    cfg = load_finetune_config(
        {
            "model": {"path": str(mlm_ckpt)},
            "task": {"type": "sequence_classification", "hub": {"name": str(folder)}},
        }
    )
    splits, labels = load_task(cfg.task)
    assert labels == ["negative", "positive"] and len(splits["dev"]) == 4
    assert splits["dev"].source.endswith("[validation]")
    cfg = load_finetune_config(cfg, ["task.hub.dev_split=nope"])
    with pytest.raises(TwinLMError, match=r"cannot load Hub dataset .*\[nope\]"):
        load_task(cfg.task)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_unknown_dev_label_names_file_and_column(mlm_ckpt, sentiment, tmp_path):
    from twinlm.finetune import finetune

    bad = tmp_path / "dev.tsv"
    bad.write_text(sentiment["dev"].read_text() + "a fine movie\tneutral\n")
    with pytest.raises(TwinLMError, match=r"dev\.tsv.*column 'label'.*'neutral'"):
        finetune(seq_config(mlm_ckpt, {**sentiment, "dev": bad}, tmp_path / "run"))


def test_missing_column_and_empty_split(mlm_ckpt, sentiment, entities, tmp_path):
    from twinlm.finetune import finetune

    with pytest.raises(TwinLMError, match=r"train\.tsv: no column 'text'.*'sentence', 'label'"):
        finetune(seq_config(mlm_ckpt, sentiment, tmp_path / "run"), ["task.text_column=text"])
    empty = tmp_path / "test.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(TwinLMError, match=r"test\.tsv: the test split is empty"):
        finetune(seq_config(mlm_ckpt, {**sentiment, "test": empty}, tmp_path / "run"))
    empty_conll = tmp_path / "dev.txt"
    empty_conll.write_text("-DOCSTART- -X- O\n\n")
    with pytest.raises(TwinLMError, match=r"dev\.txt: the dev split is empty"):
        finetune(tok_config(mlm_ckpt, {**entities, "dev": empty_conll}, tmp_path / "r"))


def test_bad_conll_lines_and_tags(mlm_ckpt, entities, tmp_path):
    from twinlm.finetune import finetune

    one_col = tmp_path / "train.txt"
    one_col.write_text("EU B-ORG\nrejects\n")
    with pytest.raises(TwinLMError, match=r"train\.txt:2: expected at least 2 columns"):
        finetune(tok_config(mlm_ckpt, {**entities, "train": one_col}, tmp_path / "run"))
    not_iob = tmp_path / "dev.txt"
    not_iob.write_text("Paris NN LOC\n")
    with pytest.raises(TwinLMError, match=r"dev\.txt: sentence 1 has tag 'LOC', which is not IOB2"):
        finetune(tok_config(mlm_ckpt, {**entities, "dev": not_iob}, tmp_path / "run"))


def test_not_a_twinlm_checkpoint(sentiment, tmp_path):
    from twinlm.finetune import finetune

    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(TwinLMError, match="has no config.json"):
        finetune(seq_config(empty_dir, sentiment, tmp_path / "run"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(TwinLMError, match="is a bert model, not a twinlm one"):
        finetune(seq_config(bert, sentiment, tmp_path / "run"))


def test_config_errors_name_the_key(mlm_ckpt, sentiment, tmp_path):
    from twinlm.finetune.config import load_finetune_config

    base = seq_config(mlm_ckpt, sentiment, tmp_path / "run")
    with pytest.raises(TwinLMError, match="unknown key 'training.learning_rate'"):
        load_finetune_config(base, ["--training.learning_rate", "1e-4"])
    with pytest.raises(TwinLMError, match="metric_for_best 'f1' does not fit task sequence_classification"):
        load_finetune_config(base, ["training.metric_for_best=f1"])
    with pytest.raises(TwinLMError, match=r"task\.dev: file '.*nope\.tsv' does not exist"):
        load_finetune_config(base, [f"task.dev={tmp_path / 'nope.tsv'}"])
    cfg = load_finetune_config(base, ["--training.lr", "1e-4", "task.labels=[neg, pos]"])
    assert cfg.training.lr == 1e-4 and cfg.task.labels == ["neg", "pos"]


def test_model_overrides_must_not_change_the_pretrained_body(mlm_ckpt, sentiment, tmp_path):
    """Size overrides would re-initialise (or drop) pretrained weights: refused; typos get a did-you-mean."""
    from twinlm.finetune import finetune

    base = seq_config(mlm_ckpt, sentiment, tmp_path / "run", max_steps=2, baseline=False)
    assert json.loads((mlm_ckpt / "config.json").read_text())["intermediate_size"] != 96

    def with_overrides(**overrides) -> dict:
        return {**base, "model": {"path": str(mlm_ckpt), "overrides": overrides}}

    with pytest.raises(
        TwinLMError, match=r"model\.overrides\.intermediate_size .*re-initialise .*mlp"
    ) as err:
        finetune(with_overrides(intermediate_size=96, classifier_dropout=0.2))
    assert "classifier_dropout" not in str(err.value).split(" change ")[0] and "\n" not in str(err.value)
    with pytest.raises(TwinLMError, match=r"model\.overrides\.hidden_act .*re-initialise .*gate_proj"):
        finetune(with_overrides(hidden_act="swiglu"))  # GLU adds a gate projection the checkpoint lacks
    with pytest.raises(TwinLMError, match=r"model\.overrides\.num_hidden_layers .*drop .*layers\.1\."):
        finetune(with_overrides(num_hidden_layers=1))
    with pytest.raises(
        TwinLMError, match=r"model\.overrides\.classifer_dropout.*did you mean 'classifier_dropout'"
    ):
        finetune(with_overrides(classifer_dropout=0.1))
    assert not (tmp_path / "run" / "best").exists()

    # Dropout and head settings change no pretrained weight: they still fine-tune, and are saved.
    run = tmp_path / "ok"
    cfg = {**with_overrides(classifier_dropout=0.3, hidden_dropout_prob=0.05), "output_dir": str(run)}
    cfg["model"]["classifier_pooling"] = "mean"
    summary = finetune(cfg)
    assert 0.0 <= summary["best"]["dev"]["accuracy"] <= 1.0
    saved = json.loads((run / "best" / "config.json").read_text())
    assert saved["classifier_dropout"] == 0.3 and saved["hidden_dropout_prob"] == 0.05
    assert saved["classifier_pooling"] == "mean"


def test_causal_checkpoint_classifies_and_tags_with_a_warning(tmp_path, entities, sentiment):
    import warnings

    from twinlm.finetune import finetune

    ckpt = build_checkpoint(tmp_path / "clm", kind="bpe")
    with pytest.warns(UserWarning, match="causal .* only the words to its left"):
        summary = finetune(tok_config(ckpt, entities, tmp_path / "run", max_steps=2, baseline=False))
    assert summary["variant"] == "causal" and 0.0 <= summary["best"]["dev"]["f1"] <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # sequence classification from a GPT-style model: no warning
        summary = finetune(seq_config(ckpt, sentiment, tmp_path / "cls", max_steps=2, baseline=False))
    assert summary["variant"] == "causal"
    saved = json.loads((tmp_path / "cls" / "best" / "config.json").read_text())
    assert saved["classifier_pooling"] == "last" and saved["is_causal"] is True


def test_cli_exit_status_2_on_bad_input(tmp_path, capsys):
    from twinlm.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"model: {{path: {tmp_path}}}\ntask: {{type: sequence_classification, train: {tmp_path}/no.tsv}}\n"
    )
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "task.train: file" in err and "no.tsv" in err


def test_shipped_configs_validate():
    import yaml

    from twinlm.finetune.config import FinetuneConfig

    for name in ("sst2", "conll2003"):
        values = yaml.safe_load((ROOT / "configs" / "finetune" / f"{name}.yaml").read_text())
        cfg = FinetuneConfig.model_validate(values)
        assert cfg.task.train is not None and "shared/data/labeled" in str(cfg.task.train)
        if SHARED_DATA.is_dir():
            assert (ROOT / cfg.task.train).is_file()


def test_hub_push_of_best_model(hub_env, mlm_ckpt, sentiment, tmp_path):  # noqa: F811 - the fixture
    from twinlm.finetune import finetune

    summary = finetune(
        seq_config(mlm_ckpt, sentiment, tmp_path / "run", max_steps=4, eval_every=2, baseline=False),
        ["hub.push=true", "hub.repo_id=tester/tiny-sst", "hub.checkpoint_revision=best-at-{step}"],
    )
    assert summary["hub"]["failures"] == [] and summary["hub"]["pushes"] >= 2  # each new best + the final
    # each new best model on its own branch (hub.checkpoint_revision), the final one on main
    best_branches = sorted(b for b in hub_env.repos["tester/tiny-sst"].branches if b != "main")
    assert best_branches and all(re.fullmatch(r"best-at-[24]", b) for b in best_branches), best_branches
    for branch in best_branches:
        assert hub_env.history("tester/tiny-sst", branch)[-1].startswith(f"best model at step {branch[8:]} ")
    assert hub_env.history("tester/tiny-sst")[1:] == ["fine-tuned sequence_classification model"]
    files = hub_env.files("tester/tiny-sst")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    config = json.loads(files["config.json"])
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert "AutoModelForSequenceClassification" in config["auto_map"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch",
    [
        ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
        ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")],
    ],
    ids=["ddp", "fsdp2"],
)
def test_two_processes_under_accelerate_launch(mlm_ckpt, tmp_path, launch):
    """Data-parallel and FSDP2 on the CPU (gloo); a dev set of odd size checks that gathered predictions are not
    duplicated (the run fails if the count differs from the split's); the fine-tuned model is saved whole."""
    import yaml

    data = write_sentiment(tmp_path / "data", 160, 61)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(seq_config(mlm_ckpt, data, tmp_path / "run", batch_size=8, baseline=False)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "scripts" / "finetune.py"),
        "--config",
        str(cfg),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["examples"]["dev"] == 61
    assert metrics["best"]["dev"]["accuracy"] >= 0.85
    from transformers import AutoModelForSequenceClassification

    best = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "run" / "best", trust_remote_code=True
    )
    pretrained = AutoModelForSequenceClassification.from_pretrained(
        mlm_ckpt, trust_remote_code=True, num_labels=2
    )
    shapes = {k: v.shape for k, v in pretrained.state_dict().items()}
    assert {
        k: v.shape for k, v in best.state_dict().items()
    } == shapes  # whole tensors, not one process' shards


def test_a_hub_split_without_gold_labels_is_refused_not_read_as_the_last_class(tmp_path):
    """GLUE-style test splits store label -1 (no gold label) in a ClassLabel column: read as an index it
    named the LAST class, and the test scores were computed against made-up labels."""
    import datasets

    from twinlm.finetune.config import load_finetune_config
    from twinlm.finetune.data import load_task

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    for split, labels in (("train", [0, 1] * 6), ("validation", [0, 1] * 2), ("test", [-1] * 4)):
        rows = {"sentence": [f"sentence {i}" for i in range(len(labels))], "label": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))

    def task(test_split):
        hub = {"name": str(tmp_path), "test_split": test_split}
        cfg = {"model": {"path": "unused"}, "task": {"type": "sequence_classification", "hub": hub}}
        return load_finetune_config(cfg).task

    splits, labels = load_task(task(None))
    assert labels == ["negative", "positive"] and splits["dev"].labels == ["negative", "positive"] * 2
    with pytest.raises(TwinLMError, match=r"test split has label id -1 .*set task.hub.test_split to null"):
        load_task(task("test"))


def test_a_run_on_a_used_output_dir_leaves_nothing_of_the_earlier_run_beside_its_own(
    mlm_ckpt, sentiment, tmp_path, monkeypatch, capsys
):
    """A second fine-tuning run into an output_dir replaces the first's best/ and metrics.json as it starts:
    one that fails before its first evaluation leaves neither (not the first run's model as if it were its
    best), and one stopped before it has no best model, and says so."""
    from twinlm.finetune import finetune

    out = tmp_path / "run"
    config = seq_config(mlm_ckpt, sentiment, out, max_steps=2, eval_every=2, baseline=False)
    assert finetune(config)["best"]["step"] == 2 and (out / "best").is_dir()

    inject_nan_at(monkeypatch, 1)  # the second run fails at its first step, before any evaluation
    with pytest.raises(TwinLMError, match="non-finite loss"):
        finetune(config, ["training.lr=0.01"])
    assert "replacing an earlier run's best and metrics.json" in capsys.readouterr().out
    assert not (out / "best").exists() and not (out / "metrics.json").exists()

    monkeypatch.undo()
    import signal

    from twinlm.training.engine import Engine

    original = Engine.forward_backward_step

    def interrupted(self, *args):
        if self.state.step == 0:
            os.kill(
                os.getpid(), signal.SIGINT
            )  # a Ctrl-C during step 1, before the first evaluation (step 2)
        return original(self, *args)

    monkeypatch.setattr(Engine, "forward_backward_step", interrupted)
    summary = finetune(config)
    assert summary["interrupted_by"] == "SIGINT" and summary["steps"] == 1
    assert summary["best"] is None and summary["best_model"] is None
    assert json.loads((out / "metrics.json").read_text())["best_model"] is None
    assert "best model  none" in capsys.readouterr().out and not (out / "best").exists()


def test_a_word_without_sub_tokens_does_not_shift_the_tags_after_it(mlm_ckpt):
    """Token classification scores each word by its first sub-token's prediction. A word the tokenizer's
    normaliser drops whole (a soft hyphen, a zero-width space) has none: the predictions after it went to
    the word before their own, and even a perfect tagger scored below 1."""
    from types import SimpleNamespace

    import torch
    from torch.utils.data import DataLoader

    from twinlm.finetune.data import Split, encode_split, make_collator
    from twinlm.finetune.loop import evaluate
    from twinlm.tokenization import auto_tokenizer

    tokenizer = auto_tokenizer(mlm_ckpt)
    words = [["paris", "\xad", "john", "smith"], ["john", "\u200b", "\xad", "paris"]]
    tags = [["B-LOC", "O", "B-PER", "I-PER"], ["B-PER", "O", "O", "B-LOC"]]
    split = Split("test", "memory", words=words, tags=tags)
    id2label = dict(enumerate(["B-LOC", "B-PER", "I-PER", "O"]))
    label2id = {v: k for k, v in id2label.items()}
    encoded = encode_split(split, tokenizer, label2id, 32, "token_classification")
    assert encoded.word_index == [[0, 2, 3], [0, 3]]  # the dropped words have no labelled position

    gold = {}  # a perfect tagger: each word's first token id -> its tag
    for sentence, sentence_tags in zip(words, tags, strict=True):
        for word, tag in zip(sentence, sentence_tags, strict=True):
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if ids:
                gold[ids[0]] = label2id[tag]

    class Perfect(torch.nn.Module):
        def forward(self, input_ids, **_):
            labels = [[gold.get(t, label2id["O"]) for t in row] for row in input_ids.tolist()]
            return SimpleNamespace(
                logits=torch.nn.functional.one_hot(torch.tensor(labels), len(id2label)).float()
            )

    loader = DataLoader(encoded, batch_size=2, collate_fn=make_collator(tokenizer, "token_classification"))
    scores = evaluate(Perfect(), loader, split, None, id2label, "token_classification", encoded.word_index)
    assert scores["f1"] == 1.0, scores


def test_a_hub_task_can_be_pinned_to_a_revision_and_evaluate_says_when_it_is_not(monkeypatch, capsys):
    """task.hub.revision reaches datasets.load_dataset (and so the evaluate cells' fingerprints, which hold the
    resolved config); an evaluation of an unpinned Hub task says its finished cells would outlive an upstream
    change of the dataset."""
    from types import SimpleNamespace

    import datasets

    from twinlm.evaluation import _say_unpinned_hub_tasks
    from twinlm.finetune.config import load_finetune_config
    from twinlm.finetune.data import load_task

    asked = []

    def load_dataset(name, config=None, split=None, revision=None):
        asked.append((name, split, revision))
        raise FileNotFoundError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = {"name": "nyu-mll/glue", "config": "sst2", "revision": "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c"}
    cfg = load_finetune_config(
        {"model": {"path": "unused"}, "task": {"type": "sequence_classification", "hub": hub}}
    )
    with pytest.raises(TwinLMError, match=r"nyu-mll/glue/sst2 \[train\] @ bcdcba79"):
        load_task(cfg.task)
    assert asked == [("nyu-mll/glue", "train", hub["revision"])]

    pinned = SimpleNamespace(task="sst2", cfg=cfg)
    unpinned = SimpleNamespace(task="glue", cfg=load_finetune_config(cfg, ["task.hub.revision=null"]))
    _say_unpinned_hub_tasks([pinned, unpinned, unpinned])
    said = capsys.readouterr().out
    assert (
        said.count("note: task") == 1
        and "task 'glue' reads the Hub dataset nyu-mll/glue at no pinned" in said
    )


def test_bpe_token_classification_sees_the_words_as_running_text(tmp_path):
    """A byte-level BPE tokenizer given words (is_split_into_words) joins them with no space: ["the", "cat"]
    became "thecat", text a causal checkpoint never saw in pretraining. Each word after the first now has its
    space: the ids are those of the running text, and every word keeps its own first token."""
    from twinlm.finetune.data import Split, encode_split
    from twinlm.tokenization import auto_tokenizer

    tokenizer = auto_tokenizer(build_checkpoint(tmp_path / "clm", kind="bpe"))
    words = ["the", "film", "was", "shot", "in", "Paris"]
    split = Split("dev", "memory", words=[words], tags=[["O"] * 5 + ["B-LOC"]])
    encoded = encode_split(split, tokenizer, {"O": 0, "B-LOC": 1}, 64, "token_classification")
    running = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    ids = [i for i in encoded[0]["input_ids"] if i not in tokenizer.all_special_ids]
    assert ids == running and encoded.word_index == [list(range(6))]
