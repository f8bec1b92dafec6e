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
import time
from pathlib import Path
from typing import Any

from twinlm.ablation.config import AblationConfig, Comparison, load_ablation
from twinlm.ablation.measures import MEASURES, MEASURES_FILE, Measurement
from twinlm.ablation.report import _aggregate, answer, check_claim, format_report, plot_ablation, write_index
from twinlm.ablation.runs import (
    RESUME_HINT,
    RUN_FILE,
    check_variants,
    run_config,
    run_overrides,
    run_variant,
)


def _folders(path: str | Path, out: str | Path | None, runs_dir: str | Path | None) -> tuple[Path, Path]:
    out = Path(out) if out is not None else Path("outputs/ablations") / Path(path).stem
    return out, Path(runs_dir) if runs_dir is not None else out / "runs"


def prepare_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> AblationConfig:
    """Everything checked before the first run trains: the question, every variant's run and model config,
    the measures' parameters, the output folders (one-line TwinLMError otherwise)."""
    from twinlm.fileio import ensure_output_dir

    config = load_ablation(path, overrides)
    out, runs = _folders(path, out, runs_dir)
    ensure_output_dir(out, "--out")
    ensure_output_dir(runs, "--runs")
    check_variants(config, runs)
    return config


def run_ablation(
    path: str | Path,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run every (variant, seed) under `runs_dir` (default OUT/runs), measure, and write report.md,
    results.json and plots into `out` (default outputs/ablations/NAME). SIGINT/SIGTERM stop the whole
    question with its finished runs kept (`Interrupted`); the same command goes on from there."""
    from twinlm.session import run_folder
    from twinlm.stopping import check_stop, stop_on_signal

    config = prepare_ablation(path, out, runs_dir, overrides)
    out, where = _folders(path, out, runs_dir)
    with run_folder(out, "--out"):  # one run of a question per folder at a time
        with stop_on_signal():
            runs = [
                run_variant(config, name, seed, where) for name in config.variants for seed in config.seeds
            ]
            check_stop(RESUME_HINT)
        return _report(config, runs, out)


def _report(config: AblationConfig, runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.json, report.md and the plots of a question whose runs are all finished."""
    from twinlm.fileio import write_json_atomic, write_text_atomic

    table = _aggregate(runs, list(config.variants))
    result = {
        "question": config.question,
        "textbook": config.textbook,
        "metric": config.metric,
        "seeds": config.seeds,
        "table": table,
        "answer": answer(config, table),
        "runs": [{k: r[k] for k in ("variant", "seed", "values")} for r in runs],
    }
    write_json_atomic(out / "results.json", result, "the results")
    plots = plot_ablation(config, runs, table, out)
    write_text_atomic(out / "report.md", format_report(config, result, plots), "the report")
    print(f"\n{config.question}\n  answer: {result['answer']['text']}\n  report: {out / 'report.md'}")
    return result


def run(args: argparse.Namespace) -> int:
    many = len(args.configs) > 1

    def folders(path: str) -> tuple[Path | None, Path | None]:
        name = Path(path).stem
        out = None if args.out is None else Path(args.out) / name if many else Path(args.out)
        runs = None if args.runs is None else Path(args.runs) / name if many else Path(args.runs)
        return out, runs

    for path in args.configs:  # every question checked before the first one trains
        prepare_ablation(path, *folders(path), list(args.overrides))
    results, seconds = {}, {}
    for path in args.configs:
        start = time.perf_counter()
        results[Path(path).stem] = run_ablation(path, *folders(path), list(args.overrides))
        seconds[Path(path).stem] = time.perf_counter() - start
    if many and args.out is not None:
        print(f"index: {write_index(results, seconds, Path(args.out))}")
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
    parser.add_argument("--runs", default=None, help="where the training runs go (default: OUT/runs)")
    parser.set_defaults(func=run, overrides=[])  # config overrides: seeds=[0,1,2] ...
    return parser


__all__ = [
    "MEASURES",
    "MEASURES_FILE",
    "RUN_FILE",
    "AblationConfig",
    "Comparison",
    "Measurement",
    "add_parser",
    "answer",
    "check_claim",
    "load_ablation",
    "prepare_ablation",
    "run_ablation",
    "run_config",
    "run_overrides",
    "run_variant",
    "write_index",
]
