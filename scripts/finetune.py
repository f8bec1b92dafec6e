"""Fine-tuning entry point for `accelerate launch scripts/finetune.py --config TASK.yaml [overrides]`.

The same as `twinlm finetune`; kept as a script because `accelerate launch` takes a file.
"""

import argparse
import sys

from twinlm.errors import TwinLMError
from twinlm.finetune import build_arg_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser(
        argparse.ArgumentParser(prog="finetune.py", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    try:
        return run(args)
    except TwinLMError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
