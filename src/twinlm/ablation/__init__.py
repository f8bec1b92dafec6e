"""`twinlm ablate QUESTION.yaml`: answer a Transformer design question by experiment.

An ablation config is one base pretraining run (a run config plus overrides: model, data, budget) and
named variants (more overrides), trained with the same data order, seeds and budget, at least two seeds
each. Each run is a normal twinlm run (resumable; finished runs are not rerun, runs whose inputs changed
are). After training, the measurements the config names are taken on each final model (see MEASURES). The
report (report.md, results.json, PNG plots) gives the table and a short answer computed from the numbers:
two variants are compared seed by seed with a paired t-test (twinlm.stats), the difference, its 95%
interval and the p-value are printed, "no measurable difference" where p >= 0.05; each textbook claim is
marked as agreeing or DISAGREEING with the measurement.

    twinlm ablate configs/ablations/02-scaled-attention.yaml --out docs/ablations/02-scaled-attention
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from twinlm.ablation.config import AblationConfig, Comparison, load_ablation
from twinlm.ablation.measures import MEASURES, MEASURES_FILE, Measurement
from twinlm.ablation.report import _aggregate, answer, check_claim, format_report, plot_ablation, write_index
from twinlm.ablation.runs import (
    RESUME_HINT,
    RUN_FILE,
    PlannedRun,
    plan_runs,
    prepare_tokenizers,
    run_config,
    run_overrides,
    run_variant,
)


@dataclasses.dataclass
class Question:
    """A question as it will run: its config (at its scale), report folder, runs folder and planned runs."""

    path: Path
    config: AblationConfig
    out: Path
    runs_root: Path
    planned: list[PlannedRun]


def prepare_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    scale: str | None = None,
) -> Question:
    """Everything checked before the first run trains: the question (at its scale), every variant's run and
    model config, the measures' parameters against each model, the output folders (one-line TwinLMError
    otherwise); the runs planned (named by what they compute, under `runs_dir`, default OUT/runs)."""
    from twinlm.fileio import check_writable_file, ensure_output_dir

    config = load_ablation(path, overrides, scale)
    out = Path(out) if out is not None else Path("outputs/ablations") / Path(path).stem
    runs_root = Path(runs_dir) if runs_dir is not None else out / "runs"
    ensure_output_dir(out, "--out")
    ensure_output_dir(runs_root, "--runs")
    for name in ("results.json", "report.md", "results.png"):
        check_writable_file(out / name, f"--out's {name}")
    return Question(Path(path), config, out, runs_root, plan_runs(config, runs_root))


def run_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    scale: str | None = None,
) -> dict[str, Any]:
    """Run every (variant, seed) of a question, measure, and write report.md, results.json and plots into
    `out` (default outputs/ablations/NAME). SIGINT/SIGTERM stop the whole question with its finished runs
    kept (`Interrupted`); the same command goes on from there."""
    from twinlm.stopping import stop_on_signal

    with stop_on_signal():
        return answer_question(prepare_ablation(path, out, runs_dir, overrides, scale))


def answer_question(question: Question) -> dict[str, Any]:
    """Train (or read back) every planned run of a prepared question, then report. Called inside
    `stop_on_signal()`: a signal stops at the next run, measurement or file."""
    from twinlm.session import run_folder
    from twinlm.stopping import check_stop

    with run_folder(question.out, "--out"):  # one run of a question per folder at a time
        prepare_tokenizers(question.planned)
        runs = [run_variant(question.config, planned) for planned in question.planned]
        check_stop(RESUME_HINT)
        result = _report(question.config, runs, question.out)
    check_stop(RESUME_HINT)  # a signal that came while the report was written: it is whole; stop now
    return result


def _report(config: AblationConfig, runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.json, report.md and the plots of a question whose runs are all finished."""
    from twinlm.fileio import write_json_atomic, write_text_atomic

    table = _aggregate(runs, list(config.variants))
    result = {
        "question": config.question,
        "textbook": config.textbook,
        "metric": config.metric,
        "scale": config.scale,
        "seeds": config.seeds,
        "table": table,
        "answer": answer(config, table),
        "runs": [{k: r[k] for k in ("variant", "seed", "run_dir", "values")} for r in runs],
    }
    write_json_atomic(out / "results.json", result, "the results")
    plots = plot_ablation(config, runs, table, out)
    write_text_atomic(out / "report.md", format_report(config, result, plots), "the report")
    print(f"\n{config.question}\n  answer: {result['answer']['text']}\n  report: {out / 'report.md'}")
    return result


def run(args: argparse.Namespace) -> int:
    """One or several questions: every one checked and planned before the first trains; with several, the
    runs are shared under one --runs folder (default OUT/runs) and each report goes to OUT/NAME."""
    from twinlm.errors import TwinLMError
    from twinlm.stopping import check_stop, stop_on_signal

    stems = [Path(p).stem for p in args.configs]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if len(args.configs) > 1 and twice:
        raise TwinLMError(f"two questions named {twice} would share a report folder; rename one of them")
    many = len(args.configs) > 1
    root = Path(args.out) if args.out is not None else None
    with stop_on_signal():
        questions = []
        for path in args.configs:
            out = (root / Path(path).stem if many else root) if root is not None else None
            runs = (
                args.runs if args.runs is not None else (root / "runs" if many and root is not None else None)
            )
            questions.append(prepare_ablation(path, out, runs, list(args.overrides), args.scale))
        results, seconds = {}, {}
        for question in questions:
            start = time.perf_counter()
            results[question.path.stem] = answer_question(question)
            seconds[question.path.stem] = time.perf_counter() - start
        if many and root is not None:
            print(f"index: {write_index(results, seconds, root)}")
        check_stop(RESUME_HINT)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ablate",
        help="answer a Transformer design question by experiment (variants x seeds, report, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "configs", nargs="+", help="ablation YAML(s), e.g. configs/ablations/02-scaled-attention.yaml"
    )
    parser.add_argument("--out", default=None, help="report folder (default: outputs/ablations/NAME)")
    parser.add_argument(
        "--runs", default=None, help="where the training runs go, shared by the questions (default: OUT/runs)"
    )
    parser.add_argument(
        "--scale",
        default=None,
        help="a scale of configs/ablation-scales.yaml: tiny, small, ... (default: the question as written)",
    )
    parser.set_defaults(func=run, overrides=[])  # config overrides: seeds=[0,1,2] ...
    return parser


__all__ = [
    "MEASURES",
    "MEASURES_FILE",
    "RUN_FILE",
    "AblationConfig",
    "Comparison",
    "Measurement",
    "Question",
    "add_parser",
    "answer",
    "answer_question",
    "check_claim",
    "load_ablation",
    "plan_runs",
    "prepare_ablation",
    "run_ablation",
    "run_config",
    "run_overrides",
    "run_variant",
    "write_index",
]
