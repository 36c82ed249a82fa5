"""GQA accuracy as an `evaluate` metric over `movekd_hf.evaluation.scorers.gqa_accuracy`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import gqa_accuracy
from movekd_hf.metrics._rows import keyed, keyed_predictions, metric_info

_DESCRIPTION = """GQA exact-match accuracy as LLaVA-1.5 scores testdev-balanced (llava/eval/eval_gqa.py): the
prediction, lower-cased and without a trailing period, must equal the answer. Percentages."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's answer per question; `None` counts as missing (wrong).
    references (`list` of `str`): the annotated answer per question.
    structural_types (`list` of `str`, optional): GQA's `types.structural` per question ("query" is open,
        "verify", "logical", "choose", "compare" binary), for `accuracy_open` and `accuracy_binary`.
Returns:
    accuracy (percent); accuracy_open and accuracy_binary with `structural_types`; num_questions; num_missing.
Examples:
    >>> gqa = evaluate.load(movekd_hf.metrics.path("gqa"))
    >>> gqa.compute(predictions=["Yes.", "the table"], references=["yes", "table"])
    {'accuracy': 50.0, 'num_questions': 2.0, 'num_missing': 0.0}
"""

_CITATION = """@inproceedings{hudson2019gqa,
  title={{GQA}: A New Dataset for Real-World Visual Reasoning and Compositional Question Answering},
  author={Hudson, Drew A. and Manning, Christopher D.},
  booktitle={CVPR}, year={2019}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GQAAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            datasets.Value("string"),
            ["https://cs.stanford.edu/people/dorarad/gqa/evaluate.html"],
        )

    def _compute(self, predictions, references, structural_types=None):
        answers = {str(i): answer for i, answer in enumerate(references)}
        types = keyed(structural_types, len(references), "structural_types") if structural_types is not None else None
        return gqa_accuracy(keyed_predictions(predictions), answers, types)
