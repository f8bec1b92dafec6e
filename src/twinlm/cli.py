"""The `twinlm` command line: one sub-command per job.

Each job lives in its own module, which exposes `add_parser(subparsers)`; the module is imported
only when its sub-command is built, so `twinlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from twinlm.errors import TwinLMError

# sub-command -> module that implements it (the module defines `add_parser(subparsers)` which sets
# `func` on its parser: func(args) -> int exit code).
COMMANDS: dict[str, str] = {
    "tokenizer": "twinlm.tokenization",
    "pretrain": "twinlm.training.cli",
    "finetune": "twinlm.finetune",
    "convert": "twinlm.convert",
    "push": "twinlm.hub",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a job not built yet must not break the others
            if err.name and err.name.startswith("twinlm"):
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TwinLMError as err:
        print(f"twinlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
