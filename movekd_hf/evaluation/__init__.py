"""Evaluation on the paper's eight benchmarks: readers, prompts, a generation runner and local scorers.

Light at import time: scorers and readers need only the standard library; the runner imports torch and
transformers when it runs.
"""

from .benchmarks import BENCHMARKS, HEADLINE_METRIC, Benchmark, EvalSample, build_benchmark, read_predictions
from .normalize import normalize_vqa_answer
from .readers import load_benchmark, read_records, score_files
from .scorers import (
    gqa_accuracy,
    mmbench_circular_accuracy,
    mme_scores,
    pope_scores,
    scienceqa_accuracy,
    vqa_accuracy,
    vqa_answer_accuracy,
)

__all__ = [
    "BENCHMARKS", "HEADLINE_METRIC", "Benchmark", "EvalSample", "build_benchmark", "gqa_accuracy",
    "load_benchmark", "mmbench_circular_accuracy", "mme_scores", "normalize_vqa_answer", "pope_scores",
    "read_predictions", "read_records", "scienceqa_accuracy", "score_files", "vqa_accuracy", "vqa_answer_accuracy",
]  # fmt: skip
