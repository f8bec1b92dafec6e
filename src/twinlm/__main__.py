import sys

from twinlm.cli import main

sys.exit(main())
