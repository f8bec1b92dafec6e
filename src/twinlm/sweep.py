"""`twinlm sweep SWEEP.yaml`: a recipe sweep, one trial at a time, resumable, with its table.

A sweep file names an evaluation suite and a list of trials; a trial is a pretraining config plus overrides
(dotted keys). Each trial pretrains into OUT/NAME/pretrain (an interrupted one resumes from its last
checkpoint, a finished one is not run again), then `twinlm evaluate` fine-tunes its final model and its
control on the suite into OUT/NAME/evaluate (finished cells are kept). After every trial the table of the
finished trials goes to OUT/sweep.md and OUT/sweep.json: config and overrides, objective, steps, tokens,
training minutes, validation loss, each task's score (mean ± std over seeds), the suite average, the
control's, the gain over it, and how many tasks beat their baseline by more than one standard deviation.

Results kept in git. OUT holds checkpoints and is not committed, so a sweep that spans sessions (each on a new
checkout) names `record:`, a folder in the repository: each finished trial's row (per-seed scores included)
goes to RECORD/NAME.json and the table to RECORD/sweep.md and sweep.json as soon as it is known. A trial whose
run folder is gone is tabulated from its record and not run again (a `steps_from` trial takes its steps from
it); a record made with other settings than the trial has now is left out, and the trial runs, and a record
evaluated with other suite settings than the sweep has now (suite, task configs, evaluate_overrides) keeps its
pretraining facts without its scores, and the trial is evaluated again. Results in OUT count only when they were
made with the present settings too (OUT/NAME/trial.json, OUT/NAME/evaluate/evaluated.json). A comparison
[A, B] is a paired t-test where both rows keep their per-seed scores; rows without them (transcribed from an
earlier table) keep the comparison that table made of the same two rows, else get Welch's t-test on their
means and stds.

Tokenizers. Trials whose tokenizer settings and sources are the same share one tokenizer: the first such trial
trains it, the others read it (`tokenizer.path`, OUT/tokenizers/KEY). Tokenizer training is not deterministic in
the order of its ids, so retrained tokenizers would differ trivially from trial to trial, and each would have
to tokenise the corpus again; shared, the data cache is reused and the trials differ only where they say.

Budgets. A config's `training.max_minutes` is wall clock: run such a sweep alone on an idle machine (a busy
one loses tokens to contention, for good). `steps_from: OTHER` runs a trial for exactly the steps OTHER's
pretraining reached, with no clock: the same work as OTHER whatever the machine is doing (a re-run with
another seed, a re-run under contention, or the same model with a different data option).

    twinlm sweep configs/sweeps/cpu-30min.yaml                  # every trial, in order
    twinlm sweep configs/sweeps/cpu-30min.yaml --only mlm rtd   # some trials
    twinlm sweep configs/sweeps/cpu-30min.yaml --smoke          # each trial for 2 steps, no evaluation
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from twinlm.config import Section, build_config, check_folder_names, flatten_overrides
from twinlm.errors import TwinLMError
from twinlm.fileio import read_json
from twinlm.stats import Comparison as StatComparison

TRIAL_FILE = "trial.json"
# OUT/NAME/evaluate/EVALUATED_FILE: the evaluation settings its results.json was made with
EVALUATED_FILE = "evaluated.json"
SCORES = (
    "seeds",
    "tasks",
    "average",
    "control_average",
    "gain",
    "evaluation",
)  # what a row's evaluation gave
RESUME_HINT = "finished trials are kept: run the same command again to go on"
SMOKE = {
    "training.max_minutes": None,
    "training.max_steps": 2,
    "training.eval_batches": 2,
    "training.eval_every": 0,
    "training.save_every": 0,
    "training.log_every": 1,
}


class Trial(Section):
    """One pretraining run of the sweep, then its evaluation."""

    name: str = Field(description="a folder name: letters, digits, - _ . +")
    config: Path = Field(description="a pretraining config, e.g. configs/pretrain/cpu-30min-mlm.yaml")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys, e.g. data.seq_len")
    steps_from: str | None = Field(None, description="run exactly the steps this earlier trial reached")
    evaluate: bool = True
    note: str = Field("", description="what the trial asks, for the table")


class SweepConfig(Section):
    """The suite every trial is evaluated on, where results go, and the trials in order."""

    suite: Path
    out: Path = Path("outputs/sweep")
    record: Path | None = Field(
        None,
        description="a folder kept in git (e.g. docs/recipes/sweep-cpu-30min): each finished trial's row, "
        "per-seed scores included, and the table, which outlive OUT (checkpoints, not committed)",
    )
    evaluate_overrides: dict[str, Any] = Field(default_factory=dict, description="e.g. {seeds: [0]}")
    trials: list[Trial] = Field(min_length=1)
    compare: list[tuple[str, str]] = Field(
        default_factory=list,
        description="[A, B] pairs: A - B on the suite average, seed by seed, in the table",
    )

    @model_validator(mode="after")
    def _names(self) -> SweepConfig:
        seen: list[str] = []
        for trial in self.trials:
            check_folder_names([trial.name], "trial")
            if trial.name in seen:
                raise ValueError(f"two trials are named {trial.name!r}")
            if trial.steps_from is not None and trial.steps_from not in seen:
                raise ValueError(
                    f"trial {trial.name!r}: steps_from {trial.steps_from!r} is not an earlier trial"
                )
            seen.append(trial.name)
        for pair in self.compare:
            missing = [name for name in pair if name not in seen]
            if missing:
                raise ValueError(f"compare {list(pair)}: no trial named {', '.join(missing)}")
        return self


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep YAML (with `key=value` overrides, e.g. out=outputs/x); every config file must exist."""
    sweep = build_config(
        SweepConfig, path, overrides, what="sweep config", example="configs/sweeps/cpu-30min.yaml"
    )
    for file, what in [
        (sweep.suite, "suite"),
        *((t.config, f"trial {t.name!r}: config") for t in sweep.trials),
    ]:
        if not file.is_file():
            raise TwinLMError(f"sweep config {path}: {what} {str(file)!r} does not exist")
    return sweep


def _pairs(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    return flatten_overrides(overrides)


def _fingerprint(trial: Trial) -> str:
    """What a trial's pretraining depends on: its config file's text and its overrides."""
    facts = {"config": trial.config.read_text(encoding="utf-8"), "overrides": trial.overrides}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _evaluation_fingerprint(sweep: SweepConfig) -> str:
    """What a trial's scores depend on besides its checkpoint: the suite file's settings (as YAML data: not its
    comments), the sweep's evaluate_overrides, and each task's fine-tuning config (as YAML data). Not `jobs`
    (the scores do not depend on it), not the data files' contents (each evaluate cell's fingerprint holds
    those, and reruns the cell when they change)."""
    import yaml

    from twinlm.evaluation import load_suite

    overrides = {k: v for k, v in sweep.evaluate_overrides.items() if k != "jobs"}
    suite = load_suite(sweep.suite, [f"{k}={json.dumps(v)}" for k, v in _pairs(sweep.evaluate_overrides)])
    settings = yaml.safe_load(sweep.suite.read_text(encoding="utf-8")) or {}
    facts = {
        "suite": {k: v for k, v in settings.items() if k != "jobs"},
        "overrides": overrides,
        "tasks": {
            name: yaml.safe_load(task.config.read_text(encoding="utf-8"))
            for name, task in suite.tasks.items()
        },
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def _maybe_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) or None


class Sweep:
    """Runs the trials of a SweepConfig in order into `out`, and writes the table after each."""

    def __init__(self, sweep: SweepConfig, smoke: bool = False) -> None:
        self.sweep, self.smoke = sweep, smoke
        self.out = Path(f"{sweep.out}-smoke") if smoke else sweep.out

    @property
    def record(self) -> Path | None:
        return None if self.smoke else self.sweep.record

    @functools.cached_property
    def evaluation(self) -> str:
        """The fingerprint of the sweep's evaluation settings (suite, task configs, evaluate_overrides)."""
        return _evaluation_fingerprint(self.sweep)

    def trial(self, name: str) -> Trial:
        return next(t for t in self.sweep.trials if t.name == name)

    def recorded(self, trial: Trial) -> dict[str, Any] | None:
        """The trial's row as RECORD/NAME.json keeps it, when recorded with the trial's present settings; its
        scores only when evaluated with the sweep's present evaluation settings."""
        if self.record is None:
            return None
        path = self.record / f"{trial.name}.json"
        row = _maybe_json(path)
        if row is not None and row.get("fingerprint") != _fingerprint(trial):
            print(
                f"{path}: recorded with other settings than trial {trial.name!r} has now (its config file or "
                "overrides changed); left out of the table"
            )
            return None
        if row is not None and row.get("average") and row.get("evaluation") != self.evaluation:
            print(
                f"{path}: evaluated with other settings than the sweep has now (its suite, the task configs or "
                "evaluate_overrides changed); its scores are left out, and the trial is evaluated again"
            )
            return {k: v for k, v in row.items() if k not in SCORES}
        return row

    def pretrained(self, name: str) -> dict[str, Any] | None:
        """The summary of trial `name`'s pretraining in OUT when it finished with the trial's present settings
        (None otherwise: not finished, or run with other settings, which run_trial refuses to go on from)."""
        made = _maybe_json(self.out / name / TRIAL_FILE)
        if made is None or made.get("fingerprint") != _fingerprint(self.trial(name)):
            return None
        summary = _maybe_json(self.out / name / "pretrain" / "summary.json")
        return summary if summary and summary.get("final_model") else None

    def finished_in_record(self, trial: Trial) -> bool:
        """Whether the record holds the trial's finished row (evaluated, unless the trial is not) and OUT
        does not hold its pretraining: a trial a later checkout need not run again."""
        if self.pretrained(trial.name):
            return False  # OUT has it: run_trial goes on from there (an evaluation to finish, or nothing)
        kept = self.recorded(trial)
        return kept is not None and (bool(kept.get("average")) or not trial.evaluate)

    def shared_tokenizer(self, trial: Trial) -> Path | None:
        """Where the tokenizer of the trials with this trial's tokenizer settings and sources is kept (None
        when the trial's config names a tokenizer itself): trained once, before the first such trial."""
        from twinlm.training import load_run_config
        from twinlm.training.loop import run_model_config, shared_tokenizer_key

        cfg = load_run_config(trial.config, _pairs(trial.overrides))
        if cfg.tokenizer.train is None:
            return None
        causal = bool(run_model_config(cfg).is_causal) and cfg.objective != "rtd"
        return self.out / "tokenizers" / shared_tokenizer_key(cfg, causal)

    def prepare_tokenizer(self, trial: Trial) -> None:
        """Train the trial's shared tokenizer unless it is there (atomically, as the run would train it)."""
        from twinlm.training import load_run_config
        from twinlm.training.loop import run_model_config, train_run_tokenizer

        shared = self.shared_tokenizer(trial)
        if shared is None or (shared / "tokenizer.json").is_file():
            return
        cfg = load_run_config(trial.config, _pairs(trial.overrides))
        causal = bool(run_model_config(cfg).is_causal) and cfg.objective != "rtd"
        train_run_tokenizer(cfg, shared, causal)

    def pretrain_overrides(self, trial: Trial) -> dict[str, Any]:
        """The trial's overrides, its output folder, resume, a shared tokenizer, and its budget (smoke: 2 steps)."""
        output_dir = self.out / trial.name / "pretrain"
        settings = {
            **trial.overrides,
            "output_dir": str(output_dir),
            "training.resume_from_checkpoint": "latest",
        }
        shared = self.shared_tokenizer(trial)
        if shared is not None and not (output_dir / "tokenizer" / "tokenizer.json").is_file():
            settings.update(
                {"tokenizer.train": None, "tokenizer.path": str(shared)}
            )  # (a trial keeps its own)
        if self.smoke:
            return {**settings, **SMOKE}
        if trial.steps_from is not None:
            other = self.pretrained(trial.steps_from) or self.recorded(self.trial(trial.steps_from))
            if not other:  # (a recorded row keeps the steps)
                raise TwinLMError(
                    f"trial {trial.name!r} runs the steps of {trial.steps_from!r}, which has not finished "
                    f"pretraining in {self.out / trial.steps_from}"
                    + (f" nor in the record {self.record}" if self.record is not None else "")
                    + ": run it first"
                )
            settings.update({"training.max_minutes": None, "training.max_steps": int(other["steps"])})
        return settings

    def run(self, only: list[str] | None = None) -> list[dict[str, Any]]:
        """Every trial (or those named in `only`) in order; returns the table's rows. SIGINT/SIGTERM stop
        the whole sweep (the trial in progress keeps its checkpoint or its finished cells; exit 128 + signal)."""
        from twinlm.session import run_folder
        from twinlm.stopping import check_stop, stop_on_signal

        names = [t.name for t in self.sweep.trials]
        unknown = sorted(set(only or ()) - set(names))
        if unknown:
            raise TwinLMError(
                f"--only: no trial named {', '.join(unknown)}; the trials are {', '.join(names)}"
            )
        with run_folder(self.out, "out"), stop_on_signal():
            for trial in self.sweep.trials:
                if only and trial.name not in only:
                    continue
                check_stop(RESUME_HINT)
                overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in _pairs(trial.overrides))
                print(f"\n=== sweep trial {trial.name}: {trial.config} {overrides}".rstrip())
                if self.finished_in_record(trial):
                    print(
                        f"finished: its row is in {self.record / (trial.name + '.json')} (delete that file, "
                        "and its folder in OUT if any, to run it again)"
                    )
                    continue
                self.run_trial(trial)
                self.write_table()
            return self.write_table()

    def run_trial(self, trial: Trial) -> None:
        """Pretrain (unless finished with the same settings), then evaluate (finished cells are kept, and a
        cell another trial already ran, such as the control of the same architecture, is read back)."""
        from twinlm.evaluation import evaluate_checkpoints
        from twinlm.fileio import write_json_atomic
        from twinlm.stopping import raise_interrupted
        from twinlm.training import pretrain

        folder = self.out / trial.name
        record = _maybe_json(folder / TRIAL_FILE)
        fingerprint = _fingerprint(trial)
        if record is not None and record.get("fingerprint") != fingerprint:
            raise TwinLMError(
                f"trial {trial.name!r} changed (its config file or overrides) since it ran into {folder}: "
                "give the new settings another trial name, or delete that folder to run it again"
            )
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / TRIAL_FILE, {"fingerprint": fingerprint, **trial.model_dump(mode="json")})
        summary = self.pretrained(trial.name)
        if not (summary and Path(summary["final_model"]).is_dir()):
            self.prepare_tokenizer(trial)
            summary = pretrain(trial.config, list(self.pretrain_overrides(trial).items()))
            if summary.get("interrupted_by"):
                raise_interrupted(
                    summary["interrupted_by"], f"trial {trial.name!r} keeps its checkpoint; {RESUME_HINT}"
                )
        if trial.evaluate and not self.smoke:
            evaluate_checkpoints(
                [summary["final_model"]],
                self.sweep.suite,
                folder / "evaluate",
                [f"{k}={json.dumps(v)}" for k, v in _pairs(self.sweep.evaluate_overrides)],
                cells_cache=self.out / "cells",
            )
            # results.json is now this evaluation's (an interrupted or failed one left the last one's there)
            write_json_atomic(folder / "evaluate" / EVALUATED_FILE, {"evaluation": self.evaluation})

    def row(self, trial: Trial) -> dict[str, Any] | None:
        """The table's row of a trial whose pretraining finished (scores once its evaluation did)."""
        folder = self.out / trial.name
        summary = self.pretrained(trial.name)
        if summary is None:
            return None
        row: dict[str, Any] = {
            "trial": trial.name,
            "fingerprint": _fingerprint(trial),
            **self.row_facts(trial),
            **{
                k: summary.get(k)
                for k in ("objective", "parameters", "steps", "tokens_seen", "train_seconds")
            },
            "validation": {k: v for k, v in summary.items() if k.startswith("val_")},
            "data_sources": summary.get("data_sources"),
        }
        report = _maybe_json(folder / "evaluate" / "results.json")
        evaluated = _maybe_json(folder / "evaluate" / EVALUATED_FILE) or {}
        if report is not None and evaluated.get("evaluation") == self.evaluation:
            checkpoint = next(m for m in report["models"] if m["kind"] == "checkpoint")
            control = next((m for m in report["models"] if m["kind"] == "control"), None)
            tasks = {}
            for name, task in checkpoint["tasks"].items():
                baseline = (report["baselines"].get(name) or {}).get("test")
                tasks[name] = {
                    "mean": task["mean"],
                    "std": task["std"],
                    "baseline": baseline,
                    "above_baseline": baseline is not None and task["mean"] - task["std"] > baseline,
                }
            row.update(
                {
                    "seeds": report["seeds"],
                    "tasks": tasks,
                    "average": checkpoint["average"],
                    "control_average": control["average"] if control else None,
                    "gain": next(iter(report["gains"].values()), None),
                    "evaluation": self.evaluation,
                }
            )
        return row

    def rows(self) -> list[dict[str, Any]]:
        """Each finished trial's row: from OUT, or as RECORD keeps it where OUT holds less (a later checkout
        without OUT, or an evaluation not yet finished there). A row made from OUT is recorded."""
        from twinlm.fileio import write_json_atomic

        rows = []
        for trial in self.sweep.trials:
            fresh, kept = self.row(trial), self.recorded(trial)
            if fresh is not None and (fresh.get("average") or not (kept and kept.get("average"))):
                if self.record is not None and fresh != kept and not self.holds_scores(trial, fresh):
                    write_json_atomic(self.record / f"{trial.name}.json", fresh, f"trial {trial.name}'s row")
                rows.append(fresh)
            elif kept is not None:  # the trial's present note and settings, the recorded results
                rows.append({**kept, **self.row_facts(trial)})
        return rows

    def holds_scores(self, trial: Trial, row: dict[str, Any]) -> bool:
        """Whether RECORD/NAME.json holds scores that `row`, which has none, would overwrite (scores of other
        settings stay recorded until the trial's new evaluation replaces them)."""
        if row.get("average") or self.record is None:
            return False
        return bool((_maybe_json(self.record / f"{trial.name}.json") or {}).get("average"))

    @staticmethod
    def row_facts(trial: Trial) -> dict[str, Any]:
        return {
            "note": trial.note,
            "config": str(trial.config),
            "overrides": trial.overrides,
            "steps_from": trial.steps_from,
        }

    def write_table(self) -> list[dict[str, Any]]:
        """OUT/sweep.json and OUT/sweep.md (and the same in RECORD): every finished trial, and the
        comparisons of evaluated ones."""
        from twinlm.fileio import write_json_atomic, write_text_atomic

        folders = [self.out, *([self.record] if self.record is not None else [])]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        kept = (_maybe_json(self.record / "sweep.json") or {}) if self.record is not None else {}
        comparisons = compare_rows(rows, self.sweep.compare, kept.get("comparisons", ()))
        for folder in folders:
            write_json_atomic(
                folder / "sweep.json", {"trials": rows, "comparisons": comparisons}, "the sweep table"
            )
            write_text_atomic(folder / "sweep.md", format_table(rows, comparisons), "the sweep table")
        return rows


def compare_rows(
    rows: list[dict[str, Any]], pairs: list[tuple[str, str]], kept: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """For each [A, B] whose evaluations both finished on the same seeds: A - B on the suite average, seed by
    seed (a paired t-test, twinlm.stats), and whether their training times were equal
    (twinlm.evaluation.EQUAL_TIME_TOLERANCE). Where one side's per-seed scores were not kept (a row
    transcribed from an earlier table): the comparison `kept` from an earlier table of the same two rows
    (same fingerprints), else Welch's t-test on the two means and stds (unpaired: wider)."""
    import dataclasses
    import statistics

    from twinlm.evaluation import equal_time
    from twinlm.stats import compare, compare_summaries

    by_name = {r["trial"]: r for r in rows}
    earlier = {(c["a"], c["b"]): c for c in kept}
    found = []
    for a, b in pairs:
        first, second = by_name.get(a), by_name.get(b)
        if not (first and second and first.get("average") and second.get("average")):
            continue
        if first["seeds"] != second["seeds"]:
            continue
        timing = {
            "train_minutes": [first["train_seconds"] / 60, second["train_seconds"] / 60],
            "equal_time": equal_time([first, second]),
            "fingerprints": [first.get("fingerprint"), second.get("fingerprint")],
        }
        old = earlier.get((a, b))
        x, y = first["average"].get("per_seed"), second["average"].get("per_seed")
        if x and y:
            diffs = [p - q for p, q in zip(x, y, strict=True)]
            test, basis = compare(x, y, paired=True), "the same seeds"
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        elif old is not None and old.get("fingerprints") == timing["fingerprints"]:
            found.append(old)  # the paired test of an earlier table, whose per-seed scores are gone
            continue
        else:
            n = len(first["seeds"])
            test = compare_summaries(
                (first["average"]["mean"], first["average"]["std"], n),
                (second["average"]["mean"], second["average"]["std"], n),
            )
            unkept = " and ".join(r["trial"] for r in (first, second) if not r["average"].get("per_seed"))
            diffs, spread = None, None
            basis = f"unpaired, from means and stds: {unkept}'s per-seed scores were not kept"
        found.append(
            {
                "a": a,
                "b": b,
                "per_seed": diffs,
                "mean": statistics.fmean(diffs) if diffs else test.difference,
                "std": spread,
                "test": dataclasses.asdict(test),
                "basis": basis,
                **timing,
            }
        )
    return found


def _pm(value: dict[str, float] | None, scale: float = 1.0, spec: str = ".4f") -> str:
    if not value:
        return ""
    return f"{value['mean'] * scale:{spec}} ± {value['std'] * scale:{spec.lstrip('+')}}"


def _validation(row: dict[str, Any]) -> str:
    val = row["validation"]
    if "val_disc_loss" in val:
        return f"gen {val['val_gen_loss']:.3f}, disc {val['val_disc_loss']:.4f}"
    return f"{val['val_loss']:.3f}" if "val_loss" in val else ""


def format_table(rows: list[dict[str, Any]], comparisons: list[dict[str, Any]] = ()) -> str:
    """sweep.md: one line per trial (the scores of the trials whose evaluation finished), then the
    comparisons."""
    tasks = sorted({name for r in rows for name in r.get("tasks", {})})
    head = ["trial", "config (overrides)", "objective", "steps", "tokens", "train min", "val loss"]
    head += [*tasks, "suite avg", "control avg", "gain (points)", "> baseline + 1 std"]
    lines = [
        "# twinlm sweep: pretraining and `twinlm evaluate` per trial (mean ± std over seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        overrides = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items())
        budget = f"steps of {r['steps_from']}" if r.get("steps_from") else ""
        described = "; ".join(part for part in (overrides, budget) if part)
        config = f"{Path(r['config']).name}" + (f" ({described})" if described else "")
        scores = [_pm(r.get("tasks", {}).get(name)) for name in tasks]
        above = (
            r.get("tasks") and f"{sum(t['above_baseline'] for t in r['tasks'].values())}/{len(r['tasks'])}"
        )
        cells = [
            r["trial"],
            config,
            r["objective"] or "",
            f"{r['steps']:,}",
            f"{r['tokens_seen'] / 1e6:.1f}M",
            f"{r['train_seconds'] / 60:.1f}",
            _validation(r),
            *scores,
            _pm(r.get("average")),
            _pm(r.get("control_average")),
            _pm(r.get("gain"), 100.0, "+.2f"),
            above or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{r['trial']}**: {r['note']}" for r in rows if r.get("note")]
    sources: dict[str, list[str]] = {}
    for r in rows:
        if r.get("transcribed_from"):
            sources.setdefault(r["transcribed_from"], []).append(r["trial"])
    notes += [f"- rows {', '.join(names)}: {source}" for source, names in sources.items()]
    compared = [
        f"- **{c['a']} - {c['b']}** (suite average, {c.get('basis', 'the same seeds')}): "
        f"{StatComparison(**c['test']).describe('points', scale=100, digits=3)}; training "
        f"{c['train_minutes'][0]:.1f} vs {c['train_minutes'][1]:.1f} minutes"
        + (" (equal time)" if c["equal_time"] else " (NOT equal time)" if c["equal_time"] is False else "")
        for c in comparisons
    ]
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + compared if compared else [])) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, list(args.overrides))
    runner = Sweep(sweep, smoke=args.smoke)
    rows = runner.run(args.only)
    print(f"\n{len(rows)} finished trial(s): {runner.out / 'sweep.md'}, {runner.out / 'sweep.json'}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep",
        help="run a recipe sweep: pretrain and evaluate each trial, resumably, and tabulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/cpu-30min.yaml")
    parser.add_argument(
        "--only", nargs="+", metavar="TRIAL", help="run only these trials (the table lists all)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 steps of each trial into OUT-smoke, no evaluation"
    )
    parser.set_defaults(func=run, overrides=[])  # sweep overrides: out=outputs/x evaluate_overrides=...
    return parser
