"""ScienceQA accuracy as an `evaluate` metric over `movekd_hf.evaluation.scorers.scienceqa_accuracy`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import scienceqa_accuracy
from movekd_hf.metrics._rows import keyed_predictions, metric_info

_DESCRIPTION = """ScienceQA multiple-choice accuracy as LLaVA-1.5 scores it (llava/eval/eval_science_qa.py): the
reply picks an option by its bare letter, "X. ...", or "The answer is X."; anything else is wrong. Give only the
questions with an image for ScienceQA-IMG, the paper's number. Percentages."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's reply per question; `None` counts as missing (wrong).
    references (`list` of `dict`): per question, `choices` (the option texts, in order: A, B, ...) and `answer`
        (the right option's index).
Returns:
    accuracy (percent); num_questions; num_missing.
Examples:
    >>> sqa = evaluate.load(movekd_hf.metrics.path("scienceqa"))
    >>> sqa.compute(predictions=["B"], references=[{"choices": ["cat", "dog"], "answer": 1}])["accuracy"]
    100.0
"""

_CITATION = """@inproceedings{lu2022scienceqa,
  title={Learn to Explain: Multimodal Reasoning via Thought Chains for Science Question Answering},
  author={Lu, Pan and Mishra, Swaroop and Xia, Tony and Qiu, Liang and Chang, Kai-Wei and Zhu, Song-Chun and
          Tafjord, Oyvind and Clark, Peter and Kalyan, Ashwin},
  booktitle={NeurIPS}, year={2022}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ScienceQAAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            {"choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int32")},
            ["https://scienceqa.github.io/"],
        )

    def _compute(self, predictions, references):
        problems = {str(i): {"choices": list(ref["choices"]), "answer": int(ref["answer"])}
                    for i, ref in enumerate(references)}  # fmt: skip
        return scienceqa_accuracy(keyed_predictions(predictions), problems)
