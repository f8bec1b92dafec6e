"""Pretraining entry point for `accelerate launch scripts/pretrain.py --config RUN.yaml [overrides]`.

The same as `twinlm pretrain`; kept as a script because `accelerate launch` takes a file.
"""

import sys

from twinlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
