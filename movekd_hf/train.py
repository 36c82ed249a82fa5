"""`accelerate launch -m movekd_hf.train CONFIG.yaml [--key value ...]`: see movekd_hf/training/train.py."""

import sys

from movekd_hf.training.train import main

if __name__ == "__main__":
    sys.exit(main())
