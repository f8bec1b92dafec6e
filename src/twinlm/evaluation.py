"""`twinlm evaluate`: what pretraining bought, measured downstream.

Each checkpoint is fine-tuned on every task of a suite with several seeds (and optionally a small
learning-rate grid chosen on dev), next to two references run on the same splits:
- the **control**: the same architecture and tokenizer from random initialisation, fine-tuned the same way;
- the task's simple **baseline** (TF-IDF + logistic regression, most-frequent tag).
Test scores are those at the best dev point (never chosen on test). The report gives task x {checkpoint,
control, baseline} as mean +- std over seeds, the suite average and the pretraining gain (checkpoint -
control, per seed, then mean +- std). Finished cells are not rerun: an interrupted evaluation resumes.

    twinlm evaluate outputs/tiny-mlm/final --suite configs/evaluate/default.yaml --out outputs/evaluate
    from twinlm.evaluation import evaluate_checkpoints
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, field_validator, model_validator

from twinlm.config import Section, build_config, flatten_overrides
from twinlm.errors import Interrupted, TwinLMError
from twinlm.fileio import read_json

CELL_FILE = "cell.json"
CONTROL_FILE = "control.json"
RESUME_HINT = "the finished cells are kept: run the same command again to go on"


# ------------------------------------------------------------------------------------------------
# The suite config
# ------------------------------------------------------------------------------------------------
class SplitFrom(Section):
    """A task that ships as one labelled file (or several): split it into train/dev/test, seeded."""

    files: list[Path] = Field(min_length=1)
    header: bool = Field(True, description="the files start with a header line")
    columns: list[str] | None = Field(None, description="column names when there is no header")
    text_column: str
    label_column: str
    ratios: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.8, 0.1, 0.1)
    seed: int = 0

    @model_validator(mode="after")
    def _whole(self) -> SplitFrom:
        if not math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"ratios {list(self.ratios)} (train, dev, test) must add up to 1")
        if not self.header and not self.columns:
            raise ValueError("header is false: name the columns (columns: [text, label])")
        return self


class SuiteTask(Section):
    """One task: a fine-tuning config (its model.path is replaced) plus overrides."""

    config: Path = Field(description="a fine-tuning config, e.g. configs/finetune/sst2.yaml")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys, e.g. training.epochs")
    split_from: SplitFrom | None = None


class Suite(Section):
    """Tasks, seeds and the learning-rate grid; `overrides` apply to every task."""

    tasks: dict[str, SuiteTask] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    lrs: list[PositiveFloat] | None = Field(
        None, min_length=1, description="learning rates to try; chosen per model on mean dev"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    control: bool = True

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed: each seed is one fine-tuning run")
        return seeds


def load_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Read a suite YAML (with `key=value` overrides, e.g. seeds=[0]); a one-line TwinLMError naming the
    key on any problem."""
    suite = build_config(
        Suite, path, overrides, what="evaluation suite", example="configs/evaluate/default.yaml"
    )
    for name, task in suite.tasks.items():
        if not task.config.is_file():
            raise TwinLMError(
                f"evaluation suite {path}: tasks.{name}.config {str(task.config)!r} does not exist"
            )
    return suite


# ------------------------------------------------------------------------------------------------
# Data, controls, cells
# ------------------------------------------------------------------------------------------------
def _clean(value: str) -> str:
    return " ".join(str(value).split())  # one line, no tabs: the TSV is read unquoted


def _read_split_rows(spec: SplitFrom) -> list[tuple[str, str]]:
    """(text, label) rows of the files a single-file task ships as; one-line errors for bad files."""
    import csv

    from twinlm.data.textfiles import read_text

    rows: list[tuple[str, str]] = []
    for file in spec.files:
        if not Path(file).is_file():
            raise TwinLMError(f"split_from.files: {str(file)!r} does not exist")
        reader = csv.reader(
            read_text(file, what="task file").splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE
        )
        columns = next(reader, None) if spec.header else spec.columns
        if not columns or spec.text_column not in columns or spec.label_column not in columns:
            raise TwinLMError(f"{file}: columns {columns} lack {spec.text_column!r} or {spec.label_column!r}")
        t, lab = columns.index(spec.text_column), columns.index(spec.label_column)
        rows += [(_clean(r[t]), _clean(r[lab])) for r in reader if len(r) > max(t, lab)]
    return rows


def prepare_split(name: str, spec: SplitFrom, out: Path) -> dict[str, str]:
    """Write train/dev/test TSVs (columns text, label) under OUT/data/NAME (again when the split settings
    or the source files' contents changed); return the task overrides that point at them."""
    from twinlm.fileio import write_json_atomic, write_text_atomic
    from twinlm.fingerprint import files_digest, fingerprint

    folder = out / "data" / name
    files = {split: folder / f"{split}.tsv" for split in ("train", "dev", "test")}
    made_from = folder / "split_from.json"
    wanted = fingerprint({"spec": spec.model_dump(mode="json"), "sources": files_digest(spec.files)})
    fresh = (
        made_from.is_file()
        and read_json(made_from).get("fingerprint") == wanted
        and all(f.is_file() for f in files.values())
    )
    if not fresh:
        rows = _read_split_rows(spec)
        random.Random(spec.seed).shuffle(rows)
        n_train = int(len(rows) * spec.ratios[0])
        n_dev = int(len(rows) * spec.ratios[1])
        parts = {
            "train": rows[:n_train],
            "dev": rows[n_train : n_train + n_dev],
            "test": rows[n_train + n_dev :],
        }
        empty = [split for split, part in parts.items() if not part]
        if empty:
            raise TwinLMError(
                f"tasks.{name}.split_from: {len(rows)} rows leave the {', '.join(empty)} split(s) empty at "
                f"ratios {list(spec.ratios)}; give more rows or other ratios"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for split, part in parts.items():
            text = "text\tlabel\n" + "".join(f"{a}\t{b}\n" for a, b in part)
            write_text_atomic(files[split], text, f"the {split} split of {name}")
        write_json_atomic(made_from, {"fingerprint": wanted, "spec": spec.model_dump(mode="json")})
    overrides = {f"task.{split}": str(file) for split, file in files.items()}
    return {**overrides, "task.format": "tsv", "task.text_column": "text", "task.label_column": "label"}


def make_control(checkpoint: str, out: Path, seed: int, label: str | None = None) -> Path:
    """The checkpoint's architecture and tokenizer with random weights (seeded), saved like a checkpoint;
    made again when the checkpoint's config or tokenizer changed since (fingerprinted like a checkpoint)."""
    from twinlm.fileio import atomic_folder, write_json_atomic
    from twinlm.fingerprint import fingerprint, model_folder_digest
    from twinlm.model_folder import check_model_folder

    name = _slug(label or Path(checkpoint).name or "model")
    target = out / "controls" / f"{name}-seed{seed}"
    config = check_model_folder(checkpoint, "checkpoint", tokenizer=True)
    tokenizer_files = {
        k: v
        for k, v in model_folder_digest(checkpoint).items()
        if not k.startswith(("model", "pytorch_model"))
    }
    wanted = fingerprint({"config": config, "tokenizer": tokenizer_files, "seed": seed})
    if (target / "config.json").is_file() and read_json(target / CONTROL_FILE).get("fingerprint") == wanted:
        return target
    if target.exists():
        print(f"making the control {target} again: the checkpoint's architecture or tokenizer changed")
    import torch

    import twinlm
    from twinlm.tokenization import auto_tokenizer

    model_config = twinlm.TwinLMConfig.from_pretrained(checkpoint)
    cls = twinlm.TwinLMForCausalLM if model_config.is_causal else twinlm.TwinLMForMaskedLM
    torch.manual_seed(seed)
    with atomic_folder(target, f"the control of {checkpoint}") as tmp:
        cls(model_config).save_pretrained(tmp)
        auto_tokenizer(checkpoint).save_pretrained(tmp)
        write_json_atomic(tmp / CONTROL_FILE, {"fingerprint": wanted, "of": str(checkpoint), "seed": seed})
    return target


def cell_config(model_path: str, spec: SuiteTask, overrides: dict[str, Any], folder: Path) -> Any:
    """The fine-tuning config a cell runs: the task's config with the overrides (dotted keys, each setting
    one field), the model and the cell's output folder; a one-line TwinLMError when it is not valid."""
    from twinlm.finetune.config import load_finetune_config

    pairs = flatten_overrides(overrides) + [("model.path", model_path), ("output_dir", str(folder / "run"))]
    return load_finetune_config(spec.config, pairs)


def _fingerprint(model_path: str, cfg: Any) -> str:
    """What a cell's result depends on: the model's files (weights, config, tokenizer), the resolved
    fine-tuning config (task, settings, seed, lr) and the contents of the task's files."""
    from twinlm.fingerprint import files_digest, fingerprint, model_folder_digest

    task_files = [f for f in (cfg.task.train, cfg.task.dev, cfg.task.test) if f is not None]
    return fingerprint(
        {
            "model": model_folder_digest(model_path),
            "run": cfg.model_dump(mode="json"),
            "task_files": files_digest(task_files),
        }
    )


class EvaluationInterrupted(Interrupted):
    """A fine-tuning run of the evaluation was stopped (SIGINT/SIGTERM): the evaluation stops too."""


def run_cell(model_path: str, task: str, spec: SuiteTask, overrides: dict[str, Any], folder: Path) -> dict:
    """Fine-tune once (or read the finished result when nothing it depends on changed): best dev and its
    test scores, the baseline if run."""
    import shutil
    import signal

    from twinlm.fileio import write_json_atomic

    done = folder / CELL_FILE
    cfg = cell_config(model_path, spec, overrides, folder)
    fingerprint = _fingerprint(model_path, cfg)
    if done.is_file():
        cell = read_json(done)
        if cell.get("fingerprint") == fingerprint:
            return cell
        print(f"re-running {folder}: the model, its task files or the settings changed since it was run")
    from twinlm.finetune import finetune

    summary = finetune(cfg)
    stopped = summary.get("interrupted_by")
    if stopped:  # a partial run is no result: keep it out of the finished cells
        signum = int(getattr(signal, stopped, signal.SIGTERM))
        raise EvaluationInterrupted(
            signum, f"interrupted by {stopped} while fine-tuning {folder}; {RESUME_HINT}"
        )
    best = summary.get("best") or {}
    cell = {
        "fingerprint": fingerprint,
        "task": task,
        "model": model_path,
        "metric": summary["metric_for_best"],
        "dev": best.get("dev", {}),
        "test": best.get("test", {}),
        "baseline": summary.get("baseline"),
        "seconds": summary.get("seconds"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(done, cell, f"the result of {folder}")
    shutil.rmtree(folder / "run", ignore_errors=True)  # the fine-tuned weights are not needed: scores are
    return cell


# ------------------------------------------------------------------------------------------------
# The grid and the report
# ------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """Short, distinct names: the folder (its parent for .../final or .../best), with more of the path, then a
    number, where two would collide."""
    parts = [[p for p in Path(c).resolve().parts if p not in ("final", "best", "/")] for c in checkpoints]
    depth = [1] * len(checkpoints)
    labels = ["/".join(p[-1:]) for p in parts]
    for _ in range(3):  # widen colliding labels by one path component at a time
        for i, label in enumerate(labels):
            if labels.count(label) > 1 and depth[i] < len(parts[i]):
                depth[i] += 1
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique


@dataclasses.dataclass(frozen=True)
class EvaluatedModel:
    """A checkpoint, or its control (the same architecture and tokenizer, random weights, one per seed)."""

    label: str
    kind: str  # "checkpoint" | "control"
    of: str  # the checkpoint's label
    checkpoint: str

    def path(self, seed: int, out: Path) -> str:
        if self.kind == "checkpoint":
            return self.checkpoint
        return str(make_control(self.checkpoint, out, seed, self.of))


def _models(checkpoints: list[str], suite: Suite) -> list[EvaluatedModel]:
    """Each checkpoint, then its control, with the label used in reports."""
    models = []
    for ckpt, label in zip(checkpoints, checkpoint_labels(checkpoints), strict=True):
        models.append(EvaluatedModel(label, "checkpoint", label, ckpt))
        if suite.control:
            models.append(EvaluatedModel(f"{label} (control)", "control", label, ckpt))
    return models


def _cell_overrides(
    suite: Suite, name: str, split: dict[str, str], seed: int, lr: float | None, baseline: bool
) -> dict[str, Any]:
    """The overrides of one (task, lr, seed) cell: suite's, the task's, its split files, seed, lr."""
    spec = suite.tasks[name]
    overrides = {
        **dict(flatten_overrides(suite.overrides)),
        **dict(flatten_overrides(spec.overrides)),
        **split,
        "training.seed": seed,
        "training.baseline": baseline,
    }
    if lr is not None:
        overrides["training.lr"] = lr
    return overrides


def _check_cells(checkpoints: list[str], suite: Suite, out: Path, splits: dict[str, dict]) -> None:
    """Before anything trains: every task config with every cell's overrides is valid, names files that
    exist and has the dev and test splits the report needs (one-line TwinLMError otherwise)."""
    for name, spec in suite.tasks.items():
        for lr in suite.lrs or [None]:
            overrides = _cell_overrides(suite, name, splits[name], suite.seeds[0], lr, True)
            try:
                cfg = cell_config(checkpoints[0], spec, overrides, out / "check")
            except TwinLMError as err:
                raise TwinLMError(f"tasks.{name} ({spec.config}): {err}") from None
            hub = cfg.task.hub
            for split in ("dev", "test"):
                if getattr(cfg.task, split) is None and (
                    hub is None or getattr(hub, f"{split}_split") is None
                ):
                    need = "to pick the best model" if split == "dev" else "for the test scores it reports"
                    raise TwinLMError(
                        f"tasks.{name} ({spec.config}) has no {split} split, which evaluate needs {need}; "
                        f"give task.{split} in the task config (or split_from in the suite)"
                    )


def _score_model(model: EvaluatedModel, suite: Suite, out: Path, splits: dict[str, dict]) -> dict[str, Any]:
    """Run every (task, lr, seed) cell of one model; per task, the lr with the best mean dev metric."""
    from twinlm.stopping import check_stop

    lrs = suite.lrs or [None]
    tasks = {}
    for name, spec in suite.tasks.items():
        by_lr = {}
        for lr in lrs:
            cells = []
            for seed in suite.seeds:
                check_stop(RESUME_HINT)
                baseline = model.kind == "checkpoint" and seed == suite.seeds[0]
                overrides = _cell_overrides(suite, name, splits[name], seed, lr, baseline)
                folder = out / "runs" / _slug(model.label) / name / f"lr{lr}-seed{seed}"
                cells.append(run_cell(model.path(seed, out), name, spec, overrides, folder))
            by_lr[lr] = cells
        best_lr = max(
            by_lr, key=lambda lr: statistics.fmean(c["dev"].get(c["metric"], 0.0) for c in by_lr[lr])
        )
        cells = by_lr[best_lr]
        metric = cells[0]["metric"]
        tasks[name] = {
            "metric": metric,
            "lr": best_lr,
            "test": [c["test"].get(metric) for c in cells],
            "dev": [c["dev"].get(metric) for c in cells],
            "baseline": next((c["baseline"] for c in cells if c.get("baseline")), None),
            **_mean_std([c["test"].get(metric, 0.0) for c in cells]),
        }
    per_seed = [statistics.fmean(t["test"][i] for t in tasks.values()) for i in range(len(suite.seeds))]
    return {
        "label": model.label,
        "kind": model.kind,
        "of": model.of,
        "tasks": tasks,
        "average": {"per_seed": per_seed, **_mean_std(per_seed)},
    }


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label).strip("_")


def evaluate_checkpoints(
    checkpoints: list[str],
    suite_path: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Fine-tune every checkpoint (and its control) on every task; write report.md, results.json, a PNG.

    Everything is checked before the first fine-tuning run (the suite, every task config with its
    overrides, the checkpoints, the output folder); SIGINT/SIGTERM stop the whole evaluation with its
    finished cells kept (`Interrupted`), and the same command goes on from there."""
    from twinlm.fileio import atomic_file, write_json_atomic, write_text_atomic
    from twinlm.model_folder import check_model_folder
    from twinlm.session import run_folder
    from twinlm.stopping import check_stop, stop_on_signal

    suite, out = load_suite(suite_path, overrides), Path(out)
    for ckpt in checkpoints:
        check_model_folder(ckpt, "checkpoint", tokenizer=True)
    with run_folder(out, "--out"):  # one evaluation per folder at a time
        with stop_on_signal():
            splits = {
                name: prepare_split(name, spec.split_from, out) if spec.split_from else {}
                for name, spec in suite.tasks.items()
            }
            _check_cells(checkpoints, suite, out, splits)
            results = [_score_model(m, suite, out, splits) for m in _models(checkpoints, suite)]
            check_stop(RESUME_HINT)
        report = build_results(results, suite)
        write_json_atomic(out / "results.json", report, "the results")
        write_text_atomic(out / "report.md", format_report(report), "the report")
        with atomic_file(out / "results.png", "the plot") as tmp:
            plot_results(report, tmp)
    print(format_report(report))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plot: {out / 'results.png'}")
    return report


def build_results(results: list[dict[str, Any]], suite: Suite) -> dict[str, Any]:
    """Models' scores, baselines per task, and the pretraining gain of each checkpoint over its control."""
    baselines = {}
    for res in results:
        for name, task in res["tasks"].items():
            if task["baseline"] and name not in baselines:
                baselines[name] = {
                    "name": task["baseline"]["name"],
                    "test": task["baseline"]["test"].get(task["metric"]),
                }
    gains = {}
    for res in results:
        control = next((r for r in results if r["kind"] == "control" and r["of"] == res["of"]), None)
        if res["kind"] == "checkpoint" and control is not None:
            diffs = [
                a - b for a, b in zip(res["average"]["per_seed"], control["average"]["per_seed"], strict=True)
            ]
            per_task = {n: res["tasks"][n]["mean"] - control["tasks"][n]["mean"] for n in res["tasks"]}
            gains[res["label"]] = {**_mean_std(diffs), "per_seed": diffs, "per_task": per_task}
    return {"seeds": suite.seeds, "lrs": suite.lrs, "models": results, "baselines": baselines, "gains": gains}


def format_report(report: dict[str, Any]) -> str:
    """report.md: task x {each model, baseline}, the suite average, the pretraining gain."""
    models = report["models"]
    tasks = list(models[0]["tasks"]) if models else []
    head = "| task (metric) | " + " | ".join(m["label"] for m in models) + " | baseline |"
    lines = [
        f"# twinlm evaluate: {len(report['seeds'])} seed(s) (mean ± std, test at the best dev point)",
        "",
        head,
        "|" + "---|" * (len(models) + 2),
    ]
    for name in tasks:
        cells = [f"{m['tasks'][name]['mean']:.4f} ± {m['tasks'][name]['std']:.4f}" for m in models]
        base = report["baselines"].get(name)
        metric = models[0]["tasks"][name]["metric"]
        lines.append(
            f"| {name} ({metric}) | " + " | ".join(cells) + f" | {base['test']:.4f} |"
            if base
            else f"| {name} ({metric}) | " + " | ".join(cells) + " | n/a |"
        )
    avg = [f"**{m['average']['mean']:.4f} ± {m['average']['std']:.4f}**" for m in models]
    bases = [report["baselines"][n]["test"] for n in tasks if n in report["baselines"]]
    base_avg = f"{statistics.fmean(bases):.4f}" if len(bases) == len(tasks) and bases else "n/a"
    lines.append("| **suite average** | " + " | ".join(avg) + f" | {base_avg} |")
    for label, gain in report["gains"].items():
        lines += [
            "",
            f"**Pretraining gain of {label}** (checkpoint - control, suite average): "
            f"{gain['mean'] * 100:+.2f} ± {gain['std'] * 100:.2f} points"
            + (
                " (one seed: no spread to compare it with)"
                if len(report["seeds"]) < 2
                else " (larger than the seed spread)"
                if abs(gain["mean"]) > gain["std"]
                else " (within the seed spread: no measurable difference)"
            ),
        ]
        lines.append("per task: " + ", ".join(f"{n} {v * 100:+.2f}" for n, v in gain["per_task"].items()))
    return "\n".join(lines) + "\n"


def plot_results(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per task, a bar per model (error bar: seed std) and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    tasks = list(models[0]["tasks"]) if models else []
    width = 0.8 / (len(models) + 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(tasks)), 4))
    for i, model in enumerate(models):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(
            xs,
            [model["tasks"][n]["mean"] for n in tasks],
            width,
            yerr=[model["tasks"][n]["std"] for n in tasks],
            label=model["label"],
            capsize=3,
        )
    xs = [t + len(models) * width for t in range(len(tasks))]
    ax.bar(
        xs,
        [(report["baselines"].get(n) or {}).get("test") or 0 for n in tasks],
        width,
        label="baseline",
        color="grey",
    )
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("test score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    evaluate_checkpoints(list(args.checkpoints), args.suite, args.out, list(args.overrides))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="fine-tune checkpoints on a task suite against a from-scratch control and baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoints", nargs="+", help="checkpoint folders (save_pretrained), e.g. outputs/tiny-mlm/final"
    )
    parser.add_argument("--suite", required=True, help="suite YAML, e.g. configs/evaluate/default.yaml")
    parser.add_argument("--out", default="outputs/evaluate", help="output folder (default: %(default)s)")
    parser.set_defaults(func=run, overrides=[])  # suite overrides: seeds=[0] lrs=[1e-3,2e-3] ...
    return parser
