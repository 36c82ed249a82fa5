"""The embedded demo (`movekd-hf demo`, `make demo`): does MoVE-KD move a teacher's knowledge into the student?

A synthetic world of striped, coloured shapes; three small teachers of real architectures, each pretrained on its
own signal, one of them (`convnext`) on the stripe orientation the student's tokens lack; a gap check with linear
probes before any training; a tiny LLaVA (student tower = the `clip` teacher) trained in the paper's two stages
through the real `MoVEKDTrainer` for several arms (no KD, the authors' faithful MoVE-KD, and one anchor option
each) and seeds, teachers read from one feature cache; probes of the student's tokens and answers by question type,
each paired with the no-KD arm with bootstrap and t-intervals (`movekd_hf.evaluation.compare`); the KD loss split
between adapters and student; a verdict computed from the intervals; plots, a model card, and a final check that
reloads the checkpoint through remote code and the `image-text-to-text` pipeline. `run` writes it all to one
folder (layout in `pipeline.py`).
"""

from __future__ import annotations

from .pipeline import DEFAULT_SIZE, QUICK_SIZE, DemoSize, run

__all__ = ["DEFAULT_SIZE", "QUICK_SIZE", "DemoSize", "run"]
