"""Fine-tuning twinlm checkpoints on sequence classification and token classification (`twinlm finetune`).

    twinlm finetune --config configs/finetune/sst2.yaml [section.key=value | --section.key value ...]
    accelerate launch scripts/finetune.py --config configs/finetune/conll2003.yaml

    from twinlm.finetune import finetune
    summary = finetune("configs/finetune/sst2.yaml", ["training.max_steps=200"])

Heavy imports (torch, transformers) happen only when a run starts, so `twinlm --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """overrides: any config field, dotted: training.lr=1e-4, --training.epochs 2, task.max_train_examples=5000,
  model.path=outputs/tiny-mlm/final, hub.push=true hub.repo_id=user/name.
several processes / GPUs:
  accelerate launch --config_file configs/accelerate/multi-gpu.yaml scripts/finetune.py --config TASK.yaml
outputs: OUTPUT_DIR/best (save_pretrained + tokenizer), OUTPUT_DIR/metrics.json (every evaluation, the best,
  the baseline). exit status: 0 done, 2 bad config or data (or a NaN/inf loss), 128+signal when stopped."""


def finetune(source: Any, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a fine-tuning job from a YAML path, dict or FinetuneConfig; see `twinlm.finetune.loop`."""
    from twinlm.finetune.loop import finetune as _finetune

    return _finetune(source, overrides)


def build_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", "-c", required=True, help="fine-tuning config YAML (e.g. configs/finetune/sst2.yaml)"
    )
    # an `overrides` default marks a command that takes config overrides (see twinlm.cli.parse_args)
    parser.set_defaults(overrides=[])
    return parser


def run(args: argparse.Namespace) -> int:
    """Fine-tune; 0 when the run finished, 128+signal when SIGINT/SIGTERM stopped it (the best model so
    far is kept); the report is printed by the run itself."""
    import signal

    stopped = finetune(args.config, list(args.overrides)).get("interrupted_by")
    return 128 + int(getattr(signal, stopped)) if stopped else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a twinlm checkpoint for sequence or token classification",
        description=__doc__,
        usage="%(prog)s [-h] --config TASK.yaml [section.key=value | --section.key value ...]",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build_arg_parser(parser)
    parser.set_defaults(func=run)
    return parser


__all__ = ["add_parser", "build_arg_parser", "finetune", "run"]
