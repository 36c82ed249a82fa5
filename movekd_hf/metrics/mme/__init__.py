"""An `evaluate` metric module (see `movekd_hf.metrics`): load this folder with `evaluate.load`."""
