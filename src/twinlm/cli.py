"""The `twinlm` command line: one sub-command per job.

Each job lives in its own module, which exposes `add_parser(subparsers)`. Only the module of the
command being run is imported, so `twinlm --help` stays fast and a problem in one job never breaks
another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from twinlm.errors import Interrupted, TwinLMError, resource_problem

# sub-command -> (module that implements it, one-line help). The module's `add_parser(subparsers)`
# adds the sub-command and sets `func=callable(args) -> exit code`.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("twinlm.tokenization", "train WordPiece / byte-level BPE tokenizers, compare them"),
    "pretrain": ("twinlm.training.cli", "pretrain a masked-LM or causal model (one process)"),
    "finetune": ("twinlm.finetune", "fine-tune a checkpoint for sequence or token classification"),
    "convert": ("twinlm.convert_cli", "convert a BERT or GPT-2 checkpoint into twinlm"),
    "push": ("twinlm.hub", "upload a saved run to the Hugging Face Hub"),
    "evaluate": ("twinlm.evaluation", "fine-tune checkpoints on a task suite vs a from-scratch control"),
    "ablate": ("twinlm.ablation", "answer a Transformer design question by experiment"),
    "sweep": ("twinlm.sweep", "run a recipe sweep: pretrain and evaluate each trial, resumably"),
    "attention-map": ("twinlm.attention_map", "plot attention weights per layer and head for a sentence"),
    "describe": ("twinlm.describe", "parameters and FLOPs of a config, per component and per token"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command`; the other sub-commands appear with their help line only."""
    parser = argparse.ArgumentParser(prog="twinlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub-)parser that argparse will hand the arguments of `argv` to, e.g. `tokenizer train`'s."""
    for token in argv:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        parser = subparsers[0].choices.get(token, parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; a command whose parser has an `overrides` default takes config overrides
    (`section.key=value`, `--section.key value`) anywhere, the same way for every command."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    leaf = _leaf_parser(parser, argv)
    overrides: list[str] = []
    if leaf.get_default("overrides") is not None:
        from twinlm.config import split_overrides

        argv, overrides = split_overrides(argv, leaf._option_string_actions)
    args = parser.parse_args(argv)
    if leaf.get_default("overrides") is not None:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one `twinlm` command. Bad input, and a resource that ran out (disk, memory, a folder that cannot
    be written), are one line on stderr and exit status 2; a stop signal is 128 + its number."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except TwinLMError as err:
        print(f"twinlm: error: {err}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except TwinLMError as err:
        print(f"twinlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"twinlm {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"twinlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # what ran out deep inside torch/safetensors/tokenizers: one line, no traceback
        problem = resource_problem(err)
        if problem is None:
            raise
        where = getattr(err, "filename", None)
        detail = f"writing {where}" if where else " ".join(str(err).split())[:200]
        print(
            f"twinlm {args.command}: error: {problem} ({detail}); free space or memory (or choose another "
            "folder) and run the same command again: finished work is kept",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
