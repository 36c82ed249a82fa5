"""The embedded demo (`movekd-hf demo`, `make demo`): a small, real MoVE-KD replication on the CPU.

A synthetic world of coloured shapes; three small teachers of real architectures, each pretrained on its own
signal; a tiny LLaVA (student tower = the `clip` teacher) trained in the paper's two stages through the real
`MoVEKDTrainer` for four arms (no KD, MSE baseline, MoVE-KD faithful, MoVE-KD improved); held-out evaluation by
question type; a Table-2-style results table with a computed verdict; plots; a model card; and a final check
that reloads the checkpoint through remote code and the `image-text-to-text` pipeline. `run` writes it all to
one folder (layout in `pipeline.py`).
"""

from __future__ import annotations

from .pipeline import DEFAULT_SIZE, QUICK_SIZE, DemoSize, run

__all__ = ["DEFAULT_SIZE", "QUICK_SIZE", "DemoSize", "run"]
