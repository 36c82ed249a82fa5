"""The paper's benchmark metrics as local Hugging Face `evaluate` modules, one folder each (`<name>/<name>.py`).

    import evaluate, movekd_hf.metrics
    pope = evaluate.load(movekd_hf.metrics.path("pope"))  # a local folder: no Hub access, works offline
    pope.compute(predictions=["Yes", "No, there is not."], references=[{"label": "yes", "split": "random"},
                                                                      {"label": "no", "split": "random"}])

Each module is a thin `evaluate.Metric` over the plain scorer in `movekd_hf.evaluation.scorers` (the one `movekd-hf
eval` and `score` use), so both give the same numbers: percentages, MME as its score. A `None` prediction counts
as missing (wrong), as a question absent from an answers file does. Install with the `eval` extra. The folders are
packages too, so they ship in the wheel with the rest of `movekd_hf`.

Light at import time: `evaluate` is imported only by `load` and by the modules themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SettingsError

# name -> the benchmarks it scores (the folder and module name are the metric's name)
METRICS: dict[str, str] = {
    "vqa_accuracy": "VQAv2, TextVQA, VizWiz",
    "gqa": "GQA",
    "pope": "POPE",
    "scienceqa": "ScienceQA-IMG",
    "mme": "MME",
    "mmbench": "MMBench (circular)",
}


def path(name: str) -> str:
    """The folder of metric `name`, to pass to `evaluate.load`. Raises `SettingsError` for an unknown name."""
    if name not in METRICS:
        raise SettingsError(f"unknown metric {name!r}", field="name", expected=f"one of {', '.join(METRICS)}")
    return str(Path(__file__).resolve().parent / name)


def load(name: str, **kwargs: Any) -> Any:
    """`evaluate.load(path(name), **kwargs)`: the metric module, loaded from this package's files."""
    import evaluate

    return evaluate.load(path(name), **kwargs)
