"""`python -m movekd_hf.cli ...` (e.g. under `accelerate launch`): the `movekd-hf` command."""

from movekd_hf.cli import console_main

if __name__ == "__main__":
    console_main()
