"""Evaluation on the paper's eight benchmarks: readers, prompts, a generation runner and local scorers.

Light at import time: the names below load their submodule on first use (PEP 562), so
`import movekd_hf.evaluation.scorers` needs only the standard library; readers and benchmarks import the package's
LLaVA conventions (and torch) when used, the runner imports transformers when it runs.
"""

from __future__ import annotations

from movekd_hf._lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(("BENCHMARKS", "HEADLINE_METRIC", "Benchmark", "EvalSample", "build_benchmark",
                     "read_predictions"), ".benchmarks"),
    "normalize_vqa_answer": ".normalize",
    **dict.fromkeys(("load_benchmark", "read_records", "score_files"), ".readers"),
    **dict.fromkeys(("gqa_accuracy", "mmbench_circular_accuracy", "mme_scores", "pope_scores", "scienceqa_accuracy",
                     "vqa_accuracy", "vqa_answer_accuracy"), ".scorers"),
}  # fmt: skip
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
