"""`twinlm evaluate`: checkpoint vs its from-scratch control vs the baseline, seeds, lr on dev, resume."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from test_finetune import build_checkpoint, write_sentiment

from twinlm.errors import TwinLMError


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint, one task shipped as a single TSV (split by the suite), and a suite file."""
    root = tmp_path_factory.mktemp("evaluate")
    build_checkpoint(root / "ckpt")
    data = write_sentiment(root / "data", n_train=120, n_eval=40)
    # one file with a header, as SMS spam ships: the suite splits it into train/dev/test
    rows = [line for split in ("train", "dev", "test") for line in data[split].read_text().splitlines()[1:]]
    (root / "all.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    task = {
        "model": {"path": "unused"},
        "task": {"type": "sequence_classification"},
        "training": {
            "batch_size": 16,
            "max_steps": 40,
            "eval_every": 20,
            "max_length": 32,
            "warmup_ratio": 0.1,
        },
        "logging": {"report_to": "none"},
    }
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    suite = {
        "seeds": [0, 1],
        "lrs": [1.0e-4, 3.0e-3],
        "tasks": {
            "sentiment": {
                "config": str(root / "task.yaml"),
                "split_from": {
                    "files": [str(root / "all.tsv")],
                    "text_column": "sentence",
                    "label_column": "label",
                },
            }
        },
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root


def _split(suite_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The suite's task split into train/dev/test files (what evaluate does before the first cell)."""
    from twinlm.evaluation import load_suite, prepare_split

    spec = load_suite(suite_dir / "suite.yaml").tasks["sentiment"]
    return prepare_split("sentiment", spec.split_from, tmp_path / "split")


def test_checkpoint_control_baseline_report_and_resume(suite_dir, monkeypatch):
    from twinlm.evaluation import evaluate_checkpoints

    out = suite_dir / "out"
    report = evaluate_checkpoints([str(suite_dir / "ckpt")], suite_dir / "suite.yaml", out)
    labels = [m["label"] for m in report["models"]]
    assert labels == ["ckpt", "ckpt (control)"]
    # the suite split the single file 80/10/10 into three disjoint parts
    parts = [
        (out / "data" / "sentiment" / f"{s}.tsv").read_text().splitlines()[1:]
        for s in ("train", "dev", "test")
    ]
    assert [len(p) for p in parts] == [160, 20, 20] and not set(parts[0]) & set(parts[2])
    # the control is the same architecture with other (random) weights
    control = out / "controls" / "ckpt-seed0"
    assert (
        json.loads((control / "config.json").read_text())["hidden_size"]
        == json.loads((suite_dir / "ckpt" / "config.json").read_text())["hidden_size"]
    )
    for model in report["models"]:
        task = model["tasks"]["sentiment"]
        assert len(task["test"]) == 2 and all(0.0 <= v <= 1.0 for v in task["test"])
        # the learning rate is the one with the best mean dev score, never chosen on test
        folder = out / "runs" / model["label"].replace(" ", "_").replace("(", "_").replace(")", "").strip("_")
        dev = {
            lr: statistics.fmean(
                json.loads((folder / "sentiment" / f"lr{lr}-seed{s}" / "cell.json").read_text())["dev"][
                    "accuracy"
                ]
                for s in (0, 1)
            )
            for lr in (1.0e-4, 3.0e-3)
        }
        assert dev[task["lr"]] == max(dev.values())
    assert report["baselines"]["sentiment"]["name"] == "tfidf+logistic_regression"
    gain = report["gains"]["ckpt"]
    per_seed = [
        a - b
        for a, b in zip(
            report["models"][0]["average"]["per_seed"],
            report["models"][1]["average"]["per_seed"],
            strict=True,
        )
    ]
    assert gain["per_seed"] == pytest.approx(per_seed)
    text = (out / "report.md").read_text()
    assert "suite average" in text and "Pretraining gain of ckpt" in text and "baseline" in text
    assert (out / "results.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["gains"]["ckpt"]["mean"] == pytest.approx(
        gain["mean"]
    )

    # resumable: finished cells are read back, nothing is fine-tuned again
    import twinlm.finetune

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(twinlm.finetune, "finetune", no_training)
    again = evaluate_checkpoints([str(suite_dir / "ckpt")], suite_dir / "suite.yaml", out)
    assert again["gains"] == report["gains"]


def test_bad_suite_and_checkpoint_are_one_line_errors(suite_dir, tmp_path):
    from twinlm.evaluation import evaluate_checkpoints, load_suite

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": {"x": {"config": str(suite_dir / "task.yaml")}}, "sedes": [1]}))
    with pytest.raises(TwinLMError, match="sedes"):
        load_suite(bad)
    bad.write_text(yaml.safe_dump({"tasks": {"x": {"config": "nope.yaml"}}}))
    with pytest.raises(TwinLMError, match="tasks.x.config 'nope.yaml' does not exist"):
        load_suite(bad)
    with pytest.raises(TwinLMError, match="no config.json"):
        evaluate_checkpoints([str(tmp_path)], suite_dir / "suite.yaml", tmp_path / "out")


def test_shipped_suite_validates():
    from twinlm.evaluation import load_suite

    root = Path(__file__).resolve().parents[1]
    suite = load_suite(root / "configs" / "evaluate" / "default.yaml")
    assert set(suite.tasks) == {"sst2", "conll2003", "sms_spam", "uci_sentiment"} and len(suite.seeds) == 3


def test_suite_overrides_from_the_command_line(suite_dir):
    from twinlm.evaluation import load_suite

    suite = load_suite(suite_dir / "suite.yaml", ["seeds=[3]", "--lrs", "[1e-3]"])
    assert suite.seeds == [3] and suite.lrs == [1e-3]
    with pytest.raises(TwinLMError, match="did you mean 'seeds'"):
        load_suite(suite_dir / "suite.yaml", ["sedes=[1]"])


def test_changed_settings_rerun_a_cell_and_labels_stay_distinct(suite_dir, tmp_path, monkeypatch):
    from twinlm.evaluation import checkpoint_labels, load_suite, run_cell

    assert checkpoint_labels(["/a/x/final", "/b/x/final", "/c/y"]) == ["a/x", "b/x", "y"]
    assert checkpoint_labels(["/a/x/final", "/a/x/best"]) == ["a/x", "a/x-2"]
    # two labels that one folder name would serve (each model's runs and controls have their own folders)
    assert checkpoint_labels(["/p/a/x", "/p/b/x", "/p/a_x"]) == ["a/x", "b/x", "a_x-2"]
    spec = load_suite(suite_dir / "suite.yaml").tasks["sentiment"]
    split = _split(suite_dir, tmp_path)
    calls = []

    def fake_finetune(config, overrides=()):
        calls.append(config)
        return {"metric_for_best": "accuracy", "best": {"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}}

    import twinlm.finetune

    monkeypatch.setattr(twinlm.finetune, "finetune", fake_finetune)
    ckpt = str(suite_dir / "ckpt")
    run_cell(ckpt, "sentiment", spec, {**split, "training.lr": 0.1}, tmp_path / "cell")
    run_cell(
        ckpt, "sentiment", spec, {**split, "training.lr": 0.1}, tmp_path / "cell"
    )  # unchanged: read back
    assert len(calls) == 1 and calls[0].training.lr == 0.1
    run_cell(
        ckpt, "sentiment", spec, {**split, "training.lr": 0.2}, tmp_path / "cell"
    )  # other settings: again
    assert len(calls) == 2


def test_an_interrupted_fine_tune_stops_the_evaluation_and_is_not_a_finished_cell(
    suite_dir, tmp_path, monkeypatch
):
    from twinlm.evaluation import EvaluationInterrupted, load_suite, run_cell

    spec = load_suite(suite_dir / "suite.yaml").tasks["sentiment"]
    split = _split(suite_dir, tmp_path)
    result = {"metric_for_best": "accuracy", "best": {"dev": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}}

    def interrupted(config, overrides=()):  # what finetune() returns after SIGTERM: partial scores
        return {**result, "interrupted_by": "SIGTERM"}

    import twinlm.finetune

    monkeypatch.setattr(twinlm.finetune, "finetune", interrupted)
    ckpt, cell = str(suite_dir / "ckpt"), tmp_path / "cell"
    with pytest.raises(EvaluationInterrupted, match="SIGTERM.*run the same command again") as stopped:
        run_cell(ckpt, "sentiment", spec, split, cell)
    assert stopped.value.signum == 15  # the CLI exits 128 + 15
    assert not (cell / "cell.json").exists()
    monkeypatch.setattr(twinlm.finetune, "finetune", lambda config, overrides=(): result)
    assert run_cell(ckpt, "sentiment", spec, split, cell)["test"] == {"accuracy": 0.5}  # the rerun runs it


def test_two_checkpoints_are_compared_seed_by_seed_with_their_pretraining_time(
    suite_dir, tmp_path, monkeypatch
):
    """MLM vs RTD at equal wall-clock: the report says what each pretraining was, whether the training times
    match, and the second checkpoint against the first on the same seeds (fine-tuning faked: scores by name)."""
    import shutil

    import twinlm.finetune
    from twinlm.evaluation import evaluate_checkpoints

    score = {"mlm": 0.70, "rtd": 0.75}

    def fake_finetune(config, overrides=()):
        path, seed = config.model.path, config.training.seed
        value = 0.5 if "controls" in path else score[Path(path).parent.name] + 0.01 * seed
        return {
            "metric_for_best": "accuracy",
            "best": {"dev": {"accuracy": value}, "test": {"accuracy": value}},
        }

    monkeypatch.setattr(twinlm.finetune, "finetune", fake_finetune)
    checkpoints = []
    for name, objective, minutes in (("mlm", "masked-lm", 30.0), ("rtd", "replaced-token-detection", 30.4)):
        folder = tmp_path / name / "final"
        shutil.copytree(suite_dir / "ckpt", folder)
        summary = {"objective": objective, "train_seconds": 60 * minutes, "tokens_seen": 1000, "steps": 10}
        (folder / "training_info.json").write_text(json.dumps({"training_summary": summary}))
        checkpoints.append(str(folder))
    report = evaluate_checkpoints(checkpoints, suite_dir / "suite.yaml", tmp_path / "out", ["lrs=null"])
    assert report["pretraining"]["rtd"]["objective"] == "replaced-token-detection" and report["equal_time"]
    comparison = report["comparisons"]["rtd vs mlm"]
    assert comparison["mean"] == pytest.approx(0.05) and comparison["per_seed"] == pytest.approx([0.05, 0.05])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| rtd | replaced-token-detection | 30.4 |" in text and "an equal-wall-clock comparison" in text
    assert (
        "**rtd vs mlm** (the same seeds, suite average): +5 points (untested: the per-seed differences do not vary"
        in text
    )

    info = Path(checkpoints[1], "training_info.json")
    info.write_text(info.read_text().replace("1824.0", "2400.0"))  # 40 minutes against 30
    report = evaluate_checkpoints(checkpoints, suite_dir / "suite.yaml", tmp_path / "out", ["lrs=null"])
    assert report["equal_time"] is False
    assert "NOT an equal-wall-clock comparison" in (tmp_path / "out" / "report.md").read_text()


def test_a_shared_cells_cache_fine_tunes_a_control_once(suite_dir, tmp_path, monkeypatch):
    """Two evaluations of checkpoints with one architecture and tokenizer share their controls' cells."""
    import shutil

    from safetensors.torch import load_file, save_file

    import twinlm.finetune
    from twinlm.evaluation import evaluate_checkpoints

    runs: list[str] = []

    def fake_finetune(cfg, overrides=()):
        runs.append(cfg.model.path)
        return {"metric_for_best": "accuracy", "best": {"dev": {"accuracy": 0.6}, "test": {"accuracy": 0.6}}}

    monkeypatch.setattr(twinlm.finetune, "finetune", fake_finetune)
    other = tmp_path / "other"
    shutil.copytree(suite_dir / "ckpt", other)
    weights = load_file(other / "model.safetensors")
    save_file(
        {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "model.safetensors"
    )
    cache = tmp_path / "cells"
    evaluate_checkpoints(
        [str(suite_dir / "ckpt")], suite_dir / "suite.yaml", tmp_path / "e1", ["lrs=null"], cache
    )
    assert len(runs) == 4  # checkpoint and control, two seeds
    evaluate_checkpoints([str(other)], suite_dir / "suite.yaml", tmp_path / "e2", ["lrs=null"], cache)
    assert len(runs) == 6 and all("controls" not in path for path in runs[4:])  # only the new checkpoint ran


def test_noise_curves_score_every_model_on_perturbed_test_inputs(suite_dir, tmp_path):
    from twinlm.evaluation import evaluate_checkpoints
    from twinlm.finetune.data import Split
    from twinlm.noise import perturb_split

    split = Split("test", "t", texts=["the cat sees a dog", "a big red house"], labels=["pos", "neg"])
    noisy = perturb_split(split, "char", 1.0, 0, [])
    assert noisy.labels == split.labels and [len(t.split()) for t in noisy.texts] == [5, 4]
    assert all(a != b for a, b in zip(noisy.texts, split.texts, strict=True))
    assert perturb_split(split, "token", 1.0, 0, ["w"]).texts == ["w w w w w", "w w w w"]
    assert perturb_split(split, "char", 0.5, 3, []).texts == perturb_split(split, "char", 0.5, 3, []).texts
    tagged = Split("test", "t", words=[["john", "smith", "runs"]], tags=[["B-PER", "I-PER", "O"]])
    assert perturb_split(tagged, "char", 1.0, 0, []).tags == tagged.tags

    overrides = ["lrs=null", "seeds=[0]", "control=false", "noise={rates: [0.5], kinds: [char, token]}"]
    report = evaluate_checkpoints(
        [str(suite_dir / "ckpt")], suite_dir / "suite.yaml", tmp_path / "out", overrides
    )
    curve = report["models"][0]["noise"]["sentiment"]
    assert set(curve) == {"char_noise0.5", "token_noise0.5"} and all(0 <= v <= 1 for v in curve.values())
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Test inputs with noise" in text and "| sentiment | ckpt |" in text


@pytest.mark.slow
def test_cells_fine_tuned_in_worker_processes_score_as_in_one(suite_dir, tmp_path):
    """jobs=2: the cells still to run are fine-tuned two at a time in spawned processes. With one thread each,
    as the one-process run here has, every score is the same; the report says how long the cells took, and a
    second run reads every cell back."""
    import torch

    from twinlm.evaluation import evaluate_checkpoints

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers get max(1, 1 // 2) = 1 thread: the same arithmetic as here
    try:
        args = ([str(suite_dir / "ckpt")], suite_dir / "suite.yaml")
        one = evaluate_checkpoints(*args, tmp_path / "one", ["lrs=null"])
        two = evaluate_checkpoints(*args, tmp_path / "two", ["lrs=null", "jobs=2"])
        report = (tmp_path / "two" / "report.md").read_text()
        again = evaluate_checkpoints(*args, tmp_path / "two", ["lrs=null", "jobs=2"])
    finally:
        torch.set_num_threads(threads)
    assert [m["tasks"] for m in two["models"]] == [m["tasks"] for m in one["models"]]
    assert one["timing"]["jobs"] == 1 and two["timing"]["jobs"] == 2
    assert two["timing"]["cells"] == two["timing"]["cells_run"] == 4  # checkpoint and control, two seeds
    assert two["timing"]["fine_tuning_seconds"] > 0 and two["timing"]["wall_seconds"] > 0
    assert "4 of 4 cells fine-tuned (2 at a time" in report
    assert again["timing"]["cells_run"] == 0 and again["models"] == two["models"]
    assert (
        "0 of 4 cells fine-tuned (2 at a time, 0.0 minutes summed over them); 4 read back"
        in (tmp_path / "two" / "report.md").read_text()
    )


@pytest.mark.slow
def test_a_signal_stops_the_worker_processes_and_records_no_partial_cell(suite_dir, tmp_path):
    """SIGTERM to `twinlm evaluate ... jobs=2` while two cells fine-tune in their workers: the workers stop as a
    single run would, nothing partial is recorded as a cell, and the command exits 128 + 15 with one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    long = yaml.safe_load((suite_dir / "task.yaml").read_text())
    # it runs until it is stopped
    long["training"].update(max_steps=100_000, eval_every=0, early_stopping_patience=None)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(long))
    suite = yaml.safe_load((suite_dir / "suite.yaml").read_text())
    suite["tasks"]["sentiment"]["config"] = str(tmp_path / "task.yaml")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "twinlm", "evaluate", str(suite_dir / "ckpt"), "--suite",
               str(tmp_path / "suite.yaml"), "--out", str(out), "lrs=null", "jobs=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("runs/*/*/*/run"))) < 2:  # both workers are fine-tuning
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted by SIGTERM" in stderr and "run the same command again" in stderr
    assert "finetune:" not in stderr  # the workers draw no progress bars (the parent prints a line per cell)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert not list(out.glob("runs/**/cell.json"))  # no partial run became a finished cell


class _LargeResultCell:
    """A cell whose result is larger than a pipe holds: the worker's queue thread is still writing it (holding
    the queue's shared write lock) after the worker's loop has ended. It says when it returns by a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def run(self) -> dict:
        self.marker.write_text("returning")
        return {"blob": "x" * (8 << 20)}


def test_a_signal_does_not_kill_a_worker_while_its_last_message_is_being_written(tmp_path):
    """The evaluation's hang on SIGTERM (seen in CI): a worker killed half-way through writing its last message
    left the result queue's lock held, and the other worker and the parent waited on it forever. A worker now
    keeps its stop handlers until its messages are flushed: the signal only sets its flag, the parent reads
    the whole message, and the worker exits by itself."""
    import multiprocessing
    import time

    from twinlm.evaluation import _cell_worker

    context = multiprocessing.get_context("spawn")
    todo, done = context.Queue(), context.Queue()
    todo.put((0, _LargeResultCell(tmp_path / "marker")))
    todo.put(None)
    worker = context.Process(target=_cell_worker, args=(todo, done, 1))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "marker").exists():
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # the result is being written; the loop has ended (the next item was None)
        worker.terminate()  # SIGTERM
        time.sleep(1.0)
        assert worker.is_alive(), f"the worker was killed while writing (exit code {worker.exitcode})"
        index, result, error = done.get(timeout=60)
        assert (index, error) == (0, None) and len(result["blob"]) == 8 << 20
        worker.join(timeout=60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()
