"""`twinlm pretrain --config RUN.yaml [section.key=value | --section.key value ...]` (one process, or
every process under `accelerate launch`; `scripts/pretrain.py` is the same entry point)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

USAGE = "%(prog)s [-h] --config RUN.yaml [section.key=value | --section.key value ...]"
EPILOG = """overrides: any config field, dotted: training.lr=3e-4, --training.max_steps 200,
  model.overrides.hidden_size=128, data.seq_len=256, training.resume_from_checkpoint=latest,
  "data.sources=[../shared/data/corpus]" (values are read as YAML).
several processes / GPUs / DeepSpeed:
  accelerate launch --config_file configs/accelerate/multi-gpu.yaml scripts/pretrain.py --config RUN.yaml
exit status: 0 done, 2 bad config, 128+signal after a clean checkpoint on SIGINT/SIGTERM."""


def _split_overrides(
    parse: Callable[..., tuple[argparse.Namespace, list[str]]],
    args: Sequence[str] | None = None,
    namespace: argparse.Namespace | None = None,
) -> tuple[argparse.Namespace, list[str]]:
    """Let argparse see only --config/-h; every other argument is a config override (kept in order).

    argparse would reject `--training.lr 3e-4` as an unknown option, and the set of config keys is
    open-ended (model overrides), so overrides are taken out before argparse parses the rest.
    """
    args = list(sys.argv[1:] if args is None else args)
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            own += args[i : i + 2]
            i += 2
            continue
        (own if arg.startswith("--config=") or arg in ("-h", "--help") else overrides).append(arg)
        i += 1
    namespace, extra = parse(own, namespace)
    namespace.overrides = overrides
    return namespace, extra


def build_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", "-c", required=True, help="run config YAML (e.g. configs/pretrain/tiny-clm.yaml)"
    )
    parser.set_defaults(overrides=[])
    original = parser.parse_known_args
    parser.parse_known_args = lambda args=None, namespace=None: _split_overrides(original, args, namespace)  # type: ignore[method-assign]
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
