"""`twinlm evaluate`: what pretraining bought, measured downstream.

Each checkpoint is fine-tuned on every task of a suite with several seeds (and optionally a small
learning-rate grid chosen on dev), next to two references run on the same splits:
- the **control**: the same architecture and tokenizer from random initialisation, fine-tuned the same way;
- the task's simple **baseline** (TF-IDF + logistic regression, most-frequent tag).
Test scores are those at the best dev point (never chosen on test). The report gives task x {checkpoint,
control, baseline} as mean +- std over seeds, the suite average and the pretraining gain (checkpoint -
control, per seed, then mean +- std). Finished cells are not rerun: an interrupted evaluation resumes.
Several checkpoints (e.g. masked-LM and replaced-token detection pretrained for the same minutes) are
compared with each other seed by seed, next to what their pretraining was (objective, training time, tokens,
from the training_info.json that `twinlm pretrain` writes), and the report says whether the training times
were equal (within 5%).

    twinlm evaluate outputs/tiny-mlm/final --suite configs/evaluate/default.yaml --out outputs/evaluate
    from twinlm.evaluation import evaluate_checkpoints
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, field_validator, model_validator

from twinlm.config import Section, Seed, build_config, check_folder_names, flatten_overrides
from twinlm.errors import Interrupted, TwinLMError
from twinlm.fileio import read_json
from twinlm.noise import NoiseKind
from twinlm.stats import Comparison as StatComparison

CELL_FILE = "cell.json"
CONTROL_FILE = "control.json"
RESUME_HINT = "the finished cells are kept: run the same command again to go on"
WORKER_STOP_GRACE_SECONDS = 60.0  # a stopping worker finishes its step and saves its run; then it is killed
EQUAL_TIME_TOLERANCE = 0.05  # training times within 5% of each other count as an equal-time comparison


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


class Noise(Section):
    """Test inputs perturbed at rising rates (twinlm.noise): each fine-tuned model is scored again on them."""

    rates: list[float] = Field(min_length=1, description="the share of words perturbed, each in (0, 1]")
    kinds: list[NoiseKind] = Field(default_factory=lambda: ["char", "token"], min_length=1)
    seed: int = 0

    @field_validator("rates")
    @classmethod
    def _shares(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0 < r <= 1]
        if bad:
            raise ValueError(f"rates {bad} are not shares of words in (0, 1]")
        return rates

    def keys(self) -> list[str]:
        """The names of the scores, e.g. char_noise0.1."""
        return [f"{kind}_noise{rate:g}" for kind in self.kinds for rate in self.rates]


class Suite(Section):
    """Tasks, seeds and the learning-rate grid; `overrides` apply to every task."""

    tasks: dict[str, SuiteTask] = Field(min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    lrs: list[PositiveFloat] | None = Field(
        None, min_length=1, description="learning rates to try; chosen per model on mean dev"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    control: bool = True
    noise: Noise | None = Field(None, description="score every model again on perturbed test inputs")
    jobs: int = Field(
        1,
        ge=1,
        description="cells fine-tuned at once, each in its own process with (torch threads // jobs) threads: "
        "small models use a core each better than they share them; results do not depend on it",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed: each seed is one fine-tuning run")
        return seeds

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, SuiteTask]) -> dict[str, SuiteTask]:
        check_folder_names(tasks, "task")
        return tasks


def load_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Read a suite YAML (with `key=value` overrides, e.g. seeds=[0]); a one-line TwinLMError naming the
    key on any problem."""
    suite = build_config(
        Suite, path, overrides, what="evaluation suite", example="configs/evaluate/default.yaml"
    )
    for name, task in suite.tasks.items():
        if not task.config.is_file():
            state = "is a folder, not a file" if task.config.is_dir() else "does not exist"
            raise TwinLMError(f"evaluation suite {path}: tasks.{name}.config {str(task.config)!r} {state}")
        for file in task.split_from.files if task.split_from else ():
            if not Path(file).is_file():
                state = "is a folder, not a file" if Path(file).is_dir() else "does not exist"
                raise TwinLMError(
                    f"evaluation suite {path}: tasks.{name}.split_from.files: {str(file)!r} {state}"
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


def _fingerprint(model_path: str, cfg: Any, noise: Any = None) -> str:
    """What a cell's result depends on: the model's files (weights, config, tokenizer), the resolved
    fine-tuning config (task, settings, seed, lr) and the contents of the files it reads (the task's, a
    separate tokenizer's); not where they lie, so the same cell is found again under another spelling of a
    path."""
    from twinlm.fingerprint import computed_settings, files_digest, fingerprint, model_folder_digest

    run = computed_settings(cfg, {"model": {"path"}})
    task_files = [str(f) for f in (cfg.task.train, cfg.task.dev, cfg.task.test) if f is not None]
    tokenizer = [cfg.model.tokenizer] if cfg.model.tokenizer and Path(cfg.model.tokenizer).exists() else []
    for split in ("train", "dev", "test"):  # paths are compared by content, below
        run["task"][split] = None
    return fingerprint(
        {
            "model": model_folder_digest(model_path),
            "run": run,
            "task_files": list(files_digest(task_files).values()),
            "tokenizer": list(files_digest(tokenizer).values()),
            **({"noise": noise.model_dump(mode="json")} if noise is not None else {}),
        }
    )


class EvaluationInterrupted(Interrupted):
    """A fine-tuning run of the evaluation was stopped (SIGINT/SIGTERM): the evaluation stops too."""


def finished_cell(fingerprint: str, model_path: str, folder: Path, cache: Path | None = None) -> dict | None:
    """A cell's result when it was finished with this fingerprint, in `folder` or in the shared `cache` of
    finished cells (copied into `folder` then); None when it has to run."""
    from twinlm.fileio import write_json_atomic

    done = folder / CELL_FILE
    if done.is_file():
        cell = read_json(done)
        if cell.get("fingerprint") == fingerprint:
            return cell
        print(f"re-running {folder}: the model, its task files or the settings changed since it was run")
    shared = cache / f"{fingerprint[:32]}.json" if cache is not None else None
    if shared is not None and read_json(shared).get("fingerprint") == fingerprint:
        cell = {**read_json(shared), "model": model_path}  # the same cell, run by another evaluation
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(done, cell, f"the result of {folder}")
        return cell
    return None


def run_cell(
    model_path: str,
    task: str,
    spec: SuiteTask,
    overrides: dict[str, Any],
    folder: Path,
    noise: Noise | None = None,
    cache: Path | None = None,
) -> dict:
    """Fine-tune once (or read the finished result when nothing it depends on changed, here or in the
    shared `cache` of finished cells): best dev and its test scores, the baseline if run, and with `noise`
    the test scores on perturbed inputs."""
    cfg = cell_config(model_path, spec, overrides, folder)
    fingerprint = _fingerprint(model_path, cfg, noise)
    cell = finished_cell(fingerprint, model_path, folder, cache)
    if cell is not None:
        return cell
    return fine_tune_cell(model_path, task, cfg, fingerprint, folder, noise, cache)


def fine_tune_cell(
    model_path: str,
    task: str,
    cfg: Any,
    fingerprint: str,
    folder: Path,
    noise: Noise | None = None,
    cache: Path | None = None,
) -> dict:
    """Run a cell that is not finished: fine-tune, record the result in `folder` (and the shared `cache`)."""
    import shutil
    import signal

    from twinlm.fileio import write_json_atomic

    shared = cache / f"{fingerprint[:32]}.json" if cache is not None else None
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
    if noise is not None:
        cell["noise"] = noisy_scores(folder / "run" / "best", cfg, noise, cell["metric"])
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / CELL_FILE, cell, f"the result of {folder}")
    if shared is not None:
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(shared, cell, "a shared finished cell")
    shutil.rmtree(folder / "run", ignore_errors=True)  # the fine-tuned weights are not needed: scores are
    return cell


def noisy_scores(best: Path, cfg: Any, noise: Noise, metric: str) -> dict[str, float]:
    """The best model's test `metric` on the test split perturbed at every rate and kind (twinlm.noise)."""
    from twinlm.finetune.data import load_task
    from twinlm.finetune.loop import score_saved_model
    from twinlm.noise import perturb_split, training_vocabulary

    splits, _ = load_task(cfg.task, cfg.training.seed)
    vocabulary = training_vocabulary(splits["train"])
    scores = {}
    for kind in noise.kinds:
        for rate in noise.rates:
            perturbed = perturb_split(splits["test"], kind, rate, noise.seed, vocabulary)
            scores[f"{kind}_noise{rate:g}"] = score_saved_model(best, cfg, perturbed)[metric]
    return scores


# ------------------------------------------------------------------------------------------------
# The grid and the report
# ------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def check_tokenizer(checkpoint: str) -> None:
    """The checkpoint's tokenizer loads (a damaged tokenizer.json is found before anything trains)."""
    from twinlm.tokenization import auto_tokenizer

    try:
        auto_tokenizer(checkpoint)
    except Exception as err:  # tokenizers raises its own Exception types for damaged files
        detail = " ".join(str(err).split())[:200] or err.__class__.__name__
        raise TwinLMError(
            f"the tokenizer in {checkpoint!r} does not load ({detail}); save it again"
        ) from None


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """Short, distinct names (distinct as folder names too): the folder (its parent for .../final or .../best),
    with more of the path, then a number, where two would collide."""
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
    # distinct as folder names too (a/x and a_x would share runs/a_x, controls/a_x-seed0)
    for label in labels:
        seen[_slug(label)] = seen.get(_slug(label), 0) + 1
        count = seen[_slug(label)]
        unique.append(label if count == 1 else f"{label}-{count}")
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


def _check_cells(model_path: str, suite: Suite, out: Path, splits: dict[str, dict]) -> None:
    """Before anything trains: every task config with every cell's overrides is valid, names files that
    exist, has the dev and test splits the report needs, and its data reads (columns, labels) (one-line
    TwinLMError naming the task otherwise)."""
    from twinlm.finetune.data import load_task

    for name, spec in suite.tasks.items():
        for lr in suite.lrs or [None]:
            overrides = _cell_overrides(suite, name, splits[name], suite.seeds[0], lr, True)
            try:
                cfg = cell_config(model_path, spec, overrides, out / "check")
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
        try:
            load_task(cfg.task, suite.seeds[0])  # the files read, their columns and labels
        except TwinLMError as err:
            raise TwinLMError(f"tasks.{name} ({spec.config}): {err}") from None


def check_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """A suite checked as `twinlm evaluate` checks it before the first fine-tuning run (every task config with
    its overrides, its splits and its data), without a checkpoint: for commands that will evaluate later
    (ablate's downstream measure)."""
    import tempfile

    suite = load_suite(path, overrides)
    with tempfile.TemporaryDirectory(prefix="twinlm-suite-check-") as tmp:
        splits = {
            name: prepare_split(name, spec.split_from, Path(tmp)) if spec.split_from else {}
            for name, spec in suite.tasks.items()
        }
        _check_cells("checkpoint", suite, Path(tmp), splits)
    return suite


@dataclasses.dataclass(frozen=True)
class PlannedCell:
    """One fine-tuning run of an evaluation: a model's (task, lr, seed), its config and fingerprint."""

    model: str  # the evaluated model's label
    task: str
    lr: float | None
    seed: int
    path: str
    cfg: Any
    fingerprint: str
    folder: Path
    noise: Noise | None
    cache: Path | None

    def finished(self) -> dict | None:
        """Its result when it was finished before (here or in the shared cache): read back, not run."""
        return finished_cell(self.fingerprint, self.path, self.folder, self.cache)

    def run(self) -> dict:
        return fine_tune_cell(
            self.path, self.task, self.cfg, self.fingerprint, self.folder, self.noise, self.cache
        )


def _plan_cells(
    model: EvaluatedModel, suite: Suite, out: Path, splits: dict[str, dict], cache: Path | None = None
) -> list[PlannedCell]:
    """Every (task, lr, seed) cell of one model, its control weights made (one per seed) beforehand."""
    cells = []
    for name, spec in suite.tasks.items():
        for lr in suite.lrs or [None]:
            for seed in suite.seeds:
                baseline = model.kind == "checkpoint" and seed == suite.seeds[0]
                path = model.path(seed, out)
                folder = out / "runs" / _slug(model.label) / name / f"lr{lr}-seed{seed}"
                overrides = _cell_overrides(suite, name, splits[name], seed, lr, baseline)
                cfg = cell_config(path, spec, overrides, folder)
                fingerprint = _fingerprint(path, cfg, suite.noise)
                cells.append(
                    PlannedCell(
                        model.label, name, lr, seed, path, cfg, fingerprint, folder, suite.noise, cache
                    )
                )
    return cells


def _score_model(model: EvaluatedModel, suite: Suite, done: dict[tuple, dict]) -> dict[str, Any]:
    """One model's scores from its finished cells (keyed by (label, task, lr, seed)); per task, the lr with
    the best mean dev metric."""
    lrs = suite.lrs or [None]
    tasks = {}
    for name in suite.tasks:
        by_lr = {lr: [done[(model.label, name, lr, seed)] for seed in suite.seeds] for lr in lrs}
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
        if suite.noise is not None:  # the test metric on perturbed inputs, mean over seeds at the chosen lr
            tasks[name]["noise"] = {
                key: statistics.fmean(c["noise"][key] for c in cells) for key in suite.noise.keys()
            }
    per_seed = [statistics.fmean(t["test"][i] for t in tasks.values()) for i in range(len(suite.seeds))]
    result = {
        "label": model.label,
        "kind": model.kind,
        "of": model.of,
        "tasks": tasks,
        "average": {"per_seed": per_seed, **_mean_std(per_seed)},
    }
    if suite.noise is not None:
        result["noise"] = {name: task["noise"] for name, task in tasks.items()}
    return result


# ------------------------------------------------------------------------------------------------
# Running the cells: one after another, or `jobs` at once in worker processes
# ------------------------------------------------------------------------------------------------
def _key(cell: PlannedCell) -> tuple:
    return (cell.model, cell.task, cell.lr, cell.seed)


def _announce(cell: PlannedCell, result: dict, index: int, total: int) -> None:
    score = result["test"].get(result["metric"])
    shown = f"{result['metric']} {score:.4f}" if score is not None else "no score"
    print(
        f"[{index}/{total}] {cell.model} {cell.task} lr={cell.lr} seed={cell.seed}: test {shown}"
        f" ({result.get('seconds') or 0:.0f} s)",
        flush=True,
    )


def run_cells(cells: list[PlannedCell], jobs: int = 1) -> tuple[dict[tuple, dict], list[tuple]]:
    """Every cell's result, keyed by (model label, task, lr, seed), and the keys of those fine-tuned now (the
    others were finished before and are read back). With jobs > 1 the cells to run are fine-tuned `jobs` at a
    time, each in a spawned process with (this process's torch threads // jobs) threads; a signal here
    stops them all (each stops as a single run does: its cell is not recorded)."""
    from twinlm.stopping import check_stop

    results: dict[tuple, dict] = {}
    todo: list[PlannedCell] = []
    for cell in cells:  # in order: read back, or (one job) run
        check_stop(RESUME_HINT)
        found = cell.finished()
        if found is not None:
            results[_key(cell)] = found
        elif jobs == 1:
            results[_key(cell)] = cell.run()
            todo.append(cell)
            _announce(cell, results[_key(cell)], len(results), len(cells))
        else:
            todo.append(cell)
    if jobs > 1 and todo:
        results.update(_run_in_workers(todo, jobs, len(results), len(cells)))
    return results, [_key(c) for c in todo]


def _run_in_workers(cells: list[PlannedCell], jobs: int, finished: int, total: int) -> dict[tuple, dict]:
    import multiprocessing
    import os
    import queue
    from unittest import mock

    import torch

    from twinlm.stopping import stop_requested

    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    todo, done = context.Queue(), context.Queue()
    todo.cancel_join_thread()  # cells no worker took are dropped at exit, not waited on (a stop leaves some)
    for index, cell in enumerate(cells):
        todo.put((index, cell))
    workers = [
        context.Process(target=_cell_worker, args=(todo, done, max(1, torch.get_num_threads() // jobs)))
        for _ in range(min(jobs, len(cells)))
    ]
    for _ in workers:
        todo.put(None)
    # the workers inherit TQDM_DISABLE (read by tqdm and by the training bar): no interleaved bars, a line per cell here
    with mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}):
        for worker in workers:
            worker.start()
    results: dict[tuple, dict] = {}
    failure: tuple[str, str] | None = None
    forwarded = False

    def forward_stop() -> None:  # each worker stops as a single run would (SIGTERM only sets its stop flag)
        nonlocal forwarded
        if not forwarded:
            forwarded = True
            # a Ctrl-C at a terminal reached them already; a second would stop them at once
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()

    try:
        while len(results) < len(cells) and failure is None:
            if stop_requested() is not None:
                forward_stop()
            try:
                index, result, error = done.get(timeout=0.5)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and done.empty():
                    codes = [w.exitcode for w in workers]
                    failure = ("crash", f"the fine-tuning worker processes ended (exit codes {codes})")
                continue
            if error is not None:
                failure = error
                continue
            results[_key(cells[index])] = result
            _announce(cells[index], result, finished + len(results), total)
    finally:
        if len(results) < len(cells):  # a failure, or an exception here: the others stop at their next step
            forward_stop()
        _wait_for_workers(workers, done, grace=WORKER_STOP_GRACE_SECONDS)
        todo.close()
    if failure is not None:
        _raise_worker_failure(*failure)
    return results


def _wait_for_workers(workers: list, done: Any, grace: float) -> None:
    """Every worker ended: `done` is drained meanwhile (a worker flushes its last message before it exits), and
    one still alive after `grace` seconds is killed, so that nothing is left for the interpreter's exit to join."""
    import queue
    import time

    deadline = time.monotonic() + grace
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        try:
            done.get(timeout=0.2)
        except queue.Empty:
            pass
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join()


def _raise_worker_failure(kind: str, message: str) -> None:
    """A worker's failure, raised here as the single process would have raised it."""
    from twinlm.stopping import raise_interrupted, stop_requested

    if kind == "interrupted" or stop_requested() is not None:  # (a worker signalled before it listened)
        raise_interrupted(stop_requested() or "SIGTERM", RESUME_HINT)
    if kind == "error":
        raise TwinLMError(message)
    raise RuntimeError(f"a fine-tuning cell failed in its worker process: {message}")


def _cell_worker(todo: Any, done: Any, threads: int) -> None:
    """A worker process: run cells from `todo` until None (or a stop), put (index, result, error) on `done`.

    The signal handlers stay installed until the last message is flushed to the parent: a SIGTERM in that
    window would otherwise kill the process while its queue thread holds the queue's shared write lock, and
    the other workers would wait on that lock forever (and the parent on them)."""
    import traceback

    import torch

    from twinlm.stopping import stop_on_signal, stop_requested

    torch.set_num_threads(threads)
    with stop_on_signal():
        try:
            while (item := todo.get()) is not None:
                index, cell = item
                if stop_requested() is not None:  # stopped between two cells: the next one is not begun
                    done.put((index, None, ("interrupted", "")))
                    return
                try:
                    done.put((index, cell.run(), None))
                except (Interrupted, KeyboardInterrupt):
                    done.put((index, None, ("interrupted", "")))
                    return
                except TwinLMError as err:
                    done.put((index, None, ("error", str(err))))
                    return
                except BaseException:  # noqa: BLE001 - reported by the parent, with its traceback
                    done.put((index, None, ("crash", traceback.format_exc())))
                    return
        finally:
            done.close()
            done.join_thread()  # every message written, the queue's lock released, before a signal can kill


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label).strip("_")


def pretraining_facts(checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's pretraining (objective, train_seconds, tokens_seen, steps) from the training_info.json
    `twinlm pretrain` leaves beside the weights; None for a checkpoint without it."""
    summary = read_json(Path(checkpoint) / "training_info.json").get("training_summary") or {}
    facts = {key: summary.get(key) for key in ("objective", "train_seconds", "tokens_seen", "steps")}
    return facts if any(value is not None for value in facts.values()) else None


def equal_time(facts: list[dict[str, Any] | None]) -> bool | None:
    """Whether checkpoints were pretrained for the same time (within EQUAL_TIME_TOLERANCE); None when fewer
    than two are compared or a training time is unknown."""
    seconds = [f.get("train_seconds") if f else None for f in facts]
    if len(seconds) < 2 or any(not s for s in seconds):
        return None
    return max(seconds) <= min(seconds) * (1 + EQUAL_TIME_TOLERANCE)


def evaluate_checkpoints(
    checkpoints: list[str],
    suite_path: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    cells_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune every checkpoint (and its control) on every task; write report.md, results.json, a PNG.

    Everything is checked before the first fine-tuning run (the suite, every task config with its
    overrides, the checkpoints, the output folder); SIGINT/SIGTERM stop the whole evaluation with its
    finished cells kept (`Interrupted`), and the same command goes on from there."""
    from twinlm.fileio import (
        atomic_file,
        check_writable_file,
        ensure_output_dir,
        write_json_atomic,
        write_text_atomic,
    )
    from twinlm.model_folder import check_model_folder
    from twinlm.session import run_folder
    from twinlm.stopping import check_stop, stop_on_signal

    suite, out = load_suite(suite_path, overrides), Path(out)
    for ckpt in checkpoints:
        check_model_folder(ckpt, "checkpoint", tokenizer=True)
        check_tokenizer(ckpt)
    ensure_output_dir(out, "--out")
    for name in ("controls", "runs", "data"):
        ensure_output_dir(out / name, f"--out's {name} folder")
    for name in ("results.json", "report.md", "results.png"):
        check_writable_file(out / name, f"--out's {name}")
    with run_folder(out, "--out"), stop_on_signal():  # one evaluation per folder; a signal: a clean stop
        started = time.monotonic()
        splits = {
            name: prepare_split(name, spec.split_from, out) if spec.split_from else {}
            for name, spec in suite.tasks.items()
        }
        _check_cells(checkpoints[0], suite, out, splits)
        cache = Path(cells_cache) if cells_cache is not None else None
        models = _models(checkpoints, suite)
        planned = [cell for m in models for cell in _plan_cells(m, suite, out, splits, cache)]
        _say_unpinned_hub_tasks(planned)
        done, fresh = run_cells(planned, suite.jobs)
        timing = {
            "jobs": suite.jobs,
            "cells": len(planned),
            "cells_run": len(fresh),
            "wall_seconds": round(time.monotonic() - started, 1),
            "fine_tuning_seconds": round(sum(done[key].get("seconds") or 0.0 for key in fresh), 1),
        }
        results = [_score_model(m, suite, done) for m in models]
        check_stop(RESUME_HINT)
        pretraining = {
            label: pretraining_facts(ckpt)
            for ckpt, label in zip(checkpoints, checkpoint_labels(checkpoints), strict=True)
        }
        report = {**build_results(results, suite, pretraining), "timing": timing}
        write_json_atomic(out / "results.json", report, "the results")
        write_text_atomic(out / "report.md", format_report(report), "the report")
        with atomic_file(out / "results.png", "the plot") as tmp:
            plot_results(report, tmp)
        check_stop(RESUME_HINT)  # a signal that came while the report was written: it is whole; stop now
    print(format_report(report))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plot: {out / 'results.png'}")
    return report


def _say_unpinned_hub_tasks(cells: list[PlannedCell]) -> None:
    """A finished cell is found again by its inputs' fingerprint; a Hub dataset without `task.hub.revision`
    enters it by name only, so its cells would be read back after the dataset changed upstream: say so."""
    unpinned = sorted(
        {c.task for c in cells if c.cfg.task.hub is not None and c.cfg.task.hub.revision is None}
    )
    for task in unpinned:
        hub = next(c.cfg.task.hub for c in cells if c.task == task)
        print(
            f"note: task {task!r} reads the Hub dataset {hub.name} at no pinned revision: its finished cells are "
            "read back even if the dataset changed since; set task.hub.revision (a commit sha) to pin it"
        )


def difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a - b on the suite average, seed by seed (the same seeds fine-tune both): mean, std, the paired
    t-test's interval and p-value (twinlm.stats), and per task the same on its test scores."""
    from twinlm.stats import compare

    diffs = [x - y for x, y in zip(a["average"]["per_seed"], b["average"]["per_seed"], strict=True)]
    test = compare(a["average"]["per_seed"], b["average"]["per_seed"], paired=True)
    per_task = {n: a["tasks"][n]["mean"] - b["tasks"][n]["mean"] for n in a["tasks"]}
    per_task_tests = {
        n: dataclasses.asdict(compare(a["tasks"][n]["test"], b["tasks"][n]["test"], paired=True))
        for n in a["tasks"]
    }
    return {
        **_mean_std(diffs),
        "per_seed": diffs,
        "per_task": per_task,
        "test": dataclasses.asdict(test),
        "per_task_tests": per_task_tests,
    }


def build_results(
    results: list[dict[str, Any]], suite: Suite, pretraining: dict[str, dict[str, Any] | None] | None = None
) -> dict[str, Any]:
    """Models' scores, baselines per task, the pretraining gain of each checkpoint over its control, each
    later checkpoint against the first (seed by seed), and what each checkpoint's pretraining was."""
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
            gains[res["label"]] = difference(res, control)
    checkpoints = [r for r in results if r["kind"] == "checkpoint"]
    comparisons = {
        f"{other['label']} vs {checkpoints[0]['label']}": difference(other, checkpoints[0])
        for other in checkpoints[1:]
    }
    pretraining = pretraining or {}
    return {
        "seeds": suite.seeds,
        "lrs": suite.lrs,
        "models": results,
        "baselines": baselines,
        "gains": gains,
        "comparisons": comparisons,
        "pretraining": pretraining,
        "equal_time": equal_time([pretraining.get(r["label"]) for r in checkpoints]),
    }


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
        test = StatComparison(**gain["test"])
        lines += [
            "",
            f"**Pretraining gain of {label}** (checkpoint - control, suite average, seed by seed): "
            f"{test.describe('points', scale=100, digits=3)}: {test.verdict()}; ± {gain['std'] * 100:.2f} "
            "points over seeds",
        ]
        lines.append("per task: " + ", ".join(f"{n} {v * 100:+.2f}" for n, v in gain["per_task"].items()))
    return "\n".join(lines + _noise_lines(report) + _pretraining_lines(report) + _timing_lines(report)) + "\n"


def _timing_lines(report: dict[str, Any]) -> list[str]:
    """How long this evaluation took: the cells it fine-tuned (not those read back), with how many jobs."""
    timing = report.get("timing")
    if not timing:
        return []
    back = timing["cells"] - timing["cells_run"]
    return [
        "",
        f"Time: {timing['wall_seconds'] / 60:.1f} minutes of wall clock for this evaluation, "
        f"{timing['cells_run']} of {timing['cells']} cells fine-tuned ({timing['jobs']} at a time, "
        f"{timing['fine_tuning_seconds'] / 60:.1f} minutes summed over them)"
        + (f"; {back} read back, finished before" if back else "")
        + ".",
    ]


def _noise_lines(report: dict[str, Any]) -> list[str]:
    """With a suite's noise section: per task, each model's test score at every perturbation."""
    models = [m for m in report["models"] if m.get("noise")]
    if not models:
        return []
    keys = list(next(iter(models[0]["noise"].values())))
    lines = ["", "## Test inputs with noise (twinlm.noise; mean over seeds)", ""]
    lines += ["| task | model | clean | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for model in models:
        for task, curve in model["noise"].items():
            clean = model["tasks"][task]["mean"]
            lines.append(
                f"| {task} | {model['label']} | {clean:.4f} | "
                + " | ".join(f"{curve[k]:.4f}" for k in keys)
                + " |"
            )
    return lines


def _pretraining_lines(report: dict[str, Any]) -> list[str]:
    """What each checkpoint's pretraining was, whether the times were equal, and the checkpoints against
    each other (nothing for one checkpoint of unknown pretraining)."""
    facts = {label: f for label, f in (report.get("pretraining") or {}).items() if f}
    comparisons = report.get("comparisons") or {}
    if not facts and not comparisons:
        return []

    def value(f: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
        return "n/a" if f.get(key) is None else format(f[key] / scale, spec)

    lines = ["", "## Pretraining of the checkpoints", ""]
    if facts:
        lines += ["| checkpoint | objective | training minutes | tokens | steps |", "|---|---|---|---|---|"]
        lines += [
            f"| {label} | {f.get('objective') or 'n/a'} | {value(f, 'train_seconds', '.1f', 60.0)} | "
            f"{value(f, 'tokens_seen', ',')} | {value(f, 'steps', ',')} |"
            for label, f in facts.items()
        ]
    same = report.get("equal_time")
    if same is not None:
        lines += [
            "",
            "The checkpoints were pretrained for the same time (within "
            f"{EQUAL_TIME_TOLERANCE:.0%}): an equal-wall-clock comparison."
            if same
            else f"The training times differ by more than {EQUAL_TIME_TOLERANCE:.0%}: this is NOT an "
            "equal-wall-clock comparison.",
        ]
    for name, diff in comparisons.items():
        test = StatComparison(**diff["test"])
        lines += [
            "",
            f"**{name}** (the same seeds, suite average): {test.describe('points', scale=100, digits=3)}: "
            f"{test.verdict()}; per task: "
            + ", ".join(f"{n} {v * 100:+.2f}" for n, v in diff["per_task"].items()),
        ]
    return lines


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
    evaluate_checkpoints(list(args.checkpoints), args.suite, args.out, list(args.overrides), args.cells_cache)
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
    parser.add_argument(
        "--cells-cache",
        default=None,
        help="a folder of finished cells shared by evaluations: a cell whose model files, settings and task "
        "files are the same (e.g. the control of the same architecture and tokenizer) runs once",
    )
    parser.set_defaults(func=run, overrides=[])  # suite overrides: seeds=[0] lrs=[1e-3,2e-3] ...
    return parser
