"""VQA accuracy (VQAv2, TextVQA, VizWiz) as an `evaluate` metric over `movekd_hf.evaluation.scorers.vqa_accuracy`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import vqa_accuracy
from movekd_hf.metrics._rows import keyed, keyed_predictions, metric_info

_DESCRIPTION = """The official VQA accuracy (visualqa.org/evaluation.html), as LLaVA-1.5 reports VQAv2, TextVQA and
VizWiz: answers are normalised (punctuation, articles, number words, contractions), and a prediction scores
min(#humans who gave it / 3, 1), averaged over the 10 leave-one-out subsets of the human answers. Percentages."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's answer per question; `None` counts as missing (wrong).
    references (`list` of `list` of `str`): the human answers per question (10 in the official files, at least 2).
    answer_types (`list` of `str`, optional): per question ("yes/no", "number", "other", "unanswerable"), for
        the per-type accuracies.
Returns:
    accuracy: percent, over all questions; `accuracy_<type>` per answer type when `answer_types` is given;
    num_questions; num_missing.
Examples:
    >>> vqa = evaluate.load(movekd_hf.metrics.path("vqa_accuracy"))
    >>> vqa.compute(predictions=["Two"], references=[["2", "2", "two", "3", "2", "2", "2", "2", "2", "2"]])
    {'accuracy': 100.0, 'num_questions': 1.0, 'num_missing': 0.0}
"""

_CITATION = """@inproceedings{goyal2017vqav2,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR}, year={2017}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            datasets.Sequence(datasets.Value("string")),
            ["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references, answer_types=None):
        answers = {str(i): list(humans) for i, humans in enumerate(references)}
        types = keyed(answer_types, len(references), "answer_types") if answer_types is not None else None
        return vqa_accuracy(keyed_predictions(predictions), answers, types)
