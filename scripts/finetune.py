"""Fine-tuning entry point for `accelerate launch scripts/finetune.py --config TASK.yaml [overrides]`.

The same as `twinlm finetune`; kept as a script because `accelerate launch` takes a file.
"""

import sys

from twinlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
