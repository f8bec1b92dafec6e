"""`twinlm pretrain --config RUN.yaml [section.key=value | --section.key value ...]` (one process, or
every process under `accelerate launch`; `scripts/pretrain.py` is the same entry point)."""

from __future__ import annotations

import argparse
import signal
from typing import Any

USAGE = "%(prog)s [-h] --config RUN.yaml [section.key=value | --section.key value ...]"
EPILOG = """overrides: any config field, dotted: training.lr=3e-4, --training.max_steps 200,
  training.max_minutes=60 (a training-time budget the LR schedule anneals to),
  model.overrides.hidden_size=128, data.seq_len=256, training.resume_from_checkpoint=latest,
  "data.sources=[../shared/data/corpus]" (values are read as YAML).
several processes / GPUs / DeepSpeed:
  accelerate launch --config_file configs/accelerate/multi-gpu.yaml scripts/pretrain.py --config RUN.yaml
exit status: 0 done, 2 bad config, 128+signal after a clean checkpoint on SIGINT/SIGTERM."""


def build_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", "-c", required=True, help="run config YAML (e.g. configs/pretrain/tiny-clm.yaml)"
    )
    # an `overrides` default marks a command that takes config overrides (see twinlm.cli.parse_args)
    parser.set_defaults(overrides=[])
    return parser


def run(args: argparse.Namespace) -> int:
    """Train; the exit status tells a scheduler whether the run finished (0) or was stopped (128+sig)."""
    from twinlm.training.loop import pretrain

    summary = pretrain(args.config, list(args.overrides))
    stopped = summary.get("interrupted_by")
    return 128 + int(getattr(signal, stopped)) if stopped else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a masked-LM or causal-LM model from a run config",
        description=__doc__,
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_arg_parser(parser)
    parser.set_defaults(func=run)
    return parser
