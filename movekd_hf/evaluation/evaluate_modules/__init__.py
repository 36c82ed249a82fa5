"""Local `evaluate` module files (loaded by path with `evaluate.load`; never imported by movekd_hf itself)."""
