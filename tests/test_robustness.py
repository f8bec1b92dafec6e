"""No silently wrong results: the commands built on the engine (evaluate, ablate, attention-map, convert,
the tokenizer) stop, go stale and validate like the engine does, and resources that run out are one line.

Built the way the engine's fault tests are: real signals sent to real processes, a real small tmpfs (a
full disk, a read-only one), a real address-space limit, files rewritten between runs, and the shipped
bad-input corpus (tests/bad_inputs.yaml) run through the command line.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_finetune import FILLER, build_checkpoint, write_sentiment

from twinlm.errors import TwinLMError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# ------------------------------------------------------------------------------------------------
# Assets: a tiny pretraining config, a checkpoint and damaged copies, a suite, questions
# ------------------------------------------------------------------------------------------------
def _text(path: Path, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(FILLER) for _ in range(12)) + "." for _ in range(words // 12)]
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _run_config(root: Path, max_steps: int = 8, **training: object) -> dict:
    return {
        "model": {
            "preset": "tiny-modern-decoder",
            "overrides": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
        },
        "tokenizer": {"path": str(root / "bpe")},
        "data": {
            "sources": [str(root / "corpus.txt")],
            "seq_len": 32,
            "validation_size": 10,
            "cache_dir": str(root / "cache"),
            "num_proc": 1,
        },
        "training": {
            "batch_size": 4,
            "max_steps": max_steps,
            "lr": 3e-3,
            "log_every": 10,
            "eval_batches": 2,
            **training,
        },
        "logging": {"report_to": "none"},
    }


def _question(root: Path, name: str, variants: dict, max_steps: int = 8, **extra: object) -> Path:
    path = root / f"{name}.yaml"
    question = {
        "question": f"{name}?",
        "textbook": "either",
        "base": {"config": str(root / "run.yaml"), "overrides": {"training.max_steps": max_steps}},
        "variants": variants,
        "seeds": [0, 1],
        **extra,
    }
    path.write_text(yaml.safe_dump(question))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import shutil

    import torch

    from twinlm.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("robust")
    _text(root / "corpus.txt", 12_000)
    train_tokenizer(
        "bpe", files=[root / "corpus.txt"], vocab_size=300, out_dir=root / "bpe", show_progress=False
    )
    (root / "run.yaml").write_text(yaml.safe_dump(_run_config(root)))
    ckpt = build_checkpoint(root / "ckpt")
    shutil.copytree(ckpt, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(ckpt, root / "noweights")
    (root / "noweights" / "model.safetensors").unlink()
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    _bert_checkpoint(root)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "tmp").mkdir()
    # a fine-tuning task, and a suite of two tasks split from one labelled file
    data = write_sentiment(root / "data", n_train=80, n_eval=20)
    rows = [line for s in ("train", "dev", "test") for line in data[s].read_text().splitlines()[1:]]
    (root / "all.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    task = {
        "model": {"path": str(ckpt)},
        "task": {"type": "sequence_classification", "train": str(data["train"]), "dev": str(data["dev"])},
        "training": {"batch_size": 16, "max_steps": 4, "eval_every": 2, "max_length": 32},
        "logging": {"report_to": "none"},
    }
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    split = {"files": [str(root / "all.tsv")], "text_column": "sentence", "label_column": "label"}
    suite = {
        "seeds": [0],
        "tasks": {
            "first": {"config": str(root / "task.yaml"), "split_from": split},
            "second": {"config": str(root / "task.yaml"), "split_from": {**split, "seed": 1}},
        },
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    (root / "suite_notasks.yaml").write_text(yaml.safe_dump({"seeds": [0], "tasks": {}}))
    (root / "suite_notest.yaml").write_text(
        yaml.safe_dump({"tasks": {"first": {"config": str(root / "task.yaml")}}})
    )
    _question(root, "question", {"a": {}, "b": {"model.overrides.num_hidden_layers": 2}})
    _question(root, "bad_name", {"a": {}, "../escape": {}})
    _question(root, "bad_variant", {"a": {}, "last": {"model": {"overrides": {"hiden_size": 64}}}})
    _question(root, "bad_measure", {"a": {}, "b": {}}, measures=[{"name": "downstream"}])
    _question(root, "bad_data", {"a": {}, "b": {"data.sources": [str(root / "missing.txt")]}})
    cost = {"name": "cost", "params": {"sweep": "num_attention_heads", "values": [2, 3]}}
    _question(root, "bad_cost", {"a": {}, "b": {}}, measures=[cost])
    generation = {"name": "generation", "params": {"new_tokens": 4}}
    _question(
        root, "gen_encoder", {"a": {}, "b": {"model.overrides.is_causal": False}}, measures=[generation]
    )
    downstream = {"name": "downstream", "params": {"suite": str(root / "suite_notest.yaml")}}
    _question(root, "bad_downstream", {"a": {}, "b": {}}, measures=[downstream])
    (root / "other").mkdir()
    shutil.copy(root / "question.yaml", root / "other" / "question.yaml")
    # damaged in ways that only loading shows
    shutil.copytree(ckpt, root / "wrongkeys")
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(1)}, root / "wrongkeys" / "model.safetensors")
    shutil.copytree(ckpt, root / "badtok")
    (root / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    (root / "withdir" / "results.json").mkdir(parents=True)
    shutil.copytree(root / "bert_checkpoint", root / "bert_badtype")
    config = json.loads((root / "bert_badtype" / "config.json").read_text())
    (root / "bert_badtype" / "config.json").write_text(json.dumps({**config, "num_attention_heads": "two"}))
    bad_names = yaml.safe_load((root / "suite.yaml").read_text())
    bad_names["tasks"] = {"../escape": bad_names["tasks"]["first"]}
    (root / "suite_badname.yaml").write_text(yaml.safe_dump(bad_names))
    return {p.stem: p for p in root.iterdir()} | {
        "root": root,
        "question_copy": root / "other" / "question.yaml",
    }


def _bert_checkpoint(root: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(root / "bert_checkpoint")
    import shutil

    shutil.copytree(root / "bert_checkpoint", root / "bert_truncated")
    weights = root / "bert_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


# ------------------------------------------------------------------------------------------------
# The bad-input corpus: one line, exit 2, no traceback, for every case
# ------------------------------------------------------------------------------------------------
CASES = yaml.safe_load((TESTS / "bad_inputs.yaml").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_bad_input_corpus_is_one_line_each(case, assets, capsys, monkeypatch):
    from twinlm.cli import main

    monkeypatch.chdir(REPO)

    def fill(arg: str) -> str:  # {name} -> the asset's path; other braces (YAML values) stay
        return re.sub(r"\{(\w+)\}", lambda m: str(assets.get(m.group(1), m.group(0))), arg)

    argv = [fill(arg) for arg in case["argv"]]
    capsys.readouterr()
    code = main(argv)  # an exception escaping here would be a traceback: the test fails on it
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("twinlm")]
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1 and "\n" not in lines[0], err[-2000:]
    assert re.search(case["error"], lines[0]), lines[0]


def test_the_corpus_through_the_real_command_line(assets):
    """Two cases as real processes: the exit status and stderr a shell sees (no traceback printed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (
        ["attention-map", str(assets["truncated"]), "some text"],
        ["pretrain", "--config", str(assets["run"]), "model.overrides.hidden_size=abc"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "twinlm.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# One override semantics: a mapping sets the fields it names, in every command
# ------------------------------------------------------------------------------------------------
def test_a_nested_override_sets_one_field_in_every_command(assets, tmp_path):
    from twinlm.ablation import load_ablation, run_config
    from twinlm.evaluation import cell_config, load_suite
    from twinlm.finetune.config import load_finetune_config
    from twinlm.tokenization import TokenizerTrainConfig
    from twinlm.training.config import load_run_config

    # pretrain: the command line, a mapping as the value; an empty mapping names no field: no change
    run = load_run_config(assets["run"], ["training={max_steps: 3}"])
    assert run.training.max_steps == 3 and run.training.lr == 3e-3 and run.training.batch_size == 4
    same = load_run_config(assets["run"], ["training={}", "model.overrides={}"])
    assert same.training.max_steps == 8 and same.model.overrides["hidden_size"] == 32
    # a field spelled dotted in a YAML mapping is found by a nested override, and the reverse: the last wins
    from twinlm.config import apply_overrides, flatten_overrides

    mixed = {"overrides": {"training": {"lr": 1e-3}, "training.max_steps": 8}}
    apply_overrides(mixed, [("overrides.training.max_steps", 16), ("overrides", {"training": {"lr": 2e-3}})])
    assert dict(flatten_overrides(mixed["overrides"])) == {"training.lr": 2e-3, "training.max_steps": 16}
    # finetune
    ft = load_finetune_config(assets["task"], ["training={lr: 0.5}"])
    assert ft.training.lr == 0.5 and ft.training.max_length == 32 and ft.training.batch_size == 16
    # evaluate: a suite's overrides as a nested YAML mapping
    suite = load_suite(assets["suite"], ["overrides={training: {epochs: 2}}"])
    cfg = cell_config(str(assets["ckpt"]), suite.tasks["first"], suite.overrides, tmp_path)
    assert cfg.training.epochs == 2 and cfg.training.max_length == 32 and cfg.training.max_steps == 4
    # ablate: base.overrides.training.max_steps from the command line keeps the base's training section
    question = load_ablation(assets["question"], ["base.overrides.training.max_steps=4"])
    resolved = run_config(question, "b", 0)
    assert resolved.training.max_steps == 4 and resolved.training.lr == 3e-3
    assert (
        resolved.model.overrides["num_hidden_layers"] == 2 and resolved.model.overrides["hidden_size"] == 32
    )
    # tokenizer train: a YAML config with overrides
    tok = tmp_path / "tok.yaml"
    tok.write_text(yaml.safe_dump({"type": "bpe", "vocab_size": 300, "min_frequency": 3, "out": "x"}))
    assert TokenizerTrainConfig.from_yaml(tok, ["vocab_size=400"]).min_frequency == 3


# ------------------------------------------------------------------------------------------------
# Everything checked before the first run trains
# ------------------------------------------------------------------------------------------------
def test_evaluate_and_ablate_check_everything_before_the_first_run(assets, tmp_path, monkeypatch):
    import twinlm.finetune
    import twinlm.training
    from twinlm.ablation import run_ablation
    from twinlm.evaluation import evaluate_checkpoints

    def never(*args, **kwargs):
        raise AssertionError("a run started before the mistake was found")

    monkeypatch.setattr(twinlm.finetune, "finetune", never)
    monkeypatch.setattr(twinlm.training, "pretrain", never)
    with pytest.raises(TwinLMError, match="tasks.second"):
        evaluate_checkpoints(
            [str(assets["ckpt"])], assets["suite"], tmp_path / "e", ["tasks.second.overrides.training.lrr=1"]
        )
    with pytest.raises(TwinLMError, match="variant 'last'"):
        run_ablation(assets["bad_variant"], tmp_path / "a")


# ------------------------------------------------------------------------------------------------
# Fingerprints: a changed input makes a result stale
# ------------------------------------------------------------------------------------------------
def _fake_pretrain(calls: list):
    def pretrain(cfg, overrides=()):
        calls.append(cfg)
        out = Path(cfg.output_dir)
        (out / "final").mkdir(parents=True, exist_ok=True)
        summary = {"final_model": str(out / "final"), "val_loss": 5.0 - 0.01 * cfg.training.max_steps}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return pretrain


def test_ablate_reruns_a_run_whose_inputs_changed(assets, tmp_path, monkeypatch):
    import twinlm.training
    from twinlm.ablation import MEASURES, Measurement, run_ablation

    calls: list = []
    monkeypatch.setattr(twinlm.training, "pretrain", _fake_pretrain(calls))
    measured: list = []

    def count(run_dir, summary, params):
        measured.append(
            (json.loads((run_dir / "ablation_run.json").read_text())["variant"], tuple(params["factors"]))
        )
        return {"factors": len(params["factors"])}

    monkeypatch.setitem(MEASURES, "length", Measurement(count, MEASURES["length"].params))
    question = _question(
        tmp_path, "q", {"a": {}, "b": {"model.overrides.num_hidden_layers": 2}}, measures=[{"name": "length"}]
    )
    (tmp_path / "run.yaml").write_text(assets["run"].read_text())
    out = tmp_path / "out"
    first = run_ablation(question, out)
    assert len(calls) == 4 and len(measured) == 4
    run_ablation(question, out)  # nothing changed: every run and measurement is read back
    assert len(calls) == 4 and len(measured) == 4
    # the budget changed: every run is stale
    again = run_ablation(question, out, overrides=["base.overrides.training.max_steps=16"])
    assert len(calls) == 8 and {c.training.max_steps for c in calls[4:]} == {16}
    assert again["table"]["a"]["val_loss"]["mean"] != first["table"]["a"]["val_loss"]["mean"]
    # one variant's overrides changed: only its runs are stale
    changed = ["base.overrides.training.max_steps=16", "variants.b.model.overrides.num_hidden_layers=3"]
    run_ablation(question, out, overrides=changed)
    assert len(calls) == 10 and {c.model.overrides["num_hidden_layers"] for c in calls[8:]} == {3}
    # a measure's parameters changed: measured again, not trained again
    run_ablation(question, out, overrides=[*changed, "measures=[{name: length, params: {factors: [1, 8]}}]"])
    assert len(calls) == 10 and measured[-4:] == [(v, (1, 8)) for v in ("a", "a", "b", "b")]
    # a data file rewritten: every run is stale
    _text(assets["root"] / "corpus.txt", 12_000, seed=1)
    try:
        run_ablation(
            question, out, overrides=[*changed, "measures=[{name: length, params: {factors: [1, 8]}}]"]
        )
    finally:
        _text(assets["root"] / "corpus.txt", 12_000)
    assert len(calls) == 14
    # a preset file that gives the same model is the same run; rewritten (same name, another norm): stale
    preset = tmp_path / "preset.yaml"
    preset.write_text("extends: tiny-modern-decoder\n")
    with_preset = [*changed, f"base.overrides.model.preset={preset}"]
    run_ablation(question, out, overrides=with_preset)
    assert len(calls) == 14
    preset.write_text("extends: tiny-modern-decoder\nnorm_type: layernorm\n")
    run_ablation(question, out, overrides=with_preset)
    assert len(calls) == 18 and {c.model.preset for c in calls[14:]} == {str(preset)}
    # a measure that asks its own command (downstream: evaluate keeps its finished cells) runs every time
    asked: list = []
    monkeypatch.setitem(
        MEASURES,
        "length",
        Measurement(lambda *a: asked.append(1) or {}, MEASURES["length"].params, cached=False),
    )
    run_ablation(question, out, overrides=with_preset)
    run_ablation(question, out, overrides=with_preset)
    assert len(calls) == 18 and len(asked) == 8


def test_evaluate_follows_a_retrained_checkpoint_and_rewritten_task_files(assets, tmp_path, monkeypatch):
    import twinlm.finetune
    from twinlm.evaluation import evaluate_checkpoints

    seen: list = []

    def fake_finetune(cfg, overrides=()):
        hidden = json.loads((Path(cfg.model.path) / "config.json").read_text())["hidden_size"]
        seen.append((cfg.model.path, hidden, cfg.task.train))
        return {"metric_for_best": "accuracy", "best": {"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(twinlm.finetune, "finetune", fake_finetune)
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(assets["ckpt"], ckpt)
    suite = tmp_path / "suite.yaml"
    single = yaml.safe_load(assets["suite"].read_text())
    single["tasks"] = {"first": single["tasks"]["first"]}
    single["tasks"]["first"]["split_from"]["files"] = [str(tmp_path / "all.tsv")]
    suite.write_text(yaml.safe_dump(single))
    shutil.copy(assets["all"], tmp_path / "all.tsv")
    out = tmp_path / "out"
    hidden = json.loads((ckpt / "config.json").read_text())["hidden_size"]
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 2 and {h for _, h, _ in seen} == {hidden}  # the checkpoint and its control
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 2  # unchanged: read back
    # the checkpoint is retrained at the same path with another shape: the control follows it
    shutil.rmtree(ckpt)
    build_checkpoint(ckpt, hidden_size=2 * hidden)
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 4 and {h for _, h, _ in seen[2:]} == {2 * hidden}
    control = json.loads((out / "controls" / "ckpt-seed0" / "config.json").read_text())
    assert control["hidden_size"] == 2 * hidden
    # the source file of the split is rewritten: split again, both cells rerun
    (tmp_path / "all.tsv").write_text(assets["all"].read_text().replace("excellent", "superb"))
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 6
    assert "superb" in (out / "data" / "first" / "train.tsv").read_text()
    # a file named inside a task config (not split by the suite) is rewritten: its cells rerun
    task = yaml.safe_load(assets["task"].read_text())
    train = tmp_path / "train.tsv"
    shutil.copy(task["task"]["train"], train)
    task["task"].update(train=str(train), test=task["task"]["dev"])
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    suite.write_text(
        yaml.safe_dump({"seeds": [0], "tasks": {"own": {"config": str(tmp_path / "task.yaml")}}})
    )
    evaluate_checkpoints([str(ckpt)], suite, out)
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 8
    train.write_text(train.read_text() + "one more excellent house\tpos\n")
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 10
    # a separate tokenizer named in the task config is rewritten: its cells rerun
    shutil.copytree(ckpt, tmp_path / "tok", ignore=shutil.ignore_patterns("*.safetensors"))
    task["model"]["tokenizer"] = str(tmp_path / "tok")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    evaluate_checkpoints([str(ckpt)], suite, out)
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 12
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 31}))
    evaluate_checkpoints([str(ckpt)], suite, out)
    assert len(seen) == 14
    # an evaluation kept inside the checkpoint's own folder does not change the checkpoint's identity
    inside = ckpt / "eval"
    evaluate_checkpoints([str(ckpt)], suite, inside)
    evaluate_checkpoints([str(ckpt)], suite, inside)
    assert len(seen) == 16


# ------------------------------------------------------------------------------------------------
# Signals: the whole command stops, finished work is kept, the same command goes on
# ------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    }


def _signal_when(
    argv: list[str], appears: Path, signum: int, timeout: float = 180.0
) -> subprocess.CompletedProcess:
    """Run `twinlm ARGV`; send `signum` once `appears` exists; wait for the exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "twinlm.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    deadline = time.monotonic() + timeout
    while not appears.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"{appears} never appeared (exit {process.returncode}): {err[-3000:]}")
        time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


@pytest.mark.slow
def test_sigterm_stops_the_whole_ablation_and_the_same_command_goes_on(assets, tmp_path):
    from twinlm.ablation import load_ablation, plan_runs

    question = _question(tmp_path, "q", {"a": {}, "b": {"training.lr": 1.0e-3}}, max_steps=300)
    (tmp_path / "run.yaml").write_text(assets["run"].read_text())
    out = tmp_path / "out"
    runs = {(r.variant, r.seed): r.run_dir for r in plan_runs(load_ablation(question), out / "runs")}
    argv = ["ablate", str(question), "--out", str(out)]
    # a/seed0 has finished when a/seed1 logs its first line: the signal lands in a/seed1's training
    stopped = _signal_when(argv, runs["a", 1] / "metrics.jsonl", signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "interrupted by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    finished = runs["a", 0] / "summary.json"
    kept = json.loads(finished.read_text())
    assert kept["final_model"] and kept["steps"] == 300
    partial = json.loads((runs["a", 1] / "summary.json").read_text())
    assert partial["interrupted_by"] == "SIGTERM" and partial["final_model"] is None
    assert not runs["b", 0].exists() and not runs["b", 1].exists()  # the other runs did not train on
    mtime = finished.stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "twinlm.cli", *argv], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished.stat().st_mtime_ns == mtime  # the finished run was not trained again
    assert f"resumed from {runs['a', 1] / 'checkpoints'}" in done.stdout
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 4
    assert json.loads((runs["a", 1] / "summary.json").read_text())["steps"] == 300


@pytest.mark.slow
def test_sigint_stops_the_whole_evaluation_and_the_same_command_goes_on(assets, tmp_path):
    suite = yaml.safe_load(assets["suite"].read_text())
    suite["seeds"] = [0, 1]
    suite["control"] = False
    suite["overrides"] = {"training.max_steps": 300, "training.eval_every": 100}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    argv = ["evaluate", str(assets["ckpt"]), "--suite", str(tmp_path / "suite.yaml"), "--out", str(out)]
    cells = out / "runs" / "ckpt" / "first"
    stopped = _signal_when(argv, cells / "lrNone-seed1" / "run", signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "interrupted by SIGINT" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (out / "report.md").exists() and not (out / "results.json").exists()
    finished = cells / "lrNone-seed0" / "cell.json"
    assert finished.is_file() and not (cells / "lrNone-seed1" / "cell.json").exists()
    assert not (out / "runs" / "ckpt" / "second").exists()  # the next task did not start
    mtime = finished.stat().st_mtime_ns
    done = subprocess.run(
        [sys.executable, "-m", "twinlm.cli", *argv], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished.stat().st_mtime_ns == mtime  # the finished cell was not run again
    report = json.loads((out / "results.json").read_text())
    assert len(report["models"][0]["tasks"]["first"]["test"]) == 2


# ------------------------------------------------------------------------------------------------
# Resources: a real full disk, a read-only folder, an allocation that fails
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """mount(size_kb, read_only=False) -> a fresh tmpfs of that size (needs root, as CI has)."""
    mounted: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs for a real full disk (needs root): {done.stderr.strip()}"
            )
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".old"))


# tmpfs sizes that fill up at different saves of a tiny run: the tokenizer, the first checkpoint, the
# final export (checkpoints of ~0.23 MB each at steps 2 and 4, then the ~0.1 MB model)
@pytest.mark.parametrize(
    ("size_kb", "what"),
    [(8, "writing the tokenizer"), (100, "saving checkpoint-2"), (700, "writing the exported model")],
)
def test_a_full_disk_in_pretraining_is_one_line_and_leaves_no_tmp(assets, small_disk, size_kb, what, capsys):
    from twinlm.cli import main

    disk = small_disk(size_kb)
    run = _run_config(assets["root"], max_steps=4, save_every=2)
    run["tokenizer"] = {"train": {"type": "bpe", "vocab_size": 300}}
    config = disk.parent / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    code = main(["pretrain", "--config", str(config), f"output_dir={disk / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("twinlm")]
    assert len(lines) == 1 and "the disk is full" in lines[0] and what in lines[0], err[-2000:]
    assert _leftovers(disk) == []


def test_a_full_disk_in_evaluate_and_ablate_is_one_line_and_leaves_no_tmp(assets, small_disk, capsys):
    from twinlm.cli import main

    disk = small_disk(200)
    code = main(["evaluate", str(assets["ckpt"]), "--suite", str(assets["suite"]), "--out", str(disk / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "the disk is full" in err, err[-2000:]
    assert _leftovers(disk) == []
    disk = small_disk(300)
    code = main(["ablate", str(assets["question"]), "--out", str(disk / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "the disk is full" in err, err[-2000:]
    assert _leftovers(disk) == []


def test_a_read_only_folder_is_one_line_for_every_command(assets, small_disk, capsys, monkeypatch):
    from twinlm.cli import main

    monkeypatch.chdir(REPO)
    disk = small_disk(100, read_only=True)
    commands = [
        ["pretrain", "--config", str(assets["run"]), f"output_dir={disk / 'run'}"],
        ["finetune", "--config", str(assets["task"]), f"output_dir={disk / 'ft'}"],
        ["evaluate", str(assets["ckpt"]), "--suite", str(assets["suite"]), "--out", str(disk / "e")],
        ["ablate", str(assets["question"]), "--out", str(disk / "a")],
        [
            "tokenizer",
            "train",
            "--type",
            "bpe",
            "--vocab-size",
            "300",
            "--out",
            str(disk / "t"),
            str(assets["corpus"]),
        ],
        ["attention-map", str(assets["ckpt"]), "some text", "--out", str(disk / "map.png")],
        ["convert", str(assets["bert_checkpoint"]), str(disk / "converted")],
    ]
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, f"{argv[0]}: {err[-2000:]}"
        assert "read-only" in err, f"{argv[0]}: {err[-2000:]}"


@pytest.mark.slow
def test_running_out_of_memory_in_a_training_step_is_one_line(assets, tmp_path):
    """A real failed allocation (the address space limited to 3 GiB): one line, exit 2."""
    import resource

    _text(tmp_path / "corpus.txt", 160_000)
    run = _run_config(assets["root"], max_steps=2, batch_size=256)
    run["data"].update(sources=[str(tmp_path / "corpus.txt")], seq_len=256, cache_dir=str(tmp_path / "cache"))
    run["model"]["overrides"].update(hidden_size=512, intermediate_size=2048, max_position_embeddings=256)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, resource.RLIM_INFINITY))

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinlm.cli",
            "pretrain",
            "--config",
            str(config),
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        preexec_fn=limit,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "out of memory in training step 1 (micro-batches of 256 x 256 tokens" in done.stderr


def _fill(disk: Path) -> None:
    """Write a filler file until the (real) disk is full."""
    with (disk / "filler").open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


def test_reports_on_a_full_disk_keep_the_old_file_and_leave_no_tmp(small_disk):
    from twinlm.ablation import write_index
    from twinlm.evaluation import plot_results
    from twinlm.fileio import atomic_file, write_json_atomic

    disk = small_disk(64)
    (disk / "results.json").write_text('{"old": true}')
    (disk / "README.md").write_text("old index\n")
    _fill(disk)
    with pytest.raises(TwinLMError, match=r"writing the results to .*results.json failed: the disk is full"):
        write_json_atomic(disk / "results.json", {"new": "x" * 100_000}, "the results")
    result = {"question": "q?", "answer": {"text": "a" * 50_000, "claims": []}}
    with pytest.raises(TwinLMError, match="writing the index .* the disk is full"):
        write_index({"q": result}, {"q": 1.0}, disk)
    report = {
        "models": [{"label": "m", "tasks": {"t": {"mean": 0.5, "std": 0.1}}}],
        "baselines": {"t": {"test": 0.4}},
    }
    with pytest.raises(TwinLMError, match="writing the plot .* the disk is full"):
        with atomic_file(disk / "results.png", "the plot") as tmp:
            plot_results(report, tmp)
    assert json.loads((disk / "results.json").read_text()) == {"old": True}
    assert (disk / "README.md").read_text() == "old index\n"
    assert _leftovers(disk) == [] and sorted(p.name for p in disk.iterdir()) == [
        "README.md",
        "filler",
        "results.json",
    ]
