"""`twinlm convert SRC_DIR OUT_DIR`: the parser only; `twinlm.convert` (torch) is imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    """Convert, then exit 1 when the logits differ by more than the tolerance."""
    from twinlm.convert import convert_checkpoint

    summary = convert_checkpoint(args.source, args.output, seed=args.seed)
    print(summary.format())
    if not summary.max_logit_difference <= args.tolerance:
        print(
            f"twinlm convert: logits differ by {summary.max_logit_difference:.3g} > tolerance {args.tolerance:g}"
        )
        return 1
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `twinlm convert SRC_DIR OUT_DIR` (called by twinlm.cli)."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a saved transformers BERT / GPT-2 checkpoint into a twinlm model",
        description=(
            "Convert a checkpoint directory of a transformers BertForMaskedLM, BertModel, GPT2LMHeadModel or "
            "GPT2Model into the equivalent twinlm model, and check that the logits match."
        ),
    )
    parser.add_argument("source", type=Path, metavar="SRC_DIR", help="directory written by save_pretrained()")
    parser.add_argument("output", type=Path, metavar="OUT_DIR", help="where the twinlm model is saved")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="fail (exit 1) if the max |logit difference| exceeds this (default 1e-4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random comparison batch")
    parser.set_defaults(func=run)
    return parser
