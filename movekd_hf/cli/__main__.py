"""`python -m movekd_hf.cli ...` (e.g. under `accelerate launch`): the `movekd-hf` command."""

import sys

from movekd_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
