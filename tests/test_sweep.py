"""`twinlm sweep`: trials pretrained then evaluated in order, a step budget taken from another trial, a shared
tokenizer, resume without rework, a refused changed trial, the smoke mode, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_training
import yaml
from test_finetune import write_sentiment

from twinlm.errors import TwinLMError

assets = test_training.assets  # the module-scoped fixture: corpus excerpt and tokenizers
pytestmark = test_training.needs_corpus


@pytest.fixture
def sweep_file(assets: dict[str, Path], tmp_path: Path) -> Path:
    """Two tiny masked-LM trials (the second with the first's step count) and a one-task, one-seed suite."""
    run = test_training.run_config(assets, tmp_path / "unused", causal=False, max_steps=3, save_every=0)
    run["tokenizer"] = {"train": {"type": "wordpiece", "vocab_size": 300}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    data = write_sentiment(tmp_path / "sentiment", n_train=48, n_eval=16)
    task = {
        "model": {"path": "unused"},
        "task": {"type": "sequence_classification", **{k: str(v) for k, v in data.items()}},
        "training": {"batch_size": 16, "max_steps": 3, "eval_every": 0, "max_length": 32},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    suite = {"seeds": [0], "tasks": {"sentiment": {"config": str(tmp_path / "task.yaml")}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    sweep = {
        "suite": str(tmp_path / "suite.yaml"),
        "out": str(tmp_path / "sweep"),
        "trials": [
            {"name": "a", "config": str(tmp_path / "run.yaml"), "note": "the base"},
            {
                "name": "b",
                "config": str(tmp_path / "run.yaml"),
                "overrides": {"training.lr": 1.0e-3, "training.max_minutes": 5},
                "steps_from": "a",
            },
        ],
        "compare": [["b", "a"]],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_a_sweep_runs_its_trials_shares_the_tokenizer_and_resumes(sweep_file: Path, monkeypatch) -> None:
    from twinlm.cli import main

    assert main(["sweep", str(sweep_file)]) == 0
    out = sweep_file.parent / "sweep"
    rows = json.loads((out / "sweep.json").read_text())["trials"]
    assert [r["trial"] for r in rows] == ["a", "b"] and rows[0]["steps"] == rows[1]["steps"] == 3
    run_b = yaml.safe_load((out / "b" / "pretrain" / "run_config.yaml").read_text())
    assert (
        run_b["training"]["max_minutes"] is None and run_b["training"]["lr"] == 1.0e-3
    )  # a's steps, no clock
    # one tokenizer, trained once before the first trial, read by both (not one retrained per trial)
    run_a = yaml.safe_load((out / "a" / "pretrain" / "run_config.yaml").read_text())
    shared = Path(run_b["tokenizer"]["path"])
    assert shared.parent == out / "tokenizers" and run_b["tokenizer"]["train"] is None
    assert run_a["tokenizer"]["path"] == run_b["tokenizer"]["path"] and (shared / "tokenizer.json").is_file()
    assert [p.name for p in (out / "tokenizers").iterdir()] == [shared.name]
    for row in rows:
        task = row["tasks"]["sentiment"]
        assert 0 <= task["mean"] <= 1 and row["gain"] is not None and row["control_average"] is not None
    table = (out / "sweep.md").read_text()
    assert "| a | run.yaml |" in table and "- **a**: the base" in table
    assert "| b | run.yaml (training.lr=0.001, training.max_minutes=5; steps of a) |" in table
    (comparison,) = json.loads((out / "sweep.json").read_text())["comparisons"]
    diff = rows[1]["average"]["per_seed"][0] - rows[0]["average"]["per_seed"][0]
    assert (comparison["a"], comparison["b"]) == ("b", "a") and comparison["mean"] == pytest.approx(diff)
    assert "- **b - a** (suite average, the same seeds):" in table

    import twinlm.finetune
    import twinlm.training

    monkeypatch.setattr(
        twinlm.training, "pretrain", lambda *a, **k: pytest.fail("pretrained a finished trial")
    )
    monkeypatch.setattr(
        twinlm.finetune, "finetune", lambda *a, **k: pytest.fail("fine-tuned a finished cell")
    )
    assert main(["sweep", str(sweep_file)]) == 0
    assert json.loads((out / "sweep.json").read_text())["trials"] == rows

    changed = yaml.safe_load(sweep_file.read_text())
    changed["trials"][1]["overrides"]["training.lr"] = 2.0e-3
    sweep_file.write_text(yaml.safe_dump(changed))
    with pytest.raises(TwinLMError, match="trial 'b' changed"):
        from twinlm.sweep import Sweep, load_sweep

        Sweep(load_sweep(sweep_file)).run()


def test_smoke_runs_two_steps_of_each_trial_without_evaluating(sweep_file: Path) -> None:
    from twinlm.cli import main

    assert main(["sweep", str(sweep_file), "--smoke", "--only", "b"]) == 0  # no steps_from in a smoke run
    out = sweep_file.parent / "sweep-smoke"
    summary = json.loads((out / "b" / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 2 and not (out / "b" / "evaluate").exists() and not (out / "a").exists()
    assert main(["sweep", str(sweep_file), "--only", "nope"]) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["trials"][1].update(steps_from="c"), "steps_from 'c' is not an earlier trial"),
        (lambda s: s["trials"][1].update(name="a"), "two trials are named 'a'"),
        (lambda s: s["trials"][0].update(name="a b"), "cannot name a folder"),
        (lambda s: s["trials"][0].update(config="nope.yaml"), "config 'nope.yaml' does not exist"),
        (lambda s: s.update(compare=[["b", "z"]]), r"compare \['b', 'z'\]: no trial named z"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(sweep_file: Path, change, message: str) -> None:
    from twinlm.sweep import load_sweep

    values = yaml.safe_load(sweep_file.read_text())
    change(values)
    sweep_file.write_text(yaml.safe_dump(values))
    with pytest.raises(TwinLMError, match=message):
        load_sweep(sweep_file)


def test_the_shipped_sweep_validates() -> None:
    from twinlm.sweep import load_sweep
    from twinlm.training import load_run_config

    root = Path(__file__).resolve().parents[1]
    sweep = load_sweep(root / "configs" / "sweeps" / "cpu-30min.yaml")
    names = [t.name for t in sweep.trials]
    assert {"mlm", "rtd", "clm"} <= set(names) and len(names) == len(set(names))
    for trial in sweep.trials:
        config = load_run_config(trial.config, [f"{k}={json.dumps(v)}" for k, v in trial.overrides.items()])
        task_text = any("labeled" in (s.path or "") for s in config.data.sources)
        assert task_text == trial.name.endswith("tapt"), (
            trial.name
        )  # only the labelled variant reads task text


def test_the_table_names_a_step_replica_without_stray_separators_and_signs_only_the_gain() -> None:
    from twinlm.sweep import format_table

    score = {"mean": 0.8, "std": 0.01}
    row = {
        "trial": "again",
        "config": "configs/run.yaml",
        "overrides": {},
        "steps_from": "base",
        "objective": "masked-lm",
        "steps": 4960,
        "tokens_seen": 20.3e6,
        "train_seconds": 1800.0,
        "validation": {"val_loss": 3.75},
        "tasks": {"t": {**score, "above_baseline": True}},
        "average": score,
        "control_average": {"mean": 0.78, "std": 0.02},
        "gain": {"mean": 0.02, "std": 0.005},
    }
    table = format_table([row])
    assert "| again | run.yaml (steps of base) | masked-lm | 4,960 | 20.3M | 30.0 | 3.750 |" in table
    assert "| +2.00 ± 0.50 | 1/1 |" in table and "± +" not in table


def test_a_recorded_sweep_outlives_its_output_folder(sweep_file: Path, capsys, monkeypatch) -> None:
    """RECORD (a folder kept in git) keeps each finished trial's row and the table: with OUT gone, as on a new
    checkout, the table is the same, a steps_from trial takes its steps from the record, and a trial whose
    settings changed since is left out of the table instead of shown with them."""
    import shutil

    from twinlm.sweep import Sweep, load_sweep

    record = sweep_file.parent / "record"
    sweep = load_sweep(sweep_file, [f"record={record}"])
    Sweep(sweep).run(["a"])
    row_a = json.loads((record / "a.json").read_text())
    assert row_a["average"]["per_seed"] and row_a["fingerprint"] and (record / "sweep.md").is_file()
    shutil.rmtree(sweep.out)

    rows = Sweep(sweep).run(["b"])  # b runs a's steps, which only the record still knows
    assert [r["trial"] for r in rows] == ["a", "b"] and rows[0] == row_a
    assert rows[1]["steps"] == row_a["steps"] == 3 and json.loads((record / "b.json").read_text()) == rows[1]
    (comparison,) = json.loads((record / "sweep.json").read_text())["comparisons"]
    assert comparison["basis"] == "the same seeds" and comparison["per_seed"] is not None
    assert (record / "sweep.md").read_text() == (sweep.out / "sweep.md").read_text()

    import twinlm.training

    shutil.rmtree(sweep.out)  # a new checkout: the whole sweep again runs nothing the record holds
    monkeypatch.setattr(
        twinlm.training, "pretrain", lambda *a, **k: pytest.fail("pretrained a recorded trial")
    )
    assert Sweep(sweep).run() == rows and "finished: its row is in" in capsys.readouterr().out
    monkeypatch.undo()
    values = yaml.safe_load(sweep_file.read_text())
    values["trials"][0]["overrides"] = {"training.lr": 5.0e-4}
    sweep_file.write_text(yaml.safe_dump(values))
    rows = Sweep(load_sweep(sweep_file, [f"record={record}"])).write_table()
    assert [r["trial"] for r in rows] == ["b"]
    assert "recorded with other settings than trial 'a' has now" in capsys.readouterr().out


def test_rows_without_per_seed_scores_keep_their_earlier_comparison_or_get_welchs() -> None:
    from twinlm.stats import compare_summaries
    from twinlm.sweep import compare_rows, format_table

    def row(name: str, mean: float, per_seed: list[float] | None, fingerprint: str) -> dict:
        average = {"mean": mean, "std": 0.01, **({"per_seed": per_seed} if per_seed else {})}
        return {
            "trial": name,
            "fingerprint": fingerprint,
            "config": "configs/run.yaml",
            "overrides": {},
            "objective": "masked-lm",
            "steps": 10,
            "tokens_seen": 1e6,
            "train_seconds": 1800.0,
            "validation": {"val_loss": 3.0},
            "seeds": [0, 1, 2],
            "tasks": {"t": {"mean": mean, "std": 0.01, "above_baseline": True}},
            "average": average,
            **({} if per_seed else {"transcribed_from": "an earlier table"}),
        }

    old = row("old", 0.84, None, "f-old")
    new = row("new", 0.83, [0.82, 0.83, 0.84], "f-new")
    (welch,) = compare_rows([old, new], [("new", "old")])
    expected = compare_summaries((0.83, 0.01, 3), (0.84, 0.01, 3))
    assert welch["test"]["p_value"] == pytest.approx(expected.p_value) and welch["per_seed"] is None
    assert welch["basis"] == "unpaired, from means and stds: old's per-seed scores were not kept"
    table = format_table([old, new], [welch])
    assert "- **new - old** (suite average, unpaired, from means and stds: old's" in table
    assert "- rows old: an earlier table" in table

    kept = {**welch, "basis": "the same seeds", "fingerprints": ["f-new", "f-old"]}
    assert compare_rows([old, new], [("new", "old")], [kept]) == [kept]  # the paired test run back then
    stale = {**kept, "fingerprints": ["f-new", "f-older"]}  # old was re-run since
    assert compare_rows([old, new], [("new", "old")], [stale])[0]["basis"].startswith("unpaired")


def test_results_made_with_other_settings_are_neither_tabulated_nor_recorded(tmp_path: Path, capsys) -> None:
    """What OUT and RECORD hold counts only for the settings it was made with: a trial whose config or
    overrides changed is not tabulated from its old run (nor recorded under its new settings, which would make
    a later checkout skip it for good); a changed suite leaves every score out (the pretraining facts stay)
    until the trial is evaluated again, and a recorded score is not overwritten by a row without one."""
    from twinlm.sweep import EVALUATED_FILE, TRIAL_FILE, Sweep, _fingerprint, load_sweep

    (tmp_path / "run.yaml").write_text("model: {preset: tiny}\n")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({"task": {"type": "sequence_classification"}}))
    suite = {"seeds": [0], "tasks": {"t": {"config": str(tmp_path / "task.yaml")}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))

    def sweep_with(lr_a: float) -> Sweep:
        values = {
            "suite": str(tmp_path / "suite.yaml"),
            "out": str(tmp_path / "out"),
            "record": str(tmp_path / "record"),
            "evaluate_overrides": {"jobs": 2},
            "trials": [
                {"name": "a", "config": str(tmp_path / "run.yaml"), "overrides": {"training.lr": lr_a}},
                {"name": "b", "config": str(tmp_path / "run.yaml")},
            ],
        }
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(values))
        return Sweep(load_sweep(tmp_path / "sweep.yaml"))

    def finished(
        sweep: Sweep, name: str, score: float
    ) -> None:  # a trial pretrained and evaluated, as run_trial
        trial, folder = sweep.trial(name), sweep.out / name
        (folder / "pretrain" / "final").mkdir(parents=True)
        (folder / "evaluate").mkdir()
        (folder / TRIAL_FILE).write_text(json.dumps({"fingerprint": _fingerprint(trial)}))
        summary = {"final_model": str(folder / "pretrain" / "final"), "steps": 10, "tokens_seen": 40960}
        summary.update(objective="mlm", train_seconds=60.0)
        (folder / "pretrain" / "summary.json").write_text(json.dumps(summary))
        model = {"kind": "checkpoint", "tasks": {"t": {"mean": score, "std": 0.0}}}
        model["average"] = {"mean": score, "std": 0.0, "per_seed": [score]}
        results = {"seeds": [0], "models": [model], "baselines": {}, "gains": {}}
        (folder / "evaluate" / "results.json").write_text(json.dumps(results))
        (folder / "evaluate" / EVALUATED_FILE).write_text(json.dumps({"evaluation": sweep.evaluation}))

    sweep = sweep_with(1e-3)
    finished(sweep, "a", 0.5)
    finished(sweep, "b", 0.6)
    rows = sweep.write_table()
    assert [(r["trial"], r["average"]["mean"]) for r in rows] == [("a", 0.5), ("b", 0.6)]
    recorded_a = json.loads((sweep.record / "a.json").read_text())
    assert recorded_a["evaluation"] == sweep.evaluation

    sweep = sweep_with(5e-3)  # trial a changed: its run in OUT and its record are of the old settings
    assert [r["trial"] for r in sweep.write_table()] == ["b"]
    assert (
        json.loads((sweep.record / "a.json").read_text()) == recorded_a
    )  # not stamped with the new settings
    assert not sweep.finished_in_record(sweep.trial("a"))  # so a later checkout runs it

    sweep = sweep_with(1e-3)  # back as it was
    assert sweep.write_table() == rows

    suite["seeds"] = [0, 1, 2]  # the suite changed: no score of the old one is shown or kept as current
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    sweep = sweep_with(1e-3)
    stale = sweep.write_table()
    assert [r["trial"] for r in stale] == ["a", "b"] and not any("average" in r for r in stale)
    assert stale[0]["steps"] == 10  # the pretraining facts stay
    assert "evaluated with other settings than the sweep has now" in capsys.readouterr().out
    assert json.loads((sweep.record / "a.json").read_text()) == recorded_a  # recorded scores not overwritten
    assert not sweep.finished_in_record(sweep.trial("a"))
    (sweep.out / "a" / "evaluate" / EVALUATED_FILE).write_text(json.dumps({"evaluation": sweep.evaluation}))
    assert [r["trial"] for r in sweep.write_table() if "average" in r] == ["a"]  # a evaluated again

    suite["jobs"] = 4  # the number of worker processes does not change a score
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert sweep_with(1e-3).evaluation == sweep.evaluation
